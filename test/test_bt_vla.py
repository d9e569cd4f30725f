"""Branching a VLA: noise seeds through the capsule services, and branch_and_choose over them.

The smolvla-tiny preset (config/presets/smolvla-tiny: camera `top` 96x96, 2 joints) served by an
in-process PolicyNode on the CPU, driven over DDS on loopback:
  * Restore, Fork (switch_to) and Reset with `noise_seed` restart the sampler: the same seed from
    the same state gives the same chunk byte for byte, another seed another chunk, -1 keeps the
    capsule's sampler; a request the node refuses changes nothing;
  * a Qwen policy that samples no noise refuses a seed; one with runtime.action_noise > 0 takes it
    (the core, without ROS);
  * branch_and_choose(vary="seed") against the simulated arm with its camera: the branches'
    chunks differ, the tree picks the best score, logs it, and the live state after the choice is
    the chosen branch's end, byte for byte;
  * the XML's BranchAndChooseVLA in BehaviorTree.CPP (where behaviortreepy is installed).
Waits poll with deadlines (flashrt_ros.ros.waiting.wait_for); nothing sleeps a fixed time.
"""
import os
import re

import numpy as np
import pytest

from flashrt_ros.ros.waiting import wait_for
from node_client import InProcessNode, chunk_bytes, ros_context  # noqa: F401 - fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smolvla-tiny"
TREE_S = 180


def _node(ros_context, tmp_path_factory, namespace, **params):
    params.setdefault("store.capsule_dir", str(tmp_path_factory.mktemp("capsules")))
    n = InProcessNode(ros_context, f"/{namespace}_{os.getpid()}", **{"runtime.device": "cpu",
                                                                    **params})
    assert n.client.transition("configure") and n.client.transition("activate")
    return n


@pytest.fixture(scope="module")
def vla(ros_context, tmp_path_factory):
    """The smolvla-tiny node in lockstep (one chunk per joint state + frame), reliable inputs."""
    from flashrt_ros.sim.imitation_vla import TASK
    from flashrt_ros.sim.robot import joint_names
    n = _node(ros_context, tmp_path_factory, "vla", model=MODEL, control_mode="observation",
              observation_qos="reliable", joint_names=joint_names(2), instruction=TASK,
              stale_observation_s=0.0, status_rate_hz=20.0)
    yield n
    n.close()


class Rig:
    """Publishes one fixed joint state and frame (stamped alike) per step; returns its chunk."""

    def __init__(self, n):
        from sensor_msgs.msg import Image, JointState

        from flashrt_ros.inputs.images import to_image_msg_fields
        from flashrt_ros.sim.camera import ArmCamera
        from flashrt_ros.sim.robot import joint_names, joint_states_topic
        c = self.c = n.client
        self.joints = c.publisher(JointState, joint_states_topic(c.target))
        self.image = c.publisher(Image, f"{c.target}/images/top")
        wait_for(lambda: self.joints.get_subscription_count() and self.image.get_subscription_count()
                 and c.statuses, 15, "the node's joint-state and camera subscriptions")
        q, target = np.array([0.3, -0.2]), np.array([-0.5, 0.6])
        h, w, enc, step, data = to_image_msg_fields(ArmCamera(width=96, height=96).render(q, target))
        self.frame = dict(height=h, width=w, encoding=enc, step=step, data=data)
        self.state = JointState(name=joint_names(2), position=[float(x) for x in q])
        self.Image = Image

    def chunk(self) -> bytes:
        """One step on the fixed observation: its action chunk's bytes."""
        c, count = self.c, len(self.c.actions)
        stamp = c.node.get_clock().now().to_msg()
        image = self.Image(**self.frame)
        image.header.stamp = self.state.header.stamp = stamp
        self.image.publish(image)
        self.joints.publish(self.state)
        wait_for(lambda: len(c.actions) > count, 30, "the chunk of the observation")
        action = c.actions[count]
        assert action.observation_stamp == stamp, "an action answered another observation"
        return chunk_bytes(action)


def ok(response):
    assert response.success, response.message
    return response


pytestmark = pytest.mark.ros


def test_noise_seeds_through_the_services_restart_the_vla_sampler(vla):
    c, rig = vla.client, Rig(vla)
    rig.chunk()                                                  # the live sampler has moved on
    ok(c.capsule("snapshot", name="root"))
    m = ok(c.capsule("fork", source="", name="seven", switch_to=True, noise_seed=7)).message
    assert "seed 7" in m
    seven = rig.chunk()
    ok(c.capsule("restore", name="root", noise_seed=7))
    assert rig.chunk() == seven                                  # the same seed: the same chunk
    ok(c.capsule("restore", name="root", noise_seed=8))
    eight = rig.chunk()
    assert eight != seven                                        # another seed: another chunk
    ok(c.capsule("restore", name="root"))                        # -1: the capsule's sampler
    kept = rig.chunk()
    ok(c.capsule("restore", name="root", noise_seed=-1))
    assert rig.chunk() == kept and kept not in (seven, eight)
    ok(c.capsule("restore", name="seven"))                       # a fork keeps its source's sampler
    assert rig.chunk() == kept
    assert ok(c.capsule("reset", keep_context=True, noise_seed=7)).message.endswith("seed 7")
    assert rig.chunk() == seven                                  # a seeded episode
    # events record the seed, so a bag replays the call as it was made
    wait_for(lambda: sum(e.operation == "reset" for e in c.events) >= 1, 15, "the reset event")
    seeded = [(e.operation, e.noise_seed) for e in c.events
              if e.operation in ("fork", "restore", "reset")]
    assert seeded == [("fork", 7), ("restore", 7), ("restore", 8), ("restore", -1),
                      ("restore", -1), ("restore", -1), ("reset", 7)]

    # refusals change nothing: live at root with seed 7, then each bad request, then the chunk
    ok(c.capsule("restore", name="root", noise_seed=7))
    before = [x.name for x in c.capsule("list").capsules]
    for op, fields, why in [
            ("fork", dict(source="", name="x", noise_seed=3), "expected switch_to: true"),
            ("fork", dict(source="root", name="x", noise_seed=3), "expected switch_to: true"),
            ("restore", dict(name="root", noise_seed=1 << 32), "found 4294967296"),
            ("restore", dict(name="absent", noise_seed=3), "absent"),
            ("reset", dict(keep_context=True, noise_seed=-2), "expected -1"),
            ("fork", dict(source="", name="root", switch_to=True, noise_seed=3), "root")]:
        r = c.capsule(op, **fields)
        assert not r.success and why in r.message, (op, fields, r.message)
    assert [x.name for x in c.capsule("list").capsules] == before
    assert rig.chunk() == seven
    for name in before:
        ok(c.capsule("delete", name=name))


def test_a_policy_without_noise_refuses_a_seed_and_changes_nothing(ros_context, tmp_path_factory):
    n = _node(ros_context, tmp_path_factory, "qwen", control_mode="observation",
              observation_qos="reliable")
    try:
        c = n.client
        c.wait_connected()
        first = c.step(np.zeros(n.node.runtime.model_cfg.obs_dim))
        ok(c.capsule("snapshot", name="root"))
        for op, fields in [("restore", dict(name="root", noise_seed=5)),
                           ("fork", dict(source="", name="b", switch_to=True, noise_seed=5)),
                           ("reset", dict(keep_context=True, noise_seed=5))]:
            r = c.capsule(op, **fields)
            assert not r.success and "samples no action noise" in r.message, r.message
            assert "runtime.action_noise" in r.message
        assert [x.name for x in c.capsule("list").capsules] == ["root"]
        assert n.node.runtime.step_count == 1 and n.node.store.lineage == ""
        # the state went on as if nothing was asked: a restore of root steps as the first did
        second = c.step(np.zeros(n.node.runtime.model_cfg.obs_dim))
        ok(c.capsule("restore", name="root"))
        assert chunk_bytes(c.step(np.zeros(n.node.runtime.model_cfg.obs_dim))) == \
            chunk_bytes(second)
        assert first.step < second.step
    finally:
        n.close()


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_a_qwen_policy_takes_a_seed_for_its_action_noise_sampler(noise):
    from flashrt_ros.core.config import RuntimeConfig
    from flashrt_ros.core.exceptions import InputError
    from flashrt_ros.core.runtime import PolicyRuntime
    rt = PolicyRuntime.from_pretrained("tiny", RuntimeConfig(device="cpu", action_noise=noise))
    obs = np.linspace(-1, 1, rt.model_cfg.obs_dim, dtype=np.float32)
    rt.step(obs)
    base = rt.live_state().clone()
    if noise == 0.0:
        with pytest.raises(InputError, match=r"samples no action noise \(runtime.action_noise is 0\)"):
            rt.seed_noise(5)
        assert rt.live_state().equal(base)
        return
    for bad in (-1, 1 << 32, 2.0, True):
        with pytest.raises(InputError, match=r"expected an integer in \[0, 2\^32\)"):
            rt.seed_noise(bad)
    assert rt.live_state().equal(base)
    rt.seed_noise(5)
    five = rt.step(obs)
    rt.restore_state(base)
    rt.seed_noise(5)
    assert np.array_equal(rt.step(obs), five)
    rt.restore_state(base)
    rt.seed_noise(6)
    assert not np.allclose(rt.step(obs), five)


# -- the branch-and-choose tree over the simulated arm with its camera --------------------
class Sim:
    """The lockstep robot with a camera (a SimWorld) and the tree's node, spun in this context."""

    def __init__(self, ros_context, policy):
        import rclpy

        from flashrt_ros.bt.trees import SimWorld
        from flashrt_ros.ros.executors import MultiThreadedExecutor, SpinThread
        from flashrt_ros.sim.robot import CameraFeed, SimRobotNode
        robot = SimRobotNode(policy, obs_dim=2, action_dim=2, rate_hz=50.0, lockstep=True,
                             context=ros_context, camera=CameraFeed("top", 96, 96, 50.0))
        self.world = SimWorld(robot, seed=3)
        self.node = rclpy.create_node(f"bt_vla_tree_{os.getpid()}", context=ros_context)
        self.executor = MultiThreadedExecutor(num_threads=3, context=ros_context)
        for node in (robot, self.node):
            self.executor.add_node(node)
        self.spin = SpinThread(self.executor)
        self.spin.start()

    def close(self):
        self.world.pause()
        self.executor.shutdown(timeout_sec=5)
        self.spin.join(timeout=5)
        self.world.robot.destroy_node()
        self.node.destroy_node()


@pytest.fixture
def sim(ros_context, vla):
    import py_trees
    py_trees.blackboard.Blackboard.clear()
    s = Sim(ros_context, vla.client.target)
    yield s
    s.close()


def test_branch_and_choose_branches_a_vla_by_noise_seed(vla, sim):
    import py_trees
    from py_trees.common import Status

    from flashrt_ros.bt import behaviours as b
    from flashrt_ros.bt.trees import (BEST_END_KEY, CHOSEN_KEY, SCORES_KEY, SEEDS_KEY,
                                      branch_and_choose, run_tree)
    c, store, world = vla.client, vla.node.store, sim.world
    n, m, warmup = 3, 4, 2
    ends = {}

    def keep_ends(tree):        # each branch's end capsule, while it exists (the tree deletes it)
        for name in list(store.capsules):
            if name.endswith("-end") and name not in ends:
                ends[name] = store.capsule_bytes(name)

    logged = []
    tree = py_trees.trees.BehaviourTree(branch_and_choose(
        world, policy=c.target, branches=n, steps=m, decisions=1, warmup=warmup,
        continue_steps=0, vary="seed", seed=11))
    tree.setup(node=sim.node)
    chooser = next(x for x in tree.root.iterate() if x.name == "ChooseBest d0")
    chooser.log = logged.append                  # the node's logger, as a list
    start = len(c.actions)
    try:
        assert run_tree(tree, TREE_S, on_tick=keep_ends) == Status.SUCCESS, \
            py_trees.blackboard.Blackboard.get(b.ERROR_KEY)
    finally:
        tree.shutdown()
    sim.spin.check()
    bb = py_trees.blackboard.Blackboard.get
    labels = [f"d0-b{i}" for i in range(n)]
    seeds, scores, chosen = bb(SEEDS_KEY), bb(SCORES_KEY), bb(CHOSEN_KEY)
    assert seeds["d0-b0"] == -1 and len({seeds[x] for x in labels}) == n   # b0: the live sampler
    restores = [x.request for x in bb(b.CALLS_KEY) if x.service.endswith("/restore")]
    assert restores[:n] == [f"name={x!r}, noise_seed={seeds[x]}" for x in labels]
    # the branches start from one state and one world: their chunks differ by the seed alone
    wait_for(lambda: len(c.actions) >= start + warmup + n * m, 15, "every branch's chunks")
    firsts = [chunk_bytes(c.actions[start + warmup + i * m]) for i in range(n)]
    assert len(set(firsts)) == n
    traces = [[e for seg, _, e in world.trace if seg == x] for x in labels]
    assert all(len(t) == m for t in traces) and traces[0] != traces[1] != traces[2]
    # the best score is chosen, logged, and the live state is that branch's end
    assert chosen == [max(labels, key=scores.get)] and bb(BEST_END_KEY) == f"{chosen[0]}-end"
    assert len(logged) == 1 and f"{chosen[0]} {scores[chosen[0]]:.4f}" in logged[0]
    assert re.search(rf"{chosen[0]} \S+ (\(live sampler\)|\(seed \d+\)) <- chosen", logged[0])
    assert sorted(ends) == [f"{x}-end" for x in labels] and not store.capsules
    ok(c.capsule("snapshot", name="after"))
    assert store.capsule_bytes("after").equal(ends[f"{chosen[0]}-end"])
    assert not any(store.capsule_bytes("after").equal(ends[f"{x}-end"])
                   for x in labels if x != chosen[0])
    ok(c.capsule("delete", name="after"))


def test_branch_and_choose_refuses_an_unknown_way_to_vary(sim):
    from flashrt_ros.bt.trees import branch_and_choose
    with pytest.raises(ValueError, match=r"expected vary in \('command', 'seed'\).*found 'noise'"):
        branch_and_choose(sim.world, vary="noise")


def test_btcpp_branch_and_choose_vla(vla, sim):
    pytest.importorskip("behaviortreepy", reason="BehaviorTree.CPP's Python bindings are not installed")
    import json

    import behaviortreepy as btcpp

    from flashrt_ros.bt.btcpp import SimApplication, XmlTrees, run
    c, store = vla.client, vla.node.store
    app = SimApplication(sim.world, explore=0.0)
    trees = XmlTrees(os.path.join(ROOT, "docs", "bt", "flashrt_capsules.xml"), policy=c.target,
                     application=app)
    trees.setup(sim.node)
    logged = []
    trees.log = logged.append
    restored = sum(e.operation == "restore" for e in c.events)
    try:
        tree = trees.create_tree("BranchAndChooseVLA")
        assert run(tree, TREE_S) == btcpp.NodeStatus.SUCCESS, trees.errors
        scores = json.loads(tree.root_blackboard().get_string("scores"))
        best = tree.root_blackboard().get_string("best")
    finally:
        trees.shutdown()
    sim.spin.check()
    assert sorted(scores) == [f"d0-b{i}-end" for i in range(3)] and len(set(scores.values())) == 3
    assert best == max(scores, key=scores.get) and app.chosen == [best]
    assert len(logged) == 1 and f"{best} {scores[best]:.4f} <- chosen" in logged[0]
    # three branches, then the best end: the seeds RunBranch's RestoreCapsule sent
    wait_for(lambda: sum(e.operation == "restore" for e in c.events) >= restored + 4, 15,
             "the restore events")
    restores = [e for e in c.events if e.operation == "restore"][restored:]
    assert [e.noise_seed for e in restores] == [-1, 1, 2, -1]
    for name in list(store.capsules):
        ok(c.capsule("delete", name=name))


def test_a_bag_replays_the_noise_seed_a_capsule_event_recorded():
    import types

    from flashrt_ros.bags.capsule_ops import capsule_request
    from flashrt_ros.msg import CapsuleEvent
    for op in ("restore", "fork", "reset"):
        _, request = capsule_request(CapsuleEvent(operation=op, name="b", switch_to=True,
                                                  noise_seed=7))
        assert request.noise_seed == 7, op
        assert capsule_request(CapsuleEvent(operation=op, name="b"))[1].noise_seed == -1
    # a bag of the definition before the field: the sampler went on
    older = types.SimpleNamespace(operation="restore", name="b", message="restored 'b'")
    assert capsule_request(older)[1].noise_seed == -1
