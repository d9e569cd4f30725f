"""Paged vs flat capsule store, side by side in one run.

    python bench/bench_paged.py                                        # tiny, CPU, 4000 tokens
    python bench/bench_paged.py --preset hybrid-0.8b --device cuda --tokens 16000 --tag h100

Experiments (`--experiments`, comma separated):
  memory   one episode of --tokens prefilled tokens; a root capsule, then --forks forks, each
           restored from the root and run --steps control steps, snapshotted into both stores
           (the same live bytes): the bytes each store holds for the root and the forks, against
           one capsule's live size. The paged store's expected size is printed beside it: the KV
           once plus one small state per capsule (rounded up to whole blocks).
  restore  restore latency of one fork: the flat store (one contiguous copy of the live range),
           the paged store with the fork's own table (a KV run plus a small-state run), the paged
           store with a fully scattered table (every other free block taken first, so each block
           moves alone: the one-gather path), and a plain copy of the same bytes as the floor.
  steps    control-step latency (p50 / p99 / max) of a control loop at a fixed rate
           (--control-period-ms; the latency runs from the tick to the action, waiting for the
           runtime lock included), alone and while a second thread creates forks (a snapshot of
           the live state and a fork of a stored capsule, deleting older ones, then a pause of
           --fork-interval-ms), with each store.
Writes <out>/paged-<tag>.json, .md and .png. Progress goes to stdout.
`--plot-only <out>/paged-<tag>.json` measures nothing and writes the .png of that JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import runtime_environment  # noqa: E402
from bench.common import grouped_bars, log_y, pyplot  # noqa: E402
from flashrt_ros.core.config import RuntimeConfig, StoreConfig, load_preset  # noqa: E402
from flashrt_ros.core.runtime import PolicyRuntime  # noqa: E402
from flashrt_ros.capsules.store import CapsuleStore, PagedCapsuleStore  # noqa: E402

MiB = 2 ** 20


def log(msg):
    print(f"[bench paged] {msg}", flush=True)


def sync(rt):
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def timed(rt, fn, repeat, warmup=3):
    """Median and p90 (ms) of fn() until its device work completed."""
    out = []
    for i in range(warmup + repeat):
        sync(rt)
        t = time.perf_counter()
        fn()
        sync(rt)
        if i >= warmup:
            out.append((time.perf_counter() - t) * 1e3)
    out.sort()
    return {"median_ms": statistics.median(out), "p90_ms": out[int(0.9 * (len(out) - 1))],
            "n": len(out)}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def observation_stream(dim, seed):
    g = np.random.default_rng(seed)
    while True:
        yield g.standard_normal(dim).astype(np.float32)


# -- experiments ------------------------------------------------------------------------------
def run_memory(rt, flat, paged, tier, args):
    obs = observation_stream(rt.model_cfg.obs_dim, 1)
    paged.snapshot("root", tier=tier)
    flat.snapshot("root", tier=tier)
    one = rt.live_nbytes()
    t0 = time.perf_counter()
    for i in range(args.forks):
        paged.restore("root")
        for _ in range(args.steps):
            rt.step(next(obs))
        paged.snapshot(f"fork-{i}", tier=tier)
        flat.snapshot(f"fork-{i}", tier=tier)
        if (i + 1) % max(1, args.forks // 8) == 0 or i + 1 == args.forks:
            log(f"memory: {i + 1}/{args.forks} forks x {args.steps} steps "
                f"({time.perf_counter() - t0:.1f} s)")
    # the two stores hold the same bytes
    for name in ("root", "fork-0", f"fork-{args.forks - 1}"):
        assert torch.equal(paged.capsule_bytes(name), flat.capsule_bytes(name)), name
    a = rt.arena
    n_caps = args.forks + 1
    mem = paged.memory
    small_blocks = mem.n_small * mem.block_bytes
    kv_blocks = -(-rt.position // mem.block_tokens) * mem.block_bytes
    fu, pu = flat.usage()[tier], paged.usage()[tier]
    return {"tier": tier, "capsules": n_caps, "position": rt.position,
            "one_capsule_bytes": one, "kv_bytes": rt.position * a.kv_row_nbytes,
            "small_state_bytes": a.small_nbytes, "block_tokens": mem.block_tokens,
            "block_bytes": mem.block_bytes,
            "flat_bytes": fu["used"], "paged_bytes": pu["used"],
            "paged_expected_bytes": kv_blocks + n_caps * small_blocks,
            "flat_x_one": fu["used"] / one, "paged_x_one": pu["used"] / one,
            "paged_blocks_used": pu["blocks_used"],
            "bound_small_state_x_one": n_caps * a.small_nbytes / one}


def scattered_fork(rt, paged, tier):
    """A capsule whose every new block is alone: every other free block is taken first."""
    mem = paged.memory
    pool = mem.blocks[tier]
    paged.restore("fork-0")
    held = pool.allocate(pool.free_blocks)
    pool.decref(held[::2])
    # a KV that matches nothing stored: compare against no candidate
    mem._donors = {}
    paged.on_reset()
    paged.snapshot("scattered", tier=tier)
    pool.decref(held[1::2])
    paged.check_invariants()
    ids = mem.tables["scattered"]
    _, sizes = mem._layout(paged.get("scattered").position)
    return len(mem._runs(np.arange(len(ids)), ids, sizes))


def run_restore(rt, flat, paged, tier, args):
    n = rt.live_nbytes()
    res = {"bytes": n}
    buf = torch.empty(n, dtype=torch.uint8, device=rt.device)
    buf.copy_(rt.live_state())
    res["plain_copy"] = timed(rt, lambda: rt.arena.base[:n].copy_(buf), args.repeat)
    res["flat"] = timed(rt, lambda: flat.restore("fork-1"), args.repeat)
    mem = paged.memory
    ids = mem.tables["fork-1"]
    _, sizes = mem._layout(paged.get("fork-1").position)
    res["paged_runs"] = len(mem._runs(np.arange(len(ids)), ids, sizes))
    res["paged"] = timed(rt, lambda: paged.restore("fork-1"), args.repeat)
    res["scattered_runs"] = scattered_fork(rt, paged, tier)
    res["paged_scattered"] = timed(rt, lambda: paged.restore("scattered"), args.repeat)
    expected = flat.capsule_bytes("fork-1")
    paged.restore("fork-1")
    assert torch.equal(rt.live_state().cpu(), expected)
    paged.delete("scattered")
    for k in ("plain_copy", "flat", "paged", "paged_scattered"):
        log(f"restore {k}: median {res[k]['median_ms']:.3f} ms, p90 {res[k]['p90_ms']:.3f} ms")
    return res


def step_latencies(rt, store, tier, args, forking: bool):
    obs = observation_stream(rt.model_cfg.obs_dim, 2)
    if store is not None:
        store.restore("root")
    for _ in range(20):
        with rt.lock:
            rt.step(next(obs))
    done = threading.Event()
    made = [0]
    errors = []

    def forker():
        k = 0
        try:
            while not done.is_set():
                store.snapshot(f"live-{k}", tier=tier)
                store.fork("root", f"fk-{k}", tier=tier)
                if k >= 2:
                    store.delete(f"live-{k - 2}")
                    store.delete(f"fk-{k - 2}")
                k += 1
                made[0] += 2
                done.wait(args.fork_interval_ms / 1e3)
            for j in range(max(0, k - 2), k):
                store.delete(f"live-{j}")
                store.delete(f"fk-{j}")
        except Exception as e:  # noqa: BLE001 - reported in the result, not swallowed
            errors.append(repr(e))

    th = threading.Thread(target=forker, daemon=True) if forking else None
    if th:
        th.start()
    lat = []
    period = args.control_period_ms / 1e3
    t_start = time.perf_counter()
    for i in range(args.latency_steps):
        o = next(obs)
        # a control loop at a fixed rate: the tick is when the observation arrives; the latency
        # runs from the tick to the action on the host (waiting for the runtime lock included)
        tick = t_start + i * period
        pause = tick - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        t = time.perf_counter()
        with rt.lock:
            rt.step(o)      # returns the action on the host: the step's device work is done
        lat.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - t_start
    done.set()
    if th:
        th.join()
    if errors:
        raise RuntimeError(f"fork thread failed: {errors[0]}")
    return {"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "max_ms": max(lat),
            "mean_ms": statistics.fmean(lat), "steps": len(lat),
            "forks_per_s": made[0] / wall if forking else 0.0,
            "p99_over_p50": pct(lat, 0.99) / pct(lat, 0.5)}


def run_steps(rt, flat, paged, tier, args):
    res = {"alone": step_latencies(rt, None, tier, args, False)}
    log(f"steps alone: p50 {res['alone']['p50_ms']:.3f} ms, p99 {res['alone']['p99_ms']:.3f} ms")
    for name, store in (("flat", flat), ("paged", paged)):
        r = step_latencies(rt, store, tier, args, True)
        res[f"forking_{name}"] = r
        log(f"steps while forking ({name}, {r['forks_per_s']:.0f} capsules/s): p50 "
            f"{r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, p99/p50 {r['p99_over_p50']:.2f}")
    return res


# -- report -----------------------------------------------------------------------------------
def markdown(result) -> str:
    env, a = result["env"], result["args"]
    lines = [f"# Paged vs flat capsule store: {a['preset']} on {env['device']}", "",
             f"- date: {env['date_utc']}; commit {env['commit']}",
             "- device: " + (f"{env['gpu']}, host " if "gpu" in env else "")
             + f"{env['cpu']}, torch threads {env['torch_threads']}, load "
             f"{env['load_average_1min']}",
             f"- versions: python {env['python']}, torch {env['torch']}"
             + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + f", numpy {env['numpy']}; "
             f"kernels {env['kernels']}, CUDA graphs {env['cuda_graphs']}",
             f"- command: `{env['command']}`",
             f"- model: preset {a['preset']} (max_context {result['max_context']}), episode of "
             f"{a['tokens']} prefilled tokens", ""]
    m = result.get("memory")
    if m:
        lines += ["## Memory: root + {f} forks, each {s} control steps after the root".format(
                      f=m["capsules"] - 1, s=a["steps"]), "",
                  f"One capsule (live range at {m['position']} tokens): "
                  f"{m['one_capsule_bytes'] / MiB:.2f} MiB = small state "
                  f"{m['small_state_bytes'] / MiB:.3f} MiB + KV {m['kv_bytes'] / MiB:.2f} MiB. "
                  f"Paged blocks: {m['block_tokens']} tokens = {m['block_bytes'] / 1024:.0f} KiB.", "",
                  "| store | bytes held | x one capsule |", "|---|---|---|",
                  f"| flat CapsuleStore | {m['flat_bytes'] / MiB:.2f} MiB | {m['flat_x_one']:.2f}x |",
                  f"| PagedCapsuleStore | {m['paged_bytes'] / MiB:.2f} MiB | {m['paged_x_one']:.2f}x |",
                  f"| paged, expected (KV once + {m['capsules']} small states in whole blocks) | "
                  f"{m['paged_expected_bytes'] / MiB:.2f} MiB | "
                  f"{m['paged_expected_bytes'] / m['one_capsule_bytes']:.2f}x |", "",
                  f"Floor for any store that keeps each capsule's small state: 1 + "
                  f"{m['capsules']} x small/capsule = "
                  f"{1 + m['bound_small_state_x_one'] - m['small_state_bytes'] / m['one_capsule_bytes']:.2f}x "
                  f"(the recurrent/conv state changes at every control step, so it cannot be shared).", ""]
    r = result.get("restore")
    if r:
        lines += [f"## Restore latency ({r['bytes'] / MiB:.2f} MiB live range)", "",
                  "| path | median | p90 | x flat |", "|---|---|---|---|"]
        flat_ms = r["flat"]["median_ms"]
        for k, label in (("plain_copy", "plain copy of the same bytes (floor)"),
                         ("flat", "flat store (one contiguous copy)"),
                         ("paged", f"paged, fork's own table ({r['paged_runs']} runs)"),
                         ("paged_scattered", f"paged, scattered table ({r['scattered_runs']} runs: "
                                             f"one gather)")):
            lines.append(f"| {label} | {r[k]['median_ms']:.3f} ms | {r[k]['p90_ms']:.3f} ms | "
                         f"{r[k]['median_ms'] / flat_ms:.2f}x |")
        lines.append("")
    s = result.get("steps")
    if s:
        lines += [f"## Control-step latency while forks are created ({a['latency_steps']} steps "
                  f"every {a.get('control_period_ms', 0)} ms; a fork thread makes a snapshot of the "
                  f"live state and a fork of the root, deletes older ones and pauses "
                  f"{a['fork_interval_ms']} ms)", "",
                  "| condition | p50 | p99 | max | p99 / p50 | capsules/s |", "|---|---|---|---|---|---|"]
        for k, label in (("alone", "no forking"), ("forking_flat", "forking, flat store"),
                         ("forking_paged", "forking, paged store")):
            x = s[k]
            lines.append(f"| {label} | {x['p50_ms']:.3f} ms | {x['p99_ms']:.3f} ms | "
                         f"{x['max_ms']:.3f} ms | {x['p99_over_p50']:.2f} | {x['forks_per_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(result, path):
    """Bars: bytes each store holds (flat, paged, paged expected, the small-state floor) against one
    capsule; restore latency per path (median, p90 as the whisker); control-step latency with and
    without forking."""
    plt = pyplot()
    env, a = result["env"], result["args"]
    panels = [k for k in ("memory", "restore", "steps") if k in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    for ax, k in zip(axes[0], panels):
        if k == "memory":
            m = result[k]
            one = m["one_capsule_bytes"]
            floor = (1 + m["bound_small_state_x_one"] - m["small_state_bytes"] / one) * one
            bars = {"flat": m["flat_bytes"], "paged": m["paged_bytes"],
                    "paged,\nexpected": m["paged_expected_bytes"], "floor\n(small states)": floor}
            b = ax.bar(list(bars), [v / MiB for v in bars.values()], color=["C3", "C0", "C9", "C7"])
            ax.bar_label(b, labels=[f"{v / MiB:.{0 if v >= 10 * MiB else 2}f} MiB, {v / one:.2f}x"
                                 for v in bars.values()], fontsize=8)
            ax.axhline(one / MiB, color="k", linestyle=":", label=f"one capsule ({one / MiB:.1f} MiB)")
            log_y(ax)
            ax.set(ylabel="MiB held (log scale)", title=f"memory: root + {m['capsules'] - 1} forks at "
                   f"{m['position']} tokens\n(labels: MiB, x one capsule)")
            ax.legend(fontsize=8)
        elif k == "restore":
            r = result[k]
            paths = {"plain copy\n(floor)": r["plain_copy"], "flat": r["flat"],
                     f"paged\n({r['paged_runs']} runs)": r["paged"],
                     f"paged scattered\n({r['scattered_runs']} runs)": r["paged_scattered"]}
            med = [v["median_ms"] for v in paths.values()]
            b = ax.bar(list(paths), med, yerr=[[0] * len(med), [v["p90_ms"] - m_ for v, m_ in
                                                              zip(paths.values(), med)]],
                       capsize=4, color=["C7", "C3", "C0", "C9"])
            ax.bar_label(b, fmt="%.3f", fontsize=8, label_type="center")
            ax.set(ylabel="ms (median, whisker to p90)",
                   title=f"restore of one fork ({r['bytes'] / MiB:.2f} MiB)")
        else:
            s = result[k]
            conds = {"no forking": s["alone"],
                     **{f"forking, {k} store\n({s['forking_' + k]['forks_per_s']:.0f} capsules/s)":
                        s["forking_" + k] for k in ("flat", "paged")}}
            grouped_bars(ax, list(conds), {q: [c[f"{q}_ms"] for c in conds.values()]
                                           for q in ("p50", "p99", "max")})
            ax.set(ylabel="ms", title=f"control step (tick -> action), {a['latency_steps']} steps")
            ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    date = env.get("date_utc") or env["date"]     # JSONs written before runtime_environment: "date"
    fig.suptitle(f"Paged vs flat capsule store: preset {a['preset']} on {env.get('gpu') or env.get('cpu')} "
                 f"({env['device']}, tier {result.get('memory', {}).get('tier', '?')}), episode of "
                 f"{a['tokens']} tokens; {date}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=4000, help="prefilled tokens of the episode")
    p.add_argument("--max-context", type=int, default=0,
                   help="override the preset's max_context (0 = tokens + 96, rounded up to 64)")
    p.add_argument("--forks", type=int, default=32)
    p.add_argument("--steps", type=int, default=256, help="control steps each fork runs")
    p.add_argument("--block-tokens", type=int, default=0, help="paged block size (0 = auto)")
    p.add_argument("--experiments", default="memory,restore,steps")
    p.add_argument("--repeat", type=int, default=50, help="timed restores per path")
    p.add_argument("--latency-steps", type=int, default=1000)
    p.add_argument("--fork-interval-ms", type=float, default=5.0,
                   help="pause of the fork thread between a snapshot+fork pair")
    p.add_argument("--control-period-ms", type=float, default=10.0,
                   help="control loop period of the step experiment (100 Hz)")
    p.add_argument("--buckets", default="4096,1024,256,64,16,4", help="prefill buckets")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = 1 on the CPU, as the node sets for tiny presets; "
                        "unchanged on CUDA)")
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--tag", default="", help="output name suffix (default: the device type)")
    p.add_argument("--plot-only", metavar="JSON", default=None,
                   help="measure nothing: write the .png next to a JSON this script wrote")
    args = p.parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.splitext(args.plot_only)[0] + ".png")
        log(f"wrote {os.path.splitext(args.plot_only)[0]}.png")
        return
    experiments = [e for e in args.experiments.split(",") if e]
    unknown = set(experiments) - {"memory", "restore", "steps"}
    if unknown:
        p.error(f"unknown experiments {sorted(unknown)}; pick from memory, restore, steps")
    if ("restore" in experiments or "steps" in experiments) and "memory" not in experiments:
        p.error("restore and steps use the forks the memory experiment makes: include memory")

    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    max_context = args.max_context or -(-(args.tokens + 96) // 64) * 64
    buckets = tuple(int(b) for b in args.buckets.split(",") if int(b) < max_context)
    log(f"building {args.preset} on {args.device} (max_context {max_context})")
    rt = PolicyRuntime(load_preset(args.preset, max_context=max_context),
                       RuntimeConfig(device=args.device, prefill_buckets=buckets,
                                     rollback_depth=4), progress=log)
    tier = "gpu" if rt.device.type == "cuda" else "host"
    tokens = np.random.default_rng(0).integers(0, min(rt.model_cfg.vocab_size, 256),
                                               args.tokens).tolist()
    t = time.perf_counter()
    rt.set_instruction(tokens)
    sync(rt)
    log(f"prefilled {args.tokens} tokens in {time.perf_counter() - t:.2f} s; live range "
        f"{rt.live_nbytes() / MiB:.2f} MiB")
    # budgets: the flat store must hold root + forks + the step experiment's capsules whole
    need_mb = (args.forks + 8) * rt.live_nbytes() / MiB + 16
    mem = dict(gpu_budget_mb=need_mb if tier == "gpu" else 0.0,
               host_budget_mb=need_mb if tier == "host" else 64.0)
    result = {"args": vars(args), "max_context": max_context, "env": runtime_environment(rt)}
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        flat = CapsuleStore(rt, StoreConfig(capsule_dir=d1, **mem))
        paged = PagedCapsuleStore(rt, StoreConfig(capsule_dir=d2, **mem),
                                  block_tokens=args.block_tokens)
        if "memory" in experiments:
            result["memory"] = run_memory(rt, flat, paged, tier, args)
            m = result["memory"]
            log(f"memory: flat {m['flat_bytes'] / MiB:.1f} MiB ({m['flat_x_one']:.2f}x one capsule), "
                f"paged {m['paged_bytes'] / MiB:.1f} MiB ({m['paged_x_one']:.2f}x)")
        if "restore" in experiments:
            result["restore"] = run_restore(rt, flat, paged, tier, args)
        if "steps" in experiments:
            result["steps"] = run_steps(rt, flat, paged, tier, args)
    tag = args.tag or rt.device.type
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"paged-{tag}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(result, base + ".png")
    md = markdown(result) + f"\n![plot]({os.path.basename(base)}.png)\n"
    with open(base + ".md", "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {base}.json, .md and .png")


if __name__ == "__main__":
    main()
