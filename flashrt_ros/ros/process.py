"""The policy node (or any command) as a child process: its output collected, always ended.

Tests, the bag regression helper (flashrt_ros.testing) and the ROS benchmark run `flashrt_node`
in a process of its own, as a robot would. `NodeProcess` is the one way they do it:

    with NodeProcess(params={"managed": False, "runtime": {"device": "cpu"}},
                     namespace="/bench") as node:
        node.wait_log(ACTIVE_LOG_LINE)          # or node.wait_active(): its status says active
        ...                                     # talk to node.node ("/bench/flashrt_policy")

Given `params`, it writes them to a params file (no shell quoting; dotted names or nested dicts)
and starts `flashrt_node` with it; given `cmd`, it runs that command line instead (the launch
file's, a hand-built one). Either way stdout and stderr are collected line by line in `output`
(a reader thread), stdin is closed, and the child runs in its own session so that leaving the
context - SIGINT, then SIGKILL of its process group after `stop_timeout` - ends everything it
started. The child's environment keeps DDS on loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
unless it says otherwise) and its output unbuffered. Every wait has a deadline
(flashrt_ros.ros.waiting) and names what it waited for.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from flashrt_ros.ros.discovery import loopback_by_default
from flashrt_ros.ros.waiting import spin_until, wait_for

NODE_NAME = "flashrt_policy"                  # the node's default name (ros/node.py)
ACTIVE_LOG_LINE = "active: stepping the policy"
STARTUP_TIMEOUT_S = 120.0   # imports torch and rclpy, configures, warms up; slow on a busy machine


class ProcessExited(RuntimeError):
    """The child process ended while it was expected to run."""


def executable(name: str) -> str:
    """A console script of this environment: beside this interpreter (a venv that was not
    activated), else on PATH, else the bare name."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else (shutil.which(name) or name)


def node_executable() -> list:
    """How to start the node: the `flashrt_node` console script, or this interpreter running
    flashrt_ros.ros.node where the script is not installed."""
    exe = executable("flashrt_node")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "flashrt_ros.ros.node"]


def nested(params: dict) -> dict:
    """{"store.capsule_dir": x} -> {"store": {"capsule_dir": x}} (the ROS params-file layout);
    nested dicts pass through."""
    out = {}
    for name, value in params.items():
        *parents, leaf = name.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = list(value) if isinstance(value, tuple) else value
    return out


def write_params_file(path: str, params: dict, nodes: str = "/**") -> str:
    """Write `params` as a ROS params file for the nodes `nodes` matches; returns `path`."""
    import yaml
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({nodes: {"ros__parameters": nested(params)}}, f)
    return path


def node_command(params_file: str = "", overrides: dict | None = None, *, name: str = "",
                 namespace: str = "", remaps=()) -> list:
    """The command line of a flashrt_node: a params file, `-p name:=value` overrides (booleans as
    true/false), the node renamed to `name` and put in `namespace`, `-r from:=to` remappings."""
    cmd = node_executable() + ["--ros-args"]
    if name:
        cmd += ["-r", f"__node:={name.strip('/')}"]
    if namespace:
        cmd += ["-r", f"__ns:=/{namespace.strip('/')}"]
    if params_file:
        cmd += ["--params-file", params_file]
    for k, v in (overrides or {}).items():
        v = ("true" if v else "false") if isinstance(v, bool) else v
        cmd += ["-p", f"{k}:={v}"]
    for a, b in remaps:
        cmd += ["-r", f"{a}:={b}"]
    return cmd


class NodeProcess:
    """A child process running the policy node (or `cmd`); use as a context manager.

    Args:
        cmd: the command line to run; None: flashrt_node with `params` and `overrides`.
        env: the child's environment (default: this process's).
        params: node parameters for the params file (dotted names or nested dicts).
        overrides: parameters given on the command line (`-p`), after the params file.
        name, namespace: the node's name and namespace (renamed on the command line when `cmd`
            is None; otherwise they only say what `cmd` starts, for `node` and `wait_active`).
        stop_timeout: seconds SIGINT has to end the process before SIGKILL.
    """

    def __init__(self, cmd: list | None = None, env: dict | None = None, *,
                 params: dict | None = None, overrides: dict | None = None, name: str = "",
                 namespace: str = "", stop_timeout: float = 10.0):
        self.cmd, self.params, self.overrides = cmd, params, overrides
        self.name, self.namespace = name.strip("/"), namespace.strip("/")
        self.env = dict(os.environ if env is None else env)
        loopback_by_default(self.env)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.stop_timeout = stop_timeout
        self.output: list[str] = []
        self.proc = None
        self._dir = None

    @property
    def node(self) -> str:
        """The node's fully qualified name."""
        return f"/{self.namespace}/{self.name or NODE_NAME}".replace("//", "/")

    def __enter__(self):
        cmd = self.cmd
        if cmd is None:
            self._dir = tempfile.TemporaryDirectory(prefix="flashrt_node_")
            path = write_params_file(os.path.join(self._dir.name, "params.yaml"), self.params or {})
            cmd = self.cmd = node_command(path, self.overrides, name=self.name,
                                          namespace=self.namespace)
        self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=lambda: self.output.extend(self.proc.stdout),
                                        daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- state ------------------------------------------------------------------------------
    def log(self, last: int | None = None) -> str:
        """The output so far (its `last` lines only, if given)."""
        lines = self.output if last is None else self.output[-last:]
        return "".join(lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self):
        """Raises ProcessExited (with the last lines of its output) if the process ended."""
        if self.proc.poll() is not None:
            raise ProcessExited(f"{self.node} ({self.cmd[0]}) exited with {self.proc.returncode}; "
                                f"expected it to run. Its last output:\n{self.log(40)}")

    # -- waiting ----------------------------------------------------------------------------
    def wait_log(self, text: str, timeout: float = STARTUP_TIMEOUT_S):
        """Wait until `text` appears in the output (ProcessExited if the process ends first)."""
        def seen():
            if text in self.log():
                return True
            self.check_alive()
            return False
        wait_for(seen, timeout, f"{text!r} in the output of {self.node}")

    def wait_active(self, timeout: float = STARTUP_TIMEOUT_S) -> float:
        """Wait until the node reports `active` on its status topic; returns the seconds taken.

        Unlike `wait_log`, this also proves that this process discovers the node over DDS.
        Raises ProcessExited if the process ends first, TimeoutError at the deadline."""
        import rclpy
        from rclpy.qos import QoSProfile, QoSReliabilityPolicy

        from flashrt_ros.msg import PolicyStatus
        from flashrt_ros.ros.executors import SingleThreadedExecutor
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

            def active():
                self.check_alive()
                return seen and seen[-1].lifecycle_state == "active"
            try:
                spin_until(executor, active, timeout, f"{self.node} to be active", interval=0.05)
            except TimeoutError as e:
                state = seen[-1].lifecycle_state if seen else "no status message"
                raise TimeoutError(f"{e} (found: {state}); its last output:\n{self.log(40)}") \
                    from None
            finally:
                executor.shutdown(timeout_sec=1.0)
                probe.destroy_node()
        finally:
            rclpy.try_shutdown(context=context)
        return time.monotonic() - t0

    # -- ending -----------------------------------------------------------------------------
    def stop(self, timeout: float | None = None) -> int:
        """SIGINT, then SIGKILL of its process group after `timeout` (default stop_timeout);
        returns the exit status."""
        timeout = self.stop_timeout if timeout is None else timeout
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        return self.proc.returncode
