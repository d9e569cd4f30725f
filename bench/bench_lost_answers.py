"""Lost service answers: how many capsule calls get no answer, and which ones.

    python bench/bench_lost_answers.py [--workers 3] [--calls 400] [--profile config|none]

Starts the policy node (tiny, CPU, 30 Hz timer control on observations this process publishes)
and --workers client processes. Each client is a fresh rclpy node with one plain rclpy client per
capsule service (no retries, no probing, no event fallback: what a user's first script does)
and makes --calls calls back to back (snapshot, list, fork, delete), each waiting up to
--answer-timeout seconds. It reports every call without an answer, with the number of calls its
client had made before it; the node's output is searched for rmw_fastrtps' "failed to send
response" warning (a reply the server dropped because it had not matched the client's response
reader within the reply writer's max_blocking_time). `--profile config` starts the node with
FASTDDS_DEFAULT_PROFILES_FILE=config/fastdds.xml (that wait made 5 s), `none` without it
(rmw_fastrtps' 100 ms). Prints one JSON line per run; docs/node.md (Reliability) quotes them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICES = ("snapshot", "list_capsules", "fork", "delete_capsule")
DROPPED = "failed to send response"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--calls", type=int, default=400, help="calls per worker")
    p.add_argument("--answer-timeout", type=float, default=10.0,
                   help="seconds a call waits for its answer before it counts as lost")
    p.add_argument("--profile", choices=("config", "none"), default="config")
    p.add_argument("--client-depth", type=int, default=0,
                   help="response history of each client (0 = rclpy's default, 10)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)    # internal: one client
    return p.parse_args(argv)


def worker(args) -> int:
    """One client process: prints a JSON line {calls, lost: [{service, before}]}."""
    import rclpy

    from flashrt_ros import srv
    from flashrt_ros.ros.executors import SingleThreadedExecutor
    from flashrt_ros.ros.waiting import spin_until
    target, wid = args.worker.split(",")
    rclpy.init()
    node = rclpy.create_node(f"lost_answers_{wid}")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    types = {"snapshot": srv.Snapshot, "list_capsules": srv.ListCapsules, "fork": srv.Fork,
             "delete_capsule": srv.DeleteCapsule}
    qos = {}
    if args.client_depth:
        from rclpy.qos import QoSProfile, QoSReliabilityPolicy
        qos["qos_profile"] = QoSProfile(depth=args.client_depth,
                                        reliability=QoSReliabilityPolicy.RELIABLE)
    clients = {s: node.create_client(t, f"{target}/{s}", **qos) for s, t in types.items()}
    for c in clients.values():
        c.wait_for_service(timeout_sec=60)
    made = dict.fromkeys(SERVICES, 0)
    lost, calls = [], 0
    for i in range(args.calls):
        service = SERVICES[i % len(SERVICES)]
        n = i // len(SERVICES)
        fields = {"snapshot": {"name": f"w{wid}-{n}"}, "list_capsules": {},
                  "fork": {"source": f"w{wid}-{n}", "name": f"w{wid}-{n}f"},
                  "delete_capsule": {"name": f"w{wid}-{n}f"}}[service]
        future = clients[service].call_async(types[service].Request(**fields))
        calls += 1
        try:
            spin_until(executor, future.done, args.answer_timeout, "an answer")
        except TimeoutError:
            clients[service].remove_pending_request(future)
            lost.append({"service": service, "before": made[service]})
        made[service] += 1
        if n and service == "delete_capsule":          # keep the store small
            old = {"name": f"w{wid}-{n - 1}"}
            f = clients["delete_capsule"].call_async(srv.DeleteCapsule.Request(**old))
            calls += 1
            try:
                spin_until(executor, f.done, args.answer_timeout, "an answer")
            except TimeoutError:
                clients["delete_capsule"].remove_pending_request(f)
                lost.append({"service": "delete_capsule", "before": made["delete_capsule"]})
            made["delete_capsule"] += 1
    print(json.dumps({"calls": calls, "lost": lost}), flush=True)
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def run(args) -> dict:
    import numpy as np
    import rclpy

    from flashrt_ros.msg import Observation
    from flashrt_ros.ros.process import NodeProcess
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1")
    env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    if args.profile == "config":
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = os.path.join(REPO, "config", "fastdds.xml")
    workdir = tempfile.mkdtemp(prefix="lost_answers_")
    params = {"managed": False, "runtime.device": "cpu", "control_mode": "timer",
              "control_rate_hz": 30.0, "stale_observation_s": 0.0, "instruction": "storm",
              "store.capsule_dir": os.path.join(workdir, "caps")}
    with NodeProcess(env=env, params=params, namespace="/lost_answers") as proc:
        proc.wait_log("active: stepping the policy")
        rclpy.init()
        feeder = rclpy.create_node("lost_answers_robot")
        pub = feeder.create_publisher(Observation, f"{proc.node}/observation", 10)
        stop = threading.Event()

        def feed():                         # the robot: an observation per control period
            msg = Observation(state=np.linspace(-1, 1, 14, dtype=np.float32).tolist())
            while not stop.wait(1 / 30):
                msg.header.stamp = feeder.get_clock().now().to_msg()
                pub.publish(msg)
        threading.Thread(target=feed, daemon=True).start()
        t0 = time.monotonic()
        workers = [subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", f"{proc.node},{w}",
             "--calls", str(args.calls), "--answer-timeout", str(args.answer_timeout),
             "--client-depth", str(args.client_depth)],
            env=env, stdout=subprocess.PIPE, text=True) for w in range(args.workers)]
        reports = [json.loads(w.communicate(timeout=3600)[0].strip().splitlines()[-1])
                   for w in workers]
        seconds = time.monotonic() - t0
        stop.set()
        feeder.destroy_node()
        rclpy.try_shutdown()
        dropped = sum(DROPPED in line for line in proc.output)
    lost = [x for r in reports for x in r["lost"]]
    return {"profile": args.profile, "client_depth": args.client_depth or 10,
            "workers": args.workers,
            "calls": sum(r["calls"] for r in reports), "lost": len(lost),
            "lost_first_call_of_its_client": sum(x["before"] == 0 for x in lost),
            "node_dropped_replies": dropped, "lost_calls": lost, "seconds": round(seconds, 1),
            "load_average_1min": round(os.getloadavg()[0], 2), "cores": os.cpu_count()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
