"""Checkpoint directories as transformers writes them, and the policy files beside them.

A model directory holds:

    config.json                     `qwen3_5_text` (Qwen3_5ForCausalLM), or a Qwen3.5 VLM's
                                    `qwen3_5` with a `text_config` (its vision tower is ignored)
    model.safetensors               the backbone's tensors, or shards listed by
    model.safetensors.index.json    (`weight_map`: tensor name -> shard file)
    generation_config.json          optional: its eos_token_id (one id or a list) is where
                                    generation stops, as in transformers' generate()
    tokenizer.json                  optional: the `tokenizers` library's file (else byte tokens)
    policy_config.json              optional: obs_dim, action_dim, horizon, mtp_depth, max_context,
                                    seed (the heads' shapes and the arena's context)
    policy.safetensors              optional: the heads' weights (else drawn from the seed, and the
                                    runtime says the actions are untrained)

Tensors are opened memory-mapped by safetensors (never pickle) and copied once to the device in
the dtype the runtime asks for. Every name and shape is checked before anything is copied; a
directory that does not fit is refused naming the tensor or field, what was expected and found.
Only regular files in the directory itself are opened (names from the index never escape it):
core/checkpoint.py's rules, which every family's loader follows.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from flashrt_ros.core.checkpoint import (WeightsDigest, _open, _read_json, _regular_file,
                                        model_directory)
from flashrt_ros.core.config import ModelConfig, TextConfig, from_dict
from flashrt_ros.core.exceptions import ConfigError

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
POLICY_CONFIG = "policy_config.json"
POLICY_WEIGHTS = "policy.safetensors"
POLICY_FIELDS = ("obs_dim", "action_dim", "horizon", "mtp_depth", "max_context", "seed")
# checkpoint prefixes of the text backbone: Qwen3_5ForCausalLM, and the VLM's language model
TEXT_PREFIXES = ("model.language_model.", "model.")
IGNORED_PREFIXES = ("model.visual.", "mtp.")          # vision tower; transformers drops mtp.* too
STR_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class ModelDir:
    """Where a policy's configuration and weights come from (paths are regular files)."""
    path: str                    # the checkpoint directory, or the preset's YAML file
    cfg: ModelConfig
    weight_files: tuple          # safetensors files of the backbone (empty: drawn from the seed)
    tokenizer_file: str          # '' = byte tokenizer
    policy_weights: str          # '' = heads drawn from the seed


def resolve_model(spec: str, say=None, **overrides) -> ModelDir:
    """A node's `model` parameter: a checkpoint directory (a path), or a preset name.

    A preset (`config/presets/<name>.yaml`) draws its backbone from the seed; trained heads for it
    may lie beside the YAML as `<name>.policy.safetensors`. A preset that is a directory
    (`config/presets/<name>/`) is read as a checkpoint directory.
    """
    directory = model_directory(spec)
    if directory:
        return read_model_dir(directory, say=say, **overrides)
    from flashrt_ros.core.config import load_preset, preset_path
    cfg = load_preset(spec, **overrides)
    yaml_path = preset_path(spec)
    heads = ""
    if yaml_path:
        candidate = yaml_path[:-len(".yaml")] + ".policy.safetensors"
        if os.path.isfile(candidate) and not os.path.islink(candidate):
            heads = candidate
    return ModelDir(yaml_path or spec, cfg, (), "", heads)


def is_model_dir(spec: str) -> bool:
    return isinstance(spec, str) and os.path.isdir(os.path.expanduser(spec))


def read_model_dir(path: str, say=None, **overrides) -> ModelDir:
    """Read and check a model directory's configuration and list its weight files (no tensors yet).

    `overrides` set ModelConfig fields (max_context, dtype, seed, ...) over the directory's.
    """
    say = say or (lambda msg: None)
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ConfigError(f"model: expected a checkpoint directory, found no directory {path}")
    hf = _read_json(_regular_file(path, CONFIG, "model"), f"{path}/{CONFIG}")
    if hf.get("type") == "smolvla":
        raise ConfigError(f"model {path}: expected a Qwen3.5 checkpoint here, found a LeRobot "
                          f"SmolVLA checkpoint; its runtime is built by "
                          f"PolicyRuntime.from_pretrained (docs/models.md), which is what the "
                          f"node does for it")
    if hf.get("model_type") == "qwen3_5" and "vision_config" in hf:
        say(f"{path}: a Qwen3.5 VLM checkpoint; serving its text model, the vision tower is ignored")
    text = TextConfig.from_hf(hf, where=f"{path}/{CONFIG}")
    if os.path.lexists(os.path.join(path, GENERATION_CONFIG)):
        # transformers' generate() stops at generation_config.json's end tokens where it names them
        gen = _read_json(_regular_file(path, GENERATION_CONFIG, "model"),
                         f"{path}/{GENERATION_CONFIG}")
        if gen.get("eos_token_id") is not None:
            try:
                text = dataclasses.replace(text, eos_token_id=gen["eos_token_id"])
            except ConfigError as e:
                raise ConfigError(f"{path}/{GENERATION_CONFIG}: {e}") from None
    values = {}
    if os.path.lexists(os.path.join(path, POLICY_CONFIG)):
        policy = _read_json(_regular_file(path, POLICY_CONFIG, "model"), f"{path}/{POLICY_CONFIG}")
        unknown = sorted(set(policy) - set(POLICY_FIELDS))
        if unknown:
            raise ConfigError(f"{path}/{POLICY_CONFIG}: unknown key(s) {unknown}; known keys are "
                              f"{list(POLICY_FIELDS)}")
        values.update(policy)
    dtype = hf.get("dtype") or hf.get("torch_dtype") or \
        (hf.get("text_config") or {}).get("dtype") or "float32"
    values.setdefault("dtype", STR_DTYPES.get(dtype, "float32"))
    values.setdefault("max_context", 4096)
    values.update(overrides)
    values["text"] = text
    values["name"] = os.path.basename(path)
    cfg = from_dict(ModelConfig, values, where=f"{path}")

    if os.path.lexists(os.path.join(path, INDEX)):
        index = _read_json(_regular_file(path, INDEX, "model"), f"{path}/{INDEX}")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{path}/{INDEX}: expected a non-empty 'weight_map' object, found "
                              f"{type(weight_map).__name__}")
        files = tuple(sorted({_regular_file(path, f, f"{INDEX} shard")
                              for f in weight_map.values()}))
    elif os.path.lexists(os.path.join(path, WEIGHTS)):
        files = (_regular_file(path, WEIGHTS, "model"),)
    else:
        raise ConfigError(f"model {path}: expected {WEIGHTS} or {INDEX} (the backbone's weights), "
                          f"found neither; save the model with transformers' save_pretrained")
    tok = _regular_file(path, TOKENIZER, "model") \
        if os.path.lexists(os.path.join(path, TOKENIZER)) else ""
    heads = _regular_file(path, POLICY_WEIGHTS, "model") \
        if os.path.lexists(os.path.join(path, POLICY_WEIGHTS)) else ""
    return ModelDir(path, cfg, files, tok, heads)


def _text_name(key: str) -> str | None:
    """A checkpoint key -> our backbone's parameter name (None: a tensor we ignore)."""
    if key.startswith(IGNORED_PREFIXES):
        return None
    for prefix in TEXT_PREFIXES:
        if key.startswith(prefix):
            return "model." + key[len(prefix):]
    return key                       # lm_head.weight, or an unexpected name reported below


def load_backbone(policy, files, device, say=None) -> str:
    """Copy the backbone's tensors from safetensors `files` into `policy`; returns their digest.

    Refused before anything is copied: a missing or unexpected tensor, a wrong shape.
    """
    say = say or (lambda msg: None)
    expected = {n: tuple(p.shape) for n, p in policy.backbone_parameters().items()}
    tied = policy.cfg.text.tie_word_embeddings
    where, ignored = {}, 0
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                name = _text_name(key)
                if name is None:
                    ignored += 1
                    continue
                where[name] = (path, key, tuple(f.get_slice(key).get_shape()))
    extra_lm_head = tied and "lm_head.weight" in where
    found = {n: v[2] for n, v in where.items() if not (extra_lm_head and n == "lm_head.weight")}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(n for n in expected if n in found and found[n] != expected[n])
    if missing or extra or wrong:
        detail = [f"missing {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                  if missing else "",
                  f"unexpected {extra[:5]}" if extra else "",
                  "; ".join(f"{n}: expected shape {expected[n]}, found {found[n]}" for n in wrong[:5])]
        raise ConfigError(f"checkpoint {os.path.dirname(files[0])}: its tensors do not fit its "
                          f"config.json ({'; '.join(x for x in detail if x)}); is it a Qwen3.5 "
                          f"checkpoint saved by transformers, complete and unmodified?")
    if ignored:
        say(f"ignored {ignored} tensors of the vision tower / MTP layers")
    params = policy.backbone_parameters()
    by_file: dict = {}
    for name in sorted(expected):
        by_file.setdefault(where[name][0], []).append(name)
    with WeightsDigest() as digest:
        for path, names in by_file.items():
            with _open(path) as f:
                for name in names:
                    # one tensor at a time from the mapped file into its device parameter: the
                    # model is never whole on the host; the digest reads the mapped bytes
                    # while the next tensor is copied
                    t = f.get_tensor(where[name][1])
                    dst = params[name]
                    if t.dtype != dst.dtype:
                        t = t.to(dst.dtype)
                    t = t.contiguous()
                    digest.add(name, t)
                    dst.data.copy_(t)
    if extra_lm_head:
        path, key, _ = where["lm_head.weight"]
        with _open(path) as f:
            lm = f.get_tensor(key)
        emb = policy.backbone_parameters()["model.embed_tokens.weight"]
        if not torch.equal(lm.to(emb.dtype).to(emb.device), emb.data):
            raise ConfigError(f"checkpoint {os.path.dirname(files[0])}: tie_word_embeddings is "
                              f"true but lm_head.weight differs from model.embed_tokens.weight; "
                              f"set tie_word_embeddings to false in config.json")
    return digest.hexdigest()


def heads_backbone_digest(path: str) -> str:
    """The backbone digest a heads file was trained against ('' if it does not say)."""
    with _open(path) as f:
        return (f.metadata() or {}).get("backbone_digest", "")


def load_heads(policy, path: str, device) -> str:
    """Copy the heads' tensors from `policy.safetensors`; returns their digest."""
    expected = {n: tuple(p.shape) for n, p in policy.head_parameters().items()}
    with _open(path) as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(n for n in expected if n in found and found[n] != expected[n])
        if missing or extra or wrong:
            raise ConfigError(
                f"{path}: the heads do not fit the policy's shapes (missing {missing[:5]}, "
                f"unexpected {extra[:5]}, "
                + ", ".join(f"{n}: expected shape {expected[n]}, found {found[n]}" for n in wrong[:5])
                + "); retrain the heads for these shapes or fix policy_config.json")
        tensors = {}
        params = policy.head_parameters()
        for name in expected:
            t = f.get_tensor(name).to(params[name].dtype)
            tensors[name] = t
            params[name].data.copy_(t.to(device))
    from flashrt_ros.core.models.qwen3_5.policy_qwen3_5 import digest_tensors
    return digest_tensors(tensors)


def save_heads(policy, path: str, backbone_digest: str = "") -> None:
    """Write the heads to `path` (safetensors; the metadata names the backbone they were trained
    with) and policy_config.json beside it."""
    from safetensors.torch import save_file
    save_file({n: p.detach().cpu().contiguous() for n, p in policy.head_parameters().items()}, path,
              metadata={"format": "pt", "backbone_digest": backbone_digest})
    if os.path.basename(path) == POLICY_WEIGHTS:
        c = policy.cfg
        with open(os.path.join(os.path.dirname(path), POLICY_CONFIG), "w", encoding="utf-8") as f:
            json.dump({k: getattr(c, k) for k in POLICY_FIELDS}, f, indent=2)
            f.write("\n")


def save_pretrained(policy, directory: str) -> None:
    """Write a model directory: config.json + model.safetensors (transformers' layout, loadable
    by `Qwen3_5ForCausalLM.from_pretrained`), policy_config.json + policy.safetensors."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    hf = policy.cfg.text.to_hf()
    hf["dtype"] = policy.cfg.dtype
    with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
        f.write("\n")
    save_file({n: p.detach().cpu().contiguous() for n, p in policy.backbone_parameters().items()},
              os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    save_heads(policy, os.path.join(directory, POLICY_WEIGHTS), policy.backbone_digest)
