"""PolicyRuntime on a CUDA device: graph replay vs eager, determinism, no allocation after capture,
rollback exactness, and the fla kernels against the reference.

Bitwise claims (replay == eager, two runtimes, rollback) compare the uint8 arena with `torch.equal`.
Cross-path claims (fla vs reference, graph runtime vs the CPU reference runtime) use named
tolerances. core/fused.py's kernels one by one against their references: test_fused_kernels.py. Needs a GPU: CI has none; run on the device with
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
from kernel_cases import FUSED_TOL, randn

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

    def draw(*shape):
        return torch.randn(*shape, generator=g, device="cuda")
    q, k, v = draw(T, H, K).bfloat16(), draw(T, H, K).bfloat16(), draw(T, H, K).bfloat16()
    a, b = draw(T, H).bfloat16(), draw(T, H).bfloat16()
    A_log = torch.log(torch.rand(H, generator=g, device="cuda") * 15 + 1)
    dt_bias = torch.rand(H, generator=g, device="cuda") * 2 - 4
    state = draw(H, K, K) * 0.1
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


# -- core/fused.py on the GPU alone (each kernel against its reference: test_fused_kernels.py) ----


@pytest.mark.parametrize("gdn_fusion", [False, True], ids=["7-kernel-gdn", "5-kernel-gdn"])
def test_gemvs_launched_early_wait_for_the_kernel_before_them(gdn_fusion, monkeypatch):
    """Programmatic dependent launch (fused.pdl, Hopper and later): a chain of projections, each
    reading the output of the kernel before it, as a step makes them (gemv -> norm_gemv -> conv
    -> gemv with swiglu -> gated norm -> gemv; with the fusion the conv inside norm_gemv_conv
    and the gated norm inside gated_norm_gemv), eagerly and replayed from a graph with new
    inputs, gives the bytes (outputs and conv state) of the same chain launched one kernel after
    the other (FLASHRT_PDL=0). A GEMV that read its input or wrote its output or the conv state
    before the kernel before it ended would differ."""
    from flashrt_ros.core import fused
    if not fused.pdl(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or later")
    d, ffn, heads = 1024, 3584, 8
    w_in = randn("cuda", 2 * d, d, dtype=torch.bfloat16, seed=1) * d ** -0.5
    w_up = randn("cuda", 2 * ffn, d, dtype=torch.bfloat16, seed=2) * d ** -0.5
    w_down = randn("cuda", d, ffn, dtype=torch.bfloat16, seed=3) * ffn ** -0.5
    w_out = randn("cuda", d, d, dtype=torch.bfloat16, seed=4) * d ** -0.5
    scale = 1 + 0.1 * randn("cuda", d, dtype=torch.float32, seed=5)
    inputs = [randn("cuda", d, dtype=torch.bfloat16, seed=10 + i) for i in range(6)]

    conv_w = randn("cuda", 2 * ffn, 4, dtype=torch.bfloat16, seed=6)
    conv_start = randn("cuda", 3, 2 * ffn, dtype=torch.bfloat16, seed=7)
    conv_state = conv_start.clone()

    def chain(x, prefetch):         # -> the output and the conv state after it, from conv_start
        conv_state.copy_(conv_start)
        h = fused.gemv(x, w_in, prefetch=prefetch)[:d]
        if gdn_fusion:
            r, _, gu = fused.norm_gemv_conv(x, h, scale, 1e-6, w_up, conv_state, conv_w,
                                            prefetch=prefetch)
        else:
            r, gu = fused.norm_gemv(x, h, scale, 1e-6, w_up, prefetch=prefetch)
            gu = fused.conv_step(gu, conv_state, conv_w)
        y = fused.gemv(gu, w_down, swiglu=True, prefetch=prefetch)
        gw = scale[:d // heads].to(torch.bfloat16)
        if gdn_fusion:
            out = fused.gated_norm_gemv(y.view(heads, -1), r.view(heads, -1), gw, 1e-6, w_out,
                                        prefetch=prefetch)
        else:
            o = fused.gated_rms_norm(y.view(heads, -1), r.view(heads, -1), gw, 1e-6)
            out = fused.gemv(o.view(-1), w_out, prefetch=prefetch)
        return torch.cat([out, conv_state.view(-1)])

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
    proj = randn("cuda", T, (2 * H + 2 * Hkv) * D, dtype=dtype, seed=pos + T)
    q, gate = proj[:, :2 * H * D].view(T, H, 2, D).unbind(2)                  # [T, H, D] views
    kv = randn("cuda", max_ctx, 3, 2, Hkv, D, dtype=dtype, seed=pos + 1)[:, 1]   # one layer's view
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
    proj = randn("cuda", T, (2 * H + 2 * Hkv) * D, dtype=torch.bfloat16, seed=pos + T)
    q, gate = proj[:, :2 * H * D].view(T, H, 2, D).unbind(2)
    kv = randn("cuda", max_ctx, 3, 2, Hkv, D, dtype=torch.bfloat16, seed=pos + 1)[:, 1]
    kv[pos + T:] = 1e3
    meta = torch.zeros(META_LEN, dtype=torch.int64, device="cuda")
    meta[0] = pos
    want = prefill_attention_reference(q, gate, kv, meta)
    for config in CONFIGS.split(","):
        got = prefill_attention(q, gate, kv, meta, tuple(int(v) for v in config.split("x")))
        torch.testing.assert_close(got, want, **FUSED_TOL[torch.bfloat16],
                                   msg=lambda m, c=config: f"tiles {c}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gdn_fusion", [False, True], ids=["7-kernel-gdn", "5-kernel-gdn"])
def test_fused_step_matches_the_unfused_static_form(dtype, gdn_fusion, monkeypatch):
    """The captured single-token functions with the fused kernels against the same functions
    through the torch ops (the fused kernels' references, composed), from the same bytes; with
    and without the Gated DeltaNet's conv and gated norm inside its GEMVs (fused.gdn_fusion)."""
    from flashrt_ros.core import fused
    monkeypatch.setattr(fused, "gdn_fusion", lambda: gdn_fusion)
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
