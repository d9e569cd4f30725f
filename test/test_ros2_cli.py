"""The node through the real ROS 2 tools, as a user drives it: `ros2 launch`, `ros2 run`,
`ros2 lifecycle`, `ros2 service call`, `ros2 param`, `ros2 topic pub/echo`, `ros2 node info` and
`ros2 interface`, each a subprocess.

The tools come from the environment: the venv's `ros2` (tools/bootstrap.sh installs it from
../shared/ros2-tools), or a sourced ROS 2 install. Without them these tests skip with the reason;
with FLASHRT_REQUIRE_ROS2=1 (tools/run-tests.sh sets it where ../shared/ros2-tools is) they fail
instead. DDS stays on loopback in this session's domain (conftest.py), and nothing sleeps: a
`ros2` command started before DDS discovery finished says "Node not found", and is run again
until it finds the node or the deadline passes.

One launched node (`launched`: namespace, params file, device, managed:=true, record:=true) serves
most tests; its lifecycle is driven through `ros2 lifecycle` first. A second launch (package
defaults, managed:=false) ends with the lifecycle shutdown transition, and `ros2 run` starts a
third node.
"""
import ast
import json
import os
import re
import signal

import pytest
import yaml

from flashrt_ros.ros.process import STARTUP_TIMEOUT_S, NodeProcess
from flashrt_ros.ros.waiting import wait_for
from node_client import Unanswered, executable, ros2, ros2_env

pytestmark = [pytest.mark.ros, pytest.mark.ros2cli, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE, LAUNCH_FILE = "flashrt_ros", "flashrt_policy.launch.py"
COMMAND_TIMEOUT_S = 60      # one `ros2` command: starts Python, discovers, calls
# What a `ros2` verb prints when its fixed discovery spin ended before it saw the node or topic.
NOT_DISCOVERED = ("Node not found", "Unable to find node", "Could not determine the type",
                  "does not appear to be published yet")
CAPSULE_SERVICES = ("snapshot", "restore", "fork", "rollback", "list_capsules", "delete_capsule",
                    "save_capsule", "load_capsule", "reset")
MODEL_PARAMETERS = {"obs_dim": 14, "action_dim": 7, "horizon": 8}       # the tiny preset's
OBS = [round(0.05 * i, 2) for i in range(14)]


# -- running the tools ---------------------------------------------------------------------------
def run(*args, timeout=COMMAND_TIMEOUT_S, env=None, resend=None):
    """`ros2 <args>`; returns the CompletedProcess (stdout and stderr together in .stdout, less
    the lines Fast DDS logs into them: those are the middleware's, not the tool's answer). A verb
    that only reads runs again when its answer was lost (node_client.ros2)."""
    return ros2(*args, env=env, timeout=timeout, merged=True, resend=resend)


def discovered(*args, until=None, timeout=STARTUP_TIMEOUT_S, env=None, resend=None):
    """`ros2 <args>`, run again while it reports that DDS discovery had not found its target yet
    (or, given `until`, while `until(output)` is false: a node can be found before all of its
    topics and services are)."""
    last = []

    def attempt():
        r = run(*args, env=env, resend=resend)
        last[:] = [r]
        if any(s in r.stdout for s in NOT_DISCOVERED) or (until and not until(r.stdout)):
            return None
        return r
    try:
        return wait_for(attempt, timeout, f"`ros2 {' '.join(map(str, args))}` to find its target",
                        interval=0.2)
    except TimeoutError as e:
        pytest.fail(f"{e}; its last output:\n{last[0].stdout if last else ''}")


def ok(r, expect=""):
    assert r.returncode == 0 and expect in r.stdout, \
        f"`{' '.join(r.args[1:])}`: exit {r.returncode}, expected {expect!r} in:\n{r.stdout}"
    return r.stdout


def _literal(node):
    """An ast node of a printed ROS message (`pkg.msg.Type(field=value, ...)`) as plain data."""
    if isinstance(node, ast.Call):
        return {k.arg: _literal(k.value) for k in node.keywords}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Attribute):          # array('f', ...) etc. never occur here
        return ast.unparse(node)
    return ast.literal_eval(node)


def service_call(node, service, srv_type, request=None, resend=None):
    """`ros2 service call`; returns the response's fields (a dict)."""
    args = ["service", "call", f"{node}/{service}", srv_type]
    if request is not None:
        args.append(json.dumps(request))              # JSON is YAML flow style
    out = ok(run(*args, resend=resend), "response:")
    text = out.split("response:", 1)[1].strip()
    return _literal(ast.parse(text, mode="eval").body)


def capsule_call(node, service, refused=False, **request):
    """A capsule service through `ros2 service call`. A call that changes nothing (list_capsules,
    and a request the test expects `refused`) runs again when its answer was lost."""
    srv_type = "flashrt_ros/srv/" + "".join(p.title() for p in service.split("_"))
    return service_call(node, service, srv_type, request or None,
                        resend=refused or service == "list_capsules")


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def lifecycle_state(node) -> str:
    return ok(discovered("lifecycle", "get", node, "--no-daemon")).strip()


def set_state(node, transition, reached=None):
    """`ros2 lifecycle set <transition>`, answered "Transitioning successful". Where the answer was
    lost, the state the node is in (`ros2 lifecycle get`) must be `reached` (None: the caller
    checks what the transition did)."""
    try:
        ok(discovered("lifecycle", "set", node, transition, "--no-daemon"),
           "Transitioning successful")
    except Unanswered:
        if reached is not None:
            assert lifecycle_state(node).startswith(reached)


def ensure_active(node):
    """Configure and activate `node` through `ros2 lifecycle` where it is not active yet."""
    for state, transition, reached in (("unconfigured", "configure", "inactive"),
                                       ("inactive", "activate", "active")):
        if lifecycle_state(node).startswith(state):
            set_state(node, transition, reached)
    assert lifecycle_state(node).startswith("active")


class Background:
    """A long-running `ros2` command (topic pub/echo): output collected, always ended."""

    def __init__(self, *args, env=None):
        self.proc = NodeProcess([executable("ros2"), *map(str, args)], ros2_env(env))

    def __enter__(self):
        self.proc.__enter__()
        return self.proc

    def __exit__(self, *exc):
        self.proc.stop()
        return False


# -- the launched node ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """`ros2 launch` with every argument set: its NodeProcess, namespace and directories."""
    work = tmp_path_factory.mktemp("ros2_cli")
    config = work / "params.yaml"
    # command_output on: the remapped ros2_control output must appear in `ros2 node info`
    config.write_text(yaml.safe_dump({"/**/flashrt_policy": {"ros__parameters": {
        "command_output": "float64_multi_array", "store": {"capsule_dir": str(work / "capsules")}}}}))
    namespace = f"cli_{os.getpid()}"
    bag = work / "bag"
    cmd = [executable("ros2"), "launch", PACKAGE, LAUNCH_FILE, f"namespace:={namespace}",
           f"config:={config}", "device:=cpu", "managed:=true", "record:=true", f"bag:={bag}"]
    # launch's logs under ~/.ros; PATH without this venv's bin, as on a colcon install, where the
    # package's executables are in lib/flashrt_ros/ only (ros2 itself is started by its path)
    env = dict(ros2_env(), HOME=str(work))
    bin_dir = os.path.dirname(executable("ros2"))
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != bin_dir)
    with NodeProcess(cmd, env, namespace=namespace, stop_timeout=30) as proc:
        proc.wait_log("process started", STARTUP_TIMEOUT_S)
        yield {"proc": proc, "node": proc.node, "namespace": "/" + namespace, "bag": bag,
               "config": config, "work": work}


def test_launch_print_shows_the_node_its_parameters_and_remappings():
    out = ok(run("launch", "-p", PACKAGE, LAUNCH_FILE))
    assert "OpaqueFunction" not in out
    assert f"ExecInPkg(pkg='{PACKAGE}', exec='flashrt_node')" in out
    assert "'--params-file', LaunchConfig('config')" in out
    assert "overrides(runtime.device=LaunchConfig('device'), model=LaunchConfig('model'), " \
           "managed=LaunchConfig('managed'))" in out
    assert "'~/command:=forward_position_controller/commands'" in out
    assert f"ExecInPkg(pkg='{PACKAGE}', exec='flashrt-ros'), 'record'" in out
    args = ok(run("launch", "-s", PACKAGE, LAUNCH_FILE))
    for name in ("config", "namespace", "device", "model", "managed", "record", "bag"):
        assert f"'{name}':" in args


@pytest.mark.parametrize("argument", ["managed:=ture", "record:=yes"])
def test_launch_refuses_a_boolean_typo(argument, tmp_path):
    r = run("launch", PACKAGE, LAUNCH_FILE, argument, "device:=cpu",
            env=dict(ros2_env(), HOME=str(tmp_path)))
    name, value = argument.split(":=")
    assert r.returncode != 0, r.stdout
    assert f'Argument "{name}" provided value "{value}" is not valid' in r.stdout
    assert "process started" not in r.stdout               # nothing was started


def test_interface_show_and_package():
    for kind, folder in (("msg", "msg"), ("srv", "srv")):
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            name = f.rsplit(".", 1)[0]
            with open(os.path.join(ROOT, folder, f), encoding="utf-8") as src:
                fields = [line.split("#")[0].split() for line in src
                          if line.split("#")[0].strip()]
            out = ok(run("interface", "show", f"{PACKAGE}/{kind}/{name}"))
            shown = [line.split("#")[0].split() for line in out.splitlines()
                     if line.strip() and not line.startswith(("\t", " ")) and
                     line.split("#")[0].strip()]
            assert shown == fields, f"ros2 interface show {PACKAGE}/{kind}/{name}:\n{out}"
    listed = ok(run("interface", "package", PACKAGE)).split()
    expected = [f"{PACKAGE}/{d}/{f.rsplit('.', 1)[0]}" for d in ("msg", "srv")
                for f in os.listdir(os.path.join(ROOT, d))]
    assert sorted(listed) == sorted(expected)


def test_lifecycle_get_and_set(launched):
    node = launched["node"]
    assert lifecycle_state(node) == "unconfigured [1]"
    # a capsule service before configure: refused with the reason
    res = capsule_call(node, "reset", refused=True)
    assert res["success"] is False and res["message"], res
    set_state(node, "configure", "inactive")
    assert lifecycle_state(node) == "inactive [2]"
    # a transition no state machine has changes nothing: it may run again
    bad = discovered("lifecycle", "set", node, "cleanup_typo", "--no-daemon", resend=True)
    assert bad.returncode != 0 and "Unknown transition requested" in bad.stdout, bad.stdout
    set_state(node, "activate", "active")
    assert lifecycle_state(node) == "active [3]"
    states = ok(discovered("lifecycle", "list", node, "--no-daemon"))
    assert "deactivate" in states and "shutdown" in states


def test_node_info_shows_the_namespace_and_remappings(launched):
    node, ns = launched["node"], launched["namespace"]
    ensure_active(node)
    remapped = f"{ns}/forward_position_controller/commands: std_msgs/msg/Float64MultiArray"
    info = ok(discovered("node", "info", node, "--no-daemon",
                         until=lambda out: remapped in out and f"{node}/reset:" in out))
    publishers = info.split("Publishers:")[1].split("Service Servers:")[0]
    subscribers = info.split("Subscribers:")[1].split("Publishers:")[0]
    servers = info.split("Service Servers:")[1].split("Service Clients:")[0]
    # the launch file's remapping of ~/command, resolved inside the namespace
    assert remapped in publishers
    assert f"{node}/command:" not in publishers
    assert f"{node}/action: flashrt_ros/msg/ActionChunk" in publishers
    assert f"{node}/observation: flashrt_ros/msg/Observation" in subscribers
    for s in CAPSULE_SERVICES:
        srv_type = "".join(p.title() for p in s.split("_"))
        assert f"{node}/{s}: flashrt_ros/srv/{srv_type}" in servers
    ok(discovered("node", "list", "--no-daemon", until=lambda out: node in out.split()))


def test_param_list_get_set_describe_dump(launched):
    from flashrt_ros.ros.params import parameter_table
    node = launched["node"]
    ensure_active(node)
    listed = ok(discovered("param", "list", node, "--no-daemon")).split()
    for name, *_ in parameter_table():
        assert name in listed
    for name in MODEL_PARAMETERS:
        assert name in listed
    # the launch arguments and the params file arrived
    assert ok(discovered("param", "get", node, "runtime.device", "--no-daemon")).strip() == \
        "String value is: cpu"
    assert ok(discovered("param", "get", node, "managed", "--no-daemon")).strip() == \
        "Boolean value is: True"
    assert ok(discovered("param", "get", node, "command_output", "--no-daemon")).strip() == \
        "String value is: float64_multi_array"
    # a parameter that may change at any time, and a fixed one, refused while active
    ok(discovered("param", "set", node, "stale_observation_s", "0.75", "--no-daemon"),
       "Set parameter successful")
    assert ok(discovered("param", "get", node, "stale_observation_s", "--no-daemon")).strip() == \
        "Double value is: 0.75"
    refused = discovered("param", "set", node, "control_rate_hz", "10.0", "--no-daemon")
    assert "Setting parameter failed" in refused.stdout and "fixed" in refused.stdout, refused.stdout
    assert ok(discovered("param", "get", node, "control_rate_hz", "--no-daemon")).strip() == \
        "Double value is: 30.0"
    wrong_type = discovered("param", "set", node, "stale_observation_s", "soon", "--no-daemon")
    assert "Setting parameter failed" in wrong_type.stdout, wrong_type.stdout
    described = ok(discovered("param", "describe", node, "model", "--no-daemon"))
    assert "Type: string" in described and "preset" in described
    # the constraints the node enforces, shown before a set fails
    described = ok(discovered("param", "describe", node, "control_rate_hz", "--no-daemon"))
    assert "Min value: 0.0" in described and "Max value: 1000.0" in described, described
    described = ok(discovered("param", "describe", node, "store.eviction", "--no-daemon"))
    assert "Additional constraints: one of: demote, drop" in described, described
    # a name the node does not declare: refused, naming the closest one
    typo = discovered("param", "set", node, "runtime.devcie", "cuda", "--no-daemon")
    assert "Setting parameter failed" in typo.stdout and "runtime.device" in typo.stdout, \
        typo.stdout
    # the model's dimensions: read-only parameters
    for name, value in MODEL_PARAMETERS.items():
        assert ok(discovered("param", "get", node, name, "--no-daemon")).strip() == \
            f"Integer value is: {value}"
        assert "Read only: true" in ok(discovered("param", "describe", node, name, "--no-daemon"))
        r = discovered("param", "set", node, name, str(value + 1), "--no-daemon")
        assert "Setting parameter failed" in r.stdout, r.stdout
    # dump: every parameter (joint_names has no value unless set), as a params file
    dumped = yaml.safe_load(ok(discovered("param", "dump", node, "--no-daemon")))
    values = flatten(dumped[node]["ros__parameters"])
    expected = {name: default for name, default, *_ in parameter_table()}
    expected.update({"runtime.device": "cpu", "managed": True,
                     "command_output": "float64_multi_array", "stale_observation_s": 0.75,
                     "store.capsule_dir": str(launched["work"] / "capsules"), **MODEL_PARAMETERS})
    assert {k: values.get(k) for k in expected} == expected


def echo_while_observing(node, *topics):
    """`ros2 topic echo --once` of each (topic, type) while `ros2 topic pub` sends observations
    to `node`; returns the first message of each (as a dict)."""
    obs = json.dumps({"header": {"stamp": "now"}, "state": OBS})
    with Background("topic", "pub", "-r", "10", f"{node}/observation",
                    "flashrt_ros/msg/Observation", obs):
        return [yaml.safe_load(ok(discovered("topic", "echo", "--once", "--no-daemon", topic,
                                             msg_type, "--full-length")).split("---")[0])
                for topic, msg_type in topics]


def test_topic_pub_echo(launched):
    node, ns = launched["node"], launched["namespace"]
    ensure_active(node)
    chunk, command = echo_while_observing(
        node, (f"{node}/action", "flashrt_ros/msg/ActionChunk"),
        (f"{ns}/forward_position_controller/commands", "std_msgs/msg/Float64MultiArray"))
    assert chunk["step"] >= 1
    assert (chunk["horizon"], chunk["action_dim"]) == (MODEL_PARAMETERS["horizon"],
                                                       MODEL_PARAMETERS["action_dim"])
    assert len(chunk["data"]) == chunk["horizon"] * chunk["action_dim"]
    assert len(command["data"]) == MODEL_PARAMETERS["action_dim"]


def test_service_call_of_every_capsule_service(launched):
    node = launched["node"]
    ensure_active(node)
    call = lambda service, **req: capsule_call(node, service, **req)  # noqa: E731

    def good(res):
        assert res["success"] is True, res
        return res

    def bad(service, *words, **req):
        res = capsule_call(node, service, refused=True, **req)
        assert res["success"] is False, res
        assert all(w in res["message"] for w in words), res["message"]

    snap = good(call("snapshot", name="cli_a"))
    assert snap["capsule"]["name"] == "cli_a" and snap["capsule"]["tier"] == "host"
    bad("snapshot", "exists", name="cli_a")
    bad("snapshot", name="../escape")
    bad("snapshot", "tape", name="cli_b", tier="tape")
    listed = good(call("list_capsules"))
    assert "cli_a" in [c["name"] for c in listed["capsules"]]
    bad("list_capsules", "tape", tier="tape")
    good(call("fork", source="cli_a", name="cli_fork"))
    bad("fork", "cli_missing", source="cli_missing", name="cli_fork2")
    good(call("restore", name="cli_a"))
    bad("restore", "cli_missing", name="cli_missing")
    bad("rollback", k=100000)
    saved = good(call("save_capsule", name="cli_a"))
    assert os.path.isfile(saved["path"])
    bad("save_capsule", "cli_missing", name="cli_missing")
    # saving copies (the memory copy stays): a plain call loses nothing
    assert "cli_a" in [c["name"] for c in good(call("list_capsules", tier="host"))["capsules"]]
    # load: refused for a capsule only in memory, and for a tier the .srv does not allow
    bad("load_capsule", "cli_fork", name="cli_fork")
    bad("load_capsule", "disk", name="cli_a", tier="disk")
    # delete: the memory copy; the saved file stays unless delete_file
    good(call("delete_capsule", name="cli_a"))
    assert os.path.isfile(saved["path"])
    bad("delete_capsule", "cli_a", name="cli_a")
    loaded = good(call("load_capsule", name="cli_a", tier="host"))
    assert loaded["capsule"]["name"] == "cli_a"
    good(call("delete_capsule", name="cli_fork"))
    good(call("reset", keep_context=True))


def test_ros2_run_starts_the_node(tmp_path):
    namespace = f"run_{os.getpid()}"
    cmd = [executable("ros2"), "run", PACKAGE, "flashrt_node", "--ros-args",
           "-r", f"__ns:=/{namespace}", "-p", "runtime.device:=cpu", "-p", "managed:=false",
           "-p", f"store.capsule_dir:={tmp_path / 'capsules'}"]
    with NodeProcess(cmd, dict(ros2_env(), HOME=str(tmp_path)), namespace=namespace) as proc:
        proc.wait_log("active: stepping the policy")
        assert lifecycle_state(proc.node) == "active [3]"
        res = capsule_call(proc.node, "snapshot", name="run_a")
        assert res["success"] is True, res
        # Ctrl-C in a terminal: SIGINT to the whole process group (ros2 run waits for its child)
        os.killpg(proc.proc.pid, signal.SIGINT)
        wait_for(lambda: not proc.alive(), 60, "ros2 run to end after SIGINT")


def test_launch_defaults_and_lifecycle_shutdown_ends_the_process(tmp_path):
    """Package defaults (the installed config/flashrt_policy.yaml) with managed:=false; the
    lifecycle shutdown transition ends the node, and with it the launch."""
    from flashrt_ros.ros.params import parameter_table
    defaults = {name: default for name, default, *_ in parameter_table()}
    namespace = f"defaults_{os.getpid()}"
    cmd = [executable("ros2"), "launch", PACKAGE, LAUNCH_FILE, f"namespace:={namespace}",
           "managed:=false", "device:=cpu"]
    with NodeProcess(cmd, dict(ros2_env(), HOME=str(tmp_path)), namespace=namespace,
                     stop_timeout=30) as proc:
        proc.wait_log("active: stepping the policy")
        assert lifecycle_state(proc.node) == "active [3]"
        for name in ("model", "control_mode"):
            got = ok(discovered("param", "get", proc.node, name, "--no-daemon")).strip()
            assert got == f"String value is: {defaults[name]}"
        set_state(proc.node, "shutdown")
        wait_for(lambda: not proc.alive(), 60, "the launch to end after the node's shutdown")
        assert proc.proc.returncode == 0, proc.log(40)
        assert re.search(r"\[flashrt_node-1\]: process has finished cleanly", proc.log()), \
            proc.log(40)


def test_record_true_records_the_episode(launched):
    """Last of the `launched` tests: it ends that launch. record:=true ran the package's recorder
    beside the node; stopped with the launch, it leaves a rosbag2 bag holding the actions."""
    proc, node = launched["proc"], launched["node"]
    ensure_active(node)
    proc.wait_log(f"[record] recording {node}/action")
    echo_while_observing(node, (f"{node}/action", "flashrt_ros/msg/ActionChunk"))
    os.killpg(proc.proc.pid, signal.SIGINT)                 # Ctrl-C
    wait_for(lambda: not proc.alive(), 60, "the launch to end after SIGINT")
    with open(launched["bag"] / "metadata.yaml", encoding="utf-8") as f:
        info = yaml.safe_load(f)["rosbag2_bagfile_information"]
    counts = {t["topic_metadata"]["name"]: t["message_count"]
              for t in info["topics_with_message_count"]}
    assert counts.get(f"{node}/action", 0) > 0, counts
