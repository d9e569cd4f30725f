"""What the real `ros2` tools found in the node, each held by a test (docs/node.md says the rules).

  * every parameter has a typed value: `ros2 param get/dump/describe` answer for all of them
    (a parameter declared without one made every get_parameters that named it answer nothing);
  * the loaded model's `obs_dim`, `action_dim`, `horizon` are read-only parameters and in ~/status;
  * `rejected_inputs` counts each refused observation once, not each control tick after it;
  * the capsule requests' defaults lose nothing: `save_capsule` copies, `delete_capsule` keeps a
    saved file; `load_capsule` needs the file and a memory tier;
  * nothing reaches a controller before a step on an accepted observation, and that step's chunk
    is the model's output (not zeros: the observation statistics are weights);
  * the lifecycle `shutdown` transition ends the process with exit status 0;
  * `ros2 param set` of a bad value is refused with the reason.

The `ros2` tests run the tools as subprocesses against a node process (node_client.ros2) and skip
with the reason where the tools are absent; the others drive a node in this process or in a child
process through rclpy.
"""
import itertools
import os

import numpy as np
import pytest
import yaml

from flashrt_ros.ros.waiting import wait_for
from node_client import (DISCOVERY_TIMEOUT_S, NodeProcess, PolicyClient, make_node,  # noqa: F401
                         node_command, observations, require_ros2, ros_context, ros2,  # noqa: F401
                         Unanswered)

pytestmark = pytest.mark.ros

OBS = observations(8, seed=5)
SEQUENCE = itertools.count()
NS = f"/defects{os.getpid()}"
NODE = f"{NS}/flashrt_policy"
EXIT_TIMEOUT_S = 30


# -- a node in this process ---------------------------------------------------------------------
def diagnostic(client, key: str):
    """The latest value of `key` in the node's /diagnostics (a string), or None."""
    for d in reversed(client.diagnostics):
        for st in d.status:
            if st.name.startswith(client.target):
                for kv in st.values:
                    if kv.key == key:
                        return kv.value
    return None


def test_get_parameters_answers_every_parameter_with_a_value(make_node):
    from flashrt_ros.ros.params import parameter_table
    n = make_node()
    names = [name for name, *_ in parameter_table()]
    values = n.client.get_parameters(names)             # one value per name, or none at all
    assert len(values) == len(names) and values["joint_names"] == []
    assert values["control_rate_hz"] == 30.0


def test_the_model_shapes_are_read_only_parameters_that_never_lie(make_node, capfd):
    """Declared at the first configure; a later configure of a model of other shapes is refused
    (ROS never changes a read-only parameter) and the node recovers with the first model."""
    n = make_node()
    c = n.client
    assert not n.node.has_parameter("obs_dim")                  # not declared before configure
    assert c.transition("configure")
    assert c.get_parameters(["obs_dim", "action_dim", "horizon"]) == \
        {"obs_dim": 14, "action_dim": 7, "horizon": 8}
    assert c.set_parameter("obs_dim", 3) == (False, "Trying to set a read-only parameter: obs_dim.")
    assert c.transition("cleanup")
    assert c.set_parameter("model", "hybrid-0.8b")[0]           # obs_dim 64
    assert not c.transition("configure")
    assert "restart the node to serve a model of other shapes" in capfd.readouterr().err
    assert c.set_parameter("model", "tiny")[0] and c.transition("configure")
    assert c.get_parameters(["obs_dim"]) == {"obs_dim": 14}


def test_nothing_reaches_a_controller_before_an_accepted_observation(make_node):
    """Timer mode with a command output: ticks before the first observation (and after refused
    ones) publish nothing; the first step's chunk, on a constant observation, is not all zeros,
    and neither is the command made of it."""
    from std_msgs.msg import Float64MultiArray
    n = make_node(control_mode="timer", control_rate_hz=50.0, observation_qos="reliable",
                   command_output="float64_multi_array", status_rate_hz=20.0)
    c = n.client
    commands = c.collect(Float64MultiArray, f"{c.target}/command")
    assert c.transition("configure") and c.transition("activate")
    c.wait_connected()
    wait_for(lambda: c.matched(c.subs[-1]), DISCOVERY_TIMEOUT_S, "the command publisher")
    c.publish(np.full(5, 0.5, np.float32))              # refused: wrong length
    wait_for(lambda: int(diagnostic(c, "idle_ticks") or 0) >= 25, 30, "25 idle ticks")
    assert c.actions == [] and commands == [] and n.node.runtime.step_count == 0
    c.publish(np.zeros(14, np.float32))                 # a constant observation, stepped each tick
    wait_for(lambda: len(c.actions) >= 3 and len(commands) >= 3, 30, "three actions and commands")
    for action, command in zip(c.actions[:3], commands[:3]):
        chunk = np.asarray(action.data, np.float32).reshape(action.horizon, action.action_dim)
        assert np.abs(chunk).max() > 1e-3, f"step {action.step}: an all-zero chunk"
        assert np.asarray(command.data).tolist() == chunk[0].astype(np.float64).tolist()
    assert c.actions[0].step == 1


# -- a node process, driven by the real tools ---------------------------------------------------
@pytest.fixture(scope="module")
def node(ros_env, tmp_path_factory):
    """A node process (timer mode, reliable observations) for the `ros2` tests; its capsule dir."""
    tmp = tmp_path_factory.mktemp("defects")
    capsules = tmp / "capsules"
    cmd = node_command("", {"managed": False, "runtime.device": "cpu", "observation_qos": "reliable",
                            "status_rate_hz": 10.0, "store.capsule_dir": str(capsules)},
                       namespace=NS)
    with NodeProcess(cmd, ros_env, namespace=NS) as proc:
        proc.wait_log("active: stepping the policy")
        yield proc, capsules
        assert proc.alive(), f"the node died:\n{proc.log()}"


@pytest.fixture(scope="module")
def client(node):
    c = PolicyClient(NODE, name="defects_client")
    try:
        wait_for(lambda: c.statuses, DISCOVERY_TIMEOUT_S, f"a status from {NODE}")
        yield c
    finally:
        c.close()


CALL_TIMEOUT_S = 45


def service(client, name: str, request: str):
    """`ros2 service call` of the node's capsule service `name`; returns (success, its output).

    rmw_fastrtps can drop the reply to a client the server has not matched yet, and `ros2 service
    call` then waits for ever (config/fastdds.xml makes that rare). A call whose answer does not
    come in CALL_TIMEOUT_S is answered by the CapsuleEvent that reports it, which `client` (a
    PolicyClient) hears - as flashrt_ros.ros.client answers a lost call."""
    from flashrt_ros.ros.operations import BY_SERVICE, reports
    op = BY_SERVICE[name]
    seen = len(client.events)
    try:
        r = ros2("service", "call", f"{NODE}/{name}", f"flashrt_ros/srv/{op.srv_type.__name__}",
                 request, check=True, timeout=CALL_TIMEOUT_S)
    except Unanswered:
        req = op.srv_type.Request(**yaml.safe_load(request))
        event = wait_for(lambda: next((e for e in client.events[seen:]
                                       if reports(e, op.name, req)), None),
                         DISCOVERY_TIMEOUT_S, f"the answer of {name} or its capsule event")
        return event.success, f"answer lost; the node's event: {event.message}"
    out = r.stdout
    assert "response:" in out, out
    success = "success=True" in out
    return success, out


def test_param_dump_get_and_describe(node, client):
    require_ros2()
    from flashrt_ros.ros.params import parameter_table
    r = ros2("param", "dump", NODE, "--timeout", DISCOVERY_TIMEOUT_S, check=True)
    dumped = yaml.safe_load(r.stdout)[NODE]["ros__parameters"]

    def value(name):
        d = dumped
        for part in name.split("."):
            d = d[part]
        return d
    for name, default, *_ in parameter_table():
        if name not in ("managed", "runtime.device", "observation_qos", "status_rate_hz",
                        "store.capsule_dir"):
            assert value(name) == default, name
    assert value("joint_names") == []
    assert (value("obs_dim"), value("action_dim"), value("horizon")) == (14, 7, 8)
    r = ros2("param", "get", NODE, "joint_names", "--timeout", DISCOVERY_TIMEOUT_S, check=True)
    assert "String values are: []" in r.stdout, r.stdout
    r = ros2("param", "describe", NODE, "obs_dim", "joint_names", "--timeout", DISCOVERY_TIMEOUT_S,
             check=True)
    obs_dim, joint_names = r.stdout.split("Parameter name: ")[1:]
    assert "Type: integer" in obs_dim and "Read only: true" in obs_dim, r.stdout
    assert "Type: string array" in joint_names and "Read only" not in joint_names, r.stdout
    status = client.latest_status()
    assert (status.obs_dim, status.action_dim, status.horizon) == (14, 7, 8)


@pytest.mark.parametrize("name, value, says", [
    ("obs_dim", "3", "read-only"),                              # the model says
    ("control_rate_hz", "60.0", "fixed while the node is active"),
    # out of the descriptor's range: rclpy refuses it before the node's own checks
    ("stale_observation_s", "-1.0", "stale_observation_s out of range"),
    ("store.host_budget_mb", "1.0e+30", "host_budget_mb out of range"),
    ("store.disk_budget_mb", "1.0e+30", "disk_budget_mb out of range"),
    ("store.disk_budget_mb", "-1.0", "disk_budget_mb out of range"),
    ("instruction", "5", "Wrong parameter type"),                 # rclpy's own check
])
def test_param_set_of_a_bad_value_is_refused_with_the_reason(node, name, value, says):
    require_ros2()
    before = ros2("param", "get", NODE, name, "--timeout", DISCOVERY_TIMEOUT_S, check=True).stdout
    r = ros2("param", "set", NODE, name, value, "--timeout", DISCOVERY_TIMEOUT_S)
    out = r.stdout + r.stderr
    assert "Setting parameter failed" in out and says in out, out
    assert ros2("param", "get", NODE, name, "--timeout", DISCOVERY_TIMEOUT_S).stdout == before


def test_param_delete_is_refused(node):
    require_ros2()
    r = ros2("param", "delete", NODE, "deadline_ms", "--timeout", DISCOVERY_TIMEOUT_S)
    assert "expected a value" in r.stdout + r.stderr, r.stdout + r.stderr
    ros2("param", "get", NODE, "deadline_ms", "--timeout", DISCOVERY_TIMEOUT_S, check=True)


def test_each_refused_observation_counts_once(node, client):
    """Four bad observations from `ros2 topic pub`, then many control ticks: 4 refusals."""
    require_ros2()
    wait_for(lambda: diagnostic(client, "rejected_inputs") is not None, DISCOVERY_TIMEOUT_S,
             "/diagnostics from the node")
    before = int(diagnostic(client, "rejected_inputs"))
    ros2("topic", "pub", "--times", 4, "--rate", 20, "-w", 1, "--qos-reliability", "reliable",
         f"{NODE}/observation", "flashrt_ros/msg/Observation", "{state: [1.0, 2.0, 3.0]}",
         check=True)
    wait_for(lambda: int(diagnostic(client, "rejected_inputs")) >= before + 4, 30, "four refusals")
    ticks = int(diagnostic(client, "ticks"))
    # a second's ticks (30 Hz) after them: one refused observation used to count once per tick
    wait_for(lambda: int(diagnostic(client, "ticks")) >= ticks + 30, 30, "30 more control ticks")
    assert int(diagnostic(client, "rejected_inputs")) == before + 4
    assert client.latest_status().rejected_inputs == before + 4
    assert "expected shape (14,)" in diagnostic(client, "last_error")


def capsules(client) -> dict:
    from flashrt_ros.srv import ListCapsules
    return {c.name: c.tier for c in client.call(ListCapsules, "list_capsules").capsules}


def test_save_and_delete_defaults_lose_nothing(node, client):
    """`ros2 service call` with only a name: save copies (the memory copy stays), delete keeps
    the saved file; only the flags move or delete a file."""
    require_ros2()
    _, capsule_dir = node
    path = capsule_dir / "keep.capsule"
    assert service(client, "snapshot", "{name: keep}")[0]
    ok, out = service(client, "save_capsule", "{name: keep}")
    assert ok and path.is_file(), out
    assert capsules(client)["keep"] == "host"                  # still in memory
    ok, out = service(client, "delete_capsule", "{name: keep}")
    assert ok and "stays" in out and path.is_file(), out
    assert capsules(client)["keep"] == "disk"                  # the file is the capsule now
    ok, out = service(client, "delete_capsule", "{name: keep}")
    assert not ok and "delete_file: true" in out and path.is_file(), out
    ok, out = service(client, "delete_capsule", "{name: keep, delete_file: true}")
    assert ok and not path.exists() and "keep" not in capsules(client), out
    # the flags, and the events that report them (a bag replays a call from its event)
    assert service(client, "snapshot", "{name: moved}")[0]
    assert service(client, "save_capsule", "{name: moved, evict_from_memory: true}")[0]
    assert capsules(client)["moved"] == "disk"
    assert service(client, "delete_capsule", "{name: moved, delete_file: true}")[0]
    assert not (capsule_dir / "moved.capsule").exists()
    wait_for(lambda: [e for e in client.events if e.name == "moved" and e.operation == "delete"],
             DISCOVERY_TIMEOUT_S, "the delete's event")
    flags = [(e.operation, e.name, e.success, e.evict_from_memory, e.delete_file)
             for e in client.events if e.name in ("keep", "moved") and e.operation != "snapshot"]
    assert flags == [("save", "keep", True, False, False), ("delete", "keep", True, False, False),
                     ("delete", "keep", False, False, False), ("delete", "keep", True, False, True),
                     ("save", "moved", True, True, False), ("delete", "moved", True, False, True)]
    # a delete of a capsule that was never saved drops it (there is nothing to keep)
    assert service(client, "snapshot", "{name: scratch}")[0]
    assert service(client, "delete_capsule", "{name: scratch}")[0]
    assert "scratch" not in capsules(client)


def test_the_cli_has_the_same_defaults(node, client, ros_env):
    import subprocess

    from node_client import executable
    _, capsule_dir = node

    def cli(*args):
        r = subprocess.run([executable("flashrt-ros"), "--node", NODE, "--timeout", "20", *args],
                           env=ros_env, capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
    cli("snapshot", "cli-keep")
    cli("save", "cli-keep")
    assert capsules(client)["cli-keep"] == "host"
    cli("delete", "cli-keep")
    assert (capsule_dir / "cli-keep.capsule").is_file() and capsules(client)["cli-keep"] == "disk"
    cli("delete", "cli-keep", "--delete-file")
    assert not (capsule_dir / "cli-keep.capsule").exists() and "cli-keep" not in capsules(client)


def test_load_capsule_needs_the_file_and_a_memory_tier(node, client):
    require_ros2()
    assert service(client, "snapshot", "{name: only-in-memory}")[0]
    before = capsules(client)
    ok, out = service(client, "load_capsule", "{name: only-in-memory}")
    assert not ok and "no capsule file" in out, out
    assert service(client, "snapshot", "{name: on-disk, tier: disk}")[0]
    for tier in ("disk", "tape", "GPU"):
        ok, out = service(client, "load_capsule", f"{{name: on-disk, tier: {tier}}}")
        assert not ok and "tier" in out and "expected" in out, out
    assert capsules(client) == {**before, "on-disk": "disk"}
    ok, out = service(client, "load_capsule", "{name: on-disk}")
    assert ok and capsules(client)["on-disk"] == "host", out


# -- the end of a process -----------------------------------------------------------------------
def shutdown_ends_the_process(ros_env, tmp_path, managed: bool, transition):
    namespace = f"{NS}_end{next(SEQUENCE)}"
    cmd = node_command("", {"managed": managed, "runtime.device": "cpu",
                            "store.capsule_dir": str(tmp_path / "capsules")}, namespace=namespace)
    with NodeProcess(cmd, ros_env, namespace=namespace) as proc:
        if not managed:
            proc.wait_log("active: stepping the policy")
        transition(proc)
        code = proc.proc.wait(timeout=EXIT_TIMEOUT_S)
        assert code == 0, proc.log()
        assert "finalized: the process ends" in proc.log()


def test_lifecycle_shutdown_ends_the_process(ros_env, tmp_path):
    """Through `ros2 lifecycle set` on an active node: the answer comes, then the process ends."""
    require_ros2()

    def transition(proc):
        wait_for(lambda: "shutdown" in ros2("lifecycle", "list", proc.node).stdout, 60,
                 f"the lifecycle services of {proc.node}")
        r = ros2("lifecycle", "set", proc.node, "shutdown", check=True)
        assert "Transitioning successful" in r.stdout, r.stdout + r.stderr
    shutdown_ends_the_process(ros_env, tmp_path, False, transition)


def test_shutdown_of_an_unconfigured_node_ends_the_process(ros_env, tmp_path):
    def transition(proc):
        c = PolicyClient(proc.node, name="shutdown_client")
        try:
            assert c.state() == "unconfigured"
            assert c.transition("shutdown")
        finally:
            c.close()
    shutdown_ends_the_process(ros_env, tmp_path, True, transition)


# -- files outside the node's control (issue 28) ------------------------------------------------
def test_a_status_publish_survives_a_capsule_file_that_disappears(tmp_path, monkeypatch):
    """A saved file renamed or deleted by another process between the status timer's look at it
    and its size: the status is published, the node goes on."""
    from flashrt_ros.capsules.file import capsule_path
    from node_client import call_service as call, configured_node
    from test_capsule_reliability import vanish_after_first_look
    with configured_node(f"{NS}_vanish", tmp_path / "caps") as n:
        assert call(n, "snapshot", name="home").success
        assert call(n, "save_capsule", name="home").success
        path = capsule_path(n.store.cfg.capsule_dir, "home")
        vanish_after_first_look(monkeypatch, path)
        n._publish_status()                  # what the status timer runs
        assert not os.path.exists(path)
        n._publish_status()
        assert call(n, "list_capsules").success


def test_two_nodes_on_one_capsule_directory_never_overwrite_each_others_capsules(tmp_path):
    """Node A saves 'home'; node B, on the same directory, cannot save its own 'home' over it
    (the answer names A's store); A's file stays A's, and A restores A's state from it."""
    import torch

    from node_client import call_service as call, configured_node
    d = tmp_path / "caps"
    with configured_node(f"{NS}_a", d) as a, configured_node(f"{NS}_b", d) as b:
        assert call(a, "snapshot", name="home").success
        assert call(a, "save_capsule", name="home").success
        ours = a.store.capsule_bytes("home")
        b.runtime.step([0.5] * 14)
        assert call(b, "snapshot", name="home").success
        for evict in (False, True):
            res = call(b, "save_capsule", name="home", evict_from_memory=evict)
            assert not res.success and a.store.writer in res.message, res.message
            assert "internal error" not in res.message and "capsule_dir" in res.message
        assert [c.tier for c in call(b, "list_capsules").capsules] == ["host"]
        assert call(a, "delete_capsule", name="home").success      # the memory copy goes
        assert call(a, "restore", name="home").success             # from A's own file
        assert torch.equal(a.runtime.live_state(), ours)


def test_filesystem_errors_answer_what_to_do_and_change_nothing(tmp_path, capfd):
    """A read-only capsule directory (immutable: also for root), then one removed while the node
    runs: every refused call answers what was expected, what was found and what to do, is
    logged as a warning, and leaves the store as it was; a failed delete keeps the capsule."""
    import shutil

    from node_client import call_service as call, configured_node
    from test_capsule_reliability import _state, read_only
    with configured_node(f"{NS}_ro", tmp_path / "caps") as n:
        assert call(n, "snapshot", name="home").success
        assert call(n, "save_capsule", name="home").success
        assert call(n, "snapshot", name="other").success
        d = n.store.cfg.capsule_dir
        before = _state(n.runtime, n.store)
        capfd.readouterr()
        with read_only(d):
            answers = [call(n, "delete_capsule", name="home", delete_file=True),
                       call(n, "save_capsule", name="other"),
                       call(n, "snapshot", name="d", tier="disk")]
        assert _state(n.runtime, n.store) == before
        shutil.rmtree(d)
        index = {name: c.tier for name, c in n.store.capsules.items()}
        answers += [call(n, "save_capsule", name="other"),
                    call(n, "snapshot", name="d", tier="disk")]
        assert {name: c.tier for name, c in n.store.capsules.items()} == index
        err = capfd.readouterr().err
        for res in answers:
            assert not res.success and "internal error" not in res.message, res.message
            assert "expected" in res.message and "found" in res.message, res.message
            assert "store.capsule_dir" in res.message and res.message in err, err[-3000:]
        assert "unexpected error" not in err
        assert sorted(c.name for c in call(n, "list_capsules").capsules) == ["home", "other"]


def test_a_deeply_nested_capsule_header_is_refused_through_the_node(tmp_path):
    from flashrt_ros.capsules.file import capsule_path
    from node_client import call_service as call, configured_node
    with configured_node(f"{NS}_deep", tmp_path / "caps") as n:
        text = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        with open(capsule_path(n.store.cfg.capsule_dir, "deep"), "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
        res = call(n, "load_capsule", name="deep", restore=True)
        assert not res.success and "internal error" not in res.message, res.message
        assert "nested" in res.message and "expected" in res.message, res.message
