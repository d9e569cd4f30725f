"""Inputs whose values fill fixed-width fields, refused where they enter, never where they are sent.

A capsule file's header, a parameter set at run time, a capsule name, a tier, an observation: each
is checked (type, range, whole match) when it arrives. A refused one changes nothing - the live
state, the stored capsules and the node's flags stay as they were - and the node keeps answering.
Node checks call the callbacks the node registered, in-process, and serialise every answer as rclpy
would send it (a value that does not fit its message field raises there and kills the node).
"""
import math

import numpy as np
import pytest
import torch

from flashrt_ros.capsules.file import capsule_path, read_header
from flashrt_ros.core.config import RuntimeConfig, StoreConfig, load_preset
from flashrt_ros.core.exceptions import CapsuleCorrupt, FlashRTError
from flashrt_ros.core.runtime import PolicyRuntime
from flashrt_ros.capsules.store import CapsuleStore
from node_client import call_service as call, configured_node

# (header field, bad value): negative, past uint64/int64, not a number, not finite, past int32 sec
BAD_HEADERS = [
    ("step", "-1"), ("step", str(2**64)), ("step", str(2**63)), ("step", "1e3"), ("step", " 5"),
    ("position", "-1"), ("position", str(2**64)), ("episode", "-1"), ("episode", str(2**64)),
    ("created", "nan"), ("created", "inf"), ("created", "-1.0"), ("created", "1e30"),
    ("created", "soon"), ("pinned", "yes"), ("digest", "zz"), ("parent", "../x"),
]


def _runtime():
    rt = PolicyRuntime(load_preset("tiny"), RuntimeConfig(device="cpu"))
    rt.set_instruction("bounded inputs")
    return rt


def rewrite_header(src: str, dst: str, **changes) -> None:
    """Copy a capsule file with some header fields replaced (the tensors, hence the digest, kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, dst, metadata=meta)


def _state(rt, store):
    return (bytes(rt.live_state().numpy()), (rt.step_count, rt.position, rt.episode),
            {n: (c.tier, c.step, c.position, c.nbytes, c.created) for n, c in store.capsules.items()})


@pytest.mark.parametrize("key,value", BAD_HEADERS)
def test_capsule_header_fields_are_typed_and_range_checked(tmp_path, key, value):
    rt = _runtime()
    store = CapsuleStore(rt, StoreConfig(capsule_dir=str(tmp_path / "caps")))
    for i in range(3):
        rt.step(np.full(14, 0.1 * i, np.float32))
    store.snapshot("home", tier="disk")
    rt.step(np.ones(14, np.float32))
    bad = capsule_path(store.cfg.capsule_dir, "bad")
    rewrite_header(capsule_path(store.cfg.capsule_dir, "home"), bad, name="bad", **{key: value})
    assert read_header(bad)[key] == value
    store.rebuild_index()                        # a file in the directory at start: skipped
    assert "bad" not in store.capsules
    assert any(key in s for s in store.skipped_files), store.skipped_files
    before = _state(rt, store)
    for call in (lambda: store.load("bad"), lambda: store.restore("bad")):
        with pytest.raises(FlashRTError):
            call()
        assert _state(rt, store) == before
    fresh = CapsuleStore(rt, StoreConfig(capsule_dir=store.cfg.capsule_dir))
    assert sorted(fresh.capsules) == ["home"]
    msg = [s for s in fresh.skipped_files if s.startswith("bad")][0]
    assert f"'{key}'" in msg and "expected" in msg and "found" in msg, msg
    from flashrt_ros.capsules.file import capsule_from_header
    with pytest.raises(CapsuleCorrupt, match=key):
        capsule_from_header(read_header(bad), bad)


# -- the node: the same files, served -------------------------------------------------------
@pytest.fixture(scope="module")
def node(tmp_path_factory):
    pytest.importorskip("rclpy")
    with configured_node("/bounds", tmp_path_factory.mktemp("boundcaps"),
                         instruction="bounded inputs") as n:
        n.store.snapshot("home", tier="disk")
        n.runtime.step([0.5] * 14)
        yield n


def _node_state(n):
    return _state(n.runtime, n.store)


@pytest.mark.ros
@pytest.mark.parametrize("key,value", [("step", "-1"), ("step", str(2**64)), ("position", "-1"),
                                       ("created", "nan"), ("created", "1e30")])
def test_a_lying_header_never_reaches_an_answer(node, key, value):
    d = node.store.cfg.capsule_dir
    name = f"lie-{key}"
    rewrite_header(capsule_path(d, "home"), capsule_path(d, name), name=name, **{key: value})
    try:
        node.store.rebuild_index()             # as at start, with the file in the directory
        before = _node_state(node)
        listed = call(node, "list_capsules")
        assert listed.success, listed.message
        assert name not in [c.name for c in listed.capsules]
        res = call(node, "load_capsule", name=name, restore=True)
        assert not res.success and "expected" in res.message and key in res.message, res.message
        assert _node_state(node) == before
        assert call(node, "list_capsules").success
    finally:
        import os
        os.unlink(capsule_path(d, name))
        node.store.rebuild_index()


# -- parameters that fill fixed-width fields -------------------------------------------------
HUGE = [1e30, float("inf"), float("nan"), -1.0]
BOUNDED = ["store.gpu_budget_mb", "store.host_budget_mb", "store.disk_budget_mb", "deadline_ms",
           "stale_observation_s", "action_dt", "control_rate_hz", "status_rate_hz",
           "runtime.action_noise"]


@pytest.mark.parametrize("name", BOUNDED)
@pytest.mark.parametrize("value", HUGE)
def test_numeric_parameters_are_bounded_where_they_are_set(name, value):
    from flashrt_ros.core.exceptions import ConfigError
    from flashrt_ros.ros.params import configs_from_values, parameter_table
    if name == "runtime.action_noise" and value == 1e30:
        pytest.skip("action noise fills no fixed-width field; only finiteness is required")
    values = {n: d for n, d, *_ in parameter_table()}
    values[name] = value
    with pytest.raises(ConfigError) as info:
        configs_from_values(values)
    assert name.split(".")[-1] in str(info.value) and "expected" in str(info.value)


def test_every_integer_parameter_has_a_bound():
    """An integer parameter that takes any int could overflow the field it fills."""
    from flashrt_ros.core.exceptions import ConfigError
    from flashrt_ros.ros.params import configs_from_values, parameter_table
    for name, default, *_ in parameter_table():
        if isinstance(default, int) and not isinstance(default, bool):
            values = {n: d for n, d, *_ in parameter_table()}
            values[name] = 2**64
            with pytest.raises(ConfigError):
                configs_from_values(values)


@pytest.mark.ros
def test_a_huge_budget_set_at_run_time_is_refused_and_status_keeps_publishing(node):
    from rclpy.parameter import Parameter
    from rclpy.serialization import serialize_message

    from flashrt_ros.msg import PolicyStatus
    before = node.store.cfg
    sent = []
    publish = node.pub_status.publish
    node.pub_status.publish = lambda m: (serialize_message(m), sent.append(m), publish(m))
    try:
        for value in (1e30, 2.0**64, float("inf")):
            r = node._on_set_parameters([Parameter("store.disk_budget_mb", value=value)])
            assert not r.successful and "disk_budget_mb" in r.reason and "expected" in r.reason
            assert node.store.cfg == before
            node._publish_status()
        assert len(sent) == 3 and isinstance(sent[-1], PolicyStatus)
        r = node._on_set_parameters([Parameter("store.disk_budget_mb", value=float(1 << 40))])
        assert r.successful, r.reason
        node._publish_status()                  # the largest accepted budget still fits
    finally:
        node.pub_status.publish = publish
        node._on_set_parameters([Parameter("store.disk_budget_mb", value=before.disk_budget_mb)])


@pytest.mark.ros
def test_a_gpu_default_tier_set_at_run_time_on_a_cpu_runtime_is_refused(node):
    from rclpy.parameter import Parameter
    before = node.store.cfg
    r = node._on_set_parameters([Parameter("store.default_tier", value="gpu")])
    assert not r.successful and "store.default_tier" in r.reason and "CUDA" in r.reason, r.reason
    assert node.store.cfg == before
    assert node._on_set_parameters([Parameter("store.default_tier", value="disk")]).successful
    node._on_set_parameters([Parameter("store.default_tier", value=before.default_tier)])


# -- names are matched whole ----------------------------------------------------------------
BAD_NAMES = ["home\n", "a" * 128 + "\n", "home\r\n", "\nhome", "ho\nme", "home\x00", "home\t"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_are_matched_whole(tmp_path, name):
    from flashrt_ros.capsules.capsule import check_name
    from flashrt_ros.core.exceptions import InputError
    with pytest.raises(InputError, match="expected"):
        check_name(name)
    rt = _runtime()
    store = CapsuleStore(rt, StoreConfig(capsule_dir=str(tmp_path / "caps")))
    store.snapshot("home", tier="host")
    before = _state(rt, store)
    for call in (lambda: store.snapshot(name), lambda: store.fork("home", name),
                 lambda: store.restore(name), lambda: store.delete(name), lambda: store.save(name),
                 lambda: store.load(name)):
        with pytest.raises(InputError):
            call()
        assert _state(rt, store) == before
    import os
    assert os.listdir(store.cfg.capsule_dir) == []
    # a header whose name or parent ends in a newline is refused too
    store.snapshot("disk-home", tier="disk")
    src = capsule_path(store.cfg.capsule_dir, "disk-home")
    for key in ("name", "parent"):
        dst = capsule_path(store.cfg.capsule_dir, f"nl-{key}")
        rewrite_header(src, dst, **{"name": f"nl-{key}", key: f"nl-{key}\n"})
        from flashrt_ros.capsules.file import capsule_from_header
        with pytest.raises(CapsuleCorrupt, match=key):
            capsule_from_header(read_header(dst), dst)


# -- the tier of a request ------------------------------------------------------------------
BAD_TIERS = ["bogus", "GPU", "t" * 100_000, "gpu"]          # gpu: this runtime is on the CPU


@pytest.mark.parametrize("tier", BAD_TIERS, ids=["bogus", "GPU", "100k", "gpu-on-cpu"])
def test_a_bad_tier_is_refused_by_every_operation_before_anything_else(tmp_path, tier):
    from flashrt_ros.core.exceptions import InputError
    rt = _runtime()
    store = CapsuleStore(rt, StoreConfig(capsule_dir=str(tmp_path / "caps")))
    store.snapshot("home", tier="host")
    store.save("home")
    store.snapshot("memory-only", tier="host")
    before = _state(rt, store)
    calls = [lambda: store.load("home", tier=tier), lambda: store.load("memory-only", tier=tier),
             lambda: store.load("nope", tier=tier), lambda: store.snapshot("new", tier=tier),
             lambda: store.fork("home", "new", tier=tier), lambda: store.move("home", tier),
             lambda: store.list(tier)]
    for call in calls:
        with pytest.raises(InputError) as info:
            call()
        msg = str(info.value)
        assert "tier" in msg and "expected" in msg and len(msg) < 300, msg[:300]
        assert _state(rt, store) == before


def test_a_load_needs_the_file(tmp_path):
    from flashrt_ros.core.exceptions import CapsuleNotFound
    rt = _runtime()
    store = CapsuleStore(rt, StoreConfig(capsule_dir=str(tmp_path / "caps")))
    store.snapshot("memory-only", tier="host")
    before = _state(rt, store)
    with pytest.raises(CapsuleNotFound, match="expected a saved capsule"):
        store.load("memory-only")
    assert _state(rt, store) == before
    store.save("memory-only")
    assert store.load("memory-only").tier == "host"        # with its file: a load is a no-op


@pytest.mark.ros
@pytest.mark.parametrize("tier", BAD_TIERS, ids=["bogus", "GPU", "100k", "gpu-on-cpu"])
def test_load_capsule_of_a_capsule_in_memory_refuses_a_bad_tier(node, tier):
    if "in-mem" not in node.store.capsules:
        node.store.snapshot("in-mem", tier="host")
    before = _node_state(node)
    for name in ("in-mem", "home"):
        res = call(node, "load_capsule", name=name, tier=tier, restore=True)
        assert not res.success and "tier" in res.message and len(res.message) < 300, res.message[:300]
        assert _node_state(node) == before
    res = call(node, "load_capsule", name="in-mem")
    assert not res.success and "no capsule file" in res.message
    assert _node_state(node) == before


def test_a_bad_tier_of_a_list_says_what_an_empty_tier_lists(tmp_path):
    """For a list, '' means every tier (not the default tier, as for a snapshot)."""
    from flashrt_ros.core.exceptions import InputError
    store = CapsuleStore(_runtime(), StoreConfig(capsule_dir=str(tmp_path / "caps")))
    with pytest.raises(InputError) as info:
        store.list("bogus")
    assert "'' for every tier" in str(info.value) and "default" not in str(info.value), info.value
    with pytest.raises(InputError, match="'' for the default"):
        store.snapshot("x", tier="bogus")


@pytest.mark.ros
def test_list_capsules_with_a_bad_tier_says_what_an_empty_tier_lists(node):
    res = call(node, "list_capsules", tier="bogus")
    assert not res.success and "'' for every tier" in res.message, res.message
    assert call(node, "list_capsules", tier="").success


# -- an instruction is refused by its size before it is tokenized ----------------------------
def _spy_on_encode(rt) -> list:
    """The lengths of the texts rt's tokenizer is asked to encode from now on."""
    asked, encode = [], rt.tokenizer.encode
    rt.tokenizer.encode = lambda text: asked.append(len(text)) or encode(text)
    return asked


def test_an_oversized_instruction_is_refused_before_it_is_tokenized():
    """Tokenizing a 10 MB text holds the GIL for seconds (the control loop stalled 0.6-2 s):
    a text longer than the context could hold at the tokenizer's longest token is refused by its
    length alone."""
    from flashrt_ros.core.exceptions import InputError
    rt = _runtime()
    asked = _spy_on_encode(rt)
    before = (bytes(rt.live_state().numpy()), rt.position, rt.episode)
    limit = rt.max_tokens * rt.tokenizer.max_token_chars
    for n in (limit + 1, 10_000_000):
        with pytest.raises(InputError, match=f"at most {limit} characters.*found {n}"):
            rt.instruction_tokens("x" * n)
        with pytest.raises(InputError, match="characters"):
            rt.set_instruction("x" * n)
    assert asked == [] and (bytes(rt.live_state().numpy()), rt.position, rt.episode) == before
    # at the limit the text is tokenized, and the token count decides (BOS + one per byte)
    with pytest.raises(InputError, match="exceed the arena's"):
        rt.instruction_tokens("x" * limit)
    assert asked == [limit]
    assert len(rt.instruction_tokens("x" * (rt.max_tokens - 1))) == rt.max_tokens


@pytest.mark.ros
@pytest.mark.parametrize("text, says", [
    ("x" * 30_000_000, "found 30000000 bytes"),              # refused before it is decoded
    ("\u00e9" * 1000, "found 1000"),                          # decoded (2000 bytes), not tokenized
])
def test_the_node_refuses_an_oversized_instruction_without_tokenizing_it(node, text, says):
    """The instruction subscription takes the serialized message: its length is read before
    the text is decoded, and a text too long is refused by that alone."""
    from rclpy.serialization import serialize_message
    from std_msgs.msg import String
    assert node.sub_instr.raw
    asked = _spy_on_encode(node.runtime)
    before, rejected = _node_state(node), node._rejected
    node._on_instruction(serialize_message(String(data=text)))
    assert asked == [] and node._rejected == rejected + 1
    assert "instruction refused" in node._last_error and says in node._last_error
    assert len(node._last_error) < 400, node._last_error[:400]
    assert _node_state(node) == before
    node._on_instruction(serialize_message(String(data="pick up the cube")))
    assert asked == [len("pick up the cube")] and node._rejected == rejected + 1


def test_a_tokenizer_file_bounds_the_characters_of_a_token(tmp_path):
    """Its longest entry, at least UNKNOWN_WORD_CHARS (an unknown token stands for a whole word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from flashrt_ros.core.tokenizer import UNKNOWN_WORD_CHARS, FileTokenizer
    for longest in (4, 2 * UNKNOWN_WORD_CHARS):
        vocab = {w: i for i, w in enumerate(["[UNK]", "pick", "a" * longest])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(tmp_path / "tokenizer.json"))
        t = FileTokenizer(str(tmp_path / "tokenizer.json"))
        assert t.max_token_chars == max(longest, UNKNOWN_WORD_CHARS)
        assert t.encode("pick " + "z" * UNKNOWN_WORD_CHARS) == [1, 0]    # a word, one token
