"""Test side of the policy node: start `flashrt_node` as a child process, drive it over DDS.

`NodeProcess`, `node_command` and `executable` come from flashrt_ros.ros.process (the node as a
child process: a params file and `-p` overrides, its log lines collected, always ended - SIGINT,
then SIGKILL after a timeout). `PolicyClient` is an rclpy node in its own context, spun by a
SingleThreadedExecutor in a background thread: it publishes observations, collects actions,
status, diagnostics and capsule events, and calls services and lifecycle transitions. Every wait
has a deadline (flashrt_ros.ros.waiting.wait_for); nothing sleeps a fixed time.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
import time

import numpy as np
import pytest

from flashrt_ros.ros.process import NodeProcess, executable, node_command  # noqa: F401 - re-exported
from flashrt_ros.ros.stamps import stamp_to_s
from flashrt_ros.ros.waiting import wait_for

DISCOVERY_TIMEOUT_S = 15
CALL_TIMEOUT_S = 15
ACTION_TIMEOUT_S = 15


def _read_only(srv_type) -> bool:
    """Whether calling `srv_type` changes nothing: the parameter services' list/get/describe,
    lifecycle get_state, list_capsules."""
    return srv_type.__name__.startswith(("List", "Get", "Describe"))


def _probe(srv_type):
    """A request of `srv_type` that changes nothing and is answered (with a refusal), or None:
    a transition label no state machine has; an empty list of parameters to set."""
    if srv_type.__name__ == "ChangeState":
        from lifecycle_msgs.msg import Transition
        return srv_type.Request(transition=Transition(label="probe_the_reply_path"))
    if srv_type.__name__ == "SetParameters":
        return srv_type.Request(parameters=[])
    return None


def observations(n: int, dim: int = 14, seed: int = 0) -> np.ndarray:
    """Deterministic observations [n, dim] float32."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, dim)).astype(np.float32)


def chunk_bytes(msg) -> bytes:
    return np.asarray(msg.data, dtype=np.float32).tobytes()


class PolicyClient:
    """Publishes observations to and calls services of the policy node `target` (its FQN)."""

    def __init__(self, target: str = "/flashrt_policy", name: str = "policy_test_client"):
        import rclpy
        from flashrt_ros.ros.executors import SingleThreadedExecutor
        from rclpy.qos import QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy

        from diagnostic_msgs.msg import DiagnosticArray
        from flashrt_ros.msg import ActionChunk, CapsuleEvent, Observation, PolicyStatus

        self.target = target.rstrip("/")
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"{name}_{os.getpid()}", context=self.context)
        keep_all = QoSProfile(depth=1000, reliability=QoSReliabilityPolicy.RELIABLE,
                              history=QoSHistoryPolicy.KEEP_LAST)
        self.actions, self.events, self.statuses, self.diagnostics = [], [], [], []
        self.commands = []
        self.pub_obs = self.node.create_publisher(Observation, f"{self.target}/observation", keep_all)
        self.subs = [
            self.node.create_subscription(ActionChunk, f"{self.target}/action",
                                          self.actions.append, keep_all),
            self.node.create_subscription(CapsuleEvent, f"{self.target}/capsule_events",
                                          self.events.append, keep_all),
            self.node.create_subscription(PolicyStatus, f"{self.target}/status",
                                          self.statuses.append, keep_all),
            self.node.create_subscription(DiagnosticArray, "/diagnostics",
                                          self.diagnostics.append, keep_all),
        ]
        # Every service client of the node is created now, not at its first call: DDS drops the
        # reply to a client the server has not matched yet (see _client), and by the time a test
        # calls, the server has had the node's configure to match these.
        from lifecycle_msgs.srv import ChangeState, GetState
        from rcl_interfaces.srv import SetParameters

        from flashrt_ros.ros.operations import OPERATIONS
        self._clients = {}
        self._warm = set()
        for srv_type, service in [(ChangeState, "change_state"), (GetState, "get_state"),
                                  (SetParameters, "set_parameters"),
                                  *((o.srv_type, o.service) for o in OPERATIONS)]:
            name = f"{self.target}/{service}"
            self._clients[name] = self.node.create_client(srv_type, name)
        self._pubs = {}
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self._spin_loop, daemon=True)
        self._stop = False
        self._spin.start()

    def _spin_loop(self):
        while not self._stop and self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # noqa: BLE001 - shutting down
                if self._stop:
                    return
                raise

    def close(self):
        import rclpy
        self._stop = True
        self._spin.join(timeout=5)
        self.executor.shutdown(timeout_sec=1)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    # -- topics ---------------------------------------------------------------------------
    def matched(self, sub) -> bool:
        """Whether a subscription has a publisher (matched where rclpy can say, else in the graph)."""
        count = getattr(sub, "get_publisher_count", None)
        return (count() if count else self.node.count_publishers(sub.topic_name)) > 0

    def wait_connected(self, timeout=DISCOVERY_TIMEOUT_S):
        """Until the node subscribes our observations and we receive its status and actions."""
        def connected():
            return (self.pub_obs.get_subscription_count() > 0 and self.matched(self.subs[0])
                    and self.statuses)
        wait_for(connected, timeout, f"{self.target}: observation subscriber, action publisher, "
                                     f"a status message")

    def publish(self, state, reset=False, stamp=True):
        from flashrt_ros.msg import Observation
        msg = Observation()
        if stamp:
            msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.state = [float(x) for x in np.asarray(state, dtype=np.float32)]
        msg.reset_episode = reset
        self.pub_obs.publish(msg)
        return msg

    def step(self, state, reset=False, timeout=ACTION_TIMEOUT_S):
        """Publish one observation and return the action chunk that answers it."""
        n = len(self.actions)
        msg = self.publish(state, reset)
        wait_for(lambda: len(self.actions) > n, timeout, f"an action from {self.target}")
        action = self.actions[n]
        assert action.observation_stamp == msg.header.stamp, "an action answered another observation"
        return action

    def run(self, states) -> list:
        return [self.step(s) for s in states]

    def publisher(self, msg_type, topic, depth=10, qos=None):
        """A reliable publisher (or one with `qos`, e.g. ros/publishing.LATCHED for
        ~/instruction, which the node subscribes latched)."""
        from rclpy.qos import QoSProfile, QoSReliabilityPolicy
        if topic not in self._pubs:
            self._pubs[topic] = self.node.create_publisher(
                msg_type, topic,
                qos or QoSProfile(depth=depth, reliability=QoSReliabilityPolicy.RELIABLE))
        return self._pubs[topic]

    def collect(self, msg_type, topic) -> list:
        from rclpy.qos import QoSProfile, QoSReliabilityPolicy
        got = []
        self.subs.append(self.node.create_subscription(
            msg_type, topic, got.append, QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE)))
        return got

    def latest_status(self, after: float | None = None, timeout=DISCOVERY_TIMEOUT_S):
        """A status message published after `after` (time.time(); default: now)."""
        t = time.time() if after is None else after

        def fresh():
            for s in reversed(self.statuses):
                if stamp_to_s(s.header.stamp) > t:
                    return s
            return None
        return wait_for(fresh, timeout, f"a fresh status from {self.target}")

    # -- services -------------------------------------------------------------------------
    def _client(self, srv_type, name: str, timeout: float):
        """The client of service `name`, its reply path warmed up at its first call.

        On a busy machine a service can answer a new client before it matched the client's reply
        reader, and DDS then drops the reply ("failed to send response (timeout)"); a read-only
        call is simply sent again (see call), but a transition is sent once. So the first call
        of change_state or set_parameters is preceded by a request that changes nothing
        (`_probe`), sent until one answer comes back: from then on the server has matched this
        client's reader."""
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = self.node.create_client(srv_type, name)
        wait_for(client.service_is_ready, timeout, f"service {name}")
        if name not in self._warm:
            probe = _probe(srv_type)
            if probe is not None:
                self._send(client, probe, timeout, name, attempts=10)
            self._warm.add(name)
        return client

    def call(self, srv_type, service: str, timeout=CALL_TIMEOUT_S, **fields):
        name = service if service.startswith("/") else f"{self.target}/{service}"
        client = self._client(srv_type, name, timeout)
        request = srv_type.Request()
        for k, v in fields.items():
            setattr(request, k, v)
        # A read-only call is sent again when its answer does not come (see _client); calls
        # that change state are sent once.
        return self._send(client, request, timeout, name, 3 if _read_only(srv_type) else 1)

    @staticmethod
    def _send(client, request, timeout: float, name: str, attempts: int):
        """Send `request` up to `attempts` times, `timeout / attempts` seconds each; its answer."""
        for attempt in range(attempts):
            future = client.call_async(request)
            try:
                wait_for(future.done, timeout / attempts, f"the answer of {name}")
                return future.result()
            except TimeoutError:
                client.remove_pending_request(future)
                if attempt == attempts - 1:
                    raise

    def capsule(self, op: str, **fields):
        """Call capsule operation `op` (its name or service name: "delete", "delete_capsule")."""
        from flashrt_ros.ros.operations import operation
        o = operation(op)
        return self.call(o.srv_type, o.service, **fields)

    def transition(self, name: str) -> bool:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState
        ids = {"configure": Transition.TRANSITION_CONFIGURE,
               "activate": Transition.TRANSITION_ACTIVATE,
               "deactivate": Transition.TRANSITION_DEACTIVATE,
               "cleanup": Transition.TRANSITION_CLEANUP,
               "shutdown": Transition.TRANSITION_UNCONFIGURED_SHUTDOWN}
        req_transition = Transition(id=ids[name])
        return self.call(ChangeState, "change_state", transition=req_transition, timeout=60).success

    def state(self) -> str:
        from lifecycle_msgs.srv import GetState
        return self.call(GetState, "get_state").current_state.label

    def set_parameter(self, name, value):
        """Returns (successful, reason)."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter
        res = self.call(SetParameters, "set_parameters",
                        parameters=[Parameter(name, value=value).to_parameter_msg()])
        return res.results[0].successful, res.results[0].reason

    def get_parameters(self, names) -> dict:
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python
        res = self.call(GetParameters, "get_parameters", names=list(names))
        out = {}
        for n, v in zip(names, res.values):
            v = parameter_value_to_python(v)
            out[n] = v.tolist() if hasattr(v, "tolist") else v
        return out


class InProcessNode:
    """A PolicyNode in `context`, spun by its real executor (PolicyExecutor) in a thread, and a
    PolicyClient for it."""

    def __init__(self, context, namespace, **params):
        from rclpy.parameter import Parameter

        from flashrt_ros.ros.executors import PolicyExecutor
        from flashrt_ros.ros.node import PolicyNode
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        self.node = PolicyNode(context=context, namespace=namespace, parameter_overrides=overrides)
        self.executor = PolicyExecutor(num_threads=4, context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.client = PolicyClient(f"{namespace}/flashrt_policy", name="inprocess_client")

    def close(self):
        self.client.close()
        self.executor.shutdown(timeout_sec=5)
        self.thread.join(timeout=5)
        self.node.destroy_node()


@pytest.fixture(scope="module")
def ros_context():
    """An rclpy context of the test module's own."""
    import rclpy
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


NODE_SEQUENCE = itertools.count()


@pytest.fixture
def make_node(ros_context, tmp_path, request):
    """make(**params) -> an InProcessNode (CPU, capsules under tmp_path); all closed at the end."""
    made = []

    def make(**params):
        params.setdefault("store.capsule_dir", str(tmp_path / "capsules"))
        params.setdefault("runtime.device", "cpu")
        # unique in the session: parametrized cases share a test name, and a node of a case
        # that just ended can still be known to DDS discovery under its old name
        ns = f"/t{os.getpid()}_{request.node.name.split('[')[0][-24:]}_{next(NODE_SEQUENCE)}"
        n = InProcessNode(ros_context, ns, **params)
        made.append(n)
        return n
    yield make
    for n in made:
        n.close()


# -- the real `ros2` tools ----------------------------------------------------------------------
ROS2_TIMEOUT_S = 90          # one `ros2` command: starts Python, discovers the node, calls


def ros2_env(env: dict | None = None) -> dict:
    """`env` (default: this process's) for a `ros2` command: the ament index of a colcon
    workspace that was sourced, else this venv's prefix (where the bootstrap installs the package
    and the tools); this venv's executables first on PATH."""
    import sys
    env = dict(os.environ if env is None else env)
    env.setdefault("AMENT_PREFIX_PATH", sys.prefix)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ros2_problem() -> str | None:
    """Why the real `ros2` tools cannot run here, or None."""
    import shutil
    exe = executable("ros2")
    if not (os.path.exists(exe) or shutil.which(exe)):
        return ("needs the ros2 command-line tools (ros2cli, ros2param, ros2service, ros2topic, "
                "ros2lifecycle): `bash tools/bootstrap.sh` installs them from ../shared/ros2-tools, "
                "a sourced ROS 2 install has them")
    return None


def require_ros2():
    """Skip the calling test, with the reason, where the `ros2` tools are absent (fail instead
    with FLASHRT_REQUIRE_ROS2=1, as the `ros2cli` marker does)."""
    problem = ros2_problem()
    if problem:
        if os.environ.get("FLASHRT_REQUIRE_ROS2") == "1":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)


# A line Fast DDS logs itself into a process's stdout (its default log consumer), in colour:
# `2026-12-01 12:35:32.234 [RTPS_TRANSPORT_SHM Error] Failed init_port ...`. It is the
# middleware's notice (a shared-memory port another process holds, say), not a tool's answer.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FASTDDS_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[\w+ (Error|Warning|Info)\] ")


def without_middleware_log(text: str) -> str:
    """`text` less the lines Fast DDS logged into it."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not _FASTDDS_LOG.match(_ANSI.sub("", line)))


# The `ros2` verbs that may run again when their answer did not come. rmw_fastrtps drops a
# reply it sends before the server matched the client's reply reader, and these tools then wait
# for ever (config/fastdds.xml makes it rare). Each verb here only reads, or sets what it set
# before, so a second run answers the question the first one asked.
RESENDABLE = {("param", "get"), ("param", "list"), ("param", "describe"), ("param", "dump"),
              ("param", "set"), ("lifecycle", "get"), ("lifecycle", "list"), ("node", "info"),
              ("node", "list"), ("service", "list"), ("topic", "list"), ("topic", "info")}
ANSWER_TIMEOUT_S = 30        # one run of a resendable verb (a few seconds when the answer comes)


class Unanswered(AssertionError):
    """A `ros2` command that did not finish in time: its answer was lost, or it hangs."""


def ros2(*args, env: dict | None = None, timeout: float = ROS2_TIMEOUT_S, check: bool = False,
         merged: bool = False, resend: bool | None = None):
    """Run `ros2 <args>` (a subprocess); returns the CompletedProcess (stdout and stderr as text,
    less the middleware's own log lines; `merged`: both in .stdout). A verb in RESENDABLE (or any
    command, with `resend=True`) runs again while a run ends without an answer, until `timeout`.
    Raises Unanswered when no run finished. With `check`, a non-zero exit status fails with the
    command's output."""
    import subprocess
    args = [str(a) for a in args]
    if resend is None:
        resend = tuple(args[:2]) in RESENDABLE
    deadline, runs = time.monotonic() + timeout, 0
    while True:
        left = deadline - time.monotonic()
        attempt = min(ANSWER_TIMEOUT_S, left) if resend else left
        runs += 1
        try:
            r = subprocess.run([executable("ros2"), *args], env=ros2_env(env), text=True,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT if merged else subprocess.PIPE,
                               timeout=attempt, stdin=subprocess.DEVNULL)
            break
        except subprocess.TimeoutExpired as e:
            out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else \
                (e.output or "")
            if not resend or deadline - time.monotonic() < 1:
                raise Unanswered(f"`ros2 {' '.join(args)}` did not finish within {timeout:.0f} s "
                                 f"({runs} run(s)); its output:\n{without_middleware_log(out)}") \
                    from None
    r.stdout = without_middleware_log(r.stdout)
    r.stderr = without_middleware_log(r.stderr or "")
    if check:
        assert r.returncode == 0, f"ros2 {' '.join(args)}: exit {r.returncode}\n" \
                                  f"{r.stdout}\n{r.stderr}"
    return r


@contextlib.contextmanager
def configured_node(namespace: str, capsule_dir: str, **params):
    """A configured PolicyNode (tiny, CPU, observation mode) in an rclpy context of its own, not
    spun, after three control steps: the tests call its service callbacks directly."""
    import rclpy
    from rclpy.parameter import Parameter

    from flashrt_ros.ros.node import PolicyNode
    context = rclpy.Context()
    rclpy.init(context=context)
    params = {"managed": True, "runtime.device": "cpu", "control_mode": "observation",
              "store.capsule_dir": str(capsule_dir), **params}
    n = PolicyNode(context=context, namespace=namespace,
                   parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    try:
        n.trigger_configure()
        assert n.runtime is not None
        for i in range(3):
            n.runtime.step([0.1 * i] * 14)
        yield n
    finally:
        n.destroy_node()
        rclpy.try_shutdown(context=context)


def service_callbacks(node) -> dict:
    """{service basename: (srv type, the callback the node registered)} of a node's capsule
    services."""
    return {s.srv_name.rsplit("/", 1)[-1]: (s.srv_type, s.callback) for s in node.capsule_services}


def call_service(node, service: str, **fields):
    """Call the capsule service callback `service` (its basename) a node registered, as its
    executor would, and serialise the answer as rclpy sends it (a value that does not fit its
    message field raises there: where the node would die sending it)."""
    from rclpy.serialization import serialize_message
    srv_type, cb = service_callbacks(node)[service]
    res = cb(srv_type.Request(**fields), srv_type.Response())
    serialize_message(res)
    return res
