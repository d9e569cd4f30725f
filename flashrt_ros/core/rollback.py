"""RollbackRing: always-on undo of the last k committed steps, without explicit snapshots.

KV is append-only (observation steps never write the live prefix; tokens append past it), so the
state k commits ago is its small per-step region (metadata incl. position, RNG, normaliser,
recurrent, conv, MTP and action state) plus the KV prefix it names - which is still in place.
The ring therefore keeps one copy of `arena.base[0:small_nbytes]` per commit: a single contiguous
copy per step into a preallocated slot (no allocation, a few KB for `tiny`).

The ring's oldest entry after a reset, restore or new instruction is its *reset point*: the state
that reset(keep_context=True) returns to. Its bytes are in one of two places:
  * the ring's own buffer, written once by `rebase` (after an instruction, a reset to an empty
    context, a restore of bytes the caller may change);
  * the stored capsule the arena was just restored from, when its bytes are on the arena's device
    and stay unchanged until handed back (`rebase(refer=...)`): the reset point refers to them, so
    that a restore is one copy of the live range (the small state is most of a short context's
    bytes: 19.5 MB of recurrent state beside 25 MB of KV at 2k tokens on hybrid-0.8b). Whoever
    holds such bytes calls `release` before it frees or overwrites them (a capsule deleted,
    evicted or moved); the ring then copies them into its own buffer first, so the reset point is
    never lost. A reference keeps the tensor's storage alive, so a store dropped without handing
    its bytes back leaves them readable too.
The episode number is not read from the reset point's bytes: loading it writes the episode its
mark carries (a reset starts a new episode at the same state, and a capsule's bytes are never
written).
"""
from __future__ import annotations

import torch

from flashrt_ros.core.arena import META_EPISODE, StateArena
from flashrt_ros.core.exceptions import RollbackUnavailable

RESET_POINT = -1  # the slot index of a mark that lives in the reset point


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share any byte."""
    if a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


class RollbackRing:
    def __init__(self, arena: StateArena, depth: int):
        self.arena = arena
        self.depth = depth
        self.slots = torch.empty((depth + 1, arena.small_nbytes) if depth > 0 else (0, 0),
                                 dtype=torch.uint8, device=arena.device)
        # allocated now, with everything else, so that nothing is allocated after graph capture
        self.reset_point = torch.zeros(arena.small_nbytes, dtype=torch.uint8, device=arena.device)
        self._small = arena.base[: arena.small_nbytes]     # the arena's per-step region
        # the reset point's bytes: the ring's own buffer, or stored bytes referred to (their
        # first small_nbytes)
        self._reset_bytes = self.reset_point
        self._marks: list[tuple[int, int, int, int]] = []   # (slot, step, position, episode)
        self._next = 0

    def rebase(self, step: int, position: int, episode: int, from_arena: bool = True,
               refer: torch.Tensor | None = None) -> None:
        """Make the current state the reset point and the ring's only entry.

        from_arena=True takes the arena's small state as the reset point (after a restore or an
        instruction); False means the arena was just loaded from the reset point (reset) and only
        the new episode number is written into it.

        `refer`: bytes the arena was just restored from (a stored capsule's live range), unchanged
        until they are handed back with `release`. On the arena's device the reset point refers
        to them instead of copying the arena's small state; elsewhere (a host capsule of a CUDA
        arena, whose reset would read over PCIe) it is copied as without.
        """
        if not from_arena:
            # fill_ on a view: nothing may allocate on the device after capture
            self.arena.meta[META_EPISODE].fill_(episode)
        elif refer is not None and refer.device == self._small.device:
            self._reset_bytes = refer
        else:
            self.reset_point.copy_(self._small, non_blocking=True)
            self._reset_bytes = self.reset_point
        self._marks = [(RESET_POINT, step, position, episode)]
        self._next = 0

    def refers_to(self, storage: torch.Tensor) -> bool:
        """Whether the reset point refers to bytes of `storage` (not the ring's own buffer)."""
        held = self._reset_bytes          # read once: the store asks without the runtime lock
        return held is not self.reset_point and _overlap(held, storage)

    def release(self, storage: torch.Tensor) -> None:
        """`storage` is about to be freed or overwritten: when the reset point refers to its
        bytes, copy them into the ring's own buffer first (stream-ordered before any later write
        on CUDA). Call it under the runtime lock."""
        if self.refers_to(storage):
            self.reset_point.copy_(self._reset_bytes[: self.arena.small_nbytes], non_blocking=True)
            self._reset_bytes = self.reset_point

    def load_reset_point(self, episode: int) -> None:
        """Copy the reset point into the arena, in episode `episode`."""
        self._small.copy_(self._reset_bytes[: self.arena.small_nbytes])
        self.arena.meta[META_EPISODE].fill_(episode)

    def push(self, step: int, position: int, episode: int) -> None:
        """Record the state just committed (called after every commit)."""
        if self.depth == 0:
            return
        slot = self._next
        self._next = (self._next + 1) % (self.depth + 1)
        self.slots[slot].copy_(self._small, non_blocking=True)
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
        if slot == RESET_POINT:
            self.load_reset_point(episode)
        else:
            self._small.copy_(self.slots[slot])
        self._next = 0 if slot == RESET_POINT else (slot + 1) % (self.depth + 1)
        return step, position, episode
