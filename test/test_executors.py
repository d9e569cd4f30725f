"""Executors and behaviours survive entities destroyed by another thread while a node spins.

rclpy 9.1.2 lets such a destruction kill the spin thread (ros2/rclpy#1284; flashrt_ros/executors.py
says how). It showed up in CI as a behaviour tree whose executor thread had died, so every later
service answer went unseen. The window is a few bytecodes wide; a tiny GIL switch interval makes
the spin thread stop inside it within tens of cycles (measured: 10-44 cycles with rclpy's own
executors). With `CYCLES` = 2000, each test failed 3 runs of 3 without its fix. After the churn, a
message must still arrive through the executor: the spin thread is alive and serving.
"""
import sys
import uuid

import pytest

from flashrt_ros.ros.waiting import wait_for

pytestmark = pytest.mark.ros

CYCLES = 2000
SWITCH_INTERVAL_S = 1e-6
DELIVERY_S = 15.0


class Spinning:
    """A node in its own context, spun by `executor_cls` in a thread that records how it ended."""

    def __init__(self, executor_cls, **kwargs):
        import rclpy
        from flashrt_ros.ros.executors import SpinThread
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("executor_test_%s" % uuid.uuid4().hex[:8], context=self.context)
        self.executor = executor_cls(context=self.context, **kwargs)
        self.executor.add_node(self.node)
        self.thread = SpinThread(self.executor)
        self.thread.start()

    @property
    def died(self):
        return [] if self.thread.error is None else [self.thread.error]

    def churn(self, create, destroy):
        """`CYCLES` creations and destructions from this thread, with a tiny GIL switch interval."""
        before = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            for _ in range(CYCLES):
                destroy(create())
                if self.died:
                    break
        finally:
            sys.setswitchinterval(before)

    def assert_serving(self):
        """The spin thread is alive and still delivers a message to a subscription."""
        from std_msgs.msg import String
        assert not self.died, "the executor's spin thread died: %r" % self.died
        got = []
        topic = "/executor_test_%s" % uuid.uuid4().hex[:8]
        self.node.create_subscription(String, topic, got.append, 10)
        pub = self.node.create_publisher(String, topic, 10)
        wait_for(lambda: pub.get_subscription_count() > 0, DELIVERY_S, "the subscription to match")

        def delivered():
            assert not self.died, "the executor's spin thread died: %r" % self.died
            if not got:
                pub.publish(String(data="after the churn"))
            return bool(got)
        wait_for(delivered, DELIVERY_S, "a message through the executor after the churn")
        assert self.thread.is_alive()

    def close(self):
        import rclpy
        self.executor.shutdown(timeout_sec=5)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.thread.join(timeout=5)


@pytest.fixture(params=["SingleThreadedExecutor", "MultiThreadedExecutor", "PolicyExecutor"])
def spinning(request):
    from flashrt_ros.ros import executors
    kwargs = {} if request.param == "SingleThreadedExecutor" else {"num_threads": 2}
    s = Spinning(getattr(executors, request.param), **kwargs)
    yield s
    s.close()


def test_spin_survives_subscriptions_destroyed_by_another_thread(spinning):
    from std_msgs.msg import String
    node = spinning.node
    # default event callbacks: every subscription brings QoS event handlers, the waitables that race
    spinning.churn(lambda: node.create_subscription(String, "/churn", lambda m: None, 1),
                   node.destroy_subscription)
    spinning.assert_serving()


@pytest.fixture
def rclpy_spinning():
    """rclpy's own MultiThreadedExecutor, as a py_trees_ros application would spin its node."""
    from rclpy.executors import MultiThreadedExecutor
    s = Spinning(MultiThreadedExecutor, num_threads=2)
    yield s
    s.close()


def test_behaviours_set_up_and_shut_down_under_rclpy_executor(rclpy_spinning):
    """The behaviours' subscriptions carry no event handlers, so a tree's setup/shutdown cycle
    cannot kill an application's executor, whichever executor it uses."""
    from flashrt_ros.bt import behaviours as b
    node = rclpy_spinning.node

    def create():
        tree = [b.Snapshot(name="churn", policy="/executor_test_nobody"),
                b.StepReached(0, policy="/executor_test_nobody")]
        for behaviour in tree:
            behaviour.setup(node=node)
        return tree

    def destroy(tree):
        for behaviour in tree:
            behaviour.shutdown()

    tree = create()
    subs = [s for behaviour in tree for s in
            ([behaviour.capsules.events_sub] if hasattr(behaviour, "capsules") else behaviour._subs)]
    assert len(subs) == 3 and all(s.event_handlers == [] for s in subs), \
        [len(s.event_handlers) for s in subs]
    destroy(tree)
    rclpy_spinning.churn(create, destroy)
    rclpy_spinning.assert_serving()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # expected here
def test_an_entity_destroyed_behind_the_nodes_back_still_raises(spinning):
    """`sub.destroy()` leaves the subscription listed on its node, so every collection fails: the
    executor gives up after its retries, as rclpy's own does, rather than loop without end."""
    from rclpy.exceptions import InvalidHandle
    from std_msgs.msg import String
    sub = spinning.node.create_subscription(String, "/behind_the_back", lambda m: None, 1)
    sub.destroy()
    spinning.node.create_subscription(String, "/wake", lambda m: None, 1)   # wakes the executor
    wait_for(lambda: spinning.died, DELIVERY_S, "the spin thread to give up")
    assert isinstance(spinning.died[0], InvalidHandle), spinning.died
