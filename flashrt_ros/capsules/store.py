"""CapsuleStore: snapshot, restore, fork, delete, save, load and tier moves with byte budgets.

Tiers:
  * gpu  - device memory, only when the runtime runs on CUDA;
  * host - host memory (pinned on CUDA);
  * disk - a capsule file in `capsule_dir` (see file.py), written atomically.
The store keeps the bookkeeping: the index, the names, the disk tier, eviction, the lineage, the
locks and the operations. How capsules are held in the gpu and host tiers is its `memory`
(memory.py): ExtentMemory (extents.py, the default: one extent of a preallocated byte pool per
capsule, one copy each way) or BlockMemory (paged.py: block tables over shared token blocks).

Budgets and eviction: each tier has a byte budget. When a capsule does not fit, the least recently
used unpinned capsules of that tier are evicted (demoted one tier down - gpu -> host -> disk - or
dropped, per `StoreConfig.eviction`) until it fits. Pinned capsules are never evicted; if the
pinned set leaves no room, the request fails with BudgetExceeded and nothing changes.

Atomicity: every operation checks everything it can (names, fingerprint, sizes, digest, room)
before it changes anything; a failed operation leaves the live state and the store as they were.
Restore copies into the live arena (never rebinds), so captured graphs stay valid.

Locking (the node relies on this): `store.lock` guards the index and the memory tiers; the
runtime's own `runtime.lock` guards the live state. Store operations take `store.lock` first and
the runtime lock only around the copy of live bytes, never the other way round, so a control loop
that takes only the runtime lock waits at most one copy. Disk writes and reads (`save`, `load`,
disk snapshots and demotions) hold `store.lock` but never the runtime lock - with one exception: a
fork of the live state that switches to it (`fork('', name, switch_to=True)`) holds the runtime
lock from its snapshot through its restore, so that no control step runs between the two (the
restore would undo it); evictions it needs and, into the disk tier, its file write and read-back
happen under it. Branch into a memory tier while a control loop runs.

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

from flashrt_ros.capsules.capsule import TIERS, Capsule, check_name, content_digest, shown
from flashrt_ros.capsules.extents import ExtentMemory
from flashrt_ros.capsules.file import (SUFFIX, capsule_from_header, capsule_path, read_capsule,
                                       read_header, write_capsule)
from flashrt_ros.capsules.memory import live_boundary
from flashrt_ros.core.config import StoreConfig
from flashrt_ros.core.exceptions import (BudgetExceeded, CapsuleCorrupt, CapsuleExists,
                                         CapsuleMismatch, CapsuleNotFound, InputError)
from flashrt_ros.core.runtime import PolicyRuntime


class CapsuleStore:
    def __init__(self, runtime: PolicyRuntime, cfg: StoreConfig | None = None, memory=None):
        """A store over `runtime`'s live state. `memory` builds the memory tiers from the store
        (`memory(store)`, see memory.py); default ExtentMemory."""
        self.rt = runtime
        cfg = cfg or StoreConfig()
        self.cfg = dataclasses.replace(cfg, capsule_dir=os.path.expanduser(cfg.capsule_dir))
        self.lock = threading.RLock()
        self.cuda = runtime.device.type == "cuda"
        self.capsules: dict[str, Capsule] = {}
        self.lineage = ""          # the capsule the live state descends from ("" = none); written
                                   # under the runtime lock only (see the module docstring)
        self.fingerprint = runtime.fingerprint()
        self.memory = (memory or ExtentMemory)(self)
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
        tier = self.cfg.resolve_tier(tier, self.cuda)
        if tier not in TIERS:
            raise InputError(f"tier: expected one of gpu, host, disk (or '' for the default), found "
                             f"{shown(tier)}")
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
        """Per tier: bytes `used`, `budget` and capsule `count` (a memory may add figures)."""
        with self.lock:
            out = {}
            for t in ("gpu", "host", "disk"):
                out[t] = {"used": self._disk_used() if t == "disk" else 0,
                          "budget": self.cfg.budget(t) if t != "gpu" or self.cuda else 0,
                          "count": sum(1 for c in self.capsules.values() if c.tier == t)}
                if t in self.memory.tiers:
                    out[t].update(self.memory.usage(t))
            return out

    # -- eviction and the disk tier -------------------------------------------------------
    def evict_lru(self, tier: str, protect: set) -> bool:
        """Evict the least recently used unpinned capsule of `tier` that is not in `protect`
        (demote it or drop it, see _evict); False if there is none."""
        victims = [c for c in self.capsules.values()
                   if c.tier == tier and not c.pinned and c.name not in protect]
        if not victims:
            return False
        self._evict(min(victims, key=lambda c: c.last_used), protect)
        return True

    def _evict(self, cap: Capsule, protect: set) -> None:
        below = {"gpu": "host", "host": "disk"}[cap.tier]
        if self._has_disk_copy(cap):
            below = "disk"            # already saved: dropping the memory copy loses nothing
        elif self.cfg.eviction == "drop":
            self._drop(cap)
            return
        self._move(cap, below, protect | {cap.name})

    def _check_disk_room(self, nbytes: int, protect: set) -> None:
        """Raise BudgetExceeded now if a file could never fit, before anything is changed."""
        budget = self.cfg.budget("disk")
        pinned = sum(c.nbytes for c in self.capsules.values()
                     if c.tier == "disk" and (c.pinned or c.name in protect))
        if nbytes + pinned > budget:
            raise BudgetExceeded(f"tier disk: {nbytes / 2**20:.2f} MiB do not fit next to "
                                 f"{pinned / 2**20:.2f} MiB of pinned capsules in the "
                                 f"{budget / 2**20:.2f} MiB budget; raise store.disk_budget_mb")

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

    @staticmethod
    def _has_disk_copy(cap: Capsule) -> bool:
        return cap.tier != "disk" and bool(cap.path) and os.path.exists(cap.path)

    def _write_file(self, cap: Capsule, raw: torch.Tensor) -> str:
        """Write host bytes `raw` as `cap`'s capsule file (records its digest); returns the path."""
        path = capsule_path(self.cfg.capsule_dir, cap.name)
        cap.digest = write_capsule(path, self.rt.arena, raw, cap)
        return path

    def _drop(self, cap: Capsule) -> None:
        """Forget a capsule and free its storage: its memory, and its file if any."""
        if cap.tier in self.memory.tiers:
            self.memory.release(cap)
        if cap.path and os.path.exists(cap.path):
            os.unlink(cap.path)
        del self.capsules[cap.name]

    def _move(self, cap: Capsule, tier: str, protect: set) -> None:
        """Move a capsule to another tier (promote or demote); the copy stays valid on failure."""
        if tier == cap.tier:
            return
        protect = protect | {cap.name}
        if cap.tier == "disk":
            _, raw = read_capsule(cap.path, self.rt.arena, self.fingerprint)
            self.memory.put(cap, tier, raw, protect, cap.parent)
            os.unlink(cap.path)
            cap.tier, cap.path, cap.nbytes = tier, None, raw.numel()
        elif tier == "disk":
            self._check_disk_room(cap.nbytes, protect)
            if not self._has_disk_copy(cap):      # capsules are immutable: a saved copy is current
                self._make_disk_room(cap.nbytes, protect)
                cap.path = self._write_file(cap, self.memory.host_bytes(cap))
            self.memory.release(cap)
            cap.tier, cap.nbytes = "disk", os.path.getsize(cap.path)
        else:
            self.memory.move(cap, tier, protect)
            cap.tier = tier

    # -- operations -----------------------------------------------------------------------
    def snapshot(self, name: str, tier: str | None = None, pin: bool = False,
                 parent: str | None = None) -> Capsule:
        """Capture the live state at the current committed boundary."""
        with self.lock:
            check_name(name)
            tier = self._tier(tier)
            self._check_new_name(name)
            cap = Capsule(name=name, parent="", step=0, position=0, episode=0, nbytes=0,
                          fingerprint=self.fingerprint, tier=tier, pinned=bool(pin))
            if tier == "disk":
                at, raw = self._live_on_host(name)
            else:
                at = self.memory.capture(cap, parent)
            cap.parent = at.lineage if parent is None else parent
            cap.step, cap.position, cap.episode, cap.context_len = \
                at.step, at.position, at.episode, at.context_len
            cap.nbytes = self.rt.arena.live_nbytes(at.position)
            if tier == "disk":   # the file write happens outside the runtime lock
                cap.path = self._write_file(cap, raw)
                cap.nbytes = os.path.getsize(cap.path)
            self.capsules[name] = cap
            return cap

    def _live_on_host(self, name: str):
        """(boundary, a host copy of the live bytes) for a disk snapshot, room made first. Room is
        made without the runtime lock (it may delete files); the live size can grow meanwhile
        (tokens decoded by another thread), so it is checked again under the lock."""
        rt = self.rt
        for _ in range(8):
            with rt.lock:
                nbytes = rt.live_nbytes()
            self._check_disk_room(nbytes, set())
            self._make_disk_room(nbytes, set())
            with rt.lock:
                if rt.live_nbytes() == nbytes:
                    live = rt.live_state()
                    return live_boundary(self), live.cpu().clone() if self.cuda else live.clone()
        raise BudgetExceeded(f"snapshot {name!r}: expected the live state to hold still between "
                             f"two steps, found it growing on every try; retry")

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
                with self.rt.lock:      # host bytes: the runtime reads their header for free
                    self.rt.restore_state(src, None)
                    self.lineage = name
            else:
                with self.rt.lock:
                    self.memory.restore(cap)
                    self.lineage = name
            self.memory.restored(cap)
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
        cap = Capsule(name=name, parent=src.name, step=src.step, position=src.position,
                      episode=src.episode, nbytes=self.rt.arena.live_nbytes(src.position),
                      fingerprint=src.fingerprint, tier=tier, digest=src.digest,
                      context_len=src.context_len)
        keep = {src.name}
        if tier == "disk":
            raw = read_capsule(src.path, self.rt.arena, self.fingerprint)[1] \
                if src.tier == "disk" else self.memory.host_bytes(src)
            self._check_disk_room(raw.numel(), keep)
            self._make_disk_room(raw.numel(), keep)
            cap.path = self._write_file(cap, raw)
            cap.nbytes = os.path.getsize(cap.path)
        elif src.tier == "disk":
            header, raw = read_capsule(src.path, self.rt.arena, self.fingerprint)
            cap.digest = header.digest
            self.memory.put(cap, tier, raw, keep, header.parent)
        else:
            self.memory.copy(src, cap, keep)
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
            cap.path = self._write_file(cap, self.memory.host_bytes(cap))
            return cap.path

    def load(self, name: str, tier: str | None = None) -> Capsule:
        """Verify a capsule file from the capsule directory and bring it into a memory tier."""
        with self.lock:
            target = self._tier(tier)     # the request is checked whole before anything else
            check_name(name)
            path = capsule_path(self.cfg.capsule_dir, name)
            if not os.path.exists(path):   # a load needs the file, also for a capsule in memory
                raise CapsuleNotFound(f"no capsule file {name + SUFFIX!r} in {self.cfg.capsule_dir}; "
                                      f"expected a saved capsule - save it first or load another")
            cap = self.capsules.get(name)
            if cap is not None and cap.tier != "disk":
                return cap            # already in memory
            if target == "disk":          # a load lands in memory: the auto tier
                target = self.cfg.resolve_tier("auto", self.cuda)
            header, raw = read_capsule(path, self.rt.arena, self.fingerprint)
            cap = cap or header
            self.memory.put(cap, target, raw, {name}, header.parent)
            cap.tier, cap.nbytes = target, raw.numel()
            cap.digest = header.digest
            cap.path = path
            self.capsules[name] = cap
            cap.touch()
            return cap

    def verify(self, name: str) -> str:
        """Compute (memory tiers) or check (disk) a capsule's content digest; returns it."""
        with self.lock:
            cap = self.get(name)
            if cap.tier == "disk":
                read_capsule(cap.path, self.rt.arena, self.fingerprint)
                return cap.digest
            digest = content_digest(self.rt.arena, self.memory.host_bytes(cap), cap.position)
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
            return self.memory.host_bytes(cap).clone()

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
        from flashrt_ros.capsules.paged import PagedCapsuleStore   # imported here: paged.py imports this module
        return PagedCapsuleStore(runtime, cfg)
    return CapsuleStore(runtime, cfg)
