"""Checkpoint files as every model family's loader reads them, and the directory a `model` names.

The loaders (core/models/<family>/checkpoint_<family>.py) share these rules: only regular files
in the directory itself are opened (names from an index never escape it), a JSON file holds an
object, tensors are opened memory-mapped by safetensors (never pickle); a file that breaks a rule
is refused naming it, what was expected and what was found.
"""
from __future__ import annotations

import json
import os
import stat

from flashrt_ros.core.exceptions import ConfigError


def model_directory(spec: str) -> str:
    """The checkpoint directory a node's `model` parameter names, or '' for a YAML preset: a path
    (it has a `/`, or starts with `~` or `.`) as it is, a preset name whose preset is a directory
    (`config/presets/<name>/`, e.g. a LeRobot SmolVLA checkpoint) as that directory."""
    if not isinstance(spec, str):
        return ""
    if os.sep in spec or spec.startswith(("~", ".")):
        return spec
    from flashrt_ros.core.config import preset_dirs
    for d in preset_dirs():
        path = os.path.join(d, spec)
        if spec and spec not in (os.curdir, os.pardir) and os.path.isdir(path):
            return path
    return ""


def _regular_file(directory: str, name: str, what: str) -> str:
    """`directory/name` if it is a regular file in `directory` itself, else a ConfigError. `name`
    may be written `./name` (as some index files list their shards); any other path is refused."""
    plain = os.path.normpath(name) if isinstance(name, str) and name else ""
    if not plain or os.path.isabs(name) or os.sep in plain or plain in (os.curdir, os.pardir):
        raise ConfigError(f"{what}: expected a file name inside {directory}, found {name!r}")
    path = os.path.join(directory, plain)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what}: expected {path}, found no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what}: expected {path} to be a regular file, found "
                          f"{'a symlink' if stat.S_ISLNK(st.st_mode) else 'another kind of file'}")
    return path


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: expected a JSON file at {path}, found {type(e).__name__}: {e}") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a JSON object in {path}, found {type(data).__name__}")
    return data


def _open(path: str):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ConfigError(f"{path}: expected a readable safetensors file, found "
                          f"{type(e).__name__}: {e}") from None
