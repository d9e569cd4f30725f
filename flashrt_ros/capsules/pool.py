"""BytePool: a preallocated byte pool for one memory tier (GPU-resident or host).

A snapshot into a memory tier takes an extent of this pool, never a new device allocation: the
pool is one `torch.empty` made at configure time (pinned on the host when the runtime is on CUDA,
so copies to and from it are asynchronous DMA). Extents are kept first-fit in a sorted free list
with neighbouring free extents merged on release; the store evicts least-recently-used capsules
until a request fits.
"""
from __future__ import annotations

import bisect

import torch

ALIGN = 256


class BytePool:
    def __init__(self, capacity: int, device: torch.device, pinned: bool = False):
        self.capacity = (capacity // ALIGN) * ALIGN
        self.device = torch.device(device)
        self.pinned = pinned and self.capacity > 0
        self.storage = torch.empty(self.capacity, dtype=torch.uint8, device=self.device,
                                   pin_memory=self.pinned)
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []
        self._used: dict[int, int] = {}   # offset -> reserved size

    @property
    def used(self) -> int:
        return sum(self._used.values())

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a fresh extent of at least nbytes, or None if no free extent is large enough."""
        size = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
        for i, (off, length) in enumerate(self._free):
            if length >= size:
                if length == size:
                    self._free.pop(i)
                else:
                    self._free[i] = (off + size, length - size)
                self._used[off] = size
                return off
        return None

    def release(self, offset: int) -> None:
        size = self._used.pop(offset)
        i = bisect.bisect(self._free, (offset, size))
        self._free.insert(i, (offset, size))
        # merge with neighbours
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free[i + 1][1])
            self._free.pop(i + 1)
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            self._free.pop(i)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.storage[offset:offset + nbytes]

    def fits_ever(self, nbytes: int) -> bool:
        return nbytes <= self.capacity
