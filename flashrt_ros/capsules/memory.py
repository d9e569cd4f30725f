"""The memory tiers of a capsule store: what CapsuleStore asks of the storage it composes with.

CapsuleStore (store.py) keeps what every store shares: the capsule index and its names, the disk
tier (capsule files and their budget), eviction (least recently used first, demoted a tier down
or dropped), the lineage, the locks and the operations. How a capsule's bytes are held in the gpu
and host tiers is its `memory`, one of:
  * ExtentMemory (extents.py) - one extent of a preallocated byte pool per capsule;
  * BlockMemory (paged.py)    - a block table per capsule over shared, immutable token blocks.

A memory is built by the store (`memory(store)`) and reads what it needs from it: the runtime
(`store.rt`), the budgets (`store.cfg`), the index (`store.capsules`: which capsules of a tier are
pinned) and the lineage. It is called with `store.lock` held, takes the runtime lock only around
copies of live bytes, and makes room by evicting through `store.evict_lru`. It sets a capsule's
storage only (its own fields or tables); the store sets `tier`, `nbytes` and the metadata.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from flashrt_ros.capsules.capsule import Capsule
from flashrt_ros.core.arena import META_CONTEXT_LEN


class Boundary(NamedTuple):
    """The committed boundary a snapshot copied, read under the runtime lock with the bytes."""
    position: int
    step: int
    episode: int
    context_len: int
    lineage: str        # the capsule the live state descended from there ("" = none)


def context_len_of(arena, raw: torch.Tensor) -> int:
    """The instruction tokens a live range (host bytes) carries in its meta buffer."""
    off = arena.specs["meta"].offset + 8 * META_CONTEXT_LEN
    return int(raw[off:off + 8].view(torch.int64)[0])


def hand_back(store, storage: torch.Tensor) -> None:
    """`storage`, bytes of a memory tier, is about to be freed or overwritten. A restore from it
    (`restore_state(..., refer=...)`) may have left the runtime's reset point referring to it:
    the ring then copies it first (core/rollback.py). The reference comes to a capsule's bytes
    only by a restore from the store, under `store.lock`, which the caller holds; so the runtime
    lock is taken only where it refers there now."""
    ring = store.rt.ring
    if ring.refers_to(storage):
        with store.rt.lock:
            ring.release(storage)


def live_boundary(store) -> Boundary:
    """The live state's boundary now; the caller holds the runtime lock."""
    rt = store.rt
    return Boundary(rt.position, rt.step_count, rt.episode, rt.context_len, store.lineage)


class Memory(Protocol):
    tiers: tuple            # the memory tiers it holds: ("gpu", "host") on CUDA, else ("host",)

    def capture(self, cap: Capsule, prefer: str | None) -> Boundary:
        """Copy the live state at a committed boundary into tier `cap.tier` as the storage of
        `cap` (a new capsule, not in the index yet); returns the boundary it copied. `prefer`
        names a capsule the bytes likely share history with (a hint; may be None)."""

    def put(self, cap: Capsule, tier: str, raw: torch.Tensor, protect: set,
            prefer: str | None) -> None:
        """Store verified host bytes `raw` (a live range read from a capsule file) in `tier` as
        the storage of `cap`, whose bytes were on disk until now."""

    def copy(self, src: Capsule, cap: Capsule, protect: set) -> None:
        """The bytes of stored memory-tier capsule `src` as the storage of new capsule `cap`, in
        tier `cap.tier`."""

    def move(self, cap: Capsule, tier: str, protect: set) -> None:
        """Move `cap`'s storage from tier `cap.tier` to memory tier `tier`; the old one is freed."""

    def restore(self, cap: Capsule) -> None:
        """Copy `cap` into the live arena and adopt its metadata; the caller holds the runtime
        lock and has checked the fingerprint. Bytes the runtime may keep referring to (its reset
        point, `restore_state(..., refer=...)`) are handed back (`hand_back`) before they are
        freed or overwritten."""

    def restored(self, cap: Capsule) -> None:
        """The live state was just restored from `cap` (any tier, disk included)."""

    def host_bytes(self, cap: Capsule) -> torch.Tensor:
        """`cap`'s live-range bytes on the host (to write a file, to verify, to compare)."""

    def release(self, cap: Capsule) -> None:
        """Free `cap`'s storage in tier `cap.tier` (it is dropped or now held on disk only)."""

    def usage(self, tier: str) -> dict:
        """Figures for `CapsuleStore.usage()[tier]`, at least `used` (bytes held)."""
