"""Attention of a prefill chunk over the KV cache, the position read from the arena on the device.

The static (graph) form of a prefill chunk reads its position from `meta`, so one captured plan
per chunk length serves every position. Its attention must then cover a prefix whose length the
host does not know at capture time. The torch form (modeling_qwen3_5.Attention) attends over all
`max_context` rows under a mask: for a 4096-token chunk of hybrid-0.8b at a 16k context that is a
[Hkv, G*T, max_context] fp32 score matrix (2 GiB per layer) and the full-length matmuls. This
kernel is flash attention over the live rows only: query t of the chunk (at position + t) attends
to rows 0..position+t, tiles past the last query's row are never read, and the length is loaded
from `meta` inside the kernel, as core/fused.py's decode_attention does for one row.

    prefill_attention   sigmoid(gate) * softmax(q k^T / sqrt(D), causal at the position) v for
                        T query rows; the G query heads of a KV head are folded into the rows of
                        one program (row r = token r // G, head r % G), so each KV tile is read
                        once for all of them; the output gate as in decode_attention. A short
                        chunk has too few row blocks to fill the GPU: its KV rows are split
                        among programs as well (flash-decoding, `prefill_attention_splits`),
                        and a second kernel combines the splits and applies the gate

The chunk's own K and V rows are written to the cache before the call (the model's index_copy),
so the chunk attends to itself through the cache like to any earlier row. The GDN layers' chunked
kernel needs nothing of the kind: its state is the arena's and it is position-independent.

The tile sizes are fixed per shape (`prefill_attention_config`, no autotuning): a plan's rounding
is then the same in every process. Only for CUDA tensors with Triton importable (core/fused.py's
`available()`); test_runtime_gpu.py holds the kernel to `prefill_attention_reference`.
"""
from __future__ import annotations

import functools

import torch

from flashrt_ros.core.arena import META_POSITION


def prefill_attention_reference(q, gate, kv, meta):
    """q: [T, H, D] the chunk's queries (normed, rotated); gate: [T, H, D] the output gate; kv:
    [max_ctx, 2, Hkv, D] one layer's KV with the chunk's rows written at position..position+T-1;
    meta: the arena's int64 meta -> sigmoid(gate) * attention, [T, H, D] in q's dtype, query t
    attending to the rows 0..position+t. Scores and softmax in fp32; the attention output rounds
    to q's dtype, then sigmoid(gate), then their product (the model's rounding points)."""
    p = int(meta[META_POSITION])
    T, H, D = q.shape
    Hkv = kv.shape[2]
    G = H // Hkv
    L = p + T
    keys, vals = kv[:L, 0].float(), kv[:L, 1].float()                       # [L, Hkv, D]
    scores = torch.einsum("tjgd,ljd->jgtl", q.float().view(T, Hkv, G, D), keys) * D ** -0.5
    rows = torch.arange(L, device=q.device)
    visible = rows[None, :] <= p + torch.arange(T, device=q.device)[:, None]  # [T, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    o = torch.einsum("jgtl,ljd->tjgd", torch.softmax(scores, dim=-1), vals)
    return o.reshape(T, H, D).to(q.dtype) * torch.sigmoid(gate)


@functools.cache
def _kernels():
    """The Triton kernels, compiled on first use (importing this module needs no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def prefill_attention_kernel(Q, GATE, KV, META, OUT, OP, MP, LP, T, q_stride_t, q_stride_h,
                                 g_stride_t, g_stride_h, kv_row_stride, qk_scale, NSPLIT, ROWS,
                                 G: tl.constexpr, H: tl.constexpr,
                                 HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 SPLIT: tl.constexpr, IEEE: tl.constexpr):
        # one program per BLOCK_M rows of (token, query head of KV head j) and KV split s;
        # qk_scale folds log2(e) into 1/sqrt(D), so the softmax runs on exp2
        j, s = tl.program_id(1), tl.program_id(2)
        rr = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)     # row within KV head j
        t = rr // G
        h = j * G + rr % G
        rmask = t < T
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        pos = tl.load(META).to(tl.int32)             # META_POSITION = 0
        q = tl.load(Q + t[:, None] * q_stride_t + h[:, None] * q_stride_h + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)           # [BLOCK_M, BLOCK_D]
        last = pos + tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M - 1, T * G - 1) // G
        # this split's share of the pos + T live rows (whole tiles), up to the last row a query
        # of this block sees; a split past it runs no tile and leaves (m, l) = (-inf, 0)
        split_rows = tl.cdiv(tl.cdiv(pos + T, NSPLIT), BLOCK_N) * BLOCK_N
        start = s * split_rows
        stop = tl.minimum(start + split_rows, last + 1)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_ = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(start, stop, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < stop
            kvmask = nmask[:, None] & dmask[None, :]
            rows = KV + n[:, None] * kv_row_stride + d[None, :]
            k = tl.load(rows + j * D, mask=kvmask, other=0.0)                   # [BLOCK_N, BLOCK_D]
            v = tl.load(rows + (HKV + j) * D, mask=kvmask, other=0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            visible = (n[None, :] <= (pos + t)[:, None]) & nmask[None, :]      # causal
            sc = tl.where(visible, sc * qk_scale, float("-inf"))               # [BLOCK_M, BLOCK_N]
            m_new = tl.maximum(m, tl.max(sc, 1))
            # a row that has seen no row yet (a split past its position) keeps m = -inf: shift
            # by 0 there, so that its terms are exp2(-inf) = 0 rather than NaN
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - shift)
            pr = tl.exp2(sc - shift[:, None])
            l_ = l_ * alpha + tl.sum(pr, 1)
            if IEEE:
                pv = tl.dot(pr, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(pr.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        if SPLIT:
            # the split's unnormalised state, combined by prefill_attention_combine_kernel
            part = (j * NSPLIT + s) * ROWS + rr
            tl.store(MP + part, m)
            tl.store(LP + part, l_)
            tl.store(OP + part[:, None] * BLOCK_D + d[None, :], acc)
        else:
            # one split: every row saw row 0, so l > 0
            o = (acc / l_[:, None]).to(OUT.dtype.element_ty).to(tl.float32)
            omask = rmask[:, None] & dmask[None, :]
            gate = tl.load(GATE + t[:, None] * g_stride_t + h[:, None] * g_stride_h + d[None, :],
                           mask=omask, other=0.0).to(tl.float32)
            sg = tl.sigmoid(gate).to(OUT.dtype.element_ty).to(tl.float32)
            tl.store(OUT + (t[:, None] * H + h[:, None]) * D + d[None, :],
                     (o * sg).to(OUT.dtype.element_ty), mask=omask)

    @triton.jit
    def prefill_attention_combine_kernel(OP, MP, LP, GATE, OUT, g_stride_t, g_stride_h, NSPLIT,
                                         ROWS, G: tl.constexpr, H: tl.constexpr,
                                         D: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program per (token, query head); split 0 holds row 0, seen by every query, so
        # the maximum is finite and splits that saw nothing weigh exp2(-inf) = 0
        i = tl.program_id(0)
        t, h = i // H, i % H
        j = h // G
        rr = t * G + h % G
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        one = tl.arange(0, 1)
        m = tl.full([1], float("-inf"), tl.float32)
        for s in range(0, NSPLIT):
            m = tl.maximum(m, tl.load(MP + (j * NSPLIT + s) * ROWS + rr + one))
        l_ = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s in range(0, NSPLIT):
            part = (j * NSPLIT + s) * ROWS + rr
            w = tl.exp2(tl.load(MP + part + one) - m)
            l_ += w * tl.load(LP + part + one)
            acc += w * tl.load(OP + part * BLOCK_D + d)
        o = (acc / l_).to(OUT.dtype.element_ty).to(tl.float32)
        gate = tl.load(GATE + t * g_stride_t + h * g_stride_h + d, mask=dmask,
                       other=0.0).to(tl.float32)
        sg = tl.sigmoid(gate).to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + i * D + d, (o * sg).to(OUT.dtype.element_ty), mask=dmask)

    return prefill_attention_kernel, prefill_attention_combine_kernel


# A launch should fill the GPU: a short chunk has few row blocks, so its live KV rows are split
# among programs (flash-decoding) until there are about PROGRAMS of them, each split at least
# MIN_SPLIT_ROWS rows of a full arena. A fixed count, not the GPU's SM count: the rounding is then
# the same on every GPU.
PROGRAMS = 128
MIN_SPLIT_ROWS = 256


def prefill_attention_config(rows: int, D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for `rows` = T * G folded query rows of head
    dim D, fixed by the shape (one captured plan serves every position). Half-precision tiles
    for the tensor cores, two stages, from bench/bench_prefill_attention.py on an H100
    (hybrid-0.8b, head dim 256; docs/benchmarks.md): a long chunk (a 4096-token bucket) in
    128 x 64 tiles, 8 warps (1.31 ms at position 12288, 128 x 32 took 1.69); a middle one in
    64 x 64, 4 warps; a chunk of <= 64 rows in 128 x 32, 8 warps (its rows are few, its KV
    splits many). fp32 (exact dot products, tiny models) in small tiles."""
    if dtype == torch.float32:
        return 32, 32, 4, 1
    if rows <= 64:
        return 128, 32, 8, 2
    if rows <= 4096:
        return 64, 64, 4, 2
    return 128, 64, 8, 2


def prefill_attention_splits(blocks: int, max_ctx: int) -> int:
    """How many splits the live KV rows take in a launch of `blocks` row blocks (x KV heads) over
    a cache of max_ctx rows: fixed by the shapes, so one captured plan serves every position; the
    kernel divides the live rows (position + T, read from meta) among them."""
    return max(1, min(-(-PROGRAMS // blocks), max_ctx // MIN_SPLIT_ROWS))


def prefill_attention(q, gate, kv, meta, config: tuple | None = None):
    """Fused `prefill_attention_reference` -> [T, H, D] contiguous. q, gate: [T, H, D] with unit
    stride in D (views of the projection are fine); kv: one layer's view of the arena's KV, rows
    [k heads | v heads] contiguous. `config` overrides prefill_attention_config (a benchmark
    compares tiles)."""
    T, H, D = q.shape
    max_ctx, Hkv = kv.shape[0], kv.shape[2]
    G = H // Hkv
    assert q.stride(2) == 1 and gate.stride(2) == 1 and kv.stride(3) == 1, "unit stride in D"
    bm, bn, warps, stages = config or prefill_attention_config(T * G, D, q.dtype)
    bd = max(16, 1 << (D - 1).bit_length())
    blocks = -(-T * G // bm)
    nsplit = prefill_attention_splits(blocks * Hkv, max_ctx)
    rows = blocks * bm
    out = q.new_empty(T, H, D)
    if nsplit > 1:
        op = torch.empty(Hkv * nsplit * rows, bd, dtype=torch.float32, device=q.device)
        mp = torch.empty(Hkv * nsplit * rows, dtype=torch.float32, device=q.device)
        lp = torch.empty_like(mp)
    else:
        op = mp = lp = out                   # not written
    attend, combine = _kernels()
    attend[(blocks, Hkv, nsplit)](
        q, gate, kv, meta, out, op, mp, lp, T, q.stride(0), q.stride(1), gate.stride(0),
        gate.stride(1), kv.stride(0), D ** -0.5 * 1.4426950408889634, nsplit, rows,
        G=G, H=H, HKV=Hkv, D=D, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, SPLIT=nsplit > 1,
        IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
    if nsplit > 1:
        combine[(T * H,)](op, mp, lp, gate, out, gate.stride(0), gate.stride(1), nsplit, rows,
                          G=G, H=H, D=D, BLOCK_D=bd, num_warps=1)
    return out
