"""Bring-up: from the interpreter's start to the first action, the control loop first (no ROS imports).

A server builds its runtime with `late_plans=True`: only the plans a control step needs
(observation, token, LM head: runtime.STEP_PLANS) are captured while it configures, and it can
step as soon as they are. `LatePlans` then captures the others (the prefill plans) in a
background thread while the server steps:

  1. warm-up, without `runtime.lock`: the plan's function runs twice on a scratch arena and
     scratch I/O of the live layout (`PolicyRuntime.plan_functions` over other buffers), on a
     side stream on CUDA. Triton compiles and autotunes here, and torch pays its lazy
     initialisation (on the CPU the first prefill imports torch._dynamo: ~2 s); the live state
     is never touched, so steps go on meanwhile.
  2. capture, under `runtime.lock` (a call of the BoundaryLock: it goes between two steps, and
     no step runs during it): `PolicyRuntime.capture_plan` captures with no warm-up run, so
     nothing executes on the device and the live state is not touched, in torch.cuda.graph's
     "thread_local" capture mode (a CUDA call another thread makes meanwhile, such as a capsule
     copy, neither fails nor invalidates the capture). On the CPU nothing is captured: the
     same schedule runs and step 2 does nothing.

Order: shortest chunk first, so the plans short instructions use are ready first. When: from
`release()` on (the server's first action, or an instruction that needs a plan), at most
`start(hold_s)` after the start, so that the first step does not share the CPU with the first
warm-up. The thread works on the runtime's CUDA device (torch's current device is per thread).

A plan is *ready* after step 1. Until it is captured the runtime runs the same function
eagerly: the same kernels, so the same bytes as the replay (test/test_bringup.py compares a
late-captured runtime with one captured all at construction byte for byte). An instruction
whose plans are not ready yet waits for them (`wait_for_instruction`, called before the
caller takes any lock, with a line saying so) rather than autotuning in its own thread
beside the background one.

`Phases` (core/phases.py, which imports no torch, so that the node has it before torch is
imported; here too for bring-up's other users) keeps the seconds of each bring-up phase and the
interpreter's age at its milestones (active, first action), for the log, ~/status and /diagnostics.
"""
from __future__ import annotations

import contextlib
import threading
import time

import torch

from flashrt_ros.core.arena import StateArena, StaticIO
from flashrt_ros.core.phases import Phases, process_age_s, process_start_time  # noqa: F401
from flashrt_ros.core.serving import pin_torch_threads

PENDING, WARMING, READY, CAPTURED, FAILED = "pending", "warming up", "ready", "captured", "failed"


def chunk_length(name: str) -> int:
    """The chunk length of a prefill plan name ('prefill256')."""
    return int(name[len("prefill"):])


class _Scratch:
    """Buffers of the live layout, for warm-ups that must not touch the live state."""

    def __init__(self, rt):
        self.arena = StateArena(rt.model.state_specs(), rt.device)
        self.io = StaticIO(rt.model_cfg, rt.device, rt.cfg.prefill_buckets)
        self.fns = rt.plan_functions(self.arena, self.io, lambda: 0)


class LatePlans:
    """Captures (CUDA) or warms up (CPU) a runtime's late plans in a background thread.

    `rt` was built with late_plans=True. Thread-safety: `start`, `stop`, `ready`, `wait*` and
    `progress` may be called from any thread; the state of each plan is guarded by a condition.
    """

    def __init__(self, rt, say=None, threads: int = 0):
        """`threads`: torch CPU threads of the background thread (serving.pin_torch_threads;
        0 = torch's default), as the server's other threads have them."""
        self.rt = rt
        self._say = say or (lambda msg: None)
        self.threads = threads
        # a bucket longer than the usable context is never run: nothing to warm
        names = [n for n in rt.late_plans if chunk_length(n) <= rt.max_tokens]
        self.order = sorted(names, key=lambda n: (chunk_length(n), n))
        self.state = {n: PENDING for n in self.order}
        self.warm_s: dict[str, float] = {}
        self.capture_s: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.started = self.finished = None      # perf_counter times
        self._cv = threading.Condition()
        # held by each warm-up, and by a caller that runs the runtime's kernels eagerly meanwhile
        # (`kernels`): a warm-up autotunes Triton kernels, and an autotuner keeps the arguments of
        # the call it is tuning on the kernel object it shares with every other thread
        self._kernels = threading.Lock()
        self._stop = threading.Event()
        self._go = threading.Event()
        self._hold_s = 0.0
        self._thread = None

    # -- the schedule ---------------------------------------------------------------------
    def start(self, hold_s: float = 0.0) -> None:
        """Start the background thread (once). It waits up to `hold_s` for `release()` before
        its first plan: a server releases it at its first action, so that the first step does
        not share the CPU (and the GIL) with the first warm-up (on the CPU that one imports
        torch._dynamo); an instruction that needs the plans releases it too."""
        if self._thread is None:
            self._hold_s = hold_s
            self.started = time.perf_counter()
            self._thread = threading.Thread(target=self._in_device, name="flashrt-late-plans",
                                            daemon=True)
            self._thread.start()

    def run(self) -> None:
        """The whole schedule in the calling thread (what the thread runs)."""
        self.started = self.started or time.perf_counter()
        self._in_device()

    def say(self, msg: str) -> None:
        """Log `msg`; a logger that fails must not end the schedule (plans would wait forever)."""
        try:
            self._say(msg)
        except Exception:  # noqa: BLE001
            pass

    def _in_device(self):
        pin_torch_threads(self.threads)     # per thread in torch, as the CUDA device is
        # torch's current CUDA device is per thread, and Triton launches on it: the runtime's
        cuda = self.rt.device.type == "cuda"
        with torch.cuda.device(self.rt.device) if cuda else contextlib.nullcontext():
            self._run()

    def release(self) -> None:
        """End the hold of `start` now."""
        self._go.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop after the plan in progress; True when the thread has ended."""
        self._stop.set()
        self._go.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _set(self, name, state):
        with self._cv:
            self.state[name] = state
            self._cv.notify_all()

    def _run(self):
        scratch = None
        if self._hold_s:
            self._go.wait(self._hold_s)
        try:
            for name in self.order:
                if self._stop.is_set():
                    return
                self._set(name, WARMING)
                try:
                    if scratch is None:
                        scratch = _Scratch(self.rt)
                    t = time.perf_counter()
                    self._warm(scratch, name)
                    self.warm_s[name] = time.perf_counter() - t
                    self._set(name, READY)
                    t = time.perf_counter()
                    with self.rt.lock:
                        if self._stop.is_set():
                            return
                        self.rt.capture_plan(name)
                    self.capture_s[name] = time.perf_counter() - t
                    self._set(name, CAPTURED)
                except Exception as e:  # noqa: BLE001 - a failed plan stays eager; go on
                    self.errors[name] = f"{type(e).__name__}: {e}"
                    self._set(name, FAILED)
                    self.say(f"late plan {name}: {self.errors[name]}; it runs eagerly")
                    continue
                self.say(f"late plan {name} ready ({self._done()}/{len(self.order)}): warm-up "
                         f"{self.warm_s[name] * 1e3:.0f} ms, capture "
                         f"{self.capture_s[name] * 1e3:.0f} ms")
        except BaseException as e:
            # what the per-plan handler does not take (a scratch arena that does not fit, ...):
            # the plans not reached run eagerly, and nobody waits for them
            with self._cv:
                for n, state in self.state.items():
                    if state in (PENDING, WARMING):
                        self.state[n] = FAILED
                        self.errors[n] = f"the schedule ended: {type(e).__name__}: {e}"
            raise
        finally:
            del scratch
            with self._cv:
                self.finished = time.perf_counter()
                self._cv.notify_all()
            failed = sum(s == FAILED for s in self.state.values())
            if not self._stop.is_set() and self.order:
                self.say(f"all {len(self.order)} late plans ready "
                         f"{self.finished - self.started:.2f} s after they started" +
                         (f" ({failed} failed: they run eagerly)" if failed else ""))

    def _warm(self, scratch: _Scratch, name: str):
        fn = scratch.fns[name][0]
        cuda = self.rt.device.type == "cuda"
        side = torch.cuda.Stream(self.rt.device) if cuda else None
        if cuda:        # after the scratch buffers' initialisation, queued on this thread's stream
            side.wait_stream(torch.cuda.current_stream(self.rt.device))
        with self._kernels:
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for _ in range(2):
                    scratch.arena.zero_()          # position 0, as an instruction's first chunk
                    fn()
            if cuda:
                side.synchronize()

    # -- readiness ------------------------------------------------------------------------
    def ready(self, name: str) -> bool:
        """Whether plan `name` runs without waiting (any plan this schedule does not hold is)."""
        return self.state.get(name, READY) != PENDING and self.state.get(name) != WARMING

    def wait(self, names, timeout: float | None = None) -> bool:
        """Block until every plan in `names` is ready (or the schedule stops); True if they are."""
        with self._cv:
            self._cv.wait_for(lambda: self._stop.is_set() or self.finished is not None
                              or all(self.ready(n) for n in names), timeout)
            return all(self.ready(n) for n in names)

    def wait_for_instruction(self, n_tokens: int, say=None) -> float:
        """Before an instruction of n_tokens is prefilled: wait (saying so) for the plans it
        runs; returns the seconds waited. Call it holding no lock of the runtime or store."""
        names = [name for _, _, name in self.rt.prefill_chunks(n_tokens)]
        pending = [n for n in dict.fromkeys(names) if not self.ready(n)]
        if not pending:
            return 0.0
        self.release()
        (say or self.say)(f"instruction of {n_tokens} tokens waits for late plan(s) "
                          f"{', '.join(pending)}, being captured in the background "
                          f"({self.progress()})")
        t = time.perf_counter()
        self.wait(pending)
        return time.perf_counter() - t

    @contextlib.contextmanager
    def kernels(self, say=None):
        """Hold while running the runtime's kernels eagerly in another thread (an instruction's
        prefill): no warm-up runs meanwhile. Says so when it waits for one in progress."""
        if not self._kernels.acquire(blocking=False):
            now = next((k for k, s in self.state.items() if s == WARMING), "a late plan")
            (say or self.say)(f"waiting for the warm-up of {now} to end (an autotuner is not "
                              f"shared between threads)")
            self._kernels.acquire()
        try:
            yield
        finally:
            self._kernels.release()

    # -- reporting ------------------------------------------------------------------------
    def progress(self) -> str:
        """One line for ~/status: 'ready', or what is still being captured."""
        n = len(self.order)
        done = self._done()
        failed = sum(s == FAILED for s in self.state.values())
        tail = f", {failed} failed (eager)" if failed else ""
        if done == n:
            took = f" in {self.finished - self.started:.2f} s" if self.finished and self.started \
                else ""
            return f"ready: {n} late plans{took}{tail}"
        now = next((k for k, s in self.state.items() if s in (WARMING, READY)), "")
        if self.started is None:
            return f"{n - done} late plans pending"
        return f"capturing late plans: {done}/{n} ready" + (f", now {now}" if now else "") + tail

    def _done(self) -> int:
        return sum(s in (CAPTURED, FAILED) for s in self.state.values())

    def values(self) -> dict:
        """Flat {key: milliseconds} of each plan's warm-up and capture, for /diagnostics."""
        out = {}
        for name in self.order:
            if name in self.warm_s:
                out[f"{name}_warm_ms"] = round(self.warm_s[name] * 1e3, 1)
            if name in self.capture_s:
                out[f"{name}_capture_ms"] = round(self.capture_s[name] * 1e3, 1)
        return out
