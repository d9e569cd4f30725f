"""Capsule benchmarks: tiers vs raw copies, TTFT after restore vs cold prefill, KV-only ablation,
exactness - each measured side by side with its baseline in one run.

    python bench/bench_capsules.py                                   # tiny preset, CPU (~1-2 min)
    python bench/bench_capsules.py --preset hybrid-0.8b --device cuda --contexts 2048,4096,8192,16384

Experiments (`--experiments`, comma separated):
  tiers      snapshot/restore latency per tier (gpu, host, disk) vs state size, next to a plain
             copy of the same bytes (device memcpy on CUDA, host memcpy on CPU), pinned PCIe copies
             (CUDA), a naive per-buffer restore (one copy per named buffer) and a serialized
             host round trip (copy to host + serialize / deserialize + copy in, as llama.cpp's state
             API does); the restore from the tier on the arena's device (gpu on CUDA, host on the
             CPU) over the memcpy, per context, against the target of <= 1.25x;
  ttft       time to first token: cold prefill of the context + LM head vs capsule restore + LM
             head, with prefill throughput so the baseline's strength is visible;
  kv-only    the ablation: restore only the KV prefix (recurrent/conv/MTP/action state stale) and
             count how often and how soon the greedy tokens / actions diverge;
  exactness  byte-exact restore and 256 greedy tokens identical after restore.
Writes <out>/capsules-<tag>.json, .md and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import runtime_environment, shared_machine_note  # noqa: E402
from flashrt_ros.core.config import RuntimeConfig, StoreConfig, load_preset  # noqa: E402
from flashrt_ros.core.runtime import PolicyRuntime  # noqa: E402
from flashrt_ros.capsules.store import CapsuleStore  # noqa: E402


def log(msg):
    print(f"[bench capsules] {msg}", flush=True)


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn, repeat, warmup=2, before=None):
        """Median and p90 wall time (ms) of fn() until its device work completed."""
        out = []
        for i in range(warmup + repeat):
            if before:
                before()
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            if i >= warmup:
                out.append((time.perf_counter() - t) * 1e3)
        out.sort()
        return {"p50": statistics.median(out), "p90": out[int(0.9 * (len(out) - 1))], "n": len(out)}


def build(args, max_context):
    overrides = {"max_context": max_context} if max_context else {}
    cfg = load_preset(args.preset, **overrides)
    rt = PolicyRuntime(cfg, RuntimeConfig(device=args.device, prefill_buckets=tuple(args.buckets)),
                       progress=log)
    store = CapsuleStore(rt, StoreConfig(capsule_dir=tempfile.mkdtemp(prefix="flashrt-bench-"),
                                         gpu_budget_mb=args.pool_mb, host_budget_mb=args.pool_mb,
                                         disk_budget_mb=8 * args.pool_mb))
    return rt, store


def context_tokens(n, vocab, seed=0):
    g = np.random.default_rng(seed)
    return [256] + g.integers(0, 256, n - 1).tolist()


def run_tiers(rt, store, timer, ctx, repeat):
    """Snapshot/restore per tier next to raw copies of the same bytes."""
    row = {"context": ctx, "state_mb": rt.live_nbytes() / 1e6}
    live = rt.live_state()
    n = live.numel()
    dev = rt.device
    scratch = torch.empty(n, dtype=torch.uint8, device=dev)
    row["memcpy"] = timer.measure(lambda: scratch.copy_(live), repeat)
    if dev.type == "cuda":
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        row["pcie_d2h"] = timer.measure(lambda: pinned.copy_(live, non_blocking=True), repeat)
        row["pcie_h2d"] = timer.measure(lambda: scratch.copy_(pinned, non_blocking=True), repeat)
    # naive restore: one copy per named buffer (what per-layer allocations force)
    arena = rt.arena
    spans = [(s.offset, s.nbytes if s.role != "kv" else rt.position * arena.kv_row_nbytes)
             for s in arena.specs.values()]
    src = scratch
    row["naive_per_buffer_restore"] = timer.measure(
        lambda: [arena.base[o:o + k].copy_(src[o:o + k]) for o, k in spans], repeat)
    row["buffers"] = len(spans)
    for tier in store.tiers():
        reps = repeat if tier != "disk" else max(2, repeat // 5)
        row[f"{tier}_snapshot"] = timer.measure(lambda: store.snapshot("bench", tier=tier), reps,
                                                before=lambda: store.capsules.get("bench") and store.delete("bench"))
        row[f"{tier}_restore"] = timer.measure(lambda: store.restore("bench"), reps)
        store.delete("bench")
    # the target: a restore from the tier on the arena's device within 1.25x of memcpy
    local = "gpu" if dev.type == "cuda" else "host"
    row["restore_over_memcpy"] = {"tier": local,
                                  "ratio": row[f"{local}_restore"]["p50"] / row["memcpy"]["p50"]}

    # peer: serialized state through host memory (snapshot = copy to host + serialize;
    # restore = deserialize + copy in), as llama.cpp's llama_state_seq_* API does
    from safetensors.torch import load as st_load, save as st_save
    holder = {}

    def ser_snapshot():
        host = {name: arena.buffer_bytes(name, rt.position).cpu() for name in arena.specs}
        holder["blob"] = st_save(host)

    def ser_restore():
        host = st_load(holder["blob"])
        for name, t in host.items():
            arena.buffer_bytes(name, rt.position).copy_(t)
    row["serialized_snapshot"] = timer.measure(ser_snapshot, max(2, repeat // 5), warmup=1)
    row["serialized_restore"] = timer.measure(ser_restore, max(2, repeat // 5), warmup=1)
    return row


def run_ttft(rt, store, timer, ctx, tokens, repeat):
    """Cold prefill + first token vs restore + first token, same context."""
    def cold():
        rt.set_instruction(tokens)
        rt.next_token()
    cold_t = timer.measure(cold, max(2, repeat // 4), warmup=1)
    first = rt.next_token()
    store.snapshot("ttft", tier=store.tiers()[0])

    def warm():
        store.restore("ttft")
        rt.next_token()
    warm_t = timer.measure(warm, repeat)
    assert rt.next_token() == first
    store.delete("ttft")
    return {"context": ctx, "cold_prefill_first_token": cold_t, "restore_first_token": warm_t,
            "prefill_tokens_per_s": ctx / (cold_t["p50"] / 1e3),
            "speedup": cold_t["p50"] / warm_t["p50"]}


def run_kv_only(rt, store, ctx, trials, steps):
    """How often / how soon a KV-only restore diverges from the full restore."""
    obs_rng = np.random.default_rng(1)
    obs_dim = rt.model_cfg.obs_dim
    diverged_tokens, diverged_actions, first_token_div, first_action_div = 0, 0, [], []
    for trial in range(trials):
        for _ in range(1 + trial):                   # a different boundary each trial
            rt.step(obs_rng.standard_normal(obs_dim).astype(np.float32))
        store.snapshot("full", tier=store.tiers()[0])
        obs = [obs_rng.standard_normal(obs_dim).astype(np.float32) for _ in range(steps)]
        ref_actions = [rt.step(o) for o in obs]
        ref_tokens = rt.decode(steps)
        cap = store.capsule_bytes("full")
        kv_off = rt.arena.kv_offset
        # KV-only: KV prefix from the capsule; metadata (position) too so the KV rows line up
        rt.arena.base[kv_off:cap.numel()].copy_(cap[kv_off:].to(rt.device))
        meta = rt.arena.specs["meta"]
        rt.arena.base[meta.offset:meta.offset + meta.nbytes].copy_(
            cap[meta.offset:meta.offset + meta.nbytes].to(rt.device))
        rt._sync_mirrors_from_meta()
        acts = [rt.step(o) for o in obs]
        toks = rt.decode(steps)
        a_div = next((i for i, (x, y) in enumerate(zip(acts, ref_actions)) if x.tobytes() != y.tobytes()), None)
        t_div = next((i for i, (x, y) in enumerate(zip(toks, ref_tokens)) if x != y), None)
        diverged_actions += a_div is not None
        diverged_tokens += t_div is not None
        first_action_div.append(a_div)
        first_token_div.append(t_div)
        store.restore("full")
        store.delete("full")
    return {"context": ctx, "trials": trials, "steps": steps,
            "actions_diverged": diverged_actions, "tokens_diverged": diverged_tokens,
            "first_action_divergence": first_action_div, "first_token_divergence": first_token_div}


def run_exactness(rt, store, ntokens):
    store.snapshot("exact", tier=store.tiers()[0])
    before = rt.live_state().cpu().clone()
    ref = rt.decode(ntokens)
    store.restore("exact")
    byte_exact = torch.equal(rt.live_state().cpu(), before)
    again = rt.decode(ntokens)
    store.delete("exact")
    return {"byte_exact": bool(byte_exact), "tokens": ntokens, "tokens_identical": ref == again}


def markdown(result) -> str:
    env = result["environment"]
    lines = [f"# Capsule benchmarks: {result['preset']} on {env.get('gpu', env['device'])}", "",
             f"- date: {env['date_utc']}; commit {env['commit']}",
             f"- versions: python {env['python']}, torch {env['torch']}"
             + (f", CUDA {env['cuda']}, fla {env['fla']}" if "gpu" in env else "")
             + f"; kernels {env['kernels']}; CUDA graphs {env['cuda_graphs']}",
             f"- machine: {env['cpu']}, torch threads {env['torch_threads']}, load average "
             f"{env['load_average_1min']}",
             f"- command: `{env['command']}`", "",
             "Latencies in ms (median of repeated runs, wall time until the copy completed)."]
    if shared_machine_note(env):
        lines += ["", shared_machine_note(env)]
    tiers = result.get("tiers") or []
    if tiers:
        cuda = "gpu_snapshot" in tiers[0]
        cols = ["context", "state MB", "memcpy"] + (["PCIe D2H", "PCIe H2D"] if cuda else []) + \
               [f"naive restore ({tiers[0]['buffers']} copies)"] + \
               (["gpu snap", "gpu restore", "gpu restore / memcpy"] if cuda else []) + \
               ["host snap", "host restore"] + ([] if cuda else ["host restore / memcpy"]) + \
               ["disk snap", "disk restore", "serialized snap", "serialized restore"]
        lines += ["", "## Snapshot / restore per tier vs raw copies", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in tiers:
            vals = [str(r["context"]), f"{r['state_mb']:.1f}", f"{r['memcpy']['p50']:.3f}"]
            if cuda:
                vals += [f"{r['pcie_d2h']['p50']:.3f}", f"{r['pcie_h2d']['p50']:.3f}"]
            vals.append(f"{r['naive_per_buffer_restore']['p50']:.3f}")
            ratio = f"{r['restore_over_memcpy']['ratio']:.2f}x"
            if cuda:
                vals += [f"{r['gpu_snapshot']['p50']:.3f}", f"{r['gpu_restore']['p50']:.3f}", ratio]
            vals += [f"{r[k]['p50']:.3f}" for k in ("host_snapshot", "host_restore")]
            if not cuda:
                vals.append(ratio)
            vals += [f"{r[k]['p50']:.3f}" for k in ("disk_snapshot", "disk_restore",
                                                    "serialized_snapshot", "serialized_restore")]
            lines.append("| " + " | ".join(vals) + " |")
        local = tiers[0]["restore_over_memcpy"]["tier"]
        worst = max(r["restore_over_memcpy"]["ratio"] for r in tiers)
        lines += ["", f"{local} restore / memcpy of the same bytes (measured in this run): "
                  + ", ".join(f"{r['context']} tokens {r['restore_over_memcpy']['ratio']:.2f}x"
                              for r in tiers)
                  + (f"; target <= 1.25x at every length: {'met' if worst <= 1.25 else 'missed'}"
                     if local == "gpu" else "")]
    if result.get("ttft"):
        lines += ["", "## Time to first token: cold prefill vs capsule restore", "",
                  "| context | cold prefill + first token (ms) | prefill tok/s | restore + first token (ms) | speedup |",
                  "|---|---|---|---|---|"]
        for r in result["ttft"]:
            lines.append(f"| {r['context']} | {r['cold_prefill_first_token']['p50']:.2f} | "
                         f"{r['prefill_tokens_per_s']:.0f} | {r['restore_first_token']['p50']:.3f} | "
                         f"{r['speedup']:.1f}x |")
    if result.get("kv_only"):
        lines += ["", "## KV-only restore ablation (recurrent/conv/MTP/action state left stale)", "",
                  "| context | trials | actions diverged | tokens diverged | first diverging action step | first diverging token |",
                  "|---|---|---|---|---|---|"]
        for r in result["kv_only"]:
            lines.append(f"| {r['context']} | {r['trials']} | {r['actions_diverged']}/{r['trials']} | "
                         f"{r['tokens_diverged']}/{r['trials']} | {r['first_action_divergence']} | "
                         f"{r['first_token_divergence']} |")
    if result.get("exactness"):
        lines += ["", "## Exactness", "", "| context | byte-exact restore | greedy tokens | identical |",
                  "|---|---|---|---|"]
        for r in result["exactness"]:
            lines.append(f"| {r['context']} | {r['byte_exact']} | {r['tokens']} | {r['tokens_identical']} |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tiers = result.get("tiers") or []
    if not tiers:
        return
    x = [r["state_mb"] for r in tiers]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = [k for k in ("memcpy", "pcie_h2d", "naive_per_buffer_restore", "gpu_restore",
                        "host_restore", "disk_restore", "serialized_restore") if k in tiers[0]]
    for k in keys:
        ax.plot(x, [r[k]["p50"] for r in tiers], marker="o", label=k.replace("_", " "),
                linestyle="--" if k in ("memcpy", "pcie_h2d") else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("capsule size (MB)")
    ax.set_ylabel("restore latency (ms, median)")
    env = result["environment"]
    ax.set_title(f"Capsule restore vs raw copies - {result['preset']} on {env.get('gpu', env['device'])}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--contexts", default="512,2048,8192", help="context lengths (tokens)")
    p.add_argument("--experiments", default="tiers,ttft,kv-only,exactness")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--pool-mb", type=float, default=1024.0, help="gpu/host pool budget (MB)")
    p.add_argument("--buckets", default="4096,1024,256,64,16,4", help="prefill buckets")
    p.add_argument("--kv-trials", type=int, default=8)
    p.add_argument("--exact-tokens", type=int, default=256)
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--tag", default="", help="output name suffix (default: preset-device)")
    args = p.parse_args(argv)
    args.buckets = [int(b) for b in args.buckets.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    exps = set(args.experiments.split(","))
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    max_ctx = max(contexts) + args.exact_tokens + 64
    base_cfg = load_preset(args.preset)
    rt, store = build(args, max(max_ctx, base_cfg.max_context))
    timer = Timer(rt.device)
    result = {"preset": args.preset, "environment": runtime_environment(rt), "tiers": [], "ttft": [],
              "kv_only": [], "exactness": []}
    for ctx in contexts:
        tokens = context_tokens(ctx, rt.model_cfg.vocab_size)
        log(f"context {ctx}: prefilling")
        rt.set_instruction(tokens)
        if "tiers" in exps:
            log(f"context {ctx}: tiers")
            result["tiers"].append(run_tiers(rt, store, timer, ctx, args.repeat))
        if "ttft" in exps:
            log(f"context {ctx}: ttft")
            result["ttft"].append(run_ttft(rt, store, timer, ctx, tokens, args.repeat))
        if "exactness" in exps:
            log(f"context {ctx}: exactness ({args.exact_tokens} greedy tokens)")
            rt.set_instruction(tokens)
            result["exactness"].append({"context": ctx, **run_exactness(rt, store, args.exact_tokens)})
        if "kv-only" in exps:
            log(f"context {ctx}: kv-only ablation")
            rt.set_instruction(tokens)
            result["kv_only"].append(run_kv_only(rt, store, ctx, args.kv_trials, 16))
        write(result, args, rt)
    write(result, args, rt, final=True)


def write(result, args, rt, final=False):
    """Write JSON/Markdown (and the plot at the end); called after every context so that a run cut
    short still leaves what it measured."""
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or f"{args.preset}-{rt.device.type}"
    base = os.path.join(args.out, f"capsules-{tag}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(base + ".md", "w") as f:
        f.write(md)
    if final:
        plot(result, base + ".png")
        print(md)
        log(f"wrote {base}.json, .md, .png")


if __name__ == "__main__":
    main()
