"""Behaviour trees drive capsules: every behaviour's paths, both example trees, the demo, the BT XML.

Layers:
  * each capsule behaviour's success and refusal against a live policy node in a separate process
    (`flashrt_node --ros-args -p managed:=false ...`) over DDS on loopback;
  * refused, timeout and halt paths against a scripted server in this process (its own context and
    executor) whose answers the test controls - success=false on demand, or held until released;
  * unreachable: a service name nobody serves;
  * status conditions against the live node and against a scripted status publisher;
  * the sim world paused and run from the tick thread while an executor spins the robot;
  * both example trees against the node process, with the simulated robot in this process;
  * `flashrt-ros bt-demo` in a subprocess (its policy node in-process there) writes its plot;
  * docs/bt/flashrt_capsules.xml declares the same request fields as the srv types.
Waits poll with deadlines (flashrt_ros.ros.waiting.wait_for); nothing sleeps a fixed time.
"""
import functools
import os
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET

import pytest

from flashrt_ros.ros.waiting import wait_for

pytestmark = pytest.mark.ros

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_STARTUP_S = 90       # the child imports torch and configures the tiny preset
DISCOVERY_S = 15
SHORT_S = 0.4             # wait_s / timeout_s of the paths that are meant to give up
TREE_S = 120


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy_node(ros_env, tmp_path_factory, ros):
    """A policy node process (managed=false, one step per observation); yields its name."""
    from flashrt_ros.msg import PolicyStatus
    name = "bt_policy_%d" % os.getpid()
    exe = os.path.join(os.path.dirname(sys.executable), "flashrt_node")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "flashrt_ros.ros.node"]
    cmd += ["--ros-args", "-r", "__node:=" + name, "-p", "managed:=false",
            "-p", "control_mode:=observation", "-p", "observation_qos:=reliable",
            "-p", "runtime.device:=cpu", "-p", "status_rate_hz:=20.0",
            "-p", "stale_observation_s:=0.0",     # lockstep: a late observation is still the next one
            "-p", "instruction:=reach the moving target",
            "-p", "store.capsule_dir:=%s" % tmp_path_factory.mktemp("capsules")]
    proc = subprocess.Popen(cmd, env=dict(ros_env, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output, states = [], []
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    sub = ros.node.create_subscription(PolicyStatus, "/%s/status" % name,
                                       lambda msg: states.append(msg.lifecycle_state), 10)

    def active():
        if proc.poll() is not None:
            raise RuntimeError("flashrt_node exited with %s:\n%s" % (proc.returncode, "".join(output)))
        return "active" in states

    try:
        try:
            wait_for(active, NODE_STARTUP_S, "flashrt_node %s to publish an active status" % name)
        except TimeoutError as e:
            raise TimeoutError("%s; its output:\n%s" % (e, "".join(output[-40:]))) from None
        ros.node.destroy_subscription(sub)
        yield "/" + name
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Ros:
    """The test's rclpy node, spun by an executor in a background thread (behaviours need that)."""

    def __init__(self):
        import rclpy
        from flashrt_ros.ros.executors import MultiThreadedExecutor, SpinThread
        # SimRobotNode takes no context argument, so this module uses the default context
        rclpy.init()
        self.node = rclpy.create_node("bt_test_%d" % os.getpid())
        self.executor = MultiThreadedExecutor(num_threads=3)
        self.executor.add_node(self.node)
        self.thread = SpinThread(self.executor)
        self.thread.start()

    def assert_spinning(self):
        assert self.thread.error is None, ("the test's executor thread died, so every later answer "
                                           "and message went unseen: %r" % self.thread.error)

    def close(self):
        import rclpy
        self.executor.shutdown(timeout_sec=5)
        self.node.destroy_node()
        rclpy.try_shutdown()


@pytest.fixture(scope="module")
def ros():
    r = Ros()
    yield r
    r.close()


class ScriptedServices:
    """Serves every capsule service under a namespace, answering as `mode` says when a request
    arrives: "answer" (success, message "answer #n"), "refuse" (success=false), "hold" (block until
    `release` is set, then answer). Also publishes PolicyStatus on demand. Own context and
    executor, so a held answer never blocks the test's executor.
    """

    # the node's CapsuleEvent.operation per service (node.py's service table), written out here
    # so that the behaviours' own mapping is checked against it
    OPERATIONS = {"snapshot": "snapshot", "restore": "restore", "fork": "fork",
                  "rollback": "rollback", "reset": "reset", "save_capsule": "save",
                  "load_capsule": "load", "delete_capsule": "delete"}

    def __init__(self, namespace):
        import rclpy
        from rclpy.callback_groups import ReentrantCallbackGroup
        from flashrt_ros.ros.executors import MultiThreadedExecutor
        from rclpy.qos import QoSProfile, QoSReliabilityPolicy

        from flashrt_ros.msg import CapsuleEvent, CapsuleInfo, PolicyStatus
        self.namespace = namespace
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("bt_scripted_%d" % os.getpid(), context=self.context)
        self.mode = "answer"
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.received, self.answered = [], []
        self._capsule = CapsuleInfo(name="home")
        self.event_name = None      # "hold-event": the capsule name the event reports (None: the request's)
        group = ReentrantCallbackGroup()
        for cls in service_behaviours().values():
            self.node.create_service(
                cls.srv_type, "%s/%s" % (namespace, cls.service),
                functools.partial(self._callback, self.OPERATIONS.get(cls.service)),
                callback_group=group)
        self.events_pub = self.node.create_publisher(
            CapsuleEvent, namespace + "/capsule_events",
            QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE))
        self._event_type = CapsuleEvent
        self.status_pub = self.node.create_publisher(
            PolicyStatus, namespace + "/status",
            QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE))
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def _callback(self, operation, request, response):
        with self.lock:
            self.received.append(request)
            n, mode = len(self.received), self.mode
        if mode == "hold-event" and operation:
            # what the node publishes when it applied a request; then the answer is "lost"
            wait_for(lambda: self.events_pub.get_subscription_count() > 0, 10,
                     "a subscriber of capsule_events")
            name = self.event_name if self.event_name is not None else getattr(request, "name", "")
            self.events_pub.publish(self._event_type(operation=operation, name=name, success=True,
                                                     message="applied #%d" % n))
        if mode in ("hold", "hold-event"):
            self.release.wait(timeout=60)
        response.success = mode != "refuse"
        response.message = "answer #%d" % n
        if hasattr(response, "capsules"):
            response.capsules = [self._capsule]
        with self.lock:
            self.answered.append(n)
        return response

    def settle(self):
        """Release held requests, wait until every request got its answer, back to "answer"."""
        self.release.set()
        wait_for(lambda: len(self.answered) == len(self.received), 10, "held answers to go out")
        self.release.clear()
        self.mode, self.event_name = "answer", None

    def close(self):
        import rclpy
        self.settle()
        self.executor.shutdown(timeout_sec=5)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


@pytest.fixture(scope="module")
def scripted():
    s = ScriptedServices("/bt_scripted_%d" % os.getpid())
    yield s
    s.close()


@pytest.fixture(autouse=True)
def clean_blackboard():
    import py_trees
    py_trees.blackboard.Blackboard.clear()
    yield


@pytest.fixture(autouse=True)
def executor_alive(request):
    """After each test that used it: the test's executor still spins (a dead spin thread shows up
    as timeouts in every later test; this names the cause)."""
    yield
    if "ros" in request.fixturenames:
        request.getfixturevalue("ros").assert_spinning()


@functools.cache
def service_behaviours():
    """{class name: class} of the service behaviours (imported late: `ros` tests may be skipped)."""
    from flashrt_ros.bt import behaviours as b
    return {c.__name__: c for c in (b.Snapshot, b.Restore, b.Fork, b.Rollback, b.Reset,
                                    b.SaveCapsule, b.LoadCapsule, b.DeleteCapsule, b.CapsulePresent)}


def make(kind, policy, **kw):
    """One behaviour of `kind` with a plausible request (the scripted server answers any)."""
    cls = service_behaviours()[kind]
    fields = {"Snapshot": dict(name="x"), "Restore": dict(name="x"), "Fork": dict(source="", name="x"),
              "Rollback": dict(k=1), "Reset": dict(keep_context=True), "SaveCapsule": dict(name="x"),
              "LoadCapsule": dict(name="x"), "DeleteCapsule": dict(name="x")}
    if kind == "CapsulePresent":
        return cls("home", policy=policy, **kw)
    return cls(policy=policy, **fields[kind], **kw)


def run(behaviour, node, timeout=10.0):
    """setup(node=...) once, then tick until not RUNNING; returns the status."""
    from py_trees.common import Status
    if getattr(behaviour, "node", None) is None:
        behaviour.setup(node=node)
    state = {}

    def done():
        behaviour.tick_once()
        state["status"] = behaviour.status
        return behaviour.status != Status.RUNNING
    wait_for(done, timeout, "%s to finish" % behaviour.name, interval=0.002)
    return state["status"]


def bb(key):
    import py_trees
    return py_trees.blackboard.Blackboard.get(key)


def bb_has(key):
    import py_trees
    return py_trees.blackboard.Blackboard.exists(key)


def calls():
    from flashrt_ros.bt.behaviours import CALLS_KEY
    return list(bb(CALLS_KEY))


KINDS = ["Snapshot", "Restore", "Fork", "Rollback", "Reset", "SaveCapsule", "LoadCapsule",
         "DeleteCapsule", "CapsulePresent"]


# -- each behaviour against the live node -------------------------------------------------
def _sim(ros, policy, seed=0):
    """A lockstep SimRobotNode on the test's executor, wrapped in a SimWorld."""
    from flashrt_ros.core.config import load_preset
    from flashrt_ros.sim.robot import SimRobotNode
    from flashrt_ros.bt.trees import SimWorld
    cfg = load_preset("tiny")
    robot = SimRobotNode(policy, cfg.obs_dim, cfg.action_dim, 100.0, lockstep=True, seed=seed)
    world = SimWorld(robot, seed=seed)
    ros.executor.add_node(robot)
    return world


def _close_sim(ros, world):
    world.pause()
    ros.executor.remove_node(world.robot)
    world.robot.destroy_node()


@pytest.fixture
def world(ros, policy_node):
    w = _sim(ros, policy_node)
    yield w
    _close_sim(ros, w)


def test_each_behaviour_succeeds_against_the_node(ros, policy_node, world):
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    from flashrt_ros.bt.trees import RunSimSteps
    p = dict(policy=policy_node)
    node = ros.node
    assert run(b.Reset(keep_context=True, **p), node) == Status.SUCCESS
    assert run(RunSimSteps(world, steps=3), node) == Status.SUCCESS
    assert run(b.Rollback(k=2, response_key="/t/rollback", **p), node) == Status.SUCCESS
    assert bb("/t/rollback").message.startswith("rolled back 2 step(s)")
    assert run(b.Snapshot(name="ok-a", **p), node) == Status.SUCCESS
    assert run(b.CapsulePresent("ok-a", **p), node) == Status.SUCCESS
    assert run(b.Fork(source="ok-a", name="ok-b", **p), node) == Status.SUCCESS
    assert run(b.Restore(name="ok-b", response_key="/t/restore", **p), node) == Status.SUCCESS
    assert bb("/t/restore").capsule.step == bb("/t/rollback").step
    assert run(b.SaveCapsule(name="ok-b", evict_from_memory=True, **p), node) == Status.SUCCESS
    assert run(b.LoadCapsule(name="ok-b", **p), node) == Status.SUCCESS
    for name in ("ok-a", "ok-b"):
        assert run(b.DeleteCapsule(name=name, delete_file=True, **p), node) == Status.SUCCESS
    for name in ("ok-a", "ok-b"):
        assert run(b.CapsulePresent(name, **p), node) == Status.FAILURE
    assert not bb_has(b.ERROR_KEY)           # an absent capsule is an answer, not an error
    done = calls()
    assert [c.outcome for c in done] == ["ok"] * len(done)
    assert {c.service.rsplit("/", 1)[1] for c in done} == {
        "reset", "rollback", "snapshot", "list_capsules", "fork", "restore", "save_capsule",
        "load_capsule", "delete_capsule"}
    assert all(c.round_trip_ms is not None and c.round_trip_ms > 0 for c in done)
    assert all(c.node_ms is not None for c in done if c.service.endswith(("snapshot", "restore",
                                                                           "fork", "rollback")))


REFUSALS = {  # behaviour -> (request the node refuses, words its message must contain)
    "Snapshot": (dict(name="../escape"), "expected 1-128 characters"),
    "Restore": (dict(name="nobody-made-this"), "nobody-made-this"),
    "Fork": (dict(source="nobody-made-this", name="fork-x"), "nobody-made-this"),
    "Rollback": (dict(k=100000), "rollback(100000)"),
    "SaveCapsule": (dict(name="nobody-made-this"), "nobody-made-this"),
    "LoadCapsule": (dict(name="nobody-made-this"), "no capsule file"),
    "DeleteCapsule": (dict(name="nobody-made-this"), "nobody-made-this"),
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_node_refusal_fails_with_the_reason_on_the_blackboard(kind, ros, policy_node):
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    request, words = REFUSALS[kind]
    behaviour = service_behaviours()[kind](label="under test", policy=policy_node, **request)
    assert run(behaviour, ros.node) == Status.FAILURE
    error = bb(b.ERROR_KEY)
    assert error.startswith("under test: refused: ") and words in error, error
    assert calls()[-1].outcome == "refused"


# -- refused, timeout, unreachable, halt: scripted server ---------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_refused_answer_is_failure(kind, ros, scripted):
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    scripted.settle()
    scripted.mode = "refuse"
    behaviour = make(kind, scripted.namespace)
    assert run(behaviour, ros.node) == Status.FAILURE
    assert re.search(r": refused: answer #\d+$", bb(b.ERROR_KEY))
    assert calls()[-1].outcome == "refused"


@pytest.mark.parametrize("kind", KINDS)
def test_no_answer_times_out(kind, ros, scripted):
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    scripted.settle()
    scripted.mode = "hold"
    behaviour = make(kind, scripted.namespace, timeout_s=SHORT_S)
    try:
        assert run(behaviour, ros.node) == Status.FAILURE
        assert ": timeout: " in bb(b.ERROR_KEY) and "did not answer within" in bb(b.ERROR_KEY)
        assert calls()[-1].outcome == "timeout"
        assert len(behaviour.client._pending_requests) == 0     # the request was forgotten
    finally:
        scripted.settle()


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "CapsulePresent"])
def test_lost_answer_confirmed_by_a_capsule_event_is_success(kind, ros, scripted):
    # rmw_fastrtps can drop an answer the node sent; the node's capsule event stands in for it
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    scripted.settle()
    scripted.mode = "hold-event"
    # long enough for the event to arrive on a busy machine: the answer never does anyway
    behaviour = make(kind, scripted.namespace, timeout_s=1.5, response_key="/test/answer")
    behaviour.setup(node=ros.node)
    wait_for(behaviour.capsules.events_heard, DISCOVERY_S,
             "the behaviour's capsule_events subscription to match")
    try:
        assert run(behaviour, ros.node) == Status.SUCCESS
        assert calls()[-1].outcome == "ok-by-event"
        assert re.fullmatch(r"applied #\d+", bb("/test/answer").message)
        assert not bb_has(b.ERROR_KEY)
    finally:
        scripted.settle()


@pytest.mark.parametrize("kind", ["Snapshot", "Restore", "DeleteCapsule"])
def test_an_event_for_another_capsule_does_not_confirm(kind, ros, scripted):
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    scripted.settle()
    scripted.mode, scripted.event_name = "hold-event", "some-other-capsule"
    behaviour = make(kind, scripted.namespace, timeout_s=SHORT_S)
    try:
        assert run(behaviour, ros.node) == Status.FAILURE
        assert calls()[-1].outcome == "timeout"
        assert "reported no such operation" in bb(b.ERROR_KEY)
    finally:
        scripted.settle()


@pytest.mark.parametrize("kind", KINDS)
def test_unserved_service_is_unreachable(kind, ros):
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    behaviour = make(kind, "/nobody_serves_this_%d" % os.getpid(), wait_s=SHORT_S)
    assert run(behaviour, ros.node) == Status.FAILURE
    assert ": unreachable: no service /nobody_serves_this_" in bb(b.ERROR_KEY)
    assert calls()[-1].outcome == "unreachable"


@pytest.mark.parametrize("kind", KINDS)
def test_halt_mid_call_then_a_fresh_run_ignores_the_stale_answer(kind, ros, scripted):
    from py_trees.common import Status
    scripted.settle()
    scripted.mode = "hold"
    before = len(scripted.received)
    behaviour = make(kind, scripted.namespace, response_key="/t/response")
    behaviour.setup(node=ros.node)

    def request_arrived():
        behaviour.tick_once()
        return len(scripted.received) == before + 1
    wait_for(request_arrived, DISCOVERY_S, "the first request at the scripted server")
    assert behaviour.status == Status.RUNNING
    behaviour.stop(Status.INVALID)                          # the halt
    assert calls()[-1].outcome == "halted"
    assert len(behaviour.client._pending_requests) == 0
    scripted.mode = "answer"
    scripted.release.set()                                   # the stale answer goes out now ...
    wait_for(lambda: before + 1 in scripted.answered, 10, "the stale answer to be sent")
    assert run(behaviour, ros.node) == Status.SUCCESS        # ... and is ordered before the fresh one
    assert bb("/t/response").message == "answer #%d" % (before + 2)
    assert [c.outcome for c in calls()] == ["halted", "ok"]
    scripted.settle()


def test_halt_while_waiting_for_the_service_leaves_nothing_pending(ros):
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    behaviour = b.Restore(name="x", policy="/nobody_serves_this_%d" % os.getpid())
    behaviour.setup(node=ros.node)
    behaviour.tick_once()
    assert behaviour.status == Status.RUNNING
    behaviour.stop(Status.INVALID)
    assert not bb_has(b.CALLS_KEY)                    # no request went out: nothing to record
    assert behaviour._call is None


def test_request_fields_from_the_blackboard(ros, scripted):
    import py_trees
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    scripted.settle()
    writer = py_trees.blackboard.Client(name="test")
    writer.register_key("/t/which", access=py_trees.common.Access.WRITE)
    writer.set("/t/which", "from-the-blackboard")
    behaviour = b.Restore(name=b.FromBlackboard("/t/which"), policy=scripted.namespace)
    assert run(behaviour, ros.node) == Status.SUCCESS
    assert scripted.received[-1].name == "from-the-blackboard"


def test_unknown_request_field_is_refused_at_construction():
    from flashrt_ros.bt import behaviours as b
    with pytest.raises(ValueError, match=r"unknown request field\(s\) \['nmae'\]; "
                                         r"a Restore request has \['name', 'noise_seed'\]"):
        b.Restore(nmae="home")


def test_setup_without_a_node_says_what_it_expected():
    from flashrt_ros.bt import behaviours as b
    with pytest.raises(KeyError, match="expected node=<rclpy node>"):
        b.Reset().setup()


# -- status conditions --------------------------------------------------------------------
def test_step_reached_follows_the_node(ros, policy_node, world):
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    from flashrt_ros.bt.trees import RunSimSteps
    assert run(b.Reset(keep_context=True, policy=policy_node), ros.node) == Status.SUCCESS
    start = b.StepReached(0, policy=policy_node)       # subscribed after the reset: sees its step
    assert run(start, ros.node) == Status.SUCCESS
    s0 = start.step[0]
    assert run(RunSimSteps(world, steps=4), ros.node) == Status.SUCCESS
    assert run(b.StepReached(s0 + 4, policy=policy_node), ros.node) == Status.SUCCESS
    assert run(b.StepReached(s0 + 5, policy=policy_node), ros.node) == Status.FAILURE
    assert run(b.DeadlineHealthy(10**9, policy=policy_node), ros.node) == Status.SUCCESS


def test_deadline_healthy_counts_misses_since_its_first_status(ros, scripted):
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    from flashrt_ros.msg import PolicyStatus
    healthy = b.DeadlineHealthy(2, policy=scripted.namespace)
    healthy.setup(node=ros.node)
    wait_for(lambda: scripted.status_pub.get_subscription_count() > 0, DISCOVERY_S,
             "the condition's subscription")

    def publish_until_seen(misses):
        def seen():
            scripted.status_pub.publish(PolicyStatus(deadline_misses=misses, step=misses))
            last = healthy.last_status
            return last is not None and last.deadline_misses == misses
        wait_for(seen, DISCOVERY_S, "status with %d misses" % misses, interval=0.02)

    publish_until_seen(100)                    # the baseline: misses before this tree ran
    assert run(healthy, ros.node) == Status.SUCCESS
    publish_until_seen(102)
    assert run(healthy, ros.node) == Status.SUCCESS
    publish_until_seen(103)
    assert run(healthy, ros.node) == Status.FAILURE
    assert healthy.feedback_message == "3 deadline miss(es), at most 2"


def test_conditions_without_status_fail_after_their_timeout(ros):
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    cond = b.StepReached(1, policy="/nobody_publishes_%d" % os.getpid(), status_timeout_s=SHORT_S)
    assert run(cond, ros.node) == Status.FAILURE
    assert "no status: no message on /nobody_publishes_" in bb(b.ERROR_KEY)


# -- the sim world under a spinning executor ----------------------------------------------
PAUSE_CYCLES = 2000
SWITCH_INTERVAL_S = 1e-6


def test_pausing_the_world_from_the_tick_thread_never_cancels_the_robot_timer(ros):
    """The tick thread pauses and runs the world while an executor spins the robot. A timer that
    another thread cancels while the executor holds it ready raises out of rclpy 7.1.6's executor
    (`RCLError: timer is canceled`) and kills its spin thread; rclpy 9.1 skips it silently. So
    the test records every cancel of the robot's timer from a thread other than the executor's
    (the mechanism, on any rclpy), counts the timers the executor is handed cancelled (the race
    itself, where it hits), and checks that the spin thread lives and serves (what dies on
    Jazzy). A 1 kHz timer, pauses timed to when it is due and a tiny GIL switch interval (as in
    test_executors.py) widen the window. With pause() cancelling the timer this failed 3 runs
    of 3 on the recorded cancels; the cancelled takes alone caught it in 3 runs of 3 at one
    time and in 0 of 4 at another (they depend on the machine's load)."""
    from flashrt_ros.msg import ActionChunk, Observation
    from flashrt_ros.bt.trees import SimWorld
    from flashrt_ros.ros.executors import SingleThreadedExecutor, SpinThread
    from flashrt_ros.sim.robot import SimRobotNode

    class CountsCancelledTimers(SingleThreadedExecutor):
        cancelled = 0

        def _take_timer(self, tmr):         # rclpy: the executor calls the ready timer
            if tmr.is_canceled():
                type(self).cancelled += 1
            return super()._take_timer(tmr)

    assert hasattr(SingleThreadedExecutor, "_take_timer"), "rclpy renamed the executor's timer call"
    policy = "/bt_pause_%d" % os.getpid()
    robot = SimRobotNode(policy, 4, 2, 1000.0, lockstep=True)
    world = SimWorld(robot)
    executor = CountsCancelledTimers()
    executor.add_node(robot)
    spin = SpinThread(executor)
    cancels = []                        # threads, other than the executor's, that cancelled it
    cancel = robot.timer.cancel

    def recorded_cancel():
        if threading.current_thread() is not spin:
            cancels.append(threading.current_thread().name)
        cancel()
    robot.timer.cancel = recorded_cancel
    spin.start()
    # the test's node plays the policy's topics (a lockstep robot sends once they are matched)
    observations = []
    sub = ros.node.create_subscription(Observation, policy + "/observation", observations.append, 10)
    pub = ros.node.create_publisher(ActionChunk, policy + "/action", 10)
    before = sys.getswitchinterval()
    try:
        wait_for(world.connected, DISCOVERY_S, "the robot to match the test's topics")
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            for _ in range(PAUSE_CYCLES):
                world.run(2)
                wait_for(lambda: robot.timer.time_until_next_call() <= 0, 5, "the timer to be due",
                         interval=0)
                world.pause()
                if spin.error is not None:
                    break
        finally:
            sys.setswitchinterval(before)
        assert spin.error is None, "the robot's spin thread died: %r" % spin.error
        assert not cancels, "the robot's timer was cancelled %d time(s) from thread(s) %s while " \
            "the executor spun" % (len(cancels), sorted(set(cancels)))
        assert CountsCancelledTimers.cancelled == 0, (
            "the executor was handed a timer cancelled by another thread %d time(s)"
            % CountsCancelledTimers.cancelled)
        assert not robot.timer.is_canceled()
        # still served: the robot sends its next observation (after an action for its last one)
        sent, actions = robot.sent, robot.actions
        world.run(2)

        def next_observation():
            # again until one lands: the robot's side may match our publisher after we saw the
            # match, and a message published before that is not delivered (volatile)
            if sent and robot.actions == actions:
                pub.publish(ActionChunk(horizon=1, action_dim=2, data=[0.0, 0.0]))
            return robot.sent > sent
        wait_for(next_observation, DISCOVERY_S, "the robot's next observation")
    finally:
        world.pause()
        ros.node.destroy_publisher(pub)
        ros.node.destroy_subscription(sub)
        executor.shutdown(timeout_sec=5)
        robot.destroy_node()


# -- the example trees against the node process -------------------------------------------
def _tree(root, ros):
    import py_trees
    tree = py_trees.trees.BehaviourTree(root)
    tree.setup(node=ros.node)
    return tree


def test_episode_recovers_by_rollback_after_a_failure_signal(ros, policy_node, world):
    import py_trees
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    from flashrt_ros.bt.trees import ATTEMPTS_KEY, FAILURE_SIGNAL_KEY, episode_with_recovery, run_tree
    steps, k = 30, 5
    tree = _tree(episode_with_recovery(world, policy=policy_node, episode_steps=steps, rollback_k=k,
                                       max_retries=2, max_deadline_misses=10**9), ros)
    signalled = {}

    def signal_once(tree):       # a monitor raising the failure flag mid-run, once
        if not signalled and bb(ATTEMPTS_KEY) == 1 and world.t >= 12:
            py_trees.blackboard.Blackboard.set(FAILURE_SIGNAL_KEY, True)
            signalled["at"] = world.t

    try:
        assert run_tree(tree, TREE_S, on_tick=signal_once) == Status.SUCCESS, bb(b.ERROR_KEY)
    finally:
        tree.shutdown()
    assert bb(ATTEMPTS_KEY) == 2 and world.t == steps
    ops = [(c.service.rsplit("/", 1)[1], c.outcome) for c in calls()]
    assert ("rollback", "ok") in ops and ("restore", "ok") not in ops
    # policy steps count from where reset left the policy; world steps from "start" (step 0)
    home = next(c for c in calls() if c.service.endswith("/snapshot"))
    offset = int(re.search(r"step (\d+)", home.message).group(1))
    rollback = next(c for c in calls() if c.service.endswith("/rollback"))
    back_to = int(re.search(r"to step (\d+)", rollback.message).group(1)) - offset
    assert back_to >= signalled["at"] - k                  # the in-flight step may land after the flag
    retry = [t for seg, t, _ in world.trace if seg == "attempt 2"]
    assert retry[0] == back_to + 1 and retry[-1] == steps   # policy and world went back together
    assert run(b.StepReached(offset + steps, policy=policy_node), ros.node) == Status.SUCCESS
    assert run(b.StepReached(offset + steps + 1, policy=policy_node), ros.node) == Status.FAILURE


def test_episode_gives_up_after_its_retries(ros, policy_node, world):
    from py_trees.common import Status

    from flashrt_ros.bt.behaviours import ERROR_KEY
    from flashrt_ros.bt.trees import ATTEMPTS_KEY, episode_with_recovery, run_tree
    tree = _tree(episode_with_recovery(world, policy=policy_node, episode_steps=20, max_retries=2,
                                       error_threshold=0.0), ros)     # always failing
    try:
        assert run_tree(tree, TREE_S) == Status.FAILURE
    finally:
        tree.shutdown()
    assert bb(ATTEMPTS_KEY) == 3
    assert bb(ERROR_KEY).startswith("ArmErrorBelow 0: arm error ")   # why the last attempt failed
    restores = [c for c in calls() if c.service.endswith("/restore")]
    assert [c.request for c in restores] == ["name='home'"] * 2      # nothing to roll back: home
    assert all(c.outcome == "ok" for c in restores)


def test_branch_and_choose_against_the_node_process(ros, policy_node, world):
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    from flashrt_ros.bt.trees import CHOSEN_KEY, SCORES_KEY, branch_and_choose, run_tree
    n, m, d, warmup = 3, 5, 2, 4
    tree = _tree(branch_and_choose(world, policy=policy_node, branches=n, steps=m, decisions=d,
                                   warmup=warmup, explore=0.8), ros)
    try:
        assert run_tree(tree, TREE_S) == Status.SUCCESS, bb(b.ERROR_KEY)
    finally:
        tree.shutdown()
    scores, chosen = bb(SCORES_KEY), bb(CHOSEN_KEY)
    assert len(scores) == n * d and len(chosen) == d
    for r in range(d):
        mine = {k: v for k, v in scores.items() if k.startswith("d%d-" % r)}
        assert chosen[r] == max(mine, key=mine.get)
    assert world.t == warmup + d * 2 * m
    per_op = {}
    for c in calls():
        assert c.outcome == "ok", c
        op = c.service.rsplit("/", 1)[1]
        per_op[op] = per_op.get(op, 0) + 1
    assert per_op == {"reset": 1, "fork": n * d, "restore": (n + 1) * d, "snapshot": n * d,
                      "delete_capsule": 2 * n * d}
    # the node and the world ended on the same step (policy steps count from where reset left it)
    first = next(c for c in calls() if c.service.endswith("/restore"))
    offset = int(re.search(r"step (\d+)", first.message).group(1)) - warmup
    assert run(b.StepReached(offset + world.t, policy=policy_node), ros.node) == Status.SUCCESS
    assert run(b.StepReached(offset + world.t + 1, policy=policy_node), ros.node) == Status.FAILURE


def test_branches_without_exploration_replay_exactly(ros, policy_node, world):
    """Restoring a fork (policy over DDS, world on the tree side) replays the same future bit for bit."""
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    from flashrt_ros.bt.trees import SCORES_KEY, branch_and_choose, run_tree
    tree = _tree(branch_and_choose(world, policy=policy_node, branches=3, steps=6, decisions=1,
                                   warmup=3, explore=0.0), ros)
    try:
        assert run_tree(tree, TREE_S) == Status.SUCCESS, bb(b.ERROR_KEY)
    finally:
        tree.shutdown()
    traces = [[e for seg, _, e in world.trace if seg == "d0-b%d" % i] for i in range(3)]
    assert len(traces[0]) == 6 and traces[0] == traces[1] == traces[2]
    assert len(set(bb(SCORES_KEY).values())) == 1


# -- the demo -----------------------------------------------------------------------------
def test_bt_demo_prints_its_report_and_writes_its_plot(ros_env, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "flashrt_ros.cli", "bt-demo", "--branches", "2",
                           "--steps", "4", "--decisions", "2", "--warmup", "3", "--out", str(out),
                           "--node-name", "bt_demo_%d" % os.getpid(), "--timeout", "90"],
                          env=dict(ros_env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "[bt-demo] tree SUCCESS" in text
    assert "decision 0 at step 3:" in text and "decision 1 at step 11:" in text
    assert text.count("<- chosen") == 2
    assert re.search(r"fork\s+4\s", text) and re.search(r"restore\s+6\s", text)
    png = out / "bt_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (out / "report.txt").read_text().strip() == text[text.index("[bt-demo] tree"):].strip()


# -- the BehaviorTree.CPP example ---------------------------------------------------------
XML = os.path.join(ROOT, "docs", "bt", "flashrt_capsules.xml")
XML_SERVICE_NODES = {  # BT.CPP node ID -> flashrt_ros srv type
    "SnapshotCapsule": "Snapshot", "RestoreCapsule": "Restore", "ForkCapsule": "Fork",
    "RollbackSteps": "Rollback", "ResetPolicy": "Reset", "SaveCapsule": "SaveCapsule",
    "LoadCapsule": "LoadCapsule", "DeleteCapsule": "DeleteCapsule", "CapsulePresent": "ListCapsules",
}


def _port(field):
    return "capsule_name" if field == "name" else field    # `name` is the instance name in BT.CPP


def test_bt_cpp_xml_declares_the_srv_request_fields_as_ports():
    import flashrt_ros.srv as srv
    root = ET.parse(XML).getroot()
    assert root.get("BTCPP_format") == "4"
    model = {e.get("ID"): e for e in root.find("TreeNodesModel")}
    for node_id, type_name in XML_SERVICE_NODES.items():
        srv_type = getattr(srv, type_name)
        inputs = {p.get("name") for p in model[node_id].findall("input_port")}
        outputs = {p.get("name") for p in model[node_id].findall("output_port")}
        expected = {_port(f) for f in srv_type.Request.get_fields_and_field_types()} | {"service_name"}
        if node_id == "CapsulePresent":
            expected |= {"capsule_name"}            # the name it looks for in the list
        assert inputs == expected, node_id
        assert outputs <= set(srv_type.Response.get_fields_and_field_types()), node_id
    # every node used in the trees is declared (or built in), with declared ports only
    builtin = {"Sequence", "Fallback", "ReactiveSequence", "RetryUntilSuccessful", "ForceFailure",
               "Inverter", "Script", "ScriptCondition", "SubTree", "Timeout", "KeepRunningUntilFailure",
               "Delay"}
    for tree in root.findall("BehaviorTree"):
        for e in tree.iter():
            if e is tree:
                continue
            assert e.tag in builtin or e.tag in model, e.tag
            if e.tag in model:
                declared = {p.get("name") for p in model[e.tag]}
                assert set(e.attrib) - {"name"} <= declared, (e.tag, e.attrib)
            if e.tag in XML_SERVICE_NODES:
                service = e.get("service_name", "")
                op = {"SnapshotCapsule": "snapshot", "RestoreCapsule": "restore", "ForkCapsule": "fork",
                      "RollbackSteps": "rollback", "ResetPolicy": "reset", "SaveCapsule": "save_capsule",
                      "LoadCapsule": "load_capsule", "DeleteCapsule": "delete_capsule",
                      "CapsulePresent": "list_capsules"}[e.tag]
                assert service == "/flashrt_policy/" + op, (e.tag, service)
