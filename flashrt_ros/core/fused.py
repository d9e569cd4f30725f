"""Fused Triton kernels of the single-token step (an observation or a decoded token) on the GPU.

A captured step of the hybrid-0.8b preset launched ~1450 kernels, most of them small elementwise
ones (norms, gates, activations, residual adds, the conv update, the attention's softmax), and a
graph replays each at a fixed cost of a few microseconds. Here each chain between two matmuls is
one kernel, in the style of fla: a short, readable torch reference beside every kernel, and
test_fused_kernels.py holds the two together with named tolerances (on the GPU, and on the CPU
through Triton's interpreter).

    gemv                y = W x for one token (every projection, the LM head): for a single
                        row cuBLAS takes 1.1-5x longer on these matrices (bench_kernels.py); with
                        `swiglu=True`, x = silu(gate) * up computed as it is read (the MLP's
                        down projection: one kernel fewer per layer)
    norm_gemv           x + delta, and y = W (norm(x + delta) * scale) in the same kernel: the norm
                        before each projection of a single-token step computed as its GEMV
                        reads the input (each program makes the norm's pass over the short
                        input itself; one kernel fewer per norm)
    norm_gemv_conv      norm_gemv, and the short causal conv + silu of the outputs that are conv
                        channels, shifting the conv state (the Gated DeltaNet's in-projection:
                        the program that computes a channel convolves it; one kernel fewer)
    gated_norm_gemv     y = W (weight * norm(o) * silu(z)) per head: the DeltaNet output norm
                        computed as the out-projection's GEMV reads its input (one kernel fewer)
    add_rms_norm        x += delta; h = norm(x) * scale           (every norm of the residual stream;
                        with `round_first`, Llama's rounding: SmolVLA's norms)
    conv_step           the short causal conv of one token + silu, shifting the conv state
    conv_rows           the same conv over T tokens (a prefill chunk), reading the state and the
                        projection where they are (no concatenated copy) and writing q, k, v
                        each contiguous (what fla's kernels take without a copy)
    gdn_step            one token of the Gated DeltaNet recurrence with its gates: L2-normalised
                        q/k, the decay exp(-exp(A_log) softplus(a + dt_bias)), beta = sigmoid(b),
                        the delta rule on the fp32 state (updated in place) and the read-out
    gated_rms_norm      weight * norm(o) * silu(z)                 (the DeltaNet output norm)
    swiglu              silu(gate) * up
    rope_heads          SmolVLA's RoPE of a [T, heads, D] block, each head written to its group of
                        query heads (grouped keys as attention reads them), straight into the
                        KV cache or the attention's key buffer
    attention_prep      q/k RMSNorm + RoPE; k, v written to the KV row at the position in meta
    decode_attention    attention of one query over the live prefix only, flash-decoding style:
                        the length is read from `meta` on the device, so a captured graph covers
                        every context, and blocks past the prefix return at once; then the
                        output gate sigmoid(g)

The kernels keep the references' rounding points (a bf16 reference rounds after each operation,
and the kernel rounds there too); what differs is the order of the sums and the rsqrt/exp
implementations. The Gated DeltaNet recurrence of a prefill chunk is fla's chunked kernel; the
step's is `gdn_step` (the math of fla's fused recurrent kernel, written here so that a control
step needs no fla: importing fla loads every one of its op families, seconds of bring-up that
now land in the background capture of the prefill plans).

On Hopper and later GPUs the GEMVs launch with programmatic dependent launch
(`pdl`): a projection's programs start while the kernel before it still runs, read their weight
tile, and wait for that kernel only before they read the input, so the weight read of each GEMV
overlaps the end of the kernel before it instead of following its launch gap.

Only for CUDA tensors with Triton importable (`available()`). The model uses them when its
kernels are "fla": the GEMVs, conv_step, gdn_step and the attention kernels in the static form
(pos=None) of single-token calls (with `gdn_fusion`, norm_gemv_conv and gated_norm_gemv in place
of a Gated DeltaNet layer's norm_gemv + conv_step and gated_rms_norm + gemv); add_rms_norm,
conv_rows, gated_rms_norm and swiglu, which take rows, in every call (a prefill chunk of T tokens
is T rows, where each torch op of a norm also writes a [T, d] fp32 intermediate). SmolVLA
(core/models/smolvla) takes add_rms_norm, swiglu and rope_heads on CUDA unless its runtime's
kernels are "reference".
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from flashrt_ros.core import kernels
from flashrt_ros.core.arena import META_POSITION

# Attention over the prefix in splits of SPLIT rows (one program per split and KV head), each
# split in tiles of TILE rows (half as many for fp32 K/V, in two pipeline stages: fp32 tiles of
# head dim 256 in three stages exceed an H200's shared memory); a split past the live length
# runs no tile.
SPLIT = 256
TILE = 64
# rows of a chunk's gated RMSNorm per program (gated_rms_norm)
GATED_NORM_ROWS = 16


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - ImportError or a driver failure at import
        return False


def _pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


# -- references (torch): what each kernel computes, with the same rounding points ----------------
def gemv_reference(x, w, swiglu: bool = False):
    """x: [K] (swiglu: [2K], gate | up, and x = silu(gate) * up), w: [N, K] -> w @ x [N] in x's
    dtype (fp32 accumulation)."""
    return F.linear(swiglu_reference(x) if swiglu else x, w)


def norm_gemv_reference(x, delta, scale, eps, w):
    """The norm before a projection and the projection: (x + delta, W norm(x + delta) * scale),
    as `add_rms_norm_reference` then `gemv_reference` compute them (delta None: no add)."""
    x, h = add_rms_norm_reference(x, delta, scale, eps)
    return x, gemv_reference(h, w)


def norm_gemv_conv_reference(x, delta, scale, eps, w, conv_state, conv_weight):
    """(x + delta, y = w @ norm(x + delta), silu(causal conv of y[:C])): `norm_gemv_reference`,
    then `conv_step_reference` of the first C = conv_weight.shape[0] outputs (conv_state
    shifted in place)."""
    x, y = norm_gemv_reference(x, delta, scale, eps, w)
    return x, y, conv_step_reference(y[:conv_weight.shape[0]], conv_state, conv_weight)


def gated_norm_gemv_reference(o, z, weight, eps, w):
    """w @ gated_rms_norm(o, z): o, z [H, D], weight [D], w [N, H * D] -> [N]."""
    return gemv_reference(gated_rms_norm_reference(o, z, weight, eps).view(-1), w)


def add_rms_norm_reference(x, delta, scale, eps, round_first: bool = False):
    """x: [N] or [T, N] residual (updated: x + delta, in x's dtype), delta: x's shape or None,
    scale: [N] fp32 (1 + weight) -> (x, h) with h = x * rsqrt(mean(x^2) + eps) * scale per row,
    in x's dtype. `round_first` (Llama's RMSNorm, SmolVLA): the normalised row is rounded to x's
    dtype before it is scaled, and scale (the weight) is in x's dtype."""
    if delta is not None:
        x = x + delta
    xf = x.float()
    h = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if round_first:
        return x, scale * h.to(x.dtype)
    return x, (h * scale).to(x.dtype)


def conv_step_reference(x, conv_state, weight):
    """x: [C] this token's conv input, conv_state: [K-1, C] the previous inputs (shifted in place),
    weight: [C, K] -> silu(causal conv) [C] in x's dtype."""
    xs = torch.cat([conv_state, x[None]], dim=0)                           # [K, C]
    conv_state.copy_(xs[1:])
    return F.silu((xs.t() * weight).sum(-1))


def conv_rows_reference(x, conv_state, weight, sizes):
    """x: [T, C] T tokens' conv inputs, conv_state: [K-1, C] the inputs before them (shifted in
    place), weight: [C, K], sizes: the channel split (q, k, v) -> silu(causal conv) split into
    contiguous [T, size] tensors, in x's dtype."""
    T, K = x.shape[0], weight.shape[1]
    xs = torch.cat([conv_state, x], dim=0)                                  # [K-1+T, C]
    conv_state.copy_(xs[T:])
    y = F.silu((xs.unfold(0, K, 1) * weight).sum(-1))
    return tuple(part.contiguous() for part in y.split(sizes, dim=-1))


def gdn_step_reference(q, k, v, a, b, A_log, dt_bias, state, scale):
    """q, k: [Hk, K] raw conv outputs; v: [Hv, V]; a, b: [Hv] raw; A_log, dt_bias: [Hv] fp32;
    state: [Hv, K, V] fp32 (updated in place) -> o [Hv, V] in v's dtype. Each key head serves
    Hv/Hk value heads. The model's unfused step: kernels.l2norm, decay_gate and
    gated_delta_rule_step."""
    G = v.shape[0] // q.shape[0]
    qn, kn = (kernels.l2norm(x.float()).repeat_interleave(G, 0) for x in (q, k))
    g, beta = kernels.decay_gate(a, b, -torch.exp(A_log.float()), dt_bias)
    return kernels.gated_delta_rule_step(qn[None], kn[None], v[None], g[None], beta[None], state,
                                         scale)[0]


def gated_rms_norm_reference(o, z, weight, eps):
    """o: [R, D] (R = T * H rows), z: [R, D] gate, weight: [D] -> weight * norm(o) (o's dtype)
    * silu(z) ([R, D])."""
    of = o.float()
    y = weight * (of * torch.rsqrt(of.square().mean(-1, keepdim=True) + eps)).to(o.dtype)
    return (y * F.silu(z.float())).to(o.dtype)


def swiglu_reference(gate_up):
    """gate_up: [2F] or [T, 2F] (gate | up) -> silu(gate) * up ([F] or [T, F])."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_heads_reference(x, table, out=None, groups: int = 1):
    """x: [T, Hs, D] -> [T, Hs * groups, D]: each head rotated by LeRobot's `apply_rope` with
    `table` = (cos | cos, -sin | sin) [T, 1, D] fp32 (SmolVLA's Rope.table), in fp32 and rounded
    to the output's dtype, and repeated for its group of `groups` query heads (grouped keys as
    attention reads them); table None: copied (and repeated) unrotated. Written into `out` where
    given, else returned in x's dtype."""
    y = x
    if table is not None:
        cos, sin = table
        x32 = x.float()
        y = x32 * cos + torch.roll(x32, x.shape[-1] // 2, dims=-1) * sin
    y = y.repeat_interleave(groups, dim=1) if groups > 1 else y
    return y.to(x.dtype) if out is None else out.copy_(y)


def attention_prep_reference(p, qk_scale, eps, rotary, kv, meta, H, Hkv, D):
    """p: [(2H + 2Hkv) D] the q|gate, k, v projection of one token; qk_scale: [H+Hkv, D] fp32;
    rotary: the model's RotaryEmbedding (cos, sin: [max_ctx, D], rotate: [D, D]); kv:
    [max_ctx, 2, Hkv, D] this layer's KV; meta: the arena's int64 meta. Writes k, v to
    kv[position] -> q [H, D] (normed, rotated)."""
    pos = meta[META_POSITION]
    cos, sin, rotate = rotary.cos, rotary.sin, rotary.rotate
    qg = p[:2 * H * D].view(H, 2 * D)
    new = p[2 * H * D:].view(2, Hkv, D)
    x = torch.cat([qg[:, :D], new[0]]).float()                              # [H+Hkv, D]
    y = (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * qk_scale).to(p.dtype)
    c, s = cos[pos], sin[pos]
    y = y * c + torch.matmul(y, rotate) * s
    kv[pos] = torch.stack([y[H:], new[1]])
    return y[:H]


def decode_attention_reference(q, gate, kv, meta):
    """q: [H, D] one query, gate: [H, D] output gate, kv: [max_ctx, 2, Hkv, D], meta: int64 meta
    -> sigmoid(gate) * softmax(q k^T / sqrt(D)) v over the rows 0..position ([H, D])."""
    L = int(meta[META_POSITION]) + 1
    H, D = q.shape
    Hkv = kv.shape[2]
    G = H // Hkv
    keys, vals = kv[:L, 0].transpose(0, 1), kv[:L, 1].transpose(0, 1)       # [Hkv, L, D]
    scores = torch.matmul(q.view(Hkv, G, D).float(), keys.float().transpose(1, 2)) * D ** -0.5
    o = torch.matmul(torch.softmax(scores, dim=-1), vals.float()).view(H, D).to(q.dtype)
    return o * torch.sigmoid(gate)


# -- kernels ------------------------------------------------------------------------------------
@functools.cache
def _kernels():
    """The Triton kernels, compiled on first use (importing this module needs no Triton)."""
    import triton
    import triton.language as tl

    # grid dependency control (programmatic dependent launch): PTX of sm_90 and later, so every
    # kernel issues it only under its constexpr PDL (see `pdl`)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def residual(X, D, cols, cmask, HAS_DELTA: tl.constexpr):
        # x (+ delta, rounded to x's dtype as add_rms_norm rounds it) at cols, in fp32
        x = tl.load(X + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            x = (x + tl.load(D + cols, mask=cmask, other=0.0).to(tl.float32)
                 ).to(X.dtype.element_ty).to(tl.float32)
        return x

    @triton.jit
    def gemv_input(X, D, S, Z, cols, cmask, r, eps, K: tl.constexpr, SWIGLU: tl.constexpr,
                   NORM: tl.constexpr, HAS_DELTA: tl.constexpr, GATED: tl.constexpr,
                   HD: tl.constexpr):
        # the GEMV's input at cols, in fp32, rounded where the references round it
        if GATED:
            # gated_rms_norm_kernel over the whole heads of HD elements that cols cover (cols
            # start at a head and span a multiple of HD): each head's rms, weight S, gate Z
            NB: tl.constexpr = cols.shape[0]
            o = tl.reshape(tl.load(X + cols, mask=cmask, other=0.0).to(tl.float32),
                           (NB // HD, HD))
            z = tl.reshape(tl.load(Z + cols, mask=cmask, other=0.0).to(tl.float32),
                           (NB // HD, HD))
            rms = tl.sqrt(tl.sum(o * o, 1) / HD + eps)
            n = (o / rms[:, None]).to(X.dtype.element_ty).to(tl.float32)
            w = tl.load(S + tl.arange(0, HD)).to(tl.float32)
            g = (w[None, :] * n).to(X.dtype.element_ty).to(tl.float32) * (z * tl.sigmoid(z))
            x = tl.reshape(g.to(X.dtype.element_ty).to(tl.float32), (NB,))
        elif SWIGLU:
            # swiglu_kernel's rounding points: silu(gate) rounds, then its product with up
            g = tl.load(X + cols, mask=cmask, other=0.0).to(tl.float32)
            u = tl.load(X + K + cols, mask=cmask, other=0.0).to(tl.float32)
            sg = (g * tl.sigmoid(g)).to(X.dtype.element_ty).to(tl.float32)
            x = (sg * u).to(X.dtype.element_ty).to(tl.float32)
        elif NORM:
            # the residual again (from L1/L2) and the norm's output, rounded where
            # add_rms_norm rounds it
            x = residual(X, D, cols, cmask, HAS_DELTA)
            scale = tl.load(S + cols, mask=cmask, other=0.0).to(tl.float32)
            x = (x * r * scale).to(X.dtype.element_ty).to(tl.float32)
        else:
            x = tl.load(X + cols, mask=cmask, other=0.0).to(tl.float32)
        return x

    # what the kernels call, also as this module's globals: Triton's interpreter recompiles each
    # kernel from its source against those (a kernel's closure is not seen there)
    globals().update(gdc_wait=gdc_wait, gdc_launch_dependents=gdc_launch_dependents,
                     residual=residual, gemv_input=gemv_input)

    @triton.jit
    def conv_epilogue(y, rows, rmask, CS, CW, YC, C, KC: tl.constexpr, KS: tl.constexpr):
        # conv_step_kernel for the rows of y that are conv channels (rows < C), which this
        # program alone computes: silu(conv) into YC and the conv state [KC - 1, C] shifted.
        # The products are summed in conv_step_kernel's order (one state row after the other,
        # then the new input), each rounded to the dtype.
        yr = y.to(YC.dtype.element_ty).to(tl.float32)            # the projection as stored
        cm = rmask & (rows < C)
        j = tl.arange(0, KS)
        m2 = cm[:, None] & (j < KC - 1)[None, :]
        s = tl.load(CS + j[None, :] * C + rows[:, None], mask=m2, other=0.0)
        cw = tl.load(CW + rows[:, None] * KC + j[None, :], mask=m2, other=0.0).to(tl.float32)
        prods = (s.to(tl.float32) * cw).to(YC.dtype.element_ty).to(tl.float32)
        acc = tl.zeros_like(yr)
        for jj in tl.static_range(KC - 1):
            acc += tl.sum(tl.where((j == jj)[None, :], prods, 0.0), 1)
        last = tl.load(CW + rows * KC + KC - 1, mask=cm, other=0.0).to(tl.float32)
        acc += (yr * last).to(YC.dtype.element_ty).to(tl.float32)
        out = acc.to(YC.dtype.element_ty).to(tl.float32)
        tl.store(YC + rows, (out * tl.sigmoid(out)).to(YC.dtype.element_ty), mask=cm)
        # the old state is in every thread's registers before any thread writes the new one
        tl.debug_barrier()
        tl.store(CS + (j - 1)[None, :] * C + rows[:, None], s, mask=m2 & (j >= 1)[None, :])
        tl.store(CS + (KC - 2) * C + rows, yr.to(CS.dtype.element_ty), mask=cm)

    globals().update(conv_epilogue=conv_epilogue)

    @triton.jit
    def gemv_kernel(X, W, Y, N, stride_w, D, S, R, eps, Z, CS, CW, YC, C,
                    K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWIGLU: tl.constexpr,
                    NORM: tl.constexpr, HAS_DELTA: tl.constexpr, GATED: tl.constexpr,
                    HD: tl.constexpr, CONV: tl.constexpr, KC: tl.constexpr, KS: tl.constexpr,
                    PREFETCH: tl.constexpr, KP: tl.constexpr, PDL: tl.constexpr):
        # BN rows of W per program. PREFETCH (the form for a programmatic dependent launch,
        # PDL): the program's whole [BN, K] tile of W is read before it waits for the kernel
        # before it (the weights are no output of any kernel), so the tile's read overlaps that
        # kernel's end, and the input is read after the wait; the products summed in one
        # reduction per row. Otherwise in column slices of BK: the products summed per column
        # slot first and across the slots once at the end. Either is a fixed order: the same
        # bits on every run. Nothing is written before the wait. GATED: the input is the gated
        # RMSNorm of X (heads of HD) with gate Z and weight S; CONV: rows < C are also the input
        # of a short conv (conv_epilogue).
        pid = tl.program_id(0)
        rows = pid * BN + tl.arange(0, BN)
        rmask = rows < N
        if PDL:
            gdc_launch_dependents()
        if PREFETCH:
            kcols = tl.arange(0, KP)
            w_all = tl.load(W + rows[:, None] * stride_w + kcols[None, :],
                            mask=rmask[:, None] & (kcols < K)[None, :], other=0.0)
        if PDL:
            gdc_wait()
        r = 0.0
        if NORM:
            # add_rms_norm_kernel's pass, made by every program over the whole (short) input:
            # the rounded residual x + delta (written by program 0) and its rms
            ss = tl.zeros([BK], dtype=tl.float32)
            for k0 in tl.static_range(0, K, BK):
                cols = k0 + tl.arange(0, BK)
                cmask = cols < K
                x = residual(X, D, cols, cmask, HAS_DELTA)
                if HAS_DELTA:
                    tl.store(R + cols, x.to(R.dtype.element_ty), mask=cmask & (pid == 0))
                ss += x * x
            r = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
        if PREFETCH:
            x = gemv_input(X, D, S, Z, kcols, kcols < K, r, eps, K, SWIGLU, NORM, HAS_DELTA,
                           GATED, HD)
            y = tl.sum(w_all.to(tl.float32) * x[None, :], 1)
        else:
            acc = tl.zeros([BN, BK], dtype=tl.float32)
            for k0 in tl.static_range(0, K, BK):
                cols = k0 + tl.arange(0, BK)
                cmask = cols < K
                x = gemv_input(X, D, S, Z, cols, cmask, r, eps, K, SWIGLU, NORM, HAS_DELTA,
                               GATED, HD)
                w = tl.load(W + rows[:, None] * stride_w + cols[None, :],
                            mask=rmask[:, None] & cmask[None, :], other=0.0)
                acc += w.to(tl.float32) * x[None, :]
            y = tl.sum(acc, 1)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rmask)
        if CONV:
            conv_epilogue(y, rows, rmask, CS, CW, YC, C, KC, KS)

    @triton.jit
    def add_rms_norm_kernel(X, D, H, S, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                            HAS_DELTA: tl.constexpr, ROUND_FIRST: tl.constexpr):
        # one program per row
        row = tl.program_id(0)
        X += row * N
        D += row * N
        H += row * N
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            x = (x.to(tl.float32) + tl.load(D + cols, mask=mask, other=0.0).to(tl.float32)
                 ).to(X.dtype.element_ty)
            tl.store(X + cols, x, mask=mask)
        xf = x.to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
        scale = tl.load(S + cols, mask=mask, other=0.0).to(tl.float32)
        if ROUND_FIRST:
            h = (xf * r).to(H.dtype.element_ty).to(tl.float32) * scale
        else:
            h = xf * r * scale
        tl.store(H + cols, h.to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def rope_heads_kernel(X, COS, SIN, OUT, sx_t, sx_h, so_t, so_h, GROUPS: tl.constexpr,
                          D: tl.constexpr, BLOCK: tl.constexpr, ROTATE: tl.constexpr):
        # one program per (row, output head); output head h reads input head h // GROUPS
        t = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK)
        mask = d < D
        src = X + t * sx_t + (h // GROUPS) * sx_h
        x = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
        if ROTATE:
            xr = tl.load(src + (d + D // 2) % D, mask=mask, other=0.0).to(tl.float32)
            c = tl.load(COS + t * D + d, mask=mask, other=0.0)
            s = tl.load(SIN + t * D + d, mask=mask, other=0.0)
            x = x * c + xr * s
        tl.store(OUT + t * so_t + h * so_h + d, x.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def conv_step_kernel(X, CS, W, Y, C, K: tl.constexpr, BLOCK: tl.constexpr):
        c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = c < C
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K - 1):
            s = tl.load(CS + j * C + c, mask=mask, other=0.0)
            prod = (s.to(tl.float32) * tl.load(W + c * K + j, mask=mask, other=0.0).to(tl.float32))
            acc += prod.to(X.dtype.element_ty).to(tl.float32)
            if j > 0:
                tl.store(CS + (j - 1) * C + c, s, mask=mask)
        x = tl.load(X + c, mask=mask, other=0.0)
        prod = x.to(tl.float32) * tl.load(W + c * K + K - 1, mask=mask, other=0.0).to(tl.float32)
        acc += prod.to(X.dtype.element_ty).to(tl.float32)
        tl.store(CS + (K - 2) * C + c, x, mask=mask)
        y = acc.to(X.dtype.element_ty).to(tl.float32)
        tl.store(Y + c, (y * tl.sigmoid(y)).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def conv_rows_kernel(X, CS, W, Y, T, C, x_stride, S1, S2, K: tl.constexpr,
                         BT: tl.constexpr, BC: tl.constexpr):
        # a tile of BT tokens x BC channels; input row t + j of [conv state | X] is a state row
        # while r < 0. The rounding points of conv_step_kernel (each product rounds to the dtype).
        # Output channel c < S1 goes to the first [T, S1] part of Y, c < S2 to the second
        # [T, S2 - S1], the rest to the third: three contiguous tensors in one buffer.
        c = tl.program_id(0) * BC + tl.arange(0, BC)
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        cmask = c < C
        tmask = t < T
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(K):
            r = t + j - (K - 1)
            m = tmask[:, None] & cmask[None, :]
            xv = tl.load(X + r[:, None] * x_stride + c[None, :], mask=m & (r >= 0)[:, None],
                         other=0.0)
            sv = tl.load(CS + (r + K - 1)[:, None] * C + c[None, :], mask=m & (r < 0)[:, None],
                         other=0.0)
            x = tl.where((r >= 0)[:, None], xv, sv).to(tl.float32)
            w = tl.load(W + c * K + j, mask=cmask, other=0.0).to(tl.float32)
            acc += (x * w[None, :]).to(X.dtype.element_ty).to(tl.float32)
        y = acc.to(X.dtype.element_ty).to(tl.float32)
        out = (y * tl.sigmoid(y)).to(Y.dtype.element_ty)
        part = tl.where(c < S1, 0, tl.where(c < S2, 1, 2))
        base = tl.where(part == 0, 0, tl.where(part == 1, T * S1, T * S2))
        width = tl.where(part == 0, S1, tl.where(part == 1, S2 - S1, C - S2))
        col = c - tl.where(part == 0, 0, tl.where(part == 1, S1, S2))
        tl.store(Y + base[None, :] + t[:, None] * width[None, :] + col[None, :], out,
                 mask=tmask[:, None] & cmask[None, :])

    @triton.jit
    def gated_rms_norm_kernel(O, Z, W, Y, eps, z_stride, n_rows, HV, D: tl.constexpr,
                              BLOCK: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
        # ROWS rows of [T * H, D] per program; z's rows are those of a [T, H, D] view whose
        # token stride is z_stride (a column slice of the input projection); PDL: the GEMV after
        # it may start
        if PDL:
            gdc_launch_dependents()
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
        o = tl.load(O + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rms = tl.sqrt(tl.sum(o * o, 1) / D + eps)
        n = (o / rms[:, None]).to(Y.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        y = (w[None, :] * n).to(Y.dtype.element_ty)
        z_rows = Z + (rows // HV) * z_stride + (rows % HV) * D
        z = tl.load(z_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = y.to(tl.float32) * (z * tl.sigmoid(z))
        tl.store(Y + rows[:, None] * D + cols[None, :], out.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def gdn_step_kernel(Q, K_, V, A, B, ALOG, DTB, S, O, scale, eps, G: tl.constexpr,
                        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        # one value head and BV columns of its state per program; the state block stays in
        # registers from its load through the decay, the delta update and the read-out
        hv = tl.program_id(0)
        hk = hv // G
        kk = tl.arange(0, BK)
        km = kk < DK
        vv = tl.program_id(1) * BV + tl.arange(0, BV)
        vm = vv < DV
        q = tl.load(Q + hk * DK + kk, mask=km, other=0.0).to(tl.float32)
        k = tl.load(K_ + hk * DK + kk, mask=km, other=0.0).to(tl.float32)
        q = q * (1.0 / tl.sqrt(tl.sum(q * q, 0) + eps)) * scale
        k = k * (1.0 / tl.sqrt(tl.sum(k * k, 0) + eps))
        x = tl.load(A + hv).to(tl.float32) + tl.load(DTB + hv).to(tl.float32)
        softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))     # torch's threshold
        decay = tl.exp(-tl.exp(tl.load(ALOG + hv).to(tl.float32)) * softplus)
        beta = tl.sigmoid(tl.load(B + hv).to(tl.float32))
        s_at = S + hv * DK * DV + kk[:, None] * DV + vv[None, :]
        sm = km[:, None] & vm[None, :]
        s = tl.load(s_at, mask=sm, other=0.0) * decay
        v = tl.load(V + hv * DV + vv, mask=vm, other=0.0).to(tl.float32)
        u = beta * (v - tl.sum(k[:, None] * s, 0))                     # beta (v - S^T k)
        s = s + k[:, None] * u[None, :]                                # S += k u^T
        tl.store(s_at, s, mask=sm)
        o = tl.sum(q[:, None] * s, 0)
        tl.store(O + hv * DV + vv, o.to(O.dtype.element_ty), mask=vm)

    @triton.jit
    def swiglu_kernel(GU, Y, F_, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        t = tl.program_id(1)                        # the row: GU is [T, 2F], Y [T, F]
        GU += t * 2 * F_
        Y += t * F_
        mask = i < F_
        g = tl.load(GU + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + F_ + i, mask=mask, other=0.0).to(tl.float32)
        s = (g * tl.sigmoid(g)).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(Y + i, (s * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def attention_prep_kernel(P, QS, COS, SIN, KV, META, Q, eps, kv_row_stride,
                              H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                              ROT: tl.constexpr, BLOCK: tl.constexpr):
        # one program per row of [q heads | k heads]; the k programs also copy their v row
        r = tl.program_id(0)
        d = tl.arange(0, BLOCK)
        mask = d < D
        half = ROT // 2
        partner = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)
        rot_mask = mask & (d < ROT)
        if r < H:
            base = r * 2 * D
        else:
            base = 2 * H * D + (r - H) * D
        x = tl.load(P + base + d, mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(P + base + partner, mask=rot_mask, other=0.0).to(tl.float32)
        rs = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        y = (x * rs * tl.load(QS + r * D + d, mask=mask, other=0.0)).to(Q.dtype.element_ty)
        yp = (xp * rs * tl.load(QS + r * D + partner, mask=rot_mask, other=0.0)
              ).to(Q.dtype.element_ty)
        pos = tl.load(META)                          # META_POSITION = 0
        c = tl.load(COS + pos * D + d, mask=mask, other=1.0).to(tl.float32)
        s = tl.load(SIN + pos * D + d, mask=mask, other=0.0).to(tl.float32)
        a = (y.to(tl.float32) * c).to(Q.dtype.element_ty).to(tl.float32)
        b = (tl.where(d < ROT, sign * yp.to(tl.float32), 0.0) * s).to(Q.dtype.element_ty)
        out = (a + b.to(tl.float32)).to(Q.dtype.element_ty)
        if r < H:
            tl.store(Q + r * D + d, out, mask=mask)
        else:
            j = r - H
            row = KV + pos * kv_row_stride
            tl.store(row + j * D + d, out, mask=mask)                           # k
            v = tl.load(P + 2 * H * D + HKV * D + j * D + d, mask=mask, other=0.0)
            tl.store(row + HKV * D + j * D + d, v, mask=mask)                   # v

    @triton.jit
    def decode_attention_split_kernel(Q, KV, META, OP, MP, LP, kv_row_stride, sm_scale,
                                      NSPLIT, G: tl.constexpr, GP: tl.constexpr,
                                      HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                                      SPLIT_: tl.constexpr, TILE_: tl.constexpr,
                                      IEEE: tl.constexpr):
        j, s = tl.program_id(0), tl.program_id(1)
        L = tl.load(META).to(tl.int32) + 1           # rows 0..position (META_POSITION = 0)
        g = tl.arange(0, GP)
        d = tl.arange(0, BLOCK_D)
        gmask = g < G
        dmask = d < D
        part = (j * NSPLIT + s) * GP
        start = s * SPLIT_
        # a split past the live rows runs no tile and leaves (m, l) = (-inf, 0); the combine
        # reads only the splits below the length
        q = tl.load(Q + (j * G + g)[:, None] * D + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)            # [GP, BLOCK_D]
        m = tl.full([GP], float("-inf"), tl.float32)
        l_ = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, BLOCK_D], tl.float32)
        end = tl.minimum(start + SPLIT_, L)
        for t0 in range(start, end, TILE_):
            t = t0 + tl.arange(0, TILE_)
            tmask = t < end
            kmask = tmask[:, None] & dmask[None, :]
            rows = KV + t[:, None] * kv_row_stride + d[None, :]
            k = tl.load(rows + j * D, mask=kmask, other=0.0)                     # [TILE, BLOCK_D]
            v = tl.load(rows + (HKV + j) * D, mask=kmask, other=0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = tl.where(tmask[None, :], sc * sm_scale, float("-inf"))         # [GP, TILE]
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp(m - m_new)
            pr = tl.exp(sc - m_new[:, None])
            l_ = l_ * alpha + tl.sum(pr, 1)
            if IEEE:
                pv = tl.dot(pr, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(pr.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        tl.store(MP + part + g, m)
        tl.store(LP + part + g, l_)
        tl.store(OP + (part + g)[:, None] * BLOCK_D + d[None, :], acc)

    @triton.jit
    def decode_attention_combine_kernel(OP, MP, LP, GATE, META, OUT, NSPLIT,
                                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                                        BLOCK_D: tl.constexpr, SPLIT_: tl.constexpr,
                                        PDL: tl.constexpr):
        if PDL:             # the o_proj GEMV after it may start
            gdc_launch_dependents()
        h = tl.program_id(0)
        j, gi = h // G, h % G
        L = tl.load(META).to(tl.int32) + 1
        n = (L + SPLIT_ - 1) // SPLIT_
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        one = tl.arange(0, 1)
        m = tl.full([1], float("-inf"), tl.float32)
        for s in range(0, n):
            m = tl.maximum(m, tl.load(MP + (j * NSPLIT + s) * GP + gi + one))
        l_ = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s in range(0, n):
            part = (j * NSPLIT + s) * GP + gi
            w = tl.exp(tl.load(MP + part + one) - m)
            l_ += w * tl.load(LP + part + one)
            acc += w * tl.load(OP + part * BLOCK_D + d)
        o = (acc / l_).to(OUT.dtype.element_ty).to(tl.float32)
        gate = tl.load(GATE + h * 2 * D + d, mask=dmask, other=0.0).to(tl.float32)
        sg = tl.sigmoid(gate).to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + h * D + d, (o * sg).to(OUT.dtype.element_ty), mask=dmask)

    return dict(gemv=gemv_kernel, add_rms_norm=add_rms_norm_kernel, conv_step=conv_step_kernel,
                conv_rows=conv_rows_kernel, gdn_step=gdn_step_kernel,
                gated_rms_norm=gated_rms_norm_kernel,
                swiglu=swiglu_kernel, rope_heads=rope_heads_kernel,
                attention_prep=attention_prep_kernel,
                decode_attention_split=decode_attention_split_kernel,
                decode_attention_combine=decode_attention_combine_kernel)


# -- launchers: same arguments as the references ------------------------------------------------
# gemv tiles, from `bench/bench_kernels.py --sweep` on an H200 (hybrid-0.8b shapes): a wide
# matrix (4096 <= N < 65536 outputs) in 8 rows x 256 columns per program, any other (the
# projections back to d_model, a vocabulary) in 2 rows x up to 2048 columns
GEMV_WIDE = (4096, 65536)


def gemv_config(N: int, K: int) -> tuple[int, int]:
    """(BN, BK) of `gemv` for a [N, K] matrix: fixed by the shape (no autotuning), so a plan's
    rounding is the same in every process."""
    if GEMV_WIDE[0] <= N < GEMV_WIDE[1]:
        return 8, min(256, _pow2(K))
    return 2, min(2048, _pow2(K))


# Programmatic dependent launch (Hopper and later): a GEMV is launched while the kernel before
# it still runs, reads its weight tile (at most GEMV_PREFETCH elements per program, else it only
# waits), then waits for that kernel's end and writes; the kernels before a GEMV in a step
# release it at their start. FLASHRT_PDL=0 launches every GEMV plainly, after the kernel before.
GEMV_PREFETCH = 8192


@functools.cache
def pdl(device: torch.device) -> bool:
    """Whether `gemv` and `norm_gemv` launch with programmatic dependent launch on `device`:
    compute capability 9.0 or later (the grid dependency control instructions are sm_90 PTX;
    an older GPU, such as a Jetson Orin, compiles the kernels without them)."""
    if os.environ.get("FLASHRT_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def gdn_fusion() -> bool:
    """Whether a Gated DeltaNet layer's step computes its conv inside the in-projection's GEMV
    (norm_gemv_conv) and its gated norm inside the out-projection's (gated_norm_gemv): five
    kernels a layer instead of seven. Off unless FLASHRT_GDN_FUSION=1: the kernels are held to
    their references in Triton's interpreter and compile for every target, but are not yet
    measured on a GPU. Read when a plan is first traced (a captured plan keeps its kernels)."""
    return os.environ.get("FLASHRT_GDN_FUSION", "0") == "1"


def _gemv_form(device, w, config, prefetch) -> tuple[int, int, bool]:
    """(BN, BK, prefetch) of gemv_kernel for matrix w on `device`: `config` or gemv_config's
    tile, and the whole-tile form where PDL launches the GEMV and the tile fits GEMV_PREFETCH
    (`prefetch` None), else as given."""
    N, K = w.shape
    bn, bk = config or gemv_config(N, K)
    if prefetch is None:
        prefetch = pdl(device) and bn * _pow2(K) <= GEMV_PREFETCH
    return bn, bk, prefetch


def _gemv(x, w, delta, scale, residual, eps, config, prefetch, swiglu=False, norm=False,
          gate=None, conv=None):
    """Launch gemv_kernel for `gemv`, `norm_gemv`, `norm_gemv_conv` and `gated_norm_gemv` -> y
    [N] (conv (state, weight): (y, silu(conv)) with the state shifted)."""
    N, K = w.shape
    y = x.new_empty(N)
    bn, bk, prefetch = _gemv_form(x.device, w, config, prefetch)
    launch = pdl(x.device)
    conv_state, conv_weight = conv if conv is not None else (x, x)
    C, KC = conv_weight.shape if conv is not None else (0, 2)
    yc = x.new_empty(C) if conv is not None else x
    _kernels()["gemv"][(triton_cdiv(N, bn),)](
        x, w, y, N, w.stride(0), x if delta is None else delta, scale, residual, eps,
        x if gate is None else gate, conv_state, conv_weight, yc, C, K=K, BN=bn, BK=bk,
        SWIGLU=swiglu, NORM=norm, HAS_DELTA=delta is not None, GATED=gate is not None,
        HD=scale.shape[0] if gate is not None else 1, CONV=conv is not None, KC=KC,
        KS=_pow2(KC - 1), PREFETCH=prefetch, KP=_pow2(K), PDL=launch, num_warps=4,
        launch_pdl=launch)
    return (y, yc) if conv is not None else y


def gemv(x, w, config: tuple[int, int] | None = None, swiglu: bool = False,
         prefetch: bool | None = None):
    """Fused `gemv_reference`: x contiguous [K] ([2K] with swiglu), w [N, K] with unit column
    stride. `config` (BN, BK) overrides gemv_config (bench/bench_kernels.py compares tiles);
    `prefetch` overrides the choice of the whole-tile form (None: the device's, see `pdl`)."""
    return _gemv(x, w, None, x, x, 0.0, config, prefetch, swiglu=swiglu)


def norm_gemv(x, delta, scale, eps, w, config: tuple[int, int] | None = None,
              prefetch: bool | None = None):
    """Fused `norm_gemv_reference`, one kernel for the residual add, the RMSNorm after it and the
    projection that reads the norm: x, delta contiguous [K] (delta None: no add), scale [K] fp32,
    w [N, K] -> (x + delta in a new tensor, y [N]). x itself is not written: every program reads
    it whole for the rms while the first one writes the sum."""
    residual = x if delta is None else torch.empty_like(x)
    return residual, _gemv(x, w, delta, scale, residual, eps, config, prefetch, norm=True)


def norm_gemv_conv(x, delta, scale, eps, w, conv_state, conv_weight,
                   config: tuple[int, int] | None = None, prefetch: bool | None = None):
    """Fused `norm_gemv_conv_reference`: `norm_gemv`, and the short conv + silu of the first C
    outputs (conv_weight [C, KC], conv_state contiguous [KC - 1, C], shifted in place) in the same
    kernel: the program that computes an output channel also convolves it -> (x + delta, y [N],
    silu(conv) [C])."""
    residual = x if delta is None else torch.empty_like(x)
    y, yc = _gemv(x, w, delta, scale, residual, eps, config, prefetch, norm=True,
                  conv=(conv_state, conv_weight))
    return residual, y, yc


def gated_norm_fits(o: torch.Tensor, w: torch.Tensor, config: tuple[int, int] | None = None,
                    prefetch: bool | None = None) -> bool:
    """Whether `gated_norm_gemv` computes the gated norm inside the GEMV for heads o [H, D]: D a
    power of two that divides the GEMV's column slices (whole heads in each)."""
    D = o.shape[-1]
    _, bk, prefetch = _gemv_form(o.device, w, config, prefetch)
    return D == _pow2(D) and (prefetch or D <= bk)


def gated_norm_gemv(o, z, weight, eps, w, config: tuple[int, int] | None = None,
                    prefetch: bool | None = None):
    """Fused `gated_norm_gemv_reference`: the DeltaNet output norm computed as the out
    projection's GEMV reads its input; o contiguous [H, D], z [H, D] contiguous, weight [D],
    w [N, H * D] -> y [N]. Heads that don't fit (`gated_norm_fits`) take gated_rms_norm, then
    gemv."""
    if not gated_norm_fits(o, w, config, prefetch):
        return gemv(gated_rms_norm(o, z, weight, eps).view(-1), w, config, prefetch=prefetch)
    return _gemv(o.view(-1), w, None, weight, o, eps, config, prefetch, gate=z)


def add_rms_norm(x, delta, scale, eps, round_first: bool = False):
    """Fused `add_rms_norm_reference`; x contiguous [N] or [T, N] (updated in place when delta
    is given), delta contiguous like x."""
    N = x.shape[-1]
    h = torch.empty_like(x)
    _kernels()["add_rms_norm"][(x.numel() // N,)](x, x if delta is None else delta, h, scale, eps,
                                                  N=N, BLOCK=_pow2(N), HAS_DELTA=delta is not None,
                                                  ROUND_FIRST=round_first, num_warps=4)
    return x, h


def rope_heads(x, table, out, groups: int = 1):
    """Fused `rope_heads_reference`; x and out with unit stride along D (any row and head
    strides: a slice of a projection's output, a slice of the KV cache), table's cos and sin
    contiguous [T, 1, D] fp32."""
    T, hs, D = x.shape
    assert out.shape == (T, hs * groups, D) and x.stride(2) == 1 and out.stride(2) == 1
    cos, sin = (out, out) if table is None else table
    _kernels()["rope_heads"][(T, hs * groups)](x, cos, sin, out, x.stride(0), x.stride(1),
                                               out.stride(0), out.stride(1), GROUPS=groups, D=D,
                                               BLOCK=_pow2(D), ROTATE=table is not None,
                                               num_warps=1)
    return out


def conv_step(x, conv_state, weight):
    """Fused `conv_step_reference`."""
    C, K = weight.shape
    y = torch.empty_like(x)
    block = 512
    _kernels()["conv_step"][(triton_cdiv(C, block),)](x, conv_state, weight, y, C, K=K,
                                                      BLOCK=block, num_warps=4)
    return y


def conv_rows(x, conv_state, weight, sizes):
    """Fused `conv_rows_reference`; x [T, C] with unit column stride (a column slice of the input
    projection), conv_state contiguous, sizes: three channel counts summing to C."""
    C, K = weight.shape
    T = x.shape[0]
    s1, s2, s3 = sizes
    assert s1 + s2 + s3 == C, (sizes, C)
    y = x.new_empty(T * C)
    bt, bc = 16, 128
    _kernels()["conv_rows"][(triton_cdiv(C, bc), triton_cdiv(T, bt))](
        x, conv_state, weight, y, T, C, x.stride(0), s1, s1 + s2, K=K, BT=bt, BC=bc,
        num_warps=4)
    # the state: the last K-1 inputs (after the kernel has read the old ones: stream order)
    if T >= K - 1:
        conv_state.copy_(x[T - (K - 1):])
    else:
        conv_state.copy_(torch.cat([conv_state, x], dim=0)[T:])
    return (y[:T * s1].view(T, s1), y[T * s1:T * (s1 + s2)].view(T, s2),
            y[T * (s1 + s2):].view(T, s3))


def gdn_step(q, k, v, a, b, A_log, dt_bias, state, scale, eps):
    """Fused `gdn_step_reference` (eps: the L2 norm's, kernels.L2NORM_EPS); every tensor
    contiguous. In fla's launch shape: 8 state columns and one warp per program."""
    Hk, DK = q.shape
    Hv, DV = v.shape
    o = torch.empty_like(v)
    bv = min(8, _pow2(DV))
    _kernels()["gdn_step"][(Hv, triton_cdiv(DV, bv))](q, k, v, a, b, A_log, dt_bias, state, o,
                                                       scale, eps, G=Hv // Hk, DK=DK, DV=DV,
                                                       BK=_pow2(DK), BV=bv, num_warps=1)
    return o


def gated_rms_norm(o, z, weight, eps):
    """Fused `gated_rms_norm_reference`; o contiguous [T, H, D] or [H, D]; z of o's shape with
    unit stride within a token's [H, D] (its token stride may differ)."""
    D = o.shape[-1]
    H = o.shape[-2]
    y = torch.empty_like(o)
    z_stride = z.stride(0) if z.dim() == 3 else H * D
    n = o.numel() // D
    # a step's few rows one per program (as many programs as heads); a chunk's thousands
    # GATED_NORM_ROWS per program: one row of D elements per program leaves the launch and the
    # scheduling of tens of thousands of programs as the cost
    rows = 1 if n < 1024 else GATED_NORM_ROWS
    _kernels()["gated_rms_norm"][(triton_cdiv(n, rows),)](
        o, z, weight, y, eps, z_stride, n, H, D=D, BLOCK=_pow2(D), ROWS=rows, PDL=pdl(o.device),
        num_warps=1 if rows == 1 else 4)
    return y


def swiglu(gate_up):
    """Fused `swiglu_reference`; gate_up contiguous."""
    F_ = gate_up.shape[-1] // 2
    y = gate_up.new_empty(*gate_up.shape[:-1], F_)
    block = 1024
    _kernels()["swiglu"][(triton_cdiv(F_, block), gate_up.numel() // (2 * F_))](
        gate_up, y, F_, BLOCK=block, num_warps=4)
    return y


def attention_prep(p, qk_scale, eps, rotary, kv, meta, H, Hkv, D):
    """Fused `attention_prep_reference` (the rotation is rotary.rotate's, by index: the first
    rotary.dim dims rotate half against half); kv's rows hold [k heads | v heads] contiguously."""
    q = p.new_empty(H, D)
    _kernels()["attention_prep"][(H + Hkv,)](p, qk_scale, rotary.cos, rotary.sin, kv, meta, q,
                                            eps, kv.stride(0), H=H, HKV=Hkv, D=D, ROT=rotary.dim,
                                            BLOCK=_pow2(D), num_warps=1)
    return q


def decode_attention(q, gate, kv, meta):
    """Fused `decode_attention_reference`; gate: [H, D] view with row stride 2D (q_proj's
    per-head query | gate layout)."""
    H, D = q.shape
    max_ctx, Hkv = kv.shape[0], kv.shape[2]
    G = H // Hkv
    GP = max(16, _pow2(G))               # tl.dot needs 16 rows: the padding rows are masked
    BD = max(16, _pow2(D))
    nsplit = triton_cdiv(max_ctx, SPLIT)
    op = torch.empty(Hkv * nsplit * GP, BD, dtype=torch.float32, device=q.device)
    mp = torch.empty(Hkv * nsplit * GP, dtype=torch.float32, device=q.device)
    lp = torch.empty_like(mp)
    k = _kernels()
    fp32 = q.dtype == torch.float32
    k["decode_attention_split"][(Hkv, nsplit)](
        q, kv, meta, op, mp, lp, kv.stride(0), D ** -0.5, nsplit, G=G, GP=GP, HKV=Hkv, D=D,
        BLOCK_D=BD, SPLIT_=SPLIT, TILE_=TILE // 2 if fp32 else TILE, IEEE=fp32, num_warps=4,
        num_stages=2 if fp32 else 3)
    out = q.new_empty(H, D)
    k["decode_attention_combine"][(H,)](op, mp, lp, gate, meta, out, nsplit, G=G, GP=GP, D=D,
                                        BLOCK_D=BD, SPLIT_=SPLIT, PDL=pdl(q.device),
                                        num_warps=1)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
