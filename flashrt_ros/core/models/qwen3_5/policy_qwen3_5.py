"""Qwen3_5Policy: the Qwen3.5 backbone with an observation encoder, an action head and an MTP head.

Two kinds of input feed the same backbone:
  * tokens (the instruction, or LM decoding): embedded, appended to the KV context, position += T;
  * one observation per control step: normalised and projected to one input embedding, plus the
    MTP head's latent prediction from the previous step. It sits at the next free position (RoPE),
    attends to the context and to itself but is not appended to it (its KV row is scratch), so a
    control loop runs at a fixed cost forever; its history lives in the DeltaNet state.

Outputs of a control step: an action chunk [horizon, action_dim], temporally ensembled with the
pending chunk of the previous step (the action queue), plus Gaussian noise from the arena's
counter-based sampler when `action_noise > 0`; the MTP head's next latents.

Weights: the backbone from a checkpoint's safetensors (transformers' names) or, for presets, drawn
from the seed; the heads from `policy.safetensors` or drawn from the seed (`untrained` lists what
was drawn, so the node can warn that such actions are untrained).
"""
from __future__ import annotations

import math

import torch

from flashrt_ros.core.arena import (DTYPES, META_POSITION, META_RNG_COUNTER, META_RNG_SEED,
                                    BufferSpec)
from flashrt_ros.core.checkpoint import WeightsDigest
from flashrt_ros.core.config import ModelConfig
from flashrt_ros.core.models.qwen3_5.heads_qwen3_5 import ActionHead, MTPHead, ObservationEncoder
from flashrt_ros.core.models.qwen3_5.modeling_qwen3_5 import (GatedDeltaNet, Qwen3_5ForCausalLM,
                                                              RMSNorm)
from flashrt_ros.core.policy import Policy
from flashrt_ros.core.seeded import CounterRNG, counter_gaussian

ENSEMBLE = 0.5      # weight of the previous chunk's plan in each action row
# Parameters kept in fp32 whatever the model dtype: the decay rates (exp(A_log) in bf16 would round
# them by up to 0.4 %; transformers and fla read them as fp32), the observation statistics and the
# MTP scale.
FP32_PARAMS = ("A_log", "dt_bias")
FP32_HEADS = ("obs_encoder.mean", "obs_encoder.std", "mtp_head.scale")


class Qwen3_5Policy(Policy):
    def __init__(self, cfg: ModelConfig, kernel: str = "reference", sample_actions: bool = False):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.dtype = DTYPES[cfg.dtype]
        # Sampling is fixed at build time (graphs cannot branch); the RNG counter advances either way.
        self.sample_actions = sample_actions
        self.backbone = Qwen3_5ForCausalLM(cfg.text, cfg.max_context, self.dtype, kernel)
        self.obs_encoder = ObservationEncoder(cfg.obs_dim, d)
        self.action_head = ActionHead(d, cfg.horizon, cfg.action_dim)
        self.mtp_head = MTPHead(d, cfg.mtp_depth)
        for p in self.parameters():
            p.requires_grad_(False)
        self.weights_digest = ""
        self.backbone_digest = ""
        self.untrained: tuple = ()

    # -- parts and weights ------------------------------------------------------------------
    def backbone_parameters(self) -> dict:
        """Checkpoint name -> parameter (transformers' names: `model.*`, `lm_head.weight`)."""
        return dict(self.backbone.named_parameters())

    def head_parameters(self) -> dict:
        """`policy.safetensors` name -> parameter."""
        return {f"{part}.{n}": p for part in ("obs_encoder", "action_head", "mtp_head")
                for n, p in getattr(self, part).named_parameters()}

    def param_dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMS or name in FP32_HEADS \
            else self.dtype

    def set_kernel(self, kernel: str) -> None:
        """The delta-rule kernels of every DeltaNet layer (read at call time; captured plans keep
        what they captured)."""
        for m in self.modules():
            if isinstance(m, GatedDeltaNet):
                m.kernel = kernel
        self.backbone.model.prepare()       # whether single tokens take the fused kernels

    def seeded_weights(self, names, seed: int, device="cpu"):
        """Deterministic weights for `names`, as (name, tensor on `device`) pairs in order: the
        same values on every device. `cfg.seed_rng` cpu draws them with torch's CPU generator and
        moves each to `device` as soon as it is drawn (the whole model is never on the host);
        device draws them there (core/seeded.CounterRNG: other values, uniform)."""
        counter = CounterRNG(seed, device) if self.cfg.seed_rng == "device" else None
        g = torch.Generator().manual_seed(seed)

        def normal(name, shape, std, divisor=None):
            if counter is not None:
                return counter.normal(name, shape, std)
            t = torch.randn(shape, generator=g)
            return t / divisor if divisor else t * std

        def uniform(name, shape, low, high):
            if counter is not None:
                return counter.uniform(name, shape, low, high)
            return torch.empty(shape).uniform_(low, high, generator=g)

        backbone = self.backbone_parameters()
        params = {**backbone, **self.head_parameters()}
        modules = dict(self.named_modules())
        n_layers = self.cfg.text.num_hidden_layers
        for name in names:
            p = params[name]
            owner = modules.get(_owner(name, "backbone." if name in backbone else ""))
            leaf = name.rsplit(".", 1)[-1]
            shape = tuple(p.shape)
            if isinstance(owner, RMSNorm):
                t = torch.zeros(shape)                       # zero-centred: scale 1
            elif leaf == "A_log":      # the log on the CPU: a device's may round otherwise
                t = torch.log(uniform(name, shape, 1.0, 16.0).cpu())
            elif leaf == "dt_bias":
                t = uniform(name, shape, -4.0, -2.0)
            elif name.endswith("norm.weight"):
                t = torch.ones(shape)                        # the DeltaNet's gated norm
            elif name == "mtp_head.scale":
                t = torch.full(shape, 0.5)
            elif name == "obs_encoder.mean":
                t = torch.zeros(shape)
            elif name == "obs_encoder.std":
                t = torch.ones(shape)
            elif name.endswith("conv1d.weight"):
                t = normal(name, shape, 1.0 / math.sqrt(shape[-1]), divisor=math.sqrt(shape[-1]))
            elif name.endswith("embed_tokens.weight"):
                t = normal(name, shape, 0.02)
            else:                                            # nn.Linear [out, in]
                std = 1.0 / math.sqrt(shape[1])
                if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * n_layers)          # residual branches
                t = normal(name, shape, std)
            yield name, t.to(self.param_dtype(name)).to(device)

    # -- state -------------------------------------------------------------------------------
    def state_specs(self) -> list[BufferSpec]:
        c, dt = self.cfg, self.cfg.dtype
        return [BufferSpec("last_action", "float32", (c.action_dim,), "action_state"),
                BufferSpec("action_queue", "float32", (c.horizon, c.action_dim), "action_state"),
                BufferSpec("queue_valid", "float32", (1,), "action_state"),
                BufferSpec("mtp_hidden", dt, (c.mtp_depth, c.d_model), "mtp_state"),
                BufferSpec("last_hidden", dt, (c.d_model,), "mtp_state"),
                *Qwen3_5ForCausalLM.state_specs(c.text, c.max_context, dt)]

    # -- step functions (what the plans run) ---------------------------------------------------
    @property
    def static_prefill_any_length(self) -> bool:
        """Whether the static form of a prefill chunk attends over the live prefix only (the
        GPU's fused kernels: prefill_attention_qwen3_5.py), so a chunk of any length can be
        captured at the cost of running it; else it attends over all max_context rows under a
        mask."""
        return self.backbone.model.fused

    def prepare(self) -> None:
        """Derive the backbone's inference-time tensors from the loaded weights (see
        `Qwen3_5ForCausalLM.prepare`); the runtime calls it once, after loading, before any step."""
        self.backbone.prepare()
        self.ensemble = torch.full((1,), ENSEMBLE, device=self.mtp_head.scale.device)

    @torch.inference_mode()
    def predict_action_chunk(self, arena, io, pos):
        """One control step: io.obs -> io.action; commits step += 1 (position unchanged)."""
        mtp = arena["mtp_hidden"]
        scale = self.mtp_head.scale
        x = self.obs_encoder(io.obs) + mtp[0] * (scale if scale.dtype == self.dtype
                                                  else scale.to(self.dtype))
        h = self.backbone.model(x[None], arena, pos)[0]
        arena["last_hidden"].copy_(h)
        mtp.copy_(self.mtp_head(h))
        chunk = self.action_head(h)
        queue = arena["action_queue"]
        # temporal ensembling: each row blends this chunk's plan with the previous chunk's plan for
        # the same instant (the queue shifted by one step); the last row has no previous plan, nor
        # has any row at an episode's first step (`queue_valid` is 0 in a zeroed arena, 1 after the
        # first step): lerp(x, x, w) is x exactly
        valid = arena["queue_valid"]
        previous = torch.cat([queue[1:], chunk[-1:]])
        out = torch.lerp(chunk, previous, valid * self.ensemble)
        valid.fill_(1.0)
        meta = arena.meta
        if self.sample_actions:
            noise = counter_gaussian(meta[META_RNG_SEED], meta[META_RNG_COUNTER], io.noise_index)
            out = out + io.noise_std * noise.view(self.cfg.horizon, self.cfg.action_dim)
        queue.copy_(out)
        arena["last_action"].copy_(out[0])
        io.action.copy_(out)
        meta.add_(io.step_increment)                 # step += 1, rng counter += 1

    @torch.inference_mode()
    def token_step(self, arena, io, pos):
        """Decode one token: io.token -> io.logits, io.next_token (greedy); position += 1."""
        h = self.backbone.model(self.backbone.model.embed_tokens(io.token), arena, pos)[-1]
        arena["last_hidden"].copy_(h)
        self._lm_head(arena, io)
        arena.meta[META_POSITION] += 1

    @torch.inference_mode()
    def prefill_chunk(self, arena, io, pos, tokens):
        """Append T context tokens (tokens: [T] int64); position += T; last_hidden updated."""
        h = self.backbone.model(self.backbone.model.embed_tokens(tokens), arena, pos)[-1]
        arena["last_hidden"].copy_(h)
        arena.meta[META_POSITION] += tokens.shape[0]

    @torch.inference_mode()
    def lm_head(self, arena, io):
        """Logits of the next token from last_hidden (the first token after a prefill or restore)."""
        self._lm_head(arena, io)

    def _lm_head(self, arena, io):
        logits = self.backbone.logits(arena["last_hidden"]).float()
        io.logits.copy_(logits)
        io.next_token.copy_(torch.argmax(logits).view(1))


def _owner(name: str, prefix: str) -> str:
    return prefix + name.rsplit(".", 1)[0]


def digest_tensors(tensors: dict) -> str:
    """The WeightsDigest of `tensors` in name order (each copied to the host, where it is not
    there, while the one before is hashed)."""
    with WeightsDigest() as digest:
        for name in sorted(tensors):
            digest.add(name, tensors[name].detach().contiguous().cpu())
    return digest.hexdigest()
