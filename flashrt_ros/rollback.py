"""RollbackRing: always-on undo of the last k committed steps, without explicit snapshots.

KV is append-only (observation steps never write the live prefix; tokens append past it), so the
state k commits ago is its small per-step region (metadata incl. position, RNG, normaliser,
recurrent, conv, MTP and action state) plus the KV prefix it names - which is still in place.
The ring therefore keeps one copy of `arena.base[0:small_nbytes]` per commit: a single contiguous
copy per step into a preallocated slot (no allocation, a few KB for `tiny`).
"""
from __future__ import annotations

import torch

from .arena import StateArena
from .exceptions import RollbackUnavailable


class RollbackRing:
    def __init__(self, arena: StateArena, depth: int):
        self.arena = arena
        self.depth = depth
        self.slots = torch.empty((depth + 1, arena.small_nbytes) if depth > 0 else (0, 0),
                                 dtype=torch.uint8, device=arena.device)
        self._marks: list[tuple[int, int, int, int]] = []   # (slot, step, position, episode)
        self._next = 0

    def clear(self) -> None:
        self._marks.clear()

    def push(self, step: int, position: int, episode: int) -> None:
        """Record the state just committed (called after every commit and after reset/restore)."""
        if self.depth == 0:
            return
        slot = self._next
        self._next = (self._next + 1) % (self.depth + 1)
        self.slots[slot].copy_(self.arena.base[: self.arena.small_nbytes], non_blocking=True)
        self._marks.append((slot, step, position, episode))
        if len(self._marks) > self.depth + 1:
            self._marks.pop(0)

    @property
    def available(self) -> int:
        """How many commits back rollback can go right now."""
        return max(len(self._marks) - 1, 0)

    def rollback(self, k: int) -> tuple[int, int, int]:
        """Copy the state of k commits ago into the arena; returns its (step, position, episode)."""
        if not isinstance(k, int) or k < 1:
            raise RollbackUnavailable(f"rollback: expected k >= 1, found {k!r}")
        if k > self.available:
            raise RollbackUnavailable(
                f"rollback({k}): the ring holds {self.available} committed step(s) since the last "
                f"reset/restore (depth {self.depth}); roll back at most {self.available}, or restore "
                f"a capsule, or raise runtime.rollback_depth")
        del self._marks[len(self._marks) - k:]
        slot, step, position, episode = self._marks[-1]
        self.arena.base[: self.arena.small_nbytes].copy_(self.slots[slot])
        self._next = (slot + 1) % (self.depth + 1)
        return step, position, episode
