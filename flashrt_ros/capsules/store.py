"""CapsuleStore: snapshot, restore, fork, delete, save, load and tier moves with byte budgets.

Tiers:
  * gpu  - an extent of a preallocated device pool (`BytePool`), one device-to-device copy each
           way; only when the runtime runs on CUDA;
  * host - an extent of a preallocated host pool (pinned on CUDA; copies run on a side stream and
           the compute stream waits on them, so the caller thread never blocks on PCIe);
  * disk - a capsule file in `capsule_dir` (see capsule_file.py), written atomically.

Budgets and eviction: each tier has a byte budget. When a capsule does not fit, the least recently
used unpinned capsules of that tier are evicted (demoted one tier down - gpu -> host -> disk - or
dropped, per `StoreConfig.eviction`) until it fits. Pinned capsules are never evicted; if the
pinned set leaves no room, the request fails with BudgetExceeded and nothing changes.

Atomicity: every operation checks everything it can (names, fingerprint, sizes, digest, room)
before it changes anything; a failed operation leaves the live state and the store as they were.
Restore copies into the live arena (never rebinds), so captured graphs stay valid.

Locking (the node relies on this): `store.lock` guards the index and the pools; the runtime's own
`runtime.lock` guards the live state. Store operations take `store.lock` first and the runtime lock
only around the copy of live bytes, never the other way round, so a control loop that takes only
the runtime lock waits at most one copy. Disk writes and reads (`save`, `load`, disk snapshots and
demotions) hold `store.lock` but never the runtime lock - with one exception: a fork of the live
state that switches to it (`fork('', name, switch_to=True)`) holds the runtime lock from its
snapshot through its restore, so that no control step runs between the two (the restore would
undo it); evictions it needs and, into the disk tier, its file write and read-back happen under
it. Branch into a memory tier while a control loop runs.

Lineage (`store.lineage`, the capsule the live state descends from) describes the live state, so
it changes under the runtime lock only: restore sets it in the same critical section as its copy,
so a step that follows names the new lineage. `on_reset` (the live state left its lineage) takes
the runtime lock alone, never `store.lock`, which a save holds through its file write: a control
step that resets the episode calls it while it holds the runtime lock and never waits for disk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

import torch

from flashrt_ros.capsules.capsule import TIERS, Capsule, check_name, content_digest
from flashrt_ros.capsules.file import (SUFFIX, capsule_from_header, capsule_path, read_capsule, read_header,
                           write_capsule)
from flashrt_ros.core.config import StoreConfig
from flashrt_ros.core.exceptions import (BudgetExceeded, CapsuleCorrupt, CapsuleExists, CapsuleMismatch,
                         CapsuleNotFound, InputError)
from flashrt_ros.capsules.pool import BytePool
from flashrt_ros.core.runtime import PolicyRuntime


class CapsuleStore:
    def __init__(self, runtime: PolicyRuntime, cfg: StoreConfig | None = None):
        self.rt = runtime
        self.cfg = cfg or StoreConfig()
        self.lock = threading.RLock()
        self.cuda = runtime.device.type == "cuda"
        self.pools: dict[str, BytePool] = {}
        if self.cuda:
            self.pools["gpu"] = BytePool(self.cfg.budget("gpu"), runtime.device)
            self.copy_stream = torch.cuda.Stream(runtime.device)
        self.pools["host"] = BytePool(self.cfg.budget("host"), torch.device("cpu"), pinned=self.cuda)
        self.capsules: dict[str, Capsule] = {}
        self.lineage = ""          # the capsule the live state descends from ("" = none); written
                                   # under the runtime lock only (see the module docstring)
        self.fingerprint = runtime.fingerprint()
        self.cfg = dataclasses.replace(self.cfg, capsule_dir=os.path.expanduser(self.cfg.capsule_dir))
        os.makedirs(self.cfg.capsule_dir, exist_ok=True)
        self.skipped_files: list[str] = []
        self.rebuild_index()

    # -- index ----------------------------------------------------------------------------
    def rebuild_index(self) -> None:
        """Index the capsule directory (after a restart): whole capsule files only, temps removed."""
        with self.lock:
            d = self.cfg.capsule_dir
            self.skipped_files = []
            for fname in sorted(os.listdir(d)):
                path = os.path.join(d, fname)
                if fname.startswith(".") and ".tmp-" in fname:
                    os.unlink(path)         # a write that never reached its rename
                    continue
                if not fname.endswith(SUFFIX):
                    continue
                name = fname[: -len(SUFFIX)]
                if name in self.capsules:
                    continue
                try:
                    check_name(name)
                    cap = capsule_from_header(read_header(path), path)
                except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, not fatal
                    self.skipped_files.append(f"{fname}: {e}")
                    continue
                if cap.name != name:
                    self.skipped_files.append(f"{fname}: header names {cap.name!r}")
                    continue
                self.capsules[name] = cap

    def tiers(self) -> list[str]:
        return (["gpu"] if self.cuda else []) + ["host", "disk"]

    def _tier(self, tier: str | None) -> str:
        tier = tier or self.cfg.default_tier
        if tier == "auto":
            tier = "gpu" if self.cuda else "host"
        if tier not in TIERS:
            raise InputError(f"tier: expected one of gpu, host, disk (or '' for the default), found "
                             f"{tier!r}")
        if tier == "gpu" and not self.cuda:
            raise InputError(f"tier: 'gpu' expected a CUDA runtime, found one on {self.rt.device}; "
                             f"use 'host' or 'disk'")
        return tier

    def _check_new_name(self, name: str) -> None:
        if name in self.capsules:
            cap = self.capsules[name]
            raise CapsuleExists(f"a capsule named {name!r} exists ({cap.tier}, step {cap.step}); "
                                f"delete it first or pick another name")

    def get(self, name: str) -> Capsule:
        check_name(name)
        cap = self.capsules.get(name)
        if cap is None:
            known = sorted(self.capsules)
            raise CapsuleNotFound(f"no capsule named {name!r}; stored: {known[:20]}"
                                  + (" ..." if len(known) > 20 else ""))
        return cap

    def list(self, tier: str | None = None) -> list[Capsule]:
        with self.lock:
            if tier:
                self._tier(tier)
            caps = [c for c in self.capsules.values() if not tier or c.tier == tier]
            return sorted(caps, key=lambda c: (c.created, c.name))

    def usage(self) -> dict:
        with self.lock:
            out = {}
            for t in ("gpu", "host", "disk"):
                used = self._disk_used() if t == "disk" else \
                    sum(c.nbytes for c in self.capsules.values() if c.tier == t)
                out[t] = {"used": used, "budget": self.cfg.budget(t) if t != "gpu" or self.cuda else 0,
                          "count": sum(1 for c in self.capsules.values() if c.tier == t)}
            return out

    # -- memory helpers -------------------------------------------------------------------
    def _view(self, cap: Capsule) -> torch.Tensor:
        return self.pools[cap.tier].view(cap.offset, cap.nbytes)

    def _wait_ready(self, cap: Capsule) -> None:
        if cap.ready is not None:
            cap.ready.synchronize()
            cap.ready = None

    def _copy(self, dst: torch.Tensor, src: torch.Tensor):
        """Copy between tiers/arena; host<->device copies run on the side stream, ordered both ways
        with the compute stream. Returns the event that marks completion (or None)."""
        if not self.cuda:
            dst.copy_(src)
            return None
        if dst.device.type == "cuda" and src.device.type == "cuda":
            dst.copy_(src)         # stays on the compute stream: ordered with the steps
            return None
        compute = torch.cuda.current_stream(self.rt.device)
        self.copy_stream.wait_stream(compute)
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        compute.wait_event(ev)     # the next step may not overwrite what is still being copied
        return ev

    def _reserve(self, tier: str, nbytes: int, protect: set) -> int | None:
        """Room for nbytes in a memory tier, evicting LRU unpinned capsules; None for disk."""
        if tier == "disk":
            self._make_disk_room(nbytes, protect)
            return None
        pool = self.pools[tier]
        if not pool.fits_ever(nbytes):
            raise BudgetExceeded(f"tier {tier}: a capsule of {nbytes / 2**20:.1f} MiB is larger "
                                 f"than the tier's budget {pool.capacity / 2**20:.1f} MiB; raise "
                                 f"store.{tier}_budget_mb or use another tier")
        while True:
            off = pool.allocate(nbytes)
            if off is not None:
                return off
            victims = sorted((c for c in self.capsules.values()
                              if c.tier == tier and not c.pinned and c.name not in protect),
                             key=lambda c: c.last_used)
            if not victims:
                pinned = sum(c.nbytes for c in self.capsules.values() if c.tier == tier and c.pinned)
                raise BudgetExceeded(
                    f"tier {tier}: no room for {nbytes / 2**20:.2f} MiB; {pinned / 2**20:.2f} MiB of "
                    f"{pool.capacity / 2**20:.2f} MiB are pinned and nothing else can be evicted; "
                    f"unpin or delete capsules, or raise store.{tier}_budget_mb")
            self._evict(victims[0], protect)

    def _check_room(self, tier: str, nbytes: int, protect: set) -> None:
        """Raise BudgetExceeded now if a capsule could never fit, before anything is changed."""
        if tier == "disk":
            budget = self.cfg.budget("disk")
            pinned = sum(c.nbytes for c in self.capsules.values()
                         if c.tier == "disk" and (c.pinned or c.name in protect))
            if nbytes + pinned > budget:
                raise BudgetExceeded(f"tier disk: {nbytes / 2**20:.2f} MiB do not fit next to "
                                     f"{pinned / 2**20:.2f} MiB of pinned capsules in the "
                                     f"{budget / 2**20:.2f} MiB budget; raise store.disk_budget_mb")
            return
        pool = self.pools[tier]
        pinned = sum(c.nbytes for c in self.capsules.values()
                     if c.tier == tier and (c.pinned or c.name in protect))
        if nbytes + pinned > pool.capacity:
            raise BudgetExceeded(f"tier {tier}: {nbytes / 2**20:.2f} MiB do not fit next to "
                                 f"{pinned / 2**20:.2f} MiB of pinned capsules in the "
                                 f"{pool.capacity / 2**20:.2f} MiB budget; unpin or delete capsules, "
                                 f"or raise store.{tier}_budget_mb")

    def _disk_used(self) -> int:
        """Bytes of capsule files: disk-tier capsules and saved copies of memory capsules."""
        return sum(c.nbytes if c.tier == "disk" else os.path.getsize(c.path)
                   for c in self.capsules.values()
                   if c.tier == "disk" or self._has_disk_copy(c))

    def _make_disk_room(self, nbytes: int, protect: set) -> None:
        budget = self.cfg.budget("disk")
        while self._disk_used() + nbytes > budget:
            victims = sorted((c for c in self.capsules.values()
                              if c.tier == "disk" and not c.pinned and c.name not in protect),
                             key=lambda c: c.last_used)
            if not victims:
                raise BudgetExceeded(f"tier disk: no room for {nbytes / 2**20:.2f} MiB within "
                                     f"{budget / 2**20:.2f} MiB (all stored capsules pinned); raise "
                                     f"store.disk_budget_mb or delete capsules")
            self._drop(victims[0])

    def _evict(self, cap: Capsule, protect: set) -> None:
        below = {"gpu": "host", "host": "disk"}[cap.tier]
        if self._has_disk_copy(cap):
            below = "disk"            # already saved: dropping the memory copy loses nothing
        elif self.cfg.eviction == "drop":
            self._drop(cap)
            return
        self._move(cap, below, protect | {cap.name})

    @staticmethod
    def _has_disk_copy(cap: Capsule) -> bool:
        return cap.tier != "disk" and bool(cap.path) and os.path.exists(cap.path)

    def _drop(self, cap: Capsule) -> None:
        """Forget a capsule and free its storage: its memory extent and its file, if any."""
        if cap.tier in self.pools and cap.offset is not None:
            self._wait_ready(cap)
            self.pools[cap.tier].release(cap.offset)
        if cap.path and os.path.exists(cap.path):
            os.unlink(cap.path)
        del self.capsules[cap.name]

    def _host_bytes(self, cap: Capsule) -> torch.Tensor:
        """The capsule's bytes on the host (memory tiers), waiting for pending copies."""
        self._wait_ready(cap)
        v = self._view(cap)
        return v if v.device.type == "cpu" else v.cpu()

    def _move(self, cap: Capsule, tier: str, protect: set) -> None:
        """Move a capsule to another tier (promote or demote); the copy stays valid on failure."""
        if tier == cap.tier:
            return
        self._check_room(tier, cap.nbytes if cap.tier != "disk" else self.rt.arena.live_nbytes(cap.position),
                         protect | {cap.name})
        if cap.tier == "disk":
            _, raw = read_capsule(cap.path, self.rt.arena, self.fingerprint)
            nbytes = raw.numel()
            off = self._reserve(tier, nbytes, protect | {cap.name})
            ev = self._copy(self.pools[tier].view(off, nbytes), raw)
            os.unlink(cap.path)
            cap.tier, cap.offset, cap.path, cap.nbytes, cap.ready = tier, off, None, nbytes, ev
            return
        if tier == "disk":
            if not self._has_disk_copy(cap):      # capsules are immutable: a saved copy is current
                self._make_disk_room(cap.nbytes, protect | {cap.name})
                path = capsule_path(self.cfg.capsule_dir, cap.name)
                cap.digest = write_capsule(path, self.rt.arena, self._host_bytes(cap), cap)
            path = cap.path or capsule_path(self.cfg.capsule_dir, cap.name)
            self._wait_ready(cap)
            self.pools[cap.tier].release(cap.offset)
            cap.tier, cap.offset, cap.path, cap.nbytes = "disk", None, path, os.path.getsize(path)
            return
        off = self._reserve(tier, cap.nbytes, protect | {cap.name})
        self._wait_ready(cap)
        ev = self._copy(self.pools[tier].view(off, cap.nbytes), self._view(cap))
        self.pools[cap.tier].release(cap.offset)
        cap.tier, cap.offset, cap.ready = tier, off, ev

    # -- operations -----------------------------------------------------------------------
    def snapshot(self, name: str, tier: str | None = None, pin: bool = False,
                 parent: str | None = None) -> Capsule:
        """Capture the live state at the current committed boundary."""
        with self.lock:
            check_name(name)
            tier = self._tier(tier)
            self._check_new_name(name)
            rt = self.rt
            # Room is reserved without the runtime lock (eviction may write to disk); the live size
            # can grow meanwhile (tokens decoded by another thread), so it is checked again under
            # the lock and the reservation redone if it no longer matches.
            for _ in range(8):
                with rt.lock:
                    nbytes = rt.live_nbytes()
                self._check_room(tier, nbytes, set())
                off = self._reserve(tier, nbytes, set())
                with rt.lock:
                    if rt.live_nbytes() != nbytes:
                        if off is not None:
                            self.pools[tier].release(off)
                        continue
                    cap = Capsule(name=name, parent=self.lineage if parent is None else parent,
                                  step=rt.step_count, position=rt.position, episode=rt.episode,
                                  nbytes=nbytes, fingerprint=self.fingerprint, tier=tier,
                                  pinned=bool(pin), context_len=rt.context_len)
                    if tier == "disk":
                        raw = rt.live_state().cpu().clone() if self.cuda else rt.live_state().clone()
                    else:
                        cap.offset = off
                        cap.ready = self._copy(self.pools[tier].view(off, nbytes), rt.live_state())
                    break
            else:
                raise BudgetExceeded(f"snapshot {name!r}: expected the live state to hold still "
                                     f"between two steps, found it growing on every try; retry")
            if tier == "disk":   # the file write happens outside the runtime lock
                path = capsule_path(self.cfg.capsule_dir, name)
                cap.digest = write_capsule(path, rt.arena, raw, cap)
                cap.path, cap.nbytes = path, os.path.getsize(path)
            self.capsules[name] = cap
            return cap

    def restore(self, name: str) -> Capsule:
        """Copy a capsule into the live state (verified first; nothing changes on failure)."""
        with self.lock:
            cap = self.get(name)
            if cap.fingerprint != self.fingerprint:
                raise CapsuleMismatch(f"capsule {name!r}: expected fingerprint {self.fingerprint} (this "
                                      f"runtime's model, layout and weights), found "
                                      f"{cap.fingerprint}; it was taken from another preset, "
                                      f"weights or version and cannot be restored here")
            if cap.tier == "disk":
                _, src = read_capsule(cap.path, self.rt.arena, self.fingerprint)
                known = None            # host bytes: the runtime reads their header for free
            else:
                src = self._view(cap)   # copies into it are stream-ordered before this one
                known = cap.known()
            with self.rt.lock:
                self.rt.restore_state(src, known)
                self.lineage = name
            cap.touch()
            return cap

    def fork(self, source: str, name: str, switch_to: bool = False,
             tier: str | None = None) -> Capsule:
        """A new independent copy of capsule `source` ('' = the live state); with `switch_to` the
        live state continues on the copy (it is restored).

        A fork of the live state that switches lands at one committed boundary: the runtime lock is
        held from the snapshot through the restore, so no step runs between them - the restore
        would undo it (see the module docstring for what this costs the disk tier). A fork of a
        stored capsule needs no such hold: its restore replaces the live state whatever ran before.
        """
        one_boundary = self.rt.lock if switch_to and not source else contextlib.nullcontext()
        with self.lock, one_boundary:
            check_name(name)
            if not source:
                cap = self.snapshot(name, tier=tier)
            else:
                src = self.get(source)
                self._check_new_name(name)
                cap = self._fork_stored(src, name, self._tier(tier))
                self.capsules[name] = cap
            if switch_to:
                self.restore(name)
            return cap

    def _fork_stored(self, src: Capsule, name: str, tier: str) -> Capsule:
        """The copy of a stored capsule into `tier` (name and source already checked)."""
        if src.tier == "disk":
            _, raw = read_capsule(src.path, self.rt.arena, self.fingerprint)
            nbytes = raw.numel()
        else:
            self._wait_ready(src)
            raw, nbytes = self._view(src), src.nbytes
        self._check_room(tier, nbytes, {src.name})
        off = self._reserve(tier, nbytes, {src.name})
        cap = Capsule(name=name, parent=src.name, step=src.step, position=src.position,
                      episode=src.episode, nbytes=nbytes, fingerprint=src.fingerprint,
                      tier=tier, context_len=src.context_len)
        if tier == "disk":
            path = capsule_path(self.cfg.capsule_dir, name)
            cap.digest = write_capsule(path, self.rt.arena, raw if raw.device.type == "cpu"
                                       else raw.cpu(), cap)
            cap.path, cap.nbytes = path, os.path.getsize(path)
        else:
            cap.offset = off
            cap.ready = self._copy(self.pools[tier].view(off, nbytes), raw)
            if src.tier != "disk":
                cap.digest = src.digest
        return cap

    def delete(self, name: str) -> None:
        with self.lock:
            cap = self.get(name)
            self._drop(cap)
            with self.rt.lock:
                if self.lineage == name:
                    self.lineage = ""

    def move(self, name: str, tier: str) -> Capsule:
        """Promote or demote a capsule to another tier."""
        with self.lock:
            cap = self.get(name)
            self._move(cap, self._tier(tier), set())
            cap.touch()
            return cap

    def pin(self, name: str, pinned: bool = True) -> Capsule:
        with self.lock:
            cap = self.get(name)
            cap.pinned = bool(pinned)
            return cap

    def save(self, name: str, keep_in_memory: bool = True) -> str:
        """Write a capsule to the capsule directory; keep or drop the memory copy."""
        with self.lock:
            cap = self.get(name)
            if cap.tier == "disk" or (self._has_disk_copy(cap) and keep_in_memory):
                return cap.path
            if not keep_in_memory:
                self._move(cap, "disk", set())
                return cap.path
            # a disk copy next to the memory copy: stored under the same name as a file, the
            # in-memory capsule stays authoritative for restore
            self._make_disk_room(cap.nbytes, {name})
            path = capsule_path(self.cfg.capsule_dir, name)
            cap.digest = write_capsule(path, self.rt.arena, self._host_bytes(cap), cap)
            cap.path = path
            return path

    def load(self, name: str, tier: str | None = None) -> Capsule:
        """Verify a capsule file from the capsule directory and bring it into a memory tier."""
        with self.lock:
            check_name(name)
            path = capsule_path(self.cfg.capsule_dir, name)
            cap = self.capsules.get(name)
            if cap is not None and cap.tier != "disk":
                return cap            # already in memory
            if not os.path.exists(path):
                raise CapsuleNotFound(f"no capsule file {name + SUFFIX!r} in {self.cfg.capsule_dir}")
            target = self._tier(tier)
            if target == "disk":
                target = "gpu" if self.cuda else "host"
            header, raw = read_capsule(path, self.rt.arena, self.fingerprint)
            cap = self._load_into(name, target, cap or header, header, raw)
            cap.digest = header.digest
            cap.path = path
            self.capsules[name] = cap
            cap.touch()
            return cap

    def _load_into(self, name: str, target: str, cap: Capsule, header: Capsule,
                   raw: torch.Tensor) -> Capsule:
        """Put verified capsule bytes into memory tier `target` (room checked first)."""
        self._check_room(target, raw.numel(), {name})
        off = self._reserve(target, raw.numel(), {name})
        cap.tier, cap.offset, cap.nbytes = target, off, raw.numel()
        cap.ready = self._copy(self.pools[target].view(off, cap.nbytes), raw)
        return cap

    def verify(self, name: str) -> str:
        """Compute (memory tiers) or check (disk) a capsule's content digest; returns it."""
        with self.lock:
            cap = self.get(name)
            if cap.tier == "disk":
                read_capsule(cap.path, self.rt.arena, self.fingerprint)
                return cap.digest
            digest = content_digest(self.rt.arena, self._host_bytes(cap), cap.position)
            if cap.digest and cap.digest != digest:
                raise CapsuleCorrupt(f"capsule {name!r}: memory copy digest {digest} differs from "
                                     f"the recorded {cap.digest}")
            cap.digest = digest
            return digest

    def capsule_bytes(self, name: str) -> torch.Tensor:
        """The stored live-range bytes of a capsule, on the host (for tests and tools)."""
        with self.lock:
            cap = self.get(name)
            if cap.tier == "disk":
                return read_capsule(cap.path, self.rt.arena, self.fingerprint)[1]
            return self._host_bytes(cap).clone()

    def on_reset(self) -> None:
        """The live state left its lineage (an episode reset, a new instruction): it descends
        from no capsule now. Takes only the runtime lock (reentrant: call it inside the critical
        section that reset the state, so the next step already names no lineage)."""
        with self.rt.lock:
            self.lineage = ""


def make_store(runtime: PolicyRuntime, cfg: StoreConfig | None = None) -> CapsuleStore:
    """The store `cfg` asks for: PagedCapsuleStore when `cfg.paged`, else CapsuleStore."""
    cfg = cfg or StoreConfig()
    if cfg.paged:
        from flashrt_ros.capsules.paged import PagedCapsuleStore   # imported here: paged.py subclasses CapsuleStore
        return PagedCapsuleStore(runtime, cfg)
    return CapsuleStore(runtime, cfg)
