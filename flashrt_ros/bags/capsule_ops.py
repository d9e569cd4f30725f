"""Recorded capsule operations -> the service requests that repeat them.

A `flashrt_ros/CapsuleEvent` on `<node>/capsule_events` says what a client asked the node to do
(snapshot, restore, fork, rollback, delete, reset, save, load) and with which flags. A replay
re-issues each as the same service call (flashrt_ros.ros.operations names the services).
Bags recorded before CapsuleEvent had the flag fields still replay: their flags come from the
node's message text. Imports no rclpy until a request is built.
"""
from __future__ import annotations

import numpy as np

from flashrt_ros.bags.types import BagError
from flashrt_ros.ros.operations import OPERATIONS, operation

# capsule operations a client issues and an event reports (evict happens inside the store, list
# is a query, an instruction comes as a topic)
CAPSULE_OPS = tuple(op.name for op in OPERATIONS if not op.query)


def _flag(event, name, pattern=None) -> bool:
    """A request flag the event carries, or else what its message text shows: bags recorded before
    CapsuleEvent had the flag fields (the node's messages name switch_to, keep_context, restore)."""
    value = getattr(event, name, None)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return pattern is not None and pattern in (event.message or "")


def _seed(event) -> int:
    """The noise seed the event's operation restarted the sampler at (-1: none; bags recorded
    before CapsuleEvent had the field: none)."""
    return int(getattr(event, "noise_seed", -1))


def capsule_request(event):
    """(operation, request) that repeats a recorded CapsuleEvent (flashrt_ros.ros.operations)."""
    op = event.operation
    if op not in CAPSULE_OPS:
        raise BagError(f"capsule operation {op!r}: expected one of {list(CAPSULE_OPS)}")
    o = operation(op)
    Request = o.srv_type.Request
    if op == "snapshot":
        request = Request(name=event.name, tier=event.tier, pin=_flag(event, "pin"))
    elif op == "restore":
        request = Request(name=event.name, noise_seed=_seed(event))
    elif op == "fork":
        request = Request(source=event.source, name=event.name, tier=event.tier,
                          switch_to=_flag(event, "switch_to", "switched to it"),
                          noise_seed=_seed(event))
    elif op == "rollback":
        request = Request(k=int(event.k))
    elif op == "delete":
        # older bags recorded deletes that took the saved file along
        request = Request(name=event.name, delete_file=bool(getattr(event, "delete_file", True)))
    elif op == "reset":
        request = Request(keep_context=_flag(event, "keep_context", "instruction context"),
                          noise_seed=_seed(event))
    elif op == "save":
        evict = getattr(event, "evict_from_memory", None)
        if evict is None:       # older bags: keep_in_memory (its default True), or no flag at all
            evict = not getattr(event, "keep_in_memory", True)
        request = Request(name=event.name, evict_from_memory=bool(evict))
    else:   # load
        request = Request(name=event.name, tier="" if event.tier == "disk" else event.tier,
                          restore=_flag(event, "restore", "and restored it"))
    return o, request
