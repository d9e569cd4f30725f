"""Hardening of the capsule store's persistence: kill -9 while writing, and fuzzed capsule files.

* Crash safety: a writer process overwrites and creates capsule files as fast as it can and is
  killed with SIGKILL at random points; after each kill the capsule directory must hold only whole,
  verifiable capsules (old or new, never torn), and a fresh store rebuilds its index from it.
* Fuzzing (hypothesis): mutated capsule files are either refused with a FlashRTError naming what is
  wrong, or - if the mutation happened to be harmless - read back as exactly the original bytes.
  Random capsule names and tiers through the store API only ever raise FlashRTError, and a refused
  call changes neither the live state nor the store.
"""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashrt_ros.capsules.file import SUFFIX, capsule_path, read_capsule
from flashrt_ros.core.config import RuntimeConfig, StoreConfig, load_preset
from flashrt_ros.core.exceptions import FlashRTError
from flashrt_ros.core.runtime import PolicyRuntime
from flashrt_ros.capsules.store import CapsuleStore

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from flashrt_ros.core.config import RuntimeConfig, StoreConfig, load_preset
    from flashrt_ros.core.runtime import PolicyRuntime
    from flashrt_ros.capsules.store import CapsuleStore
    rt = PolicyRuntime(load_preset("tiny"), RuntimeConfig(device="cpu"))
    rt.set_instruction("crash test")
    store = CapsuleStore(rt, StoreConfig(capsule_dir=sys.argv[1]))
    obs = np.ones(14, np.float32)
    print("ready", flush=True)
    i = 0
    while True:
        rt.step(obs * (i % 7))
        if "a" in store.capsules:
            store.delete("a")
        store.snapshot("a", tier="host")
        store.save("a")                                   # overwrite a.capsule atomically
        store.snapshot(f"b{sys.argv[2]}-{i}", tier="disk")      # new files
        if f"b{sys.argv[2]}-{i - 3}" in store.capsules:
            store.delete(f"b{sys.argv[2]}-{i - 3}")
        i += 1
        print(i, flush=True)
""")


def _runtime():
    rt = PolicyRuntime(load_preset("tiny"), RuntimeConfig(device="cpu"))
    rt.set_instruction("crash test")
    return rt


@pytest.mark.slow
def test_kill_9_while_writing_leaves_only_whole_capsules(tmp_path):
    directory = str(tmp_path / "caps")
    os.makedirs(directory)
    rng = random.Random(1234)
    rt = _runtime()
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, directory, str(round_)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            # let it complete a random number of write rounds, then kill it at a random instant
            # inside the next one (the random delay is the point: it picks the kill site)
            for _ in range(rng.randint(1, 6)):
                assert proc.stdout.readline(), proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.02))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        store = CapsuleStore(rt, StoreConfig(capsule_dir=directory))
        assert not store.skipped_files, store.skipped_files
        names = sorted(f for f in os.listdir(directory))
        assert all(n.endswith(SUFFIX) and not n.startswith(".") for n in names), names
        assert names, "the writer wrote nothing before it was killed"
        for cap in store.list():
            read_capsule(cap.path, rt.arena, store.fingerprint, store.weights)      # whole and verified
        store.restore("a") if "a" in store.capsules else None


@pytest.fixture(scope="module")
def saved_capsule(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    rt = _runtime()
    for i in range(3):
        rt.step(np.full(14, 0.1 * i, np.float32))
    store = CapsuleStore(rt, StoreConfig(capsule_dir=str(d)))
    store.snapshot("home", tier="disk")
    path = capsule_path(str(d), "home")
    return rt, store, path, open(path, "rb").read()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_capsule_files_are_refused_or_identical(saved_capsule, tmp_path_factory, data):
    rt, store, path, blob = saved_capsule
    original = read_capsule(path, rt.arena, store.fingerprint, store.weights)[1]
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "header"]))
    b = bytearray(blob)
    if kind == "flip":
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    elif kind == "insert":
        i = data.draw(st.integers(0, len(b)))
        b[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "overwrite":
        i = data.draw(st.integers(0, len(b) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=32))
        b[i:i + len(chunk)] = chunk
    else:                       # rewrite the header length prefix with something arbitrary
        b[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    bad = str(tmp_path_factory.mktemp("m") / ("home" + SUFFIX))   # its own name: only the
                                                                     # mutation can be refused
    with open(bad, "wb") as f:
        f.write(bytes(b))
    try:
        _, raw = read_capsule(bad, rt.arena, store.fingerprint, store.weights)
    except FlashRTError as e:
        assert str(e)
    else:
        assert torch.equal(raw, original), f"a {kind} mutation was accepted with different bytes"


names = st.one_of(st.text(max_size=40), st.sampled_from(["", ".", "..", "../x", "a/b", "/etc/passwd",
                                                         "ok", "home", "x" * 129, "nul\0", "ä"]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["snapshot", "restore", "fork", "delete", "load", "save", "move"]),
       name=names, other=names, tier=st.sampled_from(["", "gpu", "host", "disk", "tape", "../x"]))
def test_store_api_with_random_requests(tmp_path_factory, op, name, other, tier):
    rt = _runtime()
    store = CapsuleStore(rt, StoreConfig(capsule_dir=str(tmp_path_factory.mktemp("api"))))
    rt.step(np.ones(14, np.float32))
    store.snapshot("home")
    before = rt.live_state().clone(), {n: (c.tier, c.step) for n, c in store.capsules.items()}
    calls = {"snapshot": lambda: store.snapshot(name, tier=tier or None),
             "restore": lambda: store.restore(name),
             "fork": lambda: store.fork(other if other != "home" else "home", name, tier=tier or None),
             "delete": lambda: store.delete(name), "load": lambda: store.load(name, tier=tier or None),
             "save": lambda: store.save(name), "move": lambda: store.move(name, tier)}
    try:
        calls[op]()
    except FlashRTError as e:
        assert str(e)
        assert torch.equal(rt.live_state(), before[0])
        assert {n: (c.tier, c.step) for n, c in store.capsules.items()} == before[1]
    for f in os.listdir(store.cfg.capsule_dir):   # nothing escaped or half-written
        assert f.endswith(SUFFIX) and not f.startswith(".")
