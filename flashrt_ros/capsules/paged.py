"""BlockMemory: memory-tier capsules as block tables over shared, immutable token blocks.

PagedCapsuleStore (store.py) is CapsuleStore (the index, the disk tier, eviction, the lineage, the
locks and the operations) with BlockMemory as its memory tiers (the interface is memory.py's);
this module knows the store only through that interface and imports nothing of store.py.

Why: the branches of one episode share almost all of their KV history. Observation steps never
write the KV prefix and tokens only append to it, so forks that ran control steps differ only in
their small per-step state (metadata, normaliser, recurrent, conv, MTP and action state). The
flat store keeps every capsule whole; this store keeps the common KV once.

Layout. Each memory tier (gpu, host) is one preallocated `BlockPool` (blocks.py) of blocks of
`block_bytes = block_tokens * kv_row_nbytes` bytes. A capsule's live range (arena bytes
[0:live_nbytes(position)]: the small state, then KV rows [0:position]) is cut into chunks - the
small state into `n_small` chunks of block_bytes, the KV into chunks of block_tokens rows, the
last chunk of each possibly partial - and the capsule is a block table: one block id per chunk.
The chunking is a function of the position only, so chunk i of two capsules covers the same
bytes. `block_tokens` 0 picks the largest power of two from 16 to 256 whose block is at most 1/16
of the small state (so rounding the small state up to whole blocks wastes under ~6 %): 64 rows
(768 KiB) for hybrid-0.8b, 16 rows (4 KiB) for tiny.

Sharing rule. Blocks are immutable once written. A new capsule takes the candidate capsule's
block for chunk i - with no copy, one more reference - when that block holds at least the
chunk's bytes and they are byte-equal to it; every other chunk gets a fresh block (a partial
last block is thus shared while the rows needed are a prefix of it, and copied otherwise:
copy-on-write at block granularity). The candidate is the capsule the live state was last
restored from or snapshotted into in that tier (or the capsule's recorded parent for loads). A
fork of a stored capsule into the same tier shares its whole table, small state included.
Reference counts count table entries; a block whose count reaches 0 is free.

Why the equality is checked, not assumed: whether live rows [0:p] still equal capsule X's is a
fact about the runtime's history - a rollback followed by decoding, a reset, a restore through
anything but this store all rewrite rows below p without the store seeing them. The check reads
each candidate byte twice on the pool's device (numpy on the CPU, one `eq().all(1)` per run of
adjacent blocks on CUDA, one sync) and makes sharing exact by construction: nothing is shared
that was not compared.

Two snapshot paths, one result:
  * copy first (the pool has room for the whole live range): under the runtime lock only the
    copies into fresh blocks are issued (one per run, what the flat store's snapshot costs); the
    fresh blocks are then compared with the candidate's, pool against pool - no live bytes, so
    without the runtime lock, on a side stream on CUDA - and each equal one is swapped for the
    candidate's block and freed;
  * compare first (no room for a transient whole copy): the live bytes are compared under the
    runtime lock and only the chunks that differ are copied. Loads from disk take this path too.

Committed descriptor. A snapshot yields one immutable `CommittedDescriptor` of the committed
boundary it copied: position, step, episode, the candidate, and the block
table with the candidate's block for every shared chunk and -1 for the chunks held in new blocks
(the tail: new KV rows plus the small state). A snapshot whose ancestor is stored therefore keeps
only the new blocks plus the small state.

Merge-staged restore. The table is split into runs of chunks held in adjacent blocks; each run is
one copy into the live arena (a fresh or forked capsule is typically one run per region). When
the table is fragmented (more than RUN_COPY_LIMIT runs), the full KV blocks move by one
`index_select` gather straight into the contiguous live KV ([n, block_bytes] views, 8-byte words)
and the rest by run copies. Restore writes the same arena bytes, so captured graphs stay valid.
Where the capsule's small-state blocks are adjacent, the runtime's reset point refers to them
instead of copying the small state again (core/rollback.py); the capsule holds them until its
table is released, which hands them back to the ring first.

Tier moves keep sharing: a block copied between gpu and host records its twin; moving or forking
another capsule that holds the same block reuses the twin instead of copying it again. Twins are
forgotten when either block is freed. Host-tier copies are synchronous here (ExtentMemory
overlaps them on a side stream). The disk tier is the store's: a paged capsule is gathered into
the contiguous live layout and written as a normal capsule file.

Locking: as CapsuleStore. `store.lock` guards the index, the tables and the pools; the runtime
lock is held only while live bytes are copied out (and, on the compare-first path, compared) or
gathered in. Eviction (the store's, which may write files) runs with the runtime lock released; a
snapshot then re-reads the boundary, and records the lineage of the boundary it read.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from flashrt_ros.capsules.blocks import BlockPool
from flashrt_ros.capsules.capsule import Capsule
from flashrt_ros.capsules.memory import Boundary, hand_back
from flashrt_ros.core.exceptions import BudgetExceeded, InputError

RUN_COPY_LIMIT = 8   # more runs than this: the full KV blocks of a restore go by one gather


@dataclass(frozen=True)
class CommittedDescriptor:
    """One committed boundary of the live state, as a snapshot into `tier` reads it."""
    position: int
    step: int
    episode: int
    context_len: int  # instruction tokens in the state (-1: unknown, read from the bytes)
    tier: str
    donor: str        # the stored capsule the chunks were compared with ('' = none)
    table: tuple      # per chunk: the donor's block id where byte-equal, -1 where new
    lineage: str = "" # the capsule the live state descended from at this boundary

    @property
    def shared(self) -> np.ndarray:
        t = np.asarray(self.table, dtype=np.int64)
        return t[t >= 0]

    @property
    def tail(self) -> np.ndarray:
        """Chunk indices that need new blocks."""
        return np.flatnonzero(np.asarray(self.table, dtype=np.int64) < 0)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor as 8-byte words when its last dim and offset allow (8x fewer elements)."""
    if t.shape[-1] % 8 == 0 and t.storage_offset() % 8 == 0:
        return t.view(torch.int64)
    return t


def _rows_equal(a: torch.Tensor, b: torch.Tensor):
    """Per row of two [k, w] uint8 tensors on one device: are they byte-equal? (numpy on the CPU,
    a device bool tensor on CUDA)."""
    if a.device.type == "cpu":
        x, y = a.numpy(), b.numpy()
        if x.shape[1] % 8 == 0:
            x, y = x.view(np.int64), y.view(np.int64)
        return np.equal(x, y).all(axis=1)
    return torch.eq(_wide(a), _wide(b)).all(dim=1)


class BlockMemory:
    def __init__(self, store, block_tokens: int | None = None):
        """The memory tiers of `store` as block pools sized by its budgets; `block_tokens`
        (default `store.cfg.block_tokens`, 0 = auto) rows of KV per block."""
        self.store, self.rt, self.cuda = store, store.rt, store.cuda
        cfg, arena = store.cfg, store.rt.arena
        if block_tokens is not None:
            bt = block_tokens
            if isinstance(bt, bool) or not isinstance(bt, int) or bt < 0:
                raise InputError(f"block_tokens: expected an integer >= 0 (0 = auto), found {bt!r}")
            cfg = dataclasses.replace(cfg, block_tokens=bt)
        self.block_tokens = cfg.resolve_block_tokens(arena.small_nbytes, arena.kv_row_nbytes)
        self.block_bytes = self.block_tokens * arena.kv_row_nbytes
        self.n_small = -(-arena.small_nbytes // self.block_bytes)   # chunks of the small state
        self.blocks: dict[str, BlockPool] = {}
        if self.cuda:
            self.blocks["gpu"] = BlockPool(cfg.budget("gpu") // self.block_bytes,
                                           self.block_bytes, store.rt.device)
            self.copy_stream = torch.cuda.Stream(store.rt.device)
        self.blocks["host"] = BlockPool(cfg.budget("host") // self.block_bytes,
                                        self.block_bytes, torch.device("cpu"), pinned=self.cuda)
        self.tiers = tuple(self.blocks)
        self.tables: dict[str, np.ndarray] = {}          # memory-tier capsule -> block ids
        self._twins: dict[tuple[str, int], dict[str, int]] = {}
        self._donors: dict[str, list] = {}               # tier -> capsules the live state came
                                                         # from or went into, most recent first
        self._layouts: dict[int, tuple] = {}             # position -> chunk layout (cached)
        self._match_plans: dict[str, dict] = {}          # candidate -> position -> compare plan
        self._plans: dict[str, tuple] = {}                # capsule -> restore plan (cached)

    # -- chunks and runs ------------------------------------------------------------------
    def _layout(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Live byte offset and size of every chunk of a live range with `position` KV rows."""
        got = self._layouts.get(position)
        if got is not None:
            return got
        if len(self._layouts) > 256:
            self._layouts.clear()
        a, bb = self.rt.arena, self.block_bytes
        small = np.arange(self.n_small, dtype=np.int64) * bb
        kv = a.kv_offset + np.arange(-(-position // self.block_tokens), dtype=np.int64) * bb
        kv_end = a.kv_offset + position * a.kv_row_nbytes
        offs = np.concatenate((small, kv))
        ends = np.concatenate((np.minimum(small + bb, a.small_nbytes), np.minimum(kv + bb, kv_end)))
        got = self._layouts[position] = (offs, ends - offs)
        return got

    def _runs(self, chunks: np.ndarray, ids: np.ndarray, sizes: np.ndarray) -> list:
        """Split chunks (ascending) held in blocks `ids` into runs that move as one copy:
        consecutive chunks in consecutive blocks, every chunk but the last of a run full."""
        if len(chunks) == 0:
            return []
        joined = (np.diff(chunks) == 1) & (np.diff(ids) == 1) & \
                 (sizes[chunks[:-1]] == self.block_bytes)
        cuts = np.flatnonzero(~joined) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [len(chunks)]))
        return list(zip(starts.tolist(), ends.tolist()))

    def _copy_runs(self, pool: BlockPool, live: torch.Tensor, offs, sizes, chunks, ids,
                   to_pool: bool, non_blocking: bool = False) -> None:
        for s, e in self._runs(chunks, ids, sizes):
            c0, c1 = chunks[s], chunks[e - 1]
            lo, n = int(offs[c0]), int(offs[c1] + sizes[c1] - offs[c0])
            a, b = live[lo:lo + n], pool.span(ids[s], n)
            if to_pool:
                b.copy_(a, non_blocking=non_blocking)
            else:
                a.copy_(b)

    # -- gather (restore) -----------------------------------------------------------------
    def _restore_plan(self, name: str):
        """How capsule `name` moves into a contiguous live range, worked out once (tables are
        immutable): its runs as (live offset, pool offset, nbytes) copies and, when the table is
        fragmented, the same without the full KV blocks plus a device index for one gather."""
        plan = self._plans.get(name)
        if plan is None:
            cap, ids = self.store.capsules[name], self.tables[name]
            pool, bb = self.blocks[cap.tier], self.block_bytes
            offs, sizes = self._layout(cap.position)

            def copies(chunks):
                out = []
                for s, e in self._runs(chunks, ids[chunks], sizes):
                    c0, c1 = chunks[s], chunks[e - 1]
                    out.append((int(offs[c0]), int(ids[c0]) * bb, int(offs[c1] + sizes[c1] - offs[c0])))
                return out

            chunks = np.arange(len(ids))
            every = copies(chunks)
            gather = None
            if len(every) > RUN_COPY_LIMIT:
                full = cap.position // self.block_tokens
                k0, k1 = self.n_small, self.n_small + full
                index = torch.from_numpy(ids[k0:k1].copy()).to(pool.device)
                gather = (copies(np.concatenate((chunks[:k0], chunks[k1:]))), index, full)
            plan = self._plans[name] = (every, gather)
        return plan

    def _gather(self, name: str, dst: torch.Tensor) -> None:
        """Write capsule `name`'s live range into dst[0:nbytes] (the arena, or a host buffer)."""
        pool = self.blocks[self.store.capsules[name].tier]
        every, gather = self._restore_plan(name)
        storage = pool.storage
        if gather is None or dst.device.type != pool.device.type:
            for lo, off, n in every:
                dst[lo:lo + n].copy_(storage[off:off + n])
            return
        rest, index, full = gather
        for lo, off, n in rest:
            dst[lo:lo + n].copy_(storage[off:off + n])
        kv0 = self.rt.arena.kv_offset
        out = dst[kv0:kv0 + full * self.block_bytes].view(full, self.block_bytes)
        torch.index_select(_wide(pool.rows()), 0, index, out=_wide(out))


    # -- ingest (snapshot, load) ----------------------------------------------------------
    def _candidate(self, tier: str, prefer: str | None = None) -> str:
        for name in (prefer, *self._donors.get(tier, ()), self.store.lineage):
            if name and name in self.tables and self.store.capsules[name].tier == tier:
                return name
        return ""

    def _note_donor(self, tier: str, name: str) -> None:
        self._donors[tier] = [name] + [n for n in self._donors.get(tier, ()) if n != name][:3]

    def _match_plan(self, donor: str, position: int):
        """The comparisons that decide which chunks of a live range at `position` equal the
        candidate's blocks: (chunk indices, [(live offset, pool offset, rows, width)]), one item
        per run of adjacent candidate blocks (full blocks as rows; a partial block alone)."""
        plans = self._match_plans.setdefault(donor, {})
        plan = plans.get(position)
        if plan is None:
            if len(plans) > 16:
                plans.clear()
            cand, pool = self.tables[donor], self.blocks[self.store.capsules[donor].tier]
            bb = self.block_bytes
            offs, sizes = self._layout(position)
            idx = np.arange(min(len(offs), len(cand)))
            idx = idx[pool.filled[cand[idx]] >= sizes[idx]]
            chunks, items = [], []
            for s, e in self._runs(idx, cand[idx], sizes):
                c = idx[s:e]
                nfull = e - s if sizes[c[-1]] == bb else e - s - 1
                if nfull:
                    chunks.append(c[:nfull])
                    items.append((int(offs[c[0]]), int(cand[c[0]]) * bb, nfull, bb))
                if nfull < e - s:
                    k = c[-1]
                    chunks.append(c[-1:])
                    items.append((int(offs[k]), int(cand[k]) * bb, 1, int(sizes[k])))
            plan = plans[position] = (np.concatenate(chunks) if chunks else idx[:0], items)
        return plan

    def _describe(self, tier, src, position, step, episode, context_len, lineage, prefer=None,
                  share=True) -> CommittedDescriptor:
        """Compare src's chunks with the candidate's blocks (src is on the pool's device)."""
        pool = self.blocks[tier]
        offs, _ = self._layout(position)
        table = np.full(len(offs), -1, dtype=np.int64)
        donor = self._candidate(tier, prefer) if share else ""
        if donor:
            chunks, items = self._match_plan(donor, position)
            if items:
                same = self._equal(src, pool.storage, items)
                hit = chunks[same]
                table[hit] = self.tables[donor][hit]
        return CommittedDescriptor(position, step, episode, context_len, tier, donor,
                                   tuple(table.tolist()), lineage)

    def _equal(self, a: torch.Tensor, b: torch.Tensor, items, stream=None) -> np.ndarray:
        """Per row of every (a offset, b offset, rows, width) item: are the bytes equal? One host
        sync in all; on CUDA on `stream` when given (so control steps do not queue behind it)."""
        if a.device.type == "cpu":
            return np.concatenate([_rows_equal(a[x:x + r * w].view(r, w), b[y:y + r * w].view(r, w))
                                   for x, y, r, w in items])
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            flags = torch.cat([_rows_equal(a[x:x + r * w].view(r, w), b[y:y + r * w].view(r, w))
                               for x, y, r, w in items])
            return flags.cpu().numpy()

    def _copy_then_share(self, tier: str, prefer: str | None):
        """The snapshot path when the pool has room for the whole live range now. The runtime lock
        is held only to enqueue one copy per run into fresh blocks (what the flat store's snapshot
        costs); then the fresh blocks are compared with the candidate's - pool against pool, no
        live bytes, so without the runtime lock - and each equal one is swapped for the
        candidate's block and freed. Returns (table, desc), or None when the range does not fit
        (the caller then compares first, which needs room for the new blocks only)."""
        pool, rt, bb = self.blocks[tier], self.rt, self.block_bytes
        cross = pool.device.type != rt.device.type      # host tier of a CUDA runtime
        with rt.lock:
            position, step, episode, context_len = rt.position, rt.step_count, rt.episode, \
                rt.context_len
            lineage = self.store.lineage
            offs, sizes = self._layout(position)
            if pool.free_blocks < len(offs):
                return None
            fresh = pool.allocate(len(offs))
            pool.filled[fresh] = sizes
            self._copy_runs(pool, rt.live_state(), offs, sizes, np.arange(len(offs)), fresh,
                            to_pool=True, non_blocking=cross)
            done = None
            if self.cuda:
                done = torch.cuda.Event()
                done.record()                           # on the compute stream, after the copies
        side = None
        if cross:
            done.synchronize()                          # host blocks complete before CPU reads
        elif done is not None:
            side = self.copy_stream
            side.wait_event(done)
        table = fresh.copy()
        donor = self._candidate(tier, prefer)
        if donor:
            cand = self.tables[donor]
            n = min(len(offs), len(cand))
            idx = np.arange(n)
            idx = idx[pool.filled[cand[idx]] >= sizes[idx]]
            # runs where the fresh and the candidate blocks are both adjacent
            joined = (np.diff(idx) == 1) & (np.diff(fresh[idx]) == 1) & (np.diff(cand[idx]) == 1) \
                & (sizes[idx[:-1]] == bb)
            cuts = np.concatenate(([0], np.flatnonzero(~joined) + 1, [len(idx)]))
            chunks, items = [], []
            for s0, e0 in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
                if e0 <= s0:
                    continue
                c = idx[s0:e0]
                nfull = e0 - s0 if sizes[c[-1]] == bb else e0 - s0 - 1
                if nfull:
                    chunks.append(c[:nfull])
                    items.append((int(fresh[c[0]]) * bb, int(cand[c[0]]) * bb, nfull, bb))
                if nfull < e0 - s0:
                    chunks.append(c[-1:])
                    items.append((int(fresh[c[-1]]) * bb, int(cand[c[-1]]) * bb, 1, int(sizes[c[-1]])))
            if items:
                hit = np.concatenate(chunks)[self._equal(pool.storage, pool.storage, items, side)]
                table[hit] = cand[hit]
                pool.incref(cand[hit])
                pool.decref(fresh[hit])
        shown = np.where(table == fresh, -1, table)
        return table, CommittedDescriptor(position, step, episode, context_len, tier, donor,
                                          tuple(shown.tolist()), lineage)

    def _write(self, tier: str, src: torch.Tensor, desc: CommittedDescriptor) -> np.ndarray:
        """The capsule's block table: shared blocks referenced once more, new chunks copied."""
        pool = self.blocks[tier]
        offs, sizes = self._layout(desc.position)
        table = np.asarray(desc.table, dtype=np.int64)
        new = desc.tail
        pool.incref(table[table >= 0])
        fresh = pool.allocate(len(new))          # the caller made room
        table[new] = fresh
        pool.filled[fresh] = sizes[new]
        self._copy_runs(pool, src, offs, sizes, new, fresh, to_pool=True)
        return table

    @contextlib.contextmanager
    def _live(self, tier: str):
        """The live range at the committed boundary on the pool's device, with its counters and
        lineage. Same device: a view, valid while the runtime lock is held (for the whole block).
        Host tier of a CUDA runtime: a host copy taken under the runtime lock, used after it."""
        rt = self.rt
        if self.blocks[tier].device.type == rt.device.type:
            with rt.lock:
                yield (rt.live_state(), rt.position, rt.step_count, rt.episode, rt.context_len,
                       self.store.lineage)
        else:
            with rt.lock:
                got = (rt.live_state().cpu(), rt.position, rt.step_count, rt.episode,
                       rt.context_len, self.store.lineage)
            yield got

    def _ingest(self, tier: str, source, prefer: str | None, protect: set):
        """Store the bytes `source()` yields as a new table in `tier`, sharing what is equal.
        Evicts (outside the runtime lock) until the new blocks fit; returns (table, desc).
        Sharing keeps the candidate from eviction; when the pool cannot hold it next to the new
        blocks, the capsule is stored whole instead (and the candidate may be evicted)."""
        share = True
        while True:
            with source() as (src, position, step, episode, context_len, lineage):
                desc = self._describe(tier, src, position, step, episode, context_len, lineage,
                                      prefer, share)
                keep = protect | ({desc.donor} if desc.donor else set())
                try:
                    fits = self._room(tier, len(desc.tail), desc.shared, keep)
                except BudgetExceeded:
                    if not desc.donor:
                        raise
                    share = False
                    continue
                if fits:
                    return self._write(tier, src, desc), desc
            self._evict_one(tier, keep)

    # -- room, eviction, release ----------------------------------------------------------
    def _room(self, tier: str, need: int, keep_blocks, protect: set) -> bool:
        """Whether `need` new blocks fit now; BudgetExceeded if they never can next to the blocks
        of pinned and protected capsules and `keep_blocks` (checked before anything changes)."""
        pool = self.blocks[tier]
        held = [self.tables[c.name] for c in self.store.capsules.values()
                if c.tier == tier and c.name in self.tables and (c.pinned or c.name in protect)]
        kept = np.unique(np.concatenate(held + [np.asarray(keep_blocks, dtype=np.int64)]))
        if need + kept.size > pool.n_blocks:
            raise BudgetExceeded(
                f"tier {tier}: no room for {need} new block(s) of {self.block_bytes / 2**20:.3f} MiB "
                f"next to {kept.size} block(s) held by pinned or in-use capsules in the "
                f"{pool.capacity / 2**20:.2f} MiB pool; unpin or delete capsules, or raise "
                f"store.{tier}_budget_mb")
        return pool.free_blocks >= need

    def _evict_one(self, tier: str, protect: set) -> None:
        if not self.store.evict_lru(tier, protect):
            raise BudgetExceeded(f"tier {tier}: no room and nothing left to evict; unpin or "
                                 f"delete capsules, or raise store.{tier}_budget_mb")

    def _make_room(self, tier: str, need: int, keep_blocks, protect: set) -> None:
        while not self._room(tier, need, keep_blocks, protect):
            self._evict_one(tier, protect)

    def _forget_twins(self, tier: str, freed) -> None:
        if not self._twins:
            return
        for b in np.asarray(freed).tolist():
            for other, ob in self._twins.pop((tier, b), {}).items():
                peer = self._twins.get((other, ob))
                if peer is not None:
                    peer.pop(tier, None)
                    if not peer:
                        del self._twins[(other, ob)]

    # -- tier moves -----------------------------------------------------------------------
    def _copy_table(self, src_tier: str, table: np.ndarray, tier: str, protect: set) -> np.ndarray:
        """The same blocks in another memory tier: twins reused, the rest copied."""
        src, dst = self.blocks[src_tier], self.blocks[tier]
        out = np.array([self._twins.get((src_tier, int(b)), {}).get(tier, -1) for b in table],
                       dtype=np.int64)
        have, missing = out[out >= 0], np.flatnonzero(out < 0)
        dst.incref(have)             # held while eviction makes room for the rest
        try:
            self._make_room(tier, len(missing), have, protect)
        except BaseException:
            self._forget_twins(tier, dst.decref(have))
            raise
        fresh, from_ids = dst.allocate(len(missing)), table[missing]
        bb = self.block_bytes
        cuts = np.flatnonzero((np.diff(from_ids) != 1) | (np.diff(fresh) != 1)) + 1
        for s, e in zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [len(fresh)])).tolist()):
            if e > s:
                dst.span(fresh[s], (e - s) * bb).copy_(src.span(from_ids[s], (e - s) * bb))
        dst.filled[fresh] = src.filled[from_ids]
        for a, b in zip(from_ids.tolist(), fresh.tolist()):
            self._twins.setdefault((src_tier, a), {})[tier] = b
            self._twins.setdefault((tier, b), {})[src_tier] = a
        out[missing] = fresh
        return out

    # -- the Memory interface (memory.py) -------------------------------------------------
    def capture(self, cap: Capsule, prefer: str | None) -> Boundary:
        tier = cap.tier
        got = self._copy_then_share(tier, prefer)
        table, desc = got if got is not None else \
            self._ingest(tier, lambda: self._live(tier), prefer, set())
        self.tables[cap.name] = table
        self._note_donor(tier, cap.name)
        return Boundary(desc.position, desc.step, desc.episode, desc.context_len, desc.lineage)

    def put(self, cap: Capsule, tier: str, raw: torch.Tensor, protect: set,
            prefer: str | None) -> None:
        """Ingest verified file bytes, sharing blocks with `prefer` (the capsule's recorded parent)
        or the live state's donor where the bytes are equal (the store has set `cap.context_len`
        from the bytes, so its restores need no read-back)."""
        pool = self.blocks[tier]
        src = raw if pool.device.type == raw.device.type else raw.to(pool.device)
        self.tables[cap.name], _ = self._ingest(tier, lambda: contextlib.nullcontext(
            (src, cap.position, cap.step, cap.episode, cap.context_len, "")), prefer, protect)

    def copy(self, src: Capsule, cap: Capsule, protect: set) -> None:
        """Within one tier a fork shares every block of its source (reference counts only);
        across tiers its blocks are copied (twins reused)."""
        table = self.tables[src.name]
        if src.tier == cap.tier:
            table = table.copy()
            self.blocks[cap.tier].incref(table)
        else:
            table = self._copy_table(src.tier, table, cap.tier, protect)
        self.tables[cap.name] = table

    def move(self, cap: Capsule, tier: str, protect: set) -> None:
        table = self._copy_table(cap.tier, self.tables[cap.name], tier, protect)
        self.release(cap)
        self.tables[cap.name] = table

    def _small_span(self, cap: Capsule) -> torch.Tensor | None:
        """The pool bytes of `cap`'s small state when its blocks are adjacent (one span), else
        None."""
        ids = self.tables[cap.name][: self.n_small]
        if np.any(np.diff(ids) != 1):
            return None
        return self.blocks[cap.tier].span(ids[0], self.rt.arena.small_nbytes)

    def restore(self, cap: Capsule) -> None:
        rt = self.rt
        self._gather(cap.name, rt.arena.base)
        # adopt the metadata (copying the range onto itself is a no-op); the reset point may
        # refer to the small state's blocks, which `cap` holds until release hands them back
        rt.restore_state(rt.arena.base[:cap.nbytes], cap.known(), refer=self._small_span(cap))

    def restored(self, cap: Capsule) -> None:
        self._donors = {cap.tier: [cap.name]} if cap.tier in self.blocks else {}

    def host_bytes(self, cap: Capsule) -> torch.Tensor:
        out = torch.empty(cap.nbytes, dtype=torch.uint8)
        self._gather(cap.name, out)
        return out

    def release(self, cap: Capsule) -> None:
        """Drop a capsule's table: one reference less on each of its blocks."""
        name = cap.name
        span = self._small_span(cap)
        if span is not None:
            hand_back(self.store, span)
        self._forget_twins(cap.tier, self.blocks[cap.tier].decref(self.tables.pop(name)))
        self._plans.pop(name, None)
        self._match_plans.pop(name, None)

    def usage(self, tier: str) -> dict:
        """Bytes in blocks actually held (`used`), next to the sum of the capsules' live sizes
        (`logical`)."""
        pool = self.blocks[tier]
        return dict(used=pool.used_blocks * pool.block_bytes,
                    logical=sum(c.nbytes for c in self.store.capsules.values() if c.tier == tier),
                    blocks_used=pool.used_blocks, blocks_total=pool.n_blocks,
                    block_bytes=pool.block_bytes, block_tokens=self.block_tokens)

    # -- checks ---------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError unless every block's reference count equals the number of table
        entries naming it (and free blocks hold nothing): the property tests call this."""
        capsules = self.store.capsules
        for tier, pool in self.blocks.items():
            counts = np.zeros(pool.n_blocks, dtype=np.int64)
            for name, table in self.tables.items():
                if capsules[name].tier == tier:
                    np.add.at(counts, table, 1)
            bad = np.flatnonzero(counts != pool.refs)
            assert bad.size == 0, f"tier {tier}: refcounts differ from table references at {bad[:5]}"
            assert not np.any(pool.filled[pool.refs == 0]), f"tier {tier}: a free block holds bytes"
        for (tier, b), peers in self._twins.items():
            assert self.blocks[tier].refs[b] > 0, f"twin of free block {tier}:{b}"
            for other, ob in peers.items():
                assert self._twins.get((other, ob), {}).get(tier) == b, "twins are not mutual"
        assert set(self.tables) == {n for n, c in capsules.items() if c.tier in self.blocks}

