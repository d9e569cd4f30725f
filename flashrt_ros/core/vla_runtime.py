"""VLARuntime: a vision-language-action policy on the graph-bound runtime (no ROS imports).

The API is LeRobot's, so tests, benchmarks and users drive it as they drive a LeRobot policy:

    rt = PolicyRuntime.from_pretrained("<LeRobot SmolVLA directory>", RuntimeConfig(...))
    chunk = rt.predict_action_chunk(batch, noise=None)   # numpy [chunk_size, action_dim]
    action = rt.select_action(batch, noise=None)         # numpy [action_dim], LeRobot's queue
    rt.reset()                                           # a new episode: the queue empties

`batch` holds a dataset's keys before LeRobot's preprocessor: `observation.state` (float
[state_dim]), `observation.images.<camera>` (float [3, H, W] in [0, 1], or a uint8 [H, W, 3]
frame), `task` (text). Results are in the dataset's units (after the postprocessor). `noise`, float32
[chunk_size, max_action_dim], replaces the sampled noise; without it the noise comes from the
arena's counter-based sampler, so capsules and rollback carry the sampler too.

A chunk is three plans over the arena and the static I/O (the policy's `sample_noise`, `prefix`,
`denoise`), captured as CUDA graphs on the GPU: one observation is copy in, at most three replays,
copy out. Everything a later call reads is in the arena: the prefix's keys and values, the action
queue and what is left of it, the sampler, the counters. The capsule interface (`live_state`,
`restore_state`, `fingerprint`, `lock`, `position`, ...) is `PolicyRuntime`'s, so `CapsuleStore`
works on either runtime unchanged.

Committed boundary and thread-safety: as `PolicyRuntime` (core/runtime.py): every public call runs
to completion before it returns, callers serialise on `runtime.lock`, and the host mirrors
(`position`, `step_count`, `episode`, `queue_left`) change only after the plans ran.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import torch

from flashrt_ros.core import fused
from flashrt_ros.core.arena import (META_CONTEXT_LEN, META_EPISODE, META_LEN, META_POSITION,
                                    META_RNG_SEED, META_STEP, StateArena)
from flashrt_ros.core.config import RuntimeConfig, resolve_device
from flashrt_ros.core.exceptions import ConfigError, InputError
from flashrt_ros.core.plans import StepPlan
from flashrt_ros.core.rollback import RollbackRing
from flashrt_ros.core.state_runtime import StateRuntime

PLANS = ("noise", "prefix", "denoise")


class VLARuntime(StateRuntime):
    def __init__(self, src, runtime_cfg: RuntimeConfig | None = None, progress=None, lock=None):
        """A runtime for a VLA checkpoint read by its family's loader (`src`: e.g. a
        `SmolVLADir`); use `PolicyRuntime.from_pretrained`."""
        from flashrt_ros.core.models import build_vla_policy
        self.cfg = runtime_cfg or RuntimeConfig()
        if lock is not None and not (hasattr(lock, "__enter__") and hasattr(lock, "__exit__")):
            raise ConfigError(f"lock: expected a reentrant lock, found {type(lock).__name__}")
        self.lock = threading.RLock() if lock is None else lock
        say = progress or (lambda msg: None)
        self.device = resolve_device(self.cfg.device)
        t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        say(f"building {src.cfg.name} ({type(src).__name__}) on {self.device}, {src.cfg.dtype}")
        self.model = build_vla_policy(src, self.device)
        self.model_cfg = self.model.cfg
        # core/fused.py's Triton kernels for the chains between matmuls, unless asked for the
        # torch reference (held to each other by test_smolvla_gpu)
        self.model.model.fused = (self.device.type == "cuda" and self.cfg.kernels != "reference"
                                  and fused.available())
        t1 = time.perf_counter()
        self.timings["weights"] = t1 - t0
        self.arena = StateArena(self.model.state_specs(), self.device)
        self.io = self.model.make_io(self.device)
        self.ring = RollbackRing(self.arena, self.cfg.rollback_depth)
        self.use_graphs = self.device.type == "cuda" and self.cfg.cuda_graphs
        self.plans = {name: StepPlan(name, self._plan_fn(name)) for name in PLANS}
        self.position = self.step_count = self.episode = self.context_len = self.queue_left = 0
        self._zero_state()
        self.timings["arena"] = time.perf_counter() - t1
        if self.use_graphs:
            saved = self.arena.base.clone()
            pool = torch.cuda.graph_pool_handle()
            for name in PLANS:
                say(f"capturing plan {name}")
                self.plans[name].capture(pool)
            self.arena.base.copy_(saved)
            torch.cuda.synchronize(self.device)
        self.timings["captures"] = time.perf_counter() - t1 - self.timings["arena"]
        say(f"runtime ready in {time.perf_counter() - t0:.2f} s: state arena "
            f"{self.arena.nbytes / 2**20:.1f} MiB, {len(self.arena.names())} buffers, "
            f"{sum(p.captured for p in self.plans.values())} captured plans, "
            f"{'Triton' if self.model.model.fused else 'torch'} elementwise kernels")

    def _plan_fn(self, name):
        fn = getattr(self.model, {"noise": "sample_noise"}.get(name, name))
        arena, io = self.arena, self.io

        def run():
            with torch.inference_mode():
                fn(arena, io)
        return run

    # -- state ----------------------------------------------------------------------------------
    def _zero_state(self):
        self.arena.zero_()
        self.arena.meta[META_RNG_SEED].fill_(int(self.cfg.sample_seed))
        self.arena.meta[META_EPISODE].fill_(self.episode)
        self.position = self.step_count = self.context_len = self.queue_left = 0
        self.ring.rebase(0, 0, self.episode)

    def _commit(self):
        self.step_count += 1
        self.arena.meta[META_STEP].fill_(self.step_count)
        self.ring.push(self.step_count, self.position, self.episode)

    def _sync_mirrors_from_arena(self):
        meta = self.arena.meta.cpu()
        self.position, self.step_count = int(meta[META_POSITION]), int(meta[META_STEP])
        self.episode, self.context_len = int(meta[META_EPISODE]), int(meta[META_CONTEXT_LEN])
        self.queue_left = int(self.arena["queue_left"][0])

    def warm_up(self, prefill: bool = True) -> float:
        """Run each plan once on the inputs as they are and put back the exact arena bytes;
        returns the seconds it took (`prefill`: as PolicyRuntime.warm_up's; a VLA has no prefill
        plans). On the CPU the first call of each op pays torch's lazy
        initialisation (the first chunk ~1.5x a later one): the node calls this at configure,
        before the first control step. Nothing it changes is state (the arena is as before; the
        input and chunk buffers are written by the next call anyway)."""
        t0 = time.perf_counter()
        with self.lock:
            saved = self.arena.base.clone()
            for name in PLANS:
                self.plans[name].run()
            self.arena.base.copy_(saved)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    # -- LeRobot's API --------------------------------------------------------------------------
    def _chunk(self, batch, noise) -> None:
        """One observation -> io.chunk: inputs checked and copied, then the plans."""
        self.model.load_batch(batch, self.io, noise)
        if noise is None:
            self.plans["noise"].run()
        self.plans["prefix"].run()
        self.plans["denoise"].run()
        self.position = self.model_cfg.max_context
        self.context_len = int(self.arena.meta[META_CONTEXT_LEN])

    def predict_action_chunk(self, batch: dict, noise=None) -> np.ndarray:
        """The action chunk [chunk_size, action_dim] for one observation (the queue is left as
        it is, as LeRobot leaves it)."""
        with self.lock:
            self._chunk(batch, noise)
            out = self.io.chunk.cpu().numpy().copy()
            self._commit()
            return out

    def select_action(self, batch: dict, noise=None) -> np.ndarray:
        """One action [action_dim]: the next of the queued chunk; when the queue is empty, a new
        chunk from this observation (its first n_action_steps rows are queued)."""
        n = self.model_cfg.n_action_steps
        with self.lock:
            queue = self.arena["action_queue"]
            if self.queue_left == 0:
                self._chunk(batch, noise)
                queue.copy_(self.io.chunk[:n])
                self.queue_left = n
            action = queue[n - self.queue_left].cpu().numpy().copy()
            self.queue_left -= 1
            self.arena["queue_left"].fill_(self.queue_left)
            self._commit()
            return action

    def reset(self, keep_context: bool = True) -> int:
        """A new episode: the action queue empties (LeRobot's `reset`); the sampler goes on."""
        with self.lock:
            self.episode += 1
            self.arena["queue_left"].fill_(0)
            self.arena.meta[META_EPISODE].fill_(self.episode)
            self.queue_left = 0
            self.step_count = 0
            self.arena.meta[META_STEP].fill_(0)
            self.ring.rebase(self.step_count, self.position, self.episode)
            return self.episode

    def rollback(self, k: int) -> tuple[int, int]:
        """Back k committed calls (the queue, the sampler and the counters of then)."""
        with self.lock:
            self.ring.rollback(k)
            self._sync_mirrors_from_arena()
            return self.step_count, self.position

    # -- capsule support ------------------------------------------------------------------------
    def restore_state(self, src: torch.Tensor, known: tuple | None = None,
                      refer: torch.Tensor | None = None) -> None:
        """As `PolicyRuntime.restore_state`: capsule bytes copied into the arena, then adopted
        (with `refer`, the reset point refers to those stored bytes instead of copying)."""
        if not isinstance(src, torch.Tensor) or src.dtype != torch.uint8 or src.dim() != 1:
            raise InputError(f"restore: expected a 1-D uint8 tensor of state bytes, found "
                             f"{getattr(src, 'dtype', type(src).__name__)}")
        n = src.numel()
        if known is not None:
            position = int(known[0])
        elif n >= self.arena.small_nbytes:       # the position the bytes carry in their meta
            head = np.frombuffer(src[:META_LEN * 8].cpu().numpy().tobytes(), dtype=np.int64)
            position = int(head[META_POSITION])
        else:
            position = -1                         # too short to hold the small state: refused
        if position not in (0, self.model_cfg.max_context) or self.arena.live_nbytes(position) != n:
            raise InputError(f"restore: {n} bytes is not a live-state size of this arena "
                             f"({self.arena.live_nbytes(0)} or "
                             f"{self.arena.live_nbytes(self.model_cfg.max_context)} expected)")
        self.arena.base[:n].copy_(src)
        self._sync_mirrors_from_arena()
        self.ring.rebase(self.step_count, self.position, self.episode, refer=refer)

    def fingerprint(self) -> str:
        """What a capsule must match to be restored here (StateArena.fingerprint)."""
        return self.arena.fingerprint(self.model_cfg, self.model.weights_digest)

    def describe(self) -> dict:
        c = self.model_cfg
        by_role = self.arena.live_bytes_by_role(self.position)
        return {"model": c.name, "family": "smolvla", "device": str(self.device),
                "cuda_graphs": self.use_graphs, "dtype": c.dtype, "cameras": list(c.cameras),
                "state_dim": c.state_dim, "action_dim": c.action_dim, "chunk_size": c.chunk_size,
                "n_action_steps": c.n_action_steps, "num_steps": c.num_steps,
                "prefix_len": c.prefix_len, "vlm_layers": c.num_vlm_layers,
                "expert_layers": c.num_expert_layers,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "arena_bytes": self.arena.nbytes, "fixed_state_bytes": self.arena.small_nbytes,
                "prefix_kv_bytes": self.arena.kv_row_nbytes * c.prefix_len,
                "live_bytes_by_role": by_role, "buffers": self.arena.layout(),
                "fingerprint": self.fingerprint(), "weights_digest": self.model.weights_digest,
                "position": self.position, "step": self.step_count, "episode": self.episode,
                "queue_left": self.queue_left}
