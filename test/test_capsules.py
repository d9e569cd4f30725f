"""Capsule exactness and failure atomicity, on the CPU and (marked `gpu`) on a CUDA device.

Exactness is a byte comparison: of stored bytes against the live arena, and of the actions and
state of a run continued after a restore against the uninterrupted run from the same boundary.
"""
import dataclasses
import os
import threading

import numpy as np
import pytest
import torch

from flashrt_ros.capsules.file import capsule_path, temp_path
from flashrt_ros.core.config import RuntimeConfig, StoreConfig, load_preset
from flashrt_ros.core.exceptions import (BudgetExceeded, CapsuleCorrupt, CapsuleExists, CapsuleMismatch,
                                    CapsuleNotFound, InputError)
from flashrt_ros.core.runtime import PolicyRuntime
from flashrt_ros.capsules.store import CapsuleStore

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def observations(n, seed=0, dim=14):
    g = np.random.default_rng(seed)
    return [g.standard_normal(dim).astype(np.float32) for _ in range(n)]


def make(device, tmp_path, noise=0.1, **store_kw):
    rt = PolicyRuntime(load_preset("tiny"), RuntimeConfig(device=device, action_noise=noise,
                                                          sample_seed=7, rollback_depth=8))
    rt.set_instruction("stack the blue block on the red one")
    store = CapsuleStore(rt, StoreConfig(capsule_dir=str(tmp_path / "capsules"), **store_kw))
    return rt, store


def live(rt):
    return rt.live_state().cpu().clone()


def run(rt, obs):
    return [rt.step(o) for o in obs]


def same_actions(a, b):
    return len(a) == len(b) and all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


def memory_tiers(device):
    return (["gpu", "host"] if device == "cuda" else ["host"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("boundary", [0, 1, 5, 13])
def test_restore_is_byte_exact_and_continuation_identical(device, boundary, tmp_path):
    rt, store = make(device, tmp_path)
    obs = observations(boundary + 12, seed=boundary)
    run(rt, obs[:boundary])
    for tier in memory_tiers(device) + ["disk"]:
        store.snapshot(f"at-{tier}", tier=tier)
    at_boundary = live(rt)
    reference = run(rt, obs[boundary:])
    reference_state = live(rt)
    for tier in memory_tiers(device) + ["disk"]:
        name = f"at-{tier}"
        assert torch.equal(store.capsule_bytes(name), at_boundary), tier
        store.restore(name)
        assert torch.equal(live(rt), at_boundary), tier
        assert (rt.step_count, rt.position) == (boundary, store.get(name).position)
        again = run(rt, obs[boundary:])
        assert same_actions(reference, again), f"actions diverged after restore from {tier}"
        assert torch.equal(live(rt), reference_state), tier


@pytest.mark.parametrize("device", DEVICES)
def test_restore_after_decoded_tokens_is_token_identical(device, tmp_path):
    rt, store = make(device, tmp_path)
    run(rt, observations(3))
    rt.decode(4)                       # grow the KV past the instruction
    store.snapshot("mid")
    ref = rt.decode(12)
    store.restore("mid")
    assert rt.decode(12) == ref


@pytest.mark.parametrize("device", DEVICES)
def test_forks_are_independent(device, tmp_path):
    rt, store = make(device, tmp_path)
    run(rt, observations(4))
    store.snapshot("root")
    store.fork("root", "a")
    store.fork("root", "b")
    root_bytes = store.capsule_bytes("root")
    store.restore("a")
    branch_a = run(rt, observations(6, seed=1))
    store.snapshot("a-end")
    store.restore("b")
    branch_b = run(rt, observations(6, seed=2))
    # running branches changed no stored capsule
    for name in ("root", "a", "b"):
        assert torch.equal(store.capsule_bytes(name), root_bytes), name
    # and a branch replays identically after the other ran
    store.restore("a")
    assert same_actions(run(rt, observations(6, seed=1)), branch_a)
    assert not same_actions(branch_a, branch_b)
    store.fork("", "live-copy", switch_to=True)
    assert store.lineage == "live-copy"


@pytest.mark.parametrize("device", DEVICES)
def test_rollback_equals_state_k_steps_ago(device, tmp_path):
    rt, _ = make(device, tmp_path)
    obs = observations(10)
    states = [live(rt)]
    for o in obs:
        rt.step(o)
        states.append(live(rt))
    for k in (1, 3):
        before = rt.step_count
        rt.rollback(k)
        assert rt.step_count == before - k
        assert torch.equal(live(rt), states[rt.step_count])
    cont = run(rt, obs[rt.step_count:])
    assert torch.equal(live(rt), states[-1])
    assert len(cont) == 10 - 6


@pytest.mark.parametrize("device", DEVICES)
def test_kv_only_restore_diverges(device, tmp_path):
    """The ablation: restoring only the KV prefix (recurrent/conv/MTP/action state stale) is wrong."""
    rt, store = make(device, tmp_path, noise=0.0)
    obs = observations(12)
    run(rt, obs[:4])
    store.snapshot("full")
    reference = run(rt, obs[4:])
    # full restore reproduces the run
    store.restore("full")
    assert same_actions(run(rt, obs[4:]), reference)
    # KV-only: copy just the KV prefix back, leave the small state of the later step in place
    cap_bytes = store.capsule_bytes("full")
    kv_off = rt.arena.kv_offset
    rt.arena.base[kv_off:kv_off + cap_bytes.numel() - kv_off].copy_(cap_bytes[kv_off:])
    kv_only = run(rt, obs[4:])
    assert not same_actions(kv_only, reference)
    assert kv_only[0].tobytes() != reference[0].tobytes(), "the very first action already differs"


def assert_unchanged(rt, store, before_live, before_index):
    assert torch.equal(live(rt), before_live)
    assert {n: (c.tier, c.nbytes, c.step) for n, c in store.capsules.items()} == before_index


def snapshot_of(rt, store):
    return live(rt), {n: (c.tier, c.nbytes, c.step) for n, c in store.capsules.items()}


def test_failed_operations_change_nothing(tmp_path):
    rt, store = make("cpu", tmp_path)
    run(rt, observations(3))
    store.snapshot("home")
    store.save("home")
    run(rt, observations(2, seed=5))
    before = snapshot_of(rt, store)
    bad_calls = [
        (CapsuleNotFound, lambda: store.restore("nope")),
        (InputError, lambda: store.restore("")),
        (InputError, lambda: store.snapshot("../escape")),
        (InputError, lambda: store.snapshot("a/b")),
        (InputError, lambda: store.snapshot(".hidden")),
        (InputError, lambda: store.snapshot("x" * 200)),
        (InputError, lambda: store.snapshot("héllo")),
        (InputError, lambda: store.snapshot("ok", tier="gpu")),      # CPU runtime
        (InputError, lambda: store.snapshot("ok", tier="tape")),
        (CapsuleExists, lambda: store.snapshot("home")),
        (CapsuleNotFound, lambda: store.fork("nope", "x")),
        (CapsuleExists, lambda: store.fork("home", "home")),
        (CapsuleNotFound, lambda: store.delete("nope")),
        (CapsuleNotFound, lambda: store.load("nope")),
        (InputError, lambda: rt.step(np.full(14, np.nan, np.float32))),
        (InputError, lambda: rt.step(np.zeros(3, np.float32))),
    ]
    for exc, call in bad_calls:
        with pytest.raises(exc) as info:
            call()
        assert "expected" in str(info.value) or "no capsule" in str(info.value) \
            or "exists" in str(info.value), str(info.value)
        assert_unchanged(rt, store, *before)


def _write_bad_file(store, name, mutate):
    """Capsule `name` (a disk fork of "home": its file names it), its file then mutated."""
    store.fork("home", name, tier="disk")
    path = capsule_path(store.cfg.capsule_dir, name)
    data = mutate(bytearray(open(path, "rb").read()))
    with open(path, "wb") as f:
        f.write(bytes(data))


def _flip_last_byte(d):
    d[-1] ^= 0x01
    return d


def _lie_about_position(d):
    return d.replace(b'"position":"', b'"position":"1', 1)


@pytest.mark.parametrize("mutate,exc", [
    (lambda d: d[: len(d) // 2], CapsuleCorrupt),                       # truncated
    (_flip_last_byte, CapsuleCorrupt),                                   # bit flip in the data
    (lambda d: d.replace(b'"format_version":"2"', b'"format_version":"9"'), CapsuleMismatch),
    (_lie_about_position, CapsuleCorrupt),                                # manifest lies about sizes
    (lambda d: b"not a capsule at all", CapsuleCorrupt),
])
def test_bad_capsule_files_are_refused_without_side_effects(tmp_path, mutate, exc):
    rt, store = make("cpu", tmp_path)
    run(rt, observations(3))
    store.snapshot("home", tier="disk")
    run(rt, observations(2, seed=5))
    _write_bad_file(store, "bad", mutate)
    store.rebuild_index()
    before = snapshot_of(rt, store)
    for call in (lambda: store.load("bad"), lambda: store.restore("bad")):
        try:
            call()
        except exc as e:
            assert "expected" in str(e) or "not a readable capsule" in str(e), str(e)
        except CapsuleNotFound:
            pass                        # unreadable headers are not indexed at all
        else:
            pytest.fail("a damaged capsule file was accepted")
        assert_unchanged(rt, store, *before)


def test_capsule_from_other_weights_is_refused(tmp_path):
    rt, store = make("cpu", tmp_path)
    store.snapshot("home", tier="disk")
    other = PolicyRuntime(load_preset("tiny", seed=1), RuntimeConfig(device="cpu"))
    other.set_instruction("stack the blue block on the red one")
    other_store = CapsuleStore(other, StoreConfig(capsule_dir=str(tmp_path / "capsules")))
    before = live(other)
    with pytest.raises(CapsuleMismatch, match="fingerprint"):
        other_store.restore("home")
    assert torch.equal(live(other), before)


def test_budget_lru_eviction_and_pins(tmp_path):
    rt, store = make("cpu", tmp_path, host_budget_mb=0.1, disk_budget_mb=1.0)
    size = rt.live_nbytes()
    fit = int(0.1 * 2**20) // ((size + 255) // 256 * 256)
    assert fit >= 2
    store.snapshot("pinned", pin=True)
    for i in range(fit + 1):
        store.snapshot(f"c{i}")
    tiers = {c.name: c.tier for c in store.list()}
    assert tiers["pinned"] == "host"
    assert tiers["c0"] == "disk", "the least recently used unpinned capsule is demoted first"
    assert tiers[f"c{fit}"] == "host"
    assert store.usage()["host"]["used"] <= int(0.1 * 2**20)
    # a demoted capsule restores exactly from disk and can be promoted back
    store.restore("c0")
    store.move("c0", "host")
    assert store.get("c0").tier == "host"


def test_a_file_eviction_wrote_is_marked_a_spill_until_the_user_asks_for_it(tmp_path):
    """Eviction to disk writes a file nobody asked for (`spilled`); save and an explicit move make
    it the user's; a capsule saved before it was evicted was never a spill. Promotion deletes a
    spill and keeps a saved file."""
    rt, store = make("cpu", tmp_path, host_budget_mb=0.1, disk_budget_mb=4.0)
    size = (rt.live_nbytes() + 255) // 256 * 256
    fit = int(0.1 * 2**20) // size
    store.snapshot("saved")
    store.save("saved")
    for i in range(fit + 2):
        store.snapshot(f"c{i}")
    tiers = {c.name: (c.tier, c.spilled) for c in store.list()}
    assert tiers["saved"] == ("disk", False) and tiers["c0"] == ("disk", True), tiers
    assert tiers[f"c{fit + 1}"] == ("host", False)
    store.save("c0")
    assert not store.get("c0").spilled
    c1 = store.get("c1")
    assert c1.tier == "disk" and c1.spilled
    store.move("c1", "host")                     # promoted: the spill is gone
    assert store.get("c1").path is None and store.get("c1").file == ""
    saved = store.move("saved", "host")          # promoted: the saved file stays
    assert saved.tier == "host" and saved.file == "saved" and os.path.isfile(saved.path)
    store.move("saved", "disk")                  # and is the disk copy again: nothing written
    assert store.get("saved").file == "saved"


def test_pinned_set_that_cannot_fit_is_a_clear_error(tmp_path):
    rt, store = make("cpu", tmp_path, host_budget_mb=0.1)
    size = (rt.live_nbytes() + 255) // 256 * 256
    n = int(0.1 * 2**20) // size
    for i in range(n):
        store.snapshot(f"p{i}", pin=True)
    before = snapshot_of(rt, store)
    with pytest.raises(BudgetExceeded, match="pinned"):
        store.snapshot("one-more", pin=True)
    assert_unchanged(rt, store, *before)


def test_drop_eviction_policy(tmp_path):
    rt, store = make("cpu", tmp_path, host_budget_mb=0.1, eviction="drop")
    size = (rt.live_nbytes() + 255) // 256 * 256
    n = int(0.1 * 2**20) // size
    for i in range(n + 2):
        store.snapshot(f"c{i}")
    assert "c0" not in store.capsules and "c1" not in store.capsules
    assert not os.path.exists(capsule_path(store.cfg.capsule_dir, "c0"))


def test_store_rebuilds_index_from_disk_and_drops_temp_files(tmp_path):
    rt, store = make("cpu", tmp_path)
    run(rt, observations(2))
    store.snapshot("a", tier="disk")
    expected = store.capsule_bytes("a")
    tmp = temp_path(capsule_path(store.cfg.capsule_dir, "b"))   # a write killed before its rename
    open(tmp, "wb").write(b"half a capsule")
    rt2, _ = make("cpu", tmp_path)
    store2 = CapsuleStore(rt2, StoreConfig(capsule_dir=store.cfg.capsule_dir))
    assert [c.name for c in store2.list()] == ["a"]
    assert not os.path.exists(tmp)
    store2.restore("a")
    assert torch.equal(live(rt2), expected)


def test_verify_and_lineage(tmp_path):
    rt, store = make("cpu", tmp_path)
    store.snapshot("home")
    digest = store.verify("home")
    path = store.save("home", keep_in_memory=True)
    assert store.get("home").digest == digest and os.path.exists(path)
    run(rt, observations(2))
    store.restore("home")
    store.snapshot("child")
    assert store.get("child").parent == "home"


def test_the_digest_is_the_same_for_any_number_of_hashing_threads(tmp_path):
    """store.digest_threads sets how many threads hash (1: the caller's thread alone); the digest
    of a file written on one thread is the one a read on three and a memory copy on every core
    compute."""
    from flashrt_ros.capsules import digest
    from flashrt_ros.core.exceptions import ConfigError
    data = np.random.default_rng(0).integers(0, 256, 3 * digest.LEAF_BYTES + 5, dtype=np.uint8)
    views = [data[:7], data[7:]]                  # leaves that span views
    assert len({digest.tree_digest(views, threads) for threads in (0, 1, 2, 3)}) == 1
    assert digest.TreeHash(len(data), 1).pool is None
    assert digest.TreeHash(len(data), 3).pool._max_workers == 3
    rt, store = make("cpu", tmp_path, digest_threads=1)
    store.snapshot("a")
    store.save("a", keep_in_memory=False)
    written = store.get("a").digest
    store.cfg = dataclasses.replace(store.cfg, digest_threads=3)
    assert store.verify("a") == written           # the file, read back on three threads
    store.cfg = dataclasses.replace(store.cfg, digest_threads=0)
    store.load("a", tier="host")
    store.get("a").digest = ""
    assert store.verify("a") == written           # the memory copy, on every core
    with pytest.raises(ConfigError, match="store.digest_threads.*0 = one per core"):
        StoreConfig(digest_threads=-1)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_fork_of_the_live_state_that_switches_adopts_the_bytes_in_place(tier, tmp_path,
                                                                          monkeypatch):
    """fork('', name, switch_to=True) continues on the live bytes it just captured: nothing is
    copied or read back, and the state goes on (steps, rollback, reset) exactly as after a
    snapshot followed by a restore."""
    rt, store = make("cpu", tmp_path)
    ref, ref_store = make("cpu", tmp_path / "ref")
    for r in (rt, ref):
        run(r, observations(3))
    ref_store.snapshot("b", tier=tier)
    ref_store.restore("b")

    def never(*args, **kwargs):
        raise AssertionError("the fork copied its capsule back into the live state")
    monkeypatch.setattr(store, "_read_file", never)
    monkeypatch.setattr(store.memory, "restore", never)
    store.fork("", "b", tier=tier, switch_to=True)
    assert store.lineage == "b" == ref_store.lineage
    assert (rt.position, rt.step_count, rt.episode) == (ref.position, ref.step_count, ref.episode)
    assert torch.equal(live(rt), live(ref))
    assert same_actions(run(rt, observations(4, seed=3)), run(ref, observations(4, seed=3)))
    assert rt.rollback(2) == ref.rollback(2) and torch.equal(live(rt), live(ref))
    rt.reset(keep_context=True)
    ref.reset(keep_context=True)
    assert torch.equal(live(rt), live(ref))


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_fork_that_switches_lets_no_step_run_between_its_snapshot_and_its_restore(tier, tmp_path):
    """fork('', name, switch_to=True) is one committed boundary. A control step is let loose right
    after the fork's snapshot: it must wait for the switch and then run on the branch, not run
    before the restore and be undone by it."""
    rt, store = make("cpu", tmp_path)
    run(rt, observations(3))
    obs = observations(1, seed=5)[0]
    go, stepped, seen = threading.Event(), threading.Event(), {}

    def control_step():
        go.wait(10)
        with rt.lock:
            seen["before"] = live(rt)
            rt.step(obs)
        stepped.set()

    snapshot = store.snapshot

    def snapshot_then_let_a_step_try(*args, **kwargs):
        cap = snapshot(*args, **kwargs)
        go.set()
        stepped.wait(0.5)      # an atomic fork holds the runtime lock: the step cannot run yet
        return cap

    store.snapshot = snapshot_then_let_a_step_try     # fork takes its snapshot through self.snapshot
    thread = threading.Thread(target=control_step)
    thread.start()
    try:
        cap = store.fork("", "branch", tier=tier, switch_to=True)
    finally:
        go.set()
        thread.join(10)
    assert stepped.is_set() and store.lineage == "branch"
    # the step ran on the branch's bytes, after the switch, and was kept
    assert torch.equal(seen["before"], store.capsule_bytes("branch"))
    assert rt.step_count == cap.step + 1, "a step ran between the fork's snapshot and its restore"
    after = live(rt)
    store.restore("branch")
    replay = threading.Thread(target=rt.step, args=(obs,))   # torch's thread count is per thread
    replay.start()
    replay.join(10)
    assert torch.equal(live(rt), after)


def test_on_reset_does_not_wait_for_a_call_that_holds_the_store_lock(tmp_path):
    """A control step that resets the episode clears the lineage while a save may hold store.lock
    through its file write: on_reset takes the runtime lock only."""
    rt, store = make("cpu", tmp_path)
    store.snapshot("home")
    store.restore("home")
    assert store.lineage == "home"
    held, release = threading.Event(), threading.Event()

    def long_save():
        with store.lock:
            held.set()
            release.wait(10)

    saver = threading.Thread(target=long_save)
    saver.start()
    try:
        assert held.wait(10)
        reset = threading.Thread(target=lambda: (rt.reset(), store.on_reset()))
        reset.start()
        reset.join(5)
        assert not reset.is_alive(), "on_reset waited for store.lock"
    finally:
        release.set()
        saver.join(10)
    assert store.lineage == ""
    store.restore("home")
    store.delete("home")            # deleting the capsule the live state descends from
    assert store.lineage == ""


def test_list_by_tier_auto_lists_the_default_tier(tmp_path):
    """A tier filter of "auto" (what a snapshot's tier "auto" stores into) lists that tier's
    capsules, as "host" does on the CPU; an unknown tier is refused with the accepted ones."""
    rt, store = make("cpu", tmp_path)
    store.snapshot("a")
    store.snapshot("b", tier="disk")
    assert [c.name for c in store.list("auto")] == [c.name for c in store.list("host")] == ["a"]
    assert [c.name for c in store.list("disk")] == ["b"]
    with pytest.raises(InputError, match="expected one of gpu, host, disk"):
        store.list("tape")
