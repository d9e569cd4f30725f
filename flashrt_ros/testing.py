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
import tempfile
import uuid

from flashrt_ros.bags.play import BagPlayer, RecordedEpisode, ReplayResult
from flashrt_ros.ros.discovery import loopback_by_default
from flashrt_ros.ros.process import NodeProcess

# what a lockstep replay needs, whatever the recorded node used: a step per observation, none
# lost on the way or dropped as stale when a loaded CI machine delays a callback, and a status
# rate that acknowledges an instruction quickly (the player waits for that before stepping on)
REPLAY_PARAMETERS = {"managed": False, "control_mode": "observation", "observation_qos": "reliable",
                     "stale_observation_s": 0.0, "status_rate_hz": 20.0}


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


class PolicyNodeProcess(NodeProcess):
    """A `flashrt_node` child process named `name` with `params`; use as a context manager.

    A NodeProcess (flashrt_ros.ros.process): `output` collects its log lines, `wait_active` waits
    for its status to say active, leaving the context sends SIGINT and waits (then kills after
    `stop_timeout`).
    """

    def __init__(self, name: str, params: dict, env: dict | None = None, stop_timeout=10.0):
        super().__init__(env=env, params=params, name=name, stop_timeout=stop_timeout)


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
            loopback_by_default()            # the player here, as the node there
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
            log = node.log(40)
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
