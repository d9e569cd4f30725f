"""What LeRobot's SmolVLA processors do around the network, without LeRobot.

* `Normalizer` - the `normalizer_processor` / `unnormalizer_processor` steps of
  `policy_preprocessor.json` / `policy_postprocessor.json`, with their statistics files: per feature
  MEAN_STD, MIN_MAX, QUANTILES, QUANTILE10 or IDENTITY, the formulas and `eps` as LeRobot writes them.
* `TaskTokenizer` - the `smolvla_new_line_processor` and `tokenizer_processor` steps: a newline
  after the task, the backbone's `tokenizer.json` (the `tokenizers` library: the same backend
  transformers' fast tokenizer runs), truncation to `tokenizer_max_length` on the right; here the
  ids are padded to that length with a mask, so the prefix has one length (see modeling_smolvla.py).
* `resize_with_pad` / `to_unit_image` - LeRobot's image preparation: an image in [0, 1] resized
  to fit (bilinear, no antialias), padded on the left and top, then scaled to [-1, 1].
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from flashrt_ros.core.exceptions import ConfigError, InputError

PREPROCESSOR = "policy_preprocessor.json"
POSTPROCESSOR = "policy_postprocessor.json"
STATS = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"),
         "QUANTILE10": ("q10", "q90")}


class Normalizer:
    """Per-feature affine maps of one LeRobot (un)normaliser step. Each feature's (low,
    denominator) pair is computed once, on the normaliser's device, so that applying it inside a
    captured plan creates no tensor."""

    def __init__(self, modes: dict, stats: dict, eps: float):
        self.modes = modes          # feature key -> mode
        self.stats = stats          # feature key -> {stat name: float32 tensor}
        self.eps = eps
        self._affine = {key: self._low_denom(key) for key in modes}

    @classmethod
    def from_step(cls, step: dict, directory: str, features: dict, where: str, regular_file,
                  open_safetensors) -> "Normalizer":
        cfg = step.get("config") or {}
        norm_map = cfg.get("norm_map") or {}
        eps = float(cfg.get("eps", 1e-8))
        stats: dict = {}
        state_file = step.get("state_file")
        if state_file:
            path = regular_file(directory, state_file, where)
            with open_safetensors(path) as f:
                for name in f.keys():
                    key, stat = name.rsplit(".", 1)
                    stats.setdefault(key, {})[stat] = f.get_tensor(name).to(torch.float32)
        modes = {}
        for key, ftype in features.items():
            mode = norm_map.get(ftype, "IDENTITY")
            if mode == "IDENTITY" or key not in stats:
                continue
            need = STATS.get(mode)
            if need is None:
                raise ConfigError(f"{where}: norm_map: expected modes IDENTITY, "
                                  f"{', '.join(STATS)}, found {mode!r} for {ftype}")
            missing = [s for s in need if s not in stats[key]]
            if missing:
                raise ConfigError(f"{where}: {key}: {mode} needs the statistics {list(need)}; "
                                  f"{state_file} lacks {missing}")
            modes[key] = mode
        return cls(modes, stats, eps)

    def to(self, device) -> "Normalizer":
        return Normalizer(self.modes, {k: {s: t.to(device) for s, t in v.items()}
                                       for k, v in self.stats.items()}, self.eps)

    def _low_denom(self, key):
        mode = self.modes[key]
        lo, hi = (self.stats[key][s] for s in STATS[mode])
        if mode == "MEAN_STD":
            return lo, hi
        d = hi - lo
        return lo, torch.where(d == 0, torch.tensor(self.eps, dtype=d.dtype, device=d.device), d)

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key not in self.modes:
            return x
        lo, d = self._affine[key]
        if self.modes[key] == "MEAN_STD":
            return (x - lo) / (d + self.eps)
        return 2.0 * (x - lo) / d - 1.0           # MIN_MAX and both quantile modes

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key not in self.modes:
            return x
        lo, d = self._affine[key]
        if self.modes[key] == "MEAN_STD":
            return x * d + lo
        if self.modes[key] == "MIN_MAX":
            return (x + 1) / 2 * d + lo
        return (x + 1.0) * d / 2.0 + lo

    def check_dims(self, key: str, dim: int, where: str) -> None:
        for stat, t in self.stats.get(key, {}).items():
            if key in self.modes and t.numel() != dim:
                raise ConfigError(f"{where}: {key}.{stat}: expected {dim} values (the feature's "
                                  f"shape), found {tuple(t.shape)}")


def find_step(path: str, registry_name: str, read_json) -> dict:
    """The step named `registry_name` of a LeRobot processor file."""
    data = read_json(path, path)
    steps = data.get("steps")
    if not isinstance(steps, list):
        raise ConfigError(f"{path}: expected a 'steps' list (a LeRobot processor file), found "
                          f"{type(steps).__name__}")
    for step in steps:
        if isinstance(step, dict) and step.get("registry_name") == registry_name:
            return step
    return {}


class TaskTokenizer:
    """The task text -> (ids [L], mask [L]) with L = tokenizer_max_length."""

    def __init__(self, path: str, max_length: int, pad_id: int):
        from tokenizers import Tokenizer
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types
            raise ConfigError(f"{path}: expected a tokenizers tokenizer.json, found "
                              f"{type(e).__name__}: {e}") from None
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=max_length, direction="right")
        self.max_length = max_length
        self.pad_id = pad_id
        self._last: tuple = (None, None)

    def token_id(self, token: str) -> int:
        tid = self.tok.token_to_id(token)
        return -1 if tid is None else tid

    def __call__(self, task: str):
        if self._last[0] == task:
            return self._last[1]
        text = task if task.endswith("\n") else task + "\n"
        ids = self.tok.encode(text, add_special_tokens=True).ids[: self.max_length]
        out = np.full(self.max_length, self.pad_id, dtype=np.int64)
        out[: len(ids)] = ids
        mask = np.zeros(self.max_length, dtype=bool)
        mask[: len(ids)] = True
        self._last = (task, (out, mask))
        return out, mask


def pad_id_of(backbone_dir: str, tok: "TaskTokenizer", read_json) -> int:
    """The backbone tokenizer's pad token id (its special_tokens_map / tokenizer_config), else 0."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(backbone_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            pad = read_json(path, path).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str) and tok.token_id(pad) >= 0:
                return tok.token_id(pad)
    return 0


def to_unit_image(img, key: str) -> torch.Tensor:
    """An image as a dataset gives it -> float32 [3, H, W] in [0, 1]: a float [3, H, W] array in
    [0, 1] as is, a uint8 [H, W, 3] frame divided by 255."""
    t = torch.as_tensor(np.asarray(img)) if not isinstance(img, torch.Tensor) else img
    if t.dtype == torch.uint8 and t.ndim == 3 and t.shape[-1] == 3:
        return t.permute(2, 0, 1).float() / 255
    if t.is_floating_point() and t.ndim == 3 and t.shape[0] == 3:
        return t.float()
    raise InputError(f"{key}: expected a float [3, H, W] image in [0, 1] or a uint8 [H, W, 3] "
                     f"frame, found {t.dtype} {tuple(t.shape)}")


def resize_with_pad(img: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[3, H, W] -> [3, height, width]: scaled to fit, padded with 0 on the left and top."""
    cur_h, cur_w = img.shape[1:]
    ratio = max(cur_w / width, cur_h / height)
    h, w = int(cur_h / ratio), int(cur_w / ratio)
    out = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)
    return F.pad(out, (max(0, width - w), 0, max(0, height - h), 0), value=0)[0]


def read_processors(directory: str, features: dict, where: str, regular_file, read_json,
                    open_safetensors) -> tuple:
    """(normaliser, unnormaliser) of a LeRobot SmolVLA directory; `features` maps every input and
    output feature key to its type (VISUAL, STATE, ACTION)."""
    out = []
    for fname, registry in ((PREPROCESSOR, "normalizer_processor"),
                            (POSTPROCESSOR, "unnormalizer_processor")):
        if not os.path.lexists(os.path.join(directory, fname)):
            raise ConfigError(f"{where}: expected {fname} (LeRobot >= 0.4 saves it beside the "
                              f"policy with the normalisation statistics), found none in "
                              f"{directory}; save the processors with "
                              f"make_smolvla_pre_post_processors(...).save_pretrained(dir)")
        path = regular_file(directory, fname, where)
        step = find_step(path, registry, read_json)
        if not step:
            raise ConfigError(f"{path}: expected a {registry!r} step, found none")
        out.append(Normalizer.from_step(step, directory, features, path, regular_file,
                                        open_safetensors))
    return tuple(out)
