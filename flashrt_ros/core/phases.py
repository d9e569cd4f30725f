"""The bring-up clock: the seconds of each phase of a start, and the interpreter's age at its
milestones (node created, active, first action), for the log, ~/status and /diagnostics.

Imports neither torch nor ROS: the node creates its `Phases` before it imports the runtime side
(ros/node.py: main), so that the clock and the node exist while torch is still importing.
"""
from __future__ import annotations

import contextlib
import os
import time

import flashrt_ros


def process_age_s() -> float:
    """Seconds since this interpreter started, taken as flashrt_ros's first import (the
    executables import it first; Python's own start before that, about 0.2 s on a busy 2-core
    machine, is not counted). Not the process's start: a process may have run another program
    before it exec'd Python (tools/run-demo.sh runs the bootstrap, then execs the demo)."""
    return time.time() - flashrt_ros.IMPORTED_AT


def process_start_time() -> float:
    """Wall-clock time this process started (Linux /proc: 10 ms resolution; before any exec),
    else when flashrt_ros was first imported."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # field 22 (starttime, clock ticks after boot) comes after the parenthesised name
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        # the clock /proc counts from; boot time in /proc/stat is whole seconds
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError):
        return flashrt_ros.IMPORTED_AT


class Phases:
    """Seconds of each bring-up phase (`phase`), and the interpreter's age at milestones (`mark`)."""

    def __init__(self, marks: dict | None = None):
        """`marks`: milestones already reached (an earlier Phases' `marks`), kept as they are."""
        self.seconds: dict[str, float] = {}
        self.marks: dict[str, float] = dict(marks or {})

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def mark(self, name: str) -> float:
        """Record (once) and return the interpreter's age (process_age_s) at milestone `name`."""
        return self.marks.setdefault(name, process_age_s())

    def text(self) -> str:
        """'model 0.01 s, runtime 0.05 s, ...; active at 2.41 s after the interpreter started'."""
        parts = ", ".join(f"{n} {s:.2f} s" for n, s in self.seconds.items())
        marks = ", ".join(f"{n} at {s:.2f} s" for n, s in self.marks.items())
        return parts + (f"; {marks} after the interpreter started" if marks else "")

    def values(self) -> dict:
        """Flat {key: seconds} for /diagnostics and the benchmark."""
        out = {f"{n}_s": round(s, 4) for n, s in self.seconds.items()}
        out.update({f"{n}_at_s": round(s, 3) for n, s in self.marks.items()})
        return out
