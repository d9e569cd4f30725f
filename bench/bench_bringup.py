"""Bring-up: wall time from process start to the first action, phase by phase, cold and warm.

Every start is a fresh process, so that the interpreter, the imports and the CUDA context count:

  * runtime - `python bench/bench_bringup.py --child ...`: imports, CUDA context, resolve (the
    compile cache directory, fla's import), weights, arena, each plan's capture (its warm-up part
    is where Triton compiles and autotunes), the warm-up, the first action (`rt.step`), then the
    late plans (core/bringup.py) until every plan is ready. No ROS: this is what the GPU session
    measures (bench/gpu_session.sh stage `bringup`).
  * node - `ros2 launch flashrt_ros flashrt_policy.launch.py managed:=false` (where ROS and the
    `ros2` tools are): this process publishes observations from the start and times the first
    ActionChunk; the node's phases come from its /diagnostics (`bringup.*`, `late.*`).

Each is run with the prefill plans captured in the background (`capture_prefill: background`,
the default) and, as the baseline in the same run, all at configure (`configure`); each cold
(a new, empty compile cache directory) and warm (`--warm N` more starts on the same directory;
the verdicts take the median of those). The operating system's file cache is warm in both
(nothing here drops it).

The model is the preset's, its weights drawn from the seed, unless `--checkpoint` names where
they are read from instead: `--checkpoint write` writes the preset as a checkpoint directory
(transformers' layout plus the policy files: checkpoint_qwen3_5.save_pretrained) in the bench's
temporary work directory, once before the starts; `--checkpoint DIR` brings up from an existing
checkpoint directory (its model, whatever `--preset` says; no verdicts: the targets are per
preset). Every start then reads the directory as the node's `model:=DIR` does.

Not a test: numbers go to `<out>.md` and `<out>.json` (default docs/bench/bringup-<device>, and
bringup-<device>-checkpoint with `--checkpoint`).

    python bench/bench_bringup.py                       # CPU, tiny: runtime and node
    python bench/bench_bringup.py --device cuda --preset hybrid-0.8b --paths runtime
    python bench/bench_bringup.py --device cuda --preset hybrid-0.8b --checkpoint write
    python bench/bench_bringup.py --paths runtime --checkpoint ~/models/Qwen3.5-0.8B
    python bench/bench_bringup.py --paths node --captures background --warm 7
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Nothing heavy at module level: a child times its own imports.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTURES = ("background", "configure")
WRITE = "write"     # --checkpoint write: the preset written as a checkpoint directory first
PEER_UP_S = 1.0     # how long the node's peer (Peer) runs before the first start
TARGETS = {  # (path, preset, device type, start) -> (first action, every plan ready) limits, s
    ("runtime", "hybrid-0.8b", "cuda", "warm"): (4.0, 8.0),
    ("runtime", "hybrid-0.8b", "cuda", "cold"): (10.0, 30.0),
    ("node", "hybrid-0.8b", "cuda", "warm"): (8.0, None),
    ("runtime", "tiny", "cpu", "warm"): (3.0, None),
    ("node", "tiny", "cpu", "warm"): (3.0, None),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--preset", default="tiny",
                   help="model preset (default: tiny); with --checkpoint DIR the directory's "
                        "model is brought up instead")
    p.add_argument("--paths", default=None,
                   help="runtime,node (default: both where rclpy and `ros2` are, else runtime)")
    p.add_argument("--captures", default=",".join(CAPTURES), help="background,configure")
    p.add_argument("--seed-rng", default="cpu", choices=("cpu", "device"),
                   help="model.seed_rng of the runtime path: where the preset's weights are drawn "
                        "(default cpu, the node's default; device: on the GPU, as a checkpoint's "
                        "weights go straight there)")
    p.add_argument("--checkpoint", default="", metavar="write|DIR",
                   help="bring up from a checkpoint directory instead of the seeded preset: "
                        "'write' writes --preset's model as one (transformers' layout, the "
                        "preset's dtype) in the work directory before the starts; DIR is an "
                        "existing one (a Qwen3.5 checkpoint; default: off, the seeded preset)")
    p.add_argument("--warm", type=int, default=1,
                   help="warm starts per path and capture, after the cold one (default 1); the "
                        "verdicts take their median")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per start")
    p.add_argument("--out", default=None,
                   help="report stem (default docs/bench/bringup-<device>, with --checkpoint "
                        "docs/bench/bringup-<device>-checkpoint)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)     # runtime child: capture
    p.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the runtime child ----------------------------------------------------------------------
def child(args) -> None:
    """One bring-up in this fresh process; its phases (seconds) to `args.result` as JSON."""
    entered = time.time()
    phases, marks = {}, {}

    def timed(name, fn):
        t = time.perf_counter()
        value = fn()
        phases[name] = time.perf_counter() - t
        return value

    torch = timed("import torch", lambda: __import__("torch"))
    def imports():
        from flashrt_ros.core import bringup, config, runtime, serving
        from flashrt_ros.core.models.qwen3_5 import checkpoint_qwen3_5
        return bringup, config, runtime, serving, checkpoint_qwen3_5
    bringup, config, runtime, serving, checkpoint_qwen3_5 = timed("import flashrt_ros", imports)
    started = bringup.process_start_time()
    phases = {"python start": entered - started, **phases}
    device = config.resolve_device(args.device)
    if device.type == "cuda":
        def context():
            torch.empty(1, device=device)
            torch.cuda.synchronize(device)
        timed("CUDA context", context)
    cfg = config.RuntimeConfig(device=args.device, cache_dir=args.cache_dir)
    model_dir = None
    if args.checkpoint:
        # what PolicyRuntime.from_pretrained reads (it takes no late_plans): the configuration
        # and the list of weight files here, the tensors in the runtime's `weights` phase
        model_dir = timed("read checkpoint config",
                          lambda: checkpoint_qwen3_5.read_model_dir(args.checkpoint))
        model_cfg = model_dir.cfg
    else:
        model_cfg = config.load_preset(args.preset, seed_rng=args.seed_rng)
    resolved = timed("resolve (compile cache, fla)", lambda: cfg.resolve(model_cfg))
    serving.pin_torch_threads(resolved.threads)         # as the node does
    late = args.child == "background"
    rt = runtime.PolicyRuntime(model_cfg, cfg, model_dir=model_dir, late_plans=late)
    phases.update(rt.timings)
    plans = {n: {"warm_s": p.warm_s, "capture_s": p.capture_s}
             for n, p in rt.plans.items() if p.captured}
    timed("warm-up: step plans" if late else "warm-up: every plan",
          lambda: rt.warm_up(prefill=not late))
    obs = [0.0] * model_cfg.obs_dim
    timed("first step", lambda: rt.step(obs))
    marks["first action"] = time.time() - started
    if late:
        schedule = bringup.LatePlans(rt)
        schedule.run()
        for n in schedule.order:
            plans[n] = {"warm_s": schedule.warm_s.get(n, 0.0),
                        "capture_s": schedule.capture_s.get(n, 0.0), "late": True}
    marks["all plans ready"] = time.time() - started
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with open(args.result, "w", encoding="utf-8") as f:
        json.dump({"phases": phases, "marks": marks, "plans": plans,
                   "kernels": resolved.kernels, "compile_cache": resolved.compile_cache,
                   "cuda_graphs": rt.use_graphs,
                   # what was drawn from the seed ([] = every weight read from the checkpoint)
                   "untrained": list(rt.model.untrained)}, f, indent=2)


def write_checkpoint(args, directory: str) -> str:
    """The preset's seeded model written to `directory` as a checkpoint (transformers' layout
    and the policy files, in the preset's dtype); says what was written. Built on the CPU: this
    process's device and compile cache stay untouched by it."""
    from flashrt_ros.core.config import RuntimeConfig, load_preset
    from flashrt_ros.core.models.qwen3_5 import checkpoint_qwen3_5
    from flashrt_ros.core.runtime import PolicyRuntime
    t = time.perf_counter()
    model_cfg = load_preset(args.preset, seed_rng=args.seed_rng)
    rt = PolicyRuntime(model_cfg, RuntimeConfig(device="cpu"))
    checkpoint_qwen3_5.save_pretrained(rt.model, directory)
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return (f"checkpoint directory written from the preset (seed_rng={args.seed_rng}, "
            f"{model_cfg.dtype}, {size / 2**20:.1f} MiB, in {time.perf_counter() - t:.1f} s; "
            f"in the work directory, removed after)")


def run_child(args, capture: str, cache_dir: str, workdir: str) -> dict:
    import subprocess
    result = os.path.join(workdir, f"result-{capture}-{time.monotonic_ns()}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", capture, "--device", args.device,
           "--preset", args.preset, "--seed-rng", args.seed_rng, "--checkpoint", args.checkpoint,
           "--cache-dir", cache_dir, "--result", result]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                       env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
                                os.environ.get("PYTHONPATH", "")))
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"bench_bringup: the child failed (exit {r.returncode}):\n"
                         f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    with open(result, encoding="utf-8") as f:
        data = json.load(f)
    data["wall_s"] = wall
    return data


# -- the node under ros2 launch -------------------------------------------------------------
class Peer:
    """The benchmark's ROS participant, the node's peer: created once per benchmark run and up
    before the first start, as a robot's controller is running when its policy starts (a
    participant created beside each start would time DDS discovery between two new
    participants: when their first exchange misses, the next announcement comes 3 s later)."""

    def __init__(self):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        from flashrt_ros.ros.discovery import loopback_by_default
        loopback_by_default()
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"bringup_bench_{os.getpid()}", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        end = time.time() + PEER_UP_S             # its initial announcements, before any start
        while time.time() < end:
            self.executor.spin_once(timeout_sec=0.05)

    def close(self):
        import rclpy
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def launch_node(args, peer: Peer, capture: str, cache_dir: str, workdir: str,
                index: int) -> dict:
    """`ros2 launch ... managed:=false`; observations from `peer` from the start; the first
    ActionChunk there."""
    import signal
    import subprocess

    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import QoSProfile, QoSReliabilityPolicy

    from flashrt_ros.core.models.qwen3_5.checkpoint_qwen3_5 import resolve_model
    from flashrt_ros.msg import ActionChunk, Observation, PolicyStatus
    from flashrt_ros.ros.process import executable
    ns = f"bringup{os.getpid()}_{index}"
    target = f"/{ns}/flashrt_policy"
    params = os.path.join(workdir, f"params-{index}.yaml")
    with open(params, "w", encoding="utf-8") as f:
        f.write(f"/**/flashrt_policy:\n  ros__parameters:\n    capture_prefill: {capture}\n"
                f"    runtime:\n      device: {args.device}\n      cache_dir: \"{cache_dir}\"\n"
                f"    store:\n      capsule_dir: \"{os.path.join(workdir, 'capsules')}\"\n")
    node, executor = peer.node, peer.executor
    reliable = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE)
    got = {"actions": [], "status": None, "diag": {}}

    def on_action(msg):
        got["actions"].append(time.time())

    def on_status(msg):
        got["status"] = msg.bringup

    def on_diag(msg):
        for st in msg.status:
            if st.name.startswith(target):
                got["diag"] = {kv.key: kv.value for kv in st.values}

    ends = [node.create_subscription(ActionChunk, f"{target}/action", on_action, reliable),
            node.create_subscription(PolicyStatus, f"{target}/status", on_status, reliable),
            node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, reliable)]
    pub = node.create_publisher(Observation, f"{target}/observation", reliable)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("AMENT_PREFIX_PATH", sys.prefix)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    model = args.checkpoint or args.preset          # a checkpoint directory, or the preset
    cmd = [executable("ros2"), "launch", "flashrt_ros", "flashrt_policy.launch.py",
           "managed:=false", f"namespace:={ns}", f"model:={model}", f"config:={params}"]
    log = open(os.path.join(workdir, f"node-{index}.log"), "w", encoding="utf-8")
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    msg = Observation()
    msg.state = [0.0] * resolve_model(model).cfg.obs_dim
    try:
        deadline = t0 + args.timeout
        while time.time() < deadline and proc.poll() is None:
            msg.header.stamp = node.get_clock().now().to_msg()
            pub.publish(msg)
            executor.spin_once(timeout_sec=0.01)
            # the status says every plan is ready, and a /diagnostics message since says so too
            diag = got["diag"]
            if got["actions"] and (got["status"] or "").startswith("ready") and \
                    diag.get("bringup", "").startswith("ready") and \
                    "bringup.first action_at_s" in diag:
                break
        if not got["actions"]:
            raise SystemExit(f"bench_bringup: no action from {target} within {args.timeout:g} s "
                             f"(exit {proc.poll()}); see {log.name}")
        ready_at = time.time() - t0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        for sub in ends:
            node.destroy_subscription(sub)
        node.destroy_publisher(pub)
    diag = got["diag"]
    phases = {k[len("bringup."):-2]: float(v) for k, v in diag.items()
              if k.startswith("bringup.") and k.endswith("_s") and not k.endswith("_at_s")}
    marks = {k[len("bringup."):-5]: float(v) for k, v in diag.items()
             if k.startswith("bringup.") and k.endswith("_at_s")}
    plans = {}
    for k, v in diag.items():
        if k.startswith("late.") and k.endswith("_ms"):
            name, part = k[len("late."):-3].rsplit("_", 1)
            plans.setdefault(name, {"late": True})[f"{part}_s"] = float(v) / 1e3
    first = got["actions"][0] - t0
    # what the node's own clock does not see: ros2 launch starting it, Python's start before its
    # first import of flashrt_ros (bringup.process_age_s), and the action's delivery
    phases = {"ros2 launch, python start, delivery": first - marks.get("first action", first),
              **phases}
    return {"phases": phases, "marks": marks, "plans": plans, "first_action_s": first,
            "ready_s": ready_at, "status": got["status"]}


# -- the report -----------------------------------------------------------------------------
def fmt(v) -> str:
    return "" if v is None else f"{v:.2f}"


def plan_cell(run: dict, name: str, part: str) -> str:
    plan = run["data"]["plans"].get(name, {})
    if f"{part}_s" not in plan:
        return ""
    return fmt(plan[f"{part}_s"]) + (" (late)" if plan.get("late") else "")


def first_action(run: dict) -> float:
    d = run["data"]
    return d.get("first_action_s", d["marks"].get("first action"))


def plans_ready(run: dict) -> float | None:
    d = run["data"]
    return d.get("ready_s", d["marks"].get("all plans ready"))


def median_run(runs: list) -> dict:
    """The run whose first action is the median (the lower middle one of an even number)."""
    return sorted(runs, key=first_action)[(len(runs) - 1) // 2]


def report(args, runs: list, out: str, source: str, preset: str | None):
    """`source`: where the weights came from (env "model source"); `preset`: the model's preset,
    None for an existing checkpoint directory (no verdicts then: the targets are per preset)."""
    import torch

    from bench.common import device_slug, environment, package_version, write_report
    from flashrt_ros.core.config import resolve_device
    env = environment(resolve_device(args.device), code=("flashrt_ros", "bench", "config"))
    model = preset or os.path.basename(args.checkpoint)
    env["preset" if preset else "model"] = model
    env["model source"] = source
    env["flash_linear_attention"] = package_version("flash-linear-attention")
    stem = out or os.path.join(ROOT, "docs", "bench", f"bringup-{device_slug(env)}"
                               + ("-checkpoint" if args.checkpoint else ""))
    summary_rows, verdicts, groups = [], [], {}
    for r in runs:
        first, ready = first_action(r), plans_ready(r)
        summary_rows.append([r["path"], r["capture"], r["start"], fmt(first), fmt(ready),
                             r["load"]])
        groups.setdefault((r["path"], r["capture"], r["start"]), []).append(r)
    for (path, capture, start), group in groups.items():
        limits = TARGETS.get((path, preset, torch.device(args.device).type, start))
        if limits is not None and capture == "background":
            run = median_run(group)
            of = f" (median of {len(group)})" if len(group) > 1 else ""
            for what, took, limit in (("first action", first_action(run), limits[0]),
                                      ("every plan ready", plans_ready(run), limits[1])):
                if limit is not None and took is not None:
                    verdicts.append(f"- {path}, {start}: {what} {took:.2f} s{of}, target "
                                    f"<= {limit:g} s: " + ("met" if took <= limit else
                                                           f"missed by {took - limit:.2f} s"))
    if preset is None:
        verdicts.append("- no verdicts: the targets are per preset, and this model is a "
                        "checkpoint directory's")
    # the phases of each cold start and of the median warm start
    runs = [median_run(g) if len(g) > 1 else g[0] for g in groups.values()]
    phase_names = list(dict.fromkeys(n for r in runs for n in r["data"]["phases"]))
    plan_names = list(dict.fromkeys(n for r in runs for n in r["data"]["plans"]))
    columns = ["phase (s)"] + [f"{r['path']} {r['capture']} {r['start']}" for r in runs]
    rows = [[n] + [fmt(r["data"]["phases"].get(n)) for r in runs] for n in phase_names]
    for n in plan_names:
        for part, label in (("warm", "warm-up"), ("capture", "capture")):
            rows.append([f"plan {n}: {label}"] + [plan_cell(r, n, part) for r in runs])
    marks = list(dict.fromkeys(n for r in runs for n in r["data"]["marks"]))
    rows += [[f"{m} (after process start)"] + [fmt(r["data"]["marks"].get(m)) for r in runs]
             for m in marks]
    sections = [
        {"heading": "First action and every plan ready (seconds after the start)",
         "columns": ["path", "prefill capture", "start", "first action", "every plan ready",
                     "load average"],
         "rows": summary_rows,
         "notes": ["runtime: from the child's process start (/proc) to `rt.step` returning, then "
                   "to the last late plan; node: from `ros2 launch` to the first ActionChunk "
                   "received here (observations published from the start), then to ~/status "
                   "saying ready. cold = a new compile cache directory; warm = a later start "
                   "on it. The OS file cache is warm in both.",
                   "",
                   "Other work on the machine slows every phase (`import torch` most): the "
                   "load average is the machine's 1-minute one when the start ended."]
         + ([""] + verdicts if verdicts else [])},
        {"heading": "Phases", "columns": columns, "rows": rows,
         "notes": ["`plan X: warm` is the plan's warm-up (Triton compiles and autotunes there on "
                   "CUDA; torch's lazy initialisation on the CPU), `capture` the graph capture; "
                   "(late) = in the background after the first action (core/bringup.py). Node "
                   "phases are the node's configure phases from /diagnostics; its marks count "
                   "from the interpreter's start: `node` when the node was created (rclpy.init "
                   "and the ROS side), `imports` when the runtime side (torch and the core, "
                   "imported right after the node) was there (ros/node.py: main). A warm column "
                   "is the warm start with the median first action.",
                   "",
                   "`weights`: the policy built on the device and every weight written once, "
                   "drawn from the seed (a seeded preset) or copied from the checkpoint's "
                   "safetensors files; `read checkpoint config` (a checkpoint only) is reading "
                   "its config.json and policy_config.json and listing its weight files."]},
    ]
    title = f"Bring-up: {model}" + (" from a checkpoint directory" if args.checkpoint else "")
    md, js = write_report(stem, f"{title} on {args.device}", env, sections, {"runs": runs})
    print(f"wrote {md} and {js}")


def has_ros_tools() -> bool:
    try:
        import rclpy  # noqa: F401

        import flashrt_ros.msg  # noqa: F401
        from flashrt_ros.ros.process import executable
    except ImportError:
        return False
    import shutil
    exe = executable("ros2")
    return os.path.exists(exe) or shutil.which(exe) is not None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    import shutil
    import tempfile
    sys.path.insert(0, ROOT)
    paths = args.paths.split(",") if args.paths else \
        (["runtime", "node"] if has_ros_tools() else ["runtime"])
    runs = []
    workdir = tempfile.mkdtemp(prefix="flashrt-bringup-")
    peer = None
    try:
        preset, source = args.preset, f"seeded preset (seed_rng={args.seed_rng})"
        if args.checkpoint == WRITE:
            args.checkpoint = os.path.join(workdir, "checkpoint")
            source = write_checkpoint(args, args.checkpoint)
            print(source, flush=True)
        elif args.checkpoint:
            # every start reads the directory again; here it is checked once, before them
            from flashrt_ros.core.exceptions import ConfigError
            from flashrt_ros.core.models.qwen3_5.checkpoint_qwen3_5 import read_model_dir
            args.checkpoint = os.path.abspath(os.path.expanduser(args.checkpoint))
            try:
                read_model_dir(args.checkpoint)
            except ConfigError as e:
                raise SystemExit(f"bench_bringup: --checkpoint: {e}") from None
            preset, source = None, f"checkpoint directory {args.checkpoint}"
        if "node" in paths:
            peer = Peer()
        for path in paths:
            for capture in args.captures.split(","):
                cache_dir = os.path.join(workdir, f"cache-{path}-{capture}")   # new: cold
                for start in ["cold"] + ["warm"] * args.warm:
                    t = time.time()
                    data = run_child(args, capture, cache_dir, workdir) if path == "runtime" \
                        else launch_node(args, peer, capture, cache_dir, workdir, len(runs))
                    runs.append({"path": path, "capture": capture, "start": start, "data": data,
                                 "load": round(os.getloadavg()[0], 2)})
                    first = first_action(runs[-1])
                    print(f"{path:8} {capture:10} {start}: first action {first:.2f} s "
                          f"({time.time() - t:.1f} s in all)", flush=True)
        report(args, runs, args.out, source, preset)
    finally:
        if peer is not None:
            peer.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
