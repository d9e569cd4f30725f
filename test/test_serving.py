"""core/serving.py without ROS: the deadline accounting (DeadlineMonitor), the BoundaryLock's
ordering and its use as the runtime's lock, PolicyRuntime.warm_up's promise that the state
afterwards is byte-identical, torch's thread count per thread, and the nice value of every
thread."""
import os
import threading

import numpy as np
import pytest
import torch

from flashrt_ros.core.config import TINY, RuntimeConfig, load_preset
from flashrt_ros.core.exceptions import ConfigError
from flashrt_ros.core.runtime import PolicyRuntime
from flashrt_ros.core.serving import (BoundaryLock, DeadlineMonitor, pin_torch_threads,
                                      set_thread_nice)
from flashrt_ros.ros.waiting import wait_for


def observations(n, seed=2, dim=14):
    g = np.random.default_rng(seed)
    return [g.standard_normal(dim).astype(np.float32) for _ in range(n)]


def test_deadline_monitor_counts_late_commits_and_skipped_ticks():
    ms = 1_000_000
    dl = DeadlineMonitor(period_ns=10 * ms, deadline_ns=10 * ms)
    dl.start(0)
    for k in range(1, 6):                       # on time: 2 ms late, committed 3 ms later
        dl.tick(k * 10 * ms + 2 * ms)
        dl.commit(k * 10 * ms, k * 10 * ms + 5 * ms)
    assert (dl.ticks, dl.late, dl.skipped, dl.misses) == (5, 0, 0, 0)
    dl.tick(60 * ms)
    dl.commit(60 * ms, 60 * ms + 12 * ms)       # committed 12 ms after its tick: late
    assert (dl.ticks, dl.late, dl.misses) == (6, 1, 1)
    dl.tick(100 * ms)                           # ticks 7, 8, 9 never ran (rcl skipped them)
    dl.commit(100 * ms, 101 * ms)
    assert (dl.ticks, dl.skipped, dl.late, dl.misses) == (10, 3, 1, 4)
    dl.tick(110 * ms - 50_000)                  # a tick reported a hair early is still tick 11
    assert (dl.ticks, dl.skipped) == (11, 3)


def test_boundary_lock_lets_a_waiting_call_go_before_the_next_step():
    lock = BoundaryLock()
    order = []
    in_step, call_waiting = threading.Event(), threading.Event()

    def steps():
        for i in range(3):
            with lock.step():
                order.append(f"step{i}")
                if i == 0:
                    in_step.set()
                    wait_for(lambda: lock._waiting == 1, 5, "the call to wait")
                    call_waiting.set()

    def call():
        in_step.wait(5)
        with lock:
            order.append("call")

    threads = [threading.Thread(target=steps), threading.Thread(target=call)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert call_waiting.is_set()
    assert order == ["step0", "call", "step1", "step2"]
    with lock:
        with lock:                              # reentrant
            pass
    with lock.step():
        with lock:                              # a step may call the store (store.on_reset)
            pass


def test_the_runtime_takes_its_lock_at_construction():
    lock = BoundaryLock()
    rt = PolicyRuntime(TINY, RuntimeConfig(device="cpu"), lock=lock)
    assert rt.lock is lock
    assert isinstance(PolicyRuntime(TINY, RuntimeConfig(device="cpu")).lock,
                      type(threading.RLock()))
    with pytest.raises(ConfigError, match="lock: expected a reentrant lock"):
        PolicyRuntime(TINY, RuntimeConfig(device="cpu"), lock=object())


def test_warm_up_leaves_the_state_byte_identical():
    obs = observations(4)
    for instruction in ("pick up the red cube", ""):
        fresh = PolicyRuntime(TINY, RuntimeConfig(device="cpu"))
        warmed = PolicyRuntime(TINY, RuntimeConfig(device="cpu"))
        if instruction:
            fresh.set_instruction(instruction)
            warmed.set_instruction(instruction)
        warmed.warm_up()
        assert torch.equal(warmed.arena.base, fresh.arena.base)       # the whole arena
        assert (warmed.step_count, warmed.position, warmed.episode, warmed.context_len) == \
               (fresh.step_count, fresh.position, fresh.episode, fresh.context_len)
        for o in obs:
            assert fresh.step(o).tobytes() == warmed.step(o).tobytes()
        assert fresh.rollback(2) == warmed.rollback(2)
        assert fresh.reset(keep_context=True) == warmed.reset(keep_context=True)
        assert torch.equal(warmed.arena.base[: warmed.live_nbytes()],
                           fresh.arena.base[: fresh.live_nbytes()])


def test_threads_auto_is_one_for_small_models_and_the_default_else():
    tiny = load_preset("tiny")
    assert tiny.d_model <= 256
    assert RuntimeConfig().resolve(tiny).threads == 1
    assert RuntimeConfig(threads=3).resolve(tiny).threads == 3
    big = load_preset("hybrid-0.8b")
    assert big.d_model > 256
    assert RuntimeConfig().resolve(big).threads == 0


def test_pin_torch_threads_applies_in_the_calling_thread_only():
    before = torch.get_num_threads()
    seen = {}

    def worker():
        pin_torch_threads(1)
        seen["pinned"] = torch.get_num_threads()
        pin_torch_threads(0)                    # 0: leave torch's count as it is
        seen["after 0"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert seen == {"pinned": 1, "after 0": 1}
    assert torch.get_num_threads() == before    # this thread's count did not change


def test_set_thread_nice_sets_every_thread_or_changes_nothing():
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, args=(10,))
    other.start()
    try:
        before = os.getpriority(os.PRIO_PROCESS, 0)

        def nices():
            return {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}

        try:
            assert set_thread_nice(before - 1) == before
        except ConfigError as e:                # no CAP_SYS_NICE here: a clear refusal
            assert "CAP_SYS_NICE" in str(e) and "set nice 0" in str(e)
            assert nices() == {before}
            return
        assert nices() == {before - 1}
        assert set_thread_nice(before) == before - 1     # raising nice needs no privilege
        assert nices() == {before}
    finally:
        stop.set()
        other.join(10)
