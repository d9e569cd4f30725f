"""The recorder on a busy machine: `ready` means every publisher reaches it, and it says when not.

On a loaded machine DDS discovery takes seconds, and the two sides of a topic match at different
times: the recorder's reader matches the node's writer (and the graph shows the node) before the
node's writer has matched the reader, and until then the node's messages do not go to the
recorder. A recorder that said "ready" when the graph showed the node lost the node's first
actions (40 of 44 kept in one run, 0 of 40 in another, while the cores were busy).

A stand-in for the policy node (a child process publishing the node's topics, an action and a
status per step) lets the tests hold the node's discovery back: stopped with SIGSTOP after the
recorder's process learned its writers, the stand-in cannot match the recorder's readers until
SIGCONT. Busy-loop processes keep every core loaded for the duration of each test.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flashrt_ros.ros.waiting import wait_for

pytestmark = pytest.mark.ros

DISCOVERY_TIMEOUT_S = 60        # discovery with every core busy
BUSY_PROCESSES = min(2 * (os.cpu_count() or 1), 16)

# The policy node's five topics with its QoS (ros/node.py; the instruction latched as
# ros/publishing.py publishes it). Each step publishes an action, and every 5th a status with
# the step; `silent`: the status only, as a node whose actions do not reach the recorder.
STAND_IN = """
import sys
import rclpy
from rclpy.qos import QoSProfile, QoSReliabilityPolicy
from std_msgs.msg import String
from flashrt_ros.msg import ActionChunk, CapsuleEvent, Observation, PolicyStatus
from flashrt_ros.ros.publishing import LATCHED

target, mode = sys.argv[1], sys.argv[2]
rclpy.init()
node = rclpy.create_node(target.strip("/"))
qos = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
action = node.create_publisher(ActionChunk, target + "/action", qos)
status = node.create_publisher(PolicyStatus, target + "/status", qos)
node.create_publisher(CapsuleEvent, target + "/capsule_events", qos)
node.create_publisher(Observation, target + "/observation", qos)
node.create_publisher(String, target + "/instruction", LATCHED)
steps = 0

def step():
    global steps
    steps += 1
    stamp = node.get_clock().now().to_msg()
    if mode == "acting":
        msg = ActionChunk(step=steps)
        msg.header.stamp = stamp
        action.publish(msg)
    if steps % 5 == 0:
        msg = PolicyStatus(lifecycle_state="active", step=steps)
        msg.header.stamp = stamp
        status.publish(msg)

node.create_timer(0.02, step)
print("up", flush=True)
rclpy.spin(node)
"""


@contextlib.contextmanager
def busy_loops():
    """Busy-loop processes on every core while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
             for _ in range(BUSY_PROCESSES)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)


@pytest.fixture
def busy_cores():
    with busy_loops():
        yield


@pytest.fixture
def stand_in(ros_env):
    """start(mode) -> (the stand-in node's name, its process); killed after the test."""
    procs = []

    def start(mode):
        target = f"/stand_in_policy_{os.getpid()}_{len(procs)}"
        proc = subprocess.Popen([sys.executable, "-c", STAND_IN, target, mode], env=ros_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.startswith("up"), line + proc.stdout.read()
        return target, proc
    yield start
    for proc in procs:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def context():
    import rclpy
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.try_shutdown(context=ctx)


def _topics(target):
    return [f"{target}/{t}" for t in ("observation", "instruction", "action", "status",
                                      "capsule_events")]


def _recorder(target, out, ctx):
    """A BagRecorder in `ctx`, logging (wall clock ns, line) pairs."""
    from flashrt_ros.bags.record import BagRecorder
    lines = []
    rec = BagRecorder(target, str(out), "mcap", context=ctx,
                      log=lambda s: lines.append((time.time_ns(), s)))
    return rec, lines


def _spin(rec, condition):
    def step():
        rec.spin_once(0.02)
        return condition()
    return step


def _recorded_actions(bag):
    """(step, header stamp ns) of each action in the bag, by step."""
    from rclpy.serialization import deserialize_message

    from flashrt_ros.bags.reader import open_bag
    from flashrt_ros.msg import ActionChunk
    from flashrt_ros.ros.stamps import stamp_to_ns
    reader = open_bag(bag)
    action = [t for t in reader.topics if t.topic.endswith("/action")]
    return sorted((m.step, stamp_to_ns(m.header.stamp)) for m in
                  (deserialize_message(it.data, ActionChunk) for it in reader.messages(action)))


def test_the_recorder_is_ready_only_once_the_nodes_writers_matched_it(
        busy_cores, stand_in, context, tmp_path):
    import rclpy
    target, proc = stand_in("acting")
    # the recorder's process learns the node's writers first; then the node stops, so it
    # cannot learn of the recorder's readers: the graph shows the node, its writers do not
    # reach the recorder (the probe is kept until the recorder's node is made: rmw_fastrtps
    # ends a context's participant with its last node)
    probe = rclpy.create_node(f"probe_{os.getpid()}", context=context)
    wait_for(lambda: all(probe.get_publishers_info_by_topic(t) for t in _topics(target)),
             DISCOVERY_TIMEOUT_S, f"{target}'s publishers in the recorder's graph")
    proc.send_signal(signal.SIGSTOP)
    rec, lines = _recorder(target, tmp_path / "bag", context)
    probe.destroy_node()
    try:
        wait_for(_spin(rec, lambda: all(rec._subs[t][0].get_publisher_count() >= 1
                                        for t in _topics(target))
                       and "waiting for publishers of" not in rec.progress_line()),
                 DISCOVERY_TIMEOUT_S, "the recorder's readers to match the node's writers")
        assert not rec.ready, [s for _, s in lines]
        assert f"waiting for a message on {target}/status" in rec.progress_line()
        assert rec.matched == {t: (1, 1) for t in _topics(target)}
        assert f"[record] {target}/action: 1 of 1 publisher(s) matched" in [s for _, s in lines]

        proc.send_signal(signal.SIGCONT)
        wait_for(_spin(rec, lambda: rec.ready), DISCOVERY_TIMEOUT_S, "the recorder to be ready")
        ready_ns = next(t for t, s in lines if s.startswith("[record] ready"))
        wait_for(_spin(rec, lambda: rec.counts["action"] >= 50), DISCOVERY_TIMEOUT_S,
                 "50 actions")
    finally:
        rec.close()
    actions = _recorded_actions(tmp_path / "bag")
    steps = [s for s, _ in actions]
    # every action from the first one recorded on, and that one was sent before "ready"
    assert steps == list(range(steps[0], steps[0] + len(steps))), steps
    assert actions[0][1] <= ready_ns, (actions[:3], ready_ns)


def test_the_recorder_warns_when_the_node_steps_and_no_action_arrives(
        busy_cores, stand_in, context, tmp_path):
    target, _ = stand_in("silent")
    rec, lines = _recorder(target, tmp_path / "bag", context)
    warning = f"[record] warning: {target}/action: the node's status showed"
    try:
        wait_for(_spin(rec, lambda: rec.ready), DISCOVERY_TIMEOUT_S, "the recorder to be ready")
        wait_for(_spin(rec, lambda: any(s.startswith(warning) for _, s in lines)),
                 DISCOVERY_TIMEOUT_S, f"the warning ({[s for _, s in lines]})")
    finally:
        rec.close()
    from flashrt_ros.bags.record import SILENT_ACTION_STEPS
    said = next(s for _, s in lines if s.startswith(warning))
    assert f"{SILENT_ACTION_STEPS} new steps" in said and "the bag misses them" in said, said
    assert rec.counts["action"] == 0 and rec.counts["status"] > SILENT_ACTION_STEPS


@pytest.mark.slow
def test_an_episode_recorded_on_a_busy_machine_keeps_every_action(ros_env, tmp_path):
    """A policy node process, `flashrt-ros record` and a driver, with every core busy from the
    recorder's start on: after "[record] ready" every observation and action is in the bag, and
    so are the node's parameters."""
    import numpy as np

    from flashrt_ros.bags.reader import open_bag
    from flashrt_ros.bags.types import META_PARAMETERS
    from flashrt_ros.testing import PolicyNodeProcess
    from test_bags import NODE_PARAMS, STARTUP_TIMEOUT_S, EpisodeDriver, Recorder
    steps = 30
    name = f"flashrt_busy_{os.getpid()}"
    params = dict(NODE_PARAMS, **{"store.capsule_dir": str(tmp_path / "capsules")})
    with PolicyNodeProcess(name, params, ros_env) as node:
        node.wait_active(STARTUP_TIMEOUT_S)
        driver = EpisodeDriver(node.node)          # publishes the node's inputs, as a robot
        try:
            with busy_loops():
                rec = Recorder(node.node, tmp_path / "bag", "mcap", ros_env)
                try:
                    wait_for(lambda: rec.saw("[record] ready"), DISCOVERY_TIMEOUT_S, "the recorder")
                    # the driver's inputs wait for their subscribers (node and recorder), as a
                    # player's do
                    driver.spin_until(lambda: driver.obs_pub.get_subscription_count() >= 2,
                                      "the node and the recorder to match the observations",
                                      DISCOVERY_TIMEOUT_S)
                    rng = np.random.default_rng(3)
                    for obs in rng.standard_normal((steps, 14)).astype(np.float32):
                        driver.step(obs)
                    wait_for(lambda: rec.counts().get("action", 0) >= steps, DISCOVERY_TIMEOUT_S,
                             f"{steps} actions in the recorder's progress line")
                    # the parameters are read over services that a starved node answers late:
                    # the recorder asks again until they come
                    wait_for(lambda: rec.saw("[record] stored the"), DISCOVERY_TIMEOUT_S,
                             "the node's parameters in the recorder")
                    assert rec.stop() == 0, "".join(rec.lines)
                finally:
                    rec.kill()
        finally:
            driver.close()
    bag = open_bag(tmp_path / "bag")
    counts = {t.topic: t.count for t in bag.topics}
    assert counts[f"/{name}/action"] == steps and counts[f"/{name}/observation"] == steps, counts
    # and what a replay configures its node from
    parameters = json.loads(bag.custom[META_PARAMETERS])
    assert parameters["control_mode"] == "observation", "".join(rec.lines)
