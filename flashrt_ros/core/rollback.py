"""RollbackRing: always-on undo of the last k committed steps, without explicit snapshots.

KV is append-only (observation steps never write the live prefix; tokens append past it), so the
state k commits ago is its small per-step region (metadata incl. position, RNG, normaliser,
recurrent, conv, MTP and action state) plus the KV prefix it names - which is still in place.
The ring therefore keeps one copy of `arena.base[0:small_nbytes]` per commit: a single contiguous
copy per step into a preallocated slot (no allocation, a few KB for `tiny`).

The ring's oldest entry after a reset, restore or new instruction is its *reset point*: the state
that reset(keep_context=True) returns to. It lives in its own buffer, written once by `rebase`, so
that a restore pays for one small-state copy, not two (one for the reset point and one for the ring).
"""
from __future__ import annotations

import torch

from flashrt_ros.core.arena import META_EPISODE, META_LEN, StateArena
from flashrt_ros.core.exceptions import RollbackUnavailable

RESET_POINT = -1  # the slot index of a mark that lives in the reset-point buffer


class RollbackRing:
    def __init__(self, arena: StateArena, depth: int):
        self.arena = arena
        self.depth = depth
        self.slots = torch.empty((depth + 1, arena.small_nbytes) if depth > 0 else (0, 0),
                                 dtype=torch.uint8, device=arena.device)
        # allocated now, with everything else, so that nothing is allocated after graph capture
        self.reset_point = torch.zeros(arena.small_nbytes, dtype=torch.uint8, device=arena.device)
        self._marks: list[tuple[int, int, int, int]] = []   # (slot, step, position, episode)
        self._next = 0

    def rebase(self, step: int, position: int, episode: int, from_arena: bool = True) -> None:
        """Make the current state the reset point and the ring's only entry.

        from_arena=True copies the arena's small state into the reset point (after a restore or an
        instruction); False means the arena was just loaded from the reset point (reset) and only the
        new episode number is written into both.
        """
        small = self.arena.base[: self.arena.small_nbytes]
        if from_arena:
            self.reset_point.copy_(small, non_blocking=True)
        else:
            # fill_ on a view: nothing may allocate on the device after capture
            self.arena.meta[META_EPISODE].fill_(episode)
            self.reset_point[: META_LEN * 8].view(torch.int64)[META_EPISODE].fill_(episode)
        self._marks = [(RESET_POINT, step, position, episode)]
        self._next = 0

    def push(self, step: int, position: int, episode: int) -> None:
        """Record the state just committed (called after every commit)."""
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
        src = self.reset_point if slot == RESET_POINT else self.slots[slot]
        self.arena.base[: self.arena.small_nbytes].copy_(src)
        self._next = 0 if slot == RESET_POINT else (slot + 1) % (self.depth + 1)
        return step, position, episode
