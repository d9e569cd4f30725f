"""Capsule files: the disk tier's format, written atomically and verified before use.

Format (version 2): a safetensors file `<capsule_dir>/<name>.capsule`.
  * one tensor per arena buffer, named as in the arena, in its own dtype and shape, in layout
    order; the KV tensor holds only the live prefix (`[position, n_attn_layers, 2, n_kv_heads,
    head_dim]`). The data section is thus exactly D, the bytes the content digest covers;
  * `__metadata__` (strings): format="flashrt-capsule", format_version, name, parent, step,
    position, episode, pinned, created, fingerprint (of the runtime that wrote it), weights (its
    weights digest), writer (the store that wrote it: host, process, store id; absent in files of
    earlier writers), digest (the content digest of D, digest.py's BLAKE2b tree) and
    header_digest: BLAKE2b-256 over every other metadata field (canonical JSON: sorted keys, no
    spaces, ASCII).
    An edit of any header field, or of the tensors, is refused; a file carries no key, so the two
    digests detect damage and edits, not a forger who recomputes them (access control is the
    directory's permissions and SROS2, docs/safety.md).
Version 1 files (no header digest, a one-pass digest) are refused with a message that says so.

Identity: a capsule's file name is its identity. A file whose header names another capsule (a
copy, a rename) is refused, at indexing and on load, so one name never stands for two files.

Opening: only regular files, opened with O_NOFOLLOW | O_NONBLOCK and checked with fstat on the
open descriptor: a symlink is never followed out of the directory, a FIFO never blocks the open.

Writing streams: the safetensors header goes first with both digests as placeholders, then the
buffers' bytes straight from the live range (no serialised copy) while the hashing threads digest
each leaf; the digests are written into the header, the temp file is fsynced, linked in under
the final name and the directory fsynced. A crash leaves no file or the whole new one, never a
torn one. A capsule file is only ever created, never written over: a name that is taken (a file
another store wrote, or one skipped at indexing) is refused (CapsuleConflict, naming the file's
writer), atomically - the link fails on an existing name. A filesystem error answers what was
expected and found (StorageError; a full disk: BudgetExceeded) and leaves nothing. Temp files are
named `.<name>.capsule.tmp-<16 hex>`; only regular files of exactly that
pattern are the store's to remove (`is_own_temp`). `begin_write` leaves the written temp file
pending, so the store can evict for it only once the write succeeded.

Reading (`read_capsule`) checks, in order and before anything touches the live state: the file
(regular, not a link), the safetensors header (bounded, offsets contiguous and covering the file),
format and version, every header field's type and range, the header digest, the name, the
fingerprint and weights against this runtime's, every buffer's name, dtype and shape against this
runtime's layout (so sizes are bounded before anything is allocated). Then it reads the data with
large sequential reads into one host buffer (pinned on request) while the leaves are hashed, and
compares the digest and the position, step and episode the state itself carries with the header.
The result is a host byte range in the arena's live layout, ready for one copy.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import stat

import numpy as np
import torch

from flashrt_ros.capsules.capsule import Capsule, buffer_slices, check_name, shown
from flashrt_ros.capsules.digest import TreeHash, leaves
from flashrt_ros.core.arena import META_EPISODE, META_POSITION, META_STEP, StateArena
from flashrt_ros.core.exceptions import (BudgetExceeded, CapsuleConflict, CapsuleCorrupt,
                                         CapsuleMismatch, CapsuleNotFound, FlashRTError,
                                         InputError, StorageError)

FORMAT = "flashrt-capsule"
FORMAT_VERSION = 2
SUFFIX = ".capsule"
MAX_HEADER_BYTES = 1 << 20      # a capsule's safetensors header is a few KiB
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64", "U8": "uint8"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "uint8": 1}
_PLACEHOLDER = "0" * 64
_TEMP_RE = re.compile(r"\.(?P<name>.+)\.capsule\.tmp-[0-9a-f]{16}")


def capsule_path(directory: str, name: str) -> str:
    return os.path.join(directory, name + SUFFIX)


def temp_path(path: str) -> str:
    """A fresh temp file name beside `path`, in the pattern `is_own_temp` recognises."""
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.tmp-{secrets.token_hex(8)}")


def is_own_temp(fname: str) -> bool:
    """Whether a directory entry's name is one `temp_path` makes (of a valid capsule name)."""
    m = _TEMP_RE.fullmatch(fname)
    if m is None:
        return False
    try:
        check_name(m["name"])
    except InputError:
        return False
    return True


# -- opening: regular files only ----------------------------------------------------------
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


@contextlib.contextmanager
def open_regular(path: str):
    """A read-only descriptor of `path` and its size, if it is a regular file: a symlink is not
    followed (O_NOFOLLOW), a FIFO or device does not block (O_NONBLOCK; fstat then refuses it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CapsuleNotFound(f"no capsule file {path}; expected a saved capsule - save it first "
                              f"or load another") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CapsuleCorrupt(f"capsule file {path}: expected a regular file, found a symbolic "
                                 f"link; links are not followed out of the capsule directory - "
                                 f"copy the capsule file itself there") from None
        raise CapsuleCorrupt(f"capsule file {path}: expected a readable regular file, found "
                             f"{e.strerror}; check its permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CapsuleCorrupt(f"capsule file {path}: expected a regular file, found "
                                 f"{_KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')}; "
                                 f"remove it from the capsule directory")
        yield fd, st.st_size
    finally:
        os.close(fd)


def _pread_exactly(fd: int, views, offset: int, path: str) -> None:
    """Fill the writable views from file offset `offset` on (one preadv per short read)."""
    views = [v for v in views if len(v)]
    while views:
        n = os.preadv(fd, views, offset)
        if n == 0:
            raise CapsuleCorrupt(f"capsule file {path}: expected more data at byte {offset}, found "
                                 f"the end of the file; it is truncated - delete it or load another")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _write_all(fd: int, views) -> None:
    views = [v for v in views if len(v)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


# -- the safetensors header -----------------------------------------------------------------
def _not_safetensors(path: str, what: str) -> CapsuleCorrupt:
    return CapsuleCorrupt(f"capsule file {path}: expected a safetensors capsule file, found "
                          f"{what}; the file is truncated or not a capsule - delete it or load "
                          f"another")


def _read_st_header(fd: int, size: int, path: str):
    """(metadata, {tensor: (dtype, shape, begin, end)}, data start) of a safetensors file, checked
    as the format requires: a bounded JSON header; tensors whose byte ranges match their dtype and
    shape and tile the data section without gap or overlap."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise _not_safetensors(path, f"{size} bytes, shorter than a header")
    n = int.from_bytes(head, "little")
    if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
        raise _not_safetensors(path, f"a header of {n} bytes in a file of {size} bytes (expected "
                                     f"at most {MAX_HEADER_BYTES})")
    try:
        obj = json.loads(os.pread(fd, n, 8).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _not_safetensors(path, f"its header is not JSON: {e}") from None
    except RecursionError:
        raise _not_safetensors(path, "its header is not JSON a capsule writes: arrays or objects "
                                     "nested too deep to parse") from None
    if not isinstance(obj, dict):
        raise _not_safetensors(path, "its header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _not_safetensors(path, "__metadata__ is not a map of strings")
    tensors, spans = {}, []
    for name, t in obj.items():
        try:
            dtype, shape, (begin, end) = _ST_DTYPES[t["dtype"]], t["shape"], t["data_offsets"]
            ok = (all(type(d) is int and d >= 0 for d in shape) and type(begin) is int
                  and type(end) is int and end - begin == math.prod(shape) * _ITEMSIZE[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _not_safetensors(path, f"tensor {shown(name)}: {shown(str(t))} is not a dtype, "
                                         f"shape and matching byte range")
        tensors[name] = (dtype, list(shape), begin, end)
        spans.append((begin, end))
    at = 0
    for begin, end in sorted(spans):
        if begin != at:
            raise _not_safetensors(path, f"tensor bytes from {begin}, expected from {at}")
        at = end
    if 8 + n + at != size:
        raise _not_safetensors(path, f"{size} bytes, expected {8 + n + at} from its header")
    return meta, tensors, 8 + n


def _st_header(meta: dict, tensors) -> tuple[bytes, dict]:
    """A safetensors header for `tensors` [(name, dtype, shape, nbytes)] in this order; returns it
    (length prefix included, padded to 8 bytes as the library does) and the byte offset of each
    metadata value that is `_PLACEHOLDER`."""
    obj, at = {"__metadata__": meta}, 0
    for name, dtype, shape, n in tensors:
        obj[name] = {"dtype": _ST_NAMES[dtype], "shape": shape, "data_offsets": [at, at + n]}
        at += n
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    text += " " * (-len(text) % 8)
    where = {}
    for key, value in meta.items():
        if value == _PLACEHOLDER:
            where[key] = 8 + text.index(f'"{key}":"{_PLACEHOLDER}"') + len(key) + 4
    return len(text).to_bytes(8, "little") + text.encode("ascii"), where


def header_digest(meta: dict) -> str:
    """BLAKE2b-256 of every metadata field but `header_digest`, as canonical JSON."""
    covered = {k: v for k, v in meta.items() if k != "header_digest"}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.blake2b(text.encode("ascii"), digest_size=32,
                           person=b"flashrt-header").hexdigest()


# -- writing --------------------------------------------------------------------------------
def _tensors(arena: StateArena, position: int):
    """(name, dtype, shape, live offset, nbytes) of every buffer of a live range, layout order."""
    for name, off, n in buffer_slices(arena, position):
        spec = arena.specs[name]
        shape = list(spec.shape)
        if spec.role == "kv":
            shape[0] = position
        yield name, spec.dtype, shape, off, n


# -- errors of the filesystem ---------------------------------------------------------------
_FOUND = {errno.EROFS: "a read-only filesystem",
          errno.EACCES: "permission denied",
          errno.EPERM: "the operation not permitted (permissions, or an immutable attribute)",
          errno.ENOENT: "no such directory (removed while the store ran)",
          errno.ENOTDIR: "something other than a directory there (a file?)"}


def storage_error(path: str, e: OSError, doing: str) -> FlashRTError:
    """The refusal of filesystem error `e` while `doing` (e.g. "to write") `path` in the capsule
    directory: what was expected, what was found, what to do. The caller has changed nothing."""
    d = os.path.dirname(path)
    found = _FOUND.get(e.errno, e.strerror or str(e))
    code = errno.errorcode.get(e.errno, e.errno)
    return StorageError(f"capsule directory {d}: expected a writable directory {doing} "
                        f"{os.path.basename(path)}, found {found} ({code}); nothing was changed - "
                        f"make {d} a writable directory, or set store.capsule_dir to one and "
                        f"configure the node again")


def writer_of(path: str) -> str:
    """Who wrote the capsule file at `path`, as its header says, for a message."""
    try:
        meta = read_header(path)
    except (FlashRTError, OSError):
        return "an unknown writer (no readable capsule header)"
    return meta.get("writer") or "an unknown writer (a file without a 'writer' field)"


def taken(path: str, writer: str) -> CapsuleConflict:
    """The refusal to create a capsule file where one exists (this store, `writer`, never
    writes over a file)."""
    d, base = os.path.split(path)
    return CapsuleConflict(f"capsule file {base}: expected no file of that name in {d} (a store "
                           f"creates capsule files, never writes over one), found one written by "
                           f"{writer_of(path)}, not by this store ({writer}); nothing was "
                           f"changed - give each node its own store.capsule_dir, or delete or "
                           f"rename that file, or pick another name")


class PendingWrite:
    """A capsule file written and fsynced under its temp name: `commit()` links it in under its
    final name - only where no file has that name - (and fsyncs the directory), `discard()`
    removes it. `nbytes` is its size, `digest` its content digest."""

    def __init__(self, tmp: str, path: str, nbytes: int, digest: str, writer: str):
        self.tmp, self.path, self.nbytes, self.digest = tmp, path, nbytes, digest
        self.writer = writer

    def commit(self) -> str:
        try:
            try:
                os.link(self.tmp, self.path)     # fails on an existing name: never writes over
            except FileExistsError:
                raise taken(self.path, self.writer) from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                # a filesystem without hard links (FAT): check, then rename
                if os.path.lexists(self.path):
                    raise taken(self.path, self.writer) from None
                os.replace(self.tmp, self.path)
            dfd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                if os.path.samefile(self.tmp, self.path):
                    os.unlink(self.path)
            raise storage_error(self.path, e, "to create") from None
        self.discard()
        return self.path

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def _disk_full(path: str, e: OSError, need: int) -> BudgetExceeded:
    d = os.path.dirname(path)
    try:
        st = os.statvfs(d)
        free = f"{st.f_bavail * st.f_frsize / 2**20:.2f} MiB free"
    except OSError:
        free = "no free space reported"
    return BudgetExceeded(f"tier disk: the filesystem of {d} is full ({errno.errorcode[e.errno]} "
                          f"writing {os.path.basename(path)}): expected room for "
                          f"{need / 2**20:.2f} MiB, found {free}; nothing was changed - free space "
                          f"there, delete capsules, or lower store.disk_budget_mb to what the "
                          f"filesystem holds")


def begin_write(path: str, arena: StateArena, raw: torch.Tensor, cap: Capsule,
                weights: str, writer: str, threads: int = 0) -> PendingWrite:
    """Write the live byte range `raw` (host or device) as `cap`'s capsule file by `writer` (the
    store) under a temp name, fsynced, not yet in place, its digest hashed by `threads` threads
    (0: one per core). A full filesystem raises BudgetExceeded, another filesystem error
    StorageError; nothing is left."""
    raw = raw if raw.device.type == "cpu" else raw.cpu()
    src = raw.numpy()
    parts = list(_tensors(arena, cap.position))
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "name": cap.name,
            "parent": cap.parent, "step": str(cap.step), "position": str(cap.position),
            "episode": str(cap.episode), "pinned": "1" if cap.pinned else "0",
            "created": repr(cap.created), "fingerprint": cap.fingerprint, "weights": weights,
            "writer": writer, "digest": _PLACEHOLDER, "header_digest": _PLACEHOLDER}
    header, where = _st_header(meta, [(n, dt, sh, k) for n, dt, sh, _, k in parts])
    total = sum(k for *_, k in parts)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, [memoryview(header)])
            digest, written = TreeHash(total, threads), len(header)
            for _, pieces in leaves([k for *_, k in parts]):
                views = [memoryview(src[parts[p][3] + at:parts[p][3] + at + n]) for p, at, n in pieces]
                _write_all(fd, views)
                digest.add(views)
                # start the disk writing this leaf now (Linux: DONTNEED starts writeback of dirty
                # pages without waiting), so the disk works while the next leaves are hashed
                # instead of all at the fsync
                n = sum(len(v) for v in views)
                os.posix_fadvise(fd, written, n, os.POSIX_FADV_DONTNEED)
                written += n
            meta["digest"] = digest.hexdigest()
            meta["header_digest"] = header_digest(meta)
            for key, at in where.items():
                os.pwrite(fd, meta[key].encode("ascii"), at)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(path, e, len(header) + total) from None
        if isinstance(e, OSError):
            raise storage_error(path, e, "to write") from None
        raise
    return PendingWrite(tmp, path, len(header) + total, meta["digest"], writer)


# -- the header's fields --------------------------------------------------------------------
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


def _header_label(meta: dict, key: str, path: str) -> str:
    value = _field(meta, key, path)
    if not value or len(value) > 256 or not value.isprintable():
        raise _damaged(path, key, "1-256 printable characters", value, edited=False)
    return value


def capsule_from_header(meta: dict, path: str, nbytes: int | None = None) -> Capsule:
    """The Capsule a header describes; every field typed and range-checked (CapsuleCorrupt)."""
    name = _field(meta, "name", path)
    parent = _field(meta, "parent", path, "")
    for key, value in (("name", name), ("parent", parent)):
        if value or key == "name":
            try:
                check_name(value, f"capsule file {path}: header field {key!r}")
            except InputError as e:
                raise CapsuleCorrupt(str(e)) from None
    for key in ("digest", "header_digest"):
        if key in meta or key == "digest":
            value = _field(meta, key, path)
            if not _HEX64_RE.fullmatch(value):
                raise _damaged(path, key, "64 lowercase hex digits (BLAKE2b-256)", value,
                               edited=False)
    writer = _header_label(meta, "writer", path) if "writer" in meta else ""
    return Capsule(name=name, parent=parent, step=_header_int(meta, "step", path),
                   position=_header_int(meta, "position", path),
                   episode=_header_int(meta, "episode", path, "0"),
                   nbytes=os.path.getsize(path) if nbytes is None else nbytes,
                   fingerprint=_header_label(meta, "fingerprint", path), tier="disk",
                   pinned=_header_choice(meta, "pinned", path, ("0", "1"), "0") == "1",
                   digest=meta["digest"], created=_header_time(meta, "created", path, "0.0"),
                   path=path, writer=writer)


def _checked_header(meta: dict, path: str, nbytes: int) -> Capsule:
    """The Capsule of a version-2 header whose fields, seal and name hold."""
    if meta.get("format") != FORMAT:
        raise CapsuleCorrupt(f"capsule file {path}: expected format {FORMAT!r}, found "
                             f"{shown(meta.get('format'))}; it is not a capsule - remove it")
    version = meta.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise CapsuleMismatch(f"capsule file {path}: expected format version {FORMAT_VERSION}, "
                              f"found {shown(version)} (written by another flashrt_ros version; "
                              f"version 1 files carry no header digest and cannot be verified); "
                              f"re-create the capsule with this version")
    cap = capsule_from_header(meta, path, nbytes)
    _header_label(meta, "weights", path)
    sealed = _field(meta, "header_digest", path)
    if sealed != header_digest(meta):
        raise CapsuleCorrupt(f"capsule file {path}: expected header digest {sealed}, found "
                             f"{header_digest(meta)}; the header was edited or damaged after it "
                             f"was written - delete the file or re-create the capsule")
    stem = os.path.basename(path)[:-len(SUFFIX)]
    if cap.name != stem:
        raise CapsuleMismatch(f"capsule file {stem + SUFFIX!r}: expected the capsule {stem!r} (a "
                              f"capsule's file name is its identity), found the capsule "
                              f"{cap.name!r}; the file is a copy or was renamed - rename it back "
                              f"to {cap.name + SUFFIX!r}, or load {cap.name!r} and fork it")
    return cap


def read_header(path: str) -> dict:
    """The metadata of a capsule file (cheap: the header only), unchecked but for the format's
    structure. Raises CapsuleCorrupt."""
    with open_regular(path) as (fd, size):
        return _read_st_header(fd, size, path)[0]


def index_capsule(path: str) -> Capsule:
    """The Capsule a capsule file holds, from its header alone (fields, seal and name checked),
    for the index: the tensors are verified when it is loaded."""
    with open_regular(path) as (fd, size):
        return _checked_header(_read_st_header(fd, size, path)[0], path, size)


# -- reading --------------------------------------------------------------------------------
def read_capsule(path: str, arena: StateArena, fingerprint: str, weights: str,
                 pin_memory: bool = False, threads: int = 0) -> tuple[Capsule, torch.Tensor]:
    """Verify a capsule file completely and return it with its bytes in the arena's live layout
    (a host tensor, pinned if `pin_memory`); `threads` threads hash it (0: one per core).

    Nothing here touches the live state; callers copy the returned bytes in only on success.
    """
    with open_regular(path) as (fd, size):
        meta, tensors, data_start = _read_st_header(fd, size, path)
        cap = _checked_header(meta, path, size)
        if cap.fingerprint != fingerprint or meta["weights"] != weights:
            raise CapsuleMismatch(f"capsule {cap.name!r}: expected fingerprint {fingerprint} and "
                                  f"weights {weights} (this runtime's model, layout and weights), "
                                  f"found {cap.fingerprint} and {shown(meta['weights'])}; it was "
                                  f"taken from another preset, weights or version and cannot be "
                                  f"restored here")
        max_pos = arena.max_context - 1
        if not 0 <= cap.position <= max_pos:
            raise CapsuleCorrupt(f"capsule {cap.name!r}: header field 'position': expected an "
                                 f"integer in [0, {max_pos}] (this runtime's context), found "
                                 f"{cap.position}; it was taken with another max_context")
        parts = list(_tensors(arena, cap.position))
        expected = [p[0] for p in parts]
        if set(tensors) != set(expected):
            raise CapsuleCorrupt(f"capsule {cap.name!r}: expected buffers {sorted(expected)}, "
                                 f"found {sorted(tensors)[:40]}")
        for name, dtype, shape, _, _ in parts:
            got = tensors[name]
            if (got[0], got[1]) != (dtype, shape):
                raise CapsuleCorrupt(f"capsule {cap.name!r}: buffer {name} expected {dtype}{shape}, "
                                     f"found {got[0]}{got[1]}; the manifest does not match the data")
        n = arena.live_nbytes(cap.position)
        raw = torch.empty(n, dtype=torch.uint8, pin_memory=pin_memory)
        dst = raw.numpy()
        at = 0
        for _, _, _, off, k in parts:        # the alignment padding between buffers
            dst[at:off] = 0
            at = off + k
        digest = TreeHash(sum(k for *_, k in parts), threads)
        for _, pieces in leaves([k for *_, k in parts]):
            views, runs = [], []             # runs: (file offset, views) of contiguous file bytes
            for p, at, k in pieces:
                name, _, _, off, _ = parts[p]
                v = memoryview(dst[off + at:off + at + k])
                where = data_start + tensors[name][2] + at
                if runs and runs[-1][0] + sum(len(x) for x in runs[-1][1]) == where:
                    runs[-1][1].append(v)
                else:
                    runs.append((where, [v]))
                views.append(v)
            for where, vs in runs:
                _pread_exactly(fd, vs, where, path)
            digest.add(views)
        found = digest.hexdigest()
    if found != cap.digest:
        raise CapsuleCorrupt(f"capsule {cap.name!r}: expected digest {cap.digest}, found {found}; "
                             f"the file was modified or damaged after it was written")
    # the counters the runtime adopts from the bytes must agree with the header
    spec = arena.specs["meta"]
    state = np.frombuffer(dst[spec.offset:spec.offset + spec.nbytes].tobytes(), dtype=np.int64)
    for key, index, value in (("position", META_POSITION, cap.position),
                              ("step", META_STEP, cap.step), ("episode", META_EPISODE, cap.episode)):
        if int(state[index]) != value:
            raise CapsuleCorrupt(f"capsule {cap.name!r}: header field {key!r}: expected "
                                 f"{int(state[index])} (the {key} its state carries), found "
                                 f"{value}; the header was edited - delete the file or re-create "
                                 f"the capsule")
    return cap, raw

