"""`flashrt-ros` when a service answer never arrives (rmw_fastrtps can drop a fresh client's first
answer although the node applied the request; docs/node.md, known issues).

The answer loss cannot be provoked on demand in a real node, so a stand-in serves `~/snapshot`
over real DDS: it publishes the CapsuleEvent the real node publishes when it applies a request,
then holds its answer back until the CLI has given up. The CLI must report the operation as
applied (exit 0) on the strength of that event, and must fail with advice when no event came.
"""
import subprocess
import threading

import pytest

from flashrt_ros.ros.waiting import wait_for
from node_client import executable

pytestmark = pytest.mark.ros

NODE = "/stand_in_policy"
CLI_TIMEOUT_S = 3           # how long the CLI waits for the answer that never comes
DISCOVERY_S = 60            # how long it may wait for the stand-in's service (a busy CI machine
                            # once took more than 3 s to discover it)


@pytest.fixture
def stand_in():
    import rclpy
    from flashrt_ros.ros.executors import MultiThreadedExecutor
    from rclpy.qos import QoSProfile, QoSReliabilityPolicy

    from flashrt_ros.msg import CapsuleEvent
    from flashrt_ros.srv import Snapshot

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(NODE.strip("/"), context=context)
    events = node.create_publisher(CapsuleEvent, f"{NODE}/capsule_events",
                                   QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE))
    release = threading.Event()
    state = {"publish_event": True, "requests": 0}

    def snapshot(request, response):
        state["requests"] += 1
        if state["publish_event"]:
            wait_for(lambda: events.get_subscription_count() > 0, DISCOVERY_S,
                     "the CLI's event subscription")
            events.publish(CapsuleEvent(operation="snapshot", name=request.name, step=7,
                                        success=True, message=f"snapshot {request.name!r}"))
        release.wait(CLI_TIMEOUT_S + 30)         # the answer comes after the CLI gave up
        response.success = True
        return response

    node.create_service(Snapshot, f"{NODE}/snapshot", snapshot)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        yield state
    finally:
        release.set()
        executor.shutdown(timeout_sec=5)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        spinner.join(timeout=5)


def cli(env, *args):
    return subprocess.run([executable("flashrt-ros"), "--node", NODE, "--timeout", str(CLI_TIMEOUT_S),
                           "--discovery-timeout", str(DISCOVERY_S), *args],
                          env=env, capture_output=True, text=True, timeout=DISCOVERY_S + 60)


def test_a_lost_answer_confirmed_by_the_capsule_event_is_success(stand_in, ros_env):
    r = cli(ros_env, "snapshot", "home")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "snapshot: ok: snapshot 'home'" in r.stdout
    assert "the answer was lost in DDS" in r.stdout and "at step 7" in r.stdout
    assert stand_in["requests"] == 1


def test_a_lost_answer_without_an_event_fails_with_advice(stand_in, ros_env):
    stand_in["publish_event"] = False
    r = cli(ros_env, "snapshot", "home")
    assert r.returncode != 0
    assert "did not answer within 3 s" in r.stderr and "flashrt-ros list" in r.stderr, r.stderr
    assert stand_in["requests"] == 1
