"""Test helpers for users of flashrt_ros: turn a recorded bag into a regression test.

    from flashrt_ros.testing import assert_bag_replays

    @pytest.mark.ros
    def test_pick_episode_still_replays():
        assert_bag_replays("test/bags/pick_episode", preset="tiny")

`assert_bag_replays` starts a fresh `flashrt_node` process (parameters: those the recorder stored
in the bag, then lockstep-friendly settings, then yours), replays the bag into it in lockstep with
the recorded capsule operations, and fails unless every action matches the recorded one byte for
byte (or, for a bag without recorded actions, unless every observation got an action).
`PolicyNodeProcess` is the node process on its own, for tests that drive a node themselves.

Processes started here keep DDS on loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST unless the
environment already says otherwise) and stay in the caller's ROS_DOMAIN_ID. No pytest import: an
assertion failure is a plain AssertionError.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from flashrt_ros.bags.play import BagPlayer, RecordedEpisode, ReplayResult

# what a lockstep replay needs, whatever the recorded node used: a step per observation, none
# lost on the way or dropped as stale when a loaded CI machine delays a callback, and a status
# rate that acknowledges an instruction quickly (the player waits for that before stepping on)
REPLAY_PARAMETERS = {"managed": False, "control_mode": "observation", "observation_qos": "reliable",
                     "stale_observation_s": 0.0, "status_rate_hz": 20.0}


def _nested(params: dict) -> dict:
    """{"store.capsule_dir": x} -> {"store": {"capsule_dir": x}} (the ROS params-file layout)."""
    out = {}
    for name, value in params.items():
        *parents, leaf = name.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = list(value) if isinstance(value, tuple) else value
    return out


def node_parameters(recorded: dict | None, overrides: dict) -> dict:
    """The parameters a replay node starts with: recorded ones that differ from the defaults,
    then REPLAY_PARAMETERS, then `overrides`. Unknown names are refused (typos fail loudly)."""
    from flashrt_ros.ros.params import parameter_table
    table = {name: default for name, default, *_ in parameter_table()}
    unknown = sorted(set(overrides) - set(table))
    if unknown:
        raise ValueError(f"node parameters: expected names from the node's table, found {unknown}; "
                         f"known: {sorted(table)}")
    params = {k: v for k, v in (recorded or {}).items()      # None: declared but not set
              if k in table and v is not None and v != table[k] and k != "store.capsule_dir"}
    params.update(REPLAY_PARAMETERS)
    params.update(overrides)
    return {k: v for k, v in params.items() if not (isinstance(v, (list, tuple)) and not v)}


class PolicyNodeProcess:
    """A `flashrt_node` child process named `name` with `params`; use as a context manager.

    Parameters go through a params file (no shell quoting); `output` collects its log lines.
    Leaving the context sends SIGINT and waits (then kills after `stop_timeout`).
    """

    def __init__(self, name: str, params: dict, env: dict | None = None, stop_timeout=10.0):
        self.name = name.strip("/")
        self.params = params
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.stop_timeout = stop_timeout
        self.output = []
        self.proc = None

    @property
    def node(self) -> str:
        return "/" + self.name

    def __enter__(self):
        import yaml
        self._dir = tempfile.TemporaryDirectory(prefix="flashrt_node_")
        path = os.path.join(self._dir.name, "params.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump({"/**": {"ros__parameters": _nested(self.params)}}, f)
        cmd = [sys.executable, "-m", "flashrt_ros.ros.node", "--ros-args", "-r",
               f"__node:={self.name}", "--params-file", path]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=lambda: self.output.extend(self.proc.stdout),
                                        daemon=True)
        self._reader.start()
        return self

    def check_alive(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.node} exited with {self.proc.returncode}:\n{self.log()}")

    def wait_active(self, timeout: float = 120.0) -> float:
        """Wait until the node reports `active` on its status topic; returns the seconds taken.

        Raises AssertionError if the process exits first, TimeoutError at the deadline."""
        import rclpy
        from rclpy.qos import QoSProfile, QoSReliabilityPolicy

        from flashrt_ros.ros.executors import SingleThreadedExecutor
        from flashrt_ros.msg import PolicyStatus
        t0 = time.monotonic()
        context = rclpy.Context()
        rclpy.init(context=context)
        try:
            probe = rclpy.create_node(f"flashrt_probe_{uuid.uuid4().hex[:6]}", context=context)
            seen = []
            probe.create_subscription(PolicyStatus, f"{self.node}/status", seen.append,
                                      QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE))
            executor = SingleThreadedExecutor(context=context)
            executor.add_node(probe)
            while not (seen and seen[-1].lifecycle_state == "active"):
                self.check_alive()
                if time.monotonic() - t0 > timeout:
                    state = seen[-1].lifecycle_state if seen else "no status message"
                    raise TimeoutError(f"{self.node} not active after {timeout:g} s ({state}):\n"
                                       f"{self.log()}")
                executor.spin_once(timeout_sec=0.05)
            executor.shutdown(timeout_sec=1.0)
            probe.destroy_node()
        finally:
            rclpy.try_shutdown(context=context)
        return time.monotonic() - t0

    def log(self, last: int = 40) -> str:
        return "".join(self.output[-last:])

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=self.stop_timeout)
        self._reader.join(timeout=5)
        self._dir.cleanup()
        return False


def replay_into_fresh_node(bag_path, *, mode: str = "lockstep", rate: float = 1.0,
                           timeout: float = 30.0, startup_timeout: float = 120.0,
                           capsule_ops: bool = True, env: dict | None = None,
                           **node_params) -> tuple[ReplayResult, RecordedEpisode, str]:
    """Replay `bag_path` into a new node process; returns (result, episode, the node's log)."""
    import rclpy
    episode = RecordedEpisode.open(bag_path)
    with tempfile.TemporaryDirectory(prefix="flashrt_capsules_") as capsules:
        node_params.setdefault("store.capsule_dir", capsules)
        params = node_parameters(episode.parameters, node_params)
        name = f"flashrt_replay_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with PolicyNodeProcess(name, params, env) as node:
            node.wait_active(startup_timeout)
            context = rclpy.Context()
            rclpy.init(context=context)
            player = None
            try:
                player = BagPlayer(node.node, timeout=timeout, context=context, log=lambda s: None)
                result = player.play(episode, mode, rate, ops=capsule_ops)
            finally:
                if player is not None:
                    player.close()
                rclpy.try_shutdown(context=context)
            log = node.log()
    return result, episode, log


def assert_bag_replays(bag_path, *, mode: str = "lockstep", rate: float = 1.0,
                       timeout: float = 30.0, startup_timeout: float = 120.0,
                       env: dict | None = None, **node_params) -> ReplayResult:
    """Replay a recorded bag into a fresh policy node; fail unless the actions match.

    Args:
        bag_path: a bag directory written by `flashrt-ros record` (or a foreign bag with
            Observation or JointState input).
        mode: "lockstep" (deterministic) or "timing" (recorded times / `rate`).
        timeout: seconds to wait for any one action or service answer.
        startup_timeout: seconds the node may take to start and configure.
        env: environment of the node process (default: this process's).
        **node_params: node parameters by their ROS names, e.g. `preset="tiny"`,
            `joint_names=["j1", ...]`; dotted names need a dict: `**{"runtime.device": "cpu"}`.
    Returns:
        the ReplayResult (actions per observation index, comparison, timings).
    Raises:
        AssertionError: an action differed or was missing, or a capsule operation failed.
    """
    result, episode, log = replay_into_fresh_node(bag_path, mode=mode, rate=rate, timeout=timeout,
                                                  startup_timeout=startup_timeout, env=env,
                                                  **node_params)
    if not result.ok:
        raise AssertionError(f"bag {bag_path} did not replay: {episode.summary()}\n"
                             f"{result.describe()}\n--- node log (last lines) ---\n{log}")
    return result
