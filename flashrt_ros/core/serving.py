"""Serving a policy in real time: what a control loop needs around the runtime (no ROS imports).

  * `BoundaryLock` - the runtime lock a server passes to `PolicyRuntime(lock=...)`: a call that
    arrives during a control step goes right after that step commits, before the next one;
  * `DeadlineMonitor` - deadline accounting of a periodic control loop: late commits and ticks
    that never ran;
  * `pin_torch_threads` - apply `runtime.threads` (`RuntimeConfig.resolve`) in every thread that
    steps;
  * `set_thread_nice` - the nice value of every thread of the process.

The ROS node (flashrt_ros/ros/node.py) uses all of them; so can any other server of the runtime.
torch is imported where it is used: the node creates its DeadlineMonitor before it imports
torch (node.py: main).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections import deque

from flashrt_ros.core.exceptions import ConfigError


class BoundaryLock:
    """A runtime lock that is fair to calls: reentrant; a call waiting for it goes first.

    `with lock:` (what the capsule store and service calls use) registers the caller as waiting,
    then takes the lock. `with lock.step():` (the control loop only) first waits until no call is
    waiting, then takes the lock. So a call that arrives during a step runs right after that step
    commits, and the next step runs after the call. A plain lock is not fair: a fast observation
    stream could take it again and again and starve the call.
    """

    def __init__(self):
        self._lock = threading.RLock()
        self._cv = threading.Condition()
        self._waiting = 0

    def __enter__(self):
        with self._cv:
            self._waiting += 1
        self._lock.acquire()
        with self._cv:
            self._waiting -= 1
            if self._waiting == 0:
                self._cv.notify_all()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    @contextlib.contextmanager
    def step(self):
        with self._cv:
            self._cv.wait_for(lambda: self._waiting == 0)
        with self._lock:
            yield


class DeadlineMonitor:
    """Counts control ticks, skipped ticks and late commits of a periodic control loop.

    Tick k is scheduled at origin + k * period. A tick misses its deadline when its step has not
    committed `deadline_ns` after the tick's scheduled time (`commit`), or when it never ran: a
    timer whose thread is more than a period late skips ticks, and every skipped tick counts as a
    miss (`tick` infers them from the scheduled time of the tick that does run). A tick that steps
    nothing (no fresh observation) is not committed and is not a miss. A loop driven by
    observations instead of a timer calls only `commit`, with the observation's receipt as the
    scheduled time.
    """

    def __init__(self, period_ns: int, deadline_ns: int):
        self.period_ns, self.deadline_ns = int(period_ns), int(deadline_ns)
        self.origin_ns = None
        self.last_index = 0
        self.ticks = self.skipped = self.late = 0
        self.max_lateness_ns = 0
        self.lateness_ms = deque(maxlen=1000)      # scheduled -> committed, the last 1000 steps

    def start(self, origin_ns: int) -> None:
        """Tick 0 is at origin_ns (a timer's creation); the first tick to run is tick 1."""
        self.origin_ns, self.last_index = int(origin_ns), 0

    def tick(self, scheduled_ns: int) -> int:
        """A tick runs that was scheduled at scheduled_ns; returns how many ticks before it never ran."""
        index = round((scheduled_ns - self.origin_ns) / self.period_ns)
        skipped = max(0, index - self.last_index - 1)
        self.last_index = max(index, self.last_index + 1)
        self.ticks += 1 + skipped
        self.skipped += skipped
        return skipped

    def commit(self, scheduled_ns: int, committed_ns: int) -> bool:
        """A step committed; True if it missed its deadline."""
        lateness = int(committed_ns) - int(scheduled_ns)
        self.max_lateness_ns = max(self.max_lateness_ns, lateness)
        self.lateness_ms.append(lateness * 1e-6)
        if lateness > self.deadline_ns:
            self.late += 1
            return True
        return False

    @property
    def misses(self) -> int:
        return self.late + self.skipped


_pinned = threading.local()     # the thread count pin_torch_threads set in this thread


def pin_torch_threads(n: int) -> None:
    """Apply n torch CPU threads in the calling thread, once per thread (n 0: leave the default).

    torch.set_num_threads reaches OpenMP (which MKL's bmm uses) only in the thread that calls it:
    a worker thread of a server starts with OMP_NUM_THREADS and would run every matmul as a team
    of threads fighting for the cores (~8 ms per tiny bmm on a busy 2-core machine, measured). So
    every thread that steps the runtime calls this first; after the first call it costs one
    attribute read.
    """
    if n and getattr(_pinned, "n", 0) != n:
        import torch
        torch.set_num_threads(n)
        _pinned.n = n


def set_thread_nice(nice: int) -> int:
    """Set the nice value of every thread of this process (threads started later inherit it from
    their creator); returns the value it replaced. Nothing changes if permission is lacking."""
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        for tid in tids:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except PermissionError:
        for tid in tids:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, before)
        raise ConfigError(f"nice: expected permission to set nice {nice} (CAP_SYS_NICE, or a nice "
                          f"limit: `ulimit -e`), found none; grant it (/etc/security/limits.conf: "
                          f"`<user> - nice -10`) or set nice 0") from None
    return before
