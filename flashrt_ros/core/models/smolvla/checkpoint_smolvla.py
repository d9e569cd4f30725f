"""LeRobot SmolVLA checkpoint directories, as `SmolVLAPolicy.save_pretrained` and its processors
write them:

    config.json                                   "type": "smolvla", features, shapes
    model.safetensors                             LeRobot's tensor names (model.vlm_with_expert...)
    policy_preprocessor.json (+ its normaliser statistics .safetensors)
    policy_postprocessor.json (+ its unnormaliser statistics .safetensors)

and the backbone directory `vlm_model_name` names (its `config.json` and `tokenizer.json`; no
weights are read from it: the policy's file holds the layers it uses). `vlm_model_name` is looked
for as a directory - as given, relative to the checkpoint directory, then as a Hugging Face hub id
in the local hub cache - and never fetched: a missing backbone is refused naming every place looked.

The loader's rules are every family's (core/checkpoint.py), as the Qwen3.5 loader's: only regular
files inside the directories, tensors memory-mapped by safetensors and copied one at a time to the
device, every name and shape checked before anything is copied.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

from flashrt_ros.core.checkpoint import WeightsDigest, _open, _read_json, _regular_file
from flashrt_ros.core.exceptions import ConfigError
from flashrt_ros.core.models.smolvla.configuration_smolvla import SmolVLAConfig, from_lerobot
from flashrt_ros.core.models.smolvla.processor_smolvla import (Normalizer, TaskTokenizer, pad_id_of,
                                                              read_processors)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
# LeRobot's tensor name prefixes -> this implementation's module names (modeling_smolvla.py)
PREFIXES = (("model.vlm_with_expert.vlm.model.vision_model.", "vision."),
            ("model.vlm_with_expert.vlm.model.connector.", "connector."),
            ("model.vlm_with_expert.vlm.model.text_model.", "text."),
            ("model.vlm_with_expert.lm_expert.", "expert."),
            ("model.", ""))
# tensors LeRobot saves that no action reads: the VLM's LM head and its final norm
UNUSED = ("model.vlm_with_expert.vlm.lm_head.", "model.vlm_with_expert.vlm.model.text_model.norm.")
HEADS = ("state_proj.", "action_in_proj.", "action_out_proj.", "action_time_mlp_in.",
         "action_time_mlp_out.")


@dataclass(frozen=True)
class SmolVLADir:
    path: str
    cfg: SmolVLAConfig
    weights: str                 # model.safetensors
    backbone: str                # the backbone directory
    tokenizer: TaskTokenizer
    normalizer: Normalizer
    unnormalizer: Normalizer


def is_smolvla_dir(path: str) -> bool:
    """Whether `path` is a directory whose config.json says `"type": "smolvla"`."""
    cfg = os.path.join(os.path.expanduser(path), CONFIG)
    if not os.path.isfile(cfg) or os.path.islink(cfg):
        return False
    try:
        return _read_json(cfg, cfg).get("type") == "smolvla"
    except ConfigError:
        return False


def hub_cache_dirs(repo_id: str) -> list[str]:
    """Where the Hugging Face hub cache would hold snapshots of `repo_id` (no network)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
    repo = os.path.join(hub, "models--" + repo_id.replace("/", "--"))
    ref = os.path.join(repo, "refs", "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            return [os.path.join(repo, "snapshots", f.read().strip())]
    return sorted(glob.glob(os.path.join(repo, "snapshots", "*"))) or [os.path.join(repo, "snapshots")]


def resolve_backbone(name: str, policy_dir: str, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: vlm_model_name: expected the backbone's directory or hub id, "
                          f"found {name!r}")
    expanded = os.path.expanduser(name)
    looked = [expanded] if os.path.isabs(expanded) else \
        [os.path.join(policy_dir, expanded), os.path.abspath(expanded)]
    if not os.path.isabs(expanded) and expanded.count("/") == 1 and not expanded.startswith("."):
        looked += hub_cache_dirs(expanded)
    for d in looked:
        if os.path.isfile(os.path.join(d, CONFIG)):
            return os.path.realpath(d)
    raise ConfigError(f"{where}: vlm_model_name {name!r}: expected a directory holding the "
                      f"backbone's {CONFIG} and {TOKENIZER}, found none; looked in "
                      f"{', '.join(looked)}. Nothing is downloaded at run time: put the backbone "
                      f"there (e.g. `huggingface-cli download {name}` beforehand) or set "
                      f"vlm_model_name in {where} to a local directory")


def read_smolvla_dir(path: str, dtype: str | None = None, say=None) -> SmolVLADir:
    """Read and check a LeRobot SmolVLA directory (configs, processors, tokenizer; no weights)."""
    say = say or (lambda msg: None)
    path = os.path.abspath(os.path.expanduser(path))
    where = os.path.join(path, CONFIG)
    policy = _read_json(_regular_file(path, CONFIG, "model"), where)
    backbone = resolve_backbone(policy.get("vlm_model_name"), path, where)
    bb_where = os.path.join(backbone, CONFIG)
    bb_cfg = _read_json(_regular_file(backbone, CONFIG, "backbone"), bb_where)
    tok_file = _regular_file(backbone, TOKENIZER, f"backbone {backbone}")
    tokenizer = TaskTokenizer(tok_file, int(policy.get("tokenizer_max_length", 48)), 0)
    tokens = {"fake_image_token_id": tokenizer.token_id("<fake_token_around_image>"),
              "global_image_token_id": tokenizer.token_id("<global-img>")}
    tokenizer.pad_id = pad_id_of(backbone, tokenizer, _read_json)
    cfg = from_lerobot(policy, bb_cfg, tokens, name=os.path.basename(path), where=where,
                       dtype=dtype or "float32")
    if cfg.text.vocab_size < tokenizer.tok.get_vocab_size():
        raise ConfigError(f"{bb_where}: text_config.vocab_size: expected at least the tokenizer's "
                          f"{tokenizer.tok.get_vocab_size()} tokens, found {cfg.text.vocab_size}")
    features = {k: f.get("type") for part in ("input_features", "output_features")
                for k, f in policy[part].items()}
    normalizer, unnormalizer = read_processors(path, features, where, _regular_file, _read_json,
                                               _open)
    normalizer.check_dims("observation.state", cfg.state_dim, where)
    unnormalizer.check_dims("action", cfg.action_dim, where)
    weights = _regular_file(path, WEIGHTS, "model")
    say(f"{path}: SmolVLA, {len(cfg.cameras)} camera(s), backbone {backbone}")
    return SmolVLADir(path, cfg, weights, backbone, tokenizer, normalizer, unnormalizer)


def our_name(key: str) -> str | None:
    if key.startswith(UNUSED):
        return None
    for prefix, ours in PREFIXES:
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    return key


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The small projections around the expert stay float32, as LeRobot keeps them."""
    return torch.float32 if name.startswith(HEADS) else dtype


def load_weights(model: torch.nn.Module, path: str) -> str:
    """Copy the tensors of `path` into `model`'s parameters; returns their digest. Refused
    before anything is copied: a missing or unexpected tensor, a wrong shape."""
    params = dict(model.named_parameters())
    where = {}
    with _open(path) as f:
        for key in f.keys():
            name = our_name(key)
            if name is not None:
                where[name] = (key, tuple(f.get_slice(key).get_shape()))
    missing = sorted(set(params) - set(where))
    extra = sorted(set(where) - set(params))
    wrong = [f"{n}: expected {tuple(params[n].shape)}, found {where[n][1]}"
             for n in sorted(params) if n in where and where[n][1] != tuple(params[n].shape)]
    if missing or extra or wrong:
        detail = "; ".join(x for x in (f"missing {missing[:5]}" if missing else "",
                                       f"unexpected {extra[:5]}" if extra else "",
                                       "; ".join(wrong[:5])) if x)
        raise ConfigError(f"{path}: its tensors do not fit config.json and the backbone's config "
                          f"({detail}); is it a SmolVLA checkpoint saved by LeRobot with this "
                          f"backbone, complete and unmodified?")
    with _open(path) as f, WeightsDigest() as digest:
        for name in sorted(params):
            t = f.get_tensor(where[name][0])
            dst = params[name]
            t = t.to(dst.dtype).contiguous()
            digest.add(name, t)             # hashed while the next tensor is copied
            dst.data.copy_(t)
    return digest.hexdigest()
