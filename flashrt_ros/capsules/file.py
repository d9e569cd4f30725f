"""Capsule files: the disk tier's format, written atomically and verified before use.

Format (version 1): a safetensors file `<capsule_dir>/<name>.capsule`.
  * one tensor per arena buffer, named as in the arena, in its own dtype and shape; the KV tensor
    holds only the live prefix (`[position, n_attn_layers, 2, n_kv_heads, head_dim]`);
  * `__metadata__` (strings): format="flashrt-capsule", format_version, name, parent, step,
    position, episode, pinned, created, fingerprint (of the runtime that wrote it), digest
    (BLAKE2b-256 over the buffers' bytes in layout order).
safetensors holds no code (no pickle); its header is bounded and checked against the file length
by the library.

Writing: serialise, write to a temp file in the same directory, fsync, rename over the final name,
fsync the directory. A crash leaves either the old file or the new one, never a torn one; stray
temp files are removed when the store indexes the directory.

Reading (`read_capsule`) checks, in order and before anything touches the live state: the file
structure (safetensors), format and version, the fingerprint, every buffer's name, dtype and shape
against this runtime's layout (so sizes are bounded before anything is allocated), then the
digest of the bytes. The result is a host byte range in the arena's live layout, ready for one copy.
"""
from __future__ import annotations

import math
import os
import re
import tempfile

import torch

from flashrt_ros.core.arena import DTYPES, StateArena
from flashrt_ros.capsules.capsule import Capsule, buffer_slices, check_name, content_digest, shown
from flashrt_ros.core.exceptions import CapsuleCorrupt, CapsuleMismatch, InputError

FORMAT = "flashrt-capsule"
FORMAT_VERSION = 1
SUFFIX = ".capsule"
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64", "U8": "uint8"}


def capsule_path(directory: str, name: str) -> str:
    return os.path.join(directory, name + SUFFIX)


def write_capsule(path: str, arena: StateArena, raw: torch.Tensor, cap: Capsule) -> str:
    """Write a live byte range (host tensor) as a capsule file, atomically. Returns the digest."""
    from safetensors.torch import save
    raw = raw if raw.device.type == "cpu" else raw.cpu()
    digest = content_digest(arena, raw, cap.position)
    tensors = {}
    for name, off, n in buffer_slices(arena, cap.position):
        spec = arena.specs[name]
        shape = list(spec.shape)
        if spec.role == "kv":
            shape[0] = cap.position
        tensors[name] = raw[off:off + n].view(DTYPES[spec.dtype]).view(shape)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "name": cap.name,
            "parent": cap.parent, "step": str(cap.step), "position": str(cap.position),
            "episode": str(cap.episode), "pinned": "1" if cap.pinned else "0",
            "created": repr(cap.created), "fingerprint": cap.fingerprint, "digest": digest}
    blob = save(tensors, metadata=meta)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return digest


def read_header(path: str) -> dict:
    """The metadata of a capsule file (cheap: the header only). Raises CapsuleCorrupt."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CapsuleCorrupt(f"capsule file {path}: not a readable capsule ({e}); the file is "
                             f"truncated or not a capsule - delete it or load another") from None
    if meta.get("format") != FORMAT:
        raise CapsuleCorrupt(f"capsule file {path}: expected format {FORMAT!r}, found "
                             f"{meta.get('format')!r}")
    return meta


# Every header field is typed and range-checked when a file is read, before a Capsule exists:
# the values fill fixed-width message fields (msg/CapsuleInfo.msg: uint64 step/position/nbytes,
# builtin_interfaces/Time created: int32 sec) and the runtime's int64 counters, so a value that
# does not fit must be refused here, not when an answer is serialised.
INT64_MAX = 2**63 - 1
TIME_SEC_MAX = 2**31 - 1        # builtin_interfaces/Time.sec is an int32
_UINT_RE = re.compile(r"[0-9]{1,19}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


def _field(meta: dict, key: str, path: str, default=None) -> str:
    value = meta.get(key, default)
    if value is None:
        raise CapsuleCorrupt(f"capsule file {path}: header field {key!r}: expected a value, found "
                             f"none; the file is not a whole capsule - delete it or load another")
    return value


def _damaged(path: str, key: str, expected: str, value, edited: bool = True) -> CapsuleCorrupt:
    """The refusal of a header field that is not what a capsule file holds."""
    return CapsuleCorrupt(f"capsule file {path}: header field {key!r}: expected {expected}, found "
                          f"{shown(value)}; the header is damaged{' or was edited' if edited else ''}"
                          f" - delete the file or re-create the capsule")


def _header_int(meta: dict, key: str, path: str, default=None, upper: int = INT64_MAX) -> int:
    value = _field(meta, key, path, default)
    if not _UINT_RE.fullmatch(value) or int(value) > upper:
        raise _damaged(path, key, f"an integer in [0, {upper}]", value)
    return int(value)


def _header_time(meta: dict, key: str, path: str, default=None) -> float:
    value = _field(meta, key, path, default)
    try:
        t = float(value)
    except ValueError:
        t = float("nan")
    if not (math.isfinite(t) and 0.0 <= t <= TIME_SEC_MAX):
        raise _damaged(path, key, f"a finite time in [0, {TIME_SEC_MAX}] seconds", value)
    return t


def _header_choice(meta: dict, key: str, path: str, choices, default=None) -> str:
    value = _field(meta, key, path, default)
    if value not in choices:
        raise _damaged(path, key, f"one of {list(choices)}", value)
    return value


def capsule_from_header(meta: dict, path: str) -> Capsule:
    """The Capsule a header describes; every field typed and range-checked (CapsuleCorrupt)."""
    name = _field(meta, "name", path)
    parent = _field(meta, "parent", path, "")
    for key, value in (("name", name), ("parent", parent)):
        if value or key == "name":
            try:
                check_name(value, f"capsule file {path}: header field {key!r}")
            except InputError as e:
                raise CapsuleCorrupt(str(e)) from None
    digest = _field(meta, "digest", path)
    if not _HEX64_RE.fullmatch(digest):
        raise _damaged(path, "digest", "64 lowercase hex digits (BLAKE2b-256)", digest,
                       edited=False)
    fingerprint = _field(meta, "fingerprint", path)
    if not fingerprint or len(fingerprint) > 256 or not fingerprint.isprintable():
        raise _damaged(path, "fingerprint", "1-256 printable characters", fingerprint,
                       edited=False)
    return Capsule(name=name, parent=parent, step=_header_int(meta, "step", path),
                   position=_header_int(meta, "position", path),
                   episode=_header_int(meta, "episode", path, "0"),
                   nbytes=os.path.getsize(path), fingerprint=fingerprint, tier="disk",
                   pinned=_header_choice(meta, "pinned", path, ("0", "1"), "0") == "1",
                   digest=digest, created=_header_time(meta, "created", path, "0.0"), path=path)


def read_capsule(path: str, arena: StateArena, fingerprint: str) -> tuple[Capsule, torch.Tensor]:
    """Verify a capsule file completely and return it with its bytes in the arena's live layout.

    Nothing here touches the live state; callers copy the returned bytes in only on success.
    """
    from safetensors import SafetensorError, safe_open
    meta = read_header(path)
    version = meta.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise CapsuleMismatch(f"capsule file {path}: expected format version {FORMAT_VERSION}, "
                              f"found {version!r} (written by another flashrt_ros version); "
                              f"re-create the capsule with this version")
    cap = capsule_from_header(meta, path)
    if cap.fingerprint != fingerprint:
        raise CapsuleMismatch(f"capsule {cap.name!r}: expected fingerprint {fingerprint} (this "
                              f"runtime's model, layout and weights), found {cap.fingerprint}; it "
                              f"was taken from another preset, weights or version and cannot be "
                              f"restored here")
    max_pos = arena.max_context - 1
    if not 0 <= cap.position <= max_pos:
        raise CapsuleCorrupt(f"capsule {cap.name!r}: position {cap.position} outside [0, {max_pos}]")
    raw = torch.zeros(arena.live_nbytes(cap.position), dtype=torch.uint8)
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            expected = [n for n, _, _ in buffer_slices(arena, cap.position)]
            if keys != set(expected):
                raise CapsuleCorrupt(f"capsule {cap.name!r}: expected buffers {sorted(expected)}, "
                                     f"found {sorted(keys)}")
            for name, off, n in buffer_slices(arena, cap.position):
                spec = arena.specs[name]
                shape = list(spec.shape)
                if spec.role == "kv":
                    shape[0] = cap.position
                sl = f.get_slice(name)
                got_dtype = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())
                if list(sl.get_shape()) != shape or got_dtype != spec.dtype:
                    raise CapsuleCorrupt(
                        f"capsule {cap.name!r}: buffer {name} expected {spec.dtype}{shape}, found "
                        f"{got_dtype}{list(sl.get_shape())}; the manifest does not match the data")
                t = f.get_tensor(name)
                raw[off:off + n].copy_(t.contiguous().view(-1).view(torch.uint8))
    except SafetensorError as e:
        raise CapsuleCorrupt(f"capsule file {path}: unreadable ({e})") from None
    digest = content_digest(arena, raw, cap.position)
    if digest != cap.digest:
        raise CapsuleCorrupt(f"capsule {cap.name!r}: expected digest {cap.digest}, found {digest}; "
                             f"the file was modified or damaged after it was written")
    # metadata the runtime adopts must agree with the header
    meta_t = raw[arena.specs["meta"].offset:][:arena.specs["meta"].nbytes].view(torch.int64)
    if int(meta_t[0]) != cap.position:
        raise CapsuleCorrupt(f"capsule {cap.name!r}: header position {cap.position} disagrees with "
                             f"the stored state's position {int(meta_t[0])}")
    return cap, raw
