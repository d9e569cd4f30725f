"""PolicyRuntime: the graph-bound runtime the node wraps (no ROS imports).

It owns the model, the state arena, the static I/O buffers, the step plans and the rollback ring,
and exposes what a policy server needs: prefill an instruction, step an observation to an action
chunk, decode tokens, reset, roll back, and copy the live state out and in for capsules.

Committed boundary: every public call that changes state (prefill, step, decode, reset, rollback,
restore_state) runs to completion before it returns; the host mirrors (`position`, `step`,
`episode`) and the rollback ring are updated only after the plan ran, and on CUDA the next caller's
work is stream-ordered after it. Nothing can observe a half-applied step.

Thread-safety contract: a PolicyRuntime is not thread-safe. One thread at a time may call it;
callers serialise on `runtime.lock`, offered for that purpose: an RLock, or the reentrant lock
given at construction (the node passes a `BoundaryLock`, core/serving.py, which lets a waiting
capsule call go before the next control step). The lock is fixed for the runtime's life: the
capsule store and every thread take the same object. Copies of capsule bytes handed out are
independent of the live state and may be used from other threads (e.g. for disk I/O) without it.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import threading
import time

import numpy as np
import torch

from flashrt_ros.core import checkpoint, tokenizer
from flashrt_ros.core.arena import (META_CONTEXT_LEN, META_EPISODE, META_LEN, META_POSITION,
                                    META_RNG_SEED, META_STEP, ArenaViews,
                                    StateArena, StaticIO)
from flashrt_ros.core.config import TINY, ModelConfig, RuntimeConfig
from flashrt_ros.core.exceptions import ConfigError, InputError
from flashrt_ros.core.models.qwen3_5 import checkpoint_qwen3_5
from flashrt_ros.core.models.qwen3_5.policy_qwen3_5 import Qwen3_5Policy, digest_tensors
from flashrt_ros.core.plans import StepPlan
from flashrt_ros.core.rollback import RollbackRing
from flashrt_ros.core.state_runtime import StateRuntime

# Where the static form of a prefill chunk attends over all max_context rows under a mask (no
# fused kernels: the reference kernels on CUDA), chunks up to this length are captured and longer
# ones run the dynamic form eagerly; with the fused kernels every chunk is captured
GRAPH_PREFILL_MAX = 256
# the plans a control step and decoding run; with late_plans=True only these are captured at
# construction, the prefill plans later (core/bringup.py)
STEP_PLANS = ("observation", "token", "lm_head")
WARM_UP_TOKEN = 32      # a byte-tokenizer id (space); warm-up content is thrown away


class PolicyRuntime(StateRuntime):
    def __init__(self, model_cfg: ModelConfig = TINY, runtime_cfg: RuntimeConfig | None = None,
                 progress=None, model_dir: checkpoint_qwen3_5.ModelDir | None = None, lock=None,
                 late_plans: bool = False):
        """A runtime for `model_cfg` with seeded weights (a preset), or for a checkpoint directory
        read by `checkpoint_qwen3_5.read_model_dir` (use `PolicyRuntime.from_pretrained`).

        `lock`: the reentrant lock callers serialise on (`runtime.lock`; default a new RLock).
        `late_plans`: capture only STEP_PLANS now; the other plans run eagerly (the same
        kernels, the same bytes) until `capture_plan` captures them (core/bringup.LatePlans).
        `timings` keeps the seconds of each construction phase (weights, arena, captures)."""
        if model_dir is not None:
            model_cfg = model_dir.cfg
        self.model_cfg = model_cfg
        self.cfg = runtime_cfg or RuntimeConfig()
        if lock is not None and not (hasattr(lock, "__enter__") and hasattr(lock, "__exit__")):
            raise ConfigError(f"lock: expected a reentrant lock (a context manager such as "
                              f"threading.RLock or serving.BoundaryLock), found "
                              f"{type(lock).__name__}; pass one, or None for an RLock")
        self.lock = threading.RLock() if lock is None else lock
        say = progress or (lambda msg: None)
        self.resolved = self.cfg.resolve(model_cfg)
        self.device = self.resolved.device
        cuda = self.device.type == "cuda"
        self.kernel = kernel = self.resolved.kernels
        t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        say(f"building model {model_cfg.name} on {self.device} (kernels: {kernel})")
        self.model = self._build_policy(model_dir, kernel, say)
        self.tokenizer = tokenizer.load(model_dir.tokenizer_file if model_dir else "",
                                        model_cfg.vocab_size)
        t1 = time.perf_counter()
        self.timings["weights"] = t1 - t0
        self.arena = StateArena(self.model.state_specs(), self.device)
        self.io = StaticIO(model_cfg, self.device, self.cfg.prefill_buckets)
        self.io.noise_std.fill_(float(self.cfg.action_noise))
        # also holds the reset point: the state reset(keep_context=True) returns to
        self.ring = RollbackRing(self.arena, self.cfg.rollback_depth)
        self.use_graphs = cuda and self.cfg.cuda_graphs
        self.traced_steps = self.resolved.traced_steps
        # replay the captured prefill plans; benchmarks turn it off to measure the eager baseline
        # (the same functions, the same bytes) in the same process
        self.prefill_graphs = self.use_graphs
        self.plans = self._build_plans()
        self.position = 0
        self.step_count = 0
        self.episode = 0
        self.context_len = 0
        self.context_tokens: list[int] = []
        self._zero_state()
        self.timings["arena"] = time.perf_counter() - t1
        # the plans left to capture_plan (all eager on the CPU, where nothing is captured)
        self.late_plans = [n for n in self.plans if n not in STEP_PLANS] if late_plans else []
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        if self.use_graphs:
            self._capture(say, [n for n in self.plans if n not in self.late_plans])
        if self.traced_steps:
            self._trace(say, STEP_PLANS)
        say(f"runtime ready in {time.perf_counter() - t0:.2f} s: state arena "
            f"{self.arena.nbytes / 2**20:.1f} MiB, {len(self.arena.names())} buffers, "
            f"{sum(p.captured for p in self.plans.values())} captured plans, "
            f"{sum(p.traced for p in self.plans.values())} traced")

    @classmethod
    def from_pretrained(cls, path: str, runtime_cfg: RuntimeConfig | None = None, progress=None,
                        lock=None, **overrides) -> "PolicyRuntime":
        """A runtime serving the checkpoint directory `path` (see
        core/models/qwen3_5/checkpoint_qwen3_5.py), or a preset by name with its trained heads
        where it has them.

        `lock` as in the constructor; `overrides` set policy fields over the directory's
        (max_context, dtype, ...).

        A directory of another family (core/models: a LeRobot SmolVLA directory) gives that
        family's runtime (`VLARuntime`, with LeRobot's API) instead; `dtype` is its one override."""
        from flashrt_ros.core import models
        directory = checkpoint.model_directory(path)      # a path, or a preset that is a directory
        family = models.vla_family(directory) if directory else None
        if family is not None:
            path = directory
            from flashrt_ros.core.vla_runtime import VLARuntime
            unknown = sorted(set(overrides) - {"dtype"})
            if unknown:
                raise ConfigError(f"{path}: a {family} checkpoint takes only the override dtype, "
                                  f"found {unknown}")
            src = models.read_vla_dir(path, family, say=progress, dtype=overrides.get("dtype"))
            return VLARuntime(src, runtime_cfg, progress=progress, lock=lock)
        return cls(runtime_cfg=runtime_cfg, progress=progress, lock=lock,
                   model_dir=checkpoint_qwen3_5.resolve_model(path, say=progress, **overrides))

    def _build_policy(self, model_dir, kernel, say):
        """The policy on the device: built without initialising (meta tensors), then every weight
        written once, from the checkpoint's files or from the seed."""
        cfg = self.model_cfg
        with torch.device("meta"):
            policy = Qwen3_5Policy(cfg, kernel, sample_actions=self.cfg.action_noise > 0)
        for mod_name, mod in policy.named_modules():
            for leaf, p in list(mod._parameters.items()):
                if p is None:
                    continue
                name = f"{mod_name}.{leaf}" if mod_name else leaf
                dtype = policy.param_dtype(name)
                mod._parameters[leaf] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=dtype, device=self.device), requires_grad=False)
        policy.backbone.model.rotary.materialize(self.device)
        backbone = policy.backbone_parameters()
        heads = policy.head_parameters()
        untrained = []
        if model_dir is not None and model_dir.weight_files:
            say(f"loading the backbone from {len(model_dir.weight_files)} safetensors file(s)")
            backbone_digest = checkpoint_qwen3_5.load_backbone(policy, model_dir.weight_files,
                                                               self.device, say)
        else:
            for n, v in policy.seeded_weights(list(backbone), cfg.seed, self.device):
                backbone[n].data.copy_(v)
            backbone_digest = digest_tensors(backbone)
            untrained.append("backbone")
        policy.backbone_digest = backbone_digest
        heads_file = model_dir.policy_weights if model_dir is not None else ""
        if heads_file:
            trained_with = checkpoint_qwen3_5.heads_backbone_digest(heads_file)
            if trained_with and trained_with != backbone_digest:
                say(f"warning: {heads_file} was trained with another backbone (digest "
                    f"{trained_with}, this one {backbone_digest}); not loading it")
                heads_file = ""
        if heads_file:
            say(f"loading the heads from {heads_file}")
            heads_digest = checkpoint_qwen3_5.load_heads(policy, heads_file, self.device)
        else:
            for n, v in policy.seeded_weights(list(heads), cfg.seed, self.device):
                heads[n].data.copy_(v)
            heads_digest = digest_tensors(heads)
            untrained.append("heads")
        policy.untrained = tuple(untrained)
        policy.weights_digest = hashlib.blake2b(f"{backbone_digest}|{heads_digest}".encode(),
                                                digest_size=16).hexdigest()
        policy.prepare()
        return policy

    # -- plans ----------------------------------------------------------------------------
    def _build_plans(self) -> dict[str, StepPlan]:
        plans = {}
        for name, (fn, graph) in self.plan_functions(self.arena, self.io,
                                                     lambda: self.position).items():
            plans[name] = StepPlan(name, fn)
            plans[name].graph_eligible = graph
        return plans

    def plan_functions(self, a: StateArena, io: StaticIO, position) -> dict:
        """{plan name: (step function over arena `a` and I/O `io`, whether it is captured)}.

        `position()` is the host position the eager forms read: the runtime's own for its plans;
        core/bringup.py builds the same functions over scratch buffers to warm them up."""
        m = self.model
        static = self.use_graphs or self.traced_steps
        # Graph and traced plans read the position from the arena on the device; eager plans get
        # it from the host mirror (no device sync, and slices of the live prefix instead of masks).
        def pos():
            return None if static else position()
        plans = {
            "observation": (lambda: m.predict_action_chunk(a, io, pos()), static),
            "token": (lambda: m.token_step(a, io, pos()), static),
            "lm_head": (lambda: m.lm_head(a, io), static),
        }
        # A captured chunk reads its position from the arena, so one plan per bucket serves every
        # position. With the fused kernels its attention covers the live prefix only
        # (core/models/qwen3_5/prefill_attention_qwen3_5.py) and every bucket is captured:
        # eagerly a long chunk is launch-bound (a 1024-token chunk of hybrid-0.8b ~5x its replay
        # on an H100).
        longest = self.max_tokens if m.static_prefill_any_length else \
            min(GRAPH_PREFILL_MAX, self.max_tokens)
        for c in self.cfg.prefill_buckets:
            # a bucket longer than the usable context is never picked by _prefill; capturing it
            # would index KV rows past max_context during warm-up
            graph = self.use_graphs and c <= longest
            fn = (lambda c=c: m.prefill_chunk(a, io, None, io.chunks[c])) if graph else \
                 (lambda c=c: m.prefill_chunk(a, io, position(), io.chunks[c]))
            plans[f"prefill{c}"] = (fn, graph)
        return plans

    def warm_up(self, prefill: bool = True) -> float:
        """Run every plan once, then put back the exact state; returns the seconds it took.
        `prefill=False`: only the plans a control step needs (a one-token instruction and a
        step); the prefill plans are warmed by core/bringup.LatePlans.

        On CPU the first call of each op pays torch's lazy initialisation (~2 s for the first
        prefill, ~0.2 s for each new prefill length): without this the first control step would
        miss its deadline. The live bytes are saved first and restored after, and the KV rows past
        the live prefix (which the warm-up prefill wrote) are zeroed: the whole arena is then
        byte-identical to what it was, episode counter included. Only `context_tokens` is emptied
        (restore_state does that; no plan reads it). Call it before any other thread uses the
        runtime: it takes no lock.
        """
        t0 = time.perf_counter()
        clean = self.live_state().clone()
        known = (self.position, self.step_count, self.episode, self.context_len)
        buckets = [c for c in self.cfg.prefill_buckets if c < self.max_tokens]
        n = max(1, min(sum(buckets) + 1, self.max_tokens))    # every bucket once, then a token
        if not prefill:
            n = 1
        self.set_instruction([WARM_UP_TOKEN] * n)
        self.step(np.zeros(self.model_cfg.obs_dim, dtype=np.float32))
        self.restore_state(clean, known)
        self.arena.base[clean.numel():].zero_()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def capture_plan(self, name: str) -> None:
        """Capture late plan `name`, warmed already (core/bringup.py): nothing executes, the live
        state is not touched. Call it under `self.lock`, between steps; a no-op where the plan
        is not captured (the CPU, a plan that always runs eagerly)."""
        if self.use_graphs and self.plans[name].graph_eligible and not self.plans[name].captured:
            self._capture(lambda msg: None, [name], warmup=0, capture_error_mode="thread_local")

    def _capture(self, say, names, warmup: int = 2, capture_error_mode: str = "global"):
        # Python's cyclic collector must not run while a stream is capturing: finalising garbage
        # from an earlier runtime or store (a lifecycle re-configure, a test before this one)
        # frees pinned host memory and CUDA events, and the CUDA calls behind that invalidate
        # the capture (cudaErrorStreamCaptureInvalidated). torch no longer collects before a
        # capture by default, so collect here and hold the collector off until all plans are in.
        # A late capture (warmup=0: under the lock, while a server steps) only holds it off: a
        # full collection holds the GIL for 0.1-0.3 s once the compiled kernels are loaded, and
        # the control loop would wait that long. (All plans share one graph pool: they never run
        # concurrently.)
        if warmup:
            gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            saved = self.arena.base.clone() if warmup else None
            for name in names:
                plan = self.plans[name]
                if plan.graph_eligible:
                    t = time.perf_counter()
                    plan.capture(self._graph_pool, warmup=warmup,
                                 prepare=lambda: self.arena.base.copy_(saved),
                                 capture_error_mode=capture_error_mode)
                    self.timings[f"capture {name}"] = time.perf_counter() - t
                    say(f"captured plan {name} ({(time.perf_counter() - t) * 1e3:.0f} ms, "
                        f"{plan.warm_s * 1e3:.0f} ms of it warm-up)")
            if saved is not None:
                self.arena.base.copy_(saved)
            torch.cuda.synchronize(self.device)
        finally:
            if collecting:
                gc.enable()

    def _trace(self, say, names):
        """Trace plans `names` (CPU; plans.StepPlan.trace) over clones of the arena's views and
        the I/O buffers: the live state is not touched."""
        views = self.arena.names()
        fields = [k for k, v in vars(self.io).items() if isinstance(v, torch.Tensor)]
        live = tuple(self.arena[n] for n in views) + tuple(getattr(self.io, k) for k in fields)
        scratch = tuple(t.clone() for t in live)

        def binder(name):
            def bind(tensors):
                io = copy.copy(self.io)
                for k, t in zip(fields, tensors[len(views):]):
                    setattr(io, k, t)
                a = ArenaViews(dict(zip(views, tensors[:len(views)])))
                return self.plan_functions(a, io, lambda: self.position)[name][0]
            return bind
        for name in names:
            plan = self.plans[name]
            plan.trace(binder(name), scratch, live)
            self.timings[f"trace {name}"] = plan.capture_s
            say(f"traced plan {name} ({plan.capture_s * 1e3:.0f} ms)")

    # -- state ----------------------------------------------------------------------------
    def _zero_state(self):
        self.arena.zero_()
        # fill_ on a view, not `meta[i] = v`: item assignment may stage the scalar in a fresh
        # device tensor, and nothing may allocate on the device after capture
        self.arena.meta[META_RNG_SEED].fill_(int(self.cfg.sample_seed))
        self.position = self.step_count = self.context_len = 0
        self.context_tokens = []
        self.ring.rebase(0, 0, self.episode)

    def _commit(self):
        self.ring.push(self.step_count, self.position, self.episode)

    def _sync_mirrors_from_meta(self):
        meta = self.arena.meta.cpu()
        self.position, self.step_count = int(meta[META_POSITION]), int(meta[META_STEP])
        self.episode, self.context_len = int(meta[META_EPISODE]), int(meta[META_CONTEXT_LEN])

    @property
    def max_tokens(self) -> int:
        # one KV row past the prefix is scratch for the observation token (see model.py)
        return self.model_cfg.max_context - 1

    @property
    def max_instruction_chars(self) -> int:
        """The longest instruction text that could fit the context; a longer one is refused
        before it is tokenized (core/tokenizer.py: max_token_chars)."""
        return self.max_tokens * self.tokenizer.max_token_chars

    # -- public API -----------------------------------------------------------------------
    def set_instruction(self, text_or_tokens) -> int:
        """Start a new context: zero the state, prefill the instruction; returns its token count.

        The resulting state is what reset(keep_context=True) returns to.
        """
        tokens = self.instruction_tokens(text_or_tokens)
        self.episode += 1
        self._zero_state()
        self.arena.meta[META_EPISODE].fill_(self.episode)
        self._prefill(tokens)
        self.context_len = self.position
        self.context_tokens = tokens
        self.arena.meta[META_CONTEXT_LEN].fill_(self.context_len)
        self.ring.rebase(self.step_count, self.position, self.episode)
        return len(tokens)

    def instruction_tokens(self, text_or_tokens) -> list:
        """The token ids `set_instruction` would prefill; raises InputError where it would refuse
        them (changes nothing)."""
        if isinstance(text_or_tokens, str) and len(text_or_tokens) > self.max_instruction_chars:
            raise InputError(                       # refused unread (tokenizer.max_token_chars)
                f"instruction: expected at most {self.max_instruction_chars} characters (the "
                f"context's {self.max_tokens} tokens, a token standing for at most "
                f"{self.tokenizer.max_token_chars}), found {len(text_or_tokens)}; shorten the "
                f"instruction or use a model with a larger max_context")
        tokens = self.tokenizer.encode(text_or_tokens) if isinstance(text_or_tokens, str) \
            else self._as_token_list(text_or_tokens)
        self._check_tokens(tokens, from_position=0)
        return tokens

    def prefill(self, tokens) -> None:
        """Append tokens to the live context (one commit)."""
        tokens = self._as_token_list(tokens)
        self._check_tokens(tokens, from_position=self.position)
        self._prefill(tokens)
        self._commit()

    @staticmethod
    def _as_token_list(tokens) -> list:
        # a number or None is not a token sequence: say so instead of leaking list()'s TypeError
        if isinstance(tokens, (bytes, bytearray)) or not hasattr(tokens, "__iter__"):
            raise InputError(f"tokens: expected a text or a sequence of token ids, found "
                             f"{type(tokens).__name__}")
        if isinstance(tokens, (torch.Tensor, np.ndarray)):
            return tokens.tolist()      # Python ints (and floats, which the check refuses)
        return list(tokens)

    def _check_tokens(self, tokens, from_position):
        V = self.model_cfg.vocab_size
        if not tokens:
            raise InputError("tokens: expected at least one token, found an empty sequence")
        # vectorised check first (a 16k-token instruction costs ~0.5 ms, not ~5 ms per item);
        # the per-item scan below only runs to name the offending tokens
        try:
            arr = np.asarray(tokens)
        except (TypeError, ValueError):
            arr = np.asarray([None])
        ok = arr.ndim == 1 and arr.dtype.kind in "iu" and int(arr.min()) >= 0 and int(arr.max()) < V
        # bool is an int subclass; True is not a token id
        bad = [] if ok else [t for t in tokens if isinstance(t, (bool, np.bool_))
                             or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < V]
        if not ok and not bad:
            bad = tokens[:5]
        if bad:
            raise InputError(f"tokens: expected integers in [0, {V}), found {bad[:5]}")
        if from_position + len(tokens) > self.max_tokens:
            raise InputError(
                f"context: {len(tokens)} tokens at position {from_position} exceed the arena's "
                f"{self.max_tokens} usable tokens (max_context {self.model_cfg.max_context}); shorten "
                f"the instruction or use a preset with a larger max_context")

    def prefill_chunks(self, n: int):
        """(offset, length, plan name) of each chunk that prefilling n tokens runs, in order (the
        same at every position): the largest bucket that fits, token steps for a remainder
        shorter than the smallest bucket."""
        i = 0
        while i < n:
            size = next((c for c in self.cfg.prefill_buckets if c <= n - i), None)
            if size is None:            # fewer tokens than the smallest bucket: token steps
                yield i, 1, "token"
                i += 1
                continue
            yield i, size, f"prefill{size}"
            i += size

    def _prefill(self, tokens):
        t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        for i, size, name in self.prefill_chunks(len(tokens)):
            if name == "token":
                self.io.token.copy_(t[i:i + 1])
                self.plans[name].run()
            else:
                self.io.chunks[size].copy_(t[i:i + size], non_blocking=True)
                plan = self.plans[name]
                (plan.run if self.prefill_graphs else plan.run_eager)()
            self.position += size

    def step(self, obs) -> np.ndarray:
        """One control step: observation [obs_dim] -> action chunk [horizon, action_dim] (a copy)."""
        obs_t = self._check_obs(obs)
        self.io.obs.copy_(obs_t, non_blocking=True)
        self.plans["observation"].run()
        action = self.io.action.cpu().numpy().copy()
        self.step_count += 1
        # the rollback ring's copy of the committed state is queued after the chunk is read, so
        # the call does not wait for it (on CUDA the next plan runs after it on the same stream)
        self._commit()
        return action

    def check_observation(self, obs) -> None:
        """Raise InputError unless `obs` is what `step` accepts (obs_dim finite numbers); changes
        nothing."""
        self._check_obs(obs)

    def _check_obs(self, obs) -> torch.Tensor:
        n = self.model_cfg.obs_dim
        try:
            raw = np.asarray(obs)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"observation: expected {n} floats, found {type(obs).__name__}") from None
        # numbers only: np.asarray(..., dtype=float32) would also parse strings such as "1.5"
        if raw.dtype.kind not in "iuf":
            raise InputError(f"observation: expected {n} floats, found an array of "
                             f"{raw.dtype} ({type(obs).__name__})")
        with np.errstate(over="ignore"):    # float64 beyond float32's range -> inf: refused below
            arr = raw.astype(np.float32)
        if arr.shape != (n,):
            raise InputError(f"observation: expected shape ({n},) (obs_dim of preset "
                             f"{self.model_cfg.name!r}), found shape {arr.shape}")
        if not np.isfinite(arr).all():
            bad = np.flatnonzero(~np.isfinite(arr))[:5].tolist()
            raise InputError(f"observation: expected finite values, found NaN/Inf at indices {bad}; "
                             f"the policy state was not changed")
        return torch.from_numpy(arr)

    def decode(self, n: int) -> list[int]:
        """Greedy-decode n tokens after the current context (each one commit)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InputError(f"decode: expected a token count >= 0, found {n!r}")
        if self.position + n > self.max_tokens:
            raise InputError(f"decode: {n} tokens at position {self.position} exceed the "
                             f"{self.max_tokens} usable tokens of the arena")
        out = []
        tok = self.next_token()
        for _ in range(n):
            out.append(tok)
            self.io.token.copy_(self.io.next_token)
            self.plans["token"].run()
            tok = int(self.io.next_token.item())        # before the ring's copy, as in step
            self.position += 1
            self._commit()
        return out

    def next_token(self) -> int:
        """Greedy next token from last_hidden (the first token after a prefill or restore)."""
        self.plans["lm_head"].run()
        return int(self.io.next_token.item())

    def last_logits(self) -> np.ndarray:
        """Float32 logits [vocab_size] of the next token after the current context."""
        self.plans["lm_head"].run()
        return self.io.logits.cpu().numpy().copy()

    def reset(self, keep_context: bool = True) -> int:
        """New episode: back to the state right after the instruction, or to an empty context."""
        episode = self.episode + 1
        if keep_context and self.context_len:
            self.ring.load_reset_point(episode)
            self._sync_mirrors_from_meta()
        else:
            self._zero_state()
        self.episode = episode
        # the arena now equals the reset point: rebase only writes the new episode into both
        self.ring.rebase(self.step_count, self.position, episode, from_arena=False)
        return self.episode

    def rollback(self, k: int) -> tuple[int, int]:
        """Back k committed steps (bounded by runtime.rollback_depth); returns (step, position)."""
        self.step_count, self.position, self.episode = self.ring.rollback(k)
        return self.step_count, self.position

    def check_noise_seed(self, seed) -> None:
        """Refuse what `seed_noise` would refuse, changing nothing."""
        if not self.model.sample_actions:
            raise InputError(f"noise seed {seed!r}: this policy samples no action noise "
                             f"(runtime.action_noise is 0), so a seed would change nothing; "
                             f"configure it with runtime.action_noise > 0 to sample actions, or "
                             f"leave the seed out")
        super().check_noise_seed(seed)

    # -- capsule support ------------------------------------------------------------------
    def restore_state(self, src: torch.Tensor, known: tuple | None = None,
                      refer: torch.Tensor | None = None) -> None:
        """Copy capsule bytes into the live arena (same device or host), then adopt their metadata.

        The caller has verified size, fingerprint and digest; this never rebinds a buffer. Every
        check runs before the copy, so a refused restore leaves the live state untouched. The
        restored state becomes the point reset(keep_context=True) returns to: the post-instruction
        state of the previous context no longer matches the KV prefix now in the arena.

        `known` = (position, step, episode, context_len) the caller recorded with the bytes (a
        capsule's metadata): then nothing is read back from the device. Without `known`, the
        values are read from the bytes' own meta header.

        `refer`: stored bytes that begin with the small state of `src` (`src` itself, or the
        blocks it was gathered from), left unchanged until the caller hands them back with
        `ring.release` before it frees or overwrites them (a capsule store's memory). The reset
        point then refers to them instead of copying the small state again (core/rollback.py),
        so a GPU-resident restore is one device-to-device copy of the live range, with no host
        synchronisation. Without `refer`, the caller may change `src` afterwards: the reset point
        is a copy.
        """
        if not isinstance(src, torch.Tensor) or src.dtype != torch.uint8 or src.dim() != 1:
            raise InputError(f"restore: expected a 1-D uint8 tensor of state bytes, found "
                             f"{getattr(src, 'dtype', type(src).__name__)} "
                             f"{tuple(getattr(src, 'shape', ()))}")
        n = src.numel()
        if n < self.arena.small_nbytes or (n - self.arena.kv_offset) % self.arena.kv_row_nbytes:
            raise InputError(f"restore: {n} bytes is not a live-state size of this arena")
        if known is None:
            # the position the bytes carry, read from their meta header (64 bytes to the host)
            head = np.frombuffer(src[:META_LEN * 8].cpu().numpy().tobytes(), dtype=np.int64)
            known = (int(head[META_POSITION]), int(head[META_STEP]), int(head[META_EPISODE]),
                     int(head[META_CONTEXT_LEN]))
        position = int(known[0])
        if self.arena.live_nbytes(position) != n:
            raise InputError(f"restore: {n} bytes do not match the position {position} they carry")
        self.arena.base[:n].copy_(src, non_blocking=True)
        self.position, self.step_count, self.episode, self.context_len = (int(v) for v in known)
        self.context_tokens = []
        self.ring.rebase(self.step_count, self.position, self.episode, refer=refer)

    def fingerprint(self) -> str:
        """What a capsule must match to be restored here (StateArena.fingerprint)."""
        return self.arena.fingerprint(self.model_cfg, self.model.weights_digest)

    def describe(self) -> dict:
        c = self.model_cfg
        by_role = self.arena.live_bytes_by_role(self.position)
        return {"model": c.name, "device": str(self.device), "kernels": self.kernel,
                "cuda_graphs": self.use_graphs, "traced_steps": self.traced_steps, "dtype": c.dtype,
                "obs_dim": c.obs_dim, "action_dim": c.action_dim, "horizon": c.horizon,
                "vocab_size": c.vocab_size, "max_context": c.max_context,
                "layer_types": list(c.text.layer_types),
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "tokenizer": self.tokenizer.kind, "untrained": list(self.model.untrained),
                "arena_bytes": self.arena.nbytes,
                "state_bytes_per_token": self.arena.kv_row_nbytes,
                "fixed_state_bytes": self.arena.small_nbytes, "live_bytes_by_role": by_role,
                "buffers": self.arena.layout(), "fingerprint": self.fingerprint(),
                "weights_digest": self.model.weights_digest,
                "position": self.position, "step": self.step_count, "episode": self.episode}
