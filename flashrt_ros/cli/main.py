"""`flashrt-ros`: run the node, drive its capsule services, show status, run benchmarks.

The `ros2` CLI is not available everywhere this package runs (PyPI ROS wheels have none), so this
command covers what a user needs from a shell:

    flashrt-ros demo                      # node + simulated robot, live loop (tiny preset, CPU)
    flashrt-ros snapshot home             # in a second shell, while the demo runs
    flashrt-ros fork home branch-a --switch
    flashrt-ros rollback 5
    flashrt-ros restore home
    flashrt-ros restore home --noise-seed 7   # the same state, another sampled future
    flashrt-ros list
    flashrt-ros status

Every ROS call waits for discovery with a timeout and exits 1 with the node's message when the
node answers success=false. DDS stays on loopback unless ROS_AUTOMATIC_DISCOVERY_RANGE says else.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from flashrt_ros.core.exceptions import FlashRTError, InputError
from flashrt_ros.ros.discovery import loopback_by_default
from flashrt_ros.ros.waiting import wait_for


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Client:
    """A short-lived rclpy node that calls one service or reads one topic."""

    def __init__(self, node_name: str, timeout: float, discovery_timeout: float | None = None):
        import rclpy
        self.rclpy = rclpy
        rclpy.init()
        self.node = rclpy.create_node(f"flashrt_cli_{os.getpid()}")
        self.target = node_name.rstrip("/")
        self.timeout = timeout                  # for an answer or a message, once discovered
        # for the node's services and topics to appear: a loaded machine can take seconds for
        # DDS discovery where the answer itself is quick, so the two have their own bounds
        self.discovery_timeout = timeout if discovery_timeout is None else discovery_timeout

    @classmethod
    def from_args(cls, args) -> "Client":
        return cls(args.node, args.timeout, args.discovery_timeout)

    def spin_until(self, predicate, timeout: float) -> bool:
        """Spin this node until `predicate()` holds (True) or `timeout` seconds passed (False)."""
        try:
            wait_for(predicate, timeout, "", interval=0.05,
                     idle=lambda t: self.rclpy.spin_once(self.node, timeout_sec=t))
            return True
        except TimeoutError:
            return False

    def _wait_for_service(self, client, name: str):
        if not client.wait_for_service(timeout_sec=self.discovery_timeout):
            raise SystemExit(f"flashrt-ros: no service {name} within {self.discovery_timeout:g} s; "
                             f"is the node running (flashrt-ros demo / flashrt_node) and "
                             f"ROS_DOMAIN_ID the same? (a loaded machine may need a longer "
                             f"--discovery-timeout)")

    def call(self, srv_type, service: str, request):
        """Call one of the node's services (lifecycle, parameters) and return its response."""
        name = f"{self.target}/{service}"
        client = self.node.create_client(srv_type, name)
        self._wait_for_service(client, name)
        future = client.call_async(request)
        # not rclpy.spin_until_future_complete: on Jazzy (rclpy 7.1.x) each call leaves a
        # done-callback behind, and a process that calls many times slows down
        if self.spin_until(future.done, self.timeout):
            return future.result()
        raise SystemExit(f"flashrt-ros: {name} did not answer within {self.timeout:g} s")

    def capsule(self, name: str, request):
        """Call capsule operation `name` and return its response - or, when rmw lost the answer
        although the node applied the request, the CapsuleEvent that reports it (CapsuleClient)."""
        from flashrt_ros.ros.client import CapsuleClient, NoAnswer
        from flashrt_ros.ros.operations import operation
        op = operation(name)
        capsules = CapsuleClient(self.node, self.target, events=not op.query,
                                 spin=lambda t: self.rclpy.spin_once(self.node, timeout_sec=t))
        self._wait_for_service(capsules.client(op), capsules.service_name(op))
        if not op.query:
            # the events are volatile: hear the node's publisher before calling (a node too old
            # to have one only costs this wait)
            self.spin_until(capsules.events_heard, min(self.discovery_timeout, 5.0))
        try:
            return capsules.call(op, request, self.timeout)
        except NoAnswer as e:
            raise SystemExit(f"flashrt-ros: {e}" + ("" if op.query else "; run `flashrt-ros "
                                                    "list` before repeating it")) from None

    def wait_message(self, msg_type, topic: str):
        from rclpy.qos import QoSProfile, QoSReliabilityPolicy
        got = []
        self.node.create_subscription(msg_type, f"{self.target}/{topic}", got.append,
                                      QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE))
        wait_s = max(self.timeout, self.discovery_timeout)       # discovery, then the message
        if not self.spin_until(lambda: got, wait_s):
            raise SystemExit(f"flashrt-ros: nothing on {self.target}/{topic} within {wait_s:g} s")
        return got[0]

    def close(self):
        self.node.destroy_node()
        self.rclpy.try_shutdown()


def _print_capsule(c, prefix=""):
    print(f"{prefix}{c.name:<24} {c.tier:<5} step {c.step:<7} pos {c.position:<6} "
          f"{_fmt_bytes(c.nbytes):>10} {'pinned ' if c.pinned else ''}"
          f"{c.file + ' file ' if c.file else ''}{'parent ' + c.parent if c.parent else ''}")


# How each capsule command fills its request from the arguments (the commands are the operations'
# names, flashrt_ros.ros.operations).
REQUEST_FIELDS = {
    "snapshot": lambda a: dict(name=a.name, tier=a.tier, pin=a.pin),
    "restore": lambda a: dict(name=a.name, noise_seed=a.noise_seed),
    "fork": lambda a: dict(source=a.source, name=a.name, switch_to=a.switch, tier=a.tier,
                           noise_seed=a.noise_seed),
    "rollback": lambda a: dict(k=a.k),
    "list": lambda a: dict(tier=a.tier),
    "delete": lambda a: dict(name=a.name, delete_file=a.delete_file),
    "save": lambda a: dict(name=a.name, evict_from_memory=a.move),
    "load": lambda a: dict(name=a.name, tier=a.tier, restore=a.restore),
    "reset": lambda a: dict(keep_context=not a.clear_context, noise_seed=a.noise_seed),
}
INT64 = 1 << 63             # a request's noise_seed is an int64


def _check_noise_seed(args) -> None:
    """Refuse, before anything is sent, a --noise-seed the request cannot carry or a fork's seed
    without --switch; every other seed goes to the node, which checks its range and whether the
    policy samples (its refusal is printed like any other)."""
    from flashrt_ros.ros.capsule_services import KEEP_SAMPLER
    seed = getattr(args, "noise_seed", None)
    if seed is None:
        return
    if not -INT64 <= seed < INT64:
        raise InputError(f"--noise-seed: expected {KEEP_SAMPLER} (the sampler goes on) or a seed "
                         f"in [0, 2^32), found {seed}; nothing sent")
    if args.command == "fork" and seed != KEEP_SAMPLER and not args.switch:
        raise InputError(f"--noise-seed {seed} restarts the sampler of the live state the branch "
                         f"becomes; expected --switch with it, found none - nothing forked (or "
                         f"fork it, then `flashrt-ros restore {args.name} --noise-seed {seed}`)")


def _service_command(args) -> int:
    from flashrt_ros.msg import CapsuleEvent
    from flashrt_ros.ros.operations import operation
    cmd = args.command
    _check_noise_seed(args)
    request = _set(operation(cmd).srv_type.Request(), **REQUEST_FIELDS[cmd](args))
    client = Client.from_args(args)
    try:
        t0 = time.perf_counter()
        res = client.capsule(cmd, request)
        rtt = (time.perf_counter() - t0) * 1e3
    finally:
        client.close()
    if isinstance(res, CapsuleEvent):       # the answer was lost; the event stands in for it
        if res.success:
            print(f"{cmd}: ok: {res.message} (the answer was lost in DDS; ~/capsule_events "
                  f"confirms the node applied it at step {res.step})")
            return 0
        print(f"{cmd}: FAILED: {res.message} (the answer was lost in DDS; ~/capsule_events "
              f"reports the node refused it)")
        return 1
    if cmd == "list" and res.success:
        print(f"{len(res.capsules)} capsule(s)")
        for c in res.capsules:
            _print_capsule(c, "  ")
        return 0
    status = "ok" if res.success else "FAILED"
    extra = f" (node {res.latency_ms:.3f} ms)" if hasattr(res, "latency_ms") else ""
    print(f"{cmd}: {status}: {res.message}{extra}; round trip {rtt:.1f} ms")
    return 0 if res.success else 1


def _set(req, **kw):
    for k, v in kw.items():
        setattr(req, k, v if v is not None else getattr(req, k))
    return req


def _status(args) -> int:
    from flashrt_ros.msg import PolicyStatus
    client = Client.from_args(args)
    try:
        s = client.wait_message(PolicyStatus, "status")
    finally:
        client.close()
    if not s.device:
        print(f"{args.node}: {s.lifecycle_state} (no runtime: `flashrt-ros lifecycle configure`)")
        return 0
    print(f"{args.node}: {s.lifecycle_state} on {s.device} ({s.preset}), episode {s.episode_id}, "
          f"step {s.step}, position {s.position}, lineage {s.capsule_lineage or '-'}")
    print(f"  step latency p50 {s.p50_step_ms:.3f} ms, p99 {s.p99_step_ms:.3f} ms; deadline misses "
          f"{s.deadline_misses}; stale observations {s.stale_observations}")
    print(f"  capsules {s.capsules}: gpu {_fmt_bytes(s.gpu_bytes)}/{_fmt_bytes(s.gpu_budget)}, "
          f"host {_fmt_bytes(s.host_bytes)}/{_fmt_bytes(s.host_budget)}, "
          f"disk {_fmt_bytes(s.disk_bytes)}/{_fmt_bytes(s.disk_budget)}")
    return 0


def _lifecycle(args) -> int:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    client = Client.from_args(args)
    try:
        if args.transition == "get":
            res = client.call(GetState, "get_state", GetState.Request())
            print(res.current_state.label)
            return 0
        ids = {"configure": Transition.TRANSITION_CONFIGURE, "activate": Transition.TRANSITION_ACTIVATE,
               "deactivate": Transition.TRANSITION_DEACTIVATE, "cleanup": Transition.TRANSITION_CLEANUP}
        if args.transition == "shutdown":   # one shutdown transition per primary state
            label = client.call(GetState, "get_state", GetState.Request()).current_state.label
            ids["shutdown"] = {"unconfigured": Transition.TRANSITION_UNCONFIGURED_SHUTDOWN,
                               "inactive": Transition.TRANSITION_INACTIVE_SHUTDOWN,
                               "active": Transition.TRANSITION_ACTIVE_SHUTDOWN}.get(label)
            if ids["shutdown"] is None:
                print(f"shutdown: the node is {label}; nothing to shut down")
                return 1
        req = ChangeState.Request()
        req.transition.id = ids[args.transition]
        res = client.call(ChangeState, "change_state", req)
    finally:
        client.close()
    print(f"{args.transition}: {'ok' if res.success else 'FAILED (see the node log)'}")
    return 0 if res.success else 1


def _instruct(args) -> int:
    """Publish one instruction, latched (ros/publishing.py), once the node and every other
    subscriber (a recorder) matched; return once each of them acknowledged it."""
    from rclpy.duration import Duration
    from std_msgs.msg import String

    from flashrt_ros.ros.publishing import LATCHED, wait_for_subscribers
    client = Client.from_args(args)
    try:
        pub = client.node.create_publisher(String, f"{client.target}/instruction", LATCHED)
        try:
            wait_for_subscribers(client.node, pub, client.discovery_timeout,
                                 idle=lambda t: client.rclpy.spin_once(client.node, timeout_sec=t))
        except TimeoutError as e:
            raise SystemExit(f"flashrt-ros instruct: no instruction sent: {e}") from None
        pub.publish(String(data=args.text))
        if not pub.wait_for_all_acked(Duration(seconds=client.timeout)):
            raise SystemExit(f"flashrt-ros instruct: sent, but not every subscriber of "
                             f"{client.target}/instruction acknowledged it within "
                             f"{client.timeout:g} s")
    finally:
        client.close()
    print("instruction sent")
    return 0


def _runtime(args):
    from flashrt_ros.core.config import RuntimeConfig
    from flashrt_ros.core.runtime import PolicyRuntime
    say = (lambda msg: print(f"[flashrt] {msg}", file=sys.stderr)) if not args.json else None
    return PolicyRuntime.from_pretrained(args.model, RuntimeConfig(device=args.device), progress=say)


def _info(args) -> int:
    import json
    rt = _runtime(args)
    d = rt.describe()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    if d.get("family") == "smolvla":
        print(f"model {d['model']} (SmolVLA) on {d['device']} (graphs {d['cuda_graphs']}, "
              f"{d['dtype']}, {d['parameters'] / 1e6:.1f} M parameters)")
        print(f"cameras {', '.join(d['cameras'])}; state {d['state_dim']}, action chunk "
              f"{d['chunk_size']} x {d['action_dim']} (queue {d['n_action_steps']}), "
              f"{d['num_steps']} flow steps; {d['vlm_layers']} VLM layers, "
              f"{d['expert_layers']} expert layers, prefix {d['prefix_len']} tokens")
        print(f"state arena {_fmt_bytes(d['arena_bytes'])}: fixed "
              f"{_fmt_bytes(d['fixed_state_bytes'])} + prefix KV "
              f"{_fmt_bytes(d['prefix_kv_bytes'])}; fingerprint {d['fingerprint']}")
    else:
        print(f"model {d['model']} on {d['device']} (kernels {d['kernels']}, graphs "
              f"{d['cuda_graphs']}, {d['dtype']}, {d['parameters'] / 1e6:.1f} M parameters, "
              f"tokenizer: {d['tokenizer']})")
        print(f"layers: {' '.join('A' if t == 'full_attention' else 'D' for t in d['layer_types'])} "
              f"(A: gated attention, D: Gated DeltaNet); obs_dim {d['obs_dim']}, action chunk "
              f"{d['horizon']} x {d['action_dim']}, context {d['max_context']} tokens")
        if d["untrained"]:
            print(f"untrained (drawn from the seed): {', '.join(d['untrained'])}")
        print(f"state arena {_fmt_bytes(d['arena_bytes'])}: fixed "
              f"{_fmt_bytes(d['fixed_state_bytes'])} + {d['state_bytes_per_token']} B/token; "
              f"fingerprint {d['fingerprint']}")
    roles: dict = {}
    for b in d["buffers"]:
        roles[b["role"]] = roles.get(b["role"], 0) + b["nbytes"]
    print("bytes per role (kv at max_context): "
          + ", ".join(f"{r} {_fmt_bytes(n)}" for r, n in roles.items()))
    for b in d["buffers"]:
        print(f"  {b['name']:<28} {b['role']:<16} {b['dtype']:<9} {str(b['shape']):<28} "
              f"{_fmt_bytes(b['nbytes'])}")
    return 0


def _train_heads(args) -> int:
    import torch

    from flashrt_ros.core.config import RuntimeConfig, load_preset, preset_path
    from flashrt_ros.core.models.qwen3_5 import checkpoint_qwen3_5
    from flashrt_ros.core.runtime import PolicyRuntime
    from flashrt_ros.sim.imitation import TRAINING, train_heads
    torch.set_num_threads(1)
    plan = {k: TRAINING[k] if getattr(args, k) is None else getattr(args, k) for k in TRAINING}
    yaml_path = preset_path(args.model)
    out = args.out or (yaml_path[:-len(".yaml")] + ".policy.safetensors" if yaml_path else "")
    if not out:
        print(f"flashrt-ros train-heads: preset {args.model!r} has no YAML file to put the heads "
              f"beside; name the output with --out", file=sys.stderr)
        return 2
    rt = PolicyRuntime(load_preset(args.model), RuntimeConfig(device="cpu", rollback_depth=0))
    print(f"[flashrt] behaviour cloning of the simulated arm's expert: preset {args.model}, "
          f"{plan['episodes']} episodes x {plan['steps']} steps x {plan['rounds']} rounds",
          flush=True)
    ev = train_heads(rt, **plan, say=lambda m: print(f"[flashrt] {m}", flush=True))
    print(f"[flashrt] mean arm error over evaluation episodes: policy {ev.policy:.3f}, "
          f"no action {ev.idle:.3f}, expert {ev.expert:.3f}")
    if not ev.policy < 0.5 * ev.idle:
        print("[flashrt] the trained heads do not halve the error of doing nothing; not written",
              file=sys.stderr)
        return 1
    checkpoint_qwen3_5.save_heads(rt.model, out, rt.model.backbone_digest)
    print(f"[flashrt] wrote {out}")
    return 0


def _generate(args) -> int:
    args.json = False
    rt = _runtime(args)
    ids = rt.tokenizer.encode(args.text)
    rt.prefill(ids)
    out = []
    eos = rt.model_cfg.text.eos_token_id       # any of them ends the text (transformers' rule)
    for tok in rt.decode(args.max_new_tokens):
        if tok in eos:
            break
        out.append(tok)
    print(args.text + rt.tokenizer.decode(out))
    print(f"[flashrt] {len(ids)} prompt tokens, {len(out)} generated (greedy): {out}",
          file=sys.stderr)
    return 0


def _params(args) -> int:
    from flashrt_ros.ros.params import params_markdown, params_yaml
    print(params_markdown() if args.markdown else params_yaml(), end="")
    return 0


# The experiments of the benchmark suite: name -> (script in bench/, arguments it starts with).
BENCH_EXPERIMENTS = {
    "ttft": ("bench_capsules.py", ["--experiments", "ttft"]),
    "exactness": ("bench_capsules.py", ["--experiments", "exactness"]),
    "kv-only": ("bench_capsules.py", ["--experiments", "kv-only"]),
    "tiers": ("bench_capsules.py", ["--experiments", "tiers"]),
    "capsules": ("bench_capsules.py", []),
    "graphs": ("bench_runtime.py", []),
    "runtime": ("bench_runtime.py", []),
    "ros": ("bench_ros.py", []),
    "paged": ("bench_paged.py", []),
    "bringup": ("bench_bringup.py", []),
    "kernels": ("bench_kernels.py", []),
    "transformers-compare": ("compare_transformers.py", []),
}


def _bench(args, rest) -> int:
    import runpy
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    entry = BENCH_EXPERIMENTS.get(args.experiment)
    path = os.path.join(here, "bench", entry[0]) if entry else ""
    if not entry or not os.path.exists(path):
        print(f"flashrt-ros bench: no experiment {args.experiment!r} here; experiments: "
              f"{', '.join(BENCH_EXPERIMENTS)} (the benchmarks run from a source checkout: "
              f"bench/ is not installed)", file=sys.stderr)
        return 2
    sys.argv = [path] + entry[1] + rest
    runpy.run_path(path, run_name="__main__")
    return 0


def _noise_seed_argument(parser, what: str) -> None:
    parser.add_argument("--noise-seed", type=int, default=None, metavar="N",
                        help=f"{what}. N in 0 .. 2^32-1; -1 keeps the sampler. For a policy that "
                             f"samples: a VLA, or a Qwen policy with runtime.action_noise > 0 "
                             f"(another policy refuses a seed)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashrt-ros", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[2] if len(__doc__.split("\n\n")) > 2 else None)
    p.add_argument("--node", default="/flashrt_policy", help="the policy node (default %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for an answer (default %(default)s)")
    p.add_argument("--discovery-timeout", type=float, default=None, metavar="S",
                   help="seconds to wait for the node's services and topics to appear "
                        "(default: --timeout)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("node", help="run the policy node (arguments after it go to ROS: --ros-args ...)",
                   add_help=False)
    d = sub.add_parser("demo", help="node + simulated robot on the tiny CPU preset, with a live loop")
    from flashrt_ros.cli.demo import add_arguments
    add_arguments(d)
    sub.add_parser("sim", help="run the simulated robot alone (see `flashrt-ros sim --help`)",
                   add_help=False)
    sub.add_parser("train-vla", help="train the smolvla-tiny preset by behaviour cloning of the "
                                     "simulated arm's expert (CPU, about 5 minutes; see "
                                     "`flashrt-ros train-vla --help`)", add_help=False)
    sub.add_parser("bt-demo", help="branch-and-choose behaviour tree against the simulated robot: "
                   "report and plot (see `flashrt-ros bt-demo --help`)", add_help=False)
    sub.add_parser("record", help="record the node's episode to a rosbag2 bag (see `flashrt-ros "
                                  "record --help`)", add_help=False)
    sub.add_parser("play", help="replay a bag into the node and compare the actions (see "
                                "`flashrt-ros play --help`)", add_help=False)
    sub.add_parser("bag", help="bag tools without ROS: `bag info BAG` (as `ros2 bag info`), `bag "
                               "recover DIR` (a killed recording -> a complete bag)", add_help=False)
    s = sub.add_parser("snapshot", help="capture the live state as a capsule")
    s.add_argument("name")
    s.add_argument("--tier", default="", help="gpu, host or disk (default: the node's default tier)")
    s.add_argument("--pin", action="store_true", help="never evict this capsule")
    s = sub.add_parser("restore", help="restore a capsule into the live state")
    s.add_argument("name")
    _noise_seed_argument(s, "then restart the live state's noise sampler at seed N: the "
                            "capsule's state samples another future (default: the capsule's "
                            "sampler goes on)")
    s = sub.add_parser("fork", help="copy a capsule ('' = the live state) into a new branch")
    s.add_argument("source")
    s.add_argument("name")
    s.add_argument("--switch", action="store_true", help="also restore the new branch")
    s.add_argument("--tier", default="")
    _noise_seed_argument(s, "with --switch only: the live state continues on the branch with "
                            "its noise sampler restarted at seed N; the stored branch keeps the "
                            "source's sampler (default: the sampler goes on)")
    s = sub.add_parser("rollback", help="go back K committed steps")
    s.add_argument("k", type=int)
    s = sub.add_parser("list", help="list stored capsules")
    s.add_argument("--tier", default="")
    s = sub.add_parser("delete", help="delete a capsule (its saved file stays unless --delete-file)")
    s.add_argument("name")
    s.add_argument("--delete-file", action="store_true",
                   help="also delete its file in the capsule directory")
    s = sub.add_parser("save", help="write a capsule to the capsule directory")
    s.add_argument("name")
    s.add_argument("--move", action="store_true",
                   help="drop the memory copy (demote to disk); default: keep it")
    s = sub.add_parser("load", help="verify and load a capsule file into memory")
    s.add_argument("name")
    s.add_argument("--tier", default="")
    s.add_argument("--restore", action="store_true", help="also restore it")
    s = sub.add_parser("reset", help="start a new episode from the instruction context")
    s.add_argument("--clear-context", action="store_true", help="reset to an empty context instead")
    _noise_seed_argument(s, "then restart the noise sampler at seed N: a seeded episode "
                            "(default: the sampler goes on)")
    sub.add_parser("status", help="print the node's status once")
    s = sub.add_parser("lifecycle", help="drive the node's lifecycle (no ros2 CLI needed)")
    s.add_argument("transition", choices=["configure", "activate", "deactivate", "cleanup",
                                          "shutdown", "get"])
    s = sub.add_parser("instruct", help="send a task instruction (prefills a new context)")
    s.add_argument("text")
    s = sub.add_parser("info", help="describe a model's runtime: arena layout, bytes per role, "
                                    "fingerprint (no ROS needed)")
    s.add_argument("--model", default="tiny", help="a preset name or a checkpoint directory")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("train-heads", help="train a preset's heads by behaviour cloning of the "
                                           "simulated arm's expert (CPU, under a minute for tiny)")
    s.add_argument("--model", default="tiny", help="the preset whose heads are trained")
    s.add_argument("--out", default="", help="output file (default: <preset>.policy.safetensors "
                                             "beside the preset's YAML)")
    s.add_argument("--episodes", type=int, help="episodes per round (default 8)")
    s.add_argument("--steps", type=int, help="steps per episode (default 600)")
    s.add_argument("--rounds", type=int, help="rounds: the expert's, then DAgger's (default 4)")
    s = sub.add_parser("generate", help="greedy continuation of a text: the quick check that a "
                                        "checkpoint works (no ROS needed)")
    s.add_argument("text")
    s.add_argument("--model", default="tiny", help="a preset name or a checkpoint directory")
    s.add_argument("--device", default="cpu")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s = sub.add_parser("params", help="print every node parameter with its default and meaning "
                                      "(a ROS params file, or --markdown; no ROS needed)")
    s.add_argument("--markdown", action="store_true", help="a Markdown table instead of YAML")
    s = sub.add_parser("bench", help="run a benchmark from bench/ (arguments after it go to it)",
                       add_help=False)
    s.add_argument("experiment")
    return p


def main(argv=None) -> int:
    """Entry point of `flashrt-ros`. DDS stays on loopback unless the environment says otherwise:
    set here, before any command initialises rclpy (importing this module changes nothing)."""
    loopback_by_default()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "node":
        from flashrt_ros.ros.node import main as node_main
        node_main(args=["flashrt_node"] + argv[1:])
        return 0
    if argv and argv[0] == "sim":
        from flashrt_ros.sim.robot import main as sim_main
        sim_main(argv[1:])
        return 0
    if argv and argv[0] == "record":
        from flashrt_ros.bags.record import main as record_main
        return record_main(argv[1:])
    if argv and argv[0] == "bag":
        from flashrt_ros.bags.command import main as bag_main
        return bag_main(argv[1:])
    if argv and argv[0] == "play":
        from flashrt_ros.bags.play import main as play_main
        return play_main(argv[1:])
    if argv and argv[0] == "train-vla":
        from flashrt_ros.sim.imitation_vla import main as train_vla_main
        return train_vla_main(argv[1:])
    if argv and argv[0] == "bt-demo":
        from flashrt_ros.cli.bt_demo import main as bt_demo_main
        return bt_demo_main(argv[1:])
    if argv and argv[0] == "bench":
        if len(argv) < 2 or argv[1] in ("-h", "--help"):
            print("usage: flashrt-ros bench EXPERIMENT [args...]\n\nexperiments:\n" + "\n".join(
                f"  {name:<10} bench/{script} {' '.join(extra)}"
                for name, (script, extra) in BENCH_EXPERIMENTS.items())
                + "\n\n`flashrt-ros bench EXPERIMENT --help` shows an experiment's options.")
            return 0
        return _bench(argparse.Namespace(experiment=argv[1]), argv[2:])
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from flashrt_ros.cli.demo import run_demo
        return run_demo(args)
    handlers = {"status": _status, "lifecycle": _lifecycle, "instruct": _instruct, "info": _info,
                "generate": _generate, "train-heads": _train_heads, "params": _params}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        return _service_command(args)
    except FlashRTError as e:
        # a refusal (a model directory that does not fit, an input out of range): its message
        # says what was expected, what was found and what to do; a traceback adds nothing
        print(f"flashrt-ros {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
