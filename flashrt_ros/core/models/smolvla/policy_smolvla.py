"""SmolVLAPolicy: LeRobot's SmolVLA on the state arena, as the VLA runtime drives it
(core/vla_runtime.py; the interface is `VLAPolicy` in core/policy.py).

State (the arena, so capsules, rollback and forks carry it):
    meta           the runtime's counters: position (prefix rows live: 0 or P), step, episode,
                   the sampler's seed and counter, context_len (valid prefix tokens)
    prefix_mask    uint8 [P]: which prefix rows are tokens (the language is padded to its maximum)
    action_queue   float32 [n_action_steps, action_dim]: the chunk `select_action` hands out, in
                   the dataset's units
    queue_left     int64 [1]: how many queued actions are left (0 = empty: the next call computes
                   a chunk from its observation)
    kv             [P, layers, k|v, kv_heads, head_dim]: the roped keys and values of the last
                   observation's prefix, token-major as the arena wants its KV

Static inputs and outputs (`VLAIO`, not state): the prepared images, the language ids and mask,
the normalised padded state, the noise, the chunk.

Plans (captured as CUDA graphs on the GPU, run eagerly on the CPU):
    noise    standard normals from the arena's counter-based sampler into `io.noise`; counter += 1
    prefix   images + language + state -> kv, prefix_mask; position = P
    denoise  the `num_steps` Euler steps from `io.noise` -> `io.chunk` (cut to action_dim and
             unnormalised)
"""
from __future__ import annotations

import numpy as np
import torch

from flashrt_ros.core.arena import (META_CONTEXT_LEN, META_POSITION, META_RNG_COUNTER,
                                    META_RNG_SEED, BufferSpec)
from flashrt_ros.core.exceptions import InputError
from flashrt_ros.core.models.smolvla.checkpoint_smolvla import SmolVLADir
from flashrt_ros.core.models.smolvla.modeling_smolvla import SmolVLAModel
from flashrt_ros.core.policy import VLAPolicy
from flashrt_ros.core.seeded import counter_gaussian
from flashrt_ros.inputs.preprocess import check_frame, prepare_frame

STATE_KEY, ACTION_KEY, TASK_KEY = "observation.state", "action", "task"


class VLAIO:
    """Static input/output buffers of the plans (allocated once, before capture)."""

    def __init__(self, cfg, device):
        w, h = cfg.resize
        self.pixels = torch.zeros(len(cfg.cameras), 3, h, w, device=device)
        self.lang_ids = torch.zeros(cfg.tokenizer_max_length, dtype=torch.int64, device=device)
        self.lang_mask = torch.zeros(cfg.tokenizer_max_length, dtype=torch.bool, device=device)
        self.state = torch.zeros(cfg.max_state_dim, device=device)
        self.noise = torch.zeros(cfg.chunk_size, cfg.max_action_dim, device=device)
        self.chunk = torch.zeros(cfg.chunk_size, cfg.action_dim, device=device)
        self.noise_index = torch.arange(cfg.chunk_size * cfg.max_action_dim, device=device)


class SmolVLAPolicy(VLAPolicy):
    def __init__(self, src: SmolVLADir):
        super().__init__()
        self.src = src
        self.cfg = src.cfg
        self.model = SmolVLAModel(src.cfg)
        for p in self.parameters():
            p.requires_grad_(False)
        self.weights_digest = ""
        self.consts: dict = {}

    def prepare(self, device) -> None:
        self.consts = self.model.constants(device)
        self.normalizer = self.src.normalizer.to(device)
        self.unnormalizer = self.src.unnormalizer.to(device)

    def state_specs(self) -> list[BufferSpec]:
        c, t = self.cfg, self.cfg.text
        return [BufferSpec("prefix_mask", "uint8", (c.prefix_len,), "prefix_state"),
                BufferSpec("action_queue", "float32", (c.n_action_steps, c.action_dim), "action_state"),
                BufferSpec("queue_left", "int64", (1,), "action_state"),
                BufferSpec("kv", c.dtype, (c.prefix_len, c.num_vlm_layers, 2, t.num_key_value_heads,
                                           t.head_dim), "kv")]

    def make_io(self, device) -> VLAIO:
        return VLAIO(self.cfg, device)

    # -- host inputs -> static inputs -------------------------------------------------------------
    def load_batch(self, batch, io: VLAIO, noise) -> None:
        """Check a LeRobot batch (a dataset's keys, before the preprocessor) and write it into the
        static inputs: images resized with padding to [-1, 1], the task's ids, the normalised
        padded state, and the noise when given. Everything is checked before anything is written."""
        c = self.cfg
        if not isinstance(batch, dict):
            raise InputError(f"batch: expected a dict with {[STATE_KEY, *c.cameras, TASK_KEY]}, "
                             f"found {type(batch).__name__}")
        missing = [k for k in (STATE_KEY, *c.cameras, TASK_KEY) if k not in batch]
        if missing:
            raise InputError(f"batch: expected the keys {[STATE_KEY, *c.cameras, TASK_KEY]}, "
                             f"missing {missing}")
        state = _array(batch[STATE_KEY], STATE_KEY, (c.state_dim,))
        task = batch[TASK_KEY]
        if isinstance(task, (list, tuple)) and len(task) == 1:
            task = task[0]
        if not isinstance(task, str):
            raise InputError(f"{TASK_KEY}: expected a string, found {type(task).__name__}")
        images = []
        for i, key in enumerate(c.cameras):
            img = batch[key]
            if isinstance(img, (np.ndarray, torch.Tensor)) and img.ndim == 4 and img.shape[0] == 1:
                img = img[0]
            images.append(check_frame(img, io.pixels[i], key))
        noise_t = None if noise is None else \
            _array(noise, "noise", (c.chunk_size, c.max_action_dim))
        ids, mask = self.src.tokenizer(task)
        dev = io.state.device
        for i, (key, img) in enumerate(zip(c.cameras, images)):
            prepare_frame(img, io.pixels[i], key)
        io.lang_ids.copy_(torch.from_numpy(ids))
        io.lang_mask.copy_(torch.from_numpy(mask))
        st = self.normalizer.normalize(STATE_KEY, state.to(dev))
        io.state.zero_()
        io.state[: c.state_dim].copy_(st)
        if noise_t is not None:
            io.noise.copy_(noise_t)

    # -- plans -------------------------------------------------------------------------------------
    def sample_noise(self, arena, io: VLAIO) -> None:
        meta = arena.meta
        z = counter_gaussian(meta[META_RNG_SEED], meta[META_RNG_COUNTER], io.noise_index)
        io.noise.copy_(z.view_as(io.noise))
        meta[META_RNG_COUNTER:META_RNG_COUNTER + 1].add_(1)

    def prefix(self, arena, io: VLAIO) -> None:
        mask = self.model.prefix(io.pixels, io.lang_ids, io.lang_mask, io.state, arena["kv"],
                                 self.consts)
        arena["prefix_mask"].copy_(mask)
        meta = arena.meta
        meta[META_POSITION:META_POSITION + 1].fill_(self.cfg.prefix_len)
        meta[META_CONTEXT_LEN:META_CONTEXT_LEN + 1].copy_(mask.sum().view(1))

    def denoise(self, arena, io: VLAIO) -> None:
        mask = arena["prefix_mask"].bool()
        x = self.model.sample(io.noise, arena["kv"], mask, self.consts)
        io.chunk.copy_(self.unnormalizer.unnormalize(ACTION_KEY, x[:, : self.cfg.action_dim]))


def _array(x, name: str, shape: tuple) -> torch.Tensor:
    """A float array of `shape` (or with a leading batch axis of 1) as a float32 CPU tensor."""
    try:
        t = torch.as_tensor(np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x),
                            dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: expected a float array of shape {list(shape)}, found "
                         f"{type(x).__name__} ({e})") from None
    if t.ndim == len(shape) + 1 and t.shape[0] == 1:
        t = t[0]
    if tuple(t.shape) != shape:
        raise InputError(f"{name}: expected shape {list(shape)}, found {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError(f"{name}: expected finite values, found NaN or inf")
    return t
