"""core/models/qwen3_5/prefill_attention_qwen3_5.py's kernel beside torch's flash attention on a
preset's shapes (CUDA).

A prefill chunk of T tokens at position P attends to P + T rows of one layer's KV cache. The rows:
  kernel       prefill_attention (the static form: the position read from meta, what every
               captured chunk runs), one row per tile configuration in --configs, the first
               being prefill_attention_config's choice for the shape
  sdpa         the eager dynamic form's call: SDPA over the live prefix with causal_lower_right
               and GQA, then the output gate (what the position-0 plans replayed before every
               chunk was captured)
Device time per call (CUDA events, calls queued back to back, median of --repeat) and the
attention's TFLOP/s (causal: each query row t reads P + t + 1 rows).

    python bench/bench_prefill_attention.py                    # hybrid-0.8b, bf16
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

if __package__ in (None, ""):      # `python bench/bench_prefill_attention.py` from the root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (cuda_event_ms, device_slug, environment, summary,  # noqa: E402
                          write_report)
from flashrt_ros.core.arena import DTYPES, META_LEN, META_POSITION  # noqa: E402
from flashrt_ros.core.config import load_preset  # noqa: E402
from flashrt_ros.core.models.qwen3_5.prefill_attention_qwen3_5 import (  # noqa: E402
    prefill_attention, prefill_attention_config, prefill_attention_reference)

# (chunk tokens, position): chunks of the default buckets in a 2k and a 16k instruction
CASES = ((1024, 0), (1024, 1024), (4096, 0), (4096, 12288), (256, 16000), (16, 16000))
CONFIGS = "128x32x8x2,128x64x8x2,64x64x4x2,128x32x4x3,64x32x4x2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="hybrid-0.8b")
    p.add_argument("--configs", default=CONFIGS,
                   help="tile configurations BLOCK_MxBLOCK_NxWARPSxSTAGES to compare "
                        "(default %(default)s)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=None, help="output stem (default docs/bench/prefill-attention-"
                                                "<device>)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_preset(args.preset)
    t = cfg.text
    H, Hkv, D, dtype = t.num_attention_heads, t.num_key_value_heads, t.head_dim, DTYPES[cfg.dtype]
    G = H // Hkv
    max_ctx = cfg.max_context
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",") if c]
    g = torch.Generator(device="cuda").manual_seed(0)
    kv = torch.randn(max_ctx, 2, Hkv, D, generator=g, device="cuda").to(dtype)
    meta = torch.zeros(META_LEN, dtype=torch.int64, device="cuda")
    rows, results = [], []
    for T, P in CASES:
        if P + T > max_ctx:
            continue
        proj = torch.randn(T, 2 * H * D, generator=g, device="cuda").to(dtype)
        q, gate = proj.view(T, H, 2, D).unbind(2)                  # the model's strided views
        meta[META_POSITION] = P
        flop = 4 * H * D * (T * P + T * (T + 1) / 2)               # q k^T and p v, causal
        default = prefill_attention_config(T * G, D, dtype)
        err = (prefill_attention(q, gate, kv, meta).float()
               - prefill_attention_reference(q, gate, kv, meta).float()).abs().max().item()
        calls = [("kernel " + "x".join(map(str, c)) + (" (default)" if c == default else ""),
                  lambda c=c: prefill_attention(q, gate, kv, meta, c))
                 for c in [default] + [c for c in configs if c != default]]
        keys, vals = kv[:P + T, 0].transpose(0, 1), kv[:P + T, 1].transpose(0, 1)
        mask = causal_lower_right(T, P + T)

        def sdpa():
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], vals[None],
                                               attn_mask=mask, enable_gqa=True)[0]
            return o.transpose(0, 1).reshape(T, H * D) * torch.sigmoid(gate.reshape(T, H * D))
        calls.append(("sdpa (dynamic form) + gate", sdpa))
        for name, fn in calls:
            try:
                s = summary(cuda_event_ms(fn, args.repeat, warmup=3))
            except Exception as e:  # noqa: BLE001 - a tile that does not fit: say so, go on
                print(f"T={T} P={P} {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                rows.append([T, P, name, "failed", "-", "-"])
                continue
            tflops = flop / (s["p50"] * 1e-3) / 1e12
            print(f"T={T:5d} P={P:5d} {name:32s} {s['p50']:8.3f} ms {tflops:7.1f} TFLOP/s",
                  flush=True)
            rows.append([T, P, name, f"{s['p50']:.3f}", f"{tflops:.1f}",
                         f"{err:.1e}" if name.startswith("kernel") and "default" in name else ""])
            results.append({"T": T, "position": P, "call": name, "ms": s, "tflops": tflops})
    env = environment(torch.device("cuda"))
    env.update(preset=cfg.name, heads=H, kv_heads=Hkv, head_dim=D, dtype=cfg.dtype,
               max_context=max_ctx)
    out = args.out or os.path.join("docs", "bench", f"prefill-attention-{device_slug(env)}")
    md, _ = write_report(out, f"Prefill attention: {cfg.name} on {env.get('gpu')}", env, [{
        "heading": "One layer's attention of a chunk (device time, p50)",
        "columns": ["chunk T", "position", "call", "ms", "TFLOP/s", "max |kernel - reference|"],
        "rows": rows, "notes": [__doc__.split("\n\n")[1]]}], {"rows": results})
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
