"""BlockPool: fixed-size blocks in one preallocated allocation, with reference counts.

The paged capsule store (paged.py) keeps every memory-tier capsule as a table of block ids into one
BlockPool per tier. All blocks have the same size, so any free block serves any request and a
request that fits in the free count always succeeds; adjacency still matters for speed (a run of
adjacent blocks moves in one copy), so `allocate(n)` hands out the smallest run of n adjacent free
blocks there is, else the n lowest free ids.

Blocks are immutable once written: a block is written only right after `allocate` returned it, and
afterwards it is shared by reference. `refs[b]` is the number of block-table entries naming block
b, and a block is free exactly when it is 0. `filled[b]` is how many of its bytes were written (the
last block of a region may be partial).

Not thread-safe: the store's lock guards it.
"""
from __future__ import annotations

import numpy as np
import torch


class BlockPool:
    def __init__(self, n_blocks: int, block_bytes: int, device, pinned: bool = False):
        self.n_blocks = max(int(n_blocks), 0)
        self.block_bytes = int(block_bytes)
        self.device = torch.device(device)
        self.pinned = bool(pinned) and self.n_blocks > 0
        self.storage = torch.empty(self.n_blocks * self.block_bytes, dtype=torch.uint8,
                                   device=self.device, pin_memory=self.pinned)
        self.refs = np.zeros(self.n_blocks, dtype=np.int64)
        self.filled = np.zeros(self.n_blocks, dtype=np.int64)

    @property
    def capacity(self) -> int:
        return self.n_blocks * self.block_bytes

    @property
    def used_blocks(self) -> int:
        return int(np.count_nonzero(self.refs))

    @property
    def free_blocks(self) -> int:
        return self.n_blocks - self.used_blocks

    def rows(self) -> torch.Tensor:
        """The pool as [n_blocks, block_bytes] (the operand of gathers)."""
        return self.storage.view(self.n_blocks, self.block_bytes)

    def span(self, first: int, nbytes: int) -> torch.Tensor:
        """nbytes from the start of block `first` on (one block, or a run of adjacent blocks)."""
        off = int(first) * self.block_bytes
        return self.storage[off:off + int(nbytes)]

    def allocate(self, n: int) -> np.ndarray | None:
        """Ids of n free blocks, now referenced once each; None if fewer than n are free."""
        if n == 0:
            return np.empty(0, dtype=np.int64)
        free = np.flatnonzero(self.refs == 0)
        if free.size < n:
            return None
        starts = np.concatenate(([0], np.flatnonzero(np.diff(free) != 1) + 1))
        lengths = np.diff(np.concatenate((starts, [free.size])))
        fit = np.flatnonzero(lengths >= n)
        if fit.size:
            first = starts[fit[np.argmin(lengths[fit])]]
            ids = free[first:first + n]
        else:
            ids = free[:n]
        self.refs[ids] = 1
        self.filled[ids] = 0
        return ids.astype(np.int64)

    def incref(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and np.any(self.refs[ids] <= 0):
            raise RuntimeError(f"block pool: incref of free block(s) {ids[self.refs[ids] <= 0][:5]}")
        np.add.at(self.refs, ids, 1)

    def decref(self, ids) -> np.ndarray:
        """Drop one reference per entry; returns the ids that became free."""
        ids = np.asarray(ids, dtype=np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        if np.any(self.refs[uniq] < counts):
            raise RuntimeError(f"block pool: more references dropped than held for "
                               f"{uniq[self.refs[uniq] < counts][:5]}")
        np.subtract.at(self.refs, ids, 1)
        freed = uniq[self.refs[uniq] == 0]
        self.filled[freed] = 0
        return freed
