"""Checkpoint directories read as transformers reads them, where a config.json is less plain than
what `save_pretrained` writes: rope scaling (in `rope_parameters`, or a `rope_scaling` entry beside
it), keys left out, a VLM's tying flag, a list of end tokens, copied directories, index entries
written `./name`. transformers 5.x (the test dependency) is the reference: each directory is read
by it and by `PolicyRuntime.from_pretrained`, and what it computes is compared, or our refusal is
checked to name the key, what was expected and what to do.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from flashrt_ros.capsules.store import CapsuleStore
from flashrt_ros.core.config import RuntimeConfig, StoreConfig
from flashrt_ros.core.exceptions import ConfigError
from flashrt_ros.core.models.qwen3_5 import checkpoint_qwen3_5
from flashrt_ros.core.runtime import PolicyRuntime
from test_qwen3_5 import (GPU_LOGITS_ATOL, INIT_STD, LOGITS_ATOL, ROOT, SHAPES,  # noqa: F401
                          make_checkpoint, one_thread, prompt, reference_greedy, reference_logits)

transformers = pytest.importorskip("transformers")

# rotary width 16 (8 frequencies), so that yarn's ramp has room; prompts longer than the
# pretraining context the yarn variants name (64 positions)
ROPE_SHAPE = dict(SHAPES["gqa-untied"], head_dim=32,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                   "partial_rotary_factor": 0.5})
BASE_ROPE = ROPE_SHAPE["rope_parameters"]
LONG_PROMPT = 133


def runtime(d, **overrides):
    return PolicyRuntime.from_pretrained(str(d), RuntimeConfig(device="cpu"),
                                         **{"max_context": 256, **overrides})


def our_logits(rt, ids):
    rt.reset(keep_context=False)
    rt.prefill(ids)
    return rt.last_logits()


def transformers_logits(d, ids):
    ref = transformers.Qwen3_5ForCausalLM.from_pretrained(str(d)).eval()
    return reference_logits(ref, ids)


@pytest.fixture(scope="module")
def rope_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("rope")
    make_checkpoint(d, ROPE_SHAPE)
    return d


def with_config(src, dst, edit):
    """A copy of checkpoint `src` at `dst` whose config.json is `edit(config)`."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / checkpoint_qwen3_5.CONFIG).read_text())
    (dst / checkpoint_qwen3_5.CONFIG).write_text(json.dumps(edit(cfg)))
    return dst


def refused(d, *match, **overrides):
    with pytest.raises(ConfigError) as e:
        runtime(d, **overrides)
    for m in match:
        assert m in str(e.value), str(e.value)
    return str(e.value)


# -- rope scaling -------------------------------------------------------------------------------

ROPE_VARIANTS = {
    "linear": {"rope_parameters": {**BASE_ROPE, "rope_type": "linear", "factor": 2.0}},
    # within max_position_embeddings the dynamic frequencies are the default ones
    "dynamic": {"rope_parameters": {**BASE_ROPE, "rope_type": "dynamic", "factor": 4.0}},
    "yarn": {"rope_parameters": {**BASE_ROPE, "rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 64}},
    "yarn-mscale": {"rope_parameters": {**BASE_ROPE, "rope_type": "yarn", "factor": 8.0,
                                        "original_max_position_embeddings": 48, "mscale": 0.707,
                                        "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False}},
    "yarn-attention-factor": {"rope_parameters": {**BASE_ROPE, "rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 64,
                                                  "attention_factor": 1.3}},
    # what model cards tell users to add: a rope_scaling entry beside rope_parameters
    # (transformers reads it in place of rope_parameters)
    "rope_scaling beside rope_parameters": {
        "rope_parameters": BASE_ROPE,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    # an older config.json: rope_theta at the top level, rope_scaling with the legacy `type` key
    "legacy rope_scaling": {"rope_parameters": None, "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.5,
                            "rope_scaling": {"type": "linear", "factor": 3.0}},
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_is_applied_as_transformers_applies_it(rope_checkpoint, tmp_path, variant):
    def edit(cfg):
        cfg = {**cfg, **ROPE_VARIANTS[variant]}
        return {k: v for k, v in cfg.items() if v is not None}
    d = with_config(rope_checkpoint, tmp_path / "variant", edit)
    ids = prompt(LONG_PROMPT, ROPE_SHAPE["vocab_size"])
    theirs = transformers_logits(d, ids)
    plain = transformers_logits(rope_checkpoint, ids)
    if variant != "dynamic":        # the scaling changes what transformers computes
        assert np.abs(theirs - plain).max() > 100 * LOGITS_ATOL
    np.testing.assert_allclose(our_logits(runtime(d), ids), theirs, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["linear", "dynamic", "yarn", "yarn-mscale",
                                     "yarn-attention-factor"])
def test_scaled_ropes_written_and_read_back_are_transformers_frequencies(variant):
    """The frequencies (and cos/sin scale) equal transformers' to the bit, and the config.json
    our save_pretrained writes (`TextConfig.to_hf`) is read by transformers as the same rope and
    back by us as the same TextConfig."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from flashrt_ros.core.config import TextConfig
    from flashrt_ros.core.models.qwen3_5.modeling_qwen3_5 import rope_frequencies
    text = TextConfig.from_hf({"model_type": "qwen3_5_text", **ROPE_SHAPE,
                               **ROPE_VARIANTS[variant]})
    hf = {k: v for k, v in text.to_hf().items() if k not in ("model_type", "architectures")}
    theirs = transformers.Qwen3_5TextConfig(**hf)
    assert TextConfig.from_hf(theirs.to_dict()) == text
    inv_freq, scale = ROPE_INIT_FUNCTIONS[text.rope_scaling.rope_type](theirs, None)
    ours = rope_frequencies(text)
    assert torch.equal(ours[0], inv_freq) and ours[1] == scale


@pytest.mark.gpu
def test_a_scaled_rope_on_the_gpu_plans_equals_transformers(rope_checkpoint, tmp_path):
    """The captured plans and the fused kernels read the scaled cos/sin tables as they read the
    default ones: yarn with an attention factor (tables not of unit length) against transformers
    on the CPU, after a prefill and over greedy steps."""
    sys.path.insert(0, ROOT)
    from bench.compare_transformers import torch_functions
    d = with_config(rope_checkpoint, tmp_path / "yarn",
                    lambda cfg: {**cfg, **ROPE_VARIANTS["yarn-attention-factor"]})
    ref = transformers.Qwen3_5ForCausalLM.from_pretrained(str(d)).eval()
    rt = PolicyRuntime.from_pretrained(str(d), RuntimeConfig(device="cuda"), max_context=256)
    assert rt.use_graphs
    ids = prompt(LONG_PROMPT, ROPE_SHAPE["vocab_size"])
    with torch_functions(ref):
        theirs = reference_logits(ref, ids)
        greedy = reference_greedy(ref, ids, 64)
    np.testing.assert_allclose(our_logits(rt, ids), theirs, atol=GPU_LOGITS_ATOL, rtol=0)
    assert rt.decode(64) == greedy


def test_rope_scaling_that_would_drop_rope_parameters_values_is_refused(rope_checkpoint, tmp_path):
    """transformers reads rope_scaling in place of rope_parameters: rope_theta 1e7 given there is
    dropped for its default 10000 without a word. Refused, saying what to move where."""
    d = with_config(rope_checkpoint, tmp_path / "both", lambda cfg: {
        **cfg, "rope_parameters": {**BASE_ROPE, "rope_theta": 1e7},
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                         "original_max_position_embeddings": 64}})
    assert transformers.AutoConfig.from_pretrained(str(d)).rope_parameters["rope_theta"] == 10000.0
    refused(d, "rope_scaling", "rope_theta", "10000000.0", "into rope_parameters")


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
      "original_max_position_embeddings": 64}, ("'longrope'", "default, linear, dynamic, yarn")),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, ("'llama3'", "default, linear, dynamic, yarn")),
    ({"rope_type": "linear"}, ("factor",)),
    ({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64},
     ("factor", "0.5")),
])
def test_rope_types_not_computed_here_are_refused(rope_checkpoint, tmp_path, rope, match):
    d = with_config(rope_checkpoint, tmp_path / "other",
                    lambda cfg: {**cfg, "rope_parameters": {**BASE_ROPE, **rope}})
    refused(d, "rope", *match)


def test_dynamic_rope_past_max_position_embeddings_is_refused(rope_checkpoint, tmp_path):
    """Past max_position_embeddings transformers recomputes dynamic frequencies at every call from
    the longest position in it, which a cached context cannot reproduce: the context is held
    within it instead."""
    d = with_config(rope_checkpoint, tmp_path / "dynamic", lambda cfg: {
        **cfg, "max_position_embeddings": 128,
        "rope_parameters": {**BASE_ROPE, "rope_type": "dynamic", "factor": 2.0}})
    refused(d, "max_context", "128", "dynamic", max_context=256)
    rt = runtime(d, max_context=128)
    ids = prompt(100, ROPE_SHAPE["vocab_size"])
    np.testing.assert_allclose(our_logits(rt, ids), transformers_logits(d, ids),
                               atol=LOGITS_ATOL, rtol=0)


# -- keys left out ------------------------------------------------------------------------------

def test_the_defaults_are_transformers_own():
    from flashrt_ros.core.config import HF_TEXT_DEFAULTS
    cfg = transformers.Qwen3_5TextConfig()
    for key, value in HF_TEXT_DEFAULTS.items():
        theirs = cfg.rope_parameters[key] if key in ("rope_theta", "partial_rotary_factor") \
            else getattr(cfg, key)
        assert value == theirs, key


def test_keys_left_out_of_config_json_take_transformers_defaults(tmp_path):
    """No rope keys (rope_theta 10000), no tie_word_embeddings (untied), no head_dim (256): what
    transformers builds from such a file, not the tiny preset's values."""
    shape = {k: v for k, v in SHAPES["gqa-untied"].items()
             if k not in ("head_dim", "tie_word_embeddings")}
    make_checkpoint(tmp_path, shape)
    cfg = json.loads((tmp_path / checkpoint_qwen3_5.CONFIG).read_text())
    for key in ("rope_parameters", "rope_theta", "partial_rotary_factor", "tie_word_embeddings",
                "head_dim", "max_position_embeddings"):
        cfg.pop(key, None)
    (tmp_path / checkpoint_qwen3_5.CONFIG).write_text(json.dumps(cfg))
    ids = prompt(40, shape["vocab_size"])
    rt = runtime(tmp_path)
    text = rt.model_cfg.text
    assert (text.rope_theta, text.tie_word_embeddings, text.head_dim) == (10000.0, False, 256)
    np.testing.assert_allclose(our_logits(rt, ids), transformers_logits(tmp_path, ids),
                               atol=LOGITS_ATOL, rtol=0)


# -- a VLM checkpoint's tying -------------------------------------------------------------------

@pytest.mark.parametrize("top,text", [(True, False), (False, True)])
def test_a_vlm_checkpoint_ties_by_its_top_level_flag(tmp_path, top, text):
    """Qwen3_5ForConditionalGeneration ties lm_head to the embedding by the top-level
    tie_word_embeddings; its text_config's flag is not read."""
    shape = dict(SHAPES["gqa-untied"], tie_word_embeddings=text)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                  out_hidden_size=shape["hidden_size"], num_position_embeddings=16, patch_size=4)
    cfg = transformers.Qwen3_5Config(text_config=dict(shape, initializer_range=INIT_STD),
                                     vision_config=vision, tie_word_embeddings=top)
    torch.manual_seed(0)
    ref = transformers.Qwen3_5ForConditionalGeneration(cfg).eval()
    ref.save_pretrained(str(tmp_path))
    rt = runtime(tmp_path)
    assert rt.model_cfg.text.tie_word_embeddings is top
    ids = prompt(40, shape["vocab_size"])
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0, -1].float().numpy()
    np.testing.assert_allclose(our_logits(rt, ids), theirs, atol=LOGITS_ATOL, rtol=0)


# -- end tokens ---------------------------------------------------------------------------------

def cli_generate(model_dir, text, n, capsys):
    """`flashrt-ros generate` in this process: (exit status, the generated token ids)."""
    from flashrt_ros.cli.main import main
    rc = main(["generate", "--model", str(model_dir), "--max-new-tokens", str(n), text])
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "(greedy):" in x)
    return rc, ast.literal_eval(line.split("(greedy):", 1)[1].strip())


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_a_list_of_eos_token_ids_stops_at_any_of_them(tmp_path, capsys, where):
    """eos_token_id [a, b] in config.json, or in generation_config.json beside a config.json that
    names one id (a Qwen3.5 checkpoint's layout): generation stops where transformers' stops, at
    b as at a."""
    shape = SHAPES["gqa-untied"]
    ref = make_checkpoint(tmp_path / "plain", shape)
    text = "pick up the cube"
    ids = [256] + list(text.encode())          # the byte tokenizer (no tokenizer.json)
    free = reference_greedy(ref, ids, 24)
    k = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    unused = next(t for t in range(shape["vocab_size"]) if t not in free)
    eos = [unused, free[k]]

    def edit(cfg):
        cfg["eos_token_id"] = eos if where == "config.json" else unused
        return cfg
    d = with_config(tmp_path / "plain", tmp_path / "eos", edit)
    gen = d / "generation_config.json"
    if where == "config.json":
        gen.unlink(missing_ok=True)
    else:
        gen.write_text(json.dumps({"eos_token_id": eos}))
    ref = transformers.Qwen3_5ForCausalLM.from_pretrained(str(d)).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24,
                              do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert theirs == free[:k + 1]               # transformers stopped at the second id
    rc, ours = cli_generate(d, text, 24, capsys)
    assert rc == 0 and ours == theirs[:-1]      # the end token itself is not printed


# -- copied directories -------------------------------------------------------------------------

def test_a_capsule_restores_into_the_same_weights_from_a_copied_directory(tmp_path):
    make_checkpoint(tmp_path / "original", SHAPES["gqa-untied"])
    shutil.copytree(tmp_path / "original", tmp_path / "renamed copy")
    a, b = runtime(tmp_path / "original"), runtime(tmp_path / "renamed copy")
    assert a.fingerprint() == b.fingerprint()
    store_cfg = StoreConfig(capsule_dir=str(tmp_path / "capsules"))
    a.prefill(prompt(30, 300))
    CapsuleStore(a, store_cfg).snapshot("x", tier="disk")
    expected = a.decode(16)
    b.prefill(prompt(12, 300))
    CapsuleStore(b, store_cfg).restore("x")
    assert b.decode(16) == expected


# -- index entries ------------------------------------------------------------------------------

def test_index_entries_written_dot_slash_load_and_names_that_escape_are_refused(tmp_path):
    shape = SHAPES["gqa-untied"]
    ref = make_checkpoint(tmp_path / "sharded", shape, max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / checkpoint_qwen3_5.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1

    def with_entries(name, rename):
        d = tmp_path / name
        shutil.copytree(tmp_path / "sharded", d)
        (d / checkpoint_qwen3_5.INDEX).write_text(json.dumps(
            {**index, "weight_map": {k: rename(v) for k, v in index["weight_map"].items()}}))
        return d

    ids = prompt(40, shape["vocab_size"])
    dotted = with_entries("dotted", lambda v: "./" + v)
    np.testing.assert_allclose(our_logits(runtime(dotted), ids), reference_logits(ref, ids),
                               atol=LOGITS_ATOL, rtol=0)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tmp_path / "sharded" / shards[0], outside / shards[0])
    for name, rename in (("up", lambda v: f"../outside/{v}" if v == shards[0] else v),
                         ("dot-up", lambda v: f"./../outside/{v}" if v == shards[0] else v),
                         ("absolute", lambda v: str(outside / v) if v == shards[0] else v),
                         ("subdir", lambda v: f"sub/{v}" if v == shards[0] else v)):
        d = with_entries(name, rename)
        (d / "sub").mkdir()
        shutil.copy(tmp_path / "sharded" / shards[0], d / "sub" / shards[0])
        refused(d, "expected a file name inside", shards[0])
    link = with_entries("link", lambda v: v)
    os.unlink(link / shards[0])
    os.symlink(outside / shards[0], link / shards[0])
    refused(link, "regular file", "symlink")
