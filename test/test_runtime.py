"""PolicyRuntime on the CPU: determinism, rollback, reset, refused inputs, config errors, weights.

Every claim of exactness compares bytes (`torch.equal` on the uint8 arena, `np.array_equal` on
actions). Paths that are only equal to rounding (chunked vs token-by-token prefill, the static
graph form vs the dynamic form) are compared with a named tolerance.

The `tiny` preset runs a step in ~2 ms on one core. Torch is held to one intra-op thread here:
on a busy 2-core CI machine, two OpenMP threads spinning against other processes made the same
steps ten times slower.
"""
import dataclasses

import numpy as np
import pytest
import torch

from flashrt_ros.core.arena import META_EPISODE, META_POSITION, META_RNG_COUNTER, META_STEP
from flashrt_ros.core.config import (ModelConfig, RuntimeConfig, TextConfig, from_dict, load_preset,
                                     resolve_device)
from flashrt_ros.core.exceptions import ConfigError, InputError, RollbackUnavailable
from flashrt_ros.core.runtime import PolicyRuntime

INSTRUCTION = "pick up the red cup and put it on the tray"

# fp32, 4 layers: chunked prefill and the token-by-token form reassociate sums only
PREFILL_ATOL = 1e-4
# the static (graph) form attends over all max_context rows with a mask; the dynamic form over the
# live prefix: same math, different reduction lengths
STATIC_ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(preset="tiny", model=None, **runtime):
    cfg = model or load_preset(preset)
    return PolicyRuntime(cfg, RuntimeConfig(device="cpu", **runtime))


def observations(n, dim=14, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randn(dim).astype(np.float32) for _ in range(n)]


def small(rt):
    return rt.arena.base[: rt.arena.small_nbytes].clone()


def everything(rt):
    return rt.arena.base.clone()


# -- determinism --------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_same_inputs_same_actions_and_same_arena_bytes(noise):
    runs = []
    for _ in range(2):
        rt = make(action_noise=noise, sample_seed=5)
        rt.set_instruction(INSTRUCTION)
        actions = [rt.step(o) for o in observations(12)]
        tokens = rt.decode(4)
        runs.append((rt, actions, tokens))
    (a, acts_a, tok_a), (b, acts_b, tok_b) = runs
    assert all(np.array_equal(x, y) for x, y in zip(acts_a, acts_b))
    assert tok_a == tok_b
    assert torch.equal(a.arena.base, b.arena.base)
    assert a.fingerprint() == b.fingerprint()
    # the sampler's counter lives in the arena and advanced once per step, noise or not
    assert int(a.arena.meta[META_RNG_COUNTER]) == 12
    assert int(a.arena.meta[META_STEP]) == 12


def test_action_noise_draws_from_the_arena_seed():
    obs = observations(6)

    def actions(**kw):
        rt = make(**kw)
        rt.set_instruction(INSTRUCTION)
        return np.stack([rt.step(o) for o in obs])

    clean = actions()
    noisy = actions(action_noise=0.3, sample_seed=1)
    assert np.array_equal(noisy, actions(action_noise=0.3, sample_seed=1))
    assert not np.array_equal(noisy, clean)
    assert not np.array_equal(noisy, actions(action_noise=0.3, sample_seed=2))
    # the same draw is not reused across steps: step-to-step noise differences are not constant
    d = noisy - clean
    assert not np.allclose(d[1], d[2])


def test_bfloat16_preset_is_deterministic_on_cpu():
    cfg = load_preset("tiny", dtype="bfloat16")
    a, b = make(model=cfg), make(model=cfg)
    for rt in (a, b):
        rt.set_instruction(INSTRUCTION)
        for o in observations(4):
            rt.step(o)
    assert torch.equal(a.arena.base, b.arena.base)
    assert a.arena["kv"].dtype == torch.bfloat16
    assert a.model.backbone.model.layers[0].linear_attn.A_log.dtype == torch.float32  # decay: fp32


# -- rollback -----------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_rollback_restores_small_region_and_replays_the_same_actions(noise):
    rt = make(action_noise=noise, rollback_depth=8)
    rt.set_instruction(INSTRUCTION)
    obs = observations(10)
    states, acts = [small(rt)], []
    for o in obs:
        acts.append(rt.step(o))
        states.append(small(rt))
    step, position = rt.rollback(4)                         # back to the state after 6 steps
    assert (step, position) == (6, rt.context_len)
    assert rt.step_count == 6 and rt.position == rt.context_len
    assert torch.equal(small(rt), states[6])
    for i in range(6, 10):                                  # replay: the same actions, bit for bit
        assert np.array_equal(rt.step(obs[i]), acts[i])
        assert torch.equal(small(rt), states[i + 1])


def test_rollback_undoes_decoded_tokens():
    rt = make()
    rt.set_instruction(INSTRUCTION)
    p0 = rt.position
    first = rt.decode(3)
    assert rt.position == p0 + 3
    rt.rollback(2)
    assert rt.position == p0 + 1
    # last_hidden is rolled back too: the next token is the one decoded at that point
    assert rt.next_token() == first[1]
    assert rt.decode(2) == first[1:]


def test_rollback_beyond_the_ring_changes_nothing():
    rt = make(rollback_depth=4)
    rt.set_instruction(INSTRUCTION)
    for o in observations(6):
        rt.step(o)
    before, mirrors = everything(rt), (rt.step_count, rt.position, rt.episode)
    assert rt.ring.available == 4
    for k in (5, 100, 0, -1, 1.5, "2"):
        with pytest.raises(RollbackUnavailable):
            rt.rollback(k)
        assert torch.equal(rt.arena.base, before)
        assert (rt.step_count, rt.position, rt.episode) == mirrors
    rt.rollback(4)                                          # the ring's full depth still works
    assert rt.step_count == 2
    with pytest.raises(RollbackUnavailable, match="holds 0"):
        rt.rollback(1)


def test_rollback_does_not_cross_set_instruction_or_reset():
    rt = make()
    rt.set_instruction(INSTRUCTION)
    rt.step(observations(1)[0])
    rt.set_instruction("another task")
    with pytest.raises(RollbackUnavailable):
        rt.rollback(1)
    rt.step(observations(1)[0])
    rt.reset()
    with pytest.raises(RollbackUnavailable):
        rt.rollback(1)


@pytest.mark.parametrize("start", ["reset", "reset-empty", "restore", "instruction"])
def test_rollback_to_the_ring_reset_point_is_byte_exact(start):
    # the ring's oldest entry after a reset/restore/instruction is its reset-point buffer, not a
    # ring slot: rolling all the way back must give the bytes of that moment,
    # episode id included, and reset(keep_context=True) afterwards must still return there
    rt = make(rollback_depth=8)
    rt.set_instruction(INSTRUCTION)
    obs = observations(6)
    for o in obs[:2]:
        rt.step(o)
    saved = rt.live_state().clone()
    rt.step(obs[2])
    if start == "reset":
        rt.reset(keep_context=True)
    elif start == "reset-empty":
        rt.reset(keep_context=False)
    elif start == "restore":
        rt.restore_state(saved)
    else:
        rt.set_instruction("another task")
    at_start, mirrors = rt.live_state().clone(), (rt.step_count, rt.position, rt.episode)
    extra = 0
    if start == "reset-empty":
        rt.prefill([1, 2, 3])           # an empty context takes no observation step
        extra = 1
    for o in obs[3:]:
        rt.step(o)
    rt.rollback(3 + extra)
    assert torch.equal(rt.live_state(), at_start)
    assert (rt.step_count, rt.position, rt.episode) == mirrors
    with pytest.raises(RollbackUnavailable):
        rt.rollback(1)
    rt.step(obs[3])
    episode = rt.reset(keep_context=True)
    back = small(rt)
    meta = back[:64].view(torch.int64)
    assert int(meta[META_EPISODE]) == episode
    if start != "reset-empty":
        assert torch.equal(back[64:], at_start[64:rt.arena.small_nbytes])


def test_rollback_disabled():
    rt = make(rollback_depth=0)
    rt.set_instruction(INSTRUCTION)
    rt.step(observations(1)[0])
    with pytest.raises(RollbackUnavailable):
        rt.rollback(1)


# -- reset --------------------------------------------------------------------------------------
def test_reset_keep_context_returns_to_the_post_instruction_state():
    rt = make()
    rt.set_instruction(INSTRUCTION)
    after_instruction, ctx = small(rt), rt.context_len
    kv_prefix = rt.live_state().clone()
    obs = observations(5)
    first_episode = [rt.step(o) for o in obs]
    rt.decode(3)
    episode = rt.reset(keep_context=True)
    assert episode == rt.episode and rt.position == ctx and rt.step_count == 0
    now = small(rt)
    meta_now, meta_then = now[:64].view(torch.int64), after_instruction[:64].view(torch.int64)
    assert int(meta_now[META_EPISODE]) == episode != int(meta_then[META_EPISODE])
    keep = torch.ones(8, dtype=torch.bool)
    keep[META_EPISODE] = False
    assert torch.equal(meta_now[keep], meta_then[keep])     # everything but the episode id
    assert torch.equal(now[64:], after_instruction[64:])
    assert torch.equal(rt.live_state(), torch.cat([now, kv_prefix[rt.arena.small_nbytes:]]))
    assert all(np.array_equal(rt.step(o), a) for o, a in zip(obs, first_episode))


def test_reset_without_context_empties_the_state():
    rt = make()
    rt.set_instruction(INSTRUCTION)
    rt.step(observations(1)[0])
    rt.reset(keep_context=False)
    assert rt.position == 0 and rt.step_count == 0 and rt.context_len == 0
    assert rt.live_nbytes() == rt.arena.small_nbytes
    assert int(rt.arena.meta[META_EPISODE]) == rt.episode


# -- refused inputs leave the state untouched ---------------------------------------------------
BAD_OBSERVATIONS = {
    "short": np.zeros(13, np.float32),
    "long": np.zeros(15, np.float32),
    "2-D": np.zeros((1, 14), np.float32),
    "scalar": 1.0,
    "nan": np.r_[np.zeros(13), np.nan],
    "inf": np.r_[np.zeros(13), -np.inf],
    "overflows float32": np.r_[np.zeros(13), 1e300],
    "numeric strings": ["1.0"] * 14,
    "string": "0" * 14,
    "None": None,
    "dict": {"x": 1},
    "ragged": [[1.0], [1.0, 2.0]],
    "bools": np.ones(14, bool),
    "complex": np.ones(14, np.complex64),
}


@pytest.mark.parametrize("name", sorted(BAD_OBSERVATIONS))
def test_invalid_observation_is_refused_and_nothing_changes(name):
    rt = make()
    rt.set_instruction(INSTRUCTION)
    rt.step(observations(1)[0])
    before, mirrors, ring = everything(rt), (rt.step_count, rt.position), rt.ring.available
    with pytest.raises(InputError, match="observation"):
        rt.step(BAD_OBSERVATIONS[name])
    assert torch.equal(rt.arena.base, before)
    assert (rt.step_count, rt.position) == mirrors and rt.ring.available == ring


def test_integer_and_float64_observations_are_accepted():
    a, b = make(), make()
    a.set_instruction(INSTRUCTION)
    b.set_instruction(INSTRUCTION)
    assert np.array_equal(a.step(list(range(14))), b.step(np.arange(14, dtype=np.float64)))


BAD_TOKENS = {
    "negative": [1, -1],
    "past vocab": [1, 260],
    "float": [1, 2.0],
    "bool": [True],
    "empty": [],
    "None": None,
    "int": 5,
    "bytes": b"abc",
    "characters": ["a"],
}


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
def test_invalid_tokens_are_refused_and_nothing_changes(name):
    rt = make()
    rt.set_instruction(INSTRUCTION)
    before, mirrors = everything(rt), (rt.position, rt.episode, rt.context_len)
    with pytest.raises(InputError, match="tokens"):
        rt.set_instruction(BAD_TOKENS[name])
    with pytest.raises(InputError, match="tokens"):
        rt.prefill(BAD_TOKENS[name])
    assert torch.equal(rt.arena.base, before)
    assert (rt.position, rt.episode, rt.context_len) == mirrors


def test_token_tensors_and_arrays_are_accepted():
    a, b, c = make(), make(), make()
    ids = [256, 10, 20, 30]
    a.set_instruction(ids)
    b.set_instruction(torch.tensor(ids))
    c.set_instruction(np.array(ids))
    assert torch.equal(a.arena.base, b.arena.base) and torch.equal(a.arena.base, c.arena.base)


def test_too_long_instruction_is_refused_and_nothing_changes():
    rt = make(model=load_preset("tiny", max_context=64))
    rt.set_instruction("short")
    before, mirrors = everything(rt), (rt.position, rt.episode, rt.context_len)
    with pytest.raises(InputError, match="exceed"):
        rt.set_instruction("x" * 63)                        # BOS + 63 bytes > 63 usable rows
    with pytest.raises(InputError, match="exceed"):
        rt.prefill([1] * (64 - rt.position))
    with pytest.raises(InputError, match="exceed"):
        rt.decode(64 - rt.position)
    assert torch.equal(rt.arena.base, before)
    assert (rt.position, rt.episode, rt.context_len) == mirrors
    assert rt.set_instruction("x" * 62) == 63               # exactly the usable rows
    rt.step(observations(1)[0])                             # the scratch row is still free


@pytest.mark.parametrize("n", [-1, 1.5, "3", True])
def test_invalid_decode_count_is_refused(n):
    rt = make()
    rt.set_instruction(INSTRUCTION)
    before = everything(rt)
    with pytest.raises(InputError, match="decode"):
        rt.decode(n)
    assert torch.equal(rt.arena.base, before)
    assert rt.decode(0) == []


# -- decode -------------------------------------------------------------------------------------
def test_decode_is_deterministic_and_appends_kv():
    a, b = make(), make()
    out = []
    for rt in (a, b):
        rt.set_instruction(INSTRUCTION)
        p = rt.position
        toks = rt.decode(6)
        assert rt.position == p + 6 and rt.live_nbytes() == rt.arena.live_nbytes(p + 6)
        assert all(0 <= t < rt.model_cfg.vocab_size for t in toks)
        out.append(toks)
    assert out[0] == out[1]
    assert torch.equal(a.live_state(), b.live_state())
    # decoding token by token through the public API gives the same continuation
    c = make()
    c.set_instruction(INSTRUCTION)
    assert [c.decode(1)[0] for _ in range(6)] == out[0]


# -- restore ------------------------------------------------------------------------------------
def test_restore_state_round_trip_and_refusals():
    rt = make()
    rt.set_instruction(INSTRUCTION)
    obs = observations(8)
    for o in obs[:3]:
        rt.step(o)
    saved = rt.live_state().clone()
    later = [rt.step(o) for o in obs[3:]]
    rt.decode(2)
    before = everything(rt)
    refused = [saved[:-1], saved.view(torch.int64) if saved.numel() % 8 == 0 else saved.float(),
               saved.float(), saved[None], torch.zeros(10, dtype=torch.uint8)]
    lying = saved.clone()
    lying[:64].view(torch.int64)[META_POSITION] += 1        # claims one more KV row than it has
    for bad in refused + [lying, "bytes"]:
        with pytest.raises(InputError, match="restore"):
            rt.restore_state(bad)
        assert torch.equal(rt.arena.base, before)
    rt.restore_state(saved)
    assert torch.equal(rt.live_state(), saved)
    assert rt.step_count == 3 and rt.position == rt.context_len
    assert all(np.array_equal(rt.step(o), a) for o, a in zip(obs[3:], later))
    # the restored state is where reset(keep_context=True) now returns to
    rt.reset()
    assert torch.equal(small(rt)[64:], saved[64:rt.arena.small_nbytes])


# -- prefill forms ------------------------------------------------------------------------------
def test_chunked_prefill_matches_token_by_token_within_tolerance():
    chunked = make(prefill_buckets=(16, 4))
    single = make(prefill_buckets=(1024,))                  # fewer tokens than the bucket: token steps
    tokens = [256] + list(range(40, 40 + 52))               # 53 = 3x16 + 4 + 1
    for rt in (chunked, single):
        rt.set_instruction(tokens)
    assert chunked.position == single.position == 53
    for name in chunked.arena.names():
        if name == "meta":
            assert torch.equal(chunked.arena["meta"], single.arena["meta"])
        else:
            torch.testing.assert_close(chunked.arena[name], single.arena[name],
                                       atol=PREFILL_ATOL, rtol=0, msg=name)
    obs = observations(3)
    for o in obs:
        np.testing.assert_allclose(chunked.step(o), single.step(o), atol=PREFILL_ATOL, rtol=0)


def test_static_graph_form_matches_the_dynamic_form_on_cpu():
    """The functions the CUDA plans capture (pos=None: position read from the arena, masked attention
    over all max_context rows) against the dynamic form, from the same arena bytes."""
    rt = make()
    m, a, io = rt.model, rt.arena, rt.io
    rt.set_instruction(INSTRUCTION)
    start = everything(rt)

    def both(fn):
        a.base.copy_(start)
        fn(rt.position)
        dyn = (a.base.clone(), io.action.clone(), io.logits.clone())
        a.base.copy_(start)
        fn(None)
        return dyn, (a.base.clone(), io.action.clone(), io.logits.clone())

    io.obs.copy_(torch.from_numpy(observations(1)[0]))
    io.chunks[16].copy_(torch.arange(16) + 100)
    io.token.fill_(42)
    for fn in (lambda p: m.predict_action_chunk(a, io, p), lambda p: m.token_step(a, io, p),
               lambda p: m.prefill_chunk(a, io, p, io.chunks[16])):
        (db, dact, dlog), (sb, sact, slog) = both(fn)
        assert torch.equal(db[:64], sb[:64])                # meta: the same position/step updates
        for name in a.names():
            s = a.specs[name]
            dv = db[s.offset:s.offset + s.nbytes].view(a[name].dtype)
            sv = sb[s.offset:s.offset + s.nbytes].view(a[name].dtype)
            torch.testing.assert_close(dv, sv, atol=STATIC_ATOL, rtol=0, msg=name)
        torch.testing.assert_close(dact, sact, atol=STATIC_ATOL, rtol=0)
        torch.testing.assert_close(dlog, slog, atol=STATIC_ATOL, rtol=0)


def _assert_arenas_close(a, want, got, atol):
    assert torch.equal(want[:64], got[:64])                 # meta: the same position updates
    for name in a.names():
        s = a.specs[name]
        torch.testing.assert_close(got[s.offset:s.offset + s.nbytes].view(a[name].dtype),
                                   want[s.offset:s.offset + s.nbytes].view(a[name].dtype),
                                   atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("start", ["0", "37", "last rows"])
def test_static_prefill_form_matches_the_dynamic_form_for_every_bucket_at_any_position(start):
    """Every prefill plan is captured on CUDA in its static form (pos=None: the position read
    from the arena), one plan per bucket for every position: each bucket's static function, run
    eagerly here, against the dynamic form from the same bytes, after a prefix of 0 or 37 tokens
    or one that leaves the chunk exactly the last usable rows of the arena."""
    rt = make()
    m, a, io = rt.model, rt.arena, rt.io
    buckets = [c for c in rt.cfg.prefill_buckets if c <= rt.max_tokens]
    assert buckets == [256, 64, 16, 4]
    rng = np.random.RandomState(3)
    for c in buckets:
        p = rt.max_tokens - c if start == "last rows" else int(start)
        rt.reset(keep_context=False)
        if p:
            rt.prefill(rng.randint(0, rt.model_cfg.vocab_size, size=p).tolist())
        assert rt.position == p
        io.chunks[c].copy_(torch.from_numpy(rng.randint(0, rt.model_cfg.vocab_size, size=c)))
        before = everything(rt)
        m.prefill_chunk(a, io, p, io.chunks[c])
        dynamic = everything(rt)
        a.base.copy_(before)
        m.prefill_chunk(a, io, None, io.chunks[c])
        assert int(a.meta[META_POSITION]) == p + c
        _assert_arenas_close(a, dynamic, everything(rt), STATIC_ATOL)


@pytest.mark.parametrize("position", [0, 37, 448])
def test_prefill_attention_reference_is_the_dynamic_forms_attention(position):
    """core/models/qwen3_5/prefill_attention_qwen3_5.py's reference (what the GPU kernel is held
    to) against the model's dynamic form of a chunk's attention (SDPA over the live prefix, causal
    at the position) and its output gate, for a GQA layer, from a KV cache whose rows past the
    chunk hold garbage."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right
    from flashrt_ros.core.arena import META_LEN
    from flashrt_ros.core.models.qwen3_5.prefill_attention_qwen3_5 import (
        prefill_attention_reference)
    T, H, Hkv, D, max_ctx = 64, 4, 2, 32, 512
    g = torch.Generator().manual_seed(position)
    q, gate = torch.randn(2, T, H, D, generator=g).unbind(0)
    kv = torch.randn(max_ctx, 2, Hkv, D, generator=g) * 50      # garbage past the chunk
    kv[:position + T] /= 50
    meta = torch.zeros(META_LEN, dtype=torch.int64)
    meta[META_POSITION] = position
    L = position + T
    keys, vals = kv[:L, 0].transpose(0, 1), kv[:L, 1].transpose(0, 1)           # [Hkv, L, D]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], vals[None],
                                       attn_mask=causal_lower_right(T, L), enable_gqa=True)[0]
    want = o.transpose(0, 1) * torch.sigmoid(gate)
    torch.testing.assert_close(prefill_attention_reference(q, gate, kv, meta), want,
                               atol=STATIC_ATOL, rtol=0)


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_traced_cpu_plans_replay_their_eager_function_bit_for_bit(noise):
    """The step plans of a small model on the CPU replay a torch.jit.trace of their function
    (plans.StepPlan.trace); each replay is held to an eager run of the same function from the
    same arena bytes, byte for byte, across steps, decoding, a restore to another position and a
    longer context (the trace must read the position from the arena, not keep the one it saw)."""
    rt = make(action_noise=noise)
    assert [n for n, p in rt.plans.items() if p.traced] == ["observation", "token", "lm_head"]
    rt.set_instruction(INSTRUCTION)
    early_bytes = rt.live_state().clone()
    early = (rt.position, rt.step_count, rt.episode, rt.context_len)

    def check(name, prepare):
        plan = rt.plans[name]
        start = everything(rt)
        prepare()
        plan.run_eager()
        eager = (everything(rt), rt.io.action.clone(), rt.io.logits.clone())
        rt.arena.base.copy_(start)
        prepare()
        plan.run()
        for want, got in zip(eager, (everything(rt), rt.io.action, rt.io.logits)):
            assert torch.equal(want, got), name

    for i, obs in enumerate(observations(12)):
        check("observation", lambda: rt.io.obs.copy_(torch.from_numpy(obs)))
        if i % 3 == 2:
            check("lm_head", lambda: None)
            check("token", lambda: rt.io.token.fill_(40 + i))
            rt.decode(2)                       # the runtime's own path moves the position
        if i == 6:
            rt.restore_state(early_bytes, early)
        if i == 8:
            rt.prefill(list(range(30)))


def test_traced_plans_are_small_cpu_models_only_and_trace_over_copies():
    """auto traces where a step is per-operation overhead (d_model <= 256, the CPU); eager and a
    larger model trace nothing; tracing runs over scratch copies, so a traced runtime starts
    from the same bytes as an eager one and steps to the same actions (to the static form's
    rounding: eager plans read the position from the host and attend over the live prefix)."""
    traced, eager = make(), make(cpu_plans="eager")
    assert not any(p.traced for p in eager.plans.values())
    assert torch.equal(traced.arena.base, eager.arena.base)
    for obs in observations(4):
        np.testing.assert_allclose(traced.step(obs), eager.step(obs), atol=STATIC_ATOL, rtol=0)
    wide = dataclasses.replace(load_preset("tiny"), text=dataclasses.replace(
        load_preset("tiny").text, hidden_size=512))
    assert not RuntimeConfig(device="cpu").resolve(wide).traced_steps
    assert RuntimeConfig(device="cpu", cpu_plans="traced").resolve(wide).traced_steps
    with pytest.raises(ConfigError, match="runtime.cpu_plans: expected auto, traced or eager"):
        RuntimeConfig(cpu_plans="graph")


def test_instruction_tokens_are_what_set_instruction_prefills_and_refusals_change_nothing():
    rt = make()
    rt.set_instruction(INSTRUCTION)
    before = everything(rt)
    tokens = rt.instruction_tokens("go left")
    assert tokens == rt.tokenizer.encode("go left")
    with pytest.raises(InputError, match="expected at most .* characters"):
        rt.instruction_tokens("x" * rt.model_cfg.max_context)      # refused by its length, unread
    with pytest.raises(InputError, match="exceed"):
        rt.instruction_tokens([1] * rt.model_cfg.max_context)
    assert torch.equal(everything(rt), before) and rt.context_tokens
    assert rt.set_instruction(tokens) == len(tokens)


# -- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, values, field, found", [
    (TextConfig, {"hidden_size": 0}, "text.hidden_size", "0"),
    (TextConfig, {"num_hidden_layers": 2.5}, "text.num_hidden_layers", "2.5"),
    (TextConfig, {"num_attention_heads": 3, "num_key_value_heads": 2}, "text.num_attention_heads",
     "3"),
    (TextConfig, {"linear_conv_kernel_dim": 1}, "text.linear_conv_kernel_dim", "1"),
    (TextConfig, {"layer_types": ["linear_attention"] * 4}, "text.layer_types",
     "['linear_attention', 'linear_attention', 'linear_attention', 'linear_attention']"),
    (TextConfig, {"partial_rotary_factor": 0.3}, "text.partial_rotary_factor", "0.3"),
    (ModelConfig, {"dtype": "float8"}, "model.dtype", "'float8'"),
    (ModelConfig, {"horizon": 0}, "model.horizon", "0"),
    (RuntimeConfig, {"device": "tpu"}, "runtime.device", "'tpu'"),
    (RuntimeConfig, {"prefill_buckets": (16, 0)}, "runtime.prefill_buckets", "[16, 0]"),
    (RuntimeConfig, {"rollback_depth": -1}, "runtime.rollback_depth", "-1"),
    (RuntimeConfig, {"action_noise": -0.1}, "runtime.action_noise", "-0.1"),
    (RuntimeConfig, {"kernels": "cuda"}, "runtime.kernels", "'cuda'"),
])
def test_config_errors_name_field_expected_and_found(cls, values, field, found):
    with pytest.raises(ConfigError) as e:
        cls(**values)
    msg = str(e.value)
    assert msg.startswith(field + ": expected ") and f"found {found}" in msg


def test_config_tables_refuse_unknown_keys_and_presets():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['d_modle'\]"):
        from_dict(ModelConfig, {"d_modle": 8})
    with pytest.raises(ConfigError, match="no preset named 'nope'"):
        load_preset("nope")
    with pytest.raises(ConfigError, match="preset name"):
        load_preset("../tiny")
    assert from_dict(RuntimeConfig, {"prefill_buckets": [4, 16]}).prefill_buckets == (16, 4)
    assert load_preset("tiny") == dataclasses.replace(ModelConfig(), name="tiny")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requests_without_cuda_are_config_errors():
    with pytest.raises(ConfigError, match="runtime.device: expected a usable CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="runtime.kernels: 'fla' needs a CUDA device"):
        make(kernels="fla")
    assert resolve_device("auto") == torch.device("cpu")


def test_chunked_prefill_agrees_with_the_reference_loop():
    """The CPU default (chunked prefill) against the literal loop, through the whole model: every
    named buffer after a 300-token instruction within 1e-3 (measured: at most 7e-5, in the KV of
    the last attention layer, which sees the rounding difference of three DeltaNet layers), and
    the same greedy next token."""
    ref, fast = make(kernels="reference"), make(kernels="chunked")
    assert (ref.kernel, fast.kernel) == ("reference", "chunked")
    tokens = [(7 * i + 3) % 260 for i in range(300)]
    for rt in (ref, fast):
        rt.set_instruction(tokens)
    for name in ref.arena.names():
        torch.testing.assert_close(fast.arena[name].float(), ref.arena[name].float(),
                                   atol=1e-3, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert fast.decode(1) == ref.decode(1)


def test_describe_and_fingerprint():
    a, b = make(), make(model=load_preset("tiny", seed=1))
    d = a.describe()
    assert d["model"] == "tiny" and d["device"] == "cpu" and d["kernels"] == "chunked"
    assert not d["cuda_graphs"]
    assert d["fixed_state_bytes"] == a.arena.small_nbytes == a.arena.specs["kv"].offset
    assert d["state_bytes_per_token"] == 4 * 1 * 2 * 1 * 32   # fp32 x attn layers x k|v x kv heads x dim
    assert a.fingerprint() == make().fingerprint() != b.fingerprint()
    assert [x["name"] for x in d["buffers"]] == a.arena.names()
