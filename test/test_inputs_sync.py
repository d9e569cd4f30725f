"""Named streams joined by stamp (flashrt_ros/inputs/sync.py), on synthetic stamps.

Streams at 30 Hz (state), 15 Hz and 10 Hz (cameras) meet every 0.2 s; the tests feed messages in
arrival order and check the sets: one per meeting, each within the slop, newer than the last, and
the counters (sets, drops, stale streams). A missing camera gives no set; a late camera still
joins while the state messages it needs are queued, and not once they are evicted.
"""
from __future__ import annotations

import numpy as np
import pytest

from flashrt_ros.core.exceptions import ConfigError, InputError
from flashrt_ros.inputs.sync import ApproximateSync

MS = 1_000_000
RATES = {"state": 30, "top": 15, "wrist": 10}
SECONDS = 3


def stamps(rate: int, seconds: float = SECONDS, jitter_ns: int = 0, seed: int = 0) -> list[int]:
    rng = np.random.RandomState(seed)
    return [round(k * 1e9 / rate) + (int(rng.randint(-jitter_ns, jitter_ns + 1)) if jitter_ns else 0)
            for k in range(int(seconds * rate))]


def arrivals(delays_ns: dict | None = None, jitter_ns: int = 0, rates=RATES) -> list:
    """(arrival time, stream, stamp) of every message, in arrival order."""
    delays_ns = delays_ns or {}
    out = []
    for i, (stream, rate) in enumerate(rates.items()):
        for t in stamps(rate, jitter_ns=jitter_ns, seed=i):
            out.append((t + delays_ns.get(stream, 0), i, stream, t))
    return [(a, s, t) for a, _, s, t in sorted(out)]


def run(sync: ApproximateSync, messages) -> list:
    sets = []
    for _, stream, t in messages:
        got = sync.add(stream, t, (stream, t))
        if got is not None:
            sets.append(got)
    return sets


def check_sets(sets, slop_ns: int) -> None:
    last = None
    for s in sets:
        assert set(s.items) == set(RATES) and all(s.items[k] == (k, s.stamps[k]) for k in s.items)
        assert max(s.stamps.values()) - min(s.stamps.values()) <= slop_ns
        if last is not None:
            assert all(s.stamps[k] > last.stamps[k] for k in s.stamps)
        last = s


def test_three_rates_meet_every_fifth_of_a_second():
    sync = ApproximateSync(RATES, slop_ns=5 * MS)
    sets = run(sync, arrivals())
    check_sets(sets, 5 * MS)
    assert [s.stamp_ns for s in sets] == [k * 200 * MS for k in range(SECONDS * 5)]
    status = sync.status()
    assert status.sets == SECONDS * 5 and status.stale == ()
    # every message not in a set left as a drop, or still waits
    total = sum(len(stamps(r)) for r in RATES.values())
    assert status.dropped_total + sum(status.queued.values()) + 3 * status.sets == total


def test_jittered_stamps_meet_within_the_slop():
    sync = ApproximateSync(RATES, slop_ns=10 * MS)
    sets = run(sync, arrivals(jitter_ns=3 * MS))
    check_sets(sets, 10 * MS)
    assert len(sets) == SECONDS * 5
    assert all(abs(s.stamp_ns - k * 200 * MS) <= 3 * MS for k, s in enumerate(sets))


def test_a_missing_camera_gives_no_set_and_is_stale():
    sync = ApproximateSync(RATES, slop_ns=10 * MS, queue_size=5)
    messages = [m for m in arrivals() if m[1] != "wrist"]
    assert run(sync, messages) == []
    status = sync.status()
    assert status.sets == 0 and status.stale == ("wrist",)
    assert status.queued == {"state": 5, "top": 5, "wrist": 0}      # bounded: the rest dropped
    assert status.dropped == {"state": len(stamps(30)) - 5, "top": len(stamps(15)) - 5, "wrist": 0}


def test_a_camera_that_stops_is_stale_after_max_age_and_no_set_follows():
    sync = ApproximateSync(RATES, slop_ns=5 * MS, max_age_ns=300 * MS)
    messages = [m for m in arrivals() if not (m[1] == "wrist" and m[2] > 1000 * MS)]
    sets = run(sync, messages)
    assert sets[-1].stamp_ns == 1000 * MS                 # the last meeting the camera was in
    assert sync.status().stale == ("wrist",)
    assert ApproximateSync(RATES, slop_ns=5 * MS, max_age_ns=None).stale() == tuple(RATES)


def test_a_late_camera_joins_while_the_state_it_needs_is_queued():
    late = {"wrist": 80 * MS}        # its frames arrive after 2-3 newer state messages
    sync = ApproximateSync(RATES, slop_ns=5 * MS, queue_size=4)
    sets = run(sync, arrivals(late))
    check_sets(sets, 5 * MS)
    assert [s.stamp_ns for s in sets] == [k * 200 * MS for k in range(SECONDS * 5)]
    # queues shorter than the delay: the state message a camera frame needs is gone when it comes
    short = ApproximateSync(RATES, slop_ns=5 * MS, queue_size=2)
    assert run(short, arrivals(late)) == []
    assert short.status().dropped["state"] > 0


def test_the_newest_set_is_emitted_and_older_messages_dropped():
    sync = ApproximateSync(["state", "top"], slop_ns=10 * MS)
    for t in (0, 10, 20):
        assert sync.add("state", t * MS, f"state@{t}") is None
    got = sync.add("top", 12 * MS, "top@12")
    # state@10 is nearer (message_filters' Python synchronizer would take it); state@20 is newer
    assert got.items == {"state": "state@20", "top": "top@12"}
    assert got.stamps == {"state": 20 * MS, "top": 12 * MS} and got.stamp_ns == 20 * MS
    assert sync.status().dropped == {"state": 2, "top": 0}
    assert sync.status().queued == {"state": 0, "top": 0}


def test_a_message_no_newer_than_its_streams_last_set_is_dropped_and_a_repeated_stamp_replaces():
    sync = ApproximateSync(["state", "top"], slop_ns=10 * MS)
    sync.add("state", 100 * MS, "a")
    assert sync.add("top", 100 * MS, "b") is not None
    assert sync.add("top", 95 * MS, "old") is None             # older than its last set
    assert sync.add("top", 100 * MS, "same") is None           # the same stamp again
    assert sync.status().dropped == {"state": 0, "top": 2}
    sync.add("state", 200 * MS, "first")
    sync.add("state", 200 * MS, "second")                      # replaces "first"
    assert sync.add("top", 201 * MS, "c").items == {"state": "second", "top": "c"}
    assert sync.status().dropped == {"state": 1, "top": 2}


def test_a_replay_joins_exactly_as_the_live_run():
    messages = arrivals(jitter_ns=4 * MS)
    a = run(ApproximateSync(RATES, slop_ns=8 * MS), messages)
    b = run(ApproximateSync(RATES, slop_ns=8 * MS), messages)
    assert [s.stamps for s in a] == [s.stamps for s in b] and len(a) > 0


def test_clear_forgets_the_queues_and_stamps_but_keeps_the_counters():
    sync = ApproximateSync(["state", "top"], slop_ns=10 * MS)
    sync.add("state", 500 * MS, "x")
    assert sync.add("top", 500 * MS, "y") is not None
    sync.add("state", 600 * MS, "waiting")
    sync.clear()
    assert sync.status().queued == {"state": 0, "top": 0} and sync.status().sets == 1
    sync.add("state", 0, "again")                  # time went back (a replay from its start)
    assert sync.add("top", 0, "again").stamp_ns == 0


def test_unknown_streams_and_bad_settings_are_refused():
    sync = ApproximateSync(["state", "top"], slop_ns=0)
    with pytest.raises(InputError, match=r"stream 'side': expected one of \['state', 'top'\]"):
        sync.add("side", 0, None)
    for kwargs, what in [(dict(streams=[], slop_ns=1), "distinct non-empty names"),
                         (dict(streams=["a", "a"], slop_ns=1), "distinct"),
                         (dict(streams=["a"], slop_ns=-1), "slop_ns: expected an integer >= 0"),
                         (dict(streams=["a"], slop_ns=0.01), "slop_ns"),
                         (dict(streams=["a"], slop_ns=1, queue_size=0), "queue_size"),
                         (dict(streams=["a"], slop_ns=1, max_age_ns=-5), "max_age_ns")]:
        with pytest.raises(ConfigError, match=what):
            ApproximateSync(**kwargs)
