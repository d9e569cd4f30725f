"""Every flashrt_ros service type works across processes over DDS on loopback.

A separate process (fixtures/echo_services.py) serves all nine types; this process is the client.
Each request has every field set to a non-default value, and the server answers with the request's
repr, so the test sees the request arrive whole and the response come back whole.
"""
import importlib.util
import os
import subprocess
import sys
import threading

import pytest

from flashrt_ros.ros.waiting import spin_until, wait_for

pytestmark = pytest.mark.ros

ECHO_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "echo_services.py")
SERVICE_TYPES = ("Snapshot", "Restore", "Fork", "Rollback", "ListCapsules", "DeleteCapsule", "SaveCapsule",
                 "LoadCapsule", "Reset")
STARTUP_TIMEOUT_S = 30  # the server imports rclpy and creates nine services
DISCOVERY_TIMEOUT_S = 10  # discovery takes 0.05 s to a few seconds here
CALL_TIMEOUT_S = 5


def _load_echo_services():
    spec = importlib.util.spec_from_file_location("echo_services", ECHO_SERVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def echo_services():
    """The echo server's module, for its service table and naming."""
    return _load_echo_services()


@pytest.fixture(scope="module")
def echo_server(ros_env):
    """Starts the echo server in its own process; yields its namespace; always stops it."""
    namespace = "/echo_%d" % os.getpid()
    proc = subprocess.Popen([sys.executable, ECHO_SERVER, namespace], env=ros_env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()

    def ready():
        if proc.poll() is not None:
            raise RuntimeError("echo server exited with %s:\n%s" % (proc.returncode, "".join(output)))
        return "ready\n" in output

    try:
        wait_for(ready, STARTUP_TIMEOUT_S, "the echo server to print 'ready'")
        yield namespace
    finally:
        proc.stdin.close()  # the server's cue to exit
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=5)


@pytest.fixture(scope="module")
def client_node():
    """A node in its own rclpy context with a single-threaded executor (the test drives spinning)."""
    import rclpy
    from flashrt_ros.ros.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("cross_process_client", context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        yield node, executor
        executor.shutdown()
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def _filled_request(srv_type):
    """A request with every field set to a value other than its default."""
    request = srv_type.Request()
    for field, kind in srv_type.Request.get_fields_and_field_types().items():
        if kind.startswith("string"):
            setattr(request, field, "%s-value" % field)
        elif kind == "boolean":
            setattr(request, field, True)
        elif kind.startswith(("uint", "int")):
            setattr(request, field, 7)
        else:
            raise AssertionError("no test value for %s field %s of type %s" % (srv_type.__name__, field, kind))
    return request


def test_echo_server_serves_every_service_type(echo_services):
    assert sorted(echo_services.service_types()) == sorted(SERVICE_TYPES)


@pytest.mark.parametrize("type_name", SERVICE_TYPES)
def test_service_answers_across_processes(type_name, echo_services, echo_server, client_node):
    node, executor = client_node
    srv_type = echo_services.service_types()[type_name]
    name = echo_services.service_name(echo_server, type_name)
    client = node.create_client(srv_type, name)
    try:
        wait_for(client.service_is_ready, DISCOVERY_TIMEOUT_S, "service %s from the echo server" % name)
        request = _filled_request(srv_type)
        future = client.call_async(request)
        spin_until(executor, future.done, CALL_TIMEOUT_S, "the response of %s" % name)
        response = future.result()
        assert response.success is True
        assert response.message == repr(request)
    finally:
        node.destroy_client(client)
