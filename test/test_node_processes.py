"""The policy node in its own process (`flashrt_node`), driven from this one over DDS on loopback.

One node runs for the module: started from a params file plus `-p` overrides, observation control
with reliable QoS (nothing is dropped, so action sequences can be compared exactly), JointState
input and a Float64MultiArray command output. Each test sets up its own baseline (a snapshot, a
reset), so the tests do not depend on each other's leftovers. Exactness is checked on the float32
bytes of ActionChunk.data; "state unchanged" is checked on capsule digests (BLAKE2b of the live
bytes, computed when a capsule is saved) and on the actions that follow.
"""
import os
import subprocess

import numpy as np
import pytest
import yaml

from flashrt_ros.ros.stamps import ns_to_stamp, s_to_ns
from flashrt_ros.ros.waiting import wait_for
from node_client import (NodeProcess, PolicyClient, chunk_bytes, executable, node_command,
                         observations)

pytestmark = [pytest.mark.ros, pytest.mark.slow]

INSTRUCTION = "pick up the red cube"
JOINTS = [f"joint{i}" for i in range(7)]            # tiny preset: obs_dim 14 = 7 positions + 7 velocities
OBS = observations(64, seed=1)


def write_params(path, **ros_parameters):
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({"/**/flashrt_policy": {"ros__parameters": ros_parameters}}, f)
    return str(path)


@pytest.fixture(scope="module")
def node(ros_env, tmp_path_factory):
    """The node process (yields its NodeProcess and capsule directory); always stopped."""
    tmp = tmp_path_factory.mktemp("node")
    params = write_params(tmp / "params.yaml", control_mode="observation",
                          observation_qos="reliable", status_rate_hz=10.0,
                          instruction=INSTRUCTION, joint_names=JOINTS,
                          command_output="float64_multi_array",
                          store={"capsule_dir": str(tmp / "capsules")})
    cmd = node_command(params, {"managed": False, "runtime.device": "cpu"})
    with NodeProcess(cmd, ros_env) as proc:
        proc.wait_log("active: stepping the policy")
        yield proc, tmp / "capsules"
        assert proc.alive(), f"the node died:\n{proc.log()}"


@pytest.fixture(scope="module")
def client(node):
    c = PolicyClient("/flashrt_policy")
    try:
        c.wait_connected()
        yield c
    finally:
        c.close()


def run_bytes(client, states):
    actions = client.run(states)
    return [chunk_bytes(a) for a in actions], [a.step for a in actions]


def ok(res):
    assert res.success, res.message
    return res


def digest_of(client, name):
    """Digest of a capsule's bytes: save it (the store hashes what it writes)."""
    return ok(client.capsule("save_capsule", name=name)).capsule.digest


def test_parameters_come_from_the_file_and_the_overrides(client):
    got = client.get_parameters(["control_mode", "observation_qos", "managed", "runtime.device",
                                 "joint_names", "instruction", "control_rate_hz"])
    assert got == {"control_mode": "observation", "observation_qos": "reliable", "managed": False,
                   "runtime.device": "cpu", "joint_names": JOINTS, "instruction": INSTRUCTION,
                   "control_rate_hz": 30.0}


def reference_actions(states) -> list:
    """Action bytes of a runtime built here (no warm-up, as many CPU threads as the node)."""
    import torch

    from flashrt_ros.core.config import RuntimeConfig
    from flashrt_ros.core.runtime import PolicyRuntime
    torch.set_num_threads(1)
    rt = PolicyRuntime.from_pretrained("tiny", RuntimeConfig(device="cpu"))  # the node's model
    rt.set_instruction(INSTRUCTION)
    return [rt.step(o).astype(np.float32).tobytes() for o in states]


def test_actions_equal_a_fresh_runtime_and_reset_returns_to_the_instruction(client):
    from std_msgs.msg import String

    from flashrt_ros.ros.publishing import LATCHED
    expected = reference_actions(OBS[:6])
    if not client.actions:       # the node's very first steps: from the state warm-up put back
        first, steps = run_bytes(client, OBS[:6])
        assert first == expected and steps == [1, 2, 3, 4, 5, 6]
        # warm-up ran every plan at configure: no lazy initialisation (~2 s) in the first step
        assert client.actions[0].latency_ms < 250, client.actions[0].latency_ms
    # a new instruction starts a fresh context whatever ran before
    episode = client.latest_status().episode_id
    pub = client.publisher(String, "/flashrt_policy/instruction", qos=LATCHED)
    wait_for(lambda: pub.get_subscription_count() > 0, 15, "the node's instruction subscription")
    pub.publish(String(data=INSTRUCTION))
    wait_for(lambda: client.latest_status().episode_id == episode + 1, 15, "the instruction")
    first, steps = run_bytes(client, OBS[:6])
    assert first == expected and steps == [1, 2, 3, 4, 5, 6]

    res = ok(client.capsule("reset", keep_context=True))
    assert res.episode_id == episode + 2
    again, steps = run_bytes(client, OBS[:6])
    assert again == expected and steps == [1, 2, 3, 4, 5, 6]
    assert client.actions[-1].episode_id == episode + 2


def test_restore_replays_the_same_actions_byte_for_byte(client):
    run_bytes(client, OBS[:3])
    k = client.actions[-1].step
    snap = ok(client.capsule("snapshot", name="home"))
    assert snap.capsule.step == k and snap.capsule.tier == "host"
    after, steps = run_bytes(client, OBS[3:11])
    assert steps == list(range(k + 1, k + 9))
    res = ok(client.capsule("restore", name="home"))
    assert res.capsule.step == k
    replay, steps = run_bytes(client, OBS[3:11])
    assert replay == after and steps == list(range(k + 1, k + 9))
    assert client.actions[-1].capsule_lineage == "home"


def test_fork_switch_and_rollback_give_the_same_actions(client):
    ok(client.capsule("snapshot", name="fork-base"))
    k = client.actions[-1].step
    expected, _ = run_bytes(client, OBS[20:26])

    ok(client.capsule("fork", source="fork-base", name="branch-a", switch_to=True))
    got, steps = run_bytes(client, OBS[20:26])
    assert got == expected and steps[0] == k + 1
    assert client.actions[-1].capsule_lineage == "branch-a"

    res = ok(client.capsule("rollback", k=6))
    assert res.step == k
    got, _ = run_bytes(client, OBS[20:26])
    assert got == expected

    ok(client.capsule("rollback", k=6))
    # a branch of the live state that becomes the live state leaves the state as it was
    res = ok(client.capsule("fork", source="", name="live-branch", switch_to=True))
    assert res.capsule.step == k and res.capsule.parent == "branch-a"
    got, _ = run_bytes(client, OBS[20:26])
    assert got == expected


def test_save_load_delete_list(client, node):
    _, capsule_dir = node
    ok(client.capsule("snapshot", name="to-disk"))
    expected, _ = run_bytes(client, OBS[30:34])
    res = ok(client.capsule("save_capsule", name="to-disk", evict_from_memory=True))
    assert os.path.isfile(res.path) and os.path.dirname(res.path) == str(capsule_dir)
    listed = {c.name: c for c in ok(client.capsule("list_capsules")).capsules}
    assert listed["to-disk"].tier == "disk" and len(listed["to-disk"].digest) == 64
    res = ok(client.capsule("load_capsule", name="to-disk", restore=True))
    assert res.capsule.tier == "host"
    got, _ = run_bytes(client, OBS[30:34])
    assert got == expected
    ok(client.capsule("delete_capsule", name="to-disk", delete_file=True))
    assert "to-disk" not in {c.name for c in ok(client.capsule("list_capsules")).capsules}


BAD_REQUESTS = [
    ("restore", {"name": "no-such-capsule"}, "no capsule named"),
    ("restore", {"name": ""}, "capsule name"),
    ("snapshot", {"name": ""}, "capsule name"),
    ("snapshot", {"name": "a/b"}, "capsule name"),
    ("snapshot", {"name": ".."}, "capsule name"),
    ("snapshot", {"name": "../escape"}, "capsule name"),
    ("snapshot", {"name": "before-bad"}, "exists"),
    ("snapshot", {"name": "ok-name", "tier": "tape"}, "tier"),
    ("fork", {"source": "no-such-capsule", "name": "x"}, "no capsule named"),
    ("fork", {"source": "before-bad", "name": "x/y", "switch_to": True}, "capsule name"),
    ("rollback", {"k": 1000}, ""),
    ("delete_capsule", {"name": "no-such-capsule"}, "no capsule named"),
    ("delete_capsule", {"name": "../before-bad"}, "capsule name"),
    ("load_capsule", {"name": "no-such-file", "restore": True}, "no capsule file"),
    ("save_capsule", {"name": "no-such-capsule"}, "no capsule named"),
    ("list_capsules", {"tier": "tape"}, "tier"),
]


def test_bad_requests_fail_with_a_message_and_change_nothing(client):
    ok(client.capsule("snapshot", name="before-bad"))
    step = client.actions[-1].step
    names = {c.name for c in ok(client.capsule("list_capsules")).capsules}
    for op, fields, says in BAD_REQUESTS:
        res = client.capsule(op, **fields)
        assert not res.success, (op, fields, res.message)
        assert res.message and says in res.message, (op, fields, res.message)
    # bad observations: refused, no action; the next good one is the next step
    client.publish(OBS[40][:5])                     # wrong size
    client.publish(np.full(14, np.nan, np.float32))
    client.publish(np.r_[OBS[40][:13], np.inf].astype(np.float32))
    ok(client.capsule("snapshot", name="after-bad"))
    assert {c.name for c in ok(client.capsule("list_capsules")).capsules} == names | {"after-bad"}
    assert digest_of(client, "after-bad") == digest_of(client, "before-bad")
    got, steps = run_bytes(client, OBS[40:44])
    assert steps == [step + 1, step + 2, step + 3, step + 4]
    ok(client.capsule("restore", name="before-bad"))
    expected, _ = run_bytes(client, OBS[40:44])
    assert got == expected
    failed = [e for e in client.events if not e.success]
    assert len(failed) >= len(BAD_REQUESTS) - 1    # list_capsules is a query: no event


def test_joint_state_input_and_float64_command_output(client):
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray
    commands = client.collect(Float64MultiArray, "/flashrt_policy/command")
    pub = client.publisher(JointState, "/joint_states")
    wait_for(lambda: pub.get_subscription_count() > 0 and client.matched(client.subs[-1]), 15,
             "the node's joint_states subscription and command publisher")
    ok(client.capsule("snapshot", name="joints"))
    obs = OBS[50]
    order = list(reversed(range(7)))                # the message may list joints in any order
    msg = JointState(name=[JOINTS[i] for i in order], position=[float(obs[i]) for i in order],
                     velocity=[float(obs[7 + i]) for i in order])
    n = len(client.actions)
    bad = JointState(name=JOINTS[:6], position=[0.0] * 6, velocity=[0.0] * 6)   # a joint missing
    pub.publish(bad)
    pub.publish(msg)
    wait_for(lambda: len(client.actions) > n and commands, 15, "an action and a command")
    action = client.actions[n]
    chunk = np.asarray(action.data, np.float32).reshape(action.horizon, action.action_dim)
    assert np.asarray(commands[-1].data, np.float64).tolist() == chunk[0].astype(np.float64).tolist()
    # the same observation through ~/observation gives the same action
    ok(client.capsule("restore", name="joints"))
    assert chunk_bytes(client.step(obs)) == chunk_bytes(action)


def test_status_and_diagnostics_are_published(client):
    client.step(OBS[60])
    step = client.actions[-1].step
    s = client.latest_status()
    assert (s.lifecycle_state, s.device, s.preset) == ("active", "cpu", "tiny")
    assert s.step == step and s.capsules >= 1 and s.host_budget == 1024 * 2**20
    wait_for(lambda: any("flashrt_policy" in st.name for d in client.diagnostics for st in d.status),
             15, "/diagnostics from the node")
    st = [st for d in client.diagnostics for st in d.status if "flashrt_policy" in st.name][-1]
    keys = {kv.key for kv in st.values}
    assert {"step", "p99_step_ms", "deadline_misses", "capsules", "host_bytes"} <= keys


def test_every_operation_published_a_capsule_event(client):
    wait_for(lambda: {"snapshot", "restore", "fork", "rollback", "reset", "delete", "save",
                      "load"} <= {e.operation for e in client.events}, 15, "capsule events")
    assert "list" not in {e.operation for e in client.events}
    snap = [e for e in client.events if e.operation == "snapshot" and e.name == "home"]
    assert snap and snap[0].success and snap[0].tier == "host"


def test_calls_while_unconfigured_fail_and_the_node_keeps_answering(ros_env, tmp_path):
    params = write_params(tmp_path / "params.yaml", store={"capsule_dir": str(tmp_path / "c")})
    cmd = node_command(params, {"managed": True, "runtime.device": "cpu"}, namespace="/unconf")
    with NodeProcess(cmd, ros_env) as proc:
        c = PolicyClient("/unconf/flashrt_policy", name="unconf_client")
        try:
            calls = [("snapshot", {"name": "a"}), ("restore", {"name": "a"}),
                     ("fork", {"source": "", "name": "b"}), ("rollback", {"k": 1}),
                     ("reset", {}), ("list_capsules", {}), ("delete_capsule", {"name": "a"}),
                     ("save_capsule", {"name": "a"}), ("load_capsule", {"name": "a"})]
            for op, fields in calls:
                res = c.capsule(op, **fields)
                assert not res.success and "configure" in res.message, (op, res.message)
            assert c.state() == "unconfigured"
            r = cli(ros_env, "/unconf/flashrt_policy", "lifecycle", "configure")
            assert r.returncode == 0, r.stdout + proc.log()
            assert c.state() == "inactive"
            res = ok(c.capsule("snapshot", name="a"))
            assert res.capsule.step == 0
            r = cli(ros_env, "/unconf/flashrt_policy", "lifecycle", "shutdown")
            assert r.returncode == 0, r.stdout
        finally:
            c.close()
        assert proc.proc.wait(timeout=30) == 0, proc.log()     # finalized: the process ended
    assert os.path.isdir(tmp_path / "c")


def cli(env, node, *args):
    return subprocess.run([executable("flashrt-ros"), "--node", node, "--timeout", "20", *args], env=env,
                          capture_output=True, text=True, timeout=90)


def test_cli_drives_the_node(client, ros_env):
    r = cli(ros_env, "/flashrt_policy", "snapshot", "from-cli")
    assert r.returncode == 0 and "snapshot: ok: snapshot 'from-cli'" in r.stdout, r.stdout + r.stderr
    r = cli(ros_env, "/flashrt_policy", "restore", "no-such-capsule")
    assert r.returncode == 1 and "restore: FAILED: no capsule named 'no-such-capsule'" in r.stdout
    r = cli(ros_env, "/flashrt_policy", "status")
    assert r.returncode == 0 and "active on cpu (tiny)" in r.stdout, r.stdout + r.stderr
    assert "from-cli" in {c.name for c in ok(client.capsule("list_capsules")).capsules}


def _stamped(client, state, seconds_ago=0.0, stamp=None):
    from flashrt_ros.msg import Observation
    msg = Observation()
    if stamp is None:
        now = client.node.get_clock().now().nanoseconds
        msg.header.stamp = ns_to_stamp(now - s_to_ns(seconds_ago))
    else:
        msg.header.stamp = stamp
    msg.state = [float(x) for x in state]
    return msg


def _next_action_answers(client, msg):
    """Publish msg and return the first action that answers it (earlier messages got none)."""
    n = len(client.actions)
    client.pub_obs.publish(msg)
    wait_for(lambda: len(client.actions) > n, 15, "an action")
    return client.actions[n]


def test_stale_and_out_of_order_observations_step_nothing(client):
    ok(client.capsule("reset", keep_context=True))
    first = client.step(OBS[0])
    # a stale observation (older than stale_observation_s = 0.5 s) and then an out-of-order one
    client.pub_obs.publish(_stamped(client, OBS[1], seconds_ago=30.0))
    newer = _stamped(client, OBS[2])
    older = _stamped(client, OBS[3], stamp=first.observation_stamp)   # before `newer`
    action = _next_action_answers(client, newer)
    assert action.observation_stamp == newer.header.stamp, "the stale observation was stepped on"
    assert action.step == first.step + 1
    client.pub_obs.publish(older)
    fresh = _stamped(client, OBS[4])
    action = _next_action_answers(client, fresh)
    assert action.observation_stamp == fresh.header.stamp, "the out-of-order observation was stepped on"
    assert action.step == first.step + 2


def test_instruction_over_the_context_limit_is_refused_and_changes_nothing(client):
    from std_msgs.msg import String

    from flashrt_ros.ros.publishing import LATCHED
    ok(client.capsule("reset", keep_context=True))
    client.step(OBS[0])
    name_a, name_b = "before-long-instruction", "after-long-instruction"
    for name in (name_a, name_b):
        client.capsule("delete_capsule", name=name, delete_file=True)
    ok(client.capsule("snapshot", name=name_a))
    before = digest_of(client, name_a)
    pub = client.publisher(String, "/flashrt_policy/instruction", qos=LATCHED)
    wait_for(lambda: pub.get_subscription_count() > 0, 15, "the instruction subscriber")
    pub.publish(String(data="x" * 5000))           # tiny: 511 usable tokens
    wait_for(lambda: any(kv.key == "last_error" and "instruction refused" in kv.value
                         for d in client.diagnostics[-5:] for s in d.status for kv in s.values),
             20, "the refusal in /diagnostics")
    ok(client.capsule("snapshot", name=name_b))
    assert digest_of(client, name_b) == before
