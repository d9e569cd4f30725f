"""ExtentMemory: memory-tier capsules as one extent each of a preallocated byte pool.

The flat store's memory tiers (CapsuleStore's default `memory`, see memory.py). Each memory tier
(gpu on CUDA, host) is one `BytePool` (pool.py) sized by its budget, and a capsule in it is one
contiguous extent holding its live range (`cap.offset`): a snapshot is one copy out of the live
arena, a restore one copy in: the runtime's reset point refers to the extent restored from
instead of copying it again (core/rollback.py), so an extent is handed back to it (`hand_back`)
before it is released.

Copies: device-to-device copies stay on the compute stream, ordered with the steps. Host<->device
copies run on a side stream, ordered both ways with the compute stream, so the caller thread never
blocks on PCIe; the capsule keeps the copy's completion event (`cap.ready`), and whatever reads its
bytes on the host, or frees its extent, waits for it first.

Room: a capsule larger than its tier's budget, or one that does not fit next to the pinned
capsules, is refused before anything changes; otherwise the store evicts the tier's least recently
used unpinned capsules (`CapsuleStore.evict_lru`) until an extent is free.
"""
from __future__ import annotations

import torch

from flashrt_ros.capsules.capsule import Capsule
from flashrt_ros.capsules.memory import Boundary, hand_back, live_boundary
from flashrt_ros.capsules.pool import BytePool
from flashrt_ros.core.exceptions import BudgetExceeded


class ExtentMemory:
    def __init__(self, store):
        self.store = store
        rt = store.rt
        self.pools: dict[str, BytePool] = {}
        if store.cuda:
            self.pools["gpu"] = BytePool(store.cfg.budget("gpu"), rt.device)
            self.copy_stream = torch.cuda.Stream(rt.device)
        self.pools["host"] = BytePool(store.cfg.budget("host"), torch.device("cpu"),
                                      pinned=store.cuda)
        self.tiers = tuple(self.pools)

    # -- extents and copies ---------------------------------------------------------------
    def _view(self, cap: Capsule) -> torch.Tensor:
        return self.pools[cap.tier].view(cap.offset, cap.nbytes)

    @staticmethod
    def _wait_ready(cap: Capsule) -> None:
        if cap.ready is not None:
            cap.ready.synchronize()
            cap.ready = None

    def _copy(self, dst: torch.Tensor, src: torch.Tensor):
        """Copy between tiers/arena; host<->device copies run on the side stream, ordered both ways
        with the compute stream. Returns the event that marks completion (or None)."""
        if not self.store.cuda:
            dst.copy_(src)
            return None
        if dst.device.type == "cuda" and src.device.type == "cuda":
            dst.copy_(src)         # stays on the compute stream: ordered with the steps
            return None
        compute = torch.cuda.current_stream(self.store.rt.device)
        self.copy_stream.wait_stream(compute)
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        compute.wait_event(ev)     # the next step may not overwrite what is still being copied
        return ev

    def _check_room(self, tier: str, nbytes: int, protect: set) -> None:
        """Raise BudgetExceeded now if nbytes could never fit next to the pinned and protected
        capsules of `tier`, before anything is changed."""
        pool = self.pools[tier]
        pinned = sum(c.nbytes for c in self.store.capsules.values()
                     if c.tier == tier and (c.pinned or c.name in protect))
        if nbytes + pinned > pool.capacity:
            raise BudgetExceeded(f"tier {tier}: {nbytes / 2**20:.2f} MiB do not fit next to "
                                 f"{pinned / 2**20:.2f} MiB of pinned capsules in the "
                                 f"{pool.capacity / 2**20:.2f} MiB budget; unpin or delete capsules, "
                                 f"or raise store.{tier}_budget_mb")

    def _reserve(self, tier: str, nbytes: int, protect: set) -> int:
        """An extent of nbytes in `tier`, evicting LRU unpinned capsules until one is free."""
        pool = self.pools[tier]
        if not pool.fits_ever(nbytes):
            raise BudgetExceeded(f"tier {tier}: a capsule of {nbytes / 2**20:.1f} MiB is larger "
                                 f"than the tier's budget {pool.capacity / 2**20:.1f} MiB; raise "
                                 f"store.{tier}_budget_mb or use another tier")
        while True:
            off = pool.allocate(nbytes)
            if off is not None:
                return off
            if not self.store.evict_lru(tier, protect):
                pinned = sum(c.nbytes for c in self.store.capsules.values()
                             if c.tier == tier and c.pinned)
                raise BudgetExceeded(
                    f"tier {tier}: no room for {nbytes / 2**20:.2f} MiB; {pinned / 2**20:.2f} MiB of "
                    f"{pool.capacity / 2**20:.2f} MiB are pinned and nothing else can be evicted; "
                    f"unpin or delete capsules, or raise store.{tier}_budget_mb")

    # -- the Memory interface (memory.py) -------------------------------------------------
    def capture(self, cap: Capsule, prefer: str | None) -> Boundary:
        # Room is reserved without the runtime lock (eviction may write to disk); the live size
        # can grow meanwhile (tokens decoded by another thread), so it is checked again under the
        # lock and the reservation redone if it no longer matches.
        rt, tier = self.store.rt, cap.tier
        for _ in range(8):
            with rt.lock:
                nbytes = rt.live_nbytes()
            self._check_room(tier, nbytes, set())
            off = self._reserve(tier, nbytes, set())
            with rt.lock:
                if rt.live_nbytes() != nbytes:
                    self.pools[tier].release(off)
                    continue
                cap.offset, cap.nbytes = off, nbytes
                cap.ready = self._copy(self.pools[tier].view(off, nbytes), rt.live_state())
                return live_boundary(self.store)
        raise BudgetExceeded(f"snapshot {cap.name!r}: expected the live state to hold still "
                             f"between two steps, found it growing on every try; retry")

    def put(self, cap: Capsule, tier: str, raw: torch.Tensor, protect: set,
            prefer: str | None) -> None:
        nbytes = raw.numel()
        self._check_room(tier, nbytes, protect)
        off = self._reserve(tier, nbytes, protect)
        cap.offset = off
        cap.ready = self._copy(self.pools[tier].view(off, nbytes), raw)

    def copy(self, src: Capsule, cap: Capsule, protect: set) -> None:
        self._wait_ready(src)
        self._check_room(cap.tier, src.nbytes, protect)
        off = self._reserve(cap.tier, src.nbytes, protect)
        cap.offset = off
        cap.ready = self._copy(self.pools[cap.tier].view(off, src.nbytes), self._view(src))

    def move(self, cap: Capsule, tier: str, protect: set) -> None:
        self._check_room(tier, cap.nbytes, protect)
        off = self._reserve(tier, cap.nbytes, protect)
        self._wait_ready(cap)
        ev = self._copy(self.pools[tier].view(off, cap.nbytes), self._view(cap))
        self._free(cap)
        cap.offset, cap.ready = off, ev

    def restore(self, cap: Capsule) -> None:
        # copies into the extent are stream-ordered before this one; the extent is immutable
        # until released, so the runtime's reset point may refer to it (release hands it back)
        view = self._view(cap)
        self.store.rt.restore_state(view, cap.known(), refer=view)

    def restored(self, cap: Capsule) -> None:
        pass

    def host_bytes(self, cap: Capsule) -> torch.Tensor:
        self._wait_ready(cap)
        v = self._view(cap)
        return v if v.device.type == "cpu" else v.cpu()

    def release(self, cap: Capsule) -> None:
        self._wait_ready(cap)
        self._free(cap)
        cap.offset = None

    def _free(self, cap: Capsule) -> None:
        """Free `cap`'s extent, handed back first to a reset point that refers to it."""
        hand_back(self.store, self._view(cap))
        self.pools[cap.tier].release(cap.offset)

    def usage(self, tier: str) -> dict:
        return {"used": sum(c.nbytes for c in self.store.capsules.values() if c.tier == tier)}
