"""The policy node in this process: its real executor (PolicyExecutor) in a thread, driven over DDS.

Lifecycle transitions and parameters go through the node's own services (ChangeState,
GetState, SetParameters, ListParameters, DescribeParameters), as `ros2 lifecycle` / `ros2 param`
would use them. The ROS-free pieces the node serves with (deadline accounting, the BoundaryLock,
the warm-up) are tested in test_serving.py.
"""
import os
import threading

import numpy as np
import pytest

from flashrt_ros.ros.stamps import stamp_to_s
from flashrt_ros.ros.waiting import wait_for
from node_client import chunk_bytes, make_node, observations, ros_context  # noqa: F401 - fixtures

pytestmark = pytest.mark.ros

OBS = observations(16, seed=2)


def test_lifecycle_transitions_through_the_services(make_node):
    n = make_node(control_mode="observation", observation_qos="reliable", status_rate_hz=20.0)
    c = n.client
    assert c.state() == "unconfigured" and n.node.runtime is None
    assert c.transition("configure")
    assert c.state() == "inactive" and n.node.runtime is not None
    assert c.transition("activate")
    assert c.state() == "active"
    c.wait_connected()
    first = c.step(OBS[0])
    assert first.step == 1

    assert c.transition("deactivate")
    assert c.state() == "inactive"
    c.publish(OBS[1])                  # not stepped: the node is inactive
    res = c.capsule("snapshot", name="while-inactive")   # capsule services keep working
    assert res.success and res.capsule.step == 1
    assert c.transition("activate")
    assert c.step(OBS[2]).step == 2    # the observation sent while inactive never stepped

    assert c.transition("deactivate") and c.transition("cleanup")
    assert c.state() == "unconfigured" and n.node.runtime is None
    res = c.capsule("list_capsules")
    assert not res.success and "configure" in res.message
    assert c.transition("configure") and c.state() == "inactive"
    assert c.capsule("list_capsules").capsules == []      # memory capsules went with cleanup
    assert c.transition("cleanup") and c.transition("shutdown")
    assert c.state() == "finalized"


def test_parameters_are_declared_from_the_table(make_node):
    from rcl_interfaces.srv import DescribeParameters, ListParameters

    from flashrt_ros.ros.params import parameter_table
    n = make_node()
    table = {name: (default, help_text, fixed) for name, default, help_text, fixed, _ in parameter_table()}
    listed = n.client.call(ListParameters, "list_parameters").result.names
    assert set(table) <= set(listed)
    descs = n.client.call(DescribeParameters, "describe_parameters", names=list(table)).descriptors
    for d in descs:
        default, help_text, fixed = table[d.name]
        assert d.description.startswith(help_text)
        assert ("[fixed while configured]" in d.description) == fixed
    values = n.client.get_parameters([k for k, v in table.items() if v[0] != []])
    for name, value in values.items():
        expected = table[name][0]
        expected = "cpu" if name == "runtime.device" else expected
        expected = n.node.get_parameter(name).value if name == "store.capsule_dir" else expected
        assert value == expected, name


def test_descriptors_show_the_ranges_and_choices_the_node_enforces(make_node):
    """What `ros2 param describe` shows: the range (FloatingPointRange / IntegerRange) and the
    choices, before a set fails."""
    from rcl_interfaces.srv import DescribeParameters
    n = make_node()
    names = ["control_rate_hz", "nice", "store.eviction", "runtime.rollback_depth"]
    d = {x.name: x for x in n.client.call(DescribeParameters, "describe_parameters",
                                          names=names).descriptors}
    rate = d["control_rate_hz"].floating_point_range[0]
    assert (rate.from_value, rate.to_value) == (0.0, 1000.0)
    assert "above 0" in d["control_rate_hz"].additional_constraints
    nice = d["nice"].integer_range[0]
    assert (nice.from_value, nice.to_value) == (-20, 19)
    assert d["store.eviction"].additional_constraints == "one of: demote, drop"
    assert d["runtime.rollback_depth"].integer_range[0].to_value == 4096
    ok, reason = n.client.set_parameter("control_rate_hz", 5000.0)     # unconfigured too
    assert not ok and "out of range" in reason, reason


def test_a_set_of_an_unknown_parameter_names_the_closest_one(make_node):
    n = make_node()
    ok, reason = n.client.set_parameter("runtime.devcie", "cuda")
    assert not ok and "runtime.devcie (did you mean runtime.device?)" in reason, reason
    ok, reason = n.client.set_parameter("typo", 1)
    assert not ok and "typo" in reason and "ros2 param list" in reason, reason
    assert n.client.get_parameters(["runtime.device"]) == {"runtime.device": "cpu"}
    assert not n.node.has_parameter("typo")


@pytest.mark.parametrize("name, value, says", [
    ("runtime.devcie", "cuda", "runtime.devcie (did you mean runtime.device?)"),
    ("typo_param", 1, "typo_param (no declared parameter has a similar name)"),
])
def test_an_unknown_parameter_in_the_overrides_is_refused_at_configure(make_node, capfd, name,
                                                                       value, says):
    n = make_node(**{name: value})
    wait_for(lambda: says in capfd.readouterr().err, 10, "the unknown parameter in the log")
    assert not n.client.transition("configure")
    assert n.client.state() == "unconfigured" and n.node.runtime is None


@pytest.mark.parametrize("name, bad, good, says", [
    ("control_rate_hz", 5000.0, 30.0, "control_rate_hz: expected a rate in (0, 1000] Hz"),
    ("nice", 99, 0, "nice: expected an integer in [-20, 19]"),
    ("managed", 3, True, "managed: expected true or false"),
])
def test_an_override_the_descriptor_refuses_leaves_the_node_alive(make_node, capfd, name, bad,
                                                                  good, says):
    n = make_node(**{name: bad})            # out of range, or of the wrong type
    c = n.client
    assert not c.transition("configure")
    err = []
    wait_for(lambda: err.append(capfd.readouterr().err) or says in "".join(err), 10,
             f"the log line {says!r}")
    assert c.set_parameter(name, good)[0]
    assert c.transition("configure")


def test_fixed_parameters_refuse_changes_while_configured(make_node):
    n = make_node()
    c = n.client
    assert c.set_parameter("control_rate_hz", 50.0)[0]          # unconfigured: anything goes
    assert c.transition("configure")
    ok, reason = c.set_parameter("control_rate_hz", 10.0)
    assert not ok and "fixed" in reason and "cleanup" in reason
    assert not c.set_parameter("model", "hybrid-0.8b")[0]
    assert c.get_parameters(["control_rate_hz"])["control_rate_hz"] == 50.0
    assert n.node.node_cfg.control_rate_hz == 50.0
    # a parameter that may change is validated when set, and applies at once
    ok, reason = c.set_parameter("stale_observation_s", -1.0)        # its descriptor's range
    assert not ok and "stale_observation_s out of range" in reason, reason
    assert c.set_parameter("stale_observation_s", 0.25)[0]
    assert n.node.node_cfg.stale_observation_s == 0.25
    ok, reason = c.set_parameter("store.default_tier", "tape")
    assert not ok and "store.default_tier" in reason
    assert c.set_parameter("store.default_tier", "disk")[0]
    assert n.node.store.cfg.default_tier == "disk"
    assert c.transition("cleanup")
    assert c.set_parameter("control_rate_hz", 10.0)[0]
    assert c.transition("configure")
    assert n.node.node_cfg.control_rate_hz == 10.0


@pytest.mark.parametrize("name, bad, good, says", [
    ("control_mode", "bogus", "observation", "control_mode: expected timer or observation, found 'bogus'"),
    ("model", "../x", "tiny", "model: expected a checkpoint directory, found no directory"),
    ("model", "nosuch", "tiny", "preset: no preset named 'nosuch'"),
    ("store.default_tier", "tape", "host", "store.default_tier: expected auto, gpu, host or disk, found 'tape'"),
    ("control_rate_hz", "fast", 20.0, "control_rate_hz: expected a number, found 'fast'"),
    ("joint_names", ["a", "b", "c"], ["j%d" % i for i in range(7)], "joint_names: expected obs_dim (14)"),
])
def test_invalid_values_fail_configure_and_the_node_recovers(make_node, capfd, name, bad, good, says):
    n = make_node(**{name: bad})
    c = n.client
    assert not c.transition("configure")
    err = []

    def logged():
        err.append(capfd.readouterr().err)
        return says in "".join(err)
    wait_for(logged, 10, f"the log line {says!r}")
    assert "configure failed" in "".join(err)
    assert c.state() == "unconfigured" and n.node.runtime is None
    assert not c.capsule("snapshot", name="x").success                # still answers
    assert c.set_parameter(name, good)[0]
    assert c.transition("configure")
    assert c.state() == "inactive"
    assert c.capsule("snapshot", name="x").success


def test_delete_of_a_capsule_the_store_spilled_to_disk_deletes_it_whole(make_node, tmp_path):
    """A capsule the store demoted to disk to make room was never saved: delete_capsule with its
    defaults deletes it and its file. A saved capsule keeps its file (docs/node.md)."""
    n = make_node(**{"store.host_budget_mb": 0.1, "store.capsule_dir": str(tmp_path / "caps")})
    c = n.client
    assert c.transition("configure")
    assert c.capsule("snapshot", name="kept").success
    assert c.capsule("save", name="kept").success
    i = 0
    while n.node.store.get("kept").tier != "disk" or "spill0" not in n.node.store.capsules or \
            n.node.store.get("spill0").tier != "disk":
        assert c.capsule("snapshot", name=f"spill{i}").success
        i += 1
        assert i < 64, "the 0.1 MiB host tier never evicted"
    spill = tmp_path / "caps" / "spill0.capsule"
    assert spill.is_file()
    files = {i.name: (i.tier, i.file) for i in c.capsule("list").capsules}
    assert files["spill0"] == ("disk", "spill") and files["kept"] == ("disk", "saved"), files
    assert files[f"spill{i - 1}"] == ("host", ""), files
    res = c.capsule("delete", name="spill0")
    assert res.success and "spilled" in res.message, res.message
    assert not spill.exists() and "spill0" not in n.node.store.capsules
    res = c.capsule("delete", name="kept")                          # saved: refused, file kept
    assert not res.success and "delete_file: true" in res.message
    assert (tmp_path / "caps" / "kept.capsule").is_file()


def test_joint_trajectory_output(make_node):
    from sensor_msgs.msg import JointState
    from trajectory_msgs.msg import JointTrajectory
    joints = [f"j{i}" for i in range(7)]
    n = make_node(control_mode="observation", observation_qos="reliable", joint_names=joints,
                  command_output="joint_trajectory", action_dt=0.1, managed=False)
    c = n.client
    assert c.transition("configure") and c.transition("activate")
    trajectories = c.collect(JointTrajectory, f"{c.target}/joint_trajectory")
    pub = c.publisher(JointState, f"{c.target.rsplit('/', 1)[0]}/joint_states")
    wait_for(lambda: (pub.get_subscription_count() > 0 and c.matched(c.subs[-1])
                      and c.matched(c.subs[0])),
             15, "joint_states subscription, trajectory and action publishers")
    pub.publish(JointState(name=joints, position=[0.1] * 7, velocity=[0.0] * 7))
    wait_for(lambda: trajectories and c.actions, 15, "a JointTrajectory and an action")
    traj, action = trajectories[0], c.actions[0]
    chunk = np.asarray(action.data, np.float32).reshape(action.horizon, action.action_dim)
    assert traj.joint_names == joints and len(traj.points) == action.horizon
    for i, p in enumerate(traj.points):
        assert list(p.positions) == chunk[i].astype(np.float64).tolist()
        t = stamp_to_s(p.time_from_start)
        assert abs(t - 0.1 * (i + 1)) < 1e-6


def test_timer_mode_steps_every_tick_on_the_latest_observation(make_node):
    n = make_node(control_rate_hz=50.0, observation_qos="reliable", status_rate_hz=20.0,
                  instruction="stack the blocks")
    c = n.client
    assert c.transition("configure") and c.transition("activate")
    c.wait_connected()
    c.publish(OBS[0])                  # one observation: stepped on every tick while fresh
    wait_for(lambda: len(c.actions) >= 10, 15, "10 actions from the timer")
    steps = [a.step for a in c.actions[:10]]
    assert steps == list(range(steps[0], steps[0] + 10))
    assert len({chunk_bytes(a) for a in c.actions[:10]}) > 1      # the state moves on
    dl = n.node.deadlines
    assert dl.ticks >= 10 and dl.misses == dl.late + dl.skipped
    assert c.set_parameter("stale_observation_s", 0.05)[0]      # now the observation goes stale
    wait_for(lambda: n.node._stale > 0, 15, "a stale tick")
    stepped = n.node.runtime.step_count
    wait_for(lambda: n.node._stale > 3, 15, "more stale ticks")
    assert n.node.runtime.step_count == stepped


def test_nice_applies_to_every_thread_until_cleanup(make_node):
    before = os.getpriority(os.PRIO_PROCESS, 0)
    n = make_node(nice=before - 1)
    c = n.client
    if not c.transition("configure"):           # no CAP_SYS_NICE here: a clear refusal
        assert n.node.runtime is None and c.state() == "unconfigured"
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in tids} == {before - 1}
    finally:
        assert c.transition("cleanup")
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    assert {os.getpriority(os.PRIO_PROCESS, t) for t in tids} == {before}


def test_policy_executor_does_not_spin_while_a_callback_waits_to_start(ros_context):
    """rclpy < 10.0.4 re-yields queued tasks and spins (ros2/rclpy#1452); PolicyExecutor does not."""
    import rclpy
    from rclpy.qos import QoSProfile, QoSReliabilityPolicy
    from std_msgs.msg import Float64

    from flashrt_ros.ros.executors import PolicyExecutor
    node = rclpy.create_node(f"executor_probe_{os.getpid()}", context=ros_context)
    executor = PolicyExecutor(num_threads=4, context=ros_context)
    executor.add_node(node)
    loops, got = [0], threading.Event()
    wait = executor.wait_for_ready_callbacks

    def counted(*args, **kwargs):
        loops[0] += 1
        return wait(*args, **kwargs)
    executor.wait_for_ready_callbacks = counted
    qos = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
    topic = f"/executor_probe_{os.getpid()}"
    node.create_subscription(Float64, topic, lambda m: got.set(), qos)
    pub = node.create_publisher(Float64, topic, qos)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        wait_for(lambda: pub.get_subscription_count() > 0, 10, "the probe subscription")
        before = loops[0]
        for _ in range(50):
            got.clear()
            pub.publish(Float64(data=1.0))
            assert got.wait(10)
        # a handful of wake-ups per message, not thousands of loops while the worker waits for the GIL
        assert loops[0] - before < 50 * 10, loops[0] - before
    finally:
        executor.shutdown(timeout_sec=5)
        spinner.join(timeout=5)
        node.destroy_node()


def test_the_node_serves_a_checkpoint_directory_written_by_transformers(make_node, tmp_path):
    """model:=<dir> of transformers' save_pretrained (no policy files: seeded heads): the node's
    actions equal a runtime built here from the same directory, byte for byte."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the checkpoint")
    import torch

    from flashrt_ros.core.config import RuntimeConfig
    from flashrt_ros.core.runtime import PolicyRuntime
    torch.manual_seed(0)
    cfg = transformers.Qwen3_5TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8)
    directory = str(tmp_path / "qwen3_5")
    transformers.Qwen3_5ForCausalLM(cfg).save_pretrained(directory)
    n = make_node(model=directory, control_mode="observation", observation_qos="reliable")
    c = n.client
    assert c.transition("configure") and c.transition("activate")
    assert n.node.runtime.model.untrained == ("heads",)
    c.wait_connected()
    served = [chunk_bytes(c.step(o)) for o in OBS[:4]]
    torch.set_num_threads(1)                      # as the node pins a model this small
    here = PolicyRuntime.from_pretrained(directory, RuntimeConfig(device="cpu"))
    assert served == [here.step(o).astype(np.float32).tobytes() for o in OBS[:4]]


def test_a_refused_observation_applies_nothing(make_node):
    """NaN or wrong-length observations asking for a new episode: refused, and neither the reset
    nor anything else is applied; the node steps on the next good observation."""
    import torch
    n = make_node(control_mode="observation", observation_qos="reliable")
    c = n.client
    assert c.transition("configure") and c.transition("activate")
    c.wait_connected()
    c.run(OBS[:2])
    rt = n.node.runtime
    before, step, episode = rt.live_state().clone(), rt.step_count, rt.episode
    rejected = n.node._rejected
    nan = OBS[2].copy()
    nan[3] = np.nan
    c.publish(nan, reset=True)
    c.publish(OBS[2][:5], reset=True)
    wait_for(lambda: n.node._rejected >= rejected + 2, 15, "two refusals")
    assert "reset_episode was not applied" in n.node._last_error
    assert (rt.step_count, rt.episode) == (step, episode)
    assert torch.equal(rt.live_state(), before)
    assert c.step(OBS[2]).step == step + 1


def test_an_observation_stamped_in_the_future_never_stops_control(make_node):
    """One observation stamped an hour ahead is refused; it does not become the ordering
    reference, so the correctly stamped ones after it are stepped."""
    from flashrt_ros.msg import Observation
    from flashrt_ros.ros.stamps import ns_to_stamp
    n = make_node(control_mode="observation", observation_qos="reliable")
    c = n.client
    assert c.transition("configure") and c.transition("activate")
    c.wait_connected()
    msg = Observation(state=[float(x) for x in OBS[0]])
    msg.header.stamp = ns_to_stamp(n.node.get_clock().now().nanoseconds + 3600 * 10**9)
    rejected = n.node._rejected
    c.pub_obs.publish(msg)
    wait_for(lambda: n.node._rejected > rejected, 15, "the refusal")
    assert "ahead of the node's clock" in n.node._last_error
    assert [c.step(o).step for o in OBS[1:4]] == [1, 2, 3]
