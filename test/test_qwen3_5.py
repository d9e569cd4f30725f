"""The Qwen3.5 backbone against transformers' `Qwen3_5ForCausalLM`, on checkpoints transformers wrote.

Each shape below is a small random checkpoint made by transformers itself (`save_pretrained`),
loaded here with `PolicyRuntime.from_pretrained`. Equality means, for prompts of several lengths
(crossing the prefill buckets and the chunked delta rule's 64-token chunks):
  * last-position logits within LOGITS_ATOL (fp32 on both sides; the two sum in different orders);
  * 64 greedy tokens identical to `generate(do_sample=False)`;
  * after snapshot -> run on -> restore at an arbitrary boundary, the continuation identical to
    transformers' continuation of the same prefix.
Also: sharded and VLM-layout checkpoints, tokenizer.json, transformers reading what we write, and
directories that do not fit are refused naming the tensor or field.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from flashrt_ros.capsules.store import CapsuleStore
from flashrt_ros.core.config import RuntimeConfig
from flashrt_ros.core.exceptions import ConfigError
from flashrt_ros.core.models.qwen3_5 import checkpoint_qwen3_5
from flashrt_ros.core.runtime import PolicyRuntime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers = pytest.importorskip("transformers", reason="transformers is the reference (test "
                                                          "dependency in requirements.txt)")

# fp32 on both sides: the chunked delta rule, the conv and SDPA reassociate sums; measured
# differences are ~5e-6 on logits of magnitude ~5
LOGITS_ATOL = 1e-4
GREEDY_TOKENS = 64
# initializer_range well above transformers' 0.02 default: random logits then have margins that
# rounding cannot flip, so "identical greedy tokens" tests the architecture, not luck
INIT_STD = 0.2

SHAPES = {
    # GQA 4:2, value heads 2x key heads in the DeltaNet, K != V head dims, untied LM head
    "gqa-untied": dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=8, tie_word_embeddings=False),
    # attention first, no GQA, half the head dims rotary, tied LM head, conv kernel 3
    "mha-tied": dict(vocab_size=280, hidden_size=48, intermediate_size=64, num_hidden_layers=5,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=24,
                     layer_types=["full_attention", "linear_attention", "linear_attention",
                                  "full_attention", "linear_attention"],
                     linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=24,
                     linear_value_head_dim=24, linear_conv_kernel_dim=3,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.5},
                     tie_word_embeddings=True),
    # GQA 8:1 with head_dim 64 (rotary 16 of 64), the default 3:1 pattern of 8 layers
    "gqa8-deep": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=64,
                      linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=32,
                      linear_value_head_dim=32, tie_word_embeddings=False),
}
PROMPT_LENGTHS = (3, 17, 70, 133)     # < smallest bucket, 16+1, 64+4+2, 2x64+4+1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_checkpoint(directory, shape: dict, seed: int = 0, **save):
    """A random Qwen3.5 text checkpoint written by transformers; returns the reference model."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3_5TextConfig(initializer_range=INIT_STD, **shape)
    model = transformers.Qwen3_5ForCausalLM(cfg).eval()
    with torch.no_grad():       # transformers initialises these to constants: make them count
        for layer in model.model.layers:
            if hasattr(layer, "linear_attn"):
                layer.linear_attn.dt_bias.uniform_(-2.0, 1.0)
                layer.linear_attn.norm.weight.uniform_(0.5, 1.5)
            layer.input_layernorm.weight.uniform_(-0.3, 0.3)
    model.save_pretrained(str(directory), **save)
    return model


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory):
    """(transformers model, our runtime) on the same checkpoint."""
    d = tmp_path_factory.mktemp(request.param)
    ref = make_checkpoint(d, SHAPES[request.param])
    rt = PolicyRuntime.from_pretrained(str(d), RuntimeConfig(device="cpu"), max_context=512)
    return ref, rt, d


def prompt(n, vocab, seed=1):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed + n)).tolist()


def reference_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0, -1].float().numpy()


def reference_greedy(ref, ids, n):
    # an explicit mask: without one, generate() takes prompt tokens equal to pad_token_id for padding
    x = torch.tensor([ids])
    with torch.no_grad():
        out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                           min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("n", PROMPT_LENGTHS)
def test_last_logits_equal_transformers(pair, n):
    ref, rt, _ = pair
    ids = prompt(n, rt.model_cfg.vocab_size)
    rt.reset(keep_context=False)
    rt.prefill(ids)
    ours, theirs = rt.last_logits(), reference_logits(ref, ids)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("n", (17, 133))
def test_greedy_tokens_identical_to_transformers(pair, n):
    ref, rt, _ = pair
    ids = prompt(n, rt.model_cfg.vocab_size)
    rt.reset(keep_context=False)
    rt.prefill(ids)
    assert rt.decode(GREEDY_TOKENS) == reference_greedy(ref, ids, GREEDY_TOKENS)


@pytest.mark.parametrize("k", (1, 9))
def test_continuation_after_restore_equals_transformers(pair, k):
    """Snapshot after the prompt and k generated tokens, run on (other tokens, control steps),
    restore: the continuation is transformers' continuation of prompt + those k tokens."""
    ref, rt, _ = pair
    ids = prompt(70, rt.model_cfg.vocab_size)
    rt.reset(keep_context=False)
    rt.prefill(ids)
    head = rt.decode(k)
    store = CapsuleStore(rt)
    store.snapshot("boundary")
    rt.prefill(prompt(20, rt.model_cfg.vocab_size, seed=9))
    rt.decode(5)
    rt.step(np.ones(rt.model_cfg.obs_dim, np.float32))
    store.restore("boundary")
    ours = rt.decode(GREEDY_TOKENS)
    # decode(k) returned the tokens fed back; the next one was predicted but not yet consumed
    prefix = ids + head
    assert ours == reference_greedy(ref, prefix, GREEDY_TOKENS)


# On the GPU our side runs CUDA graphs and fla's kernels (where importable), transformers the CPU
# reference in fp32; fla's chunked kernels accumulate in another order and use TF32 dots.
GPU_LOGITS_ATOL = 5e-2      # measured on an H200: at most 0.022 (gqa8-deep, head_dim 64)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_gpu_graphs_equal_transformers(tmp_path, shape):
    """The captured plans on the GPU against transformers on the CPU, same checkpoint: logits
    within GPU_LOGITS_ATOL, 64 greedy tokens identical, also after a restore."""
    sys.path.insert(0, ROOT)
    from bench.compare_transformers import torch_functions
    ref = make_checkpoint(tmp_path, SHAPES[shape])
    rt = PolicyRuntime.from_pretrained(str(tmp_path), RuntimeConfig(device="cuda"), max_context=512)
    assert rt.use_graphs
    for n in PROMPT_LENGTHS:
        ids = prompt(n, rt.model_cfg.vocab_size)
        rt.reset(keep_context=False)
        rt.prefill(ids)
        with torch_functions(ref):          # transformers on the CPU: its torch code, not fla's
            theirs = reference_logits(ref, ids)
        np.testing.assert_allclose(rt.last_logits(), theirs, atol=GPU_LOGITS_ATOL, rtol=0)
    ids = prompt(133, rt.model_cfg.vocab_size)
    rt.reset(keep_context=False)
    rt.prefill(ids)
    head = rt.decode(9)
    store = CapsuleStore(rt)
    store.snapshot("boundary", tier="gpu")
    rt.decode(5)
    store.restore("boundary")
    with torch_functions(ref):
        theirs = reference_greedy(ref, ids + head, GREEDY_TOKENS)
    assert rt.decode(GREEDY_TOKENS) == theirs


def test_transformers_reads_what_we_write_and_we_read_it_back(tmp_path):
    rt = PolicyRuntime(runtime_cfg=RuntimeConfig(device="cpu"))      # the tiny preset, seeded
    checkpoint_qwen3_5.save_pretrained(rt.model, str(tmp_path))
    ref = transformers.Qwen3_5ForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = [256] + list(b"pick up the cube")
    rt.prefill(ids)
    np.testing.assert_allclose(rt.last_logits(), reference_logits(ref, ids), atol=LOGITS_ATOL,
                               rtol=0)
    back = PolicyRuntime.from_pretrained(str(tmp_path), RuntimeConfig(device="cpu"),
                                         max_context=rt.model_cfg.max_context)
    assert back.model.untrained == ()            # backbone and heads both came from files
    obs = np.linspace(-1, 1, rt.model_cfg.obs_dim, dtype=np.float32)
    fresh = PolicyRuntime(runtime_cfg=RuntimeConfig(device="cpu"))
    for r in (fresh, back):
        r.set_instruction("pick up the cube")
    assert np.array_equal(fresh.step(obs), back.step(obs))


def test_sharded_and_vlm_layout_checkpoints_load_the_same_weights(tmp_path):
    shape = SHAPES["gqa-untied"]
    ref = make_checkpoint(tmp_path / "one", shape)
    make_checkpoint(tmp_path / "sharded", shape, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / checkpoint_qwen3_5.INDEX)
    # a VLM checkpoint: text_config inside a qwen3_5 config, the text model under
    # model.language_model., a vision tower and MTP layers that are ignored
    from safetensors.torch import load_file, save_file
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    tensors = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v
               for k, v in load_file(str(tmp_path / "one" / checkpoint_qwen3_5.WEIGHTS)).items()}
    tensors["model.visual.patch_embed.proj.weight"] = torch.zeros(4, 3)
    tensors["mtp.fc.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(vlm / checkpoint_qwen3_5.WEIGHTS))
    text = json.loads((tmp_path / "one" / checkpoint_qwen3_5.CONFIG).read_text())
    (vlm / checkpoint_qwen3_5.CONFIG).write_text(json.dumps(
        {"model_type": "qwen3_5", "text_config": text, "vision_config": {"depth": 2}}))
    ids = prompt(40, shape["vocab_size"])
    expected = reference_logits(ref, ids)
    said = []
    for d in ("one", "sharded", "vlm"):
        rt = PolicyRuntime.from_pretrained(str(tmp_path / d), RuntimeConfig(device="cpu"),
                                           progress=said.append, max_context=128)
        rt.prefill(ids)
        np.testing.assert_allclose(rt.last_logits(), expected, atol=LOGITS_ATOL, rtol=0)
    assert any("vision tower is ignored" in s for s in said)


def test_tokenizer_json_encodes_the_instruction(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    make_checkpoint(tmp_path, SHAPES["gqa-untied"])
    vocab = {w: i for i, w in enumerate(["[UNK]", "pick", "up", "the", "red", "cube"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / checkpoint_qwen3_5.TOKENIZER))
    rt = PolicyRuntime.from_pretrained(str(tmp_path), RuntimeConfig(device="cpu"), max_context=64)
    assert rt.describe()["tokenizer"] == "tokenizer.json"
    assert rt.set_instruction("pick up the red cube") == 5
    assert rt.tokenizer.decode([1, 2]) == "pick up"


def _refused(d, *match):
    with pytest.raises(ConfigError) as e:
        PolicyRuntime.from_pretrained(str(d), RuntimeConfig(device="cpu"), max_context=64)
    for m in match:
        assert m in str(e.value), str(e.value)


def test_directories_that_do_not_fit_are_refused_naming_what(tmp_path):
    from safetensors.torch import load_file, save_file
    good = tmp_path / "good"
    make_checkpoint(good, SHAPES["gqa-untied"])
    tensors = load_file(str(good / checkpoint_qwen3_5.WEIGHTS))
    cfg = json.loads((good / checkpoint_qwen3_5.CONFIG).read_text())

    def variant(name, tensors=tensors, cfg=cfg):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / checkpoint_qwen3_5.WEIGHTS))
        (d / checkpoint_qwen3_5.CONFIG).write_text(json.dumps(cfg))
        return d

    missing = dict(tensors)
    del missing["model.layers.3.self_attn.k_norm.weight"]
    _refused(variant("missing", missing), "missing ['model.layers.3.self_attn.k_norm.weight']")
    _refused(variant("extra", {**tensors, "model.layers.9.mlp.up_proj.weight": torch.zeros(2)}),
             "unexpected ['model.layers.9.mlp.up_proj.weight']")
    wrong = dict(tensors)
    wrong["model.layers.0.linear_attn.A_log"] = torch.zeros(3)
    _refused(variant("shape", wrong), "model.layers.0.linear_attn.A_log: expected shape (4,), "
                                      "found (3,)")
    _refused(variant("type", cfg={**cfg, "model_type": "llama"}), "model_type: expected "
                                                                  "'qwen3_5_text'", "'llama'")
    _refused(variant("rope", cfg={**cfg, "rope_parameters": {
        "rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0],
        "original_max_position_embeddings": 64}}),
        "rope_type: expected one of default, linear, dynamic, yarn", "'longrope'")
    _refused(variant("layers", cfg={**cfg, "layer_types": ["linear_attention"] * 4}),
             "text.layer_types")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(empty, "config.json", "no such file")
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / checkpoint_qwen3_5.CONFIG).write_text(json.dumps(cfg))
    _refused(no_weights, "model.safetensors", "found neither")
    link = tmp_path / "link"
    link.mkdir()
    (link / checkpoint_qwen3_5.CONFIG).write_text(json.dumps(cfg))
    os.symlink(good / checkpoint_qwen3_5.WEIGHTS, link / checkpoint_qwen3_5.WEIGHTS)
    _refused(link, "regular file", "symlink")


def test_a_capsule_never_restores_into_another_checkpoint(tmp_path):
    """Same shapes and layout, other weights: the fingerprint (which covers the weights' digest)
    refuses the capsule and the live state stays as it was."""
    from flashrt_ros.core.config import StoreConfig
    from flashrt_ros.core.exceptions import CapsuleMismatch
    make_checkpoint(tmp_path / "a", SHAPES["gqa-untied"], seed=0)
    make_checkpoint(tmp_path / "b", SHAPES["gqa-untied"], seed=1)
    rts = [PolicyRuntime.from_pretrained(str(tmp_path / d), RuntimeConfig(device="cpu"),
                                         max_context=64) for d in ("a", "b")]
    a, b = rts
    assert a.arena.layout_digest() == b.arena.layout_digest()
    assert a.fingerprint() != b.fingerprint()
    store_cfg = StoreConfig(capsule_dir=str(tmp_path / "capsules"))
    a.prefill(prompt(10, 300))
    CapsuleStore(a, store_cfg).snapshot("x", tier="disk")
    b.prefill(prompt(12, 300))
    before = b.arena.base.clone()
    with pytest.raises(CapsuleMismatch, match="fingerprint"):
        CapsuleStore(b, store_cfg).restore("x")
    assert torch.equal(b.arena.base, before)
