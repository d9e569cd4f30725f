"""The content digest of a capsule: a BLAKE2b tree over fixed leaves, hashed on every core.

One BLAKE2b pass runs at about 350 MB/s on one core, slower than the disk it guards (a 221 MB
capsule: 635 ms to hash, 212 ms to write and fsync). The digest is therefore BLAKE2's own tree
mode (RFC 7693 parameters, as in hashlib's tree example), two levels, unlimited fanout:

  D       = the buffers' bytes in layout order (padding excluded): what the capsule file's
            data section holds;
  leaf i  = BLAKE2b-256(D[i*LEAF : (i+1)*LEAF]; node_depth=0, node_offset=i,
            last_node = (i == n-1)),                       n = max(1, ceil(|D| / LEAF));
  digest  = BLAKE2b-256(leaf 0 || ... || leaf n-1; node_depth=1, node_offset=0, last_node=True),
every node with fanout=0, depth=2, leaf_size=LEAF, inner_size=32. The tree parameters make leaves
and the root distinct hash functions, so the digest is as collision resistant as BLAKE2b-256.

Leaves are independent, so `TreeHash` hashes them in a thread pool while the caller reads or
writes the next leaf: hashlib releases the GIL while it hashes more than 2 KiB, so the threads run
on all cores beside the file I/O (or on fewer: `store.digest_threads` leaves cores to the control
loop). A leaf is a list of buffer views (it may span buffers); no byte is copied.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading

LEAF_BYTES = 4 << 20          # 4 MiB: 53 leaves for a 221 MB capsule, few enough to queue cheaply
DIGEST_BYTES = 32
_TREE = dict(digest_size=DIGEST_BYTES, fanout=0, depth=2, leaf_size=LEAF_BYTES,
             inner_size=DIGEST_BYTES)

_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def hashing_threads(threads: int = 0) -> int:
    """How many threads hash: `threads`, or (0) one per core this process may run on."""
    if threads > 0:
        return threads
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, n or 1)


def _workers(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool of `threads` hashing threads (made once per size)."""
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = concurrent.futures.ThreadPoolExecutor(
                threads, thread_name_prefix="capsule-digest")
        return _pools[threads]


def _leaf(views, index: int, last: bool) -> bytes:
    h = hashlib.blake2b(node_offset=index, node_depth=0, last_node=last, **_TREE)
    for v in views:
        h.update(v)
    return h.digest()


def n_leaves(total: int) -> int:
    return max(1, -(-total // LEAF_BYTES))


def leaves(lengths):
    """Cut a byte stream made of consecutive pieces of these lengths into leaves: for each leaf
    index, the list of (piece index, offset in the piece, length) it covers."""
    total, i, at = sum(lengths), 0, 0
    for leaf in range(n_leaves(total)):
        need, parts = min(LEAF_BYTES, total - leaf * LEAF_BYTES), []
        while need:
            n = min(need, lengths[i] - at)
            parts.append((i, at, n))
            need -= n
            at += n
            if at == lengths[i]:
                i, at = i + 1, 0
        yield leaf, parts


class TreeHash:
    """The tree digest of `total` bytes fed leaf by leaf, in order: `add(views)` hands one leaf
    (its views must stay valid until `hexdigest`) to `threads` hashing threads (0: one per
    core, `hashing_threads`), `hexdigest()` waits for them and returns the root. A stream of one
    leaf, or one thread, is hashed in the caller's thread."""

    def __init__(self, total: int, threads: int = 0):
        self.n = n_leaves(total)
        self.futures = []
        threads = hashing_threads(threads)
        self.pool = _workers(threads) if self.n > 1 and threads > 1 else None

    def add(self, views) -> None:
        i = len(self.futures)
        if self.pool is None:
            done = concurrent.futures.Future()
            done.set_result(_leaf(views, i, i == self.n - 1))
            self.futures.append(done)
        else:
            self.futures.append(self.pool.submit(_leaf, views, i, i == self.n - 1))

    def hexdigest(self) -> str:
        if len(self.futures) != self.n:
            raise ValueError(f"tree digest: expected {self.n} leaves, found {len(self.futures)}")
        root = hashlib.blake2b(node_offset=0, node_depth=1, last_node=True, **_TREE)
        for f in self.futures:
            root.update(f.result())
        return root.hexdigest()


def tree_digest(views, threads: int = 0) -> str:
    """The tree digest of the concatenation of byte views, all in memory."""
    views = [memoryview(v).cast("B") for v in views]
    h = TreeHash(sum(len(v) for v in views), threads)
    for _, parts in leaves([len(v) for v in views]):
        h.add([views[p][at:at + n] for p, at, n in parts])
    return h.hexdigest()
