"""rclpy executors that work around two bugs of rclpy 9.1.2 (the PyPI wheels this package pins).

* An entity destroyed by another thread while the executor builds its wait set kills the spin
  thread (ros2/rclpy#1284). `destroy_subscription` first takes the subscription's QoS event
  handlers out of the node's waitables and then requests their destruction; when the spin thread
  collected the waitables before that and enters one after it, the enter fails and is skipped,
  but the waitable is still added to the wait set, whose own enter raises `InvalidHandle` out of
  `spin()`. Every behaviour that cleans up in `shutdown()` and every lifecycle transition that
  destroys a subscription opens that window. The failed collection is harmless - the entity is
  already gone from the node's lists - so these executors collect again.
* rclpy's MultiThreadedExecutor busy loop (ros2/rclpy#1452, fixed upstream by #1547 in 10.0.4):
  see `PolicyExecutor`.

Use these in place of rclpy's executors in any process that creates or destroys entities while
it spins (the policy node, behaviour trees, the bag tools and the tests all do). `SpinThread`
spins one in the background and keeps how it ended.
"""
from __future__ import annotations

import threading
import time
import weakref

from rclpy import executors as _rclpy_executors
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.exceptions import InvalidHandle
from rclpy.executors import (ConditionReachedException, ExternalShutdownException,
                             ShutdownException, TimeoutException)


class _CollectsAgain:
    """Retries a wait-set collection that an entity destroyed mid-collection broke (rclpy#1284)."""

    def wait_for_ready_callbacks(self, *args, **kwargs):
        while True:
            try:
                return super().wait_for_ready_callbacks(*args, **kwargs)
            except InvalidHandle:
                # The generator that raised is finished; the next call starts a fresh collection.
                # That only helps when the entity has left its node's lists, as
                # node.destroy_subscription() does before it destroys. One destroyed behind the
                # node's back (`sub.destroy()`) stays listed and would break every collection:
                # then the error goes up, as with rclpy's executors, instead of a busy loop.
                if self._listed_but_destroyed():
                    raise

    def _listed_but_destroyed(self) -> bool:
        for node in self.get_nodes():
            for waitable in list(node.waitables):
                if not hasattr(waitable, "__enter__"):      # an rclpy whose waitables are not
                    continue                                # context managers cannot tell
                try:
                    with waitable:
                        pass
                except InvalidHandle:
                    # Our copy of the list can be older than a destroy_subscription() running
                    # now in another thread; that one takes the waitable out of the node's list
                    # before it destroys it, so only one still listed after its destruction
                    # was destroyed behind the node's back.
                    if any(w is waitable for w in node.waitables):
                        return True
        return False


class SingleThreadedExecutor(_CollectsAgain, _rclpy_executors.SingleThreadedExecutor):
    """rclpy's SingleThreadedExecutor that survives entities destroyed by other threads."""


class MultiThreadedExecutor(_CollectsAgain, _rclpy_executors.MultiThreadedExecutor):
    """rclpy's MultiThreadedExecutor that survives entities destroyed by other threads."""


class PolicyExecutor(MultiThreadedExecutor):
    """A MultiThreadedExecutor whose spin thread lets a submitted callback start before it waits again.

    rclpy before 10.0.4 (Jazzy, Kilted) yields a task again while it sits in the thread pool's queue,
    and as long as one does, the spin thread loops without blocking and holds the GIL, so the
    worker that should run it hardly gets to start (ros2/rclpy#1452, fixed upstream by #1547).
    Measured here with rclpy 9.1.2: publish -> subscription callback 50-70 ms median, 2 s p99,
    ~4000 wait loops a second, a whole core busy. After submitting, this spin thread yields until
    the callback has started (or 50 ms passed): ~0.1 ms median, a few loops per message.
    """

    START_WAIT_S = 0.05

    def retrieve_outcomes(self, timeout_s: float = 2.0) -> None:
        """After shutdown: wait (at most `timeout_s`) for the callbacks still listed and take
        their outcomes. One that ran into an entity destroyed under it raised, and rclpy would
        print "The following exception was never retrieved" when it is collected at exit."""
        deadline = time.monotonic() + timeout_s
        for future in list(self._futures):
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.005)
            if future.done():
                future.exception()

    def _spin_once_impl(self, timeout_sec=None, wait_condition=lambda: False):
        try:
            handler, _, _ = self.wait_for_ready_callbacks(timeout_sec, None, wait_condition)
        except (ExternalShutdownException, ShutdownException, TimeoutException,
                ConditionReachedException):
            return
        self._executor.submit(handler)
        self._futures.append(handler)
        for future in self._futures[:]:
            if future.done():
                self._futures.remove(future)
                future.result()  # raise any exceptions
        deadline = time.monotonic() + self.START_WAIT_S
        while not (handler.executing() or handler.done()) and time.monotonic() < deadline:
            time.sleep(0)    # releases the GIL: the worker takes the task


class SpinThread(threading.Thread):
    """`executor.spin()` in a daemon thread that keeps the exception it died of, and that is
    stopped and joined before the interpreter exits.

    A spin thread that dies otherwise leaves one traceback on stderr, and everything it served
    stops without a word: answers, messages, timers. Whoever waits on them can call `check()`
    (or read `error`) to name the cause instead of timing out.

    At exit. rclpy 9.1.2's `executor.shutdown()` wakes the spin thread but does not wait for it,
    so it is still returning from `rcl_wait` when the main thread reaches the end of the script.
    A daemon thread that wants the GIL back once the interpreter is finalizing is ended with
    `pthread_exit`, whose unwinding through rclpy's C++ frames calls `std::terminate`: "terminate
    called without an active exception", exit status 134, after a script that did everything
    right. So the thread registers `stop` with `threading`'s exit hooks, which run before
    finalization and before the thread pools' (concurrent.futures') own: the executor is shut
    down and the thread joined while the interpreter is whole.
    """

    EXIT_JOIN_S = 10.0

    def __init__(self, executor, name: str = "spin"):
        super().__init__(name=name, daemon=True)
        self.executor = executor
        self.error: BaseException | None = None

    def start(self):
        me = weakref.ref(self)      # the hook keeps no finished thread (and its executor) alive
        threading._register_atexit(lambda: (thread := me()) is not None and thread.stop())
        super().start()

    def stop(self, timeout_s: float = EXIT_JOIN_S) -> bool:
        """Shut the executor down and wait for this thread to end; False if it is still running."""
        if self.is_alive():
            self.executor.shutdown(timeout_sec=timeout_s)
            self.join(timeout_s)
        return not self.is_alive()

    def run(self):
        try:
            self.executor.spin()
        except BaseException as e:      # recorded for check(), then reported by threading
            self.error = e
            raise

    def check(self) -> None:
        """Raise RuntimeError if the executor's spin thread died."""
        if self.error is not None:
            raise RuntimeError(f"the executor's spin thread died: {self.error!r}; nothing it "
                               f"served is spun any more") from self.error


def subscribe_without_event_handlers(node, msg_type, topic: str, callback, qos):
    """A subscription without QoS event handlers, so that destroying it while another thread spins
    the node is safe under any executor: with rclpy 9.1.2 an event handler destroyed then can kill
    that executor's spin thread (ros2/rclpy#1284, above). The handlers only log incompatible-QoS
    warnings; the behaviours and CapsuleClient subscribe to topics whose QoS the node sets."""
    return node.create_subscription(msg_type, topic, callback, qos,
                                    event_callbacks=SubscriptionEventCallbacks(
                                        use_default_callbacks=False))
