"""HybridPolicy: a Gated-DeltaNet / gated-attention policy network that keeps all state in the arena.

Layers i with (i+1) % attn_every == 0 are gated softmax attention (GQA, no positional encoding: the
DeltaNet layers carry order), the others Gated DeltaNet with a short causal conv. Every block is
pre-RMSNorm with a SwiGLU FFN.

Two kinds of input feed the same stack:
  * tokens (instruction/task context, or LM decoding): appended to the KV context, position += T;
  * one observation per control step: normalised by the arena's running normaliser, projected to
    d_model, plus the MTP head's latent prediction from the previous step. It attends to the
    context (KV prefix) and to itself but is not appended to it, so a control loop runs at a fixed
    cost forever; its history lives in the recurrent and conv state.

Outputs: an action chunk [horizon, action_dim] from the action head, temporally ensembled with the
pending chunk of the previous step (the action queue), plus Gaussian noise from the arena's
counter-based sampler; the MTP head's next latents; LM logits (tied embedding) for decoding.

Every function reads and writes state only through the arena, so the same code runs eagerly on the
CPU and is captured as CUDA graphs. `pos=None` selects the static-shape form used in graphs
(position read from `arena.meta` on the device, attention over all `max_context` rows with a mask);
an int selects the dynamic form (slices of the live prefix). The two agree to rounding, not bitwise,
so a given plan always uses one of them.

The default weights are deterministic from the seed and untrained: the product is the runtime,
users bring weights (`load_weights`, safetensors only).
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from flashrt_ros.core import kernels
from flashrt_ros.core.arena import DTYPES, META_POSITION, META_RNG_COUNTER, META_RNG_SEED, StateArena, StaticIO
from flashrt_ros.core.config import ModelConfig
from flashrt_ros.core.exceptions import ConfigError

_MASK32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (lowbias32-style) on int64 tensors holding values in [0, 2^32)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32   # multiplier < 2^27: the product fits in int64
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def counter_gaussian(seed, counter, idx):
    """Standard normals from (seed, counter, index): a counter-based sampler whose whole state is two
    int64 in the arena, so capsules and rollback carry it and graphs can advance it in place."""
    base = _mix32((seed & _MASK32) ^ _mix32(counter & _MASK32))
    h1 = _mix32(base ^ _mix32(idx * 2))
    h2 = _mix32(base ^ _mix32(idx * 2 + 1))
    u1 = ((h1 >> 8).float() + 0.5) * (1.0 / (1 << 24))     # (0, 1)
    u2 = (h2 >> 8).float() * (1.0 / (1 << 24))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def _rms(x, w, eps=1e-6):
    """RMSNorm in fp32 (written out: F.rms_norm is several times slower on the CPU path)."""
    if x.is_cuda:
        # On CUDA F.rms_norm is one fused kernel (fp32 inside) where the written-out form is eight;
        # a graph-replayed step is launch-bound, so this alone removes ~500 of its kernels.
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * w.float()
    return y.to(x.dtype)


class HybridPolicy(nn.Module):
    def __init__(self, cfg: ModelConfig, device, kernel: str = "reference",
                 sample_actions: bool = False):
        super().__init__()
        self.cfg = cfg
        # Sampling is fixed at build time (graphs cannot branch); the RNG counter advances either way.
        self.sample_actions = sample_actions
        self.kernel = kernel  # "reference", "chunked" (reference steps, chunked prefill) or "fla"
        self.dtype = DTYPES[cfg.dtype]
        self.conv_dim = 3 * cfg.n_lin_heads * cfg.lin_head_dim
        self._attn_index = {layer: j for j, layer in enumerate(cfg.attn_layers)}
        shapes = self.param_shapes()
        g = torch.Generator().manual_seed(cfg.seed)
        digest = hashlib.blake2b(digest_size=16)
        for name, (shape, kind) in shapes.items():
            # the decay parameters stay fp32 in every preset: exp(A_log) in bf16 would round the
            # per-head decay rates by up to 0.4 % (and fla's in-kernel gate reads them as fp32)
            keep_fp32 = kind in ("A_log", "dt_bias")
            t = self._init_param(shape, kind, g).to(torch.float32 if keep_fp32 else self.dtype)
            digest.update(name.encode())
            digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            self.register_parameter(name.replace(".", "__"),
                                    nn.Parameter(t.to(device), requires_grad=False))
        self.weights_digest = digest.hexdigest()

    # -- parameters -----------------------------------------------------------------------
    def param_shapes(self) -> dict:
        """name -> (shape, init kind); the one list weights files are checked against."""
        c = self.cfg
        d, Hl, Kl = c.d_model, c.n_lin_heads, c.lin_head_dim
        p = {"embed": ((c.vocab_size, d), "embed"),
             "obs_proj": ((c.obs_dim, d), "in"),
             "mtp_scale": ((1,), "half"),
             "final_norm": ((d,), "ones")}
        for i in range(c.n_layers):
            pre = f"layers.{i}."
            p[pre + "norm1"] = ((d,), "ones")
            p[pre + "norm2"] = ((d,), "ones")
            if i in self._attn_index:
                qd, kd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
                p[pre + "qkvg"] = ((d, 2 * qd + 2 * kd), "in")     # q | k | v | output gate
                p[pre + "attn_out"] = ((qd, d), "out")
            else:
                # q|k|v (conv'd) | beta | a (decay) | z (output gate), fused into one matmul
                p[pre + "lin_in"] = ((d, self.conv_dim + 2 * Hl + Hl * Kl), "in")
                p[pre + "conv_w"] = ((self.conv_dim, c.conv_kernel), "conv")
                p[pre + "A_log"] = ((Hl,), "A_log")
                p[pre + "dt_bias"] = ((Hl,), "dt_bias")
                p[pre + "o_norm"] = ((Kl,), "ones")
                p[pre + "lin_out"] = ((Hl * Kl, d), "out")
            p[pre + "w13"] = ((d, 2 * c.d_ffn), "in")
            p[pre + "w2"] = ((c.d_ffn, d), "out")
        p["action_w1"] = ((d, d), "in")
        p["action_w2"] = ((d, c.horizon * c.action_dim), "head")
        p["mtp_w"] = ((d, c.mtp_depth * d), "in")
        return p

    def _init_param(self, shape, kind, g):
        c = self.cfg
        if kind == "ones":
            return torch.ones(shape)
        if kind == "half":
            return torch.full(shape, 0.5)
        if kind == "A_log":
            return torch.log(torch.empty(shape).uniform_(1.0, 16.0, generator=g)).float()
        if kind == "dt_bias":
            return torch.empty(shape).uniform_(-4.0, -2.0, generator=g).float()
        if kind == "conv":
            return torch.randn(shape, generator=g) * (1.0 / math.sqrt(c.conv_kernel))
        std = {"embed": 0.02, "in": 1.0 / math.sqrt(shape[0]),
               "out": 1.0 / math.sqrt(shape[0] * 2 * c.n_layers),
               "head": 1.0 / math.sqrt(shape[0])}[kind]
        return torch.randn(shape, generator=g) * std

    def w(self, name):
        return getattr(self, name.replace(".", "__"))

    def named_weights(self) -> dict:
        return {n.replace("__", "."): p for n, p in self.named_parameters()}

    def load_weights(self, path: str) -> None:
        """Load weights from a safetensors file (never pickle); every name and shape must match."""
        from safetensors import safe_open
        expected = {n: tuple(s) for n, (s, _) in self.param_shapes().items()}
        try:
            f = safe_open(path, framework="pt")
        except Exception as e:  # noqa: BLE001 - missing file, or safetensors' own error type
            # refused at construction like every other config error, with the reason
            raise ConfigError(f"weights {path}: expected a readable safetensors file, found "
                              f"{type(e).__name__}: {e}") from None
        with f:
            found = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
            missing = sorted(set(expected) - set(found))
            extra = sorted(set(found) - set(expected))
            wrong = sorted(n for n in expected if n in found and found[n] != expected[n])
            if missing or extra or wrong:
                detail = [f"missing {missing[:5]}" if missing else "",
                          f"unexpected {extra[:5]}" if extra else "",
                          ", ".join(f"{n}: expected {expected[n]}, found {found[n]}" for n in wrong[:5])]
                raise ConfigError(f"weights {path}: do not match preset {self.cfg.name!r} "
                                  f"({'; '.join(x for x in detail if x)}); export weights for this "
                                  f"preset or pick the preset they were trained with")
            digest = hashlib.blake2b(digest_size=16)
            for name in self.param_shapes():
                t = f.get_tensor(name)
                dst = self.w(name)
                t = t.to(dst.dtype)
                digest.update(name.encode())
                digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
                dst.data.copy_(t)
        self.weights_digest = digest.hexdigest()

    def save_weights(self, path: str) -> None:
        from safetensors.torch import save_file
        save_file({n: p.detach().cpu().contiguous() for n, p in self.named_weights().items()}, path)

    # -- blocks ---------------------------------------------------------------------------
    def _attention(self, i, h, arena: StateArena, pos):
        """Gated GQA attention over the KV prefix plus the T new tokens (written at rows pos..)."""
        c = self.cfg
        T = h.shape[0]
        qd, kd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        q, k, v, gate = (h @ self.w(f"layers.{i}.qkvg")).split([qd, kd, kd, qd], dim=-1)
        q = q.view(T, c.n_heads, c.head_dim).transpose(0, 1)              # [Hq, T, D]
        kv = arena["kv"][:, self._attn_index[i]]                           # [max_ctx, 2, Hkv, D]
        if pos is None:
            # static shapes (graphs): rows pos..pos+T-1 written by index, all rows masked by position
            p = arena.meta[META_POSITION]
            rows = p + torch.arange(T, device=h.device)
            kv.index_copy_(0, rows, torch.stack([k.view(T, c.n_kv_heads, c.head_dim),
                                                 v.view(T, c.n_kv_heads, c.head_dim)], dim=1))
            keys, vals = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)   # [Hkv, max_ctx, D]
            cols = torch.arange(c.max_context, device=h.device)
            mask = cols[None, :] <= rows[:, None]                                # [T, max_ctx]
            # Written out rather than SDPA: SDPA with a mask and GQA falls back to its math kernel,
            # which first copies K/V to every query head (G x the bytes, the whole max_context).
            # Folding the G query heads of a KV head into the row dimension reads each KV row once
            # with two batched matmuls, whose split over max_context parallelises even for T = 1.
            G = c.n_heads // c.n_kv_heads
            qg = q.reshape(c.n_kv_heads, G * T, c.head_dim)                     # [Hkv, G*T, D]
            scores = torch.matmul(qg, keys.transpose(1, 2)).float() * c.head_dim ** -0.5
            scores.masked_fill_(~mask.repeat(G, 1), float("-inf"))             # [Hkv, G*T, max_ctx]
            o = torch.matmul(torch.softmax(scores, dim=-1).to(vals.dtype), vals)
            o = o.view(c.n_heads, T, c.head_dim)
        else:
            kv[pos:pos + T, 0] = k.view(T, c.n_kv_heads, c.head_dim)
            kv[pos:pos + T, 1] = v.view(T, c.n_kv_heads, c.head_dim)
            keys = kv[:pos + T, 0].transpose(0, 1)
            vals = kv[:pos + T, 1].transpose(0, 1)
            mask = None
            if T > 1:
                from torch.nn.attention.bias import causal_lower_right
                mask = causal_lower_right(T, pos + T)
            o = F.scaled_dot_product_attention(q[None], keys[None], vals[None], attn_mask=mask,
                                               enable_gqa=True)[0]
        o = o.transpose(0, 1).reshape(T, qd) * torch.sigmoid(gate)
        return o @ self.w(f"layers.{i}.attn_out")

    def _deltanet(self, i, h, arena: StateArena):
        """Gated DeltaNet: fused projection, short causal conv (state = last k-1 inputs), delta rule."""
        c = self.cfg
        T = h.shape[0]
        Hl, Kl = c.n_lin_heads, c.lin_head_dim
        pre = f"layers.{i}."
        qkv, b, a, z = (h @ self.w(pre + "lin_in")).split([self.conv_dim, Hl, Hl, Hl * Kl], dim=-1)
        conv_state = arena[pre + "conv_state"]                               # [k-1, conv_dim]
        xs = torch.cat([conv_state, qkv], dim=0)                             # [k-1+T, conv_dim]
        conv_state.copy_(xs[T:])
        y = F.silu((xs.unfold(0, c.conv_kernel, 1) * self.w(pre + "conv_w")).sum(-1))  # [T, conv_dim]
        q, k, v = y.view(T, 3, Hl, Kl).unbind(1)
        state = arena[pre + "recurrent_state"]
        if self.kernel == "fla":
            # the L2 norms, the decay gate and the beta sigmoid below run inside the fla kernel
            # (~20 fewer launches per layer); test_kernels holds it to the reference form below
            o = kernels.gated_delta_rule_fla_gated(q, k, v, a, b, self.w(pre + "A_log"),
                                                   self.w(pre + "dt_bias"), state, Kl ** -0.5,
                                                   chunked=T > 1)
        else:
            q = F.normalize(q.float(), dim=-1).to(y.dtype)
            k = F.normalize(k.float(), dim=-1).to(y.dtype)
            g = -torch.exp(self.w(pre + "A_log")) * F.softplus(a.float() + self.w(pre + "dt_bias"))
            beta = torch.sigmoid(b.float())
            # a single step is one iteration of the reference loop; a chunk of T > 1 tokens goes
            # through the chunk-parallel form when asked (test_kernels holds it to the loop)
            delta_rule = kernels.gated_delta_rule_chunked if self.kernel == "chunked" and T > 1 \
                else kernels.gated_delta_rule_reference
            o = delta_rule(q, k, v, g, beta, state, Kl ** -0.5)
        o = _rms(o, self.w(pre + "o_norm")) * F.silu(z.view(T, Hl, Kl))
        return o.reshape(T, Hl * Kl) @ self.w(pre + "lin_out")

    def forward_tokens(self, x, arena: StateArena, pos):
        """Run the stack over T new inputs x [T, d]; returns final-normed hidden [T, d]."""
        for i in range(self.cfg.n_layers):
            pre = f"layers.{i}."
            h = _rms(x, self.w(pre + "norm1"))
            if i in self._attn_index:
                x = x + self._attention(i, h, arena, pos)
            else:
                x = x + self._deltanet(i, h, arena)
            h = _rms(x, self.w(pre + "norm2"))
            h1, h3 = (h @ self.w(pre + "w13")).chunk(2, dim=-1)
            x = x + (F.silu(h1) * h3) @ self.w(pre + "w2")
        return _rms(x, self.w("final_norm"))

    # -- step functions (what the plans run) ----------------------------------------------
    @torch.no_grad()
    def observation_step(self, arena: StateArena, io: StaticIO, pos):
        """One control step: io.obs -> io.action; commits step += 1 (position unchanged)."""
        c = self.cfg
        norm = arena["obs_norm"]
        mean, m2, count = norm[0], norm[1], norm[2]
        obs = io.obs
        count.add_(1.0)                              # Welford running normaliser (arena state)
        delta = obs - mean
        mean.add_(delta / count)
        m2.add_(delta * (obs - mean))
        var = m2 / torch.clamp(count - 1.0, min=1.0)
        zobs = ((obs - mean) * torch.rsqrt(var + 1e-4)).clamp(-5.0, 5.0)
        mtp = arena["mtp_hidden"]
        x = (zobs.to(self.dtype) @ self.w("obs_proj")) + mtp[0] * self.w("mtp_scale")
        hf = self.forward_tokens(x[None], arena, pos)[0]
        arena["last_hidden"].copy_(hf)
        mtp.copy_((hf @ self.w("mtp_w")).view(c.mtp_depth, c.d_model))
        chunk = (F.silu(hf @ self.w("action_w1")) @ self.w("action_w2")).float()
        chunk = chunk.view(c.horizon, c.action_dim)
        queue = arena["action_queue"]
        # temporal ensembling: blend with what the previous chunk planned for the same instants
        shifted = torch.cat([queue[1:], torch.zeros_like(queue[:1])], dim=0)
        meta = arena.meta
        out = chunk + 0.5 * shifted
        if self.sample_actions:
            noise = counter_gaussian(meta[META_RNG_SEED], meta[META_RNG_COUNTER], io.noise_index)
            out = out + io.noise_std * noise.view(c.horizon, c.action_dim)
        queue.copy_(out)
        arena["last_action"].copy_(out[0])
        io.action.copy_(out)
        meta.add_(io.step_increment)                 # step += 1, rng counter += 1

    @torch.no_grad()
    def token_step(self, arena: StateArena, io: StaticIO, pos):
        """Decode one token: io.token -> io.logits, io.next_token (greedy); position += 1."""
        x = self.w("embed")[io.token]
        hf = self.forward_tokens(x, arena, pos)[-1]
        arena["last_hidden"].copy_(hf)
        self._lm_head(arena, io)
        arena.meta[META_POSITION] += 1

    @torch.no_grad()
    def prefill_chunk(self, arena: StateArena, io: StaticIO, pos, tokens):
        """Append T context tokens (tokens: [T] int64); position += T; last_hidden updated."""
        x = self.w("embed")[tokens]
        hf = self.forward_tokens(x, arena, pos)[-1]
        arena["last_hidden"].copy_(hf)
        arena.meta[META_POSITION] += tokens.shape[0]

    @torch.no_grad()
    def lm_head(self, arena: StateArena, io: StaticIO, pos=None):
        """Logits of the next token from last_hidden (the first token after a prefill or restore)."""
        self._lm_head(arena, io)

    def _lm_head(self, arena, io):
        logits = (arena["last_hidden"] @ self.w("embed").t()).float()
        io.logits.copy_(logits)
        io.next_token.copy_(torch.argmax(logits).view(1))

