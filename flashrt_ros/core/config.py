"""Configuration: one frozen dataclass per concern, validated at construction.

* `ModelConfig`   - the network's shapes; fixes the arena layout and every captured graph.
* `RuntimeConfig` - where and how the model runs (device, graphs, prefill buckets, rollback depth).
* `StoreConfig`   - capsule tiers: budgets, directory, eviction policy.

A config holds what was asked for, "auto" included. `RuntimeConfig.resolve` and the `StoreConfig`
`resolve_*` methods are the one place where "auto" becomes a concrete value for the machine the
config runs on (the device, the kernels, the thread count, the default tier, the block size).

Presets live in `config/presets/<name>.yaml` (the `tiny` preset is also embedded here so that the
package works with no files at all). Every field is documented once, in `field(metadata={"help"})`;
the node declares its ROS parameters from these tables and the CLI prints them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from flashrt_ros.core.exceptions import ConfigError

if TYPE_CHECKING:
    import torch


def _f(default, help, read_only=False, **kw):
    return field(default=default, metadata={"help": help, "read_only": read_only, **kw})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(cond: bool, name: str, expected: str, found: Any, fix: str = "") -> None:
    if not cond:
        msg = f"{name}: expected {expected}, found {found!r}"
        raise ConfigError(msg + (f"; {fix}" if fix else ""))


LAYER_TYPES = ("linear_attention", "full_attention")
# d_model up to which a model counts as small on the CPU: one intra-op thread, traced step plans
SMALL_D_MODEL = 256
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
# What a key left out of a checkpoint's config.json means: transformers' Qwen3_5TextConfig
# defaults (test_checkpoint_conformance holds them to it), never the tiny preset's values
HF_TEXT_DEFAULTS = {
    "vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "max_position_embeddings": 32768, "rope_theta": 10_000.0,
    "partial_rotary_factor": 0.25,
}


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are scaled for long contexts: the `rope_type` of transformers'
    `rope_parameters` and the keys of it that type reads (modeling_rope_utils), computed by
    `qwen3_5.rope_frequencies` as transformers computes them.

    default: no scaling. linear: the frequencies divided by `factor`. dynamic (NTK): transformers
    keeps the default frequencies up to `original_max_position_embeddings` (its
    max_position_embeddings) and recomputes them at every call past it from the longest position
    in the call, which a cached context cannot reproduce; so `ModelConfig` holds max_context within
    it. yarn: each frequency blended between itself and itself / `factor` by where it lies between
    `beta_fast` and `beta_slow` rotations over `original_max_position_embeddings`; cos and sin
    scaled by `attention_factor` (when None, from `factor`, `mscale` and `mscale_all_dim`).
    """
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = HF_TEXT_DEFAULTS["max_position_embeddings"]
    attention_factor: float | None = None
    beta_fast: float | None = None          # None: 32
    beta_slow: float | None = None          # None: 1
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        _check(self.rope_type in ROPE_TYPES, "rope_type", f"one of {', '.join(ROPE_TYPES)} (the "
               f"types computed here; longrope switches its frequencies per call, as dynamic does "
               f"past max_position_embeddings)", self.rope_type,
               "use one of those, or serve this model with transformers")
        _check(_is_number(self.factor) and self.factor >= 1, "factor", "a number >= 1",
               self.factor)
        _check(_is_int(self.original_max_position_embeddings)
               and self.original_max_position_embeddings > 0,
               "original_max_position_embeddings", "a positive integer",
               self.original_max_position_embeddings)
        for n in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            v = getattr(self, n)
            _check(v is None or (_is_number(v) and v >= 0), n, "a number >= 0 or null", v)
        _check(isinstance(self.truncate, bool), "truncate", "true or false", self.truncate)

    @classmethod
    def from_hf(cls, rope: Mapping[str, Any], max_position_embeddings: int,
                where: str) -> "RopeScaling":
        """From a `rope_parameters` object as transformers standardised it (`rope_type`, or the
        legacy `type`), refusing a missing key the type needs as transformers does."""
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        values = {"rope_type": rope_type}       # a type not computed here: refused below
        if rope_type in ROPE_TYPES and rope_type != "default":
            _check("factor" in rope, f"{where}: rope '{rope_type}'", "a 'factor' key",
                   sorted(rope), "add the scaling factor (e.g. 4.0 for 4x the pretraining context)")
            values["factor"] = rope["factor"]
        if rope_type == "dynamic":
            # transformers rescales past max_position_embeddings (its rope keys do not say)
            values["original_max_position_embeddings"] = max_position_embeddings
        elif rope_type == "yarn":
            values["original_max_position_embeddings"] = rope.get(
                "original_max_position_embeddings", max_position_embeddings)
            original = values["original_max_position_embeddings"]
            if values["factor"] is None and _is_number(original) and original > 0:
                values["factor"] = max_position_embeddings / original
            values.update({k: rope[k] for k in ("attention_factor", "beta_fast", "beta_slow",
                                                 "mscale", "mscale_all_dim", "truncate")
                           if k in rope})
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """The keys of `rope_parameters` this scaling writes (transformers reads them back)."""
        if self.rope_type == "default":
            return {"rope_type": "default"}
        out = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "yarn":
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
            out.update({k: getattr(self, k) for k in ("attention_factor", "beta_fast", "beta_slow",
                                                      "mscale", "mscale_all_dim")
                        if getattr(self, k) is not None})
            out["truncate"] = self.truncate
        return out


def _hf_rope(config: Mapping[str, Any], where: str) -> tuple[float, float, RopeScaling]:
    """(rope_theta, partial_rotary_factor, scaling) of a config.json, read as transformers 5 reads
    them (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict): a `rope_scaling` object
    replaces `rope_parameters` whole, and rope_theta and partial_rotary_factor missing from the
    object come from the top-level keys, else from transformers' defaults. Where that drops a value
    `rope_parameters` gives (transformers does so without a word) the file is refused."""
    params, scaling = config.get("rope_parameters"), config.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        _check(value is None or isinstance(value, Mapping), f"{where}: {key}", "an object or null",
               value)
    rope = dict(scaling or params or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        rope.setdefault(key, config.get(key, HF_TEXT_DEFAULTS[key]))
    if scaling and params:
        dropped = {k: params[k] for k in ("rope_theta", "partial_rotary_factor")
                   if k in params and params[k] != rope[k]}
        if dropped:
            raise ConfigError(
                f"{where}: rope_scaling: transformers reads it in place of rope_parameters, so "
                f"rope_parameters' {dropped} would not apply (it computes with "
                f"{ {k: rope[k] for k in dropped} }); expected rope_scaling to repeat them; move "
                f"the rope_scaling keys into rope_parameters and delete rope_scaling, or add "
                f"{dropped} to rope_scaling")
    per_layer = sorted(set(rope) & set(LAYER_TYPES))
    _check(not per_layer, f"{where}: rope_parameters", "one object for all layers (rope_type, "
           "rope_theta, ...)", f"one per layer type: {per_layer}",
           "Qwen3.5 has one rope for its attention layers; keep the full_attention one")
    which = "rope_scaling" if scaling else "rope_parameters"
    max_positions = config.get("max_position_embeddings",
                               HF_TEXT_DEFAULTS["max_position_embeddings"])
    top_original = config.get("original_max_position_embeddings")
    if top_original is not None:        # transformers prefers a top-level value (Phi3's layout)
        rope["original_max_position_embeddings"] = top_original
    return (rope["rope_theta"], rope["partial_rotary_factor"],
            RopeScaling.from_hf(rope, max_positions, f"{where}: {which}"))


def _token_ids(v) -> tuple:
    """eos_token_id as transformers takes it (null, one id or a list) -> a tuple of ids."""
    if v is None:
        return ()
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


@dataclass(frozen=True)
class TextConfig:
    """The Qwen3.5 text backbone, field for field as transformers' `Qwen3_5TextConfig` names it
    (a checkpoint's `config.json`, or the `text_config` of a Qwen3.5 VLM checkpoint).

    `layer_types[i]` is `linear_attention` (Gated DeltaNet) or `full_attention` (gated softmax
    attention); Qwen3.5 checkpoints alternate them 3:1. Only the fields the architecture reads are
    kept; `from_hf` refuses values this implementation does not compute (another rope type, biases,
    another activation) instead of computing something else.
    """
    vocab_size: int = 260
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 32
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 2
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    linear_conv_kernel_dim: int = 4
    layer_types: tuple = ("linear_attention",) * 3 + ("full_attention",)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = True
    eos_token_id: tuple = ()      # the ids that end a generation (any of them); () = none

    def __post_init__(self):
        for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
                  "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                  "linear_conv_kernel_dim"):
            v = getattr(self, n)
            _check(_is_int(v) and v > 0, f"text.{n}", "a positive integer", v)
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "text.num_attention_heads",
               f"a multiple of num_key_value_heads={self.num_key_value_heads}",
               self.num_attention_heads)
        _check(self.linear_num_value_heads % self.linear_num_key_heads == 0,
               "text.linear_num_value_heads",
               f"a multiple of linear_num_key_heads={self.linear_num_key_heads}",
               self.linear_num_value_heads)
        _check(self.linear_conv_kernel_dim >= 2, "text.linear_conv_kernel_dim", "at least 2",
               self.linear_conv_kernel_dim)
        types = tuple(self.layer_types) if isinstance(self.layer_types, (list, tuple)) else None
        _check(types is not None and len(types) == self.num_hidden_layers
               and all(x in LAYER_TYPES for x in types), "text.layer_types",
               f"{self.num_hidden_layers} entries (num_hidden_layers), each one of {LAYER_TYPES}",
               self.layer_types)
        object.__setattr__(self, "layer_types", types)
        _check("full_attention" in types, "text.layer_types",
               "at least one full_attention layer (it holds the context)", list(types))
        _check(_is_number(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1, "text.rms_norm_eps",
               "a number in (0, 1)", self.rms_norm_eps)
        _check(_is_number(self.rope_theta) and self.rope_theta > 1, "text.rope_theta",
               "a number > 1", self.rope_theta)
        rot = self.head_dim * self.partial_rotary_factor if _is_number(self.partial_rotary_factor) else 0
        _check(_is_number(self.partial_rotary_factor) and 0 < self.partial_rotary_factor <= 1
               and int(rot) % 2 == 0 and int(rot) > 0, "text.partial_rotary_factor",
               f"a number in (0, 1] giving an even rotary width of head_dim={self.head_dim}",
               self.partial_rotary_factor)
        if isinstance(self.rope_scaling, Mapping):
            try:
                scaling = from_dict(RopeScaling, self.rope_scaling, where="text.rope_scaling")
            except ConfigError as e:
                raise ConfigError(f"text.rope_scaling: {e}") from None
            object.__setattr__(self, "rope_scaling", scaling)
        _check(isinstance(self.rope_scaling, RopeScaling), "text.rope_scaling", "a RopeScaling",
               self.rope_scaling)
        _check(self.rope_scaling.rope_type != "dynamic" or self.rotary_dim > 2,
               "text.partial_rotary_factor", "a rotary width above 2 for dynamic rope",
               self.partial_rotary_factor)
        _check(isinstance(self.tie_word_embeddings, bool), "text.tie_word_embeddings",
               "true or false", self.tie_word_embeddings)
        eos = _token_ids(self.eos_token_id) if _is_int(self.eos_token_id) \
            or isinstance(self.eos_token_id, (list, tuple)) or self.eos_token_id is None else None
        _check(eos is not None and all(_is_int(t) and 0 <= t < self.vocab_size for t in eos),
               "text.eos_token_id", f"null, a token id or a list of token ids below "
               f"vocab_size={self.vocab_size}", self.eos_token_id)
        object.__setattr__(self, "eos_token_id", eos)

    @property
    def attn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def lin_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def conv_dim(self) -> int:
        """Channels of the short causal conv: q | k | v of the Gated DeltaNet."""
        return (2 * self.linear_num_key_heads * self.linear_key_head_dim
                + self.linear_num_value_heads * self.linear_value_head_dim)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], where: str = "config.json") -> "TextConfig":
        """From a transformers `config.json` mapping: `qwen3_5_text`, or a Qwen3.5 VLM checkpoint's
        `text_config` (`qwen3_5`). Keys this architecture does not read are ignored; values it
        cannot compute are refused, naming the key, what was expected and what was found."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, found {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type == "qwen3_5":
            text = config.get("text_config")
            if not isinstance(text, Mapping):
                raise ConfigError(f"{where}: model_type 'qwen3_5' (a VLM checkpoint) needs a "
                                  f"'text_config' object, found {text!r}")
            # Qwen3_5ForConditionalGeneration ties its lm_head by the top-level flag (false when
            # absent), and generate() takes the top-level eos_token_id before the text_config's
            outer = {"tie_word_embeddings": config.get("tie_word_embeddings", False)}
            if config.get("eos_token_id") is not None:
                outer["eos_token_id"] = config["eos_token_id"]
            return cls.from_hf({**text, "model_type": "qwen3_5_text", **outer},
                               where + " text_config")
        if model_type != "qwen3_5_text":
            raise ConfigError(f"{where}: model_type: expected 'qwen3_5_text' (Qwen3_5ForCausalLM) "
                              f"or 'qwen3_5' (its VLM), found {model_type!r}; this runtime serves "
                              f"the Qwen3.5 family only")
        act = config.get("hidden_act", "silu")
        _check(act == "silu", f"{where}: hidden_act", "'silu'", act)
        _check(not config.get("attention_bias", False), f"{where}: attention_bias", "false",
               config.get("attention_bias"))
        # a key left out means what transformers makes of it, not what the tiny preset has
        hf = {**HF_TEXT_DEFAULTS, **config}
        theta, partial, scaling = _hf_rope(config, where)
        types = config.get("layer_types")
        if types is None and _is_int(hf["num_hidden_layers"]):
            every = config.get("full_attention_interval", 4)
            _check(_is_int(every) and every > 0, f"{where}: full_attention_interval",
                   "a positive integer (every n-th layer is full attention)", every)
            types = ["linear_attention" if (i + 1) % every else "full_attention"
                     for i in range(hf["num_hidden_layers"])]
        values = {f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in HF_TEXT_DEFAULTS}
        values.update(layer_types=types, rope_theta=theta, partial_rotary_factor=partial,
                      rope_scaling=scaling, eos_token_id=config.get("eos_token_id"))
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """The `config.json` of a `Qwen3_5ForCausalLM` with these shapes (transformers reads it)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["layer_types"] = list(self.layer_types)
        eos = self.eos_token_id
        out["eos_token_id"] = (list(eos) if len(eos) > 1 else eos[0]) if eos else None
        del out["rope_scaling"]
        out["rope_parameters"] = {**self.rope_scaling.to_hf(), "rope_theta": out.pop("rope_theta"),
                                  "partial_rotary_factor": out.pop("partial_rotary_factor")}
        if self.rope_scaling.rope_type == "dynamic":
            out["max_position_embeddings"] = self.rope_scaling.original_max_position_embeddings
        out.update(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"],
                   hidden_act="silu", attention_bias=False)
        return out


@dataclass(frozen=True)
class ModelConfig:
    """A policy: the Qwen3.5 text backbone plus its observation encoder, action head and MTP head.

    `text` fixes the backbone; the other fields fix the heads and the arena (`max_context` rows of
    KV). Presets (`config/presets/<name>.yaml`) and checkpoint directories both produce one.
    """
    name: str = _f("tiny", "preset name or checkpoint directory name (where the model came from: "
                           "not part of fingerprints)", True)
    text: TextConfig = field(default_factory=TextConfig,
                             metadata={"help": "the Qwen3.5 text backbone (config.json fields)",
                                       "read_only": True})
    obs_dim: int = _f(14, "observation vector length", True)
    action_dim: int = _f(7, "action vector length", True)
    horizon: int = _f(8, "action chunk length", True)
    mtp_depth: int = _f(2, "multi-token head: latent tokens predicted ahead", True)
    max_context: int = _f(512, "tokens of KV the arena holds (instruction + control steps)", True)
    dtype: str = _f("float32", "weights/KV dtype: float32, bfloat16 or float16", True)
    seed: int = _f(0, "seed of the deterministic default weights (where no checkpoint has them)", True)
    seed_rng: str = _f("cpu", "how the default weights are drawn, the same bytes on every device "
                              "either way: cpu (torch's CPU generator, copied to the device; "
                              "tiny's trained heads know these) or device (core/seeded.py: drawn "
                              "on the device, for large presets)", True)

    def __post_init__(self):
        if isinstance(self.text, Mapping):
            object.__setattr__(self, "text", from_dict(TextConfig, self.text, where="model.text"))
        _check(isinstance(self.text, TextConfig), "model.text", "a TextConfig", self.text)
        for n in ("obs_dim", "action_dim", "horizon", "mtp_depth", "max_context"):
            v = getattr(self, n)
            _check(_is_int(v) and v > 0, f"model.{n}", "a positive integer", v)
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
               "one of float32, bfloat16, float16", self.dtype)
        _check(self.max_context >= 2, "model.max_context", "at least 2 (one row is scratch)",
               self.max_context)
        rope = self.text.rope_scaling
        _check(rope.rope_type != "dynamic"
               or self.max_context <= rope.original_max_position_embeddings,
               "model.max_context", f"at most {rope.original_max_position_embeddings} "
               f"(max_position_embeddings) with rope_type 'dynamic': past it transformers "
               f"recomputes the frequencies at every call from the longest position in it, which "
               f"a cached context cannot reproduce", self.max_context,
               "lower max_context, or scale with rope_type 'yarn' or 'linear'")
        _check(_is_int(self.seed) and self.seed >= 0, "model.seed", "an integer >= 0", self.seed)
        _check(self.seed_rng in ("cpu", "device"), "model.seed_rng", "cpu or device",
               self.seed_rng)

    @property
    def d_model(self) -> int:
        return self.text.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size


@dataclass(frozen=True)
class RuntimeConfig:
    """How the model runs."""
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available)", True)
    cuda_graphs: bool = _f(True, "capture step/prefill plans as CUDA graphs (CUDA only)", True)
    cpu_plans: str = _f("auto", "how the step plans run on the CPU: traced (recorded once with "
                                "torch.jit.trace and replayed in TorchScript's interpreter, the "
                                "counterpart of a CUDA graph), eager, or auto (traced for presets "
                                "with d_model <= 256, where a step is mostly per-operation "
                                "overhead)", True)
    prefill_buckets: tuple = _f((4096, 1024, 256, 64, 16, 4),
                                "exact prefill chunk lengths, one plan each (longer than the context: unused)",
                                True)
    rollback_depth: int = _f(16, "committed steps kept for rollback(k) (0 disables)", True)
    action_noise: float = _f(0.0, "std of sampled action noise (the sampler's RNG lives in the arena)", True)
    sample_seed: int = _f(0, "initial seed of the arena's sampler RNG")
    kernels: str = _f("auto", "auto (CUDA: fla when importable, else reference; CPU: chunked), fla, "
                               "chunked (CPU only: reference steps, chunk-parallel prefill) or "
                               "reference; a VLA (SmolVLA) takes Triton kernels on CUDA unless "
                               "reference", True)
    threads: int = _f(0, "torch CPU (intra-op) threads the node sets at configure: 0 = auto (1 for "
                         "presets with d_model <= 256, where handing tiny ops to a second thread "
                         "costs more than it saves; else torch's default), N > 0 = N", True)
    cache_dir: str = _f("~/.flashrt/cache", "directory of the compile and autotuning caches "
                                            "(Triton; CUDA only), one subdirectory per GPU, driver "
                                            "and package versions ('' = Triton's defaults)", True)

    def __post_init__(self):
        d = self.device
        _check(isinstance(d, str) and (d in ("auto", "cpu", "cuda")
                                       or (d.startswith("cuda:") and d[5:].isdigit())),
               "runtime.device", "cpu, cuda, cuda:N or auto", d)
        b = tuple(self.prefill_buckets) if isinstance(self.prefill_buckets, (list, tuple)) else ()
        _check(len(b) > 0 and all(_is_int(x) and 0 < x <= 1 << 20 for x in b),
               "runtime.prefill_buckets", "a non-empty list of positive integers",
               list(b) if b else self.prefill_buckets)
        object.__setattr__(self, "prefill_buckets", tuple(sorted(set(b), reverse=True)))
        _check(_is_int(self.rollback_depth) and 0 <= self.rollback_depth <= 4096,
               "runtime.rollback_depth", "an integer in [0, 4096]", self.rollback_depth)
        _check(_is_number(self.action_noise) and 0.0 <= self.action_noise < float("inf"),
               "runtime.action_noise", "a finite float >= 0", self.action_noise)
        _check(_is_int(self.sample_seed) and 0 <= self.sample_seed < 1 << 32,
               "runtime.sample_seed", "an integer in [0, 2^32)", self.sample_seed)
        _check(isinstance(self.cuda_graphs, bool), "runtime.cuda_graphs", "true or false",
               self.cuda_graphs)
        _check(self.cpu_plans in ("auto", "traced", "eager"), "runtime.cpu_plans",
               "auto, traced or eager", self.cpu_plans)
        _check(self.kernels in ("auto", "fla", "chunked", "reference"), "runtime.kernels",
               "auto, fla, chunked or reference", self.kernels)
        _check(isinstance(self.threads, int) and not isinstance(self.threads, bool)
               and 0 <= self.threads <= 1024, "runtime.threads", "an integer in [0, 1024] (0 = auto)",
               self.threads)
        _check(isinstance(self.cache_dir, str), "runtime.cache_dir", "a directory path or ''",
               self.cache_dir)

    def resolve(self, model_cfg: ModelConfig) -> "ResolvedRuntime":
        """The device, kernels and thread count this config means on this machine for `model_cfg`.

        Raises ConfigError where the machine cannot do what the config asks (a CUDA device where
        there is none, kernels the device does not run)."""
        from flashrt_ros.core.compile_cache import use_compile_cache
        from flashrt_ros.core.kernels import fla_installed
        device = resolve_device(self.device)
        cuda = device.type == "cuda"
        # before fla is imported: its autotuners read the cache setting when they load
        compile_cache = use_compile_cache(self.cache_dir, device)
        kernels = self.kernels
        if kernels == "auto":
            # the chunked form has only been validated on the CPU (no CUDA graph capture of its
            # triangular solve yet), so CUDA without fla keeps the reference loop
            kernels = ("fla" if fla_installed() else "reference") if cuda else "chunked"
        if kernels == "chunked" and cuda:
            raise ConfigError("runtime.kernels: 'chunked' runs on the CPU only (its triangular solve "
                              f"is not validated under CUDA graph capture); found device "
                              f"{device}; use 'auto', 'fla' or 'reference' on CUDA")
        if kernels == "fla" and not (cuda and fla_installed()):
            raise ConfigError("runtime.kernels: 'fla' needs a CUDA device and fla's kernels "
                              "(the fla-core package); found device "
                              f"{device} and fla installed={fla_installed()}; use 'auto'")
        # tiny ops cost more handed to a second thread than they save, and their dispatch more
        # than their arithmetic
        small = model_cfg.d_model <= SMALL_D_MODEL
        threads = self.threads or (1 if small else 0)
        traced = not cuda and (self.cpu_plans == "traced" or (self.cpu_plans == "auto" and small))
        return ResolvedRuntime(device=device, kernels=kernels, threads=threads,
                               compile_cache=compile_cache, traced_steps=traced)


@dataclass(frozen=True)
class ResolvedRuntime:
    """A RuntimeConfig's choices made concrete (`RuntimeConfig.resolve`): no "auto" is left."""
    device: "torch.device"   # cpu or cuda:N
    kernels: str             # fla, chunked or reference
    threads: int             # torch CPU (intra-op) threads; 0 = torch's default
    compile_cache: str = ""  # Triton's cache directory (core/compile_cache.py); '' = not set
    traced_steps: bool = False   # the step plans are traced (CPU; plans.StepPlan.trace)


def resolve_device(name: str) -> "torch.device":
    """The torch device `runtime.device` names: auto is cuda when available, else cpu."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: expected a usable CUDA device for {name!r}, found none "
                          f"(torch {torch.__version__}, cuda available: False); use device 'cpu' or 'auto'")
    return torch.device(name)


def auto_block_tokens(small_nbytes: int, kv_row_nbytes: int) -> int:
    """Largest power of two in [16, 256] with block_tokens * kv_row_nbytes <= small_nbytes / 16."""
    b = 256
    while b > 16 and b * kv_row_nbytes * 16 > small_nbytes:
        b //= 2
    return b


MAX_BUDGET_MB = 1 << 40       # 1 EiB: a budget in bytes stays far inside int64/uint64
MAX_DIGEST_THREADS = 256


@dataclass(frozen=True)
class StoreConfig:
    """Capsule tiers and their budgets."""
    gpu_budget_mb: float = _f(1024.0, "GPU-resident capsule pool (preallocated at configure)", True)
    host_budget_mb: float = _f(1024.0, "host capsule pool (pinned when the runtime is on CUDA)", True)
    disk_budget_mb: float = _f(8192.0, "bytes the capsule directory may hold")
    capsule_dir: str = _f("~/.flashrt/capsules", "directory of disk-tier capsules (~ expanded)")
    default_tier: str = _f("auto", "snapshot tier when a request names none: auto (gpu on CUDA, host on CPU), gpu, host, disk")
    eviction: str = _f("demote", "when a tier is full: demote (gpu->host->disk) or drop the least recently used unpinned capsule")
    digest_threads: int = _f(0, "threads that hash a capsule file's digest as it is written and read (0 = one per core this process may run on; fewer leave cores to the control loop)")
    # Paged store (flashrt_ros/capsules/paged.py): memory-tier KV in blocks shared across forks.
    paged: bool = _f(False, "keep memory-tier capsules as block tables over shared, copy-on-write token blocks (PagedCapsuleStore)", True)
    block_tokens: int = _f(0, "KV rows per block of the paged store (0 = auto: 16-256, at most 1/16 of the small state)", True)

    def __post_init__(self):
        for n in ("gpu_budget_mb", "host_budget_mb", "disk_budget_mb"):
            v = getattr(self, n)
            # budgets are reported in bytes in uint64 status fields (and sized as int64 pools)
            _check(_is_number(v) and 0 <= v <= MAX_BUDGET_MB, f"store.{n}",
                   f"a number of MiB in [0, {MAX_BUDGET_MB}]", v, "pick a size the device has")
        _check(self.default_tier in ("auto", "gpu", "host", "disk"), "store.default_tier",
               "auto, gpu, host or disk", self.default_tier)
        _check(self.eviction in ("demote", "drop"), "store.eviction", "demote or drop", self.eviction)
        _check(_is_int(self.digest_threads) and 0 <= self.digest_threads <= MAX_DIGEST_THREADS,
               "store.digest_threads", f"an integer in [0, {MAX_DIGEST_THREADS}] (0 = one per core)",
               self.digest_threads)
        _check(isinstance(self.paged, bool), "store.paged", "true or false", self.paged)
        _check(isinstance(self.block_tokens, int) and not isinstance(self.block_tokens, bool)
               and 0 <= self.block_tokens <= 65536, "store.block_tokens",
               "an integer in [0, 65536] (0 = auto)", self.block_tokens)
        _check(isinstance(self.capsule_dir, str) and self.capsule_dir != "", "store.capsule_dir",
               "a directory path", self.capsule_dir)

    def resolve_tier(self, tier: str | None, cuda: bool) -> str:
        """The tier a request means: `tier`, or `default_tier` where it names none; auto is gpu
        on a CUDA runtime, host on a CPU one. The store checks the result against its tiers; a
        default tier of gpu on a CPU runtime is this config's error (ConfigError)."""
        if not tier and self.default_tier == "gpu" and not cuda:
            raise ConfigError("store.default_tier: 'gpu' expected a CUDA runtime, found one on "
                              "the CPU; set it to auto, host or disk")
        tier = tier or self.default_tier
        if tier == "auto":
            return "gpu" if cuda else "host"
        return tier

    def resolve_block_tokens(self, small_nbytes: int, kv_row_nbytes: int) -> int:
        """KV rows per block of the paged store for an arena with these sizes (0 = auto:
        `auto_block_tokens`)."""
        return self.block_tokens or auto_block_tokens(small_nbytes, kv_row_nbytes)

    def budget(self, tier: str) -> int:
        return int({"gpu": self.gpu_budget_mb, "host": self.host_budget_mb,
                    "disk": self.disk_budget_mb}[tier] * (1 << 20))


def from_dict(cls, values: Mapping[str, Any] | None, where: str = ""):
    """Build a config dataclass from a mapping; unknown keys are an error, not silently ignored."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known keys are "
                          f"{sorted(names)}")
    for f in dataclasses.fields(cls):
        if f.name in values and isinstance(f.default, tuple) and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def field_table(cls) -> list[tuple[str, Any, str, bool]]:
    """(name, default, help, read_only) for every field: the one table parameters are declared from."""
    return [(f.name, f.default, f.metadata.get("help", ""), f.metadata.get("read_only", False))
            for f in dataclasses.fields(cls)]


# The embedded default: small enough for a control step in well under 2 ms on one CPU core.
TINY = ModelConfig()


def preset_dirs() -> list[str]:
    """Where presets are looked up: $FLASHRT_PRESET_DIR, then `config/presets` of the package's
    share directories (flashrt_ros.core.paths), the source checkout's first: a preset edited (or heads
    trained, `flashrt-ros train-heads`) in a checkout wins over an installed copy."""
    from flashrt_ros.core.paths import share_dirs
    dirs = []
    if os.environ.get("FLASHRT_PRESET_DIR"):
        dirs.append(os.environ["FLASHRT_PRESET_DIR"])
    dirs += [str(d / "config" / "presets") for d in share_dirs(prefer_source=True)]
    return dirs


def available_presets() -> list[str]:
    names = {"tiny"}
    for d in preset_dirs():
        if os.path.isdir(d):
            names.update(f[:-5] for f in os.listdir(d) if f.endswith(".yaml"))
    return sorted(names)


def _check_preset_name(name) -> None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"preset: expected a preset name such as 'tiny', found {name!r}")


def preset_path(name: str) -> str:
    """The YAML file of preset `name` ('' if none: `tiny` is also embedded)."""
    _check_preset_name(name)
    for d in preset_dirs():
        path = os.path.join(d, name + ".yaml")
        if os.path.isfile(path):
            return path
    return ""


def load_preset(name: str, **overrides) -> ModelConfig:
    """Model shapes of a named preset (`tiny`, `hybrid-0.8b`, or any YAML in a preset dir)."""
    import yaml
    path = preset_path(name)
    if path:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        values.setdefault("name", name)
        values.update(overrides)
        return from_dict(ModelConfig, values, where=f"preset {path}")
    if name == "tiny":
        return dataclasses.replace(TINY, **overrides)
    raise ConfigError(f"preset: no preset named {name!r}; available: {available_presets()}. "
                      f"Add config/presets/{name}.yaml, pick one of those, or name a checkpoint "
                      f"directory (a path).")
