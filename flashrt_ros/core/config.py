"""Configuration: one frozen dataclass per concern, validated at construction.

* `ModelConfig`   - the network's shapes; fixes the arena layout and every captured graph.
* `RuntimeConfig` - where and how the model runs (device, graphs, prefill buckets, rollback depth).
* `StoreConfig`   - capsule tiers: budgets, directory, eviction policy.

Presets live in `config/presets/<name>.yaml` (the `tiny` preset is also embedded here so that the
package works with no files at all). Every field is documented once, in `field(metadata={"help"})`;
the node declares its ROS parameters from these tables and the CLI prints them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from flashrt_ros.core.exceptions import ConfigError


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


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the hybrid policy (Gated DeltaNet + gated attention, 3:1 by default)."""
    name: str = _f("tiny", "preset name, recorded in capsule fingerprints", True)
    d_model: int = _f(64, "residual width", True)
    n_layers: int = _f(4, "number of blocks", True)
    attn_every: int = _f(4, "every attn_every-th block is softmax attention, the rest Gated DeltaNet", True)
    n_heads: int = _f(2, "attention query heads", True)
    n_kv_heads: int = _f(1, "attention key/value heads (GQA)", True)
    head_dim: int = _f(32, "attention head dim", True)
    n_lin_heads: int = _f(2, "Gated DeltaNet heads", True)
    lin_head_dim: int = _f(32, "Gated DeltaNet key and value head dim", True)
    conv_kernel: int = _f(4, "short causal conv width (state keeps conv_kernel-1 inputs)", True)
    d_ffn: int = _f(128, "SwiGLU hidden width", True)
    vocab_size: int = _f(260, "token vocabulary (byte tokenizer: 256 bytes + 4 specials)", True)
    obs_dim: int = _f(14, "observation vector length", True)
    action_dim: int = _f(7, "action vector length", True)
    horizon: int = _f(8, "action chunk length", True)
    mtp_depth: int = _f(2, "multi-token head: latent tokens predicted ahead", True)
    max_context: int = _f(512, "tokens of KV the arena holds (instruction + control steps)", True)
    dtype: str = _f("float32", "weights/KV dtype: float32, bfloat16 or float16", True)
    seed: int = _f(0, "seed of the deterministic (untrained) default weights", True)

    def __post_init__(self):
        for n in ("d_model", "n_layers", "attn_every", "n_heads", "n_kv_heads", "head_dim",
                  "n_lin_heads", "lin_head_dim", "conv_kernel", "d_ffn", "vocab_size", "obs_dim",
                  "action_dim", "horizon", "mtp_depth", "max_context"):
            v = getattr(self, n)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"model.{n}",
                   "a positive integer", v)
        _check(self.n_heads % self.n_kv_heads == 0, "model.n_heads",
               f"a multiple of n_kv_heads={self.n_kv_heads}", self.n_heads)
        _check(self.conv_kernel >= 2, "model.conv_kernel", "at least 2", self.conv_kernel)
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
               "one of float32, bfloat16, float16", self.dtype)
        _check(self.vocab_size >= 260, "model.vocab_size",
               ">= 260 (the byte tokenizer uses ids 0..259)", self.vocab_size)
        _check(self.attn_every <= self.n_layers, "model.attn_every",
               f"<= n_layers={self.n_layers} (at least one attention layer holds the context)",
               self.attn_every)
        _check(self.max_context >= 2, "model.max_context", "at least 2 (one row is scratch)",
               self.max_context)
        _check(_is_int(self.seed) and self.seed >= 0, "model.seed", "an integer >= 0", self.seed)

    @property
    def attn_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if (i + 1) % self.attn_every == 0]

    @property
    def lin_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if (i + 1) % self.attn_every != 0]


@dataclass(frozen=True)
class RuntimeConfig:
    """How the model runs."""
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available)", True)
    cuda_graphs: bool = _f(True, "capture step/prefill plans as CUDA graphs (CUDA only)", True)
    prefill_buckets: tuple = _f((4096, 1024, 256, 64, 16, 4),
                                "exact prefill chunk lengths, one plan each (longer than the context: unused)",
                                True)
    rollback_depth: int = _f(16, "committed steps kept for rollback(k) (0 disables)", True)
    action_noise: float = _f(0.0, "std of sampled action noise (the sampler's RNG lives in the arena)", True)
    sample_seed: int = _f(0, "initial seed of the arena's sampler RNG")
    kernels: str = _f("auto", "auto (CUDA: fla when importable, else reference; CPU: chunked), fla, "
                               "chunked (CPU only: reference steps, chunk-parallel prefill) or "
                               "reference", True)
    weights: str = _f("", "safetensors file with the policy weights ('' = deterministic from seed)", True)
    threads: int = _f(0, "torch CPU (intra-op) threads the node sets at configure: 0 = auto (1 for "
                         "presets with d_model <= 256, where handing tiny ops to a second thread "
                         "costs more than it saves; else torch's default), N > 0 = N", True)

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
        _check(self.kernels in ("auto", "fla", "chunked", "reference"), "runtime.kernels",
               "auto, fla, chunked or reference", self.kernels)
        _check(isinstance(self.threads, int) and not isinstance(self.threads, bool)
               and 0 <= self.threads <= 1024, "runtime.threads", "an integer in [0, 1024] (0 = auto)",
               self.threads)
        if self.weights:
            _check(self.weights.endswith(".safetensors"), "runtime.weights",
                   "a .safetensors file (pickle-based formats are refused)", self.weights)


@dataclass(frozen=True)
class StoreConfig:
    """Capsule tiers and their budgets."""
    gpu_budget_mb: float = _f(1024.0, "GPU-resident capsule pool (preallocated at configure)", True)
    host_budget_mb: float = _f(1024.0, "host capsule pool (pinned when the runtime is on CUDA)", True)
    disk_budget_mb: float = _f(8192.0, "bytes the capsule directory may hold")
    capsule_dir: str = _f("~/.flashrt/capsules", "directory of disk-tier capsules (~ expanded)")
    default_tier: str = _f("auto", "snapshot tier when a request names none: auto (gpu on CUDA, host on CPU), gpu, host, disk")
    eviction: str = _f("demote", "when a tier is full: demote (gpu->host->disk) or drop the least recently used unpinned capsule")
    # Paged store (flashrt_ros/paged.py, issue 8): memory-tier KV in blocks shared across forks.
    paged: bool = _f(False, "keep memory-tier capsules as block tables over shared, copy-on-write token blocks (PagedCapsuleStore)", True)
    block_tokens: int = _f(0, "KV rows per block of the paged store (0 = auto: 16-256, at most 1/16 of the small state)", True)

    def __post_init__(self):
        for n in ("gpu_budget_mb", "host_budget_mb", "disk_budget_mb"):
            v = getattr(self, n)
            _check(_is_number(v) and 0 <= v < float("inf"), f"store.{n}", "a number >= 0", v)
        _check(self.default_tier in ("auto", "gpu", "host", "disk"), "store.default_tier",
               "auto, gpu, host or disk", self.default_tier)
        _check(self.eviction in ("demote", "drop"), "store.eviction", "demote or drop", self.eviction)
        _check(isinstance(self.paged, bool), "store.paged", "true or false", self.paged)
        _check(isinstance(self.block_tokens, int) and not isinstance(self.block_tokens, bool)
               and 0 <= self.block_tokens <= 65536, "store.block_tokens",
               "an integer in [0, 65536] (0 = auto)", self.block_tokens)
        _check(isinstance(self.capsule_dir, str) and self.capsule_dir != "", "store.capsule_dir",
               "a directory path", self.capsule_dir)

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
    """Where presets are looked up: $FLASHRT_PRESET_DIR, the source tree, the installed share dir."""
    here = os.path.dirname(os.path.abspath(__file__))
    dirs = []
    if os.environ.get("FLASHRT_PRESET_DIR"):
        dirs.append(os.environ["FLASHRT_PRESET_DIR"])
    dirs.append(os.path.join(os.path.dirname(os.path.dirname(here)), "config", "presets"))
    try:  # colcon install on a ROS machine
        from ament_index_python.packages import get_package_share_directory
        dirs.append(os.path.join(get_package_share_directory("flashrt_ros"), "config", "presets"))
    except Exception:  # noqa: BLE001 - ament_index absent or package not in the index
        pass
    import sys
    dirs.append(os.path.join(sys.prefix, "share", "flashrt_ros", "config", "presets"))
    return dirs


def available_presets() -> list[str]:
    names = {"tiny"}
    for d in preset_dirs():
        if os.path.isdir(d):
            names.update(f[:-5] for f in os.listdir(d) if f.endswith(".yaml"))
    return sorted(names)


def load_preset(name: str, **overrides) -> ModelConfig:
    """Model shapes of a named preset (`tiny`, `hybrid-0.8b`, or any YAML in a preset dir)."""
    import yaml
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"preset: expected a preset name such as 'tiny', found {name!r}")
    for d in preset_dirs():
        path = os.path.join(d, name + ".yaml")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
            values.setdefault("name", name)
            values.update(overrides)
            return from_dict(ModelConfig, values, where=f"preset {path}")
    if name == "tiny":
        return dataclasses.replace(TINY, **overrides)
    raise ConfigError(f"preset: no preset named {name!r}; available: {available_presets()}. "
                      f"Add config/presets/{name}.yaml or pick one of those.")
