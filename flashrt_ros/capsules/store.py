"""CapsuleStore: snapshot, restore, fork, delete, save, load and tier moves with byte budgets.

Tiers:
  * gpu  - device memory, only when the runtime runs on CUDA;
  * host - host memory (pinned on CUDA);
  * disk - a capsule file in `capsule_dir` (see file.py), written atomically.
The store keeps the bookkeeping: the index, the names, the disk tier, eviction, the lineage, the
locks and the operations. How capsules are held in the gpu and host tiers is its `memory`
(memory.py): ExtentMemory (extents.py, the default: one extent of a preallocated byte pool per
capsule, one copy each way) or BlockMemory (paged.py: block tables over shared token blocks;
PagedCapsuleStore below). The memories know the store through that interface only and import
nothing of this module.

Budgets and eviction: each tier has a byte budget. When a capsule does not fit, the least recently
used unpinned capsules of that tier are evicted (demoted one tier down - gpu -> host -> disk - or
dropped, per `StoreConfig.eviction`) until it fits. Pinned capsules are never evicted; if the
pinned set leaves no room, the request fails with BudgetExceeded and nothing changes.

Atomicity: every operation checks everything it can (names, fingerprint, sizes, digest, room)
before it changes anything; a failed operation leaves the live state and the store as they were.
Restore copies into the live arena (never rebinds), so captured graphs stay valid. A file goes
before the index entry and memory that go with it: a delete unlinks first; a spill promoted into
memory and the victims of a disk eviction are set aside (renamed to the store's own temp names)
and put back if the request fails.

Files outside its control: the store only creates capsule files (file.py: linked in, never over
an existing one), each naming its writer (`store.writer`), and remembers the digest, creation
time and writer of each file it wrote or indexed; a file another store or process wrote or
replaced is refused before it is used, dropped or deleted (CapsuleConflict). Filesystem errors
answer StorageError, a full disk BudgetExceeded. `usage()` never raises (the node's status timer
calls it).

Locking (the node relies on this): `store.lock` guards the index and the memory tiers; the
runtime's own `runtime.lock` guards the live state. Store operations take `store.lock` first and
the runtime lock only around the copy of live bytes, never the other way round, so a control loop
that takes only the runtime lock waits at most one copy. Disk writes and reads (`save`, `load`,
disk snapshots and demotions) hold `store.lock` but never the runtime lock - with one exception: a
fork of the live state that switches to it (`fork('', name, switch_to=True)`) holds the runtime
lock from its snapshot through its switch, so that no control step runs between the two (the
switch adopts the live bytes in place, as captured; a step between would be lost); evictions it
needs and, into the disk tier, its file write happen under it. Branch into a memory tier while a
control loop runs.

Lineage (`store.lineage`, the capsule the live state descends from) describes the live state, so
it changes under the runtime lock only: restore sets it in the same critical section as its copy,
so a step that follows names the new lineage. `on_reset` (the live state left its lineage) takes
the runtime lock alone, never `store.lock`, which a save holds through its file write: a control
step that resets the episode calls it while it holds the runtime lock and never waits for disk.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import secrets
import socket
import stat
import threading

import torch

from flashrt_ros.capsules.capsule import TIERS, Capsule, check_name, content_digest, shown
from flashrt_ros.capsules.extents import ExtentMemory
from flashrt_ros.capsules.file import (SUFFIX, begin_write, capsule_from_header, capsule_path,
                                       index_capsule, is_own_temp, read_capsule, read_header,
                                       storage_error, temp_path)
from flashrt_ros.capsules.memory import context_len_of, live_boundary
from flashrt_ros.capsules.paged import BlockMemory
from flashrt_ros.core.config import StoreConfig
from flashrt_ros.core.exceptions import (BudgetExceeded, CapsuleConflict, CapsuleCorrupt,
                                         CapsuleExists, CapsuleMismatch, CapsuleNotFound,
                                         FlashRTError, InputError, StorageError)
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
        self.weights = runtime.model.weights_digest
        # this store, as the capsule files it writes name it (two stores on one directory)
        self.writer = f"{socket.gethostname()} pid {os.getpid()} store {secrets.token_hex(4)}"
        self.cfg.resolve_tier(None, self.cuda)     # a default tier this runtime has (ConfigError)
        self.memory = (memory or ExtentMemory)(self)
        self.skipped_files: list[str] = []
        with contextlib.suppress(OSError):        # what is there is checked by the listing
            os.makedirs(self.cfg.capsule_dir, exist_ok=True)
        self.rebuild_index()

    # -- index ----------------------------------------------------------------------------
    def rebuild_index(self) -> None:
        """Index the capsule directory (after a restart): whole capsule files only, named by their
        file names; the store's own stray temp files (regular files of its exact pattern, writes
        that never reached their rename) are removed, nothing else is touched."""
        with self.lock:
            d = self.cfg.capsule_dir
            self.skipped_files = []
            for fname in sorted(self._listing()):
                path = os.path.join(d, fname)
                if is_own_temp(fname):
                    with contextlib.suppress(FileNotFoundError):
                        if stat.S_ISREG(os.lstat(path).st_mode):
                            os.unlink(path)
                    continue
                if not fname.endswith(SUFFIX):
                    continue
                name = fname[: -len(SUFFIX)]
                if name in self.capsules:
                    continue
                try:
                    check_name(name)
                    self.capsules[name] = index_capsule(path)
                except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, not fatal
                    self.skipped_files.append(f"{fname}: {e}")

    def _listing(self) -> list[str]:
        d = self.cfg.capsule_dir
        try:
            return os.listdir(d)
        except OSError as e:
            found = ("a file" if os.path.lexists(d) and not os.path.isdir(d) else
                     f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})")
            raise StorageError(f"store.capsule_dir: expected a directory at {d} that the store can "
                               f"read and write, found {found}; set store.capsule_dir to one (or "
                               f"move what is there away) and configure the node again") from None

    def tiers(self) -> list[str]:
        return (["gpu"] if self.cuda else []) + ["host", "disk"]

    def _tier(self, tier: str | None, empty: str = "the default") -> str:
        """`empty`: what a request's '' means, for the message."""
        tier = self.cfg.resolve_tier(tier, self.cuda)
        if tier not in TIERS:
            raise InputError(f"tier: expected one of gpu, host, disk (or '' for {empty}), found "
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
                tier = self._tier(tier, empty="every tier")     # "auto" names the default tier
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
    def _lru(self, tier: str, protect: set) -> list[Capsule]:
        """The capsules of `tier` eviction may take, least recently used first."""
        return sorted((c for c in self.capsules.values()
                       if c.tier == tier and not c.pinned and c.name not in protect),
                      key=lambda c: c.last_used)

    def evict_lru(self, tier: str, protect: set) -> bool:
        """Evict the least recently used unpinned capsule of `tier` that is not in `protect`
        (demote it or drop it, see _evict); False if there is none."""
        victims = self._lru(tier, protect)
        if not victims:
            return False
        self._evict(victims[0], protect)
        return True

    def _evict(self, cap: Capsule, protect: set) -> None:
        if self._saved_size(cap):           # already saved: dropping the memory copy loses nothing
            self._move(cap, "disk", protect | {cap.name})
        elif self.cfg.eviction == "drop":
            self._drop(cap)
        else:
            below = {"gpu": "host", "host": "disk"}[cap.tier]
            self._move(cap, below, protect | {cap.name})
            cap.spilled = below == "disk"   # a file nobody asked for: deleted with the capsule

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
        """Bytes of capsule files: disk-tier capsules and saved copies of memory capsules. Never
        raises (the node's status timer calls it): a file another process removes meanwhile
        counts nothing."""
        used = 0
        for c in self.capsules.values():
            if c.tier == "disk":
                used += c.nbytes
            elif c.path:
                with contextlib.suppress(OSError):
                    used += os.stat(c.path).st_size
        return used

    def _disk_victims(self, nbytes: int, protect: set) -> list[Capsule]:
        """The least recently used unpinned disk capsules to drop so that `nbytes` more fit the
        budget, chosen before any is dropped (a request that cannot fit drops nothing); a
        capsule whose file another writer replaced is not this store's to drop."""
        self._check_disk_room(nbytes, protect)
        budget, used = self.cfg.budget("disk"), self._disk_used()
        victims = []
        for c in self._lru("disk", protect):
            if used + nbytes <= budget:
                break
            try:
                self._check_own(c)
            except CapsuleConflict:
                continue
            victims.append(c)
            used -= c.nbytes
        if used + nbytes > budget:
            raise BudgetExceeded(f"tier disk: expected room for {nbytes / 2**20:.2f} MiB within "
                                 f"{budget / 2**20:.2f} MiB, found {used / 2**20:.2f} MiB held by "
                                 f"pinned capsules and saved copies of memory capsules; raise "
                                 f"store.disk_budget_mb or delete capsules")
        return victims

    # -- whose file: two stores on one directory ----------------------------------------
    def _check_own(self, cap: Capsule) -> None:
        """Raise CapsuleConflict when the file at `cap.path` is a capsule file other than the
        one this store wrote or indexed for `cap` (another store or process wrote over it). No
        file there, or none with a readable capsule header, passes: no one's capsule is lost."""
        try:
            found = capsule_from_header(read_header(cap.path), cap.path, 0)
        except (FlashRTError, OSError):
            return
        if not cap.same_file(found):
            raise self._changed(cap, found)

    @staticmethod
    def _changed(cap: Capsule, found: Capsule) -> CapsuleConflict:
        def who(c):
            return (f"{c.writer or 'an unknown writer'} (digest {c.digest[:16]}, created "
                    f"{c.created})")
        return CapsuleConflict(
            f"capsule {cap.name!r}: expected its file {cap.path} as this store wrote or indexed "
            f"it, by {who(cap)}, found a file by {who(found)}: another store or process replaced "
            f"it; nothing was changed - give each node its own store.capsule_dir; to use the file "
            f"as it is now, configure the node again (the index is rebuilt); to drop it, remove "
            f"the file by hand")

    def _saved_size(self, cap: Capsule) -> int:
        """The size of the file that holds memory capsule `cap` (its saved copy), 0 when none
        does; CapsuleConflict when the file at its path is another writer's."""
        if cap.tier == "disk" or not cap.path:
            return 0
        try:
            size = os.stat(cap.path).st_size
        except OSError:
            return 0
        self._check_own(cap)
        return size

    # -- files ----------------------------------------------------------------------------
    def _write_file(self, cap: Capsule, raw: torch.Tensor, protect: set) -> int:
        """Write host bytes `raw` as `cap`'s capsule file (sets its path, digest and writer);
        returns the file's size. Room under the disk budget is made only once the file is
        written and fsynced: the victims' files are set aside, the file is linked in (never over
        an existing one), and only then are the victims dropped - a write that fails evicts
        nothing."""
        self._check_disk_room(raw.numel(), protect)
        pending = begin_write(capsule_path(self.cfg.capsule_dir, cap.name), self.rt.arena, raw,
                              cap, self.weights, self.writer, self.cfg.digest_threads)
        try:
            victims = self._disk_victims(pending.nbytes, protect | {cap.name})
            with self._set_aside([c.path for c in victims]):
                cap.path = pending.commit()
        except BaseException:
            pending.discard()
            raise
        for c in victims:
            self._forget(c)
        cap.digest, cap.writer = pending.digest, self.writer
        return pending.nbytes

    @contextlib.contextmanager
    def _set_aside(self, paths):
        """Rename the files `paths` to temp names of the store's own (removed at the next start
        if the process dies), run the block, then remove them; if a rename or the block fails,
        every file goes back and nothing was changed."""
        aside = []
        try:
            for path in paths:
                tmp = temp_path(path)
                try:
                    os.rename(path, tmp)
                except (FileNotFoundError, NotADirectoryError):
                    continue                # gone already
                except OSError as e:
                    raise storage_error(path, e, "to remove") from None
                aside.append((path, tmp))
            yield
        except BaseException:
            for path, tmp in reversed(aside):
                with contextlib.suppress(OSError):
                    os.rename(tmp, path)
            raise
        for _, tmp in aside:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _read_file(self, path: str, cap: Capsule | None = None):
        """(header capsule, host bytes) of a capsule file, verified against this runtime; with
        `cap` (its index entry), also the file the store wrote or indexed for it."""
        header, raw = read_capsule(path, self.rt.arena, self.fingerprint, self.weights,
                                   pin_memory=self.cuda, threads=self.cfg.digest_threads)
        if cap is not None and not cap.same_file(header):
            raise self._changed(cap, header)
        return header, raw

    def _drop(self, cap: Capsule) -> None:
        """Forget a capsule and free its storage: its file (the one its name owns) if any goes
        first - a file that cannot be removed, or that another writer replaced, refuses the
        drop with nothing changed - then its memory and its index entry."""
        name = cap.name
        if self.capsules.get(name) is not cap:
            raise CapsuleNotFound(f"no capsule named {name!r} in the index; stored: "
                                  f"{sorted(self.capsules)[:20]}")
        if cap.path == capsule_path(self.cfg.capsule_dir, name):
            self._check_own(cap)
            try:
                os.unlink(cap.path)
            except (FileNotFoundError, NotADirectoryError):
                pass                        # gone already
            except OSError as e:
                raise storage_error(cap.path, e, "to remove") from None
        self._forget(cap)

    def _forget(self, cap: Capsule) -> None:
        """Drop a capsule's index entry and memory (its file is gone or set aside)."""
        del self.capsules[cap.name]
        if cap.tier in self.memory.tiers:
            self.memory.release(cap)
        if self.lineage == cap.name:    # deleted or evicted: the live state names no capsule
            with self.rt.lock:
                self.lineage = ""

    def _move(self, cap: Capsule, tier: str, protect: set) -> None:
        """Move a capsule to another tier (promote or demote); the copy stays valid on failure."""
        if tier == cap.tier:
            return
        protect = protect | {cap.name}
        if cap.tier == "disk":
            raw = self._read_file(cap.path, cap)[1]
            cap.context_len = context_len_of(self.rt.arena, raw)
            # the store's own file (a spill) goes, a saved one stays, as load; the spill is set
            # aside first, so a directory that keeps it refuses the move before anything changed
            with self._set_aside([cap.path] if cap.spilled else []):
                self.memory.put(cap, tier, raw, protect, cap.parent)
            if cap.spilled:
                cap.path, cap.spilled = None, False
            cap.tier, cap.nbytes = tier, raw.numel()
        elif tier == "disk":
            # capsules are immutable: a saved copy is current
            size = self._saved_size(cap) or self._write_file(cap, self.memory.host_bytes(cap),
                                                             protect)
            self.memory.release(cap)
            cap.tier, cap.nbytes = "disk", size
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
                cap.nbytes = self._write_file(cap, raw, set())
            self.capsules[name] = cap
            return cap

    def _live_on_host(self, name: str):
        """(boundary, a host copy of the live bytes) for a disk snapshot: the file is written from
        the copy without the runtime lock."""
        rt = self.rt
        with rt.lock:
            nbytes = rt.live_nbytes()
        self._check_disk_room(nbytes, set())      # before the copy: a file that never fits
        with rt.lock:
            live = rt.live_state()
            return live_boundary(self), live.cpu() if self.cuda else live.clone()

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
                header, src = self._read_file(cap.path, cap)
                with self.rt.lock:      # host bytes: the runtime reads their header for free
                    self.rt.restore_state(src, None)
                    self.lineage = name
                cap = self._adopt(header)
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
        live state continues on the copy (a stored source is restored; the live state's own
        bytes are adopted in place).

        A fork of the live state that switches lands at one committed boundary: the runtime lock is
        held from the snapshot through the switch, so no step runs between them - the switch
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
            if switch_to and not source:
                self._continue_on(cap)
            elif switch_to:
                self.restore(name)
            return cap

    def _continue_on(self, cap: Capsule) -> None:
        """Switch the live state to `cap`, just snapshotted from it under the runtime lock still
        held: the live bytes are the capsule's, so they are adopted in place (a copy of the range
        onto itself is skipped) - the counters, the reset point and the lineage as a restore sets
        them, without copying the bytes back."""
        rt = self.rt
        with rt.lock:
            rt.restore_state(rt.arena.base[:rt.live_nbytes()],
                             (cap.position, cap.step, cap.episode, cap.context_len))
            self.lineage = cap.name
        self.memory.restored(cap)
        cap.touch()

    def _fork_stored(self, src: Capsule, name: str, tier: str) -> Capsule:
        """The copy of a stored capsule into `tier` (name and source already checked)."""
        cap = Capsule(name=name, parent=src.name, step=src.step, position=src.position,
                      episode=src.episode, nbytes=self.rt.arena.live_nbytes(src.position),
                      fingerprint=src.fingerprint, tier=tier, digest=src.digest,
                      context_len=src.context_len)
        keep = {src.name}
        if tier == "disk":
            raw = self._read_file(src.path, src)[1] if src.tier == "disk" else \
                self.memory.host_bytes(src)
            cap.nbytes = self._write_file(cap, raw, keep)
        elif src.tier == "disk":
            header, raw = self._read_file(src.path, src)
            cap.digest, cap.context_len = header.digest, context_len_of(self.rt.arena, raw)
            self.memory.put(cap, tier, raw, keep, header.parent)
        else:
            self.memory.copy(src, cap, keep)
        return cap

    def _adopt(self, header: Capsule) -> Capsule:
        """A disk capsule's index entry, updated to what its file (just verified) holds: the file
        may have been replaced since it was indexed."""
        cap = self.capsules[header.name]
        for f in ("parent", "step", "position", "episode", "pinned", "created", "digest",
                  "fingerprint", "nbytes", "writer"):
            setattr(cap, f, getattr(header, f))
        return cap

    def delete(self, name: str) -> None:
        with self.lock:
            self._drop(self.get(name))

    def move(self, name: str, tier: str) -> Capsule:
        """Promote or demote a capsule to another tier."""
        with self.lock:
            cap = self.get(name)
            self._move(cap, self._tier(tier), set())
            cap.spilled = False          # asked for: the file is the user's now
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
            if cap.tier == "disk":
                self._check_own(cap)
            elif not keep_in_memory:
                self._move(cap, "disk", set())
            elif not self._saved_size(cap):
                # a disk copy next to the memory copy: stored under the same name as a file, the
                # in-memory capsule stays authoritative for restore
                self._write_file(cap, self.memory.host_bytes(cap), {name})
            cap.spilled = False          # asked for: the file is the user's now
            return cap.path

    def load(self, name: str, tier: str | None = None) -> Capsule:
        """Verify a capsule file from the capsule directory and bring it into a memory tier."""
        with self.lock:
            target = self._tier(tier)     # the request is checked whole before anything else
            check_name(name)
            path = capsule_path(self.cfg.capsule_dir, name)
            if not os.path.lexists(path):  # a load needs the file, also for a capsule in memory
                raise CapsuleNotFound(f"no capsule file {name + SUFFIX!r} in {self.cfg.capsule_dir}; "
                                      f"expected a saved capsule - save it first or load another")
            cap = self.capsules.get(name)
            if cap is not None and cap.tier != "disk":
                return cap            # already in memory
            if target == "disk":          # a load lands in memory: the auto tier
                target = self.cfg.resolve_tier("auto", self.cuda)
            header, raw = self._read_file(path, cap)   # the file the index holds, or a new one
            cap = header if cap is None else self._adopt(header)
            cap.context_len = context_len_of(self.rt.arena, raw)
            self.memory.put(cap, target, raw, {name}, cap.parent)
            cap.tier, cap.nbytes, cap.path = target, raw.numel(), path
            self.capsules[name] = cap
            cap.touch()
            return cap

    def verify(self, name: str) -> str:
        """Compute (memory tiers) or check (disk) a capsule's content digest; returns it."""
        with self.lock:
            cap = self.get(name)
            if cap.tier == "disk":
                return self._adopt(self._read_file(cap.path, cap)[0]).digest
            digest = content_digest(self.rt.arena, self.memory.host_bytes(cap), cap.position,
                                    self.cfg.digest_threads)
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
                return self._read_file(cap.path, cap)[1]
            return self.memory.host_bytes(cap).clone()

    def on_reset(self) -> None:
        """The live state left its lineage (an episode reset, a new instruction): it descends
        from no capsule now. Takes only the runtime lock (reentrant: call it inside the critical
        section that reset the state, so the next step already names no lineage)."""
        with self.rt.lock:
            self.lineage = ""


class PagedCapsuleStore(CapsuleStore):
    """CapsuleStore with BlockMemory (paged.py) as its memory tiers."""

    def __init__(self, runtime: PolicyRuntime, cfg: StoreConfig | None = None,
                 block_tokens: int | None = None):
        super().__init__(runtime, cfg,
                         memory=functools.partial(BlockMemory, block_tokens=block_tokens))

    def check_invariants(self) -> None:
        with self.lock:
            self.memory.check_invariants()


def make_store(runtime: PolicyRuntime, cfg: StoreConfig | None = None) -> CapsuleStore:
    """The store `cfg` asks for: PagedCapsuleStore when `cfg.paged`, else CapsuleStore."""
    cfg = cfg or StoreConfig()
    return PagedCapsuleStore(runtime, cfg) if cfg.paged else CapsuleStore(runtime, cfg)
