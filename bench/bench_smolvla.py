"""SmolVLA on the graph-bound runtime: observation -> action chunk at SmolVLA's published shapes.

A LeRobot SmolVLA checkpoint with random weights at the published shapes
(core/models/smolvla/synthetic_smolvla.py: SmolVLM2-500M backbone, 16 VLM layers, the 0.75-wide
expert, 3 cameras, chunk 50, 10 flow steps) is written to a temporary directory and served, in one
process, two ways through `PolicyRuntime.from_pretrained(dir, cfg, dtype=...)`:

  * the default runtime, `RuntimeConfig()`: the noise, prefix and denoise plans captured as CUDA
    graphs;
  * the eager baseline, `RuntimeConfig(cuda_graphs=False)`: the same plan functions, run op by op.

For each: `predict_action_chunk(batch)` from a batch as a robot gives it (three uint8 480x640x3
frames, a state, a task) to the chunk in the dataset's units, host clock over N calls (p50/p99;
the call ends by copying the chunk to the host); and the prefix and denoise plans alone
(`plan.run()` between CUDA events, calls queued back to back: device time; p50). Then the bytes:
both runtimes' chunks for the same noise (max |diff|, equal or not) and their prefix keys/values.

The peer, in the same process: LeRobot 0.4.4's own `SmolVLAPolicy` and processors loaded from the
same directory with LeRobot's `from_pretrained` (bench/lerobot_peer.py: the same weights, checked
tensor by tensor; the VLM and the expert in the runtime's dtype, the projections around the expert
in float32, as LeRobot holds SmolVLA), driven as LeRobot's `predict_action` drives a policy from a
robot's observation, with `predict_action_chunk` in place of `select_action`; the same batch, timed
as the runtime's call (host clock, p50/p99), and its chunk for the same noise against the default
runtime's (max |diff|). Where LeRobot does not import (on the GPU machine it travels as wheels:
tools/gpu-peer-wheels.sh) the table says why and the rest runs as before; --no-peer skips it.

On the CPU (a smoke run: `--shapes tiny --device cpu`) no plan is captured, so both rows run the
same eager functions, and plans are timed with the host clock.

Not a test: numbers go to <out>.json and <out>.md (default docs/bench/smolvla-<device>, with
-<shapes> and -<dtype> added where they are not the defaults) and the table is printed.

    python bench/bench_smolvla.py --device cuda                # published shapes, bfloat16
    python bench/bench_smolvla.py --shapes tiny --device cpu   # smoke run, under a minute

On the GPU machine, with LeRobot's wheels (tools/gpu-peer-wheels.sh) in a folder of their own:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site-lerobot .whl-lerobot/*.whl
    PYTHONPATH=/tmp/site-lerobot:$PWD python3 bench/bench_smolvla.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

if __package__ in (None, ""):      # `python bench/bench_smolvla.py` from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import lerobot_peer  # noqa: E402
from bench.common import (cuda_event_ms, device_slug, environment, package_version,  # noqa: E402
                          shared_machine_note, summary, wall_ms, write_report)
from flashrt_ros.core.config import RuntimeConfig, resolve_device  # noqa: E402
from flashrt_ros.core.models.smolvla import synthetic_smolvla  # noqa: E402
from flashrt_ros.core.runtime import PolicyRuntime  # noqa: E402

MEASURED_CODE = ("flashrt_ros/core", "bench")
TASK = "pick up the red cube and place it in the bin"
PLANS = ("noise", "prefix", "denoise")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--shapes", choices=sorted(synthetic_smolvla.SHAPES), default=None,
                   help="checkpoint shapes (default: published on CUDA, tiny on the CPU)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="the runtime's dtype (default bfloat16); the checkpoint is stored in it")
    p.add_argument("--iters", type=int, default=None,
                   help="measured calls per figure (default 100 on CUDA, 20 on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    p.add_argument("--no-peer", action="store_true",
                   help="skip LeRobot's own SmolVLA (the peer column)")
    p.add_argument("--out", default=None,
                   help="output path stem, or a directory for the default file name; writes "
                        "<stem>.json and <stem>.md (default: docs/bench/smolvla-<device>)")
    return p.parse_args(argv)


def log(msg):
    print(f"[bench_smolvla {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def robot_batch(shapes, rng) -> dict:
    """What a robot hands the policy: uint8 [H, W, 3] frames, a float32 state, a task."""
    batch = {"observation.state": rng.randn(shapes.state_dim).astype(np.float32), "task": TASK}
    for cam, (_, h, w) in shapes.cameras:
        batch[f"observation.images.{cam}"] = rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)
    return batch


def measure(rt, batch, iters: int, cuda: bool) -> dict:
    """The public call and each plan alone (see the module docstring)."""
    out = {"cuda_graphs": rt.use_graphs,
           "captured": [n for n, p in rt.plans.items() if p.captured],
           "build_timings_s": {k: round(v, 3) for k, v in rt.timings.items()}}
    out["predict_action_chunk"] = summary(wall_ms(lambda: rt.predict_action_chunk(batch), iters,
                                                  warmup=3, sync=cuda))
    log(f"  predict_action_chunk p50 {out['predict_action_chunk']['p50']:.2f} ms, "
        f"p99 {out['predict_action_chunk']['p99']:.2f} ms")
    for name in PLANS:          # the static inputs hold the batch of the calls above
        plan = rt.plans[name]
        samples = cuda_event_ms(plan.run, iters, warmup=3) if cuda else \
            wall_ms(plan.run, iters, warmup=3, sync=False)
        out[f"{name}_plan"] = summary(samples)
        log(f"  {name} plan p50 {out[f'{name}_plan']['p50']:.3f} ms")
    return out


def build(path, cfg: RuntimeConfig, dtype: str):
    t = time.perf_counter()
    rt = PolicyRuntime.from_pretrained(path, cfg, progress=log, dtype=dtype)
    return rt, time.perf_counter() - t


def bench(args):
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    shapes_name = args.shapes or ("published" if cuda else "tiny")
    shapes = synthetic_smolvla.SHAPES[shapes_name]
    iters = args.iters or (100 if cuda else 20)
    rng = np.random.RandomState(args.seed)
    batch = robot_batch(shapes, rng)
    noise = rng.randn(shapes.chunk_size, shapes.max_action_dim).astype(np.float32)
    total, read = synthetic_smolvla.parameter_count(shapes)
    results = {"shapes": shapes_name, "dtype": args.dtype, "iters": iters,
               "checkpoint_values_M": round(total / 1e6, 1),
               "loaded_parameters_M": round(read / 1e6, 1)}
    with tempfile.TemporaryDirectory(prefix="smolvla-bench-") as tmp:
        log(f"writing a {shapes_name} SmolVLA checkpoint ({total / 1e6:.1f} M values, "
            f"{args.dtype}) to {tmp}")
        t = time.perf_counter()
        path = synthetic_smolvla.write_checkpoint(tmp, shapes, args.seed, args.dtype)
        results["checkpoint_write_s"] = round(time.perf_counter() - t, 1)
        results["checkpoint_MB"] = round(
            os.path.getsize(os.path.join(path, "model.safetensors")) / 1e6, 1)

        log("eager baseline: RuntimeConfig(cuda_graphs=False)")
        eager, build_s = build(path, RuntimeConfig(device=str(device), cuda_graphs=False),
                               args.dtype)
        info = eager.describe()
        results.update(prefix_len=info["prefix_len"], arena_MB=round(info["arena_bytes"] / 2**20, 2),
                       prefix_kv_MB=round(info["prefix_kv_bytes"] / 2**20, 2),
                       vlm_layers=info["vlm_layers"], expert_layers=info["expert_layers"])
        results["eager"] = {"build_s": round(build_s, 2), **measure(eager, batch, iters, cuda)}

        log("default: RuntimeConfig() (CUDA graphs on CUDA)")
        try:
            graphs, build_s = build(path, RuntimeConfig(device=str(device)), args.dtype)
        except Exception as e:  # noqa: BLE001 - recorded in the report, the eager rows stand
            graphs = None
            results["graphs_error"] = f"{type(e).__name__}: {e}"
            log(f"the default runtime did not build: {results['graphs_error']}")
            traceback.print_exc()
        b = eager.predict_action_chunk(batch, noise=noise)
        ours = ("eager", b)
        if graphs is not None:
            results["graphs"] = {"build_s": round(build_s, 2),
                                 **measure(graphs, batch, iters, cuda)}
            a = graphs.predict_action_chunk(batch, noise=noise)
            ours = ("graphs", a)
            kv_g, kv_e = graphs.arena["kv"], eager.arena["kv"]
            results["bytes"] = {
                "chunk_equal": bool(np.array_equal(a, b)),
                "chunk_max_abs_diff": float(np.abs(a - b).max()),
                "chunk_max_abs": float(np.abs(b).max()),
                "prefix_kv_equal": bool(torch.equal(kv_g, kv_e)),
                "prefix_kv_max_abs_diff": float((kv_g.float() - kv_e.float()).abs().max())}
            log(f"graph vs eager, same noise: {results['bytes']}")
        if cuda:      # both runtimes, before the peer is loaded
            results["gpu_peak_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if args.no_peer:
            results["peer_error"] = "skipped (--no-peer)"
        else:
            measure_peer(results, path, device, args.dtype, batch, noise, ours, iters, cuda)

    env = environment(device, code=MEASURED_CODE)
    env.update(lerobot=package_version("lerobot"), transformers=package_version("transformers"),
               safetensors=package_version("safetensors"),
               tokenizers=package_version("tokenizers"),
               shapes=shapes_name, dtype=args.dtype)
    return env, results


def measure_peer(results, path, device, dtype: str, batch, noise, ours, iters: int, cuda: bool):
    """LeRobot's own SmolVLA on the same directory, batch and noise (module docstring), into
    results["peer"], or why not into results["peer_error"]."""
    log("peer: LeRobot's SmolVLAPolicy (bench/lerobot_peer.py)")
    try:
        t = time.perf_counter()
        peer = lerobot_peer.load(path, device, getattr(torch, dtype))
        build_s = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - recorded in the report, the runtime's rows stand
        results["peer_error"] = f"{type(e).__name__}: {e}"
        log(f"peer not run: {results['peer_error']}")
        return
    r = {"build_s": round(build_s, 2), **lerobot_peer.versions(),
         "predict_action_chunk": summary(wall_ms(lambda: peer.predict_action_chunk(batch), iters,
                                                 warmup=3, sync=cuda))}
    log(f"  LeRobot predict_action_chunk p50 {r['predict_action_chunk']['p50']:.2f} ms, "
        f"p99 {r['predict_action_chunk']['p99']:.2f} ms")
    theirs = peer.predict_action_chunk(batch, noise=noise)
    against, chunk = ours
    r.update(against=against, chunk_max_abs_diff=float(np.abs(chunk - theirs).max()),
             chunk_max_abs=float(np.abs(theirs).max()))
    log(f"  LeRobot vs {against}, same noise: max |diff| {r['chunk_max_abs_diff']:.3g} "
        f"(max |value| {r['chunk_max_abs']:.3g})")
    results["peer"] = r


def report(env, results, out):
    def pp(r, k):
        return f"{r[k]['p50']:.2f} / {r[k]['p99']:.2f}"

    def p50(r, k):
        return f"{r[k]['p50']:.3f}"
    cuda = env.get("gpu") is not None
    plan_clock = "CUDA events" if cuda else "host clock"
    rows = []
    for key, label in (("graphs", "default, `RuntimeConfig()`"),
                       ("eager", "eager baseline, `RuntimeConfig(cuda_graphs=False)`")):
        if key in results:
            r = results[key]
            rows.append([label, r["cuda_graphs"], pp(r, "predict_action_chunk"),
                         p50(r, "prefix_plan"), p50(r, "denoise_plan"), p50(r, "noise_plan"),
                         r["build_s"]])
    peer = results.get("peer")
    if peer:
        rows.append([f"LeRobot {peer['lerobot']} `SmolVLAPolicy.predict_action_chunk` (peer)",
                     False, pp(peer, "predict_action_chunk"), "", "", "", peer["build_s"]])
    if "graphs" in results:
        g, e = results["graphs"], results["eager"]
        rows.append(["eager / default"] + [""] + [
            f"{e[k]['p50'] / g[k]['p50']:.2f}x" for k in
            ("predict_action_chunk", "prefix_plan", "denoise_plan", "noise_plan")] + [""])
    if peer and peer["against"] in results:
        base = results[peer["against"]]["predict_action_chunk"]["p50"]
        rows.append([f"LeRobot / {'default' if peer['against'] == 'graphs' else 'eager'}", "",
                     f"{peer['predict_action_chunk']['p50'] / base:.2f}x", "", "", "", ""])
    notes = [f"{results['shapes']} shapes, {results['dtype']}: {results['loaded_parameters_M']} M "
             f"parameters loaded ({results['checkpoint_values_M']} M values in the checkpoint, "
             f"with the LM head no action reads), prefix of {results['prefix_len']} tokens, "
             f"{results['vlm_layers']} VLM / {results['expert_layers']} expert layers; random "
             f"weights (core/models/smolvla/synthetic_smolvla.py), written in "
             f"{results['checkpoint_write_s']} s ({results['checkpoint_MB']} MB).",
             "`predict_action_chunk(batch)`: host clock per call, from the robot's batch (three "
             "uint8 480x640x3 frames, state, task: decoded, resized and normalised on the "
             "device) to the chunk on the host; without `noise`, so the noise plan runs too. "
             f"Plans: `plan.run()` alone, {plan_clock}, calls queued back to back, static "
             "inputs holding that batch. Build = `from_pretrained` (weights, arena, captures)."]
    if peer:
        stand_ins = ", ".join(peer["stand_ins"]) or "none"
        notes.append(f"Peer: LeRobot {peer['lerobot']}'s own `SmolVLAPolicy` and processors on "
                     f"transformers {peer['transformers']}, loaded from the same directory with "
                     f"its `from_pretrained` (every tensor checked equal to the checkpoint's), the "
                     f"VLM and expert in {results['dtype']}, the projections around the expert in "
                     f"float32; called as LeRobot's `predict_action` calls a policy (the same uint8 "
                     f"frames to float on the device, its preprocessor, `predict_action_chunk`, "
                     f"its postprocessor, the chunk on the host), host clock; build = its "
                     f"`from_pretrained` and the check. Import stand-ins (bench/lerobot_peer.py): "
                     f"{stand_ins}.")
    elif "peer_error" in results:
        notes.append(f"**LeRobot's peer: not run**: {results['peer_error']}")
    if "graphs_error" in results:
        notes.append(f"**The default runtime did not build**: {results['graphs_error']}")
    if not cuda:
        notes.append("On the CPU no plan is captured: both rows run the same eager functions.")
    shared = shared_machine_note(env)
    if shared:
        notes.append(shared)
    sections = [{"heading": "Observation -> action chunk (ms)",
                 "columns": ["runtime", "CUDA graphs", "predict_action_chunk: p50 / p99",
                             "prefix plan: p50", "denoise plan: p50", "noise plan: p50",
                             "build s"],
                 "rows": rows, "notes": notes}]
    if "bytes" in results:
        b = results["bytes"]
        sections.append({
            "heading": "Bytes: default vs eager, same batch and noise",
            "columns": ["chunk equal", "chunk max abs diff", "chunk max abs value",
                        "prefix keys/values equal", "keys/values max abs diff"],
            "rows": [[b["chunk_equal"], f"{b['chunk_max_abs_diff']:.3g}",
                      f"{b['chunk_max_abs']:.3g}", b["prefix_kv_equal"],
                      f"{b['prefix_kv_max_abs_diff']:.3g}"]]})
    if peer:
        against = "default" if peer["against"] == "graphs" else "eager"
        sections.append({
            "heading": f"LeRobot vs the {against} runtime, same batch and noise",
            "columns": ["LeRobot", "transformers", "dtype", "chunk max abs diff",
                        "chunk max abs value", "diff / max value"],
            "rows": [[peer["lerobot"], peer["transformers"], results["dtype"],
                      f"{peer['chunk_max_abs_diff']:.3g}", f"{peer['chunk_max_abs']:.3g}",
                      f"{peer['chunk_max_abs_diff'] / max(peer['chunk_max_abs'], 1e-30):.3g}"]],
            "notes": ["Both in the same dtype with other kernels and orders of operations; in "
                      "float32 on the CPU the runtime is held within 5e-5 of LeRobot by "
                      "test/test_smolvla.py. Under transformers 5 LeRobot's SmolVLM reads other "
                      "vision position ids than under the transformers<5 it pins "
                      "(bench/lerobot_peer.py): the difference then includes that."]})
    title = f"SmolVLA ({results['shapes']} shapes, {results['dtype']}) on {env.get('gpu', 'CPU')}"
    return write_report(out, title, env, sections, results)


def out_stem(args, env, results) -> str:
    name = "smolvla"
    if results["shapes"] != "published":
        name += f"-{results['shapes']}"
    name += f"-{device_slug(env)}"
    if results["dtype"] != "bfloat16":
        name += f"-{results['dtype']}"
    if args.out is None:
        return os.path.join("docs", "bench", name)
    if args.out.endswith(os.sep) or os.path.isdir(args.out):
        return os.path.join(args.out, name)
    return args.out


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    env, results = bench(args)
    md, js = report(env, results, out_stem(args, env, results))
    log(f"done in {time.perf_counter() - t0:.0f} s: wrote {md} and {js}")
    with open(md, encoding="utf-8") as f:
        print(f.read())
    if "graphs_error" in results:
        sys.exit(1)


if __name__ == "__main__":
    main()
