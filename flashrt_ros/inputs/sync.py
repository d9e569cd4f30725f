"""Named streams (the state, each camera) joined by stamp: message_filters' ApproximateTime
semantics, written here without ROS.

message_filters has no wheel on PyPI (no `ros-message-filters` beside the rclpy wheels this
package's CI installs), and a join that imports no ROS is tested with synthetic stamps and used the
same way live and in a replay. So the join is this module.

Semantics (stamps are integer nanoseconds, so a replay joins exactly as the live run did):

* each stream keeps a queue of its last `queue_size` messages; when full, the oldest is dropped;
* a *set* is one message per stream whose stamps lie within `slop_ns` of each other
  (newest - oldest <= slop_ns);
* on each arrival, the newest set that includes the arriving message is emitted (newest: the
  latest newest stamp, then the latest oldest stamp); its messages, and every older message of
  each stream, leave the queues (the older ones are counted as dropped: a step uses the newest
  observation, never an older one after it);
* a message no newer than its stream's last emitted one is dropped on arrival (it could only make
  an older set); one with the stamp of a queued message replaces it (the old one is dropped).

Since every set is emitted when its last message arrives, the queues never hold a complete set:
the only new set an arrival can make is one that includes it. A missing stream therefore means no
set (never a set with a hole), and a late stream (a camera whose frames arrive after newer state
messages) still joins while the state messages it needs are in their queue: size the queues for
the slowest stream's delay times the fastest stream's rate.

As message_filters: one message per stream, within a slop, the queues' length bounded. Unlike its
Python ApproximateTimeSynchronizer (the set closest to the arriving message, older messages kept)
and its C++ ApproximateTime policy (the set of smallest spread, found after a later message of every
stream has arrived), this emits the newest set at once: a control step wants the newest
observation, without waiting a period for proof that no better set will come.

Stale: a stream that has no message yet, or whose newest message is more than `max_age_ns` older
than the newest message of any stream (message time, not the clock: a replay sees the same; None
leaves only the first kind). Whether the newest set is too old to step on is the node's question
(the set's stamp against its clock, as for a single observation).

Concurrency: one lock around the queues and counters; callbacks of several streams may call `add`
at once (a reentrant callback group or several threads).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flashrt_ros.core.exceptions import ConfigError, InputError


@dataclass(frozen=True)
class SyncedSet:
    """One message per stream, their stamps within the slop."""
    items: dict                    # stream -> message
    stamps: dict                   # stream -> stamp, ns

    @property
    def stamp_ns(self) -> int:
        """The set's stamp: its newest message's."""
        return max(self.stamps.values())


@dataclass(frozen=True)
class SyncStatus:
    """Counters since construction (or `reset_counters`), and the streams stale now."""
    sets: int                      # sets emitted
    dropped: dict                  # stream -> messages that left without being in a set
    stale: tuple                   # streams stale now (see the module docstring)
    queued: dict = field(default_factory=dict)    # stream -> messages waiting

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class ApproximateSync:
    """Joins named streams by stamp (see the module docstring)."""

    def __init__(self, streams, slop_ns: int, queue_size: int = 10,
                 max_age_ns: int | None = 500_000_000):
        streams = tuple(streams)
        if not streams or len(set(streams)) != len(streams) or \
                not all(isinstance(s, str) and s for s in streams):
            raise ConfigError(f"streams: expected distinct non-empty names, found {list(streams)}")
        for name, value, low in (("slop_ns", slop_ns, 0), ("queue_size", queue_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}: expected an integer >= {low}, found {value!r}")
        if max_age_ns is not None and (not isinstance(max_age_ns, int) or max_age_ns < 0):
            raise ConfigError(f"max_age_ns: expected an integer >= 0 or None, found {max_age_ns!r}")
        self.streams = streams
        self.slop_ns = slop_ns
        self.queue_size = queue_size
        self.max_age_ns = max_age_ns
        self._lock = threading.Lock()
        self._queues: dict[str, dict[int, object]] = {s: {} for s in streams}   # stamp -> message
        self._emitted: dict[str, int | None] = dict.fromkeys(streams)   # last emitted stamp
        self._latest: dict[str, int | None] = dict.fromkeys(streams)    # newest stamp seen
        self._sets = 0
        self._dropped = dict.fromkeys(streams, 0)

    def add(self, stream: str, stamp_ns: int, msg) -> SyncedSet | None:
        """Queue `msg` of `stream` stamped `stamp_ns`; returns the set it completes, if any."""
        if stream not in self._queues:
            raise InputError(f"stream {stream!r}: expected one of {list(self.streams)}")
        stamp_ns = int(stamp_ns)
        with self._lock:
            if self._latest[stream] is None or stamp_ns > self._latest[stream]:
                self._latest[stream] = stamp_ns
            last = self._emitted[stream]
            if last is not None and stamp_ns <= last:
                self._dropped[stream] += 1
                return None
            queue = self._queues[stream]
            if stamp_ns in queue:
                self._dropped[stream] += 1
            queue[stamp_ns] = msg
            while len(queue) > self.queue_size:
                del queue[min(queue)]
                self._dropped[stream] += 1
            if stamp_ns not in queue:          # older than a full queue
                return None
            chosen = self._newest_set(stream, stamp_ns)
            if chosen is None:
                return None
            return self._emit(chosen)

    def _newest_set(self, stream: str, stamp_ns: int) -> dict | None:
        """{stream: stamp} of the newest set including (stream, stamp_ns), or None."""
        best, best_key = None, None
        others = [s for s in self.streams if s != stream]
        # the set's oldest stamp is one of the stamps within the slop below the new one
        lows = {stamp_ns}
        for s in others:
            lows.update(t for t in self._queues[s] if stamp_ns - self.slop_ns <= t <= stamp_ns)
        for low in lows:
            high = low + self.slop_ns
            pick = {stream: stamp_ns}
            for s in others:
                inside = [t for t in self._queues[s] if low <= t <= high]
                if not inside:
                    break
                pick[s] = max(inside)
            else:
                key = (max(pick.values()), min(pick.values()))
                if best_key is None or key > best_key:
                    best, best_key = pick, key
        return best

    def _emit(self, chosen: dict) -> SyncedSet:
        items = {}
        for s, t in chosen.items():
            queue = self._queues[s]
            items[s] = queue.pop(t)
            older = [u for u in queue if u < t]
            for u in older:
                del queue[u]
            self._dropped[s] += len(older)
            self._emitted[s] = t
        self._sets += 1
        return SyncedSet(items={s: items[s] for s in self.streams},
                         stamps={s: chosen[s] for s in self.streams})

    def stale(self) -> tuple:
        """Streams stale now (see the module docstring); all of them before any message."""
        with self._lock:
            return self._stale()

    def _stale(self) -> tuple:
        seen = [t for t in self._latest.values() if t is not None]
        if not seen:
            return self.streams
        newest = max(seen)
        return tuple(s for s in self.streams if self._latest[s] is None or (
            self.max_age_ns is not None and newest - self._latest[s] > self.max_age_ns))

    def status(self) -> SyncStatus:
        with self._lock:
            return SyncStatus(sets=self._sets, dropped=dict(self._dropped), stale=self._stale(),
                              queued={s: len(q) for s, q in self._queues.items()})

    def clear(self) -> None:
        """Empty the queues and forget the stamps (a new episode, a replay from its start, time
        that jumped back); the counters stay. Queued messages are not counted as dropped."""
        with self._lock:
            for s in self.streams:
                self._queues[s].clear()
                self._emitted[s] = self._latest[s] = None
