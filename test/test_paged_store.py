"""The paged capsule store: exactness, sharing, reference counts and budgets.

Three layers:
  * the flat store's exactness and atomicity tests (test_capsules.py), run unchanged against
    PagedCapsuleStore with small blocks (many blocks, partial last blocks);
  * targeted tests of what paging adds: forks share blocks, sharing is byte-checked (a rollback
    and re-decode, or a restore behind the store's back, is never mistaken for shared history),
    copy-on-write of partial blocks, the gather path of fragmented restores, tier moves that keep
    sharing, budgets;
  * a hypothesis state machine over random snapshot / fork / restore / delete / step / decode /
    rollback / reset / move sequences: every stored capsule keeps the bytes it was taken with,
    reference counts equal table references, budgets hold, and deleting everything frees every
    block.
"""
import functools
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import test_capsules as flat_tests
from flashrt_ros.capsules import paged
from flashrt_ros.core.arena import META_CONTEXT_LEN, META_EPISODE, META_POSITION, META_STEP
from flashrt_ros.core.config import RuntimeConfig, StoreConfig, load_preset
from flashrt_ros.core.exceptions import BudgetExceeded
from flashrt_ros.capsules.paged import BlockMemory
from flashrt_ros.core.config import auto_block_tokens
from flashrt_ros.core.runtime import PolicyRuntime
from flashrt_ros.capsules.store import CapsuleStore, PagedCapsuleStore, make_store

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
INSTRUCTION = "stack the blue block on the red one"


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """One torch CPU thread, as the node configures tiny presets: on a loaded 2-core CI machine
    two threads make every small op several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def observations(n, seed=0):
    g = np.random.default_rng(seed)
    return [g.standard_normal(14).astype(np.float32) for _ in range(n)]


def live(rt):
    return rt.live_state().cpu().clone()


def assert_mirrors_match_state(rt):
    """The runtime's host counters agree with the restored bytes' own meta header (a restore
    adopts the capsule's recorded counters instead of reading them back)."""
    meta = rt.arena.meta.cpu()
    assert (rt.position, rt.step_count, rt.episode, rt.context_len) == \
        tuple(int(meta[i]) for i in (META_POSITION, META_STEP, META_EPISODE, META_CONTEXT_LEN))


def make(device, tmp_path, block_tokens=4, max_context=512, instruction=INSTRUCTION, **store_kw):
    rt = PolicyRuntime(load_preset("tiny", max_context=max_context),
                       RuntimeConfig(device=device, action_noise=0.1, sample_seed=7,
                                     rollback_depth=8))
    rt.set_instruction(instruction)
    store = PagedCapsuleStore(rt, StoreConfig(capsule_dir=str(tmp_path / "capsules"), **store_kw),
                              block_tokens=block_tokens)
    return rt, store


# -- the flat store's tests, against the paged store -----------------------------------------
@pytest.fixture
def flat(monkeypatch):
    """test_capsules.py with PagedCapsuleStore in place of CapsuleStore; 4-token blocks, so the
    instruction's 36 tokens span 9 blocks and decoded tokens leave partial last blocks."""
    monkeypatch.setattr(flat_tests, "CapsuleStore",
                        functools.partial(PagedCapsuleStore, block_tokens=4))
    return flat_tests


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("boundary", [0, 1, 5, 13])
def test_restore_is_byte_exact_and_continuation_identical(flat, device, boundary, tmp_path):
    flat.test_restore_is_byte_exact_and_continuation_identical(device, boundary, tmp_path)


@pytest.mark.parametrize("device", DEVICES)
def test_restore_after_decoded_tokens_is_token_identical(flat, device, tmp_path):
    flat.test_restore_after_decoded_tokens_is_token_identical(device, tmp_path)


@pytest.mark.parametrize("device", DEVICES)
def test_forks_are_independent(flat, device, tmp_path):
    flat.test_forks_are_independent(device, tmp_path)


@pytest.mark.parametrize("device", DEVICES)
def test_kv_only_restore_diverges(flat, device, tmp_path):
    flat.test_kv_only_restore_diverges(device, tmp_path)


def test_failed_operations_change_nothing(flat, tmp_path):
    flat.test_failed_operations_change_nothing(tmp_path)


@pytest.mark.parametrize(
    "mutate,exc",
    flat_tests.test_bad_capsule_files_are_refused_without_side_effects.pytestmark[0].args[1])
def test_bad_capsule_files_are_refused_without_side_effects(flat, tmp_path, mutate, exc):
    flat.test_bad_capsule_files_are_refused_without_side_effects(tmp_path, mutate, exc)


def test_capsule_from_other_weights_is_refused(flat, tmp_path):
    flat.test_capsule_from_other_weights_is_refused(tmp_path)


def test_store_rebuilds_index_from_disk_and_drops_temp_files(flat, tmp_path):
    flat.test_store_rebuilds_index_from_disk_and_drops_temp_files(tmp_path)


def test_verify_and_lineage(flat, tmp_path):
    flat.test_verify_and_lineage(tmp_path)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_fork_that_switches_lets_no_step_run_between_its_snapshot_and_its_restore(flat, tier,
                                                                                     tmp_path):
    flat.test_a_fork_that_switches_lets_no_step_run_between_its_snapshot_and_its_restore(
        tier, tmp_path)


def test_on_reset_does_not_wait_for_a_call_that_holds_the_store_lock(flat, tmp_path):
    flat.test_on_reset_does_not_wait_for_a_call_that_holds_the_store_lock(tmp_path)


# -- what paging adds ---------------------------------------------------------------------------
@pytest.fixture(params=["copy-first", "compare-first"])
def snapshot_path(request, monkeypatch):
    """Both snapshot paths: copy the live range into fresh blocks and share equal ones after (when
    the pool has room for it), or compare the live bytes first and copy only the new chunks."""
    if request.param == "compare-first":
        monkeypatch.setattr(BlockMemory, "_copy_then_share", lambda self, tier, prefer: None)
    return request.param


def test_make_store_and_block_size_choice(tmp_path):
    rt = PolicyRuntime(load_preset("tiny"), RuntimeConfig(device="cpu"))
    flat = make_store(rt, StoreConfig(capsule_dir=str(tmp_path / "a")))
    paged_store = make_store(rt, StoreConfig(capsule_dir=str(tmp_path / "b"), paged=True))
    assert type(flat) is CapsuleStore and isinstance(paged_store, PagedCapsuleStore)
    assert paged_store.memory.block_tokens == 16          # tiny: 33 KB small state, 256 B rows
    assert auto_block_tokens(19546368, 12288) == 64        # hybrid-0.8b: 768 KiB blocks
    pinned = make_store(rt, StoreConfig(capsule_dir=str(tmp_path / "c"), paged=True,
                                        block_tokens=32))
    assert pinned.memory.block_tokens == 32


@pytest.mark.parametrize("module", ["flashrt_ros.capsules.blocks", "flashrt_ros.capsules.paged"])
def test_paged_modules_import_without_ros(module):
    import test_core_without_ros
    test_core_without_ros.test_core_module_imports_without_ros(module)


@pytest.mark.parametrize("device", DEVICES)
def test_forks_that_ran_control_steps_share_the_kv(device, tmp_path, snapshot_path):
    tokens = [(7 * i) % 256 for i in range(1500)]
    rt, store = make(device, tmp_path, block_tokens=16, max_context=2048, instruction=tokens)
    store.snapshot("root")
    root = live(rt)
    forks = {}
    for i in range(8):
        store.restore("root")
        flat_tests.run(rt, observations(5, seed=i))
        store.snapshot(f"fork-{i}")
        forks[f"fork-{i}"] = live(rt)
    n_kv = -(-rt.position // 16)
    use = store.usage()[store._tier(None)]
    # the KV once, a small state per capsule
    assert use["blocks_used"] == n_kv + 9 * store.memory.n_small
    assert use["logical"] == 9 * root.numel()
    for name, expected in forks.items():
        assert torch.equal(store.capsule_bytes(name), expected)
        store.restore(name)
        assert torch.equal(live(rt), expected)
    assert torch.equal(store.capsule_bytes("root"), root)
    store.check_invariants()


def test_rollback_and_redecode_is_not_mistaken_for_shared_history(tmp_path, snapshot_path):
    rt, store = make("cpu", tmp_path)
    rt.decode(10)                               # rows 36..45
    store.snapshot("a")
    a_bytes = live(rt)
    rt.rollback(6)                              # back to position 40: rows 40..45 are stale
    rt.prefill([1, 2, 3, 4, 5, 6])              # rewrite them with other tokens
    assert rt.position == store.get("a").position
    store.snapshot("b")
    b_bytes = live(rt)
    assert not torch.equal(a_bytes, b_bytes)
    assert torch.equal(store.capsule_bytes("a"), a_bytes)
    assert torch.equal(store.capsule_bytes("b"), b_bytes)
    mem = store.memory
    ta, tb = mem.tables["a"], mem.tables["b"]
    first_changed = mem.n_small + 40 // mem.block_tokens
    assert (ta[mem.n_small:first_changed] == tb[mem.n_small:first_changed]).all()
    assert not np.intersect1d(ta[first_changed:], tb[first_changed:]).size
    store.restore("a")
    assert torch.equal(live(rt), a_bytes)
    store.check_invariants()


def test_a_restore_behind_the_stores_back_is_caught_by_the_comparison(tmp_path, snapshot_path):
    rt, store = make("cpu", tmp_path)
    rt.decode(12)
    store.snapshot("a")
    other = live(rt)
    other[rt.arena.kv_offset + 5 * rt.arena.kv_row_nbytes] ^= 1    # a different row 5
    rt.restore_state(other)                     # not through the store: its donor is stale
    store.snapshot("b")
    assert torch.equal(store.capsule_bytes("b"), other)
    tables, n_small = store.memory.tables, store.memory.n_small
    assert tables["b"][n_small + 1] != tables["a"][n_small + 1]
    assert tables["b"][n_small + 2] == tables["a"][n_small + 2]


def test_partial_last_block_is_shared_as_a_prefix_and_copied_on_write(tmp_path, snapshot_path):
    rt, store = make("cpu", tmp_path)
    tables, n_small = store.memory.tables, store.memory.n_small
    assert rt.position % store.memory.block_tokens == 0   # the instruction fills whole blocks
    rt.decode(2)                                # 38 rows: the last block holds 2 of 4
    store.snapshot("p2")
    last = tables["p2"][-1]
    store.snapshot("p2-again")                  # same bytes: everything shared
    assert (tables["p2-again"] == tables["p2"]).all()
    rt.decode(1)                                # needs 3 rows of that block: a new one
    store.snapshot("p3")
    assert tables["p3"][-1] != last
    assert (tables["p3"][n_small:-1] == tables["p2"][n_small:-1]).all()
    rt.rollback(1)                              # 38 rows again; the block of p3 holds 3 >= 2
    store.snapshot("p2-after")
    assert tables["p2-after"][-1] == tables["p3"][-1]
    assert torch.equal(store.capsule_bytes("p2-after"), store.capsule_bytes("p2"))
    store.check_invariants()


def test_fragmented_tables_restore_by_one_gather(tmp_path, monkeypatch):
    rt, store = make("cpu", tmp_path, host_budget_mb=0.25)
    store.snapshot("home")
    # occupy every other free block, so the next capsule's new blocks are all scattered
    pool = store.memory.blocks["host"]
    held = pool.allocate(pool.free_blocks)
    pool.decref(held[::2])
    rt.decode(60)
    store.snapshot("scattered")
    pool.decref(held[1::2])
    store.check_invariants()
    expected = live(rt)
    ids = store.memory.tables["scattered"]
    _, sizes = store.memory._layout(store.get("scattered").position)
    assert len(store.memory._runs(np.arange(len(ids)), ids, sizes)) > paged.RUN_COPY_LIMIT
    calls = []
    real = torch.index_select
    monkeypatch.setattr(torch, "index_select", lambda *a, **k: calls.append(1) or real(*a, **k))
    store.restore("home")
    store.restore("scattered")
    assert calls, "a fragmented table must take the gather path"
    assert torch.equal(live(rt), expected)
    # the run-copy path (the reference) gives the same bytes
    monkeypatch.setattr(paged, "RUN_COPY_LIMIT", 10**9)
    store.memory._plans.clear()                 # restore plans are cached per capsule
    calls.clear()
    store.restore("home")
    store.restore("scattered")
    assert not calls and torch.equal(live(rt), expected)


def test_disk_round_trip_and_load_share_with_the_parent(tmp_path):
    rt, store = make("cpu", tmp_path)
    store.snapshot("root")
    store.restore("root")
    flat_tests.run(rt, observations(3))
    store.snapshot("child")
    child = live(rt)
    store.save("child", keep_in_memory=False)
    assert store.get("child").tier == "disk"
    before = store.usage()["host"]["blocks_used"]
    store.load("child")
    # only the small state came back as new blocks: the KV is the parent's
    assert store.usage()["host"]["blocks_used"] - before == store.memory.n_small
    assert torch.equal(store.capsule_bytes("child"), child)
    assert store.get("child").known() is not None     # restores need no read-back
    store.restore("root")
    store.restore("child")
    assert torch.equal(live(rt), child)
    assert_mirrors_match_state(rt)
    store.move("child", "disk")
    store.move("child", "host")
    store.restore("child")
    assert torch.equal(live(rt), child)
    store.fork("child", "child-on-disk", tier="disk")
    assert torch.equal(store.capsule_bytes("child-on-disk"), child)
    store.check_invariants()


def test_budget_eviction_and_pins(tmp_path):
    # 4-token blocks of 1 KiB: one capsule is 33 small-state blocks + 9 KV blocks
    rt, store = make("cpu", tmp_path, host_budget_mb=0.125, disk_budget_mb=4.0)
    store.snapshot("pinned", pin=True)
    names = []
    for i in range(6):
        flat_tests.run(rt, observations(1, seed=i))
        store.snapshot(f"s{i}")
        names.append(f"s{i}")
    tiers = {c.name: c.tier for c in store.list()}
    assert tiers["pinned"] == "host" and tiers["s5"] == "host"
    assert tiers["s0"] == "disk", "the least recently used unpinned capsule is demoted first"
    use = store.usage()["host"]
    assert use["used"] <= use["budget"]
    store.check_invariants()
    # pins that leave no room: a clear error and nothing changes
    for n in names:
        if store.get(n).tier == "host":
            store.pin(n)
    flat_tests.run(rt, observations(1, seed=99))
    before = flat_tests.snapshot_of(rt, store)
    with pytest.raises(BudgetExceeded, match="pinned"):
        store.snapshot("one-more")
    flat_tests.assert_unchanged(rt, store, *before)
    store.check_invariants()


def test_a_capsule_is_stored_whole_when_its_candidate_and_it_cannot_both_fit(tmp_path):
    # 60 blocks: one capsule (33 + 9) fits, a second small state next to it does not
    rt, store = make("cpu", tmp_path, host_budget_mb=60 / 1024)
    store.snapshot("a")
    flat_tests.run(rt, observations(2))
    store.snapshot("b")
    b = live(rt)
    assert store.get("a").tier == "disk" and store.get("b").tier == "host"
    assert torch.equal(store.capsule_bytes("b"), b)
    store.restore("a")
    store.restore("b")
    assert torch.equal(live(rt), b)
    store.check_invariants()


@pytest.mark.gpu
def test_gpu_host_moves_keep_sharing(tmp_path):
    tokens = [(3 * i) % 256 for i in range(400)]
    rt, store = make("cuda", tmp_path, block_tokens=16, max_context=1024, instruction=tokens)
    store.snapshot("root", tier="gpu")
    expected = {"root": live(rt)}
    for i in range(4):
        store.restore("root")
        flat_tests.run(rt, observations(3, seed=i))
        store.snapshot(f"f{i}", tier="gpu")
        expected[f"f{i}"] = live(rt)
    for name in expected:
        store.move(name, "host")
    n_kv = -(-rt.position // 16)
    assert store.usage()["host"]["blocks_used"] == n_kv + 5 * store.memory.n_small
    assert store.usage()["gpu"]["blocks_used"] == 0
    store.move("f2", "gpu")
    store.fork("f2", "f2-host-copy", tier="host")
    for name, b in expected.items():
        assert torch.equal(store.capsule_bytes(name), b), name
        store.restore(name)
        assert torch.equal(live(rt), b), name
    store.check_invariants()
    for name in list(store.capsules):
        store.delete(name)
    assert all(p.used_blocks == 0 for p in store.memory.blocks.values()) and not store.memory._twins


# -- property test ------------------------------------------------------------------------------
_RUNTIME = {}


def _runtime():
    if "rt" not in _RUNTIME:
        _RUNTIME["rt"] = PolicyRuntime(load_preset("tiny", max_context=256),
                                       RuntimeConfig(device="cpu", action_noise=0.1,
                                                     sample_seed=3, rollback_depth=4))
    return _RUNTIME["rt"]


class PagedStoreMachine(RuleBasedStateMachine):
    """A random session against one store; `expected` is what every capsule must hold."""

    def __init__(self):
        super().__init__()
        self.rt = _runtime()
        self.rt.set_instruction("pick it up")     # 12 tokens: 3 blocks (decoding is the cost)
        self.dir = tempfile.TemporaryDirectory()
        # 1 KiB blocks; a capsule is 33 small-state blocks + ~3-30 KV blocks, so 48 blocks hold
        # one capsule (and its forks): a second small state evicts, and long decodes overflow
        self.store = PagedCapsuleStore(
            self.rt, StoreConfig(capsule_dir=self.dir.name, host_budget_mb=48 / 1024,
                                 disk_budget_mb=64.0), block_tokens=4)
        self.expected = {}
        self.made = 0

    def teardown(self):
        for name, b in self.expected.items():     # disk capsules too (the invariant skips them)
            assert torch.equal(self.store.capsule_bytes(name), b), name
        for name in list(self.store.capsules):
            self.store.delete(name)
        pool = self.store.memory.blocks["host"]
        assert pool.used_blocks == 0 and pool.free_blocks == pool.n_blocks, "blocks leaked"
        assert not self.store.memory._twins and not self.store.memory.tables
        self.dir.cleanup()

    def _new_name(self):
        self.made += 1
        return f"c{self.made}"

    def _existing(self, data):
        return data.draw(st.sampled_from(sorted(self.expected)))

    @rule(n=st.integers(1, 3))
    def step(self, n):
        self.made += 1
        flat_tests.run(self.rt, observations(n, seed=self.made))

    @rule(n=st.integers(1, 5))
    def decode(self, n):
        if self.rt.position + n <= self.rt.max_tokens:
            self.rt.decode(n)

    @rule(k=st.integers(1, 3))
    def rollback(self, k):
        if k <= self.rt.ring.available:
            self.rt.rollback(k)

    @rule(keep=st.booleans())
    def reset(self, keep):
        self.rt.reset(keep_context=keep)
        self.store.on_reset()

    @rule(tier=st.sampled_from(["host", "host", "host", "disk"]), pin=st.booleans())
    def snapshot(self, tier, pin):
        name = self._new_name()
        try:
            self.store.snapshot(name, tier=tier, pin=pin)
        except BudgetExceeded:
            assert name not in self.store.capsules
            return
        self.expected[name] = live(self.rt)

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), tier=st.sampled_from(["host", "host", "disk"]), switch=st.booleans())
    def fork(self, data, tier, switch):
        source, name = self._existing(data), self._new_name()
        try:
            self.store.fork(source, name, tier=tier, switch_to=switch)
        except BudgetExceeded:
            assert name not in self.store.capsules
            return
        self.expected[name] = self.expected[source]
        if switch:
            assert torch.equal(live(self.rt), self.expected[name])

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def restore(self, data):
        name = self._existing(data)
        self.store.restore(name)
        assert torch.equal(live(self.rt), self.expected[name])
        assert_mirrors_match_state(self.rt)

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def delete(self, data):
        name = self._existing(data)
        self.store.delete(name)
        del self.expected[name]

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), tier=st.sampled_from(["host", "disk"]))
    def move(self, data, tier):
        try:
            self.store.move(self._existing(data), tier)
        except BudgetExceeded:
            pass

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), pinned=st.booleans())
    def pin(self, data, pinned):
        self.store.pin(self._existing(data), pinned)

    @invariant()
    def stored_bytes_and_refcounts(self):
        assert set(self.store.capsules) == set(self.expected)
        self.store.check_invariants()
        for name, b in self.expected.items():
            if self.store.get(name).tier != "disk":   # files are checked on restore and at the end
                assert torch.equal(self.store.capsule_bytes(name), b), name
        use = self.store.usage()
        assert use["host"]["used"] <= use["host"]["budget"]
        assert use["disk"]["used"] <= use["disk"]["budget"]


PagedStoreMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_paged_store_state_machine = PagedStoreMachine.TestCase

