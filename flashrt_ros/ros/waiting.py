"""Waiting with a deadline: poll for an event, never sleep a fixed time (no ROS imports).

DDS discovery between processes takes 0.05 s to a few seconds, so a fixed sleep is either slow or
flaky. These poll in short intervals and, at the deadline, raise a TimeoutError that names what
was awaited. The bag player and the tests share them.
"""
from __future__ import annotations

import time
from typing import Callable


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.01,
             idle: Callable[[float], None] = time.sleep):
    """Poll `predicate()` until it returns a truthy value, and return that value.

    Args:
        predicate: callable with no arguments.
        timeout: seconds before giving up.
        what: what is awaited, for the error message ("service /flashrt_policy/snapshot").
        interval: longest pause between polls.
        idle: how to spend a pause (time.sleep; spin_until passes an executor's spin_once).
    Raises:
        TimeoutError: `predicate` stayed falsy for `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        idle(min(interval, left))


def spin_until(executor, predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.01):
    """Like `wait_for`, but spins an rclpy executor between polls so callbacks and futures run."""
    return wait_for(predicate, timeout, what, interval,
                    idle=lambda t: executor.spin_once(timeout_sec=t))
