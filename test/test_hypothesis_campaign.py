"""A property-based campaign (hypothesis) against one configured, active policy node in this
process (real rclpy; its callbacks are called as its executor would call them, every answer
serialised as rclpy sends it).

Three families of input, each drawn by hypothesis and shrunk on failure:
  * capsule files: a genuine capsule file with a header field edited (resealed or not), removed
    or added, or its bytes flipped, cut, inserted or overwritten; indexed as at start, listed,
    loaded (and restored);
  * observation sequences: float32 vectors (NaN, inf, the float32 extremes, wrong lengths) with
    stamps from far past to far future, unstamped ones, and reset flags;
  * parameter sets: every parameter that may change while configured, set to values of the right
    type and of others, in range and far out of it.
After each input: the node answers (list_capsules succeeds, ~/status publishes), a refused input
left the live state and the store byte-unchanged (live bytes, counters, index, capsule files,
configs), and nothing non-finite entered the live state.

Bounded for CI: a fixed number of examples per family, derandomized (the same examples on every
run), no example database, no deadline (a busy 2-core machine is slow, not wrong).
"""
import os

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from flashrt_ros.capsules.capsule import buffer_slices
from flashrt_ros.capsules.file import capsule_path, header_digest
from flashrt_ros.core.arena import DTYPES
from node_client import call_service as call, configured_node

pytestmark = pytest.mark.ros
CAMPAIGN = dict(deadline=None, derandomize=True, database=None, print_blob=False)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """An active node with a capsule 'home' on disk; `template` is a genuine file of a capsule
    named 'victim' (the bytes of 'home'), kept aside for the file family to mutate."""
    pytest.importorskip("rclpy")
    with configured_node("/campaign", tmp_path_factory.mktemp("campaign"),
                         instruction="a campaign of inputs", observation_qos="reliable") as n:
        n.trigger_activate()
        assert n.active
        store = n.store
        store.snapshot("home", tier="disk")
        store.fork("home", "victim", tier="disk")
        path = capsule_path(store.cfg.capsule_dir, "victim")
        n.template = open(path, "rb").read()
        n.template_raw = store.capsule_bytes("victim")
        c = store.capsules["victim"]
        n.template_counters = (c.name, c.step, c.position, c.episode)
        store.delete("victim")
        n.params = {name: n.get_parameter(name).value for name in _settable()}
        yield n


def state(n):
    """Everything a refused input must leave byte-unchanged."""
    rt, store = n.runtime, n.store
    d = store.cfg.capsule_dir
    files = {}
    for f in sorted(os.listdir(d)):
        with open(os.path.join(d, f), "rb") as fh:
            files[f] = fh.read()
    index = {k: (c.name, c.tier, c.step, c.position, c.episode, c.pinned, c.nbytes, c.digest,
                 c.path) for k, c in store.capsules.items()}
    return (bytes(rt.live_state().numpy()), (rt.step_count, rt.position, rt.episode), index,
            files, store.cfg, n.node_cfg)


def answers(n):
    listed = call(n, "list_capsules")
    assert listed.success, listed.message
    n._publish_status()                 # the status timer's callback: must not raise


def all_finite(rt):
    """Every floating-point buffer of the live range holds finite numbers only."""
    live = rt.live_state()
    for name, off, nbytes in buffer_slices(rt.arena, rt.position):
        dtype = DTYPES[rt.arena.specs[name].dtype]
        if dtype.is_floating_point and nbytes:
            values = live[off:off + nbytes].view(dtype)
            assert bool(torch.isfinite(values).all()), f"non-finite values in {name}"


# -- capsule files --------------------------------------------------------------------------
FIELDS = ["format", "format_version", "name", "parent", "step", "position", "episode", "pinned",
          "created", "fingerprint", "weights", "digest", "header_digest", "extra"]
VALUES = st.one_of(
    st.text(max_size=20), st.integers(-2**70, 2**70).map(str),
    st.sampled_from(["", "-1", "nan", "inf", "1e30", str(2**63), str(2**64), "0", "1", "home",
                     "victim", "../x", "a" * 300, "0" * 64, " 5", "5\n", "2"]))


class Mutated(tuple):
    """(file bytes, what was done, whether it must be refused), shown as what was done."""

    def __repr__(self):
        return self[1]


@st.composite
def mutated_files(draw, template: bytes):
    """Mutated(...) of the genuine capsule file `template`: an unsealed edit of a header field
    must be refused; a resealed one, or one of the bytes, may load only as the same state."""
    from safetensors.torch import load, save
    kind = draw(st.sampled_from(["edit", "reseal", "drop", "flip", "truncate", "insert",
                                 "overwrite"]))
    blob = bytearray(template)
    if kind in ("edit", "reseal", "drop"):
        meta = read_header_bytes(bytes(blob))
        key = draw(st.sampled_from(FIELDS))
        was = dict(meta)
        if kind == "drop":
            meta.pop(key, None)
        else:
            meta[key] = draw(VALUES)
        if kind == "reseal":            # a consistent edit: the header digest recomputed
            meta["header_digest"] = header_digest(meta)
        return Mutated((save(load(bytes(blob)), metadata=meta), f"{kind} {key}={meta.get(key)!r}",
                        kind != "reseal" and meta != was))
    i = draw(st.integers(0, len(blob) - 1))
    if kind == "flip":
        blob[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del blob[i:]
    elif kind == "insert":
        blob[i:i] = draw(st.binary(min_size=1, max_size=16))
    else:
        chunk = draw(st.binary(min_size=1, max_size=32))
        blob[i:i + len(chunk)] = chunk
    return Mutated((bytes(blob), f"{kind} at {i}", False))


def read_header_bytes(blob: bytes) -> dict:
    import json
    n = int.from_bytes(blob[:8], "little")
    return dict(json.loads(blob[8:8 + n])["__metadata__"])


@settings(max_examples=400, **CAMPAIGN)
@given(data=st.data())
def test_capsule_files(node, data):
    n, store = node, node.store
    blob, what, must_refuse = data.draw(mutated_files(n.template))
    restore = data.draw(st.booleans())
    path = capsule_path(store.cfg.capsule_dir, "victim")
    with open(path, "wb") as f:
        f.write(blob)
    try:
        store.rebuild_index()             # as at start, with the file in the directory
        answers(n)
        before = state(n)
        res = call(n, "load_capsule", name="victim", restore=restore)
        if res.success:                   # only a harmless mutation loads: the same state
            assert not must_refuse, f"an edited header was accepted: {what}"
            got = store.capsules["victim"]
            assert (got.name, got.step, got.position, got.episode) == n.template_counters, what
            assert torch.equal(store.capsule_bytes("victim"), n.template_raw), what
            event("loaded")
            if restore:
                assert torch.equal(n.runtime.live_state(), n.template_raw), what
        else:
            assert "expected" in res.message or "no capsule" in res.message, (what, res.message)
            assert state(n) == before, what
            event(f"refused: {res.message.split(': ')[1][:30] if ': ' in res.message else ''}")
        all_finite(n.runtime)
        answers(n)
    finally:
        if "victim" in store.capsules:
            store.delete("victim")
        if os.path.lexists(path):
            os.unlink(path)


# -- observation sequences ------------------------------------------------------------------
F32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
VECTORS = st.one_of(
    st.lists(F32, min_size=14, max_size=14),
    st.lists(st.floats(-1, 1, width=32), min_size=14, max_size=14),
    st.lists(st.sampled_from([3.4028235e38, -3.4028235e38, 1e-45, 0.0]), min_size=14, max_size=14),
    st.lists(F32, max_size=20))
STAMPS = st.one_of(st.just(None),                                   # unstamped
                   st.floats(-86400.0, 86400.0),                    # seconds from the node's now
                   st.tuples(st.integers(-2**31, 2**31 - 1), st.integers(0, 10**9 - 1)))


def observation(n, vector, stamp, reset):
    from flashrt_ros.msg import Observation
    from flashrt_ros.ros.stamps import ns_to_stamp
    msg = Observation(state=list(vector), reset_episode=reset)
    if isinstance(stamp, float):
        msg.header.stamp = ns_to_stamp(max(0, n.get_clock().now().nanoseconds + int(stamp * 1e9)))
    elif stamp is not None:
        msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    return msg


@settings(max_examples=150, **CAMPAIGN)
@given(seq=st.lists(st.tuples(VECTORS, STAMPS, st.booleans()), min_size=1, max_size=8))
def test_observation_sequences(node, seq):
    n, rt = node, node.runtime
    for vector, stamp, reset in seq:
        before = state(n)
        counters = (rt.step_count, rt.episode)
        n.inputs.parts[0]._on_message(observation(n, vector, stamp, reset))   # ~/observation
        if (rt.step_count, rt.episode) == counters:      # not stepped: refused or dropped
            assert state(n) == before, (vector, stamp, reset)
            event("observation refused or dropped")
        else:
            event("observation stepped")
        all_finite(rt)
    answers(n)


# -- parameter sets -------------------------------------------------------------------------
def _settable():
    from flashrt_ros.ros.params import parameter_table
    return [name for name, _, _, fixed, _ in parameter_table() if not fixed]


PARAM_VALUES = st.one_of(
    st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "gpu", "host", "disk", "drop", "demote", ""]),
    st.sampled_from([0, 1, 100, 1e30, -1.0, 2.0**40, 2.0**41, 1e-9]))


@settings(max_examples=120, **CAMPAIGN)
@given(data=st.data())
def test_parameter_sets(node, data):
    from rclpy.parameter import Parameter
    n = node
    names = data.draw(st.lists(st.sampled_from(_settable()), min_size=1, max_size=4, unique=True))
    params = []
    for name in names:
        try:
            params.append(Parameter(name, value=data.draw(PARAM_VALUES)))
        except (TypeError, ValueError):
            pass              # a value rclpy cannot carry never reaches a node
    try:
        for p in params:
            before = state(n)
            if not n.set_parameters([p])[0].successful:
                assert state(n) == before, (p.name, p.value)
                event("parameter refused")
            else:
                event("parameter accepted")
            answers(n)
        res = call(n, "snapshot", name="probe")           # the store still works, or says why
        assert res.success or "expected" in res.message, res.message
        if "probe" in n.store.capsules:
            n.store.delete("probe")
        all_finite(n.runtime)
    finally:
        n.set_parameters([Parameter(k, value=v) for k, v in n.params.items() if v is not None])
