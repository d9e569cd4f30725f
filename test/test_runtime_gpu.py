"""PolicyRuntime on a CUDA device: graph replay vs eager, determinism, no allocation after capture,
rollback exactness, and the fla kernels against the reference.

Bitwise claims (replay == eager, two runtimes, rollback) compare the uint8 arena with `torch.equal`.
Cross-path claims (fla vs reference, graph runtime vs the CPU reference runtime) use named
tolerances. Needs a GPU: CI has none; run on the device with
`python -m pytest test/test_runtime_gpu.py -p no:cacheprovider`.
"""
import functools
import gc

import numpy as np
import pytest
import torch

from flashrt_ros.core import kernels
from flashrt_ros.core.config import RuntimeConfig, StoreConfig, load_preset
from flashrt_ros.core.runtime import PolicyRuntime
from flashrt_ros.capsules.store import CapsuleStore, PagedCapsuleStore

pytestmark = pytest.mark.gpu

INSTRUCTION = "pick up the red cup and put it on the tray"
DTYPES = ["float32", "bfloat16"]
# Graph runtime vs eager CUDA runtime: same fla kernels, different attention forms (masked over
# max_context vs the live prefix): rounding only.
CROSS_FORM_ATOL = 2e-3
# CUDA runtime vs the CPU reference runtime, fp32 tiny: fla's chunk kernels compute fp32 dot
# products in TF32 (10-bit mantissa), measured 5e-3 on actions after a 44-token prefill + 8 steps;
# the kernels' own tolerance bounds it.
CROSS_DEVICE_ATOL = kernels.FLA_ATOL


@functools.cache
def runtime(dtype="float32", graphs=True, key=0, **kw):
    """Runtimes are cached per argument set: capture compiles Triton kernels once per process.
    `key` asks for a second, independent runtime of the same configuration."""
    return PolicyRuntime(load_preset("tiny", dtype=dtype),
                         RuntimeConfig(device="cuda", cuda_graphs=graphs, **kw))


def observations(n, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randn(14).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_runtime_uses_fla_and_captures_every_plan(dtype):
    rt = runtime(dtype)
    assert rt.kernel == "fla" and rt.use_graphs
    captured = {n for n, p in rt.plans.items() if p.captured}
    assert {"observation", "token", "lm_head", "prefill4", "prefill16", "prefill64",
            "prefill256"} <= captured


@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_replay_equals_eager_bitwise(dtype):
    """plan.run() (replay) vs plan.run_eager() (the same function, no graph) from the same bytes."""
    rt = runtime(dtype)
    rt.set_instruction(INSTRUCTION)
    for o in observations(3):
        rt.step(o)
    a, io = rt.arena, rt.io
    io.obs.copy_(torch.from_numpy(observations(1, seed=9)[0]))
    io.token.fill_(65)
    for c, chunk in io.chunks.items():
        chunk.copy_(torch.arange(c) % 256)
    start = a.base.clone()
    for name, plan in rt.plans.items():
        if not plan.captured:
            continue
        outs = []
        for run in (plan.run, plan.run_eager):
            a.base.copy_(start)
            run()
            torch.cuda.synchronize()
            outs.append((a.base.clone(), io.action.clone(), io.logits.clone(), io.next_token.clone()))
        for x, y in zip(*outs):
            assert torch.equal(x, y), f"plan {name}: replay differs from eager"
    a.base.copy_(start)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_runtimes_same_actions_tokens_and_bytes(dtype):
    runs = []
    for key in (1, 2):
        rt = runtime(dtype, key=key, action_noise=0.2)
        rt.set_instruction(INSTRUCTION)
        actions = np.stack([rt.step(o) for o in observations(20)])
        runs.append((rt, actions, rt.decode(5)))
    (a, acts_a, tok_a), (b, acts_b, tok_b) = runs
    assert np.array_equal(acts_a, acts_b) and tok_a == tok_b
    assert torch.equal(a.arena.base, b.arena.base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_device_allocation_after_capture(dtype):
    rt = runtime(dtype)
    rt.set_instruction(INSTRUCTION)
    rt.step(observations(1)[0])                 # first call: host-side lazy init, if any

    def counters():
        torch.cuda.synchronize()
        return (torch.cuda.memory_stats()["allocation.all.allocated"],
                torch.cuda.memory_allocated())

    before = counters()
    for o in observations(50):
        rt.step(o)
    rt.decode(4)
    rt.rollback(3)
    rt.reset(keep_context=True)
    rt.step(observations(1)[0])
    rt.reset(keep_context=False)
    assert counters() == before, "steps/decode/rollback/reset allocated device memory"
    rt.set_instruction("x" * 100)               # captured prefill chunks (64 + 16 + 16 + 4 + 1)
    assert counters() == before, "set_instruction allocated device memory"


@pytest.mark.parametrize("store_cls", [CapsuleStore, PagedCapsuleStore])
def test_capture_survives_garbage_of_an_earlier_runtime_and_store(store_cls, tmp_path):
    """A lifecycle re-configure (or the next test) builds a runtime while the previous runtime and
    its store are unreachable cycles holding pinned host pools and CUDA events; the runtime holds
    the collector off during capture so that none of them is finalised mid-capture.

    A guard, not a reproduction: a full GPU run once failed two paged tests with
    cudaErrorStreamCaptureInvalidated (and three on an earlier revision), but on the H100 this test
    also passed with the collector handling neutralised, and the full suite then passed. The cause
    of that failure is not proven; see docs/benchmarks.md."""
    old = PolicyRuntime(load_preset("tiny"), RuntimeConfig(device="cuda"))
    old.set_instruction(INSTRUCTION)
    store = store_cls(old, StoreConfig(capsule_dir=str(tmp_path / "capsules")))
    for o in observations(3):
        old.step(o)
        store.snapshot(f"h{old.step_count}", tier="host")
        store.snapshot(f"g{old.step_count}", tier="gpu")
    store.restore("h1")
    old.keep_alive_in_a_cycle = store   # only the cyclic collector frees them now
    del old, store
    threshold = gc.get_threshold()
    gc.set_threshold(1, 1, 1)           # a full collection at nearly every allocation
    try:
        new = PolicyRuntime(load_preset("tiny"), RuntimeConfig(device="cuda"))
    finally:
        gc.set_threshold(*threshold)
    assert all(p.captured for p in new.plans.values() if getattr(p, "graph_eligible", True))
    new.set_instruction(INSTRUCTION)
    assert new.step(observations(1)[0]).shape == (new.model_cfg.horizon, new.model_cfg.action_dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rollback_is_exact_on_gpu(dtype):
    rt = runtime(dtype, action_noise=0.2)
    rt.set_instruction(INSTRUCTION)
    obs = observations(12)
    states, acts = [rt.arena.base[: rt.arena.small_nbytes].clone()], []
    for o in obs:
        acts.append(rt.step(o))
        states.append(rt.arena.base[: rt.arena.small_nbytes].clone())
    rt.rollback(5)
    assert torch.equal(rt.arena.base[: rt.arena.small_nbytes], states[7])
    for i in range(7, 12):
        assert np.array_equal(rt.step(obs[i]), acts[i])
    assert torch.equal(rt.arena.base[: rt.arena.small_nbytes], states[12])


def test_graph_runtime_matches_cpu_reference_within_tolerance():
    gpu = runtime("float32")
    cpu = PolicyRuntime(load_preset("tiny"), RuntimeConfig(device="cpu"))
    for rt in (gpu, cpu):
        rt.set_instruction(INSTRUCTION)
    for o in observations(8):
        np.testing.assert_allclose(gpu.step(o), cpu.step(o), atol=CROSS_DEVICE_ATOL, rtol=0)
    for name in ("last_hidden", "layers.0.recurrent_state", "layers.0.conv_state"):
        torch.testing.assert_close(gpu.arena[name].cpu(), cpu.arena[name],
                                   atol=CROSS_DEVICE_ATOL, rtol=0, msg=name)


def test_eager_cuda_runtime_matches_graph_runtime_within_tolerance():
    """cuda_graphs=False: dynamic form (live-prefix SDPA, flash/causal_lower_right) on the GPU."""
    graph, eager = runtime("float32"), runtime("float32", graphs=False)
    assert not any(p.captured for p in eager.plans.values())
    for rt in (graph, eager):
        rt.set_instruction(INSTRUCTION)
    for o in observations(8):
        np.testing.assert_allclose(graph.step(o), eager.step(o), atol=CROSS_FORM_ATOL, rtol=0)
    graph.next_token()
    eager.next_token()
    torch.testing.assert_close(graph.io.logits, eager.io.logits, atol=CROSS_FORM_ATOL, rtol=0)


# Prefill plans vs the eager dynamic form (SDPA over the live prefix): the attention kernels differ
# (core/models/qwen3_5/prefill_attention_qwen3_5.py's tiles vs torch's flash kernel), so rounding
# only; bf16 rounds after every operation of four layers, over a 1365-token prefill into an fp32
# recurrent state
PREFILL_FORM_TOL = {"float32": dict(atol=CROSS_FORM_ATOL, rtol=0),
                    "bfloat16": dict(atol=5e-2, rtol=5e-2)}


@functools.cache
def long_runtime(dtype, graphs=True):
    """The tiny preset with room for a 1024-token bucket at position 1000 (default buckets)."""
    return PolicyRuntime(load_preset("tiny", dtype=dtype, max_context=2048),
                         RuntimeConfig(device="cuda", cuda_graphs=graphs))


def _assert_states_close(got, want, arena, tol, what):
    assert torch.equal(got[:64], want[:64]), f"{what}: meta differs"
    for name in arena.names():
        s = arena.specs[name]
        n = min(s.nbytes, got.numel() - s.offset)
        if n > 0:
            torch.testing.assert_close(got[s.offset:s.offset + n].view(arena[name].dtype),
                                       want[s.offset:s.offset + n].view(arena[name].dtype),
                                       **tol, msg=f"{what}: {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_prefill_bucket_is_captured_and_matches_the_eager_form_at_any_position(dtype):
    """Every bucket that fits the context is one captured plan serving every position (the
    position read from the arena). At positions 0, 37, 1000 and where the chunks end at the last
    usable row, a restore then a prefill through the graphs equals the same restore and prefill
    in a runtime without graphs (the dynamic form) to rounding; replays equal the same functions
    run eagerly byte for byte, and a second restore + prefill gives the same bytes again."""
    graph, eager = long_runtime(dtype), long_runtime(dtype, graphs=False)
    assert {f"prefill{c}" for c in (1024, 256, 64, 16, 4)} <= \
        {n for n, p in graph.plans.items() if p.captured}
    assert not any("@" in n for n in graph.plans)
    rng = np.random.RandomState(1)
    vocab = graph.model_cfg.vocab_size
    tol = PREFILL_FORM_TOL[dtype]
    for p in (0, 37, 1000, graph.max_tokens - 1365):
        graph.reset(keep_context=False)
        if p:
            graph.prefill(rng.randint(0, vocab, size=p).tolist())
        start = graph.live_state().clone()
        known = (graph.position, graph.step_count, graph.episode, graph.context_len)
        n = min(1365, graph.max_tokens - p)         # 1024 + 256 + 64 + 16 + 4 + 1
        tokens = rng.randint(0, vocab, size=n).tolist()
        runs = []
        for rt, graphs in ((graph, True), (graph, False), (graph, True), (eager, False)):
            rt.restore_state(start, known)
            rt.prefill_graphs = graphs
            try:
                rt.prefill(tokens)
            finally:
                rt.prefill_graphs = rt.use_graphs
            assert rt.position == p + n
            runs.append((rt.live_state().clone(), rt.next_token(), rt.io.logits.clone()))
        (replay, tok, logits), (by_fn, tok_fn, _), (again, tok_again, _), (dyn, _, dyn_logits) = runs
        assert torch.equal(replay, by_fn) and tok == tok_fn, f"position {p}: replay != eager"
        assert torch.equal(replay, again) and tok == tok_again, f"position {p}: not repeatable"
        _assert_states_close(replay, dyn, graph.arena, tol, f"position {p}")
        torch.testing.assert_close(logits, dyn_logits, **tol, msg=f"position {p}: logits")


def test_long_prefill_plans_allocate_nothing():
    rt = long_runtime("float32")
    rt.reset(keep_context=False)
    tokens = [i % 256 for i in range(1300)]
    rt.prefill(tokens)                          # first call: host-side lazy init, if any
    torch.cuda.synchronize()
    before = (torch.cuda.memory_stats()["allocation.all.allocated"], torch.cuda.memory_allocated())
    rt.reset(keep_context=False)
    rt.prefill(tokens[:600])
    rt.prefill(tokens)                          # 1024 + 256 + 16 + 4 at position 600
    torch.cuda.synchronize()
    after = (torch.cuda.memory_stats()["allocation.all.allocated"], torch.cuda.memory_allocated())
    assert after == before, "captured prefill chunks allocated device memory"


# -- fla kernels vs the reference ------------------------------------------------------------------
def _kernel_inputs(T, H, K, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda")
    q, k, v = randn(T, H, K).bfloat16(), randn(T, H, K).bfloat16(), randn(T, H, K).bfloat16()
    a, b = randn(T, H).bfloat16(), randn(T, H).bfloat16()
    A_log = torch.log(torch.rand(H, generator=g, device="cuda") * 15 + 1)
    dt_bias = torch.rand(H, generator=g, device="cuda") * 2 - 4
    state = randn(H, K, K) * 0.1
    return q, k, v, a, b, A_log, dt_bias, state


@pytest.mark.parametrize("T", [64, 1], ids=["chunked-T64", "recurrent-T1"])
@pytest.mark.parametrize("H, K", [(2, 32), (16, 128)], ids=["tiny", "hybrid-0.8b"])
def test_fla_kernels_match_reference(T, H, K):
    if not kernels.fla_available():
        pytest.fail("fla does not import on this CUDA machine; install the fla-core "
                    "wheels (see the module docstring of flashrt_ros.core.kernels)")
    q, k, v, a, b, A_log, dt_bias, state = _kernel_inputs(T, H, K, seed=T + H)
    qn, kn, g, beta = kernels.gate_reference(q, k, a, b, A_log, dt_bias)
    scale = K ** -0.5
    S_ref = state.clone()
    o_ref = kernels.gated_delta_rule_reference(qn, kn, v, g, beta, S_ref, scale)

    S_fla = state.clone()
    o_fla = kernels.gated_delta_rule_fla(qn, kn, v, g, beta, S_fla, scale, chunked=T > 1)
    S_gated = state.clone()
    o_gated = kernels.gated_delta_rule_fla_gated(q, k, v, a, b, A_log, dt_bias, S_gated, scale,
                                                 chunked=T > 1)
    for o, S, what in ((o_fla, S_fla, "fla"), (o_gated, S_gated, "fla gated")):
        assert o.shape == o_ref.shape and o.dtype == torch.bfloat16 and S.dtype == torch.float32
        torch.testing.assert_close(o.float(), o_ref.float(), atol=kernels.FLA_ATOL,
                                   rtol=kernels.FLA_RTOL, msg=f"{what} output")
        torch.testing.assert_close(S, S_ref, atol=kernels.FLA_ATOL, rtol=kernels.FLA_RTOL,
                                   msg=f"{what} final state")


def test_fla_gate_prologue_matches_reference_gate_in_fp32():
    """The fused prologue alone, with fp32 inputs: tighter than the bf16 tolerance."""
    q, k, v, a, b, A_log, dt_bias, state = (t.float() for t in _kernel_inputs(1, 4, 64, seed=3))
    qn, kn, g, beta = kernels.gate_reference(q, k, a, b, A_log, dt_bias)
    S_ref, S_gated = state.clone(), state.clone()
    o_ref = kernels.gated_delta_rule_reference(qn, kn, v, g, beta, S_ref, 0.125)
    o = kernels.gated_delta_rule_fla_gated(q, k, v, a, b, A_log, dt_bias, S_gated, 0.125, False)
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S_gated, S_ref, atol=1e-4, rtol=1e-4)


# -- fused single-token kernels (core/fused.py) vs their references --------------------------------
# fp32: the kernels sum in another order and use another rsqrt/exp: rounding only. bf16: both
# sides round at the same points, so the results differ by the last bit of a rounding that fell
# the other way (a few bf16 steps after a sum); attention also rounds its unnormalised
# probabilities to bf16 for the tensor-core product, as fla and flash attention do.
FUSED_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _randn(*shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_elementwise_kernels_match_their_references(dtype):
    from flashrt_ros.core import fused
    tol = FUSED_TOL[dtype]
    x, d = _randn(1024, dtype=dtype, seed=1), _randn(1024, dtype=dtype, seed=2)
    scale = 1 + 0.1 * _randn(1024, dtype=torch.float32, seed=3)
    for delta in (d, None):
        x_ref, h_ref = fused.add_rms_norm_reference(x.clone(), delta, scale, 1e-6)
        x_k, h_k = fused.add_rms_norm(x.clone(), delta, scale, 1e-6)
        assert torch.equal(x_k, x_ref), "the residual add rounds once: it must be exact"
        torch.testing.assert_close(h_k, h_ref, **tol)
    for K in (3, 4):
        C = 6144 + 40                                   # not a multiple of the block
        xc, w = _randn(C, dtype=dtype, seed=K), _randn(C, 1, K, dtype=dtype, seed=K + 1)[:, 0]
        cs = _randn(K - 1, C, dtype=dtype, seed=K + 2)
        cs_ref, cs_k = cs.clone(), cs.clone()
        y_ref = fused.conv_step_reference(xc, cs_ref, w)
        y_k = fused.conv_step(xc, cs_k, w)
        assert torch.equal(cs_k, cs_ref), "the conv state shift is a copy: it must be exact"
        torch.testing.assert_close(y_k, y_ref, **tol)
    o, z = _randn(16, 128, dtype=dtype, seed=7), _randn(16, 128, dtype=dtype, seed=8)
    w = (1 + 0.1 * _randn(128, dtype=torch.float32, seed=9)).to(dtype)
    torch.testing.assert_close(fused.gated_rms_norm(o, z, w, 1e-6),
                               fused.gated_rms_norm_reference(o, z, w, 1e-6), **tol)
    gu = _randn(2 * 3584, dtype=dtype, seed=10)
    torch.testing.assert_close(fused.swiglu(gu), fused.swiglu_reference(gu), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 5, 300])
def test_fused_row_kernels_match_their_references(dtype, T):
    """The kernels a prefill chunk takes: one row per token (and per head for the gated norm)."""
    from flashrt_ros.core import fused
    tol = FUSED_TOL[dtype]
    N = 1000                                            # not a power of 2
    x, d = _randn(T, N, dtype=dtype, seed=T), _randn(T, N, dtype=dtype, seed=T + 1)
    scale = 1 + 0.1 * _randn(N, dtype=torch.float32, seed=3)
    for delta in (d, None):
        x_ref, h_ref = fused.add_rms_norm_reference(x.clone(), delta, scale, 1e-6)
        x_k, h_k = fused.add_rms_norm(x.clone(), delta, scale, 1e-6)
        assert torch.equal(x_k, x_ref), "the residual add rounds once: it must be exact"
        torch.testing.assert_close(h_k, h_ref, **tol)
    gu = _randn(T, 2 * 700, dtype=dtype, seed=T + 2)
    torch.testing.assert_close(fused.swiglu(gu), fused.swiglu_reference(gu), **tol)
    for K in (3, 4):
        sizes = (2048 + 40, 2048 + 40, 2048)            # q, k, v; not multiples of the tile
        C = sum(sizes)
        # x as the model passes it: the first C columns of the input projection
        x = _randn(T, C + 100, dtype=dtype, seed=K + T)[:, :C]
        w = _randn(C, K, dtype=dtype, seed=K + 1)
        cs = _randn(K - 1, C, dtype=dtype, seed=K + 2)
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
        o = _randn(T, Hv, Dv, dtype=dtype, seed=T + 3)
        z = _randn(T, 2 * Hv * Dv, dtype=dtype, seed=T + 4)[:, Hv * Dv:].view(T, Hv, Dv)
        w = (1 + 0.1 * _randn(Dv, dtype=torch.float32, seed=9)).to(dtype)
        torch.testing.assert_close(fused.gated_rms_norm(o, z, w, 1e-6),
                                   fused.gated_rms_norm_reference(o, z, w, 1e-6), **tol)


# fused.gemv against F.linear (cuBLAS): both accumulate in fp32, in other orders; in bf16 the
# output's rounding may fall the other way (one bf16 step of a value of size ~1)
GEMV_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N, K", [(64, 64), (300, 64), (8224, 1024), (1024, 3584), (1024, 2048),
                                  (5120, 1024), (248320, 1024), (17, 5)])
@pytest.mark.parametrize("prefetch", [False, True], ids=["slices", "prefetch"])
def test_fused_gemv_matches_cublas_and_is_deterministic(dtype, N, K, prefetch):
    from flashrt_ros.core import fused
    w = _randn(2 * N, K, dtype=dtype, seed=N) * K ** -0.5
    w = w[N:]                                           # a row slice, as packed weights are
    x = _randn(K, dtype=dtype, seed=K)
    y = fused.gemv(x, w, prefetch=prefetch)
    torch.testing.assert_close(y, fused.gemv_reference(x, w), **GEMV_TOL[dtype])
    assert torch.equal(fused.gemv(x, w, prefetch=prefetch), y), "a fixed order"
    # the MLP's down projection: SwiGLU of [gate | up] as the input is read
    gu = _randn(2 * K, dtype=dtype, seed=K + 1)
    torch.testing.assert_close(fused.gemv(gu, w, swiglu=True, prefetch=prefetch),
                               fused.gemv_reference(gu, w, swiglu=True), **GEMV_TOL[dtype])


def test_gemvs_launched_early_wait_for_the_kernel_before_them(monkeypatch):
    """Programmatic dependent launch (fused.pdl, Hopper and later): a chain of projections, each
    reading the output of the kernel before it, as a step makes them (gemv -> norm_gemv -> gemv
    with swiglu -> gated norm -> gemv), eagerly and replayed from a graph with new inputs, gives
    the bytes of the same chain launched one kernel after the other (FLASHRT_PDL=0). A GEMV that
    read its input or wrote its output before the kernel before it ended would differ."""
    from flashrt_ros.core import fused
    if not fused.pdl(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or later")
    d, ffn, heads = 1024, 3584, 8
    w_in = _randn(2 * d, d, dtype=torch.bfloat16, seed=1) * d ** -0.5
    w_up = _randn(2 * ffn, d, dtype=torch.bfloat16, seed=2) * d ** -0.5
    w_down = _randn(d, ffn, dtype=torch.bfloat16, seed=3) * ffn ** -0.5
    w_out = _randn(d, d, dtype=torch.bfloat16, seed=4) * d ** -0.5
    scale = 1 + 0.1 * _randn(d, dtype=torch.float32, seed=5)
    inputs = [_randn(d, dtype=torch.bfloat16, seed=10 + i) for i in range(6)]

    def chain(x, prefetch):
        h = fused.gemv(x, w_in, prefetch=prefetch)[:d]
        r, gu = fused.norm_gemv(x, h, scale, 1e-6, w_up, prefetch=prefetch)
        y = fused.gemv(gu, w_down, swiglu=True, prefetch=prefetch)
        o = fused.gated_rms_norm(y.view(heads, -1), r.view(heads, -1), scale[:d // heads], 1e-6)
        return fused.gemv(o.view(-1), w_out, prefetch=prefetch)

    def plainly(prefetch):          # each kernel launched after the one before has ended
        monkeypatch.setenv("FLASHRT_PDL", "0")
        fused.pdl.cache_clear()
        try:
            return [chain(x, prefetch) for x in inputs]
        finally:
            monkeypatch.delenv("FLASHRT_PDL")
            fused.pdl.cache_clear()

    for prefetch in (False, True):
        want = plainly(prefetch)
        for x, w in zip(inputs, want):
            assert torch.equal(chain(x, prefetch), w), f"eager, prefetch={prefetch}"
        x_static = inputs[0].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x_static, prefetch)
        for i in (3, 1, 5, 0, 2, 4):
            x_static.copy_(inputs[i])
            graph.replay()
            assert torch.equal(out, want[i]), f"replay of input {i}, prefetch={prefetch}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N, K", [(64, 64), (8224, 1024), (7168, 1024), (248320, 1024), (17, 5)])
@pytest.mark.parametrize("add", [True, False], ids=["add", "no-add"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["slices", "prefetch"])
def test_fused_norm_gemv_matches_the_two_kernels_it_replaces(dtype, N, K, add, prefetch):
    """The residual add + RMSNorm computed inside the projection's GEMV: the residual equal to
    add_rms_norm's bytes (x itself untouched), the projection close to gemv of add_rms_norm's
    output (the rms summed in another order may round the norm's output the other way)."""
    from flashrt_ros.core import fused
    w = _randn(N, K, dtype=dtype, seed=N) * K ** -0.5
    x = _randn(K, dtype=dtype, seed=K)
    delta = _randn(K, dtype=dtype, seed=K + 1) if add else None
    scale = 1 + 0.1 * _randn(K, dtype=torch.float32, seed=K + 2)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H, Hkv, D, rotary, max_ctx, pos", [
    (2, 1, 32, 0.25, 512, 5),            # tiny
    (4, 2, 24, 0.5, 700, 600),           # a head dim that is not a power of 2
    (8, 2, 256, 0.25, 16640, 2047),      # hybrid-0.8b at 2k
    (8, 2, 256, 0.25, 16640, 16383),     # and at 16k
])
def test_fused_attention_matches_its_reference(dtype, H, Hkv, D, rotary, max_ctx, pos):
    """q/k norm + RoPE + KV write, then attention over the live prefix (length from meta)."""
    from flashrt_ros.core import fused
    from flashrt_ros.core.arena import META_LEN
    from flashrt_ros.core.config import TextConfig
    from flashrt_ros.core.models.qwen3_5.modeling_qwen3_5 import RotaryEmbedding
    tol = FUSED_TOL[dtype]
    cfg = TextConfig(hidden_size=64, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D,
                     partial_rotary_factor=rotary, linear_num_key_heads=1,
                     linear_num_value_heads=1, linear_key_head_dim=8, linear_value_head_dim=8)
    with torch.device("cuda"):
        rot = RotaryEmbedding(cfg, max_ctx, dtype)
    p = _randn((2 * H + 2 * Hkv) * D, dtype=dtype, seed=pos)
    qk_scale = 1 + 0.1 * _randn(H + Hkv, D, dtype=torch.float32, seed=pos + 1)
    kv = _randn(max_ctx, 3, 2, Hkv, D, dtype=dtype, seed=pos + 2)[:, 1]    # one layer's view
    meta = torch.zeros(META_LEN, dtype=torch.int64, device="cuda")
    meta[0] = pos
    kv_ref, kv_k = kv.clone(), kv.clone()
    q_ref = fused.attention_prep_reference(p, qk_scale, 1e-6, rot, kv_ref, meta, H, Hkv, D)
    q_k = fused.attention_prep(p, qk_scale, 1e-6, rot, kv_k, meta, H, Hkv, D)
    torch.testing.assert_close(q_k, q_ref, **tol)
    torch.testing.assert_close(kv_k[pos, 0], kv_ref[pos, 0], **tol)
    assert torch.equal(kv_k[pos, 1], kv_ref[pos, 1]), "v is copied, not computed"
    others = torch.ones(max_ctx, dtype=torch.bool, device="cuda")
    others[pos] = False
    assert torch.equal(kv_k[others], kv[others]), "only the row at the position is written"
    gate = p[:2 * H * D].view(H, 2 * D)[:, D:]
    torch.testing.assert_close(fused.decode_attention(q_ref, gate, kv_ref, meta),
                               fused.decode_attention_reference(q_ref, gate, kv_ref, meta), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H, Hkv, D, max_ctx, T, pos", [
    (2, 1, 32, 512, 4, 0),               # tiny, the smallest bucket
    (2, 1, 32, 512, 256, 37),
    (4, 2, 24, 700, 16, 683),            # a head dim that is not a power of 2; the last rows
    (8, 2, 256, 16640, 64, 1000),        # hybrid-0.8b; KV rows in splits, then combined
    (8, 2, 256, 16640, 16, 16600),
    (8, 2, 256, 16640, 1024, 0),
    (8, 2, 256, 16640, 4096, 12288),     # the last chunk of a 16k instruction: one split
])
def test_fused_prefill_attention_matches_its_reference(dtype, H, Hkv, D, max_ctx, T, pos):
    """core/models/qwen3_5/prefill_attention_qwen3_5.py: T query rows (strided views of the
    projection, as the model passes them) over the KV cache, causal at the position read from meta;
    the rows past the chunk hold large values that must not leak in."""
    from flashrt_ros.core.arena import META_LEN
    from flashrt_ros.core.models.qwen3_5.prefill_attention_qwen3_5 import (
        prefill_attention, prefill_attention_reference)
    tol = FUSED_TOL[dtype]
    proj = _randn(T, (2 * H + 2 * Hkv) * D, dtype=dtype, seed=pos + T)
    q, gate = proj[:, :2 * H * D].view(T, H, 2, D).unbind(2)                  # [T, H, D] views
    kv = _randn(max_ctx, 3, 2, Hkv, D, dtype=dtype, seed=pos + 1)[:, 1]       # one layer's view
    kv[pos + T:] = 1e3
    meta = torch.zeros(META_LEN, dtype=torch.int64, device="cuda")
    meta[0] = pos
    got = prefill_attention(q, gate, kv, meta)
    torch.testing.assert_close(got, prefill_attention_reference(q, gate, kv, meta), **tol)
    assert torch.equal(prefill_attention(q, gate, kv, meta), got), "not deterministic"


@pytest.mark.parametrize("T, pos", [(16, 16600), (256, 16000), (1024, 1024), (4096, 12288)])
def test_every_benchmarked_prefill_attention_tile_matches_the_reference(T, pos):
    """Each tile configuration bench/bench_prefill_attention.py compares (the default's
    candidates) on hybrid-0.8b's shapes in bf16: the same values as the reference."""
    from bench.bench_prefill_attention import CONFIGS
    from flashrt_ros.core.arena import META_LEN
    from flashrt_ros.core.models.qwen3_5.prefill_attention_qwen3_5 import (
        prefill_attention, prefill_attention_reference)
    H, Hkv, D, max_ctx = 8, 2, 256, 16640
    proj = _randn(T, (2 * H + 2 * Hkv) * D, dtype=torch.bfloat16, seed=pos + T)
    q, gate = proj[:, :2 * H * D].view(T, H, 2, D).unbind(2)
    kv = _randn(max_ctx, 3, 2, Hkv, D, dtype=torch.bfloat16, seed=pos + 1)[:, 1]
    kv[pos + T:] = 1e3
    meta = torch.zeros(META_LEN, dtype=torch.int64, device="cuda")
    meta[0] = pos
    want = prefill_attention_reference(q, gate, kv, meta)
    for config in CONFIGS.split(","):
        got = prefill_attention(q, gate, kv, meta, tuple(int(v) for v in config.split("x")))
        torch.testing.assert_close(got, want, **FUSED_TOL[torch.bfloat16],
                                   msg=lambda m, c=config: f"tiles {c}: {m}")


# the state is fp32 on both sides; what differs is the order of the K-sums and exp/log
GDN_STATE_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Hk, Hv, K, V", [(2, 2, 32, 32), (2, 4, 16, 20), (16, 16, 128, 128)])
def test_fused_gdn_step_matches_its_reference(dtype, Hk, Hv, K, V):
    """fused.gdn_step (the captured step's recurrence) against the model's unfused step: the L2
    norms, the gates and gated_delta_rule_step; several steps, so a state error would grow; and
    against fla's fused recurrent kernel, the same math in another order, where fla imports."""
    from flashrt_ros.core import fused
    tol = FUSED_TOL[dtype]
    A_log = torch.log(torch.rand(Hv, device="cuda") * 15 + 1)
    dt_bias = torch.rand(Hv, device="cuda") * 2 - 4
    state = _randn(Hv, K, V, dtype=torch.float32, seed=6) * 0.1
    S_ref, S_k, S_fla = state.clone(), state.clone(), state.clone()
    for t in range(4):
        q, k = (_randn(Hk, K, dtype=dtype, seed=10 * t + s) for s in (1, 2))
        v = _randn(Hv, V, dtype=dtype, seed=10 * t + 3)
        a, b = (_randn(Hv, dtype=dtype, seed=10 * t + s) * 3 for s in (4, 5))
        a[0] = 30.0                                  # past softplus' threshold
        o_ref = fused.gdn_step_reference(q, k, v, a, b, A_log, dt_bias, S_ref, K ** -0.5)
        o_k = fused.gdn_step(q, k, v, a, b, A_log, dt_bias, S_k, K ** -0.5, kernels.L2NORM_EPS)
        torch.testing.assert_close(o_k, o_ref, **tol)
        torch.testing.assert_close(S_k, S_ref, **GDN_STATE_TOL)
        if kernels.fla_available():
            G = Hv // Hk
            o_fla = kernels.gated_delta_rule_fla_gated(
                q[None].repeat_interleave(G, 1), k[None].repeat_interleave(G, 1), v[None], a[None],
                b[None], A_log, dt_bias, S_fla, K ** -0.5, chunked=False)
            torch.testing.assert_close(o_k, o_fla[0], **tol)
            torch.testing.assert_close(S_k, S_fla, **GDN_STATE_TOL)
    # deterministic: the same bits on a second run from the same state
    S_again = state.clone()
    for t in range(4):
        q, k = (_randn(Hk, K, dtype=dtype, seed=10 * t + s) for s in (1, 2))
        v = _randn(Hv, V, dtype=dtype, seed=10 * t + 3)
        a, b = (_randn(Hv, dtype=dtype, seed=10 * t + s) * 3 for s in (4, 5))
        a[0] = 30.0
        fused.gdn_step(q, k, v, a, b, A_log, dt_bias, S_again, K ** -0.5, kernels.L2NORM_EPS)
    assert torch.equal(S_again, S_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_step_matches_the_unfused_static_form(dtype):
    """The captured single-token functions with the fused kernels against the same functions
    through the torch ops (the fused kernels' references, composed), from the same bytes."""
    rt = runtime(dtype)
    m, a, io = rt.model, rt.arena, rt.io
    tm = m.backbone.model
    assert tm.fused, "on CUDA with fla the single-token steps use core/fused.py"
    rt.set_instruction(INSTRUCTION)
    for o in observations(3):
        rt.step(o)
    io.obs.copy_(torch.from_numpy(observations(1, seed=5)[0]))
    io.token.fill_(65)
    start = a.base.clone()
    tol = CROSS_FORM_ATOL if dtype == "float32" else 5e-2
    try:
        for fn in (lambda: m.predict_action_chunk(a, io, None), lambda: m.token_step(a, io, None)):
            outs = []
            for use_fused in (True, False):
                a.base.copy_(start)
                tm.fused = use_fused
                fn()
                torch.cuda.synchronize()
                outs.append((a.base.clone(), io.action.clone(), io.logits.clone()))
            (b1, act1, log1), (b0, act0, log0) = outs
            assert torch.equal(b1[:64], b0[:64])                 # meta: same updates
            torch.testing.assert_close(act1, act0, atol=tol, rtol=0)
            torch.testing.assert_close(log1, log0, atol=tol, rtol=0)
            for name in a.names():
                s = a.specs[name]
                torch.testing.assert_close(b1[s.offset:s.offset + s.nbytes].view(a[name].dtype),
                                           b0[s.offset:s.offset + s.nbytes].view(a[name].dtype),
                                           atol=tol, rtol=0, msg=name)
    finally:
        tm.fused = True
        a.base.copy_(start)
