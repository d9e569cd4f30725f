"""The reset point after a capsule restore, on the CPU and (marked `gpu`) on a CUDA device.

A restore makes the restored state the point reset(keep_context=True) and a rollback to the ring's
oldest entry return to. The flat store's restore copies the capsule's bytes once: the reset point
refers to the stored bytes instead of copying their small state again, and the store hands them
back to the ring before it frees or reuses them. These tests hold the reset point to the restored
bytes (a byte comparison) after everything that may free or overwrite them, for both stores.
"""
import functools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashrt_ros.capsules.store import CapsuleStore, PagedCapsuleStore
from flashrt_ros.core.arena import META_EPISODE, META_LEN
from flashrt_ros.core.config import RuntimeConfig, StoreConfig, load_preset
from flashrt_ros.core.runtime import PolicyRuntime

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
STORES = {"flat": CapsuleStore, "paged": functools.partial(PagedCapsuleStore, block_tokens=4)}


def observations(n, seed=0, dim=14):
    g = np.random.default_rng(seed)
    return [g.standard_normal(dim).astype(np.float32) for _ in range(n)]


def make(device, tmp_path, kind="flat", **store_kw):
    rt = PolicyRuntime(load_preset("tiny"), RuntimeConfig(device=device, action_noise=0.1,
                                                          sample_seed=7, rollback_depth=8))
    rt.set_instruction("stack the blue block on the red one")
    store = STORES[kind](rt, StoreConfig(capsule_dir=str(tmp_path / "capsules"), **store_kw))
    return rt, store


def live(rt):
    return rt.live_state().cpu().clone()


def run(rt, obs):
    return [rt.step(o) for o in obs]


def in_episode(state, episode):
    """`state` (live bytes) with the episode number of its meta header set to `episode`: what a
    reset to it holds (a reset starts a new episode and changes nothing else)."""
    out = state.clone()
    out[:META_LEN * 8].view(torch.int64)[META_EPISODE] = episode
    return out


def assert_resets_to(rt, state, counters):
    """reset(keep_context=True) returns to `state` (bytes) and (step, position) `counters`."""
    episode = rt.reset(keep_context=True)
    assert torch.equal(live(rt), in_episode(state, episode))
    assert (rt.step_count, rt.position) == counters


def restored(rt, store, name):
    store.restore(name)
    return live(rt), (rt.step_count, rt.position)


def same_device_tier(device):
    """The memory tier whose bytes are on the arena's device."""
    return "gpu" if device == "cuda" else "host"


class CopiedBytes(TorchDispatchMode):
    """Counts the bytes that tensor copies (aten.copy_) write while it is active."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dst, src = (args + (None, None))[:2]
        if func is torch.ops.aten.copy_.default and not dst.is_set_to(src):   # onto itself: none
            self.nbytes += dst.numel() * dst.element_size()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("device", DEVICES)
def test_a_restore_copies_the_capsule_bytes_once(device, kind, tmp_path):
    rt, store = make(device, tmp_path, kind)
    run(rt, observations(3))
    cap = store.snapshot("a", tier=same_device_tier(device))
    run(rt, observations(2, seed=1))
    with CopiedBytes() as copied:
        store.restore("a")
    assert copied.nbytes == cap.nbytes, \
        f"a restore of {cap.nbytes} bytes copied {copied.nbytes} ({rt.arena.small_nbytes} small)"


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("device", DEVICES)
def test_reset_returns_to_the_restored_bytes(device, kind, tmp_path):
    rt, store = make(device, tmp_path, kind)
    run(rt, observations(3))
    for tier in store.memory.tiers + ("disk",):
        store.snapshot(f"a-{tier}", tier=tier)
    run(rt, observations(2, seed=1))
    for tier in store.memory.tiers + ("disk",):
        state, counters = restored(rt, store, f"a-{tier}")
        run(rt, observations(4, seed=2))
        assert_resets_to(rt, state, counters)
        run(rt, observations(1, seed=3))
        assert_resets_to(rt, state, counters)       # a second reset: the same point


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("device", DEVICES)
def test_the_reset_point_outlives_the_deleted_capsule_whose_storage_is_reused(device, kind,
                                                                             tmp_path):
    rt, store = make(device, tmp_path, kind)
    run(rt, observations(3))
    store.snapshot("a", tier=same_device_tier(device))
    run(rt, observations(2, seed=1))
    state, counters = restored(rt, store, "a")
    run(rt, observations(4, seed=2))
    store.delete("a")
    for i in range(3):                  # new capsules of other bytes take the freed storage
        store.snapshot(f"b{i}", tier=same_device_tier(device))
        run(rt, observations(1, seed=3 + i))
    assert_resets_to(rt, state, counters)


@pytest.mark.parametrize("eviction", ["demote", "drop"])
@pytest.mark.parametrize("kind", STORES)
def test_the_reset_point_outlives_the_evicted_capsule(kind, eviction, tmp_path):
    rt, store = make("cpu", tmp_path, kind, host_budget_mb=0.1, eviction=eviction)
    fit = int(0.1 * 2**20) // ((rt.live_nbytes() + 255) // 256 * 256)
    run(rt, observations(3))
    store.snapshot("a")
    state, counters = restored(rt, store, "a")
    for i in range(fit + 2):            # evicts "a" and writes other bytes where it was
        run(rt, observations(1, seed=1 + i))
        store.snapshot(f"b{i}")
    assert store.capsules.get("a") is None or store.get("a").tier == "disk"
    assert_resets_to(rt, state, counters)


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("device", DEVICES)
def test_the_reset_point_outlives_a_move_of_the_capsule(device, kind, tmp_path):
    rt, store = make(device, tmp_path, kind)
    run(rt, observations(3))
    store.snapshot("a", tier=same_device_tier(device))
    state, counters = restored(rt, store, "a")
    run(rt, observations(2, seed=1))
    store.move("a", "host" if device == "cuda" else "disk")
    store.snapshot("b", tier=same_device_tier(device))     # takes the storage "a" left
    assert_resets_to(rt, state, counters)


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("device", DEVICES)
def test_a_restore_of_another_capsule_moves_the_reset_point(device, kind, tmp_path):
    rt, store = make(device, tmp_path, kind)
    tier = same_device_tier(device)
    run(rt, observations(3))
    store.snapshot("a", tier=tier)
    run(rt, observations(2, seed=1))
    store.snapshot("b", tier=tier)
    restored(rt, store, "a")
    run(rt, observations(2, seed=2))
    state, counters = restored(rt, store, "b")
    run(rt, observations(2, seed=3))
    store.delete("a")
    store.delete("b")
    for i in range(3):                  # other bytes where "a" and "b" were
        store.snapshot(f"c{i}", tier=tier)
        run(rt, observations(1, seed=4 + i))
    assert_resets_to(rt, state, counters)


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("device", DEVICES)
def test_rollback_after_a_restore_returns_to_the_restored_bytes(device, kind, tmp_path):
    rt, store = make(device, tmp_path, kind)
    run(rt, observations(3))
    store.snapshot("a", tier=same_device_tier(device))
    run(rt, observations(2, seed=1))
    state, counters = restored(rt, store, "a")
    episode = rt.episode
    run(rt, observations(3, seed=2))
    rt.rollback(3)
    assert torch.equal(live(rt), state)
    assert (rt.step_count, rt.position, rt.episode) == (*counters, episode)
    run(rt, observations(2, seed=3))
    store.delete("a")
    store.snapshot("b", tier=same_device_tier(device))
    rt.rollback(2)
    assert torch.equal(live(rt), state)
    assert (rt.step_count, rt.position, rt.episode) == (*counters, episode)
    # after a reset the ring's oldest entry is the reset point again, in the new episode
    episode = rt.reset(keep_context=True)
    run(rt, observations(2, seed=4))
    rt.rollback(2)
    assert torch.equal(live(rt), in_episode(state, episode))


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("device", DEVICES)
def test_an_instruction_after_a_restore_is_the_new_reset_point(device, kind, tmp_path):
    rt, store = make(device, tmp_path, kind)
    run(rt, observations(3))
    store.snapshot("a", tier=same_device_tier(device))
    restored(rt, store, "a")
    rt.set_instruction("put the red block on the blue one")
    state, counters = live(rt), (rt.step_count, rt.position)
    run(rt, observations(2, seed=1))
    store.delete("a")
    store.snapshot("b", tier=same_device_tier(device))
    assert_resets_to(rt, state, counters)


@pytest.mark.parametrize("device", DEVICES)
def test_restore_state_of_a_callers_tensor_copies_the_reset_point(device, tmp_path):
    # bytes a caller hands in are the caller's to change afterwards: the reset point is a copy
    rt, _ = make(device, tmp_path)
    run(rt, observations(3))
    saved = rt.live_state().clone()
    state, counters = live(rt), (rt.step_count, rt.position)
    run(rt, observations(2, seed=1))
    rt.restore_state(saved)
    saved.zero_()
    run(rt, observations(2, seed=2))
    assert_resets_to(rt, state, counters)
