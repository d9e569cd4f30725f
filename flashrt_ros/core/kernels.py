"""Gated DeltaNet kernels: a readable pure-torch reference and the fla fast path.

Both compute, per head, with state S [K, V] (fp32), for each token t in order:

    S  <- S * exp(g_t)                          # gated decay, g_t <= 0 (log space)
    u  <- beta_t * (v_t - S^T k_t)              # delta rule: write only what S mispredicts
    S  <- S + k_t u^T
    o_t = S^T (q_t * scale)

with q, k already L2-normalised. The reference runs that loop literally (single steps on the CPU,
and the yardstick for the fast paths). `gated_delta_rule_chunked` is the same recurrence in
chunk-parallel form, in plain torch: the CPU prefill path (a loop of T tiny matmuls costs Python
and dispatch time per token; 2048 tokens took 85% of the tiny preset's prefill). `test_kernels.py`
holds both fast paths, the chunked form and fla, to the reference with named tolerances.
The fla kernels (`chunk_gated_delta_rule` for prefill chunks, `fused_recurrent_gated_delta_rule`
for one-token rows) are an optional GPU dependency, imported at their first call (fla loads every
one of its op families at import: seconds a control step does not need; the captured step runs
fused.gdn_step). The model calls them through `gated_delta_rule_fla_gated`,
which also moves the q/k L2 norms, the decay gate `g = -exp(A_log) * softplus(a + dt_bias)` and
`beta = sigmoid(b)` into the kernels (`gate_reference` is that prologue written out).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# The chunked form against the reference (both fp32 inside): it reassociates the sums, so equality
# is not expected; rounding only.
CHUNKED_ATOL = 1e-4
CHUNK = 64          # tokens per chunk: a [H, 64, 64] triangular solve per chunk and head batch

# Tolerance of the fla kernels against the reference (bf16 inputs, fp32 state): fla's chunked kernel
# reassociates the sums, so equality is not expected; these bound the drift over 64 tokens.
FLA_ATOL = 2e-2
FLA_RTOL = 2e-2
L2NORM_EPS = 1e-6   # of the q/k L2 norm, as transformers and fla write it


def f32(x):
    """x in fp32; x itself when it already is (a no-op `.float()` still costs a dispatch, which on
    the CPU is what a control step of a small model spends its time on)."""
    return x if x.dtype == torch.float32 else x.float()


def gated_delta_rule_reference(q, k, v, g, beta, state, scale):
    """Reference Gated DeltaNet over T tokens, updating `state` in place.

    Args:
        q, k:  [T, H, K] (L2-normalised along K)
        v:     [T, H, V]
        g:     [T, H]    log decay (<= 0), fp32
        beta:  [T, H]    write strength in (0, 1)
        state: [H, K, V] fp32, updated in place
        scale: float     usually K ** -0.5
    Returns:
        o: [T, H, V] in v's dtype
    """
    S = state                                                   # updated in place, [H, K, V]
    qf, kf, vf = q.float(), k.float(), v.float()
    out = []
    for t in range(q.shape[0]):
        S.mul_(torch.exp(g[t].float())[:, None, None])
        pred = torch.bmm(kf[t][:, None, :], S)[:, 0]            # S^T k      [H, V]
        u = beta[t].float()[:, None] * (vf[t] - pred)
        S.baddbmm_(kf[t][:, :, None], u[:, None, :])            # S += k u^T
        out.append(torch.bmm((qf[t] * scale)[:, None, :], S)[:, 0])
    return torch.stack(out).to(v.dtype)


def gated_delta_rule_step(q, k, v, g, beta, state, scale):
    """One token (T == 1) of `gated_delta_rule_reference`: the loop's body, the same operations in
    the same order (so the same bits), on [H, 1, .] rows instead of per-token indexing - a control
    step's path on the CPU, where each indexing operation costs as much as the arithmetic.

    Same arguments and contract as the reference with T == 1; returns o: [1, H, V] in v's dtype.
    """
    H, K, V = state.shape
    S = state
    q1, k1, v1 = (f32(x).view(H, 1, -1) for x in (q, k, v))                    # [H, 1, .]
    S.mul_(torch.exp(f32(g)).view(H, 1, 1))
    u = f32(beta).view(H, 1, 1) * (v1 - torch.bmm(k1, S))                       # [H, 1, V]
    S.baddbmm_(k1.transpose(1, 2), u)                                           # S += k u^T
    o = torch.bmm(q1 * scale, S).view(1, H, V)
    return o if o.dtype == v.dtype else o.to(v.dtype)


def gated_delta_rule_chunked(q, k, v, g, beta, state, scale, chunk: int = CHUNK):
    """The reference recurrence over chunks of `chunk` tokens, each in a few batched matmuls.

    Same contract as `gated_delta_rule_reference` (state [H, K, V] fp32 updated in place; output in
    v's dtype). Within a chunk, with G_t = g_1 + ... + g_t (cumulative log decay from the chunk's
    start), S0 the state before it, and D_ti = exp(G_t - G_i) for i <= t (0 above the diagonal):

        S_t  = exp(G_t) S0 + sum_{i<=t} D_ti k_i u_i^T                      (unrolled recurrence)
        u_t  = beta_t (v_t - exp(G_t) S0^T k_t - sum_{i<t} D_ti (k_t . k_i) u_i)
          =>  (I + A) U = beta * (V - exp(G) * (K S0)),  A_ti = beta_t D_ti (k_t . k_i), i < t
        o_t  = scale * (exp(G_t) S0^T q_t + sum_{i<=t} D_ti (q_t . k_i) u_i)
        S_C  = exp(G_C) S0 + sum_i exp(G_C - G_i) k_i u_i^T

    I + A is unit lower triangular, so U comes from one triangular solve. Every exp() argument is
    <= 0 (g <= 0), so nothing overflows.
    """
    T, H, _ = q.shape
    S = state
    # [H, T, .] so that each chunk is a batch of per-head matrices
    qf, kf, vf = (x.float().transpose(0, 1) for x in (q, k, v))
    gf, bf = g.float().transpose(0, 1), beta.float().transpose(0, 1)          # [H, T]
    out = torch.empty(H, T, v.shape[-1], dtype=torch.float32, device=v.device)
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        qc, kc, vc, bc = qf[:, s:e], kf[:, s:e], vf[:, s:e], bf[:, s:e, None]
        G = gf[:, s:e].cumsum(-1)                                               # [H, C]
        C = e - s
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        D = (G[:, :, None] - G[:, None, :]).masked_fill(~causal, float("-inf")).exp()
        A = (bc * D * (kc @ kc.transpose(1, 2))).tril(-1)                        # [H, C, C]
        eG = G.exp()[:, :, None]                                                # [H, C, 1]
        R = bc * (vc - eG * (kc @ S))                                           # [H, C, V]
        U = torch.linalg.solve_triangular(A + torch.eye(C, device=q.device), R, upper=False,
                                          unitriangular=True)
        qs = qc * scale
        out[:, s:e] = eG * (qs @ S) + (D * (qs @ kc.transpose(1, 2))) @ U
        G_end = G[:, -1:]                                                       # [H, 1]
        k_to_end = kc * (G_end - G).exp()[:, :, None]        # each k_i decayed to the chunk's end
        S.mul_(G_end.exp()[:, :, None]).add_(k_to_end.transpose(1, 2) @ U)
    return out.transpose(0, 1).to(v.dtype)


def fla_installed() -> bool:
    """Whether fla's Gated DeltaNet kernels are installed, without importing fla (which takes
    seconds): what the runtime's kernel choice needs before the first prefill."""
    import importlib.util
    import os
    spec = importlib.util.find_spec("fla")
    return bool(spec and spec.submodule_search_locations and any(
        os.path.isdir(os.path.join(d, "ops", "gated_delta_rule"))
        for d in spec.submodule_search_locations))


@functools.cache        # whether fla imports does not change within a process: try it once
def fla_available() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - ImportError or a triton/driver failure at import
        return False


def _fla_rules():
    """fla's (chunked, fused recurrent) Gated DeltaNet functions, imported on first use."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as e:  # noqa: BLE001 - ImportError or a triton/driver failure at import
        raise RuntimeError(f"runtime.kernels 'fla': fla is installed but its kernels do not import "
                           f"({type(e).__name__}: {e}); fix the fla-core/triton install or set "
                           f"runtime.kernels: reference") from e
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def gated_delta_rule_fla(q, k, v, g, beta, state, scale, chunked: bool):
    """fla Triton kernels, same contract as the reference (state updated in place)."""
    fn = _fla_rules()[0 if chunked else 1]
    # fla's chunked kernel multiplies q/k with v in one dtype: the reference's fp32 q/k go in as v's
    o, final = fn(q=q[None].to(v.dtype), k=k[None].to(v.dtype), v=v[None], g=g[None].float(),
                  beta=beta[None].to(v.dtype),
                  scale=scale, initial_state=state[None], output_final_state=True)
    state.copy_(final[0])
    return o[0]


def gate_reference(q, k, a, b, A_log, dt_bias):
    """The prologue `gated_delta_rule_fla_gated` fuses: L2-normalised q/k, log decay g, beta.

    Args:
        q, k:    [T, H, K] raw (not normalised)
        a, b:    [T, H]    raw decay and write-strength inputs
        A_log:   [H] fp32, dt_bias: [H] fp32
    Returns:
        (q, k, g, beta), all fp32
    """
    return (l2norm(q.float()), l2norm(k.float()),
            *decay_gate(a, b, -torch.exp(A_log.float()), dt_bias))


def decay_gate(a, b, neg_A, dt_bias):
    """Log decay `g = neg_A * softplus(a + dt_bias)` and write strength `beta = sigmoid(b)`, both
    fp32 ([T, H] each), as transformers computes them; neg_A = -exp(A_log) in fp32 ([H])."""
    return neg_A * F.softplus(f32(a) + f32(dt_bias)), torch.sigmoid(f32(b))


def l2norm(x, eps=L2NORM_EPS):
    """`x / sqrt(sum(x^2) + eps)` along the last axis: the form fla's kernels and transformers use.
    eps: a float, or a 0-d tensor (cheaper on the CPU's per-operation path)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule_fla_gated(q, k, v, a, b, A_log, dt_bias, state, scale, chunked: bool):
    """fla kernels with the gate prologue fused: equals `gated_delta_rule_reference` applied to
    `gate_reference(q, k, a, b, A_log, dt_bias)` up to FLA_ATOL/FLA_RTOL.

    Args:
        q, k: [T, H, K] raw; v: [T, H, V]; a, b: [T, H] raw; A_log, dt_bias: [H] fp32
        state: [H, K, V] fp32, updated in place
    """
    fn = _fla_rules()[0 if chunked else 1]
    o, final = fn(q=q[None], k=k[None], v=v[None], g=a[None], beta=b[None], scale=scale,
                  initial_state=state[None], output_final_state=True,
                  use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                  dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)
    state.copy_(final[0])
    return o[0]
