"""core/fused.py's kernels beside what they replace, on the shapes of a preset (CUDA only).

    python bench/bench_kernels.py                                  # hybrid-0.8b, bf16
    python bench/bench_kernels.py --preset tiny --tokens 512 --out docs/bench

Rows:
  GEMV       one token through each projection of the preset (and the LM head): cuBLAS through
             F.linear (what the step ran before) against fused.gemv, device time per call and the
             bandwidth of reading the weight matrix once; for the projections that read a norm
             of the residual stream, also add_rms_norm + gemv against fused.norm_gemv;
  step fusions  a Gated DeltaNet layer's conv and gated norm apart (norm_gemv + conv_step,
             gated_rms_norm + gemv) and inside its GEMVs (fused.norm_gemv_conv,
             fused.gated_norm_gemv: FLASHRT_GDN_FUSION=1);
  recurrence one token of one Gated DeltaNet layer: fused.gdn_step against the torch ops of
             its reference and against fla's fused recurrent kernel launched as the step ran it
             before (the state as its own initial and final state), where fla imports;
  row kernels  a prefill chunk of --tokens tokens through each chain core/fused.py fuses (the
             norms, SwiGLU, the conv, the gated norm) against the torch operations of its
             reference.
Device time: each call is captured 20 times into one CUDA graph and the graph replayed, timed
with CUDA events (launch overhead hidden, as in a captured step), the median over --repeat
replays divided by 20.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import device_slug, environment, write_report  # noqa: E402
from flashrt_ros.core import fused, kernels  # noqa: E402
from flashrt_ros.core.config import load_preset  # noqa: E402

CALLS = 20


def graph_us(fn, repeat: int) -> float:
    """Device microseconds per call of fn, from a graph of CALLS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(repeat):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / CALLS)
    return statistics.median(times)


def fla_step(q, k, v, a, b, A_log, dt_bias, state, scale):
    """One token through fla's fused recurrent kernel with the state updated in place: the
    step's recurrence before fused.gdn_step (fla's own launch parameters)."""
    import triton
    from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule_fwd_kernel
    (Hk, K), (Hv, V) = q.shape, v.shape
    bv = min(8, triton.next_power_of_2(V))
    o = torch.empty_like(v)
    fused_recurrent_gated_delta_rule_fwd_kernel[(triton.cdiv(V, bv) * Hv,)](
        q=q, k=k, v=v, g=a, gk=None, gv=None, beta=b, A_log=A_log, dt_bias=dt_bias, o=o,
        h0=state, ht=state, cu_seqlens=None, scale=scale, T=1, H=Hk, HV=Hv, K=K, V=V,
        BK=triton.next_power_of_2(K), BV=bv, IS_BETA_HEADWISE=True, USE_QK_L2NORM_IN_KERNEL=True,
        APPLY_BETA_SIGMOID=True, ALLOW_NEG_EIGVAL=False, STATE_V_FIRST=False, num_warps=1,
        num_stages=3)
    return o


def projections(cfg) -> list[tuple[str, int, int]]:
    """(name, N, K) of every single-token projection of the preset, packed as the model packs."""
    t = cfg.text
    d, H, Hkv, D = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    value_dim = t.linear_num_value_heads * t.linear_value_head_dim
    return [("DeltaNet in (q|k|v, z, b, a)", t.conv_dim + value_dim + 2 * t.linear_num_value_heads, d),
            ("DeltaNet out", d, value_dim),
            ("attention q|gate, k, v", (2 * H + 2 * Hkv) * D, d),
            ("attention out", d, H * D),
            ("MLP gate|up", 2 * t.intermediate_size, d),
            ("MLP down", d, t.intermediate_size),
            ("LM head", t.vocab_size, d)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="hybrid-0.8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=2048, help="rows of the row kernels (default 2048)")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--sweep", action="store_true",
                    help="also time every (rows, cols) tile of the GEMV for each projection")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not fused.available():
        print("bench_kernels: needs a CUDA GPU with Triton; skipped", file=sys.stderr)
        return 0
    cfg = load_preset(args.preset, dtype=args.dtype)
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    env = environment(dev, code=("flashrt_ros/core/fused.py", "bench/bench_kernels.py"))
    env.update(preset=cfg.name, dtype=args.dtype, calls_per_graph=CALLS, repeat=args.repeat)
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=dev).to(dt)

    gemv_rows, results = [], {"gemv": {}, "rows": {}}
    d = cfg.text.hidden_size
    norm_scale = 1 + 0.1 * randn(d, dt=torch.float32)
    for name, N, K in projections(cfg):
        w, x = randn(N, K) * K ** -0.5, randn(K)
        x2 = x.view(1, K)
        cublas = graph_us(lambda: torch.nn.functional.linear(x2, w), args.repeat)
        ours = graph_us(lambda: fused.gemv(x, w), args.repeat)
        mb = N * K * w.element_size() / 1e6
        bn, bk = fused.gemv_config(N, K)
        results["gemv"][name] = {"N": N, "K": K, "cublas_us": cublas, "gemv_us": ours}
        normed = ["", ""]
        if K == d:      # a projection of the residual stream's norm: the step's norm_gemv
            delta = randn(K)
            apart = graph_us(lambda: fused.gemv(
                fused.add_rms_norm(x, delta, norm_scale, 1e-6)[1], w), args.repeat)
            inside = graph_us(lambda: fused.norm_gemv(x, delta, norm_scale, 1e-6, w),
                              args.repeat)
            results["gemv"][name].update(add_norm_then_gemv_us=apart, norm_gemv_us=inside)
            normed = [round(apart, 2), round(inside, 2)]
            print(f"   with its norm: add_rms_norm + gemv {apart:.2f} us, norm_gemv "
                  f"{inside:.2f} us", flush=True)
        gemv_rows.append([name, f"{N} x {K}", round(mb, 1), round(cublas, 2),
                          round(mb / cublas * 1e3), round(ours, 2), round(mb / ours * 1e3),
                          round(cublas / ours, 2), f"{bn} x {bk}", *normed])
        print(f"gemv {name}: cuBLAS {cublas:.2f} us, fused {ours:.2f} us", flush=True)
        if args.sweep:
            tiles = {}
            for tbn in (1, 2, 4, 8, 16):
                for tbk in (256, 512, 1024, 2048, 4096):
                    if tbk <= 2 * fused._pow2(K) and tbn * tbk <= 16384:
                        tiles[f"{tbn}x{tbk}"] = graph_us(
                            lambda: fused.gemv(x, w, (tbn, tbk)), args.repeat // 2)
            best = sorted(tiles.items(), key=lambda kv: kv[1])[:5]
            results["gemv"][name]["sweep_us"] = tiles
            print("   tiles, fastest first: " + ", ".join(f"{k} {v:.2f}" for k, v in best),
                  flush=True)

    t, T = cfg.text, args.tokens
    # the neighbours a Gated DeltaNet layer's step fuses into its two projections' GEMVs
    (_, n_in, _), (_, n_out, k_out) = projections(cfg)[:2]
    Hv, Dv = t.linear_num_value_heads, t.linear_value_head_dim
    w_in, w_out, x1, d1 = randn(n_in, d) * d ** -0.5, randn(n_out, k_out) * k_out ** -0.5, \
        randn(d), randn(d)
    cs1, cw1 = randn(t.linear_conv_kernel_dim - 1, t.conv_dim), randn(t.conv_dim,
                                                                    t.linear_conv_kernel_dim)
    o1, z1, gw1 = randn(Hv, Dv), randn(Hv, Dv), 1 + 0.1 * randn(Dv)
    neighbours = [
        ("DeltaNet in-projection + short conv (norm_gemv_conv)",
         lambda: fused.conv_step(fused.norm_gemv(x1, d1, norm_scale, 1e-6, w_in)[1][:t.conv_dim],
                                 cs1, cw1),
         lambda: fused.norm_gemv_conv(x1, d1, norm_scale, 1e-6, w_in, cs1, cw1)),
        ("gated RMSNorm + DeltaNet out-projection (gated_norm_gemv)",
         lambda: fused.gemv(fused.gated_rms_norm(o1, z1, gw1, 1e-6).view(-1), w_out),
         lambda: fused.gated_norm_gemv(o1, z1, gw1, 1e-6, w_out)),
    ]
    neighbour_rows = []
    for name, apart, inside in neighbours:
        a, b = graph_us(apart, args.repeat), graph_us(inside, args.repeat)
        results.setdefault("step_fusions", {})[name] = {"apart_us": a, "fused_us": b}
        neighbour_rows.append([name, round(a, 2), round(b, 2)])
        print(f"step {name}: {a:.2f} -> {b:.2f} us", flush=True)
    F_ = t.intermediate_size
    C, Kc = t.conv_dim, t.linear_conv_kernel_dim
    Hk, Dk = t.linear_num_key_heads, t.linear_key_head_dim
    q1, k1, v1, a1, b1 = randn(Hk, Dk), randn(Hk, Dk), randn(Hv, Dv), randn(Hv), randn(Hv)
    A_log = torch.log(torch.rand(Hv, generator=gen, device=dev) * 15 + 1)
    dt_bias = torch.rand(Hv, generator=gen, device=dev) * 2 - 4
    S = randn(Hv, Dk, Dv, dt=torch.float32) * 0.1
    args1 = (q1, k1, v1, a1, b1, A_log, dt_bias, S, Dk ** -0.5)
    steps = [("torch ops (the reference)", lambda: fused.gdn_step_reference(*args1)),
             ("fused.gdn_step", lambda: fused.gdn_step(*args1, kernels.L2NORM_EPS))]
    if kernels.fla_available():
        steps.append(("fla fused recurrent kernel", lambda: fla_step(*args1)))
    state_mb = 2 * S.numel() * 4 / 1e6                      # the state read and written once
    step_rows = []
    for name, fn in steps:
        us = graph_us(fn, args.repeat)
        results.setdefault("recurrence", {})[name] = {"us": us}
        step_rows.append([name, f"{Hv} x {Dk} x {Dv}", round(state_mb, 2), round(us, 2),
                          round(state_mb / us * 1e3)])
        print(f"recurrence {name}: {us:.2f} us", flush=True)
    scale = 1 + 0.1 * randn(d, dt=torch.float32)
    x, delta = randn(T, d), randn(T, d)
    gu = randn(T, 2 * F_)
    qkv, cs, cw = randn(T, C), randn(Kc - 1, C), randn(C, Kc) * 0.5
    kd = t.linear_num_key_heads * t.linear_key_head_dim
    sizes = (kd, kd, C - 2 * kd)
    o, z, gw = randn(T, Hv, Dv), randn(T, Hv, Dv), 1 + 0.1 * randn(Dv)
    chains = [
        ("residual add + RMSNorm", lambda: fused.add_rms_norm_reference(x, delta, scale, 1e-6),
         lambda: fused.add_rms_norm(x, delta, scale, 1e-6)),     # x += delta in place
        ("SwiGLU", lambda: fused.swiglu_reference(gu), lambda: fused.swiglu(gu)),
        ("causal conv + silu (q, k, v out)", lambda: fused.conv_rows_reference(qkv, cs, cw, sizes),
         lambda: fused.conv_rows(qkv, cs, cw, sizes)),
        ("gated RMSNorm", lambda: fused.gated_rms_norm_reference(o, z, gw, 1e-6),
         lambda: fused.gated_rms_norm(o, z, gw, 1e-6)),
    ]
    row_rows = []
    for name, ref, kernel in chains:
        a, b = graph_us(ref, args.repeat), graph_us(kernel, args.repeat)
        results["rows"][name] = {"torch_us": a, "fused_us": b}
        row_rows.append([name, T, round(a, 1), round(b, 1), round(a / b, 2)])
        print(f"rows {name}: torch {a:.1f} us, fused {b:.1f} us", flush=True)
    sections = [
        {"heading": "One token through each projection (GEMV)",
         "columns": ["projection", "N x K", "weight MB", "cuBLAS us", "cuBLAS GB/s",
                     "fused.gemv us", "fused.gemv GB/s", "speed-up", "tile (rows x cols)",
                     "add_rms_norm + gemv us", "norm_gemv us"],
         "rows": gemv_rows,
         "notes": ["cuBLAS = F.linear of a [1, K] row (what the step ran before); the bandwidth "
                   "is the weight matrix read once per call. The last two columns, for the "
                   "projections that read a norm of the residual stream: the residual add and "
                   "the norm as their own kernel before the GEMV, and computed inside it "
                   "(fused.norm_gemv, the step's form)."]},
        {"heading": "A Gated DeltaNet layer's step: what its two projections' GEMVs compute "
                    "besides the projection",
         "columns": ["kernels", "apart us", "fused us"],
         "rows": neighbour_rows,
         "notes": ["Apart (the default): norm_gemv, then conv_step; gated_rms_norm, then gemv. "
                   "Fused (FLASHRT_GDN_FUSION=1): the conv + silu of the conv channels and the "
                   "conv state's shift in the in-projection's GEMV, the gated norm inside the "
                   "out-projection's."]},
        {"heading": "One token of one Gated DeltaNet layer's recurrence",
         "columns": ["implementation", "state (heads x K x V)", "state MB read + written", "us",
                     "GB/s"],
         "rows": step_rows,
         "notes": ["L2 norms of q/k, decay and beta gates, delta rule and read-out, fp32 state "
                   "updated in place; fla's row is missing where fla does not import."]},
        {"heading": f"A prefill chunk of {T} tokens through the fused chains",
         "columns": ["chain", "tokens", "torch ops us", "fused kernel us", "speed-up"],
         "rows": row_rows,
         "notes": ["torch ops = the reference in core/fused.py (the ops the model ran before)."]},
    ]
    stem = os.path.join(args.out, f"kernels-{cfg.name}-{device_slug(env)}")
    md, _ = write_report(stem, f"Fused kernels: {cfg.name} ({args.dtype}) on {env.get('gpu')}",
                         env, sections, results)
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
