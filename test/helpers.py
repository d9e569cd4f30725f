"""Waiting helpers for tests: poll for an event with a deadline, never sleep a fixed time.

DDS discovery between processes takes 0.05 s to a few seconds here, so a fixed sleep is either slow
or flaky. These poll in short intervals and, at the deadline, raise a TimeoutError that names what
was awaited.
"""
import time


def wait_for(predicate, timeout, what, interval=0.01):
    """Poll `predicate()` until it returns a truthy value, and return that value.

    Args:
        predicate: callable with no arguments.
        timeout: seconds before giving up.
        what: what is awaited, for the error message ("service /echo/snapshot").
        interval: seconds between polls.
    Raises:
        TimeoutError: `predicate` stayed falsy for `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %g s waiting for %s" % (timeout, what))
        time.sleep(interval)


def spin_until(executor, predicate, timeout, what, interval=0.01):
    """Like `wait_for`, but spins an rclpy executor between polls so callbacks and futures progress.

    Args:
        executor: an rclpy executor holding the nodes whose callbacks must run.
        predicate, timeout, what: as for `wait_for`.
        interval: longest wait for work in one spin.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %g s waiting for %s" % (timeout, what))
        executor.spin_once(timeout_sec=interval)
