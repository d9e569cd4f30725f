"""StepPlan: one step function over the arena, replayed from a CUDA graph or run eagerly.

A plan's function reads only the arena and the static I/O buffers, so after capture a replay is:
copy inputs into the static inputs, `replay()`, read the static outputs. On CPU (or with graphs
disabled) the same function runs eagerly over the same buffers.

Capture protocol (per torch's CUDA graph rules): warm up on a side stream (Triton autotuning and
lazy allocations happen here, not inside the graph), then capture into a memory pool shared by all
plans of one runtime (they never run concurrently). Warm-up and capture mutate the arena, so the
runtime saves the arena before capturing and copies it back afterwards.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


class StepPlan:
    def __init__(self, name: str, fn: Callable[[], None]):
        self.name = name
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm_s = self.capture_s = 0.0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def capture(self, pool, warmup: int = 2, prepare: Callable[[], None] | None = None,
                capture_error_mode: str = "global") -> None:
        """Warm up and capture. `prepare` runs before every warm-up run: warm-ups execute for real
        and advance the arena (a prefill chunk moves the position by its length), so without it
        they accumulate and a later plan's warm-up writes KV rows past max_context.

        `warmup=0` captures a function already warmed elsewhere (core/bringup.py warms it on
        scratch buffers): nothing executes, so the arena is not touched. `capture_error_mode` is
        torch.cuda.graph's: "thread_local" lets other threads make CUDA calls during the capture.
        `warm_s` and `capture_s` keep how long each part took (autotuning shows in the first)."""
        t0 = time.perf_counter()
        if warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    if prepare is not None:
                        prepare()
                    self.fn()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.current_stream().synchronize()
        t1 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode=capture_error_mode):
            self.fn()
        self.graph = graph
        self.warm_s, self.capture_s = t1 - t0, time.perf_counter() - t1

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()

    def run_eager(self) -> None:
        """The same function without the graph: the reference a replay is held to."""
        self.fn()
