"""The kernels' reference forms against independent formulations, on tiny CPU inputs.

`gated_delta_rule_reference` runs the delta rule as the loop in kernels.py's docstring (decay, then
write what the state mispredicts); here it is held to the closed per-token matrix form
`S' = exp(g) (I - beta k k^T) S + beta k v^T`, `o = S'^T (q * scale)` in float64. The fla fast paths
are held to the reference on the GPU (test_runtime_gpu.py); the chunked CPU form is held to it
here, over chunk boundaries, carried state, strong decay and bf16 inputs.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from flashrt_ros.core import kernels
from flashrt_ros.core.seeded import counter_gaussian

# fp32 reference vs float64 closed form over a few tokens: rounding only
REFERENCE_ATOL = 1e-5


def _inputs(T=7, H=2, K=4, V=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(T, H, K, generator=g), dim=-1).to(dtype)
    k = F.normalize(torch.randn(T, H, K, generator=g), dim=-1).to(dtype)
    v = torch.randn(T, H, V, generator=g).to(dtype)
    gate = -torch.rand(T, H, generator=g) * 0.5                 # log decay in (-0.5, 0]
    beta = torch.sigmoid(torch.randn(T, H, generator=g))
    state = torch.randn(H, K, V, generator=g)
    return q, k, v, gate, beta, state


def _closed_form(q, k, v, gate, beta, state, scale):
    """Per head, per token: S <- exp(g) (I - beta k k^T) S + beta k v^T; o = S^T q scale (float64)."""
    T, H, K = q.shape
    S = state.double().clone()
    out = torch.zeros(T, H, v.shape[-1], dtype=torch.float64)
    eye = torch.eye(K, dtype=torch.float64)
    for h in range(H):
        for t in range(T):
            kt, vt, qt = k[t, h].double(), v[t, h].double(), q[t, h].double()
            b, a = beta[t, h].double(), math.exp(float(gate[t, h]))
            S[h] = a * (eye - b * torch.outer(kt, kt)) @ S[h] + b * torch.outer(kt, vt)
            out[t, h] = S[h].T @ (qt * scale)
    return out, S


def test_reference_matches_closed_form():
    q, k, v, gate, beta, state = _inputs()
    scale = q.shape[-1] ** -0.5
    want_o, want_S = _closed_form(q, k, v, gate, beta, state, scale)
    S = state.clone()
    o = kernels.gated_delta_rule_reference(q, k, v, gate, beta, S, scale)
    assert o.dtype == v.dtype and o.shape == v.shape
    torch.testing.assert_close(o.double(), want_o, atol=REFERENCE_ATOL, rtol=0)
    torch.testing.assert_close(S.double(), want_S, atol=REFERENCE_ATOL, rtol=0)


def test_reference_carries_state_across_calls_bitwise():
    """T tokens in one call or one token per call: the same loop, so the same bits."""
    q, k, v, gate, beta, state = _inputs(T=6)
    scale = 0.5
    S1 = state.clone()
    o1 = kernels.gated_delta_rule_reference(q, k, v, gate, beta, S1, scale)
    S2 = state.clone()
    o2 = torch.cat([kernels.gated_delta_rule_reference(q[t:t + 1], k[t:t + 1], v[t:t + 1],
                                                       gate[t:t + 1], beta[t:t + 1], S2, scale)
                    for t in range(q.shape[0])])
    assert torch.equal(o1, o2) and torch.equal(S1, S2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_token_step_is_the_reference_bitwise(dtype):
    """gated_delta_rule_step (a control step's path on the CPU) runs the reference loop's body:
    over several tokens, token by token, the same output and state bits."""
    q, k, v, gate, beta, state = _inputs(T=5, H=3, K=4, V=6, seed=2, dtype=dtype)
    S_ref, S = state.clone(), state.clone()
    for t in range(q.shape[0]):
        one = [x[t:t + 1] for x in (q, k, v, gate, beta)]
        want = kernels.gated_delta_rule_reference(*one, S_ref, 0.5)
        got = kernels.gated_delta_rule_step(*one, S, 0.5)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want) and torch.equal(S, S_ref)


def test_reference_bf16_inputs_keep_fp32_state():
    q, k, v, gate, beta, state = _inputs(dtype=torch.bfloat16)
    S = state.clone()
    o = kernels.gated_delta_rule_reference(q, k, v, gate, beta, S, 0.5)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    want_o, want_S = _closed_form(q, k, v, gate, beta, state, 0.5)
    torch.testing.assert_close(S.double(), want_S, atol=REFERENCE_ATOL, rtol=0)
    torch.testing.assert_close(o.double(), want_o, atol=2e-2, rtol=2e-2)   # bf16 output rounding


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 200])
@pytest.mark.parametrize("decay", [0.5, 30.0])      # g in (-decay, 0]: mild, and strong enough to underflow
def test_chunked_matches_reference(T, decay):
    q, k, v, _, beta, state = _inputs(T=T, H=3, K=16, V=8, seed=T)
    gate = -torch.rand(T, 3, generator=torch.Generator().manual_seed(T + 1)) * decay
    S_ref, S = state.clone(), state.clone()
    want = kernels.gated_delta_rule_reference(q, k, v, gate, beta, S_ref, 0.25)
    got = kernels.gated_delta_rule_chunked(q, k, v, gate, beta, S, 0.25, chunk=kernels.CHUNK)
    assert got.dtype == v.dtype and got.shape == v.shape and S.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=kernels.CHUNKED_ATOL, rtol=0)
    torch.testing.assert_close(S, S_ref, atol=kernels.CHUNKED_ATOL, rtol=0)


def test_chunked_carries_state_across_chunks_and_calls():
    """Chunk boundaries inside one call and between calls: the same recurrence as one loop."""
    q, k, v, gate, beta, state = _inputs(T=50, H=2, K=8, V=4, seed=3)
    S_ref = state.clone()
    want = kernels.gated_delta_rule_reference(q, k, v, gate, beta, S_ref, 0.5)
    S = state.clone()
    got = torch.cat([kernels.gated_delta_rule_chunked(q[a:b], k[a:b], v[a:b], gate[a:b],
                                                      beta[a:b], S, 0.5, chunk=7)
                     for a, b in ((0, 20), (20, 21), (21, 50))])
    torch.testing.assert_close(got, want, atol=kernels.CHUNKED_ATOL, rtol=0)
    torch.testing.assert_close(S, S_ref, atol=kernels.CHUNKED_ATOL, rtol=0)


def test_chunked_bf16_inputs_keep_fp32_state():
    q, k, v, gate, beta, state = _inputs(T=130, H=2, K=16, V=8, seed=5, dtype=torch.bfloat16)
    S_ref, S = state.clone(), state.clone()
    want = kernels.gated_delta_rule_reference(q, k, v, gate, beta, S_ref, 0.25)
    got = kernels.gated_delta_rule_chunked(q, k, v, gate, beta, S, 0.25)
    assert got.dtype == torch.bfloat16 and S.dtype == torch.float32
    torch.testing.assert_close(S, S_ref, atol=kernels.CHUNKED_ATOL, rtol=0)
    # both outputs are fp32 values rounded to bf16: at most one bf16 step apart
    torch.testing.assert_close(got.float(), want.float(), atol=kernels.CHUNKED_ATOL, rtol=2 ** -7)


def test_gate_reference_formula():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    a, b = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    A_log, dt_bias = torch.tensor([0.0, 1.0]), torch.tensor([-3.0, 0.5])
    qn, kn, gate, beta = kernels.gate_reference(q, k, a, b, A_log, dt_bias)
    torch.testing.assert_close(qn.norm(dim=-1), torch.ones(3, 2))
    torch.testing.assert_close(kn * k.norm(dim=-1, keepdim=True), k)
    # g = -exp(A_log) * log(1 + exp(a + dt_bias)), written out independently
    want = -A_log.exp() * torch.log1p(torch.exp(a + dt_bias))
    torch.testing.assert_close(gate, want)
    assert (gate <= 0).all()
    torch.testing.assert_close(beta, 1 / (1 + torch.exp(-b)))


def test_counter_gaussian_is_a_function_of_seed_counter_index():
    idx = torch.arange(4096)
    s, c = torch.tensor(7), torch.tensor(3)
    x = counter_gaussian(s, c, idx)
    assert torch.equal(x, counter_gaussian(s.clone(), c.clone(), idx.clone()))
    assert not torch.equal(x, counter_gaussian(s, c + 1, idx))
    assert not torch.equal(x, counter_gaussian(s + 1, c, idx))
    assert torch.isfinite(x).all()
    # 4096 draws: mean within ~6 sigma of 0, std within a few percent of 1
    assert abs(x.mean().item()) < 0.1
    assert 0.9 < x.std().item() < 1.1

