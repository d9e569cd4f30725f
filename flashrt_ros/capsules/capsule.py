"""Capsule: the whole execution state of a policy at one committed boundary, as a value.

Content: every named arena buffer (for the KV only the live prefix `[0:position]`), stored as
the arena's contiguous live byte range in a memory tier, or as a capsule file on disk.
Metadata: name, lineage (parent capsule, step, position, episode), the fingerprint of the runtime
that took it (model config + buffer layout + weights digest + format version), and a content
digest over the buffers' bytes in layout order (digest.py: a BLAKE2b-256 tree over 4 MiB leaves).

The digest is computed when a capsule is written to disk (and checked whenever one is read), or on
demand (`CapsuleStore.verify`). It is not computed on the GPU/host snapshot path: hashing 200 MB on
the CPU takes far longer than the copy it would guard, and memory tiers never leave the process.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import torch

from flashrt_ros.capsules.digest import tree_digest
from flashrt_ros.core.arena import StateArena
from flashrt_ros.core.exceptions import InputError

# matched whole (fullmatch): with match/search, `$` also matches before a trailing newline
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
TIERS = ("gpu", "host", "disk")


def shown(value) -> str:
    """`value` for an error message: repr, a string cut to 40 characters ("..." marks the cut)."""
    return repr(value[:40] + "..." if isinstance(value, str) and len(value) > 40 else value)


def check_name(name, what: str = "capsule name") -> str:
    """Capsule names are file names inside the capsule directory: they can never escape it."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InputError(f"{what}: expected 1-128 characters of A-Z a-z 0-9 _ . - (not starting "
                         f"with '.', no '..'), found {shown(name)}; pick a plain name like 'home' or "
                         f"'branch-1'")
    return name


def buffer_slices(arena: StateArena, position: int):
    """(name, byte offset, byte length) of every buffer in a live range, in layout order."""
    for spec in arena.specs.values():
        n = spec.nbytes if spec.role != "kv" else position * arena.kv_row_nbytes
        yield spec.name, spec.offset, n


def content_digest(arena: StateArena, raw: torch.Tensor, position: int, threads: int = 0) -> str:
    """The content digest (digest.py) of each buffer's bytes (padding excluded) of a live range,
    hashed by `threads` threads (0: one per core)."""
    data = raw.numpy() if raw.device.type == "cpu" else raw.cpu().numpy()
    return tree_digest([data[off:off + n] for _, off, n in buffer_slices(arena, position)],
                       threads)


@dataclass
class Capsule:
    name: str
    parent: str
    step: int
    position: int
    episode: int
    nbytes: int
    fingerprint: str
    tier: str
    pinned: bool = False
    digest: str = ""
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    # storage: an extent of the tier's pool (memory tiers) or a file (disk)
    offset: int | None = None
    path: str | None = None
    ready: object = None   # CUDA event: the copy into this capsule has completed
    context_len: int = -1  # tokens of instruction context in the state (-1: read from the bytes)
    # the file was written by eviction, not asked for (by a save or a move to disk): it is the
    # store's spill and goes with the capsule when it is deleted
    spilled: bool = False
    writer: str = ""       # the store that wrote its file, as the file's header says ("" = unknown)

    def known(self):
        """(position, step, episode, context_len) for PolicyRuntime.restore_state, or None."""
        if self.context_len < 0:
            return None
        return (self.position, self.step, self.episode, self.context_len)

    @property
    def file(self) -> str:
        """Which file holds this capsule: "saved" (one the user asked for), "spill" (one eviction
        wrote), or "" (none on disk)."""
        if not (self.path and os.path.isfile(self.path)):
            return ""
        return "spill" if self.spilled else "saved"

    def same_file(self, other: "Capsule") -> bool:
        """Whether `other` (a file's header) is the file this capsule was written or indexed
        from: the same content digest, creation time and writer."""
        return (other.digest, other.created, other.writer) == (self.digest, self.created,
                                                               self.writer)

    def touch(self):
        self.last_used = time.monotonic()
