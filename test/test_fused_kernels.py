"""core/fused.py's kernels against their torch references, on the GPU and, where Triton is
installed, on the CPU through Triton's interpreter (kernel_cases.py): the same cases, the largest
shapes on the GPU only.

The attention kernels read their loop bounds from a tensor on the device (the live length in the
arena's meta), which Triton's interpreter cannot run: decode attention is tested here on the GPU
only, prefill attention in test_runtime_gpu.py.
"""
import pytest
import torch

from flashrt_ros.core import fused, kernels
from kernel_cases import FUSED_TOL, GEMV_TOL, device, interpreted, randn, runs_here  # noqa: F401

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_elementwise_kernels_match_their_references(device, dtype):
    runs_here(device, dtype)
    tol = FUSED_TOL[dtype]
    x, d = randn(device, 1024, dtype=dtype, seed=1), randn(device, 1024, dtype=dtype, seed=2)
    scale = 1 + 0.1 * randn(device, 1024, dtype=torch.float32, seed=3)
    for delta in (d, None):
        x_ref, h_ref = fused.add_rms_norm_reference(x.clone(), delta, scale, 1e-6)
        x_k, h_k = fused.add_rms_norm(x.clone(), delta, scale, 1e-6)
        assert torch.equal(x_k, x_ref), "the residual add rounds once: it must be exact"
        torch.testing.assert_close(h_k, h_ref, **tol)
    for K in (3, 4):
        C = 6144 + 40                                   # not a multiple of the block
        xc, w = randn(device, C, dtype=dtype, seed=K), randn(device, C, K, dtype=dtype, seed=K + 1)
        cs = randn(device, K - 1, C, dtype=dtype, seed=K + 2)
        cs_ref, cs_k = cs.clone(), cs.clone()
        y_ref = fused.conv_step_reference(xc, cs_ref, w)
        y_k = fused.conv_step(xc, cs_k, w)
        assert torch.equal(cs_k, cs_ref), "the conv state shift is a copy: it must be exact"
        torch.testing.assert_close(y_k, y_ref, **tol)
    o, z = randn(device, 16, 128, dtype=dtype, seed=7), randn(device, 16, 128, dtype=dtype, seed=8)
    w = (1 + 0.1 * randn(device, 128, dtype=torch.float32, seed=9)).to(dtype)
    torch.testing.assert_close(fused.gated_rms_norm(o, z, w, 1e-6),
                               fused.gated_rms_norm_reference(o, z, w, 1e-6), **tol)
    gu = randn(device, 2 * 3584, dtype=dtype, seed=10)
    torch.testing.assert_close(fused.swiglu(gu), fused.swiglu_reference(gu), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 5, 300])
def test_fused_row_kernels_match_their_references(device, dtype, T):
    """The kernels a prefill chunk takes: one row per token (and per head for the gated norm)."""
    runs_here(device, dtype)
    tol = FUSED_TOL[dtype]
    N = 1000                                            # not a power of 2
    x, d = randn(device, T, N, dtype=dtype, seed=T), randn(device, T, N, dtype=dtype, seed=T + 1)
    scale = 1 + 0.1 * randn(device, N, dtype=torch.float32, seed=3)
    for delta in (d, None):
        x_ref, h_ref = fused.add_rms_norm_reference(x.clone(), delta, scale, 1e-6)
        x_k, h_k = fused.add_rms_norm(x.clone(), delta, scale, 1e-6)
        assert torch.equal(x_k, x_ref), "the residual add rounds once: it must be exact"
        torch.testing.assert_close(h_k, h_ref, **tol)
    gu = randn(device, T, 2 * 700, dtype=dtype, seed=T + 2)
    torch.testing.assert_close(fused.swiglu(gu), fused.swiglu_reference(gu), **tol)
    for K in (3, 4):
        sizes = (2048 + 40, 2048 + 40, 2048)            # q, k, v; not multiples of the tile
        C = sum(sizes)
        # x as the model passes it: the first C columns of the input projection
        x = randn(device, T, C + 100, dtype=dtype, seed=K + T)[:, :C]
        w = randn(device, C, K, dtype=dtype, seed=K + 1)
        cs = randn(device, K - 1, C, dtype=dtype, seed=K + 2)
        cs_ref, cs_k = cs.clone(), cs.clone()
        y_ref = fused.conv_rows_reference(x, cs_ref, w, sizes)
        y_k = fused.conv_rows(x, cs_k, w, sizes)
        for part_k, part_ref in zip(y_k, y_ref):
            assert part_k.is_contiguous()
            torch.testing.assert_close(part_k, part_ref, **tol)
        assert torch.equal(cs_k, cs_ref), "the conv state shift is a copy: it must be exact"
    # z as the model passes it: a column slice of the input projection, rows of stride 2 H D;
    # the model's heads, and heads of another width whose rows (T 300: 1500) do not fill the
    # last block of GATED_NORM_ROWS
    for Hv, Dv in ((16, 128), (5, 100)):
        o = randn(device, T, Hv, Dv, dtype=dtype, seed=T + 3)
        z = randn(device, T, 2 * Hv * Dv, dtype=dtype, seed=T + 4)[:, Hv * Dv:].view(T, Hv, Dv)
        w = (1 + 0.1 * randn(device, Dv, dtype=torch.float32, seed=9)).to(dtype)
        torch.testing.assert_close(fused.gated_rms_norm(o, z, w, 1e-6),
                                   fused.gated_rms_norm_reference(o, z, w, 1e-6), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K", [(64, 64), (300, 64), (8224, 1024), (1024, 3584), (1024, 2048),
                                  (5120, 1024), (248320, 1024), (17, 5)])
@pytest.mark.parametrize("prefetch", [False, True], ids=["slices", "prefetch"])
def test_fused_gemv_matches_the_reference_and_is_deterministic(device, dtype, N, K, prefetch):
    runs_here(device, dtype, N * K)
    w = randn(device, 2 * N, K, dtype=dtype, seed=N) * K ** -0.5
    w = w[N:]                                           # a row slice, as packed weights are
    x = randn(device, K, dtype=dtype, seed=K)
    y = fused.gemv(x, w, prefetch=prefetch)
    torch.testing.assert_close(y, fused.gemv_reference(x, w), **GEMV_TOL[dtype])
    assert torch.equal(fused.gemv(x, w, prefetch=prefetch), y), "a fixed order"
    # the MLP's down projection: SwiGLU of [gate | up] as the input is read
    gu = randn(device, 2 * K, dtype=dtype, seed=K + 1)
    torch.testing.assert_close(fused.gemv(gu, w, swiglu=True, prefetch=prefetch),
                               fused.gemv_reference(gu, w, swiglu=True), **GEMV_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K", [(64, 64), (8224, 1024), (7168, 1024), (248320, 1024), (17, 5)])
@pytest.mark.parametrize("add", [True, False], ids=["add", "no-add"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["slices", "prefetch"])
def test_fused_norm_gemv_matches_the_two_kernels_it_replaces(device, dtype, N, K, add, prefetch):
    """The residual add + RMSNorm computed inside the projection's GEMV: the residual equal to
    add_rms_norm's bytes (x itself untouched), the projection close to gemv of add_rms_norm's
    output (the rms summed in another order may round the norm's output the other way)."""
    runs_here(device, dtype, N * K)
    w = randn(device, N, K, dtype=dtype, seed=N) * K ** -0.5
    x = randn(device, K, dtype=dtype, seed=K)
    delta = randn(device, K, dtype=dtype, seed=K + 1) if add else None
    scale = 1 + 0.1 * randn(device, K, dtype=torch.float32, seed=K + 2)
    before = x.clone()
    residual, y = fused.norm_gemv(x, delta, scale, 1e-6, w, prefetch=prefetch)
    assert torch.equal(x, before), "norm_gemv writes the residual to a new tensor, not into x"
    want_x, h = fused.add_rms_norm(x.clone(), delta, scale, 1e-6)
    assert torch.equal(residual, want_x)
    torch.testing.assert_close(y, fused.gemv(h, w), **GEMV_TOL[dtype])
    torch.testing.assert_close(y, fused.norm_gemv_reference(x, delta, scale, 1e-6, w)[1],
                               **GEMV_TOL[dtype])
    assert torch.equal(fused.norm_gemv(x, delta, scale, 1e-6, w, prefetch=prefetch)[1], y), \
        "a fixed order"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("KC", [3, 4])
@pytest.mark.parametrize("d, C, N", [(1024, 6144 + 40, 6144 + 40 + 2048 + 32),   # hybrid-0.8b
                                     (32, 1000, 4096 + 40),                      # 8 rows a program
                                     (64, 200, 300)])                            # 2 rows a program
@pytest.mark.parametrize("prefetch", [False, True], ids=["slices", "prefetch"])
def test_fused_norm_gemv_conv_matches_the_conv_after_the_projection(device, dtype, KC, d, C, N,
                                                                    prefetch):
    """The Gated DeltaNet's in-projection with its short conv (fused.gdn_fusion): the residual and
    the projection norm_gemv's bytes, the conv output and the shifted conv state conv_step's
    bytes (the same products, summed in the same order), close to the torch reference; a conv
    channel count that is not a multiple of the rows a program takes, and outputs past the conv
    channels (z, b, a) left out of it."""
    runs_here(device, dtype, N * d)
    w = randn(device, N, d, dtype=dtype, seed=1) * d ** -0.5
    x, delta = randn(device, d, dtype=dtype, seed=2), randn(device, d, dtype=dtype, seed=3)
    scale = 1 + 0.1 * randn(device, d, dtype=torch.float32, seed=4)
    cw = randn(device, C, KC, dtype=dtype, seed=5)
    cs = randn(device, KC - 1, C, dtype=dtype, seed=6)
    cs_k, cs_apart, cs_ref = cs.clone(), cs.clone(), cs.clone()
    residual, y, yc = fused.norm_gemv_conv(x, delta, scale, 1e-6, w, cs_k, cw, prefetch=prefetch)
    want_r, want_y = fused.norm_gemv(x, delta, scale, 1e-6, w, prefetch=prefetch)
    assert torch.equal(residual, want_r) and torch.equal(y, want_y), "norm_gemv's bytes"
    assert torch.equal(yc, fused.conv_step(y[:C], cs_apart, cw)), "conv_step's bytes"
    assert torch.equal(cs_k, cs_apart), "the conv state shift is a copy: it must be exact"
    torch.testing.assert_close(yc, fused.conv_step_reference(y[:C], cs_ref, cw),
                               **FUSED_TOL[dtype])
    assert torch.equal(cs_k, cs_ref)
    _, _, ref_c = fused.norm_gemv_conv_reference(x, delta, scale, 1e-6, w, cs.clone(), cw)
    torch.testing.assert_close(yc, ref_c, **GEMV_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H, D, N", [(16, 128, 1024), (5, 128, 300), (5, 100, 64), (4, 32, 17)])
@pytest.mark.parametrize("prefetch", [False, True], ids=["slices", "prefetch"])
def test_fused_gated_norm_gemv_matches_the_two_kernels_it_replaces(device, dtype, H, D, N,
                                                                   prefetch):
    """The DeltaNet output norm computed inside the out-projection's GEMV (fused.gdn_fusion):
    close to gemv of gated_rms_norm's output and to the torch reference (each head's rms summed
    in another order may round the norm the other way); heads of 100 take the two kernels
    (`gated_norm_fits`)."""
    runs_here(device, dtype, N * H * D)
    o, z = randn(device, H, D, dtype=dtype, seed=H), randn(device, H, D, dtype=dtype, seed=H + 1)
    gw = (1 + 0.1 * randn(device, D, dtype=torch.float32, seed=D)).to(dtype)
    w = randn(device, N, H * D, dtype=dtype, seed=N) * (H * D) ** -0.5
    assert fused.gated_norm_fits(o, w, prefetch=prefetch) == (D != 100)
    y = fused.gated_norm_gemv(o, z, gw, 1e-6, w, prefetch=prefetch)
    apart = fused.gemv(fused.gated_rms_norm(o, z, gw, 1e-6).view(-1), w, prefetch=prefetch)
    torch.testing.assert_close(y, apart, **GEMV_TOL[dtype])
    torch.testing.assert_close(y, fused.gated_norm_gemv_reference(o, z, gw, 1e-6, w),
                               **GEMV_TOL[dtype])
    assert torch.equal(fused.gated_norm_gemv(o, z, gw, 1e-6, w, prefetch=prefetch), y), \
        "a fixed order"


ATTENTION_CASES = [
    (2, 1, 32, 0.25, 512, 5),            # tiny
    (4, 2, 24, 0.5, 700, 600),           # a head dim that is not a power of 2
    (8, 2, 256, 0.25, 16640, 2047),      # hybrid-0.8b at 2k
    (8, 2, 256, 0.25, 16640, 16383),     # and at 16k
]


def _attention_inputs(device, dtype, H, Hkv, D, rotary, max_ctx, pos):
    """(projection p, q/k norm scales, rotary, one layer's KV view, meta at `pos`)."""
    from flashrt_ros.core.arena import META_LEN
    from flashrt_ros.core.config import TextConfig
    from flashrt_ros.core.models.qwen3_5.modeling_qwen3_5 import RotaryEmbedding
    cfg = TextConfig(hidden_size=64, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D,
                     partial_rotary_factor=rotary, linear_num_key_heads=1,
                     linear_num_value_heads=1, linear_key_head_dim=8, linear_value_head_dim=8)
    with torch.device(device):
        rot = RotaryEmbedding(cfg, max_ctx, dtype)
    p = randn(device, (2 * H + 2 * Hkv) * D, dtype=dtype, seed=pos)
    qk_scale = 1 + 0.1 * randn(device, H + Hkv, D, dtype=torch.float32, seed=pos + 1)
    kv = randn(device, max_ctx, 3, 2, Hkv, D, dtype=dtype, seed=pos + 2)[:, 1]  # one layer's view
    meta = torch.zeros(META_LEN, dtype=torch.int64, device=device)
    meta[0] = pos
    return p, qk_scale, rot, kv, meta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H, Hkv, D, rotary, max_ctx, pos", ATTENTION_CASES)
def test_fused_attention_prep_matches_its_reference(device, dtype, H, Hkv, D, rotary, max_ctx,
                                                    pos):
    """q/k norm + RoPE, and the KV write at the position read from meta."""
    runs_here(device, dtype, max_ctx * 2 * Hkv * D)
    p, qk_scale, rot, kv, meta = _attention_inputs(device, dtype, H, Hkv, D, rotary, max_ctx, pos)
    kv_ref, kv_k = kv.clone(), kv.clone()
    q_ref = fused.attention_prep_reference(p, qk_scale, 1e-6, rot, kv_ref, meta, H, Hkv, D)
    q_k = fused.attention_prep(p, qk_scale, 1e-6, rot, kv_k, meta, H, Hkv, D)
    torch.testing.assert_close(q_k, q_ref, **FUSED_TOL[dtype])
    torch.testing.assert_close(kv_k[pos, 0], kv_ref[pos, 0], **FUSED_TOL[dtype])
    assert torch.equal(kv_k[pos, 1], kv_ref[pos, 1]), "v is copied, not computed"
    others = torch.ones(max_ctx, dtype=torch.bool, device=device)
    others[pos] = False
    assert torch.equal(kv_k[others], kv[others]), "only the row at the position is written"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H, Hkv, D, rotary, max_ctx, pos", ATTENTION_CASES)
def test_fused_decode_attention_matches_its_reference(dtype, H, Hkv, D, rotary, max_ctx, pos):
    """Attention of one query over the live prefix only (the length read from meta)."""
    p, qk_scale, rot, kv, meta = _attention_inputs("cuda", dtype, H, Hkv, D, rotary, max_ctx,
                                                   pos)
    q = fused.attention_prep_reference(p, qk_scale, 1e-6, rot, kv, meta, H, Hkv, D)
    gate = p[:2 * H * D].view(H, 2 * D)[:, D:]
    torch.testing.assert_close(fused.decode_attention(q, gate, kv, meta),
                               fused.decode_attention_reference(q, gate, kv, meta),
                               **FUSED_TOL[dtype])


# the state is fp32 on both sides; what differs is the order of the K-sums and exp/log
GDN_STATE_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hk, Hv, K, V", [(2, 2, 32, 32), (2, 4, 16, 20), (16, 16, 128, 128)])
def test_fused_gdn_step_matches_its_reference(device, dtype, Hk, Hv, K, V):
    """fused.gdn_step (the captured step's recurrence) against the model's unfused step: the L2
    norms, the gates and gated_delta_rule_step; several steps, so a state error would grow; and
    against fla's fused recurrent kernel, the same math in another order, where fla imports."""
    runs_here(device, dtype)
    tol = FUSED_TOL[dtype]
    g = torch.Generator().manual_seed(Hk * Hv)
    A_log = torch.log(torch.rand(Hv, generator=g) * 15 + 1).to(device)
    dt_bias = (torch.rand(Hv, generator=g) * 2 - 4).to(device)
    state = randn(device, Hv, K, V, dtype=torch.float32, seed=6) * 0.1
    with_fla = not interpreted(device) and kernels.fla_available()

    def inputs(t):
        q, k = (randn(device, Hk, K, dtype=dtype, seed=10 * t + s) for s in (1, 2))
        v = randn(device, Hv, V, dtype=dtype, seed=10 * t + 3)
        a, b = (randn(device, Hv, dtype=dtype, seed=10 * t + s) * 3 for s in (4, 5))
        a[0] = 30.0                                  # past softplus' threshold
        return q, k, v, a, b

    S_ref, S_k, S_fla = state.clone(), state.clone(), state.clone()
    for t in range(4):
        q, k, v, a, b = inputs(t)
        o_ref = fused.gdn_step_reference(q, k, v, a, b, A_log, dt_bias, S_ref, K ** -0.5)
        o_k = fused.gdn_step(q, k, v, a, b, A_log, dt_bias, S_k, K ** -0.5, kernels.L2NORM_EPS)
        torch.testing.assert_close(o_k, o_ref, **tol)
        torch.testing.assert_close(S_k, S_ref, **GDN_STATE_TOL)
        if with_fla:
            G = Hv // Hk
            o_fla = kernels.gated_delta_rule_fla_gated(
                q[None].repeat_interleave(G, 1), k[None].repeat_interleave(G, 1), v[None], a[None],
                b[None], A_log, dt_bias, S_fla, K ** -0.5, chunked=False)
            torch.testing.assert_close(o_k, o_fla[0], **tol)
            torch.testing.assert_close(S_k, S_fla, **GDN_STATE_TOL)
    # deterministic: the same bits on a second run from the same state
    S_again = state.clone()
    for t in range(4):
        fused.gdn_step(*inputs(t), A_log, dt_bias, S_again, K ** -0.5, kernels.L2NORM_EPS)
    assert torch.equal(S_again, S_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_smolvla_kernels_match_their_references(device, dtype):
    """core/fused.py's kernels as SmolVLA calls them: Llama's norm with a residual add (the sum
    is exact: one rounding), RoPE of a strided q/k/v slice into a slice of a larger buffer with
    each head repeated for its group (the rows around it untouched), and the unrotated copy."""
    runs_here(device, dtype)
    from flashrt_ros.core.models.smolvla.modeling_smolvla import Rope
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for rows, n in ((1, 960), (50, 720), (241, 960)):
        x, d = randn(device, rows, n, dtype=dtype, seed=rows), randn(device, rows, n, dtype=dtype,
                                                                     seed=rows + 1)
        w = 1 + 0.1 * randn(device, n, dtype=dtype, seed=n)
        for delta in (d, None):
            x_ref, h_ref = fused.add_rms_norm_reference(x.clone(), delta, w, 1e-5, round_first=True)
            x_k, h_k = fused.add_rms_norm(x.clone(), delta, w, 1e-5, round_first=True)
            assert torch.equal(x_k, x_ref), "the residual add rounds once: it must be exact"
            torch.testing.assert_close(h_k, h_ref, **tol)
    for rows, heads, d, groups in ((50, 5, 64, 3), (241, 5, 64, 3), (7, 2, 48, 1)):
        qkv = randn(device, rows, 3 * heads * d, dtype=dtype, seed=rows + heads)
        x = qkv[:, heads * d:2 * heads * d].view(rows, heads, d)        # k of a fused q/k/v
        table = Rope(d).to(device).table(torch.arange(rows, device=device) + 11)
        for tab in (table, None):
            ref = fused.rope_heads_reference(x, tab, x.new_empty(rows, heads * groups, d), groups)
            big = torch.zeros(rows + 9, heads * groups, d, dtype=dtype, device=device)
            out = fused.rope_heads(x, tab, big[9:], groups)
            torch.testing.assert_close(out, ref, **tol)
            assert not big[:9].any(), "rope_heads wrote outside its output rows"
            if tab is None:
                assert torch.equal(out, ref), "an unrotated copy must be exact"
