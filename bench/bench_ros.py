"""The policy node through ROS 2 on loopback: observation->action latency, capsule service round
trips, and a timer-mode control loop under a storm of capsule calls.

Three experiments, each against a `flashrt_node` in its own process (DDS on loopback, a random
ROS_DOMAIN_ID unless one is set):
  latency   observation mode, reliable QoS, lockstep: publish an observation, wait for its action
            chunk. Client round trip (publish -> action received, this process's clock) p50/p99,
            and the node's own figures: receipt -> action published (ActionChunk.latency_ms) and
            the step itself (PolicyStatus.p50/p99_step_ms).
  services  round trip (call -> answer, this process) p50/p99 of snapshot, restore, fork,
            rollback, list and delete, each called --calls times on the live node, with the
            node's own handler time (latency_ms where the response has it).
  storm     timer mode at --rate Hz, fed by observations from this process at the same rate,
            while another process calls capsule services at --storm-hz (snapshot, list, fork of a
            stored capsule, delete: nothing that moves the live state), for --duration seconds.
            Reports the node's deadline misses (a tick whose step did not commit within one period
            of its scheduled time, plus ticks rcl skipped), the largest lateness, and whether the
            step numbers of the action chunks received are continuous (each one more than the
            last), plus the storm's own round trips. Before the storm, the same deadline figures
            while the node captures its prefill plans in the background (until it says ready).

Not a test: numbers go to `<out>.md`, `<out>.json` and `<out>.png` (default docs/bench/ros-cpu).
Other work on the machine shows up in these figures: the load average before and after is recorded.

    python bench/bench_ros.py                         # tiny preset on the CPU, about a minute
    python bench/bench_ros.py --plot-only docs/bench/ros-cpu.json    # redo the .png only
    python bench/bench_ros.py --device cuda --preset hybrid-0.8b --out docs/bench/ros-cuda
    flashrt-ros bench ros --duration 60
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"   # a rule of this workplace
os.environ.pop("ROS_STATIC_PEERS", None)
os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 101)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg):
    print(f"[bench ros] {msg}", flush=True)


def summary(ms) -> dict:
    x = np.asarray(ms, dtype=np.float64)
    if not x.size:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)),
            "max": float(x.max()), "n": int(x.size)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_ros.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="tiny", help="model preset (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default %(default)s)")
    p.add_argument("--steps", type=int, default=500,
                   help="latency: measured steps (default %(default)s)")
    p.add_argument("--calls", type=int, default=100,
                   help="services: calls per operation (default %(default)s)")
    p.add_argument("--rate", type=float, default=30.0,
                   help="storm: control rate, Hz (default %(default)s)")
    p.add_argument("--storm-hz", type=float, default=50.0,
                   help="storm: capsule calls per second (default %(default)s)")
    p.add_argument("--duration", type=float, default=20.0, help="storm: seconds (default %(default)s)")
    p.add_argument("--ready-timeout", type=float, default=600.0,
                   help="storm: seconds to wait for the node's late plans (default %(default)s)")
    p.add_argument("--nice", type=int, default=-10,
                   help="storm: also run it with the node's `nice` parameter at this value, when "
                        "permitted (0 = do not; default %(default)s)")
    p.add_argument("--hogs", type=int, default=0,
                   help="storm: CPU-bound processes (busy loops) competing with it, to see the loop "
                        "under load (default %(default)s)")
    p.add_argument("--experiments", default="latency,services,storm",
                   help="comma-separated subset of latency,services,storm")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "bench", "ros-cpu"),
                   help="report path without extension (default docs/bench/ros-cpu)")
    p.add_argument("--plot-only", metavar="JSON", default=None,
                   help="measure nothing: write the .png next to a JSON this script wrote")
    p.add_argument("--storm-worker", default=None, help=argparse.SUPPRESS)   # internal: the storm process
    return p.parse_args(argv)


# -- the node and a client ------------------------------------------------------------------
class Client:
    """An rclpy node spun in a background thread; publishes observations, calls services."""

    def __init__(self, target: str, name: str):
        import rclpy
        from flashrt_ros.ros.executors import SingleThreadedExecutor
        from rclpy.qos import QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy

        from flashrt_ros.msg import ActionChunk, Observation, PolicyStatus
        from diagnostic_msgs.msg import DiagnosticArray
        self.rclpy, self.target = rclpy, target
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"{name}_{os.getpid()}", context=self.context)
        qos = QoSProfile(depth=1000, reliability=QoSReliabilityPolicy.RELIABLE,
                         history=QoSHistoryPolicy.KEEP_LAST)
        self.actions, self.statuses, self.diags = [], [], []
        self.received = []                      # perf_counter at each action's arrival
        self.cv = threading.Condition()

        def on_action(msg):
            with self.cv:
                self.received.append(time.perf_counter())
                self.actions.append(msg)
                self.cv.notify_all()
        self.pub = self.node.create_publisher(Observation, f"{target}/observation", qos)
        self.subs = [self.node.create_subscription(ActionChunk, f"{target}/action", on_action, qos),
                     self.node.create_subscription(PolicyStatus, f"{target}/status",
                                                   self.statuses.append, qos),
                     self.node.create_subscription(DiagnosticArray, "/diagnostics",
                                                   self.diags.append, qos)]
        self.clients = {}
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._stop = False
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        while not self._stop and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def close(self):
        self._stop = True
        self.thread.join(timeout=5)
        self.executor.shutdown(timeout_sec=1)
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)

    def wait(self, predicate, timeout, what):
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise SystemExit(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.005)

    def wait_connected(self):
        """Until both ends matched: the node reads our observations, we read its actions."""
        sub = self.subs[0]
        count = getattr(sub, "get_publisher_count", None)    # matched publishers (Kilted)
        self.wait(lambda: self.pub.get_subscription_count() > 0 and self.statuses
                  and (count() if count else self.node.count_publishers(sub.topic_name)) > 0,
                  30, f"{self.target} to connect")

    def publish(self, state):
        from flashrt_ros.msg import Observation
        msg = Observation()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.state = [float(x) for x in state]
        self.pub.publish(msg)

    def step(self, state, timeout=10.0) -> float:
        """Lockstep: publish, wait for the action; returns the round trip in ms."""
        with self.cv:
            n = len(self.actions)
        t0 = time.perf_counter()
        self.publish(state)
        with self.cv:
            if not self.cv.wait_for(lambda: len(self.actions) > n, timeout):
                raise SystemExit("no action within 10 s")
        return (self.received[n] - t0) * 1e3

    def call(self, op: str, **fields):
        """Call capsule operation `op` (name or service name); returns (response, round trip ms)."""
        from flashrt_ros.ros.operations import operation
        o = operation(op)
        client = self.clients.get(o.name)
        if client is None:
            name = f"{self.target}/{o.service}"
            client = self.clients[o.name] = self.node.create_client(o.srv_type, name)
            if not client.wait_for_service(timeout_sec=30):
                raise SystemExit(f"no service {name}")
        req = o.srv_type.Request()
        for k, v in fields.items():
            setattr(req, k, v)
        done = threading.Event()
        t0 = time.perf_counter()
        future = client.call_async(req)
        future.add_done_callback(lambda _: done.set())
        if not done.wait(10):
            raise SystemExit(f"{op} did not answer within 10 s")
        ms = (time.perf_counter() - t0) * 1e3
        return future.result(), ms

    def diagnostics(self) -> dict:
        for d in reversed(self.diags):
            for st in d.status:
                if st.name.startswith(self.target):
                    return {kv.key: kv.value for kv in st.values}
        return {}

    def fresh_diagnostics(self, timeout=10.0) -> dict:
        n = len(self.diags)
        self.wait(lambda: len(self.diags) > n and self.diagnostics(), timeout, "diagnostics")
        return self.diagnostics()


# -- experiments ----------------------------------------------------------------------------
def node_params(args, workdir, **extra) -> dict:
    p = {"managed": False, "model": args.preset, "status_rate_hz": 10.0,
         "instruction": "pick up the red cube and place it in the bin",
         "runtime": {"device": args.device}, "store": {"capsule_dir": os.path.join(workdir, "capsules")}}
    p.update(extra)
    return p


def observations(n, dim, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, dim)).astype(np.float32)


@contextlib.contextmanager
def connected_node(name, params, workdir, client_name):
    """A node process in namespace /<name>, active, and this process's Client connected to it;
    both stopped after."""
    from flashrt_ros.ros.process import ACTIVE_LOG_LINE, NodeProcess
    with NodeProcess(params=params, namespace=name) as node:
        try:
            node.wait_log(ACTIVE_LOG_LINE)
        except (RuntimeError, TimeoutError) as e:
            raise SystemExit(f"the node did not become active: {e}\n{node.log()}") from None
        c = Client(node.node, client_name)
        try:
            c.wait_connected()
            yield node, c
        finally:
            c.close()


def run_latency(args, workdir, obs_dim):
    params = node_params(args, workdir, control_mode="observation", observation_qos="reliable")
    with connected_node("bench_latency", params, workdir, "bench_latency_client") as (node, c):
        obs = observations(args.steps + 50, obs_dim)
        for o in obs[:50]:
            c.step(o)
        log(f"latency: {args.steps} lockstep steps")
        rtt = []
        for i, o in enumerate(obs[50:]):
            rtt.append(c.step(o))
            if (i + 1) % 100 == 0:
                log(f"  {i + 1}/{args.steps}: round trip p50 {np.percentile(rtt, 50):.3f} ms")
        node_ms = [a.latency_ms for a in c.actions[50:]]
        c.wait(lambda: c.statuses and c.statuses[-1].step >= c.actions[-1].step, 10, "status")
        s = c.statuses[-1]
        return {"round_trip_ms": summary(rtt), "node_receipt_to_publish_ms": summary(node_ms),
                "node_step_ms": {"p50": float(s.p50_step_ms), "p99": float(s.p99_step_ms)}}


def run_services(args, workdir, obs_dim):
    params = node_params(args, workdir, control_mode="observation", observation_qos="reliable")
    with connected_node("bench_services", params, workdir, "bench_services_client") as (node, c):
        obs = observations(32, obs_dim)
        for o in obs:
            c.step(o)
        out = {}
        rtt = {op: [] for op in ("snapshot", "restore", "fork", "rollback", "list", "delete")}
        handler = {op: [] for op in rtt}
        for i in range(-5, args.calls):            # 5 unmeasured rounds first
            rounds = []
            res, ms = c.call("snapshot", name=f"s{i}")
            rounds.append(("snapshot", res, ms))
            res, ms = c.call("restore", name=f"s{i}")
            rounds.append(("restore", res, ms))
            res, ms = c.call("fork", source=f"s{i}", name=f"f{i}")
            rounds.append(("fork", res, ms))
            c.step(obs[i % len(obs)])              # one committed step to roll back
            res, ms = c.call("rollback", k=1)
            rounds.append(("rollback", res, ms))
            res, ms = c.call("list_capsules")
            rounds.append(("list", res, ms))
            res, ms = c.call("delete_capsule", name=f"f{i}")
            rounds.append(("delete", res, ms))
            c.call("delete_capsule", name=f"s{i}")
            for op, res, ms in rounds:
                if not res.success:
                    raise SystemExit(f"{op} failed: {res.message}")
                if i >= 0:
                    rtt[op].append(ms)
                    if hasattr(res, "latency_ms"):
                        handler[op].append(res.latency_ms)
            if (i + 1) % 25 == 0 and i >= 0:
                log(f"  services: {i + 1}/{args.calls} rounds")
        for op in rtt:
            out[op] = {"round_trip_ms": summary(rtt[op]), "node_handler_ms": summary(handler[op])}
        return out


def storm_worker(spec: str) -> int:
    """The storm process: capsule calls at a fixed rate; prints a JSON line with what it saw."""
    target, hz, duration = spec.split(",")
    hz, duration = float(hz), float(duration)
    c = Client(target, "bench_storm")
    try:
        c.wait(lambda: c.node.count_subscribers(f"{target}/observation") > 0, 30, "the node")
        res, _ = c.call("snapshot", name="storm-base")
        ops, rtt, failed = [], {}, 0
        period, t0 = 1.0 / hz, time.perf_counter()
        print("storm: started", flush=True)
        i = 0
        while time.perf_counter() - t0 < duration:
            kind = ("snapshot", "list_capsules", "fork", "delete_capsule", "delete_capsule")[i % 5]
            n = i // 5
            fields = {"snapshot": {"name": f"st{n}"}, "list_capsules": {},
                      "fork": {"source": "storm-base", "name": f"sf{n}"}}.get(kind)
            if kind == "delete_capsule":
                fields = {"name": f"st{n}" if i % 5 == 3 else f"sf{n}"}
            res, ms = c.call(kind, **fields)
            failed += not res.success
            rtt.setdefault(kind, []).append(ms)
            ops.append(kind)
            i += 1
            delay = t0 + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        elapsed = time.perf_counter() - t0
        print("STORM " + json.dumps({"calls": len(ops), "seconds": elapsed, "failed": failed,
                                     "rtt": {k: summary(v) for k, v in rtt.items()}}), flush=True)
    finally:
        c.close()
    return 0


def late_plans_window(c, timeout: float) -> dict:
    """The control loop while the node warms up and captures its prefill plans in the background
    (`capture_prefill: background`): waits until its diagnostics say every plan is ready, then
    takes the deadline figures, which then cover the ticks from the first one to that point."""
    t0 = time.perf_counter()
    d = c.fresh_diagnostics()
    while not d.get("bringup", "").startswith("ready"):
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout} s waiting for the late plans "
                             f"({d.get('bringup')})")
        d = c.fresh_diagnostics()
    return {"waited_s": time.perf_counter() - t0, "bringup": d["bringup"],
            "ticks": int(d["ticks"]), "deadline_misses": int(d["deadline_misses"]),
            "late_steps": int(d["late_steps"]), "skipped_ticks": int(d["skipped_ticks"]),
            "lateness_ms": {"p50": float(d["p50_lateness_ms"]), "p99": float(d["p99_lateness_ms"]),
                            "max": float(d["max_lateness_ms"])},
            "p99_step_ms": float(d["p99_step_ms"])}


def run_storm(args, workdir, obs_dim, nice=0):
    params = node_params(args, workdir, control_mode="timer", control_rate_hz=float(args.rate),
                         nice=nice)
    storm = None
    name = f"bench_storm{abs(nice)}"
    with connected_node(name, params, workdir, "bench_storm_feeder") as (node, c):
        try:
            obs = observations(64, obs_dim)
            stop = threading.Event()

            def feed():                              # observations at the control rate
                period, t0, i = 1.0 / args.rate, time.perf_counter(), 0
                while not stop.is_set():
                    c.publish(obs[i % len(obs)])
                    i += 1
                    delay = t0 + i * period - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            hogs = [subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + "
                                      f"{args.duration + 15}\nwhile time.time() < end: pass"])
                    for _ in range(args.hogs)]
            c.wait(lambda: len(c.actions) > 30, 20, "the control loop")
            warmups = late_plans_window(c, args.ready_timeout)
            before = c.fresh_diagnostics()
            n0 = len(c.actions)
            storm = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--storm-worker",
                                      f"{node.node},{args.storm_hz},{args.duration}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
            lines = []
            for line in storm.stdout:
                lines.append(line)
                if line.startswith("storm: started"):
                    log(f"storm: {args.storm_hz:g} capsule calls/s for {args.duration:g} s at "
                        f"{args.rate:g} Hz control" + (f", node at nice {nice}" if nice else ""))
                    n0 = len(c.actions)
                    before = c.diagnostics()
                if line.startswith("STORM "):
                    break
            storm.wait(timeout=30)
            after = c.fresh_diagnostics()
            for h in hogs:
                h.kill()
                h.wait()
            stop.set()
            feeder.join(timeout=5)
            result = next((json.loads(x[6:]) for x in lines if x.startswith("STORM ")), None)
            if result is None:
                raise SystemExit("the storm process failed:\n" + "".join(lines))
            steps = [a.step for a in c.actions[n0:]]
            gaps = sum(1 for a, b in zip(steps, steps[1:]) if b != a + 1)
            d = {k: int(after[k]) - int(before.get(k, 0)) for k in
                 ("deadline_misses", "late_steps", "skipped_ticks", "ticks", "stale_observations")}
            return {"storm": result, "warmups": warmups, "actions": len(steps), "step_gaps": gaps,
                    "first_step": steps[0] if steps else None, "last_step": steps[-1] if steps else None,
                    "node": d, "max_lateness_ms_whole_run": float(after["max_lateness_ms"]),
                    "lateness_ms_last_1000": {"p50": float(after["p50_lateness_ms"]),
                                              "p99": float(after["p99_lateness_ms"])},
                    "p99_step_ms": float(after["p99_step_ms"])}
        finally:
            if storm is not None and storm.poll() is None:
                os.killpg(storm.pid, signal.SIGKILL)


def nice_permitted(nice: int) -> bool:
    """Whether this user may set `nice` (tried on a short-lived child)."""
    code = f"import os; os.setpriority(os.PRIO_PROCESS, 0, {nice})"
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    if not ok:
        log(f"storm at nice {nice}: not permitted here (CAP_SYS_NICE / ulimit -e); skipped")
    return ok


# -- report ---------------------------------------------------------------------------------
def environment(args) -> dict:
    from bench.common import environment as common_environment
    from bench.common import package_version
    from flashrt_ros.core.config import resolve_device
    env = common_environment(resolve_device(args.device))
    env.update(os=platform.platform(), rclpy=package_version("ros-rclpy"),
               rmw=os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp (default)"),
               dds="loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST)",
               preset=args.preset, device=args.device)
    return env


def table(columns, rows) -> list:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in r) + " |")
    return out


def write_report(args, env, results):
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump({"environment": env, "results": results}, f, indent=2)
    md = ["# The policy node through ROS 2 (loopback DDS)", "", "| | |", "|---|---|"]
    md += [f"| {k} | `{v}` |" if k == "command" else f"| {k} | {v} |" for k, v in env.items()]
    if "latency" in results:
        r = results["latency"]
        md += ["", "## Observation -> action (observation mode, reliable, lockstep)", ""]
        md += table(["measured", "p50 ms", "p99 ms", "max ms", "n"], [
            ["round trip: publish -> action received (client)", r["round_trip_ms"]["p50"],
             r["round_trip_ms"]["p99"], r["round_trip_ms"]["max"], r["round_trip_ms"]["n"]],
            ["node: observation received -> action published", r["node_receipt_to_publish_ms"]["p50"],
             r["node_receipt_to_publish_ms"]["p99"], r["node_receipt_to_publish_ms"]["max"],
             r["node_receipt_to_publish_ms"]["n"]],
            ["node: the step (runtime.step under the lock)", r["node_step_ms"]["p50"],
             r["node_step_ms"]["p99"], "", ""]])
    if "services" in results:
        md += ["", "## Capsule service round trip (client call -> answer)", ""]
        rows = []
        for op, r in results["services"].items():
            h = r["node_handler_ms"]
            rows.append([op, r["round_trip_ms"]["p50"], r["round_trip_ms"]["p99"],
                         h["p50"] if h["n"] else "-", h["p99"] if h["n"] else "-", r["round_trip_ms"]["n"]])
        md += table(["operation", "round trip p50 ms", "round trip p99 ms", "node handler p50 ms",
                     "node handler p99 ms", "n"], rows)
        tier = "host (CPU runtime)" if env["device"] == "cpu" else "gpu (the default on CUDA)"
        md += ["", "Node handler: the time inside the service callback (the response's "
               f"`latency_ms`). Memory tier {tier}."]
    storms = [(k, results[k]) for k in ("storm", "storm_nice") if k in results]
    if storms:
        heads = ["node at nice 0" if k == "storm" else f"node at nice {args.nice} (parameter `nice`)"
                 for k, _ in storms]

        def row(label, fn):
            return [label] + [fn(r) for _, r in storms]

        def warmups(r, fn):         # a JSON written before the window was measured has none
            return fn(r["warmups"]) if r.get("warmups") else "-"
        md += ["", f"## Timer mode at {args.rate:g} Hz under a storm of capsule calls"
               + (f", with {args.hogs} CPU-bound processes competing" if args.hogs else ""), ""]
        md += table(["measured"] + heads, [
            row("capsule calls (snapshot, list, fork, delete) / s", lambda r: (
                f"{r['storm']['calls'] / r['storm']['seconds']:.1f} ({r['storm']['calls']} in "
                f"{r['storm']['seconds']:.1f} s, {r['storm']['failed']} failed)")),
            row("while the prefill plans are captured in the background: ticks, **deadline "
                "misses**", lambda r: warmups(r, lambda w: (
                    f"{w['ticks']}, **{w['deadline_misses']}** ({w['late_steps']} late, "
                    f"{w['skipped_ticks']} skipped)"))),
            row("... tick -> committed step p50 / p99 / max (ms); node step p99", lambda r: warmups(
                r, lambda w: (f"{w['lateness_ms']['p50']:.3f} / {w['lateness_ms']['p99']:.3f} / "
                              f"{w['lateness_ms']['max']:.3f}; {w['p99_step_ms']:.3f}"))),
            row("control ticks in the storm window (after the plans are ready)",
                lambda r: r["node"]["ticks"]),
            row("**deadline misses** (late commits + skipped ticks)", lambda r: (
                f"**{r['node']['deadline_misses']}** ({r['node']['late_steps']} late, "
                f"{r['node']['skipped_ticks']} skipped)")),
            row("stale-observation ticks", lambda r: r["node"]["stale_observations"]),
            row("action chunks received / step-number gaps", lambda r: (
                f"{r['actions']} / {r['step_gaps']} (steps {r['first_step']}..{r['last_step']})")),
            row("tick -> committed step, p50 / p99 (ms, last 1000 ticks)", lambda r: (
                f"{r['lateness_ms_last_1000']['p50']:.3f} / {r['lateness_ms_last_1000']['p99']:.3f}")),
            row("largest tick -> committed step in the whole run (ms)",
                lambda r: f"{r['max_lateness_ms_whole_run']:.3f}"),
            row("node step p99 (ms, last 1000 steps)", lambda r: f"{r['p99_step_ms']:.3f}")])
        for (k, r), head in zip(storms, heads):
            md += ["", f"Storm round trips, client call -> answer ({head}):", ""]
            md += table(["operation", "p50 ms", "p99 ms", "max ms", "n"],
                        [[op, v["p50"], v["p99"], v["max"], v["n"]] for op, v in r["storm"]["rtt"].items()])
        md += ["", "A deadline miss is a tick whose step has not committed one period after the "
               "tick's scheduled time, or a tick rcl skipped because the executor was more than a "
               "period late (node.py, DeadlineMonitor). Step-number gaps: action chunks whose step is "
               "not the previous one plus one (a skipped tick steps nothing, so it leaves no gap). "
               "The background rows: from the node's first tick until its diagnostics say every "
               "late plan is ready (core/bringup.py: warm-ups on a side stream, each capture "
               "under the runtime's lock between two steps); the storm starts after that."]
    md += ["", f"Load average (1/5/15 min) before: {results['load_before']}, after: {results['load_after']}."]
    plot({"environment": env, "results": results}, args.out + ".png")
    md += ["", f"![plot]({os.path.basename(args.out)}.png)"]
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return args.out + ".md"


def plot(result, path):
    """p50 / p99 / max bars: observation -> action and each capsule service's round trip (top row);
    for the storm runs the tick -> committed step lateness and the storm's own round trips (bottom)."""
    from bench.common import grouped_bars, pyplot
    plt = pyplot()
    env, res = result["environment"], result["results"]
    rows = [[], []]      # per row: (title, {bar group label: {"p50", "p99", "max"}})
    if "latency" in res:
        r = res["latency"]
        rows[0].append(("observation -> action (lockstep)", {
            "round trip\n(client)": r["round_trip_ms"], "node: receipt\n-> publish":
            r["node_receipt_to_publish_ms"], "node: step": r["node_step_ms"]}))
    if "services" in res:
        rows[0].append(("capsule service round trip (client)",
                        {op: r["round_trip_ms"] for op, r in res["services"].items()}))
    storms = [("nice 0" if k == "storm" else "niced", res[k]) for k in ("storm", "storm_nice") if k in res]
    if storms:
        rows[1].append(("storm: tick -> committed step (max: whole run)", {
            f"node {name}\n{r['node']['deadline_misses']} deadline misses\nin {r['node']['ticks']} ticks":
            {**r["lateness_ms_last_1000"], "max": r["max_lateness_ms_whole_run"]} for name, r in storms}))
        rows[1].append(("storm: capsule call round trip (client)", {
            f"{op.replace('_', ' ')}\n({name})": v for name, r in storms for op, v in r["storm"]["rtt"].items()}))
    rows = [row for row in rows if row]
    fig = plt.figure(figsize=(14, 1 + 4.2 * len(rows)), layout="constrained")
    for sub, row in zip(fig.subfigures(len(rows), 1, squeeze=False)[:, 0], rows):
        axes = sub.subplots(1, len(row), squeeze=False, width_ratios=[len(g) + 1 for _, g in row])[0]
        for ax, (title, groups) in zip(axes, row):
            series = {k: [g.get(k, float("nan")) for g in groups.values()] for k in ("p50", "p99", "max")}
            values = [v for vs in series.values() for v in vs if v == v]
            log = max(values) > 20 * min(values)
            grouped_bars(ax, list(groups), series, log=log)
            ax.set(title=title, ylabel="ms, log scale" if log else "ms")
            ax.legend(fontsize=8)
    machine = env.get("cpu") or env["machine"]     # JSONs written before common.environment
    fig.suptitle(f"flashrt_node through ROS 2 (loopback DDS): preset {env['preset']} on {env['device']}, "
                 f"{machine}\n{env['command']}; load average before {res['load_before']}, "
                 f"after {res['load_after']}", fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.storm_worker:
        return storm_worker(args.storm_worker)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if args.plot_only:
        with open(args.plot_only, encoding="utf-8") as f:
            plot(json.load(f), os.path.splitext(args.plot_only)[0] + ".png")
        log(f"wrote {os.path.splitext(args.plot_only)[0]}.png")
        return 0
    from flashrt_ros.core.config import load_preset
    obs_dim = load_preset(args.preset).obs_dim
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    env = environment(args)
    results = {"load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    log(f"ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}, load {results['load_before']}, "
        f"experiments {experiments}")
    with tempfile.TemporaryDirectory(prefix="bench_ros_") as workdir:
        runs = [("latency", run_latency), ("services", run_services), ("storm", run_storm)]
        if "storm" in experiments and args.nice and nice_permitted(args.nice):
            experiments.append("storm_nice")
            runs.append(("storm_nice", lambda *a: run_storm(*a, nice=args.nice)))
        for name, fn in runs:
            if name in experiments:
                log(f"{name}: starting a node")
                t = time.perf_counter()
                try:
                    results[name] = fn(args, workdir, obs_dim)
                except SystemExit:
                    for f in sorted(os.listdir(workdir)):
                        if f.endswith(".log"):
                            log(f"{f}, last lines:\n" + "".join(open(os.path.join(workdir, f)).readlines()[-15:]))
                    raise
                log(f"{name}: done in {time.perf_counter() - t:.1f} s")
    results["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    path = write_report(args, env, results)
    log(f"wrote {path} and .json")
    print(open(path).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
