"""StepPlan: one step function over the arena, replayed from a CUDA graph or a trace, or run eagerly.

A plan's function reads only the arena and the static I/O buffers, so after capture a replay is:
copy inputs into the static inputs, `replay()`, read the static outputs. With graphs disabled the
same function runs eagerly over the same buffers.

On the CPU a small model's step is a few hundred operations of microseconds each, and most of a
step is Python and argument parsing around them. There a plan is traced instead (`trace`): the
function runs once over scratch copies of its buffers, torch.jit.trace records the operations,
and a replay runs that record in TorchScript's interpreter over the live buffers, which are the
trace's inputs (tensors a trace only closes over become constants of it: the weights are read
there, by reference). A trace records no Python control flow, which is why it is taken of the
static form, where the position is read from the arena, as a CUDA graph is.

Capture protocol (per torch's CUDA graph rules): warm up on a side stream (Triton autotuning and
lazy allocations happen here, not inside the graph), then capture into a memory pool shared by all
plans of one runtime (they never run concurrently). Warm-up and capture mutate the arena, so the
runtime saves the arena before capturing and copies it back afterwards.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import torch


class StepPlan:
    def __init__(self, name: str, fn: Callable[[], None]):
        self.name = name
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm_s = self.capture_s = 0.0
        self.trace_fn = None              # torch.jit.trace of the function (CPU), and its inputs
        self.trace_inputs: tuple = ()

    @property
    def captured(self) -> bool:
        """Whether a replay runs a CUDA graph."""
        return self.graph is not None

    @property
    def traced(self) -> bool:
        """Whether a replay runs a trace (CPU)."""
        return self.trace_fn is not None

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

    def trace(self, bind: Callable[[tuple], Callable[[], None]], scratch: tuple,
              live: tuple) -> None:
        """Trace the plan (CPU). `bind(tensors)` returns the plan's function over `tensors` (the
        arena views and I/O buffers, in a fixed order); it runs once over `scratch` (copies of
        `live`, so the live state is not touched), and every replay runs the record over `live`."""
        def over(*tensors):
            bind(tensors)()
            return tensors[0]             # a trace needs an output; the effects are in place
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # Shapes are fixed per plan, so branching on them is sound; the API's deprecation
            # notice points to torch.compile, whose CPU compile takes minutes on a small machine
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated")
            with torch.no_grad():
                self.trace_fn = torch.jit.trace(over, scratch, check_trace=False)
        # The record computes every shape it used from its inputs' sizes (aten::size, then
        # aten::Int, a tensor-to-int read, at each use); the inputs are always the same tensors,
        # so the peephole pass makes those sizes constants and the rest folds away
        graph = self.trace_fn.graph
        torch._C._jit_pass_peephole(graph, False)
        torch._C._jit_pass_constant_propagation(graph)
        torch._C._jit_pass_dce(graph)
        self.trace_inputs = live
        self.capture_s = time.perf_counter() - t0

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.trace_fn is not None:
            # the record as traced: the optimising executor would profile and rewrite it first.
            # Inference mode, as the eager step functions run: the dispatcher then skips the
            # autograd layer of every operation, a fifth of a small model's step on the CPU
            with torch.inference_mode(), torch.jit.optimized_execution(False):
                self.trace_fn(*self.trace_inputs)
        else:
            self.fn()

    def run_eager(self) -> None:
        """The same function without the graph or trace: the reference a replay is held to."""
        self.fn()
