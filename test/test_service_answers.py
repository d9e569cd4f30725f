"""Every client of a service receives every answer of that service (rmw_fastrtps sends the answer
to all of them and each keeps only its own, when it takes it): a client that has not taken its
answer yet while other clients get 10 answers of the same service lost it from rclpy's default
10-deep response history - the storm's lost answers (docs/node.md, Reliability). CapsuleClient's
clients keep a deeper history (client.RESPONSE_QOS), and their answer survives."""
import threading

import pytest

from flashrt_ros.ros.waiting import spin_until

pytestmark = pytest.mark.ros
OTHERS = 30         # answers other clients take while ours waits, three times the default depth


def test_an_answer_survives_other_clients_answers_of_the_same_service():
    import rclpy

    from flashrt_ros import srv
    from flashrt_ros.ros.client import CapsuleClient
    from flashrt_ros.ros.executors import PolicyExecutor, SingleThreadedExecutor
    from flashrt_ros.ros.node import PolicyNode
    context = rclpy.Context()
    rclpy.init(context=context)
    server = PolicyNode(context=context, namespace="/answers")   # unconfigured: answers refuse
    served = PolicyExecutor(num_threads=2, context=context)
    served.add_node(server)
    threading.Thread(target=served.spin, daemon=True).start()
    ours, theirs = (rclpy.create_node(n, context=context) for n in ("ours", "theirs"))
    spin_ours, spin_theirs = (SingleThreadedExecutor(context=context) for _ in range(2))
    spin_ours.add_node(ours)
    spin_theirs.add_node(theirs)
    try:
        capsules = CapsuleClient(ours, "/answers/flashrt_policy", events=False,
                                 spin=lambda t: spin_ours.spin_once(timeout_sec=t))
        other = theirs.create_client(srv.ListCapsules, capsules.service_name("list"))
        assert capsules.client("list").wait_for_service(60) and other.wait_for_service(60)
        # each client's first answer, so that the server has matched both response readers
        assert not capsules.call("list", srv.ListCapsules.Request(), timeout=30).success
        f = other.call_async(srv.ListCapsules.Request())
        spin_until(spin_theirs, f.done, 30, "the other client's first answer")

        pending = capsules.send("list", srv.ListCapsules.Request())     # not taken yet
        for i in range(OTHERS):
            f = other.call_async(srv.ListCapsules.Request())
            spin_until(spin_theirs, f.done, 30, f"the other client's answer {i}")
        spin_until(spin_ours, pending.done, 10, "our answer, sent before the others' answers")
        assert "configure it first" in pending.future.result().message
    finally:
        served.shutdown(timeout_sec=5)
        for e in (spin_ours, spin_theirs):
            e.shutdown(timeout_sec=1)
        for n in (ours, theirs, server):
            n.destroy_node()
        rclpy.try_shutdown(context=context)
