"""SmolVLA's network: the SmolVLM vision tower and connector, the first text layers, and the
flow-matching action expert, written as LeRobot 0.4.4 computes them (lerobot/policies/smolvla/
modeling_smolvla.py and smolvlm_with_expert.py; transformers' SmolVLM for the vision tower).

One observation runs in two parts, each a captured plan on the GPU (policy_smolvla.py):

* `prefix`: images -> vision tower -> pixel shuffle -> connector; with the language tokens and the
  projected state this is the prefix [P, d] (P fixed, see configuration_smolvla.py), which runs
  through the VLM layers once. Only each layer's roped keys and values are kept (`kv`, [P, layer,
  k|v, kv_head, head_dim] in the arena): the expert reads nothing else of the prefix, so the last
  layer's attention output and MLP are skipped.
* `denoise`: `num_steps` Euler steps of the expert from noise, x <- x + dt * v(x, t), t from 1 to 0.
  At each VLM layer index that has an expert layer, the chunk's tokens either self-attend (over the
  prefix's keys and values and their own, causally) or cross-attend (to the prefix's keys and
  values projected by the expert's k/v projections: the same every step, so they are projected once
  per observation, before the loop).

Masks are LeRobot's `make_att_2d_masks`: image and language tokens attend to each other (not to the
state), the state token to all of them, action tokens to every valid prefix token and causally to
each other. Padding tokens are masked out of every valid row, so padding the language to a fixed
length changes no valid value: LeRobot pads to the longest task of a batch; here the length is
fixed so that the plans can be captured. Positions count valid tokens only (cumsum of the mask - 1),
and the cross-attending expert queries start again from 0, as LeRobot's do.

Attention runs torch's fused kernel (`attend`), held to LeRobot's eager form (`attend_reference`:
scores in float32, masked with the float32 minimum, softmax, probabilities in the value dtype) by a
test; RoPE is LeRobot's `apply_rope` (wavelength 10000, whatever the backbone config says, as
LeRobot does), bit for bit. Each layer's q/k/v and gate/up may be one matrix (`fuse_projections`:
the runtime's builder fuses them; the separate weights are views of it). Shapes carry no batch
axis: one robot, one observation.

On CUDA (`SmolVLAModel.fused`, set by the runtime) the chains of small operations between the
matmuls are core/fused.py's Triton kernels: each residual add with the norm after it, RoPE
(written straight into the KV cache, each grouped head repeated as attention reads it), SiLU * up.
They keep the torch forms' rounding points; the order of a norm's sum and the fused multiply-adds
of RoPE differ (test_smolvla_gpu holds each kernel and the whole model to the torch form).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flashrt_ros.core import fused as fused_kernels
from flashrt_ros.core.models.smolvla.configuration_smolvla import LlamaConfig, SmolVLAConfig, VisionConfig

ROPE_WAVELENGTH = 10_000


def activation(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


# -- shared pieces ---------------------------------------------------------------------------------
def attend(q, k, v, bias):
    """Attention as one fused kernel (torch's scaled_dot_product_attention): q [Tq, H, D], k/v
    [Tk, H, D] (grouped heads already repeated: `expand_heads`), bias [Tq, Tk] additive in q's
    dtype (`additive_mask`: 0 where allowed, -inf elsewhere) -> [Tq, H*D]. With an additive mask
    and as many k/v heads as q heads, CUDA runs the memory-efficient kernel; a boolean mask with
    grouped heads would fall back to the unfused form in float32. Held to `attend_reference`,
    LeRobot's eager form, by test_smolvla. Every row must allow at least one key (a fully masked
    row gives NaN here, not LeRobot's uniform average)."""
    tq, heads, d = q.shape
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=bias)
    return out.transpose(0, 1).reshape(tq, heads * d)


def expand_heads(x, heads: int):
    """[T, KV, D] -> [T, heads, D]: each key/value head repeated for its group of query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


MASK_ALIGN = 16    # elements per mask row the memory-efficient attention kernel reads in place


def additive_mask(mask, dtype):
    """A boolean mask [Tq, Tk] as the additive one `attend` takes: a view of a buffer whose rows
    are MASK_ALIGN-aligned, which the kernel reads in place (an unaligned one is padded again by
    every attention call)."""
    tk = mask.shape[-1]
    rows = F.pad(mask, (0, -tk % MASK_ALIGN), value=True)      # out of place: training vmaps it
    return torch.zeros(rows.shape, dtype=dtype, device=mask.device).masked_fill(
        ~rows, float("-inf"))[:, :tk]


def attend_reference(q, k, v, mask):
    """LeRobot's eager attention: scores in float32 masked with the float32 minimum, softmax,
    probabilities in the value dtype. q [Tq, H, D], k/v [Tk, KV, D], mask [Tq, Tk] -> [Tq, H*D]."""
    tq, heads, d = q.shape
    groups = heads // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float().transpose(0, 1), k.float().permute(1, 2, 0))   # [H, Tq, Tk]
    scores = scores * d ** -0.5
    scores = torch.where(mask[None], scores, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v.transpose(0, 1))                                       # [H, Tq, D]
    return out.transpose(0, 1).reshape(tq, heads * d)


class Rope(nn.Module):
    """LeRobot's `apply_rope`: x [T, H, D] rotated by positions [T] (halves, not interleaved)."""

    def __init__(self, head_dim: int):
        super().__init__()
        exponents = (2.0 / head_dim) * torch.arange(head_dim // 2, dtype=torch.float32)
        self.register_buffer("timescale", ROPE_WAVELENGTH ** exponents, persistent=False)

    def table(self, positions):
        """(cos | cos, -sin | sin) [T, 1, D] float32 of positions [T]: computed once per position
        set and applied by every layer and flow step."""
        radians = (positions[:, None].float() / self.timescale[None, :])[:, None, :]
        cos, sin = torch.cos(radians), torch.sin(radians)
        return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)

    @staticmethod
    def apply(x, table, out=None, groups: int = 1, fused: bool = False):
        """[x1 * cos - x2 * sin, x2 * cos + x1 * sin] (the same roundings) in float32, cast to
        out's dtype (default x's); x [T, KV, D] -> out [T, KV * groups, D], each head repeated for
        its group of query heads; table None: copied unrotated. fused: one Triton kernel
        (core/fused.py rope_heads, held to this reference by test_smolvla_gpu)."""
        if not fused:
            return fused_kernels.rope_heads_reference(x, table, out, groups)
        if out is None:
            out = x.new_empty(x.shape[0], x.shape[1] * groups, x.shape[2])
        return fused_kernels.rope_heads(x, table, out, groups)

    def forward(self, x, positions):
        return self.apply(x, self.table(positions))


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalised in float32, scaled in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)   # x / sqrt(mean(x^2) + eps)
        return self.weight * x32.to(x.dtype)

    def add_forward(self, x, delta, fused: bool):
        """(s, norm(s)) with s = delta + x in delta's dtype, as LeRobot adds its residuals
        (`y += x`); delta None: s = x. fused: one kernel over the rows (core/fused.py add_rms_norm
        with Llama's rounding), s written in place into delta (contiguous). The torch form adds
        out of place (training vmaps over it: sim/imitation_vla.py)."""
        if fused:
            return fused_kernels.add_rms_norm(x if delta is None else delta,
                                              None if delta is None else x, self.weight,
                                              self.eps, round_first=True)
        s = x if delta is None else (delta + x).to(delta.dtype)
        return s, self(s)


def fuse_linears(*linears) -> tuple | None:
    """Make the linears' weights (and biases) views of one [sum of outputs, input] matrix (and
    one vector), so that one GEMM computes them all; call before the weights are loaded (loading
    fills the views). Returns (weight, bias or None), or None where they cannot be one matrix
    (different inputs, a bias on some only)."""
    first = linears[0]
    if len({m.in_features for m in linears}) != 1 or len({m.bias is None for m in linears}) != 1:
        return None
    w = first.weight
    weight = torch.empty(sum(m.out_features for m in linears), w.shape[1], dtype=w.dtype,
                         device=w.device)
    bias = None if first.bias is None else \
        torch.empty(weight.shape[0], dtype=first.bias.dtype, device=w.device)
    start = 0
    for m in linears:
        end = start + m.out_features
        m.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


# -- the vision tower and connector (transformers' SmolVLMVisionTransformer, SmolVLMConnector) ----
class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size)
        n = cfg.patches_per_side
        self.position_embedding = nn.Embedding(n * n, cfg.hidden_size)
        self.patches_per_side = n

    def position_ids(self, grid: int, dtype) -> torch.Tensor:
        """The positions of a whole image's grid x grid patches as transformers computes them:
        fractional coordinates bucketed onto the tower's own grid, in the pixel dtype (so a grid
        other than the tower's, or bfloat16, does not always give arange)."""
        n = self.patches_per_side
        boundaries = torch.arange(1 / n, 1.0, 1 / n)
        frac = torch.arange(grid, dtype=dtype) / grid * (1 - 1e-6)
        b = torch.bucketize(frac, boundaries, right=True)
        return (b[:, None] * n + b).flatten()

    def forward(self, pixels, position_ids):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)   # [N, patches, d]
        return x + self.position_embedding(position_ids)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.qkv = None              # (weight, bias) of [q | k | v], when fuse() made them one

    def fuse(self) -> None:
        self.qkv = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x):
        n, t, d = x.shape
        shape = (n, t, self.heads, d // self.heads)
        if self.qkv is None:
            qkv = [p(x) for p in (self.q_proj, self.k_proj, self.v_proj)]
        else:
            qkv = F.linear(x, *self.qkv).split(d, -1)
        q, k, v = (y.view(shape).transpose(1, 2) for y in qkv)
        out = F.scaled_dot_product_attention(q, k, v)                # [N, H, T, D]
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels, position_ids):
        """pixels [N, 3, S, S] in [-1, 1] -> [N, patches, d]."""
        x = self.embeddings(pixels, position_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class ModalityProjection(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)


class Connector(nn.Module):
    """Pixel shuffle (scale_factor^2 neighbouring patches into one token), then a projection."""

    def __init__(self, vision_hidden: int, text_hidden: int, scale_factor: int):
        super().__init__()
        self.scale = scale_factor
        self.modality_projection = ModalityProjection(vision_hidden * scale_factor ** 2, text_hidden)

    def forward(self, x):
        n, seq, d = x.shape
        s, side = self.scale, int(seq ** 0.5)
        x = x.view(n, side, side // s, d * s).permute(0, 2, 1, 3)
        x = x.reshape(n, side // s, side // s, d * s * s).permute(0, 2, 1, 3)
        x = x.reshape(n, seq // (s * s), d * s * s)
        return self.modality_projection.proj(x)


# -- the text model and the expert (transformers' Llama layers, driven as LeRobot drives them) ----
class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, kv_in: int | None = None):
        """`kv_in`: the input width of k/v (a cross-attending expert layer reads the VLM's keys and
        values, kv_heads * head_dim wide); default the layer's width."""
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        kv_in = kv_in or d
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(kv_in, cfg.num_key_value_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(kv_in, cfg.num_key_value_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=cfg.attention_bias)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.qkv_weight = None       # [q | k | v] rows, when fuse() made the three one matrix

    def fuse(self) -> None:
        """q/k/v as one matrix (`fuse_linears`): one GEMM per layer instead of three."""
        p = (self.q_proj, self.k_proj, self.v_proj)
        fused = None if p[0].bias is not None else fuse_linears(*p)
        if fused is not None:
            self.qkv_weight = fused[0]

    def qkv(self, h):
        """q [T, H, D], k and v [T, KV, D] of the layer's own hidden states h [T, d]."""
        t = h.shape[0]
        if self.qkv_weight is None:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        else:
            q, k, v = F.linear(h, self.qkv_weight).split(
                [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], -1)
        return (q.reshape(t, self.heads, self.head_dim), k.reshape(t, self.kv_heads, self.head_dim),
                v.reshape(t, self.kv_heads, self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, d, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)
        self.gate_up_weight = None   # [gate | up] rows, when fuse() made the two one matrix

    def fuse(self) -> None:
        """As Attention.fuse: gate and up as one matrix."""
        fused = None if self.gate_proj.bias is not None else \
            fuse_linears(self.gate_proj, self.up_proj)
        if fused is not None:
            self.gate_up_weight = fused[0]

    def forward(self, x, fused: bool = False):
        """fused: silu(gate) * up as one kernel (core/fused.py swiglu), with gate/up fused."""
        if self.gate_up_weight is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        gate_up = F.linear(x, self.gate_up_weight)
        if fused and self.act is F.silu:
            return self.down_proj(fused_kernels.swiglu(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, kv_in: int | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, kv_in)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def attention_input(self, x, delta, fused: bool):
        """The residual stream x plus the last layer's MLP output `delta` (None: nothing to add),
        then the input norm: (x, its norm in the projections' dtype)."""
        x, h = self.input_layernorm.add_forward(x, delta, fused)
        return x, h.to(self.self_attn.q_proj.weight.dtype)

    def finish(self, x, att, fused: bool):
        """The layer after attention: x += o_proj(att), then the MLP of its norm. Returns (x, the
        MLP's output), which the next layer's input norm (or the final norm) adds to x: LeRobot's
        two residual adds, each in its projection output's dtype (`RMSNorm.add_forward`)."""
        y = self.self_attn.o_proj(att.to(self.self_attn.o_proj.weight.dtype))
        x, h = self.post_attention_layernorm.add_forward(x, y, fused)
        return x, self.mlp(h, fused)


class TextModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(layers))


class Expert(nn.Module):
    def __init__(self, cfg: SmolVLAConfig):
        super().__init__()
        kv_width = cfg.text.num_key_value_heads * cfg.text.head_dim
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.expert, None if cfg.self_attends(j) else kv_width)
            for j in range(cfg.num_expert_layers))
        self.norm = RMSNorm(cfg.expert.hidden_size, cfg.expert.rms_norm_eps)


def sinusoidal_time_embedding(time: float, dim: int, min_period: float, max_period: float):
    """LeRobot's create_sinusoidal_pos_embedding for one time value, in float64 [dim]."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** fraction
    sin_input = (1.0 / period * 2 * math.pi) * torch.tensor(time, dtype=torch.float32)
    return torch.cat([torch.sin(sin_input), torch.cos(sin_input)])


class SmolVLAModel(nn.Module):
    """The network (weights only: the inputs, the prefix's keys and values and the chunk live in
    buffers the caller passes; see policy_smolvla.py)."""

    def __init__(self, cfg: SmolVLAConfig):
        super().__init__()
        self.cfg = cfg
        t, e = cfg.text, cfg.expert
        self.vision = VisionTower(cfg.vision)
        self.connector = Connector(cfg.vision.hidden_size, t.hidden_size, cfg.scale_factor)
        self.text = TextModel(t, cfg.num_vlm_layers)
        self.expert = Expert(cfg)
        self.state_proj = nn.Linear(cfg.max_state_dim, t.hidden_size)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, e.hidden_size)
        self.action_out_proj = nn.Linear(e.hidden_size, cfg.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * e.hidden_size, e.hidden_size)
        self.action_time_mlp_out = nn.Linear(e.hidden_size, e.hidden_size)
        self.rope = Rope(t.head_dim)
        # the elementwise chains between matmuls as core/fused.py's Triton kernels (CUDA; the
        # runtime's builder decides): norms with their residual adds, RoPE, SiLU * up
        self.fused = False

    def fuse_projections(self) -> None:
        """Fuse each layer's q/k/v and gate/up matrices (views: no weight is stored twice); call
        on an unloaded model, as the runtime's builder does."""
        for m in self.modules():
            if isinstance(m, (Attention, MLP, VisionAttention)):
                m.fuse()

    # -- constants derived once ------------------------------------------------------------------
    def constants(self, device) -> dict:
        """What every observation reads and no weight holds: the patch positions, the flow
        steps' time embeddings, the causal mask of the chunk, the fixed parts of the prefix."""
        cfg = self.cfg
        dt = -1.0 / cfg.num_steps
        heads_dtype = self.action_in_proj.weight.dtype
        times = [1.0 + s * dt for s in range(cfg.num_steps)]
        time_emb = torch.stack([sinusoidal_time_embedding(tm, cfg.expert.hidden_size,
                                                          cfg.min_period, cfg.max_period)
                                for tm in times]).to(heads_dtype)
        n = cfg.chunk_size
        return dict(
            patch_positions=self.vision.embeddings.position_ids(
                cfg.image_grid, self.vision.embeddings.patch_embedding.weight.dtype).to(device),
            time_emb=time_emb.to(device),
            causal=torch.ones(n, n, dtype=torch.bool).tril().to(device),
            prefix_eye=torch.eye(cfg.prefix_len, dtype=torch.bool, device=device),
            chunk_arange=torch.arange(n, device=device),
            # image and language tokens (0) see each other; the state token (1) sees them all
            att_blocks=torch.tensor([0] * (cfg.prefix_len - 1) + [1], device=device),
            # made here: a tensor made from a Python number inside a captured plan is a host copy
            image_scale=torch.tensor(cfg.text.hidden_size ** 0.5,
                                     dtype=self.connector.modality_projection.proj.weight.dtype,
                                     device=device),
            special=torch.tensor([cfg.fake_image_token_id, cfg.global_image_token_id],
                                 dtype=torch.int64, device=device).clamp(min=0),
        )

    # -- the prefix --------------------------------------------------------------------------------
    def embed_prefix(self, pixels, lang_tokens, lang_mask, state, c):
        """pixels [cams, 3, S, S] in [-1, 1], lang_tokens [L], lang_mask [L] bool, state
        [max_state_dim] (normalised, padded) -> embeddings [P, d] and the pad mask [P] bool."""
        cfg = self.cfg
        img = self.connector(self.vision(pixels.to(self.vision.post_layernorm.weight.dtype),
                                         c["patch_positions"]))      # [cams, image_tokens, d]
        img = img * c["image_scale"]                      # sqrt(d) in the image dtype, as LeRobot
        embed = self.text.embed_tokens
        if cfg.add_image_special_tokens:
            start = embed(c["special"])[None].expand(img.shape[0], -1, -1)          # fake, global
            end = embed(c["special"][:1])[None].expand(img.shape[0], -1, -1)        # fake
            img = torch.cat([start, img, end], dim=1)
        lang = embed(lang_tokens)
        lang = lang * math.sqrt(lang.shape[-1])
        st = self.state_proj(state)[None]
        x = torch.cat([img.reshape(-1, img.shape[-1]), lang, st])
        ones = torch.ones(cfg.lang_offset, dtype=torch.bool, device=x.device)
        mask = torch.cat([ones, lang_mask, ones[:1]])
        return x, mask

    def prefix(self, pixels, lang_tokens, lang_mask, state, kv, c) -> torch.Tensor:
        """Run the prefix through the VLM layers, writing each layer's roped keys and values into
        `kv` [P, layers, 2, kv_heads, head_dim]; returns the prefix's pad mask [P] bool."""
        x, mask = self.embed_prefix(pixels, lang_tokens, lang_mask, state, c)
        blocks = torch.cumsum(c["att_blocks"], 0)
        att = (blocks[None, :] <= blocks[:, None]) & mask[None, :] & mask[:, None]   # [P, P]
        # a padding token's row attends to itself (LeRobot's has no key: a uniform average);
        # nothing reads those rows, and no row is left without a key
        att_mask = additive_mask(att | c["prefix_eye"], self.text.embed_tokens.weight.dtype)
        rope = self.rope.table(torch.cumsum(mask.to(torch.int64), 0) - 1)
        last = len(self.text.layers) - 1
        fused, delta = self.fused, None
        for i, layer in enumerate(self.text.layers):
            a = layer.self_attn
            x, h = layer.attention_input(x, delta, fused)
            q, k, v = a.qkv(h)
            self.rope.apply(k, rope, out=kv[:, i, 0], fused=fused)
            kv[:, i, 1].copy_(v)
            if i == last:
                break              # nothing reads the last layer's output, only its keys/values
            att = attend(self.rope.apply(q, rope, fused=fused), expand_heads(kv[:, i, 0], a.heads),
                         expand_heads(kv[:, i, 1], a.heads), att_mask)
            x, delta = layer.finish(x, att, fused)
        return mask

    # -- the flow ----------------------------------------------------------------------------------
    def flow_constants(self, kv, mask, c) -> dict:
        """What every flow step of one observation reads and none changes: each cross-attending
        layer's keys and values (the prefix's, through the expert's k/v projections), the RoPE
        tables of the two position sets, the two masks; and each self-attending layer's prefix
        keys and values with the heads repeated, which the chunk's rows follow: fused, in buffers
        [2, P + chunk, heads, D] whose chunk rows each flow step writes; else concatenated (the
        torch form, out of place, which training vmaps: sim/imitation_vla.py)."""
        cfg = self.cfg
        n = cfg.chunk_size
        dtype = self.expert.layers[0].self_attn.q_proj.weight.dtype
        f = {"cross": {}, "self_kv": {},
             # self-attending layers: the chunk's tokens follow the valid prefix tokens
             "self_rope": self.rope.table(mask.sum() + c["chunk_arange"]),
             "self_mask": additive_mask(torch.cat([mask[None].expand(n, -1), c["causal"]], 1), dtype),
             # cross-attending layers: the queries' positions start again from 0
             "cross_rope": self.rope.table(c["chunk_arange"]),
             "cross_mask": additive_mask(mask[None].expand(n, -1), dtype)}
        p = kv.shape[0]
        for i in range(cfg.num_vlm_layers):
            j = cfg.expert_layer_of(i)
            if j is None:
                continue
            a = self.expert.layers[j].self_attn
            if cfg.self_attends(i):
                if self.fused:             # the heads repeated straight into the prefix rows
                    prefix = kv.new_empty(2, p + n, a.heads, a.head_dim, dtype=dtype)
                    for j in (0, 1):
                        self.rope.apply(kv[:, i, j], None, out=prefix[j, :p],
                                        groups=a.heads // a.kv_heads, fused=True)
                else:
                    prefix = [expand_heads(kv[:, i, j].to(dtype), a.heads) for j in (0, 1)]
                f["self_kv"][i] = prefix
                continue
            k = a.k_proj(kv[:, i, 0].reshape(p, -1).to(a.k_proj.weight.dtype))
            v = a.v_proj(kv[:, i, 1].reshape(p, -1).to(a.v_proj.weight.dtype))
            f["cross"][i] = (expand_heads(k.view(p, -1, a.head_dim), a.heads),
                             expand_heads(v.view(p, -1, a.head_dim), a.heads))
        return f

    def velocity(self, x, step: int, kv, f, c):
        """v(x, t) of flow step `step`: x [chunk, max_action_dim] float32 -> same shape."""
        cfg = self.cfg
        a_emb = self.action_in_proj(x.to(self.action_in_proj.weight.dtype))
        t_emb = c["time_emb"][step][None].expand_as(a_emb)
        h = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([a_emb, t_emb], -1))))
        n = h.shape[0]
        fused, delta = self.fused, None
        for i in range(cfg.num_vlm_layers):
            j = cfg.expert_layer_of(i)
            if j is None:
                continue
            layer = self.expert.layers[j]
            a = layer.self_attn
            h, hn = layer.attention_input(h, delta, fused)
            if cfg.self_attends(i):
                rope, (keys, values) = f["self_rope"], f["self_kv"][i]
                q, k, v = a.qkv(hn)
                groups = a.heads // a.kv_heads       # the chunk's rows, after the prefix's
                if fused:
                    self.rope.apply(k, rope, out=keys[-n:], groups=groups, fused=True)
                    self.rope.apply(v, None, out=values[-n:], groups=groups, fused=True)
                else:
                    keys = torch.cat([keys, self.rope.apply(k, rope, groups=groups)])
                    values = torch.cat([values, expand_heads(v, a.heads)])
                att = attend(self.rope.apply(q, rope, fused=fused), keys, values, f["self_mask"])
            else:
                q = a.q_proj(hn).view(n, a.heads, a.head_dim)
                k, v = f["cross"][i]
                att = attend(self.rope.apply(q, f["cross_rope"], fused=fused), k, v,
                             f["cross_mask"])
            h, delta = layer.finish(h, att, fused)
        _, h = self.expert.norm.add_forward(h, delta, fused)
        return self.action_out_proj(h.float().to(self.action_out_proj.weight.dtype)).float()

    def sample(self, noise, kv, mask, c):
        """The Euler loop: from `noise` [chunk, max_action_dim] at t = 1 to the actions at t = 0."""
        dt = -1.0 / self.cfg.num_steps
        f = self.flow_constants(kv, mask, c)
        x = noise
        for step in range(self.cfg.num_steps):
            x = x + dt * self.velocity(x, step, kv, f, c)
        return x
