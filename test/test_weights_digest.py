"""core/checkpoint.WeightsDigest: the digest that names the weights (capsule fingerprints, trained
heads' `backbone_digest`) is hashed in a worker thread while the loader copies, and must stay the
digest of hashing each tensor in turn: a changed digest would refuse every capsule and heads file
written before. The reference below is that definition written out in the caller's thread."""
from __future__ import annotations

import hashlib

import pytest
import torch

from flashrt_ros.core.checkpoint import WeightsDigest
from flashrt_ros.core.models.qwen3_5.policy_qwen3_5 import digest_tensors


def reference(tensors: list) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in tensors:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def tensors() -> list:
    g = torch.Generator().manual_seed(0)
    return [("b.weight", torch.randn(300, 70, generator=g).to(torch.bfloat16)),
            ("a.bias", torch.randn(70, generator=g)),
            ("empty", torch.zeros(0, 4)),
            ("scalar", torch.tensor(3.0, dtype=torch.float64).reshape(1)),
            ("big", torch.randn(1 << 20, generator=g).to(torch.float16)),
            ("ids", torch.arange(17, dtype=torch.int64))]


def test_the_digest_is_the_one_of_hashing_each_tensor_in_turn():
    ts = tensors()
    with WeightsDigest() as digest:
        for name, t in ts:
            digest.add(name, t)
    assert digest.hexdigest() == reference(ts) == digest.hexdigest()
    # order, names, dtypes and bytes all count
    assert reference(ts[::-1]) != reference(ts)
    changed = [(n, t.clone()) for n, t in ts]
    changed[0][1][0, 0] += 1
    assert reference(changed) != reference(ts)


def test_digest_tensors_takes_name_order():
    ts = tensors()
    assert digest_tensors(dict(ts)) == reference(sorted(ts, key=lambda x: x[0]))


def test_an_error_in_the_loop_ends_the_worker_and_one_in_hashing_is_raised_by_hexdigest():
    with pytest.raises(RuntimeError, match="the loader failed"):
        with WeightsDigest() as digest:
            digest.add("a", torch.ones(3))
            raise RuntimeError("the loader failed")
    assert not digest._thread.is_alive()
    with WeightsDigest() as digest:
        digest.add("strided", torch.ones(4, 4).t())      # not contiguous: no view of its bytes
        digest.add("after", torch.ones(3))
    with pytest.raises(RuntimeError):
        digest.hexdigest()
