"""Seeded numbers that are the same on every device, drawn on the device (no ROS imports).

torch's generators differ per device (the CPU's Mersenne Twister, CUDA's Philox), so a preset's
default weights drawn with `torch.Generator` are drawn on the CPU and copied: the same bytes on
every device, but for a large preset the draw is most of a warm start (hybrid-0.8b: ~750 M values,
seconds of one CPU core). `CounterRNG` draws where the weights live: element i of the tensor
named n is a hash of (seed, n, i) in 32-bit integer arithmetic on int64 tensors (no product
exceeds 2^63: exact on every device), whose top 24 bits are an integer that one float32
multiply (and, for a range, one add) scales: IEEE-rounded alike everywhere, so the bytes are the
same on the CPU and on any GPU (test/test_bringup.py checks both, and that the CPU's numpy form
of the hash is the int64 one).

The values are uniform: `normal` gives a centred uniform of the asked standard deviation
(default weights for benchmarks, not a sample of a Gaussian).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from flashrt_ros.core.exceptions import InputError

# a two-round 32-bit integer hash (constants from Wellons' hash prospector), both below 2^31 so
# that x * m of a 32-bit x stays inside int64
M1, M2 = 0x21F0AAAD, 0x735A2D97
MASK32 = 0xFFFFFFFF
SPAN = 1 << 24                   # the top 24 bits: integers a float32 holds exactly


def _hash32(x):
    """The hash of each 32-bit value of `x`: an int64 torch tensor (32-bit products kept inside
    int64 by the mask), or a uint32 numpy array (products wrap modulo 2^32: the same numbers)."""
    if isinstance(x, np.ndarray):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(M1)
        x ^= x >> np.uint32(15)
        x = x * np.uint32(M2)
        return x ^ (x >> np.uint32(15))
    x = x ^ (x >> 16)
    x = (x * M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * M2) & MASK32
    return x ^ (x >> 15)


def _top24(start: int, stop: int, k1: int, k2: int, device) -> torch.Tensor:
    """The top 24 bits of the hashes of elements start..stop-1 (int64 on a GPU, where integer
    tensor ops are fast; numpy's uint32 on the CPU, where they are several times faster)."""
    if device.type == "cpu":
        i = np.arange(start, stop, dtype=np.uint32)
        u = _hash32(_hash32(i + np.uint32(k1)) ^ np.uint32(k2)) >> np.uint32(8)
        return torch.from_numpy(u.astype(np.int64))
    i = torch.arange(start, stop, dtype=torch.int64, device=device)
    return _hash32(_hash32((i + k1) & MASK32) ^ k2) >> 8


class CounterRNG:
    """Uniform numbers keyed by (seed, tensor name, element index), on `device`."""

    CHUNK = 1 << 22              # elements hashed at once: the int64 temporaries stay in cache

    def __init__(self, seed: int, device):
        self.seed, self.device = int(seed), torch.device(device)

    def _integers(self, name: str, shape, odd: bool) -> torch.Tensor:
        """float32 [shape] holding integers: the top 24 bits u of each hash, in [0, 2^24), or
        with `odd` 2u - (2^24 - 1), odd and centred (exact in float32: below 2^24)."""
        key = hashlib.blake2b(f"{self.seed}|{name}".encode(), digest_size=8).digest()
        k1, k2 = int.from_bytes(key[:4], "little"), int.from_bytes(key[4:], "little")
        n = math.prod(shape)
        if n >= 1 << 32:
            raise ValueError(f"{name}: {n} elements; the counter covers fewer than 2^32")
        out = torch.empty(n, dtype=torch.float32, device=self.device)
        for start in range(0, n, self.CHUNK):
            stop = min(n, start + self.CHUNK)
            u = _top24(start, stop, k1, k2, self.device)
            out[start:stop] = (2 * u - (SPAN - 1)) if odd else u
        return out.view(shape)

    def uniform(self, name: str, shape, low: float, high: float) -> torch.Tensor:
        """float32 [shape] in [low, high]: float32 rounding can bring the largest draws to high."""
        return self._integers(name, shape, odd=False) * ((high - low) / SPAN) + low

    def normal(self, name: str, shape, std: float) -> torch.Tensor:
        """float32 [shape]: centred, uniform, standard deviation `std`."""
        return self._integers(name, shape, odd=True) * (std * math.sqrt(3.0) / SPAN)


def _mix32(x):
    """A 32-bit integer hash (lowbias32-style) on int64 tensors holding values in [0, 2^32)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK32   # multiplier < 2^27: the product fits in int64
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK32
    return x ^ (x >> 16)


def check_seed(seed, what: str = "seed") -> None:
    """A seed of the counter-based sampler: an integer in [0, 2^32) (it keeps 32 bits)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 32:
        raise InputError(f"{what}: expected an integer in [0, 2^32), found {seed!r}")


def counter_gaussian(seed, counter, idx):
    """Standard normals from (seed, counter, index): a counter-based sampler whose whole state is two
    int64 in the arena, so capsules and rollback carry it and graphs can advance it in place."""
    base = _mix32((seed & MASK32) ^ _mix32(counter & MASK32))
    h1 = _mix32(base ^ _mix32(idx * 2))
    h2 = _mix32(base ^ _mix32(idx * 2 + 1))
    u1 = ((h1 >> 8).float() + 0.5) * (1.0 / (1 << 24))     # (0, 1)
    u2 = (h2 >> 8).float() * (1.0 / (1 << 24))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
