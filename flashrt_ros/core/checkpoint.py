"""Checkpoint files as every model family's loader reads them, the directory a `model` names, and
the digest that names the weights.

The loaders (core/models/<family>/checkpoint_<family>.py) share these rules: only regular files
in the directory itself are opened (names from an index never escape it), a JSON file holds an
object, tensors are opened memory-mapped by safetensors (never pickle); a file that breaks a rule
is refused naming it, what was expected and what was found.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import stat
import threading

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


class WeightsDigest:
    """The weights' identity (capsule fingerprints and trained heads name it): BLAKE2b, 16 bytes,
    over each tensor's name, dtype, shape and bytes, in the order `add` is given them.

    The hashing runs in a worker thread (hashlib releases the GIL on large buffers), so that a
    loader copies one tensor to the device while the one before is hashed: a 0.8B model's 1.4 GB
    take a core about 2 s to hash. The digest is the one of hashing them in turn in one thread.

        with WeightsDigest() as digest:
            for name, t in tensors:     # on the CPU, contiguous, unchanged until hexdigest()
                digest.add(name, t)
                ...
        name = digest.hexdigest()
    """

    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=16)
        self._queue = queue.Queue(maxsize=1)        # in flight: one queued, one being hashed
        self._error = None
        self._thread = threading.Thread(target=self._run, name="flashrt-digest", daemon=True)
        self._thread.start()

    def add(self, name: str, t) -> None:
        self._queue.put((name, t))

    def _run(self):
        import torch
        while (item := self._queue.get()) is not None:
            name, t = item
            if self._error is not None:
                continue
            try:
                self._hash.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                if t.numel():       # the bytes in place (a memoryview), not a copy of them
                    self._hash.update(memoryview(t.view(torch.uint8).numpy()))
            except Exception as e:  # noqa: BLE001 - raised again by hexdigest, in the caller
                self._error = e

    def close(self) -> None:
        """Wait for every tensor given so far (also after an error in the caller's loop)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def __enter__(self) -> "WeightsDigest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
