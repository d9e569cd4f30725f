"""PolicyRuntime latency: cold prefill, restore + first token, observation step, decode step.

The runtime measured is the one the node runs by default: `RuntimeConfig()` (its prefill buckets
4096, 1024, 256, 64, 16, 4), on the preset's context. For each context length L it prefills L
tokens, then measures at that context (the live KV holds L tokens):
  * prefill + first token through the public API (host clock, synchronized): the headline,
    `rt.reset(keep_context=False); rt.prefill(ids); rt.next_token()`, and `rt.set_instruction(ids);
    rt.next_token()`; every chunk replays its captured plan (one per bucket, at any position).
    Baselines in the same run: the same prefill with every chunk run eagerly (the same functions,
    `prefill_graphs` off), and on CUDA a second runtime whose buckets are exact lengths
    (16384, 8192, ..., 2048: an L-token instruction is one chunk, --no-exact skips it);
  * restore + first token: `restore_state` from a device-resident copy of the live state, then
    `next_token` (what a capsule restore saves over the cold prefill);
  * the observation step: graph replay (CUDA events, device time), `rt.step()` end to end (host
    clock: copy in, replay, copy out, rollback ring), and the same step function run eagerly;
  * the decode step (one token through the stack + LM head): graph replay (CUDA events), eager,
    and `rt.decode(1)` end to end.
On the CPU only the eager forms exist; the `tiny` preset then runs in well under a minute.

With --peer (CUDA), the same run also measures transformers' `Qwen3_5ForCausalLM` of the same text
config (random weights in the preset's dtype, the kernels transformers picks, fla where installed):
prefill + first token, `copy.deepcopy` of its cache (a snapshot), and restore (a deepcopy of the
snapshot) + the next token's forward, beside ours; skipped with the reason where transformers is
absent.

Not a test: numbers go to `<out>.md`, `<out>.json` and `<out>.png` (default
docs/bench/runtime-<device>).

    python bench/bench_runtime.py --peer                 # CUDA: hybrid-0.8b at 2k/4k/8k/16k
    python bench/bench_runtime.py --device cpu           # tiny preset, < 1 minute
    python bench/bench_runtime.py --plot-only docs/bench/runtime-cpu.json   # redo .md/.png
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

if __package__ in (None, ""):      # `python bench/bench_runtime.py` from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (cuda_event_ms, cuda_kernel_profile, device_slug,  # noqa: E402
                          environment, pyplot, shared_machine_note, summary, thread_cpu_ms,
                          wall_ms, write_report)
from flashrt_ros.core.config import RuntimeConfig, load_preset, resolve_device  # noqa: E402
from flashrt_ros.core.runtime import PolicyRuntime  # noqa: E402

GPU_LENGTHS = (2048, 4096, 8192, 16384)
CPU_LENGTHS = (128, 256, 512, 1024)
# The second column's buckets on the GPU: exact lengths, so an L-token instruction is one chunk
EXACT_BUCKETS = (16384, 8192, 4096, 2048, 1024, 256, 64, 16, 4)
MEASURED_CODE = ("flashrt_ros/core", "config/presets", "bench")
TARGETS = [  # (what, context, measured key, limit ms) - from the project brief and issue 27, H100
    ("graph observation step (device)", 16384, "obs_graph_device", 1.0),
    ("graph decode step (device)", 16384, "decode_graph_device", 1.0),
    ("prefill + first token, default config", 16384, "prefill_api", 65.0),
    ("prefill + first token, default config", 2048, "prefill_api", 9.0),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--preset", default=None,
                   help="model preset (default: hybrid-0.8b on CUDA, tiny on the CPU)")
    p.add_argument("--lengths", default=None,
                   help="comma-separated context lengths (default: 2048,4096,8192,16384 on CUDA, "
                        "128,256,512,1024 on the CPU)")
    p.add_argument("--buckets", default=None,
                   help="comma-separated prefill buckets of the measured runtime (default: the "
                        "runtime's defaults, what the node runs)")
    p.add_argument("--no-exact", action="store_true",
                   help="CUDA: skip the second runtime with exact-length buckets (%s)"
                        % ",".join(map(str, EXACT_BUCKETS)))
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on the CPU (default 1: a control step of a small "
                        "model gains nothing from more and loses a lot on a busy machine)")
    p.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    p.add_argument("--peer", action="store_true",
                   help="CUDA only: also measure transformers' implementation of the same config "
                        "(prefill + first token, deepcopy snapshot, restore + next token)")
    p.add_argument("--profile", action="store_true",
                   help="CUDA only: also list the kernels of one observation step, one decode step "
                        "and the shortest cold prefill (count, summed kernel time, top kernels)")
    p.add_argument("--out", default=None,
                   help="output path stem; writes <stem>.md and <stem>.json "
                        "(default: docs/bench/runtime-<device>)")
    p.add_argument("--plot-only", metavar="JSON", default=None,
                   help="measure nothing: rewrite the .md and .png next to a JSON this script wrote")
    return p.parse_args(argv)


def log(msg):
    print(f"[bench_runtime {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(args, device):
    cuda = device.type == "cuda"
    preset = args.preset or ("hybrid-0.8b" if cuda else "tiny")
    lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else \
        (GPU_LENGTHS if cuda else CPU_LENGTHS)
    cfg = load_preset(preset)
    need = max(lengths) + 256             # room for the decode iterations after the longest prefill
    if cfg.max_context < need:
        log(f"preset {preset}: max_context {cfg.max_context} -> {need} to fit {max(lengths)} tokens")
        cfg = load_preset(preset, max_context=need)
    runtime_cfg = RuntimeConfig(device=str(device))
    if args.buckets:
        runtime_cfg = RuntimeConfig(device=str(device), prefill_buckets=tuple(
            int(x) for x in args.buckets.split(",")))
    t = time.perf_counter()
    rt = PolicyRuntime(cfg, runtime_cfg, progress=log)
    return rt, lengths, time.perf_counter() - t


def measure_exact_buckets(rt, rows, rng, n_prefill):
    """Cold prefill + first token (`set_instruction`) on a second runtime of the same model whose
    buckets are exact lengths (an L-token instruction is one chunk), into `rows`
    (prefill_exact); the runtime is freed afterwards."""
    buckets = tuple(b for b in EXACT_BUCKETS if b < rt.model_cfg.max_context)
    log(f"exact-length buckets {buckets}: building a second runtime")
    exact = PolicyRuntime(rt.model_cfg, RuntimeConfig(device=str(rt.device),
                                                      prefill_buckets=buckets), progress=log)
    for r in rows:
        tokens = rng.randint(0, 256, size=r["context"]).tolist()

        def cold():
            exact.set_instruction(tokens)
            exact.next_token()
        r["prefill_exact"] = summary(wall_ms(cold, n_prefill, warmup=1, sync=True))
        log(f"L={r['context']}: exact-length buckets: set_instruction + first token p50 "
            f"{r['prefill_exact']['p50']:.2f} ms")
    del exact
    torch.cuda.empty_cache()
    return list(buckets)


def bench(args):
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    rt, lengths, build_s = build(args, device)
    env = environment(device, code=MEASURED_CODE)
    env.update(preset=rt.model_cfg.name, kernels=rt.kernel, cuda_graphs=rt.use_graphs, traced_steps=rt.traced_steps,
               prefill_buckets=list(rt.cfg.prefill_buckets), max_context=rt.model_cfg.max_context,
               parameters_M=round(sum(p.numel() for p in rt.model.parameters()) / 1e6, 1),
               build_and_capture_s=round(build_s, 1))
    q = args.quick
    n_prefill = 2 if q else (5 if cuda else 3)
    n_step = 20 if q else (200 if cuda else 500)       # the CPU step is ~1.5 ms: many samples
    n_eager = 5 if q else 20
    n_decode = 20 if q else (100 if cuda else 30)
    sync = cuda

    rng = np.random.RandomState(0)
    obs = torch.from_numpy(rng.randn(rt.model_cfg.obs_dim).astype(np.float32))
    rows = []
    for L in lengths:
        tokens = rng.randint(0, 256, size=L).tolist()
        r = {"context": L, "live_state_MB": rt.arena.live_nbytes(L) / 1e6}

        def prefill():
            rt.reset(keep_context=False)
            rt.prefill(tokens)
            rt.next_token()

        def instruction():
            rt.set_instruction(tokens)
            rt.next_token()
        # (key, call, prefill plans replayed, DeltaNet kernel)
        modes = [("prefill_api", prefill, True, None), ("instruction_api", instruction, True, None)]
        if cuda:
            modes.append(("prefill_api_eager", prefill, False, None))
        if rt.kernel == "chunked":
            # baseline: the same eager prefill with the reference loop (the DeltaNet layers read
            # their kernel at call time; no plan is captured on this path)
            modes.append(("prefill_api_reference", prefill, False, "reference"))
        for key, call, graphs, kernel in modes:
            rt.prefill_graphs = graphs and rt.use_graphs
            rt.model.set_kernel(kernel or rt.kernel)
            r[key] = summary(wall_ms(call, n_prefill, warmup=1, sync=sync))
            log(f"L={L}: {key} p50 {r[key]['p50']:.2f} ms")
        rt.prefill_graphs = rt.use_graphs
        rt.model.set_kernel(rt.kernel)
        instruction()
        snapshot = rt.live_state().clone()          # device-resident copy of the whole state

        def restore():
            rt.restore_state(snapshot)
            rt.next_token()
        r["restore_first_token"] = summary(wall_ms(restore, n_step // 4, warmup=2, sync=sync))
        log(f"L={L}: restore + first token p50 {r['restore_first_token']['p50']:.3f} ms")

        rt.io.obs.copy_(obs)
        plan = rt.plans["observation"]
        if plan.captured:
            r["obs_graph_device"] = summary(cuda_event_ms(plan.run, n_step, warmup=5))
            r["obs_graph_wall"] = summary(wall_ms(plan.run, n_step, warmup=5, sync=True))
        r["obs_eager_wall"] = summary(wall_ms(plan.run_eager, n_eager, warmup=2, sync=sync))
        r["step_api_wall"] = summary(wall_ms(lambda: rt.step(obs), n_step, warmup=5, sync=sync))
        if not cuda:
            r["step_api_cpu"] = summary(thread_cpu_ms(lambda: rt.step(obs), n_step, warmup=5))
        rt.restore_state(snapshot)
        log(f"L={L}: observation step " + ", ".join(
            f"{k} p50 {r[k]['p50']:.3f} ms" for k in ("obs_graph_device", "obs_eager_wall",
                                                       "step_api_wall") if k in r))

        tok = rt.plans["token"]
        rt.io.token.fill_(65)
        if tok.captured:
            r["decode_graph_device"] = summary(cuda_event_ms(tok.run, n_decode, warmup=3))
            rt.restore_state(snapshot)
        r["decode_eager_wall"] = summary(wall_ms(tok.run_eager, n_eager, warmup=2, sync=sync))
        rt.restore_state(snapshot)
        r["decode_api_wall"] = summary(wall_ms(lambda: rt.decode(1), n_decode, warmup=2, sync=sync))
        rt.restore_state(snapshot)
        log(f"L={L}: decode step " + ", ".join(
            f"{k} p50 {r[k]['p50']:.3f} ms" for k in ("decode_graph_device", "decode_eager_wall",
                                                       "decode_api_wall") if k in r))
        rows.append(r)
    if cuda and not args.no_exact:
        env["exact_buckets"] = measure_exact_buckets(rt, rows, rng, n_prefill)
    if args.peer and cuda:
        env["peer"] = measure_peer(rt, rows, rng, n_prefill)
    profiles = {}
    if args.profile and cuda:
        rt.set_instruction(rng.randint(0, 256, size=min(lengths)).tolist())
        snapshot = rt.live_state().clone()
        rt.io.obs.copy_(obs)
        profiles["observation step (graph replay)"] = cuda_kernel_profile(rt.plans["observation"].run)
        profiles["decode step (graph replay)"] = cuda_kernel_profile(rt.plans["token"].run)
        rt.restore_state(snapshot)
        tokens = rng.randint(0, 256, size=min(lengths)).tolist()
        profiles[f"prefill {min(lengths)} + first token (reset, prefill, next_token)"] = \
            cuda_kernel_profile(lambda: (rt.reset(keep_context=False), rt.prefill(tokens),
                                         rt.next_token()))
        for what, prof in profiles.items():
            log(f"profile {what}: {prof['kernels']} kernels, {prof['kernel_time_ms']:.3f} ms summed")
            for k in prof["top"]:
                log(f"    {k['ms']:8.3f} ms {k['calls']:5d}x  {k['name']}")
    return rt, env, rows, profiles


def measure_peer(rt, rows, rng, n_prefill) -> str:
    """transformers' model of the same text config, measured into `rows` (keys peer_*); returns
    what ran, or why nothing did."""
    try:
        import transformers
    except ImportError as e:
        log(f"peer skipped: transformers does not import ({e})")
        return f"skipped: transformers does not import ({e})"
    from bench.compare_transformers import reference_config
    cfg = rt.model_cfg
    torch.manual_seed(0)
    with torch.device(rt.device):
        model = transformers.Qwen3_5ForCausalLM(reference_config(transformers, cfg.text, 0.02))
    model = model.to(getattr(torch, cfg.dtype)).eval()
    holder = {}
    with torch.no_grad():
        for r in rows:
            L = r["context"]
            ids = torch.from_numpy(rng.randint(0, 256, size=(1, L))).to(rt.device)
            nxt = ids[:, -1:]

            def prefill():
                out = model(ids, use_cache=True, logits_to_keep=1)
                holder["cache"] = out.past_key_values
                int(out.logits[0, -1].argmax())

            def snapshot():
                holder["snapshot"] = copy.deepcopy(holder["cache"])

            def restore_next():
                out = model(nxt, past_key_values=copy.deepcopy(holder["snapshot"]), use_cache=True)
                int(out.logits[0, -1].argmax())
            r["peer_prefill_first_token"] = summary(wall_ms(prefill, n_prefill, warmup=1, sync=True))
            r["peer_snapshot"] = summary(wall_ms(snapshot, 10, warmup=2, sync=True))
            r["peer_restore_next_token"] = summary(wall_ms(restore_next, 10, warmup=2, sync=True))
            log(f"L={L}: transformers prefill + first token "
                f"{r['peer_prefill_first_token']['p50']:.2f} ms, deepcopy snapshot "
                f"{r['peer_snapshot']['p50']:.2f} ms, restore + next token "
                f"{r['peer_restore_next_token']['p50']:.2f} ms")
            holder.clear()
    del model
    torch.cuda.empty_cache()
    return f"transformers {transformers.__version__} Qwen3_5ForCausalLM, {cfg.dtype}"


def report(rt, env, rows, profiles, out):
    def pp(r, k):
        return f"{r[k]['p50']:.3f} / {r[k]['p99']:.3f}" if k in r else "-"

    def tps(r, k):
        return f"{r['context'] / r[k]['p50'] * 1e3:,.0f}" if k in r else "-"
    cuda = env.get("gpu") is not None

    def ms(r, k):
        return f"{r[k]['p50']:.2f}" if k in r else "-"
    # the headline first, then its baselines (the columns no row has are left out)
    prefill_keys = [("prefill_api", "reset + prefill + 1st token (default config): p50 ms"),
                    ("instruction_api", "set_instruction + 1st token: p50 ms"),
                    ("prefill_exact", "same, exact-length buckets (one chunk): p50 ms"),
                    ("prefill_api_eager", "prefill, chunks run eagerly (baseline): p50 ms"),
                    ("prefill_api_reference", "prefill, reference loop (baseline): p50 ms")]
    prefill_keys = [(k, c) for k, c in prefill_keys if any(k in r for r in rows)]
    prefill_cols = ["context", "live state MB"]
    for k, c in prefill_keys:
        prefill_cols += [c, "tokens/s"] if k == "prefill_api" else [c]
    prefill_cols += ["restore + 1st token: p50 / p99 ms", "speed-up vs prefill"]
    prefill_rows = []
    for r in rows:
        row = [r["context"], round(r["live_state_MB"], 1)]
        for k, _ in prefill_keys:
            row += [ms(r, k), tps(r, k)] if k == "prefill_api" else [ms(r, k)]
        speedup = r["prefill_api"]["p50"] / r["restore_first_token"]["p50"] \
            if "prefill_api" in r else None
        row += [pp(r, "restore_first_token"), f"{speedup:.1f}x" if speedup else "-"]
        prefill_rows.append(row)
    step_cols = ["context", "obs step graph, device: p50 / p99 ms", "obs step graph, synced: p50 / p99",
                 "rt.step() end to end: p50 / p99", "obs step eager: p50 / p99",
                 "decode graph, device: p50 / p99", "decode eager: p50 / p99",
                 "rt.decode(1) end to end: p50 / p99"]
    step_rows = [[r["context"], pp(r, "obs_graph_device"), pp(r, "obs_graph_wall"),
                  pp(r, "step_api_wall"), pp(r, "obs_eager_wall"), pp(r, "decode_graph_device"),
                  pp(r, "decode_eager_wall"), pp(r, "decode_api_wall")] for r in rows]
    if "step_api_cpu" in rows[0]:
        step_cols.insert(4, "rt.step() thread CPU time: p50 / p99")
        for row, r in zip(step_rows, rows):
            row.insert(4, pp(r, "step_api_cpu"))
    sections = [
        {"heading": "Prefill (host clock, synchronized)", "columns": prefill_cols,
         "rows": prefill_rows, "notes": [
             f"The runtime's own configuration (prefill buckets {env.get('prefill_buckets')}; "
             "`RuntimeConfig()` unless --buckets): `rt.reset(keep_context=False); rt.prefill(ids); "
             "rt.next_token()` from an empty arena, and `rt.set_instruction(ids); rt.next_token()`. "
             + ("On CUDA every chunk replays its captured plan (one per bucket, the position read "
                "from the arena on the device); the eager baseline runs the same functions without "
                "their graphs (same kernels, same bytes). " if cuda else "On the CPU chunks run "
                "eagerly (the dynamic form). ")
             + (f"Exact-length buckets: a second runtime of the same model with buckets "
                f"{env['exact_buckets']}, so the instruction is one chunk. "
                if env.get("exact_buckets") else "")
             + ("With `kernels: chunked` (CPU) the reference-loop column is the chunk-parallel "
                "delta rule's baseline (same run, same weights and chunks). "
                if any("prefill_api_reference" in r for r in rows) else "")
             + "Restore = `restore_state()` of a device-resident copy of the live state + "
             "`next_token()`."]},
        {"heading": "Observation and decode steps at each context", "columns": step_cols,
         "rows": step_rows, "notes": [
             "device = CUDA events around each replay, replays queued back to back; synced = host "
             "clock around one replay + synchronize; end to end = the public call (copy in, replay, "
             "copy out, rollback-ring push); thread CPU time (CPU only) = the same call on the "
             "calling thread's CPU clock, which leaves out the time other processes hold the core. "
             "Eager = the same step function without the graph or trace. On the CPU a small "
             "model's step plans are traced (`runtime.cpu_plans`, core/plans.py): the public "
             "calls replay the trace of the static form in TorchScript's interpreter, and the "
             "eager columns run that same function in Python, its baseline. "
             "On CUDA with fla the graph forms run core/fused.py's single-token kernels and attend "
             "over the live prefix only (the length is read from the arena on the device), so "
             "their cost grows with the context; the eager forms attend over the live prefix "
             "with SDPA."]},
    ]
    shared = shared_machine_note(env)
    if shared:
        sections[1]["notes"].append(shared)
    if "peer_prefill_first_token" in rows[0]:
        def ratio(r, a, b):
            return f"{r[a]['p50'] / r[b]['p50']:.1f}x"
        cold = "prefill_api"
        sections.append({
            "heading": "Peer: transformers' implementation of the same config, same run",
            "columns": ["context", "transformers prefill + 1st token: p50 ms", "ours", "ours faster by",
                        "transformers deepcopy snapshot", "transformers restore + next token",
                        "ours: restore + 1st token", "ours faster by"],
            "rows": [[r["context"], f"{r['peer_prefill_first_token']['p50']:.2f}",
                      f"{r[cold]['p50']:.2f}", ratio(r, "peer_prefill_first_token", cold),
                      f"{r['peer_snapshot']['p50']:.2f}",
                      f"{r['peer_restore_next_token']['p50']:.2f}",
                      f"{r['restore_first_token']['p50']:.3f}",
                      ratio(r, "peer_restore_next_token", "restore_first_token")] for r in rows],
            "notes": [f"{env.get('peer', '')}: random weights of the same shapes, the kernels "
                      "transformers picks on this machine (fla where installed). Restore for "
                      "transformers = `copy.deepcopy` of the snapshotted cache + one token's forward "
                      "(its cache keeps no logits); ours = `restore_state` + the LM head from the "
                      "restored last hidden state."]})
    if profiles:
        sections.append({"heading": "Where the time goes (one call, torch.profiler)", "columns":
                         ["call", "kernels", "summed kernel time ms", "top kernels (ms, calls)"],
                         "rows": [[what, p["kernels"], p["kernel_time_ms"], "<br>".join(
                             f"{k['ms']:.3f} ({k['calls']}x) {k['name'][:60]}" for k in p["top"][:6])]
                             for what, p in profiles.items()]})
    if cuda:
        verdicts = []
        by_len = {r["context"]: r for r in rows}
        for what, L, key, limit in TARGETS:
            if L in by_len and key in by_len[L]:
                v = by_len[L][key]["p50"]
                verdicts.append([what, L, f"<= {limit:g} ms", f"{v:.3f} ms",
                                 "met" if v <= limit else "NOT met"])
        sections.append({"heading": "Targets (p50)", "columns":
                         ["what", "context", "target", "measured", "verdict"], "rows": verdicts})
    title = f"PolicyRuntime latency: {env['preset']} on {env.get('gpu', 'CPU')}"
    return write_report(out, title, env, sections, {"rows": rows, "profiles": profiles}, plot=plot)


def plot(result, path):
    """Latency vs context, p50 line and p99 crosses: prefill (graph vs eager baseline vs
    restore) and the observation/decode steps (graph vs eager vs the public call); log-log."""
    plt = pyplot()
    env, rows = result["environment"], result["results"]["rows"]
    x = [r["context"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = [("prefill + first token vs restore (host clock)", [
        ("prefill_api", "reset + prefill + first token (default config)", "C0-o"),
        ("prefill_exact", "same, exact-length buckets", "C1-s"),
        ("prefill_api_eager", "same, chunks run eagerly", "C0--o"),
        ("prefill_api_reference", "same, reference loop (baseline)", "C3--^"),
        ("restore_first_token", "restore + first token", "C2-s")]),
        ("observation and decode steps", [
            ("obs_graph_device", "obs step, graph (device)", "C0-o"),
            ("step_api_wall", "rt.step() end to end", "C0:o"),
            ("obs_eager_wall", "obs step, eager", "C0--o"),
            ("decode_graph_device", "decode step, graph (device)", "C1-s"),
            ("decode_api_wall", "rt.decode(1) end to end", "C1:s"),
            ("decode_eager_wall", "decode step, eager", "C1--s")])]
    for ax, (title, series) in zip(axes, panels):
        for key, label, fmt in series:
            if key in rows[0]:
                p50, p99 = [r[key]["p50"] for r in rows], [r[key]["p99"] for r in rows]
                line, = ax.plot(x, p50, fmt, label=label)
                ax.plot(x, p99, "x", color=line.get_color(), alpha=0.6)
        if env.get("gpu"):       # the brief's targets (H100)
            keys = {k for k, _, _ in series}
            pts = [(L, limit) for _, L, key, limit in TARGETS if key in keys]
            ax.plot(*zip(*pts), "rv", markersize=9, label="target (p50)")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", title=title,
               ylabel="ms: p50 (line), p99 (x)")
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"PolicyRuntime latency: preset {env['preset']} on {env.get('gpu') or env['cpu']} "
                 f"(kernels {env['kernels']}, CUDA graphs {env['cuda_graphs']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        with open(args.plot_only, encoding="utf-8") as f:
            data = json.load(f)
        res = data["results"]
        md, js = report(None, data["environment"], res["rows"], res["profiles"],
                        os.path.splitext(args.plot_only)[0])
        log(f"wrote {md} and {os.path.splitext(md)[0]}.png from {js}")
        return
    t0 = time.perf_counter()
    rt, env, rows, profiles = bench(args)
    out = args.out or os.path.join("docs", "bench", f"runtime-{device_slug(env)}")
    md, js = report(rt, env, rows, profiles, out)
    log(f"done in {time.perf_counter() - t0:.0f} s: wrote {md} and {js}")
    with open(md, encoding="utf-8") as f:
        print(f.read())


if __name__ == "__main__":
    main()
