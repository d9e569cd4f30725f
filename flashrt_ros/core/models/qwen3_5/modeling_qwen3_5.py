"""The Qwen3.5 text backbone (transformers' `Qwen3_5ForCausalLM`), over the state arena.

One module per part, with transformers' parameter names, so a checkpoint's tensors load by name:

    model.embed_tokens                      Embedding [V, d]
    model.layers.{i}.input_layernorm        RMSNorm (zero-centred: x * (1 + w))
    model.layers.{i}.linear_attn.*          GatedDeltaNet   (layer_types[i] == "linear_attention")
    model.layers.{i}.self_attn.*            Attention       (layer_types[i] == "full_attention")
    model.layers.{i}.post_attention_layernorm, model.layers.{i}.mlp.*   SwiGLU MLP
    model.norm, lm_head                     (lm_head is the embedding when tie_word_embeddings)

Sequence form: one sequence, tokens on the first axis (`x: [T, d]`); no batch axis. State is not
kept in the modules: every call reads and writes the arena's buffers (`layers.{i}.conv_state`,
`layers.{i}.recurrent_state`, the token-major `kv`), so the same code runs eagerly and inside
captured CUDA graphs, and a capsule of the arena is the whole state.

`pos` selects the form. An int is the eager form: slices of the live KV prefix and SDPA. `None`
is the static form used in CUDA graphs and CPU traces (core/plans.py): the position is read
from `arena.meta` on the device, KV rows are written by index and attention covers all
`max_context` rows under a mask. The two agree to
rounding, so a given plan always uses one of them. On CUDA with fla kernels (`TextModel.fused`),
core/fused.py's Triton kernels replace chains of small operations: the norms, the conv, the
gated norm and SwiGLU in every call (their kernels take rows: a prefill chunk is T of them), and
for single tokens of the static form (the observation and token steps, `DecoderLayer.step`)
also every projection (a GEMV, with the norm before it computed inside: fused.norm_gemv) and the
attention, over the live prefix only (its length read from meta). A prefill
chunk of the static form attends there with prefill_attention_qwen3_5.py's kernel, over the live
prefix only too, so a captured chunk of any length costs what the eager one does.

Weights: `prepare()` (after loading) packs the projections that read one input into one matrix
(the named weights become views of it) and derives the norms' fp32 scales; a control step on the
CPU is a few hundred small operations, so each one saved counts.

Numerics follow transformers where it matters for equality: RMSNorm in fp32 with `(1 + w)`
(the gated norm of the DeltaNet output uses `w`, norm before gate), cos/sin computed in fp32 and
cast to the activations' dtype, q/k L2 norm as `x * rsqrt(sum(x^2) + 1e-6)`, decay and beta in
fp32, the recurrent state in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flashrt_ros.core import fused as fused_kernels
from flashrt_ros.core import kernels
from flashrt_ros.core.arena import META_POSITION, BufferSpec
from flashrt_ros.core.config import TextConfig
from flashrt_ros.core.kernels import f32
from flashrt_ros.core.models.qwen3_5.prefill_attention_qwen3_5 import prefill_attention


def _as(y, dtype):
    """y in `dtype` (y itself when it already is)."""
    return y if y.dtype == dtype else y.to(dtype)


def rms_normalize(x, eps, n):
    """`x * rsqrt(mean(x^2) + eps)` along the last axis (n elements), in fp32.

    eps and n are 0-d fp32 tensors on x's device (`norm_constants`): a Python number in an
    operation is first wrapped into a tensor and converted, which costs more than the arithmetic
    at a control step's sizes. `addcdiv` is `eps + sum / n`, the roundings of `mean + eps`."""
    xf = f32(x)
    return xf * torch.rsqrt(torch.addcdiv(eps, (xf * xf).sum(-1, keepdim=True), n))


def norm_constants(eps: float, n: int, device) -> tuple:
    """(eps, n) as 0-d fp32 tensors for `rms_normalize`."""
    return (torch.tensor(eps, dtype=torch.float32, device=device),
            torch.tensor(float(n), dtype=torch.float32, device=device))


def pack_weights(*linears: nn.Linear) -> torch.Tensor:
    """One [sum of outputs, inputs] matrix for linears that read the same input; each weight is
    rebound as a view of it (same storage, same names), so one matmul replaces several."""
    packed = torch.cat([lin.weight for lin in linears])
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(packed[row:row + n], requires_grad=False)
        row += n
    return packed


def gemv(x, w, swiglu: bool = False):
    """w @ x for one token ([1, K] or [K] -> [1, N]) through fused.gemv (`swiglu`: x is
    gate | up and the GEMV reads silu(gate) * up)."""
    return fused_kernels.gemv(x.reshape(-1), w, swiglu=swiglu).view(1, -1)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: `norm(x) * (1 + weight)`, computed in fp32 (weight initialised to 0)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.scale = self.constants = None      # 1 + weight in fp32 and (eps, n): prepare()

    def prepare(self) -> None:
        self.scale = 1.0 + self.weight.float()
        self.constants = norm_constants(self.eps, self.weight.shape[0], self.weight.device)

    def forward(self, x):
        return _as(rms_normalize(x, *self.constants) * self.scale, x.dtype)

    def add_forward(self, x, delta, fused: bool):
        """(x + delta, norm(x + delta)): a residual add and the norm after it (delta None: no add).
        fused: one kernel over x's rows on the GPU (x, contiguous, is updated in place then)."""
        if fused:
            _, h = fused_kernels.add_rms_norm(x, delta, self.scale, self.eps)
            return x, h
        if delta is not None:
            x = x + delta
        return x, self(x)

    def project(self, x, delta, w):
        """(x + delta, w @ norm(x + delta)) for one token ([1, d]) on the GPU: the norm computed
        inside the projection's GEMV (fused.norm_gemv; x itself is not written)."""
        x, y = fused_kernels.norm_gemv(x.view(-1), None if delta is None else delta.view(-1),
                                       self.scale, self.eps, w)
        return x.view(1, -1), y


class GatedRMSNorm(nn.Module):
    """The DeltaNet output norm: `weight * norm(x)` in x's dtype, then `* silu(gate)` in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.constants = None                   # (eps, n): prepare()

    def prepare(self) -> None:
        self.constants = norm_constants(self.eps, self.weight.shape[0], self.weight.device)

    def forward(self, x, gate, fused: bool = False):
        """x, gate: [..., D] -> [..., D]; fused: one kernel (x contiguous)."""
        if fused:
            return fused_kernels.gated_rms_norm(x, gate, self.weight, self.eps)
        y = self.weight * _as(rms_normalize(x, *self.constants), x.dtype)
        return _as(y * F.silu(f32(gate)), x.dtype)


def rope_frequencies(cfg: TextConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim / 2] in fp32 on the CPU, the scale of cos and sin) for cfg's rope, as
    transformers' modeling_rope_utils computes them (`_compute_default_rope_parameters`, `_linear_
    scaling_`, `_dynamic_ntk_`, `_yarn_`): the same fp32 operations in the same order."""
    r, dim, base = cfg.rope_scaling, cfg.rotary_dim, cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if r.rope_type == "dynamic":
        # the frequencies at max_position_embeddings, which serve every shorter sequence
        # (ModelConfig holds the context within it)
        seq = r.original_max_position_embeddings
        base = base * ((r.factor * seq / seq) - (r.factor - 1)) ** (dim / (dim - 2))
    if r.rope_type != "yarn":
        inv_freq = 1.0 / (base ** exponents)
        return (inv_freq / r.factor if r.rope_type == "linear" else inv_freq), 1.0

    def mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, original = r.factor, r.original_max_position_embeddings
    attention = r.attention_factor
    if attention is None:
        attention = float(mscale(factor, r.mscale) / mscale(factor, r.mscale_all_dim)) \
            if r.mscale and r.mscale_all_dim else mscale(factor)

    def correction_dim(rotations):      # the dimension that turns `rotations` times in `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(r.beta_fast or 32), correction_dim(r.beta_slow or 1)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** exponents
    extrapolation = 1 - ramp        # 1: the frequency kept, 0: divided by factor
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


class RotaryEmbedding(nn.Module):
    """Partial rotary embedding: the first `rotary_dim` of each head's dims rotate, the rest pass.

    cos/sin for every position the arena can hold are computed once (fp32, then the activations'
    dtype, as transformers does) and looked up by position: a graph reads them by address. The
    tables span the whole head (cos 1 and sin 0 on the dims that pass) and the rotation of the
    rotary half is a signed permutation matrix, so that `x * cos + (x @ rotate) * sin` is the
    whole embedding in four operations, with transformers' roundings (the permutation is exact).
    Scaled ropes (`rope_frequencies`) change only the tables.
    """

    def __init__(self, cfg: TextConfig, max_context: int, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.dim, self.head_dim = cfg, cfg.rotary_dim, cfg.head_dim
        self.max_context, self.dtype = max_context, dtype
        D = self.head_dim
        for name, shape in (("cos", (max_context, D)), ("sin", (max_context, D)),
                            ("rotate", (D, D))):
            self.register_buffer(name, torch.empty(shape, dtype=dtype), persistent=False)
        if self.cos.device.type != "meta":
            self.materialize(self.cos.device)

    def materialize(self, device) -> None:
        """Compute the tables on `device` in fp32, as transformers does, then cast them."""
        dim, D, half = self.dim, self.head_dim, self.dim // 2
        inv_freq, scale = rope_frequencies(self.cfg)
        positions = torch.arange(self.max_context, device=device).float()
        freqs = positions[:, None] * inv_freq.to(device)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)                                # [max_ctx, rot]
        cos = torch.ones(self.max_context, D, device=device)
        sin = torch.zeros(self.max_context, D, device=device)
        cos[:, :dim], sin[:, :dim] = emb.cos() * scale, emb.sin() * scale
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
        # (x @ rotate)[:dim] = [-x[half:dim], x[:half]] (transformers' rotate_half), 0 beyond dim
        rotate = torch.zeros(D, D, device=device)
        i = torch.arange(half, device=device)
        rotate[i + half, i] = -1.0
        rotate[i, i + half] = 1.0
        self.rotate = rotate.to(self.dtype)

    def forward(self, x, cos, sin):
        """x: [T, H, D]; cos, sin: [T, D] -> x with its first rotary_dim dims rotated."""
        return x * cos[:, None] + torch.matmul(x, self.rotate) * sin[:, None]


class Positions:
    """Where the T new tokens of one call go: host ints (eager) or device tensors (graphs), and
    which of core/fused.py's kernels the call takes."""

    def __init__(self, arena, pos, T: int, rotary: RotaryEmbedding, device, fused: bool = False):
        self.pos, self.T = pos, T
        # the norms, conv, gated norm and SwiGLU through their row kernels (any call)
        self.row_kernels = fused
        # a single token of the static form through every fused kernel: the projections and the
        # attention too, which read the position from meta themselves
        self.fused = fused and pos is None and T == 1
        if self.fused:
            self.rows = self.cos = self.sin = None
        elif pos is None:
            p = arena.meta[META_POSITION]
            self.rows = p + torch.arange(T, device=device)                      # [T]
            self.cos, self.sin = rotary.cos[self.rows], rotary.sin[self.rows]
        else:
            self.rows = None
            self.cos, self.sin = rotary.cos[pos:pos + T], rotary.sin[pos:pos + T]


class Attention(nn.Module):
    """Gated GQA attention: q/k RMSNorm per head, partial RoPE, sigmoid output gate from q_proj."""

    def __init__(self, cfg: TextConfig, attn_index: int):
        super().__init__()
        H, Hkv, D, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.H, self.Hkv, self.D = H, Hkv, D
        self.attn_index = attn_index                        # this layer's slot in the kv buffer
        self.q_proj = nn.Linear(d, H * D * 2, bias=False)   # per head: query | gate
        self.k_proj = nn.Linear(d, Hkv * D, bias=False)
        self.v_proj = nn.Linear(d, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.qkv_weight = self.qk_scale = None              # derived by prepare()

    def prepare(self) -> None:
        self.qkv_weight = pack_weights(self.q_proj, self.k_proj, self.v_proj)
        # the q and k norms in one pass: per-row scales of [q heads | k heads]
        self.qk_scale = torch.cat([self.q_norm.scale.expand(self.H, self.D),
                                   self.k_norm.scale.expand(self.Hkv, self.D)])

    def step(self, p, arena, rotary: RotaryEmbedding):
        """One token of the static form on the GPU from its projection p ([(2H+2Hkv)D], the
        GEMV of `qkv_weight`): q/k norms, RoPE and the KV write in one kernel, attention over
        the live prefix with the output gate, o_proj."""
        H, Hkv, D = self.H, self.Hkv, self.D
        kv = arena["kv"][:, self.attn_index]
        q = fused_kernels.attention_prep(p, self.qk_scale, self.q_norm.eps, rotary, kv,
                                         arena.meta, H, Hkv, D)
        gate = p[:2 * H * D].view(H, 2 * D)[:, D:]
        o = fused_kernels.decode_attention(q, gate, kv, arena.meta)
        return gemv(o, self.o_proj.weight)

    def forward(self, h, arena, at: Positions, rotary: RotaryEmbedding):
        T, H, Hkv, D = h.shape[0], self.H, self.Hkv, self.D
        p = F.linear(h, self.qkv_weight)                                        # [T, (2H+2Hkv)D]
        # splits and unbinds: one operation each, where slices take one per axis
        qg, new = p.split((2 * H * D, 2 * Hkv * D), dim=-1)
        query, gate = qg.view(T, H, 2, D).unbind(2)                             # [T, H, D] each
        new_k, v = new.view(T, 2, Hkv, D).unbind(1)                             # k | v
        qk = torch.cat([query, new_k], dim=1)                                   # [T, H+Hkv, D]
        qk = rotary(_as(rms_normalize(qk, *self.q_norm.constants) * self.qk_scale, h.dtype),
                    at.cos, at.sin)
        q, k = qk.split((H, Hkv), dim=1)
        kv = arena["kv"][:, self.attn_index]                                    # [max_ctx, 2, Hkv, D]
        if at.pos is None:
            kv.index_copy_(0, at.rows, torch.stack([k, v], dim=1))
            if at.row_kernels:
                # a chunk on the GPU: flash attention over the live prefix (its length read from
                # meta) and the output gate in one kernel (prefill_attention_qwen3_5.py)
                o = prefill_attention(q, gate, kv, arena.meta)                     # [T, H, D]
                return F.linear(o.view(T, H * D), self.o_proj.weight)
        q = q.transpose(0, 1)                                                   # [H, T, D]
        if at.pos is None:
            keys, vals = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)    # [Hkv, max_ctx, D]
            cols = torch.arange(kv.shape[0], device=h.device)
            mask = cols[None, :] <= at.rows[:, None]                             # [T, max_ctx]
            if h.device.type == "cpu":
                # the CPU's SDPA takes the mask in its flash kernel: half the time of the form
                # below, whose dozen operations are what a small model's step costs there
                o = F.scaled_dot_product_attention(q[None], keys[None], vals[None],
                                                   attn_mask=mask, enable_gqa=True)[0]
            else:
                # Written out rather than SDPA: on CUDA, SDPA with a mask and GQA falls back to
                # its math kernel, which first copies K/V to every query head (G x the bytes,
                # the whole max_context). Folding the G query heads of a KV head into the row
                # dimension reads each KV row once.
                G = H // Hkv
                qg = q.reshape(Hkv, G * T, D)                                    # [Hkv, G*T, D]
                scores = torch.matmul(qg, keys.transpose(1, 2)).float() * D ** -0.5
                scores.masked_fill_(~mask.repeat(G, 1), float("-inf"))          # [Hkv, G*T, ctx]
                o = torch.matmul(torch.softmax(scores, dim=-1).to(vals.dtype), vals).view(H, T, D)
        else:
            p = at.pos
            kv[p:p + T] = torch.stack([k, v], dim=1)
            keys, vals = kv[:p + T, 0].transpose(0, 1), kv[:p + T, 1].transpose(0, 1)
            mask = None
            if T > 1:
                from torch.nn.attention.bias import causal_lower_right
                mask = causal_lower_right(T, p + T)
            o = F.scaled_dot_product_attention(q[None], keys[None], vals[None], attn_mask=mask,
                                               enable_gqa=True)[0]
        o = o.transpose(0, 1).reshape(T, H * D) * torch.sigmoid(gate.reshape(T, H * D))
        return F.linear(o, self.o_proj.weight)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet: short causal conv over q|k|v, decay from `A_log`/`dt_bias`, beta, the delta
    rule on an fp32 state [Hv, Dk, Dv], gated RMSNorm. Each key head serves Hv/Hk value heads."""

    def __init__(self, cfg: TextConfig, kernel: str):
        super().__init__()
        d = cfg.hidden_size
        self.Hk, self.Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.Dk, self.Dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.K = cfg.linear_conv_kernel_dim
        self.kernel = kernel               # "reference", "chunked" (CPU prefill) or "fla"
        key_dim, value_dim = self.Hk * self.Dk, self.Hv * self.Dv
        self.in_proj_qkv = nn.Linear(d, 2 * key_dim + value_dim, bias=False)
        self.in_proj_z = nn.Linear(d, value_dim, bias=False)
        self.in_proj_b = nn.Linear(d, self.Hv, bias=False)
        self.in_proj_a = nn.Linear(d, self.Hv, bias=False)
        # depthwise conv, transformers' nn.Conv1d weight layout [channels, 1, K]
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, self.K, groups=cfg.conv_dim,
                                bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.Hv), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.ones(self.Hv), requires_grad=False)
        self.norm = GatedRMSNorm(self.Dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, d, bias=False)
        self.in_sizes = (cfg.conv_dim, value_dim, self.Hv, self.Hv)     # q|k|v, z, b, a
        self.in_weight = self.constants = self.neg_A = self.conv_weight = None   # prepare()

    def prepare(self) -> None:
        self.in_weight = pack_weights(self.in_proj_qkv, self.in_proj_z, self.in_proj_b,
                                      self.in_proj_a)
        self.conv_weight = self.conv1d.weight.detach()[:, 0]                   # [conv_dim, K]
        self.neg_A = -torch.exp(self.A_log.detach().float())                   # decay rates
        # the L2 norm's eps and the query scale Dk^-0.5 (tensors: see rms_normalize)
        self.constants = tuple(torch.tensor(v, dtype=torch.float32, device=self.A_log.device)
                               for v in (kernels.L2NORM_EPS, self.Dk ** -0.5))

    def forward(self, h, conv_state, state, at: Positions):
        """h: [T, d]; conv_state: [K-1, conv_dim] (the last K-1 conv inputs); state: [Hv, Dk, Dv].
        `at` says which fused kernels (GPU) the call takes."""
        T, Hk, Hv = h.shape[0], self.Hk, self.Hv
        p = F.linear(h, self.in_weight)
        qkv, z, b, a = p.split(self.in_sizes, dim=-1)
        kd = Hk * self.Dk
        if at.row_kernels:
            # q, k and v come out of the conv kernel contiguous, as fla's kernels take them
            qc, kc, v = fused_kernels.conv_rows(qkv, conv_state, self.conv_weight,
                                                (kd, kd, Hv * self.Dv))
            q, k = (self._repeat_heads(x.view(T, Hk, self.Dk)) for x in (qc, kc))
            o = kernels.gated_delta_rule_fla_gated(q, k, v.view(T, Hv, self.Dv), a, b, self.A_log,
                                                   self.dt_bias, state, self.Dk ** -0.5,
                                                   chunked=T > 1).contiguous()
            o = self.norm(o, z.view(T, Hv, self.Dv), True)
            return F.linear(o.view(T, Hv * self.Dv), self.out_proj.weight)
        xs = torch.cat([conv_state, qkv], dim=0)                                # [K-1+T, conv_dim]
        conv_state.copy_(xs[T:])
        y = F.silu((xs.unfold(0, self.K, 1) * self.conv_weight).sum(-1))
        qk, v = y.split((2 * kd, Hv * self.Dv), dim=-1)
        qk, v = qk.view(T, 2 * Hk, self.Dk), v.view(T, Hv, self.Dv)          # q heads | k heads
        if self.kernel == "fla":
            # the L2 norms, the decay gate and the beta sigmoid run inside the fla kernels;
            # test_kernels holds them to the reference prologue below
            q, k = self._value_heads(qk)
            o = kernels.gated_delta_rule_fla_gated(q, k, v, a, b, self.A_log, self.dt_bias, state,
                                                   self.Dk ** -0.5, chunked=T > 1)
        else:
            eps, scale = self.constants
            q, k = self._value_heads(kernels.l2norm(f32(qk), eps))             # both in one pass
            g, beta = kernels.decay_gate(a, b, self.neg_A, self.dt_bias)
            if T == 1:
                rule = kernels.gated_delta_rule_step
            elif self.kernel == "chunked":
                rule = kernels.gated_delta_rule_chunked
            else:
                rule = kernels.gated_delta_rule_reference
            o = rule(q, k, v, g, beta, state, scale)                            # [T, Hv, Dv]
        o = self.norm(o, z.view(T, Hv, self.Dv))
        return F.linear(o.reshape(T, Hv * self.Dv), self.out_proj.weight)

    def step(self, norm: RMSNorm, x, delta, conv_state, state):
        """One token of the static form on the GPU, from the residual stream x and the previous
        layer's output delta -> (x + delta, the mixer's output): the residual add, `norm` and
        the in-projection (one kernel), the conv + silu (one kernel, the conv state shifted in
        place), the recurrence with its gates and L2 norms (one kernel, the state updated in
        place), the gated norm (one kernel), out_proj. With fused.gdn_fusion() the conv runs
        inside the in-projection's GEMV and the gated norm inside out_proj's."""
        C, Vd, Hv, _ = self.in_sizes
        kd = self.Hk * self.Dk
        fuse = fused_kernels.gdn_fusion()
        if fuse:
            x, p, y = fused_kernels.norm_gemv_conv(
                x.view(-1), None if delta is None else delta.view(-1), norm.scale, norm.eps,
                self.in_weight, conv_state, self.conv_weight)
        else:
            x, p = norm.project(x, delta, self.in_weight)
            y = fused_kernels.conv_step(p[:C], conv_state, self.conv_weight)     # [C]
        o = fused_kernels.gdn_step(
            y[:kd].view(self.Hk, self.Dk), y[kd:2 * kd].view(self.Hk, self.Dk),
            y[2 * kd:].view(Hv, self.Dv), p[C + Vd + Hv:], p[C + Vd:C + Vd + Hv], self.A_log,
            self.dt_bias, state, self.Dk ** -0.5, kernels.L2NORM_EPS)
        z = p[C:C + Vd].view(Hv, self.Dv)
        if fuse:
            mixed = fused_kernels.gated_norm_gemv(o, z, self.norm.weight, self.norm.eps,
                                                  self.out_proj.weight)
            return x.view(1, -1), mixed.view(1, -1)
        return x, gemv(self.norm(o, z, True), self.out_proj.weight)

    def _value_heads(self, qk):
        """[T, 2 Hk, Dk] -> q, k of [T, Hv, Dk]: each key head serves Hv/Hk value heads."""
        q, k = qk.view(qk.shape[0], 2, self.Hk, self.Dk).unbind(1)     # one operation, not two
        return self._repeat_heads(q), self._repeat_heads(k)

    def _repeat_heads(self, x):
        """[T, Hk, Dk] -> [T, Hv, Dk]: each key head serves Hv/Hk value heads."""
        return x if self.Hv == self.Hk else x.repeat_interleave(self.Hv // self.Hk, dim=1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.gate_up_weight = None                          # derived by prepare()

    def prepare(self) -> None:
        self.gate_up_weight = pack_weights(self.gate_proj, self.up_proj)

    def step(self, gate_up):
        """One token on the GPU from its gate|up projection: SwiGLU computed as the down
        projection's GEMV reads its input."""
        return gemv(gate_up, self.down_proj.weight, swiglu=True)

    def forward(self, x, at: Positions):
        """x: [T, d]; `at` says which fused kernels (GPU) the call takes."""
        gate_up = F.linear(x, self.gate_up_weight)
        if at.row_kernels:
            y = fused_kernels.swiglu(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return F.linear(y, self.down_proj.weight)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: token mixer (DeltaNet or attention), then the MLP."""

    def __init__(self, cfg: TextConfig, index: int, kernel: str):
        super().__init__()
        self.index = index
        self.is_attention = cfg.layer_types[index] == "full_attention"
        if self.is_attention:
            self.self_attn = Attention(cfg, cfg.attn_layers.index(index))
        else:
            self.linear_attn = GatedDeltaNet(cfg, kernel)
            self.state_names = (f"layers.{index}.conv_state", f"layers.{index}.recurrent_state")
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, delta, arena, at: Positions, rotary: RotaryEmbedding):
        """(x, delta) -> (x', delta'): the residual stream and the previous layer's MLP output,
        not yet added (the add is fused with the norm that follows it)."""
        if at.fused:
            return self.step(x, delta, arena, rotary)
        x, h = self.input_layernorm.add_forward(x, delta, at.row_kernels)
        if self.is_attention:
            mixed = self.self_attn(h, arena, at, rotary)
        else:
            conv, recurrent = self.state_names
            mixed = self.linear_attn(h, arena[conv], arena[recurrent], at)
        x, h = self.post_attention_layernorm.add_forward(x, mixed, at.row_kernels)
        return x, self.mlp(h, at)

    def step(self, x, delta, arena, rotary: RotaryEmbedding):
        """`forward` for one token of the static form on the GPU: each norm is computed inside
        the GEMV of the projection that reads it, so a layer is seven kernels (a Gated DeltaNet
        layer five with fused.gdn_fusion())."""
        if self.is_attention:
            x, p = self.input_layernorm.project(x, delta, self.self_attn.qkv_weight)
            mixed = self.self_attn.step(p, arena, rotary)
        else:
            conv, recurrent = self.state_names
            x, mixed = self.linear_attn.step(self.input_layernorm, x, delta, arena[conv],
                                             arena[recurrent])
        x, gate_up = self.post_attention_layernorm.project(x, mixed, self.mlp.gate_up_weight)
        return x, self.mlp.step(gate_up)


class TextModel(nn.Module):
    """Embedding, decoder layers, final norm (transformers' `Qwen3_5TextModel`)."""

    def __init__(self, cfg: TextConfig, max_context: int, dtype: torch.dtype, kernel: str):
        super().__init__()
        # built with its (uninitialised) weight given: the runtime writes every weight, and on the
        # meta device nn.Embedding's own normal_ init imports torch._dynamo (~2 s at start)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, kernel)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg, max_context, dtype)
        self.fused = False      # core/fused.py's kernels (CUDA with fla): prepare()

    def prepare(self) -> None:
        self.fused = (self.embed_tokens.weight.device.type == "cuda" and fused_kernels.available()
                      and all(layer.linear_attn.kernel == "fla" for layer in self.layers
                              if not layer.is_attention))

    def forward(self, x, arena, pos):
        """x: [T, d] input embeddings -> final-normed hidden states [T, d]; appends T KV rows."""
        at = Positions(arena, pos, x.shape[0], self.rotary, x.device, self.fused)
        delta = None
        for layer in self.layers:
            x, delta = layer(x, delta, arena, at, self.rotary)
        return self.norm.add_forward(x, delta, at.row_kernels)[1]


class Qwen3_5ForCausalLM(nn.Module):
    """The backbone with its LM head; parameter names are transformers' checkpoint names."""

    def __init__(self, cfg: TextConfig, max_context: int, dtype: torch.dtype, kernel: str):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg, max_context, dtype, kernel)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for p in self.parameters():
            p.requires_grad_(False)

    def prepare(self) -> None:
        """Derive the inference-time tensors from the loaded weights, once, before any step: the
        packed projections (one matmul per input, the weights rebound as views of it, so no
        memory is added) and the norms' fp32 scales. The weights are read-only afterwards."""
        modules = list(self.modules())
        for m in modules:                   # the norms first: attention stacks its q/k scales
            if isinstance(m, (RMSNorm, GatedRMSNorm)):
                m.prepare()
        for m in modules:
            if isinstance(m, (Attention, GatedDeltaNet, MLP, TextModel)):
                m.prepare()

    def logits(self, hidden):
        """hidden [d] (one position: one GEMV where the fused kernels run) or [T, d] -> logits."""
        w = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        if self.model.fused and hidden.dim() == 1:
            return fused_kernels.gemv(hidden.contiguous(), w)
        return F.linear(hidden, w)

    @staticmethod
    def state_specs(cfg: TextConfig, max_context: int, dtype: str) -> list[BufferSpec]:
        """The backbone's state: conv and recurrent state per DeltaNet layer, then the KV of all
        attention layers token-major (`kv[t, layer, k|v, head, dim]`, one row per token)."""
        specs = []
        for i in cfg.lin_layers:
            specs.append(BufferSpec(f"layers.{i}.recurrent_state", "float32",
                                    (cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                     cfg.linear_value_head_dim), "recurrent_state"))
            specs.append(BufferSpec(f"layers.{i}.conv_state", dtype,
                                    (cfg.linear_conv_kernel_dim - 1, cfg.conv_dim), "conv_state"))
        specs.append(BufferSpec("kv", dtype, (max_context, len(cfg.attn_layers), 2,
                                              cfg.num_key_value_heads, cfg.head_dim), "kv"))
        return specs
