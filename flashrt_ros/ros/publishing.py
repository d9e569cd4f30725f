"""Inputs that must not be lost: latched QoS, and publishing only once every subscriber listens.

A one-shot message (an instruction, a joint state a replay sends first) published before its
subscribers matched is gone for them: DDS delivers a volatile message only to the readers matched
when it is written. Two measures, used on both sides:

  * `LATCHED`: reliable + transient local, depth 1 (what `ros2 topic pub --qos-durability
    transient_local` offers). The node's `~/instruction` subscription requests it, so a publisher
    that is matched a little late still delivers its last instruction, and so does every
    publisher of an instruction in this package. (DDS matches a transient-local reader only with
    transient-local writers: a volatile publisher does not reach the node's `~/instruction`.)
  * `wait_for_subscribers(...)`: before the first message, wait (bounded) until the publisher
    matched at least one subscription and every subscription the graph shows on its topic - a
    bag recorder beside the node included - so nobody who listens misses the first message.
    DDS discovers each process on its own: a fresh publisher can know the node and not yet the
    recorder beside it, so all must have stayed matched, with no new subscription showing up,
    for `SETTLE_S` (discovery of processes on one machine takes milliseconds to a second).
"""
from __future__ import annotations

import copy
import time

from rclpy.duration import Duration
from rclpy.qos import (QoSCompatibility, QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile,
                       QoSReliabilityPolicy, qos_check_compatible)

from flashrt_ros.ros.waiting import wait_for

SETTLE_S = 0.5
INFINITE_NS = 2**63 - 1

LATCHED = QoSProfile(depth=1, history=QoSHistoryPolicy.KEEP_LAST,
                     reliability=QoSReliabilityPolicy.RELIABLE,
                     durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)


def _subscription(s) -> str:
    return (f"{s.node_namespace.rstrip('/')}/{s.node_name} "
            f"({s.qos_profile.reliability.name.lower()}, {s.qos_profile.durability.name.lower()})")


def _comparable(qos: QoSProfile) -> QoSProfile:
    """`qos` with infinite durations as unset: the graph reports an unset deadline, lifespan or
    liveliness lease as infinite (2**63 - 1 ns), a profile made here holds 0, and
    qos_check_compatible takes only 0 for "none"."""
    out = copy.copy(qos)
    for name in ("deadline", "lifespan", "liveliness_lease_duration"):
        if getattr(out, name).nanoseconds >= INFINITE_NS:
            setattr(out, name, Duration())
    return out


def unmatched(node, publisher, at_least: int = 1) -> list:
    """What keeps the publisher from having matched every subscription on its topic the graph
    shows, as strings; [] when nothing does. ['(none)'] while it has matched none at all, a count
    of the missing ones while it has matched fewer than `at_least`; otherwise the subscriptions
    whose QoS the publisher cannot serve, each with the reason, or, where every one is
    compatible (discovery still under way), 'matched N of M' and all of them (the publisher's
    count does not say which ones it matched)."""
    subs = node.get_subscriptions_info_by_topic(publisher.topic_name)
    matched = publisher.get_subscription_count()
    if matched == 0:
        return ["(none)"]
    if matched < at_least:
        return [f"{at_least - matched} more of the {at_least} subscriptions asked for"]
    if matched >= len(subs):
        return []
    incompatible = []
    for s in subs:
        compatibility, reason = qos_check_compatible(_comparable(publisher.qos_profile),
                                                     _comparable(s.qos_profile))
        if compatibility == QoSCompatibility.ERROR:
            incompatible.append(f"{_subscription(s)}: incompatible QoS, "
                                f"{reason.removeprefix('ERROR: ').rstrip(';')}")
    if incompatible:
        return incompatible
    return [f"matched {matched} of {len(subs)}: {', '.join(_subscription(s) for s in subs)}"]


def wait_for_subscribers(node, publisher, timeout: float, idle, at_least: int = 1,
                         hint: str = ""):
    """Wait until `publisher` matched every subscription of its topic (at least `at_least`),
    and no other showed up for SETTLE_S.

    Args:
        node: the rclpy node that owns `publisher` (its graph view).
        idle: how to spend a pause, e.g. `lambda t: executor.spin_once(timeout_sec=t)`.
        at_least: subscriptions that must be matched whatever the graph shows so far: a caller
            that knows who listens (the node and a recorder: 2) need not trust SETTLE_S.
        hint: what the error adds when no subscriber showed up at all (why one may be missing).
    Returns normally at the deadline as well when everything the graph shows is matched then
    (the set changed within SETTLE_S of the deadline, or `timeout` < SETTLE_S).

    Raises:
        TimeoutError: naming the topic and what is still unmatched (a subscription whose QoS the
            publisher cannot serve stays unmatched: those are named with the reason).
    """
    seen = {"since": 0.0, "subscriptions": -1}     # when the matched set last changed

    def settled() -> bool:
        n = -1 if unmatched(node, publisher, at_least) else \
            len(node.get_subscriptions_info_by_topic(publisher.topic_name))
        if n < 0 or n != seen["subscriptions"]:
            seen["since"], seen["subscriptions"] = time.monotonic(), n
            return False
        return time.monotonic() - seen["since"] >= SETTLE_S
    try:
        wait_for(settled, timeout, "", interval=0.02, idle=idle)
    except TimeoutError:
        left = unmatched(node, publisher, at_least)
        if not left:
            return
        why = hint or "is the node running, with the same ROS_DOMAIN_ID?"
        what = (f"no subscriber at all ({why})" if left == ["(none)"] else
                f"not matched: {'; '.join(left)}; match the subscriptions' QoS, or wait longer "
                f"for discovery")
        raise TimeoutError(f"subscribers of {publisher.topic_name} within {timeout:g} s: "
                           f"{what}") from None
