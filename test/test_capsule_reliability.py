"""The capsule layer's reliability promises (issue 17): identity, sealed headers, regular files,
eviction that a failed write never costs, temp files that are the store's own, the default tier;
and files outside the store's control (issue 28): files that disappear, two stores on one
directory, deletes that fail, filesystem errors, headers nested too deep to parse.

Store checks drive CapsuleStore and PagedCapsuleStore directly; node checks call the callbacks a
configured PolicyNode registered (real rclpy, in-process) and serialise every answer as rclpy would
send it. Every refusal is checked to change nothing: the live bytes, the counters and the index.
"""
import contextlib
import errno
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import flashrt_ros.capsules.file as capsule_file
from flashrt_ros.capsules.file import SUFFIX, capsule_path, read_header
from flashrt_ros.capsules.store import make_store
from flashrt_ros.core.config import RuntimeConfig, StoreConfig, load_preset
from flashrt_ros.core.exceptions import (BudgetExceeded, CapsuleConflict, CapsuleCorrupt,
                                         CapsuleNotFound, ConfigError, FlashRTError, StorageError)
from flashrt_ros.core.runtime import PolicyRuntime
from node_client import call_service as call, configured_node

STORES = ["flat", "paged"]
HERE = os.path.dirname(os.path.abspath(__file__))


def _runtime(seed: int = 0):
    import dataclasses
    rt = PolicyRuntime(dataclasses.replace(load_preset("tiny"), seed=seed),
                       RuntimeConfig(device="cpu"))
    rt.set_instruction("reliable capsules")
    for i in range(3):
        rt.step(np.full(14, 0.1 * i, np.float32))
    return rt


def _store(rt, tmp_path, kind="flat", **cfg):
    cfg.setdefault("capsule_dir", str(tmp_path / "caps"))
    return make_store(rt, StoreConfig(paged=kind == "paged", **cfg))


def _state(rt, store):
    """Everything a refusal must leave as it was: live bytes, counters, index, files."""
    d = store.cfg.capsule_dir
    files = {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))
             if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))}
    return (bytes(rt.live_state().numpy()), (rt.step_count, rt.position, rt.episode),
            {n: (c.name, c.tier, c.step, c.position, c.episode, c.pinned, c.nbytes)
             for n, c in store.capsules.items()}, files)


def refused(rt, store, call, exc=FlashRTError) -> str:
    """The message of `call()`'s refusal, which must leave everything as it was."""
    before = _state(rt, store)
    with pytest.raises(exc) as info:
        call()
    assert _state(rt, store) == before
    return str(info.value)


def rewrite_header(src: str, dst: str, **changes) -> None:
    """Copy a capsule file with some header fields replaced (tensors kept), as a text editor or
    another tool would: safetensors writes it, with its own tensor order."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, dst, metadata=meta)


def _identity_holds(store):
    """Every index entry is named by its key, and a capsule's file is <its name>.capsule."""
    for key, cap in store.capsules.items():
        assert cap.name == key, (key, cap.name)
        if cap.path:
            assert cap.path == capsule_path(store.cfg.capsule_dir, key), (key, cap.path)


# -- row 1: the file name is the capsule's identity ------------------------------------------
@pytest.mark.parametrize("kind", STORES)
def test_a_copied_capsule_file_is_refused_not_loaded_under_the_other_name(tmp_path, kind):
    rt = _runtime()
    store = _store(rt, tmp_path, kind)
    store.snapshot("base", tier="disk")
    rt.step(np.ones(14, np.float32))
    d = store.cfg.capsule_dir
    shutil.copy(capsule_path(d, "base"), capsule_path(d, "copyb"))
    store = _store(rt, tmp_path, kind)                 # at start: indexed by file name
    assert sorted(store.capsules) == ["base"]
    assert any(s.startswith("copyb" + SUFFIX) and "'base'" in s for s in store.skipped_files)
    msg = refused(rt, store, lambda: store.load("copyb"))
    assert "'copyb'" in msg and "'base'" in msg and "expected" in msg, msg
    for call in (lambda: store.restore("copyb"), lambda: store.delete("copyb")):
        refused(rt, store, call, CapsuleNotFound)
    _identity_holds(store)
    store.load("base")
    _identity_holds(store)
    store.delete("base")
    assert not os.path.exists(capsule_path(d, "base"))
    with pytest.raises(CapsuleNotFound):               # never a KeyError, never a file removed
        store.delete("copyb")
    assert os.path.exists(capsule_path(d, "copyb"))


@pytest.mark.ros
def test_a_copied_capsule_file_through_the_node(tmp_path):
    pytest.importorskip("rclpy")
    with configured_node("/identity", tmp_path / "caps") as n:
        assert call(n, "snapshot", name="base", tier="disk").success
        d = n.store.cfg.capsule_dir
        shutil.copy(capsule_path(d, "base"), capsule_path(d, "copyb"))
        before = _state(n.runtime, n.store)
        res = call(n, "load_capsule", name="copyb", restore=True)
        assert not res.success and "'base'" in res.message, res.message
        names = [c.name for c in call(n, "list_capsules").capsules]
        assert names == ["base"], names
        assert not call(n, "delete_capsule", name="copyb").success
        assert not call(n, "restore", name="copyb").success
        assert _state(n.runtime, n.store) == before
        assert os.path.exists(capsule_path(d, "base"))


# -- row 4: the header is sealed, the fingerprint is the runtime's ---------------------------
EDITS = [("step", "7"), ("episode", "3"), ("pinned", "1"), ("created", "12345.5"),
         ("parent", "elsewhere"), ("position", "1")]


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("key,value", EDITS)
def test_an_edited_header_field_is_refused(tmp_path, kind, key, value):
    rt = _runtime()
    store = _store(rt, tmp_path, kind)
    store.snapshot("base", tier="disk")
    rt.step(np.ones(14, np.float32))
    path = capsule_path(store.cfg.capsule_dir, "base")
    assert read_header(path)[key] != value
    rewrite_header(path, path, **{key: value})
    store = _store(rt, tmp_path, kind)
    assert "base" not in store.capsules, "an edited header was indexed"
    assert any(s.startswith("base" + SUFFIX) for s in store.skipped_files)
    msg = refused(rt, store, lambda: store.load("base"))
    assert "edited" in msg or "damaged" in msg, msg


def test_a_capsule_of_other_weights_is_refused_even_with_its_fingerprint_edited(tmp_path):
    here, other = _runtime(seed=0), _runtime(seed=1)
    store = _store(here, tmp_path)
    theirs = _store(other, tmp_path, capsule_dir=str(tmp_path / "theirs"))
    assert theirs.fingerprint != store.fingerprint
    theirs.snapshot("foreign", tier="disk")
    src, dst = capsule_path(theirs.cfg.capsule_dir, "foreign"), capsule_path(store.cfg.capsule_dir, "foreign")
    ours = {"fingerprint": store.fingerprint}
    if "weights" in read_header(src):
        ours["weights"] = here.model.weights_digest
    rewrite_header(src, dst, **ours)
    store.rebuild_index()
    assert "expected" in refused(here, store, lambda: store.load("foreign"))


def test_a_file_of_the_old_format_is_refused_with_a_clear_message(tmp_path):
    from flashrt_ros.capsules.file import FORMAT_VERSION
    rt = _runtime()
    store = _store(rt, tmp_path)
    store.snapshot("base", tier="disk")
    path = capsule_path(store.cfg.capsule_dir, "base")
    assert FORMAT_VERSION >= 2
    rewrite_header(path, path, format_version="1")
    store.rebuild_index()
    msg = refused(rt, store, lambda: store.load("base"))
    assert "format version" in msg and "'1'" in msg and "re-create" in msg, msg


# -- row 5: only regular files, never through a link, never blocking -------------------------
FIFO_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {here!r})
    from node_client import configured_node
    d = sys.argv[1]
    with configured_node("/fifo", d) as n:       # configure indexes the directory
        assert "x" not in n.store.capsules, sorted(n.store.capsules)
        cb = {{s.srv_name.rsplit("/", 1)[-1]: s for s in n.capsule_services}}
        s = cb["load_capsule"]
        res = s.callback(s.srv_type.Request(name="x", restore=True), s.srv_type.Response())
        assert not res.success and "regular file" in res.message, res.message
        s = cb["list_capsules"]
        assert s.callback(s.srv_type.Request(), s.srv_type.Response()).success
    print("answered")
""")


@pytest.mark.ros
def test_a_fifo_named_like_a_capsule_never_freezes_the_node(tmp_path):
    """A FIFO in the capsule directory at configure and on load: refused at once (a child
    process, so that a regression freezes it and not the test run)."""
    pytest.importorskip("rclpy")
    d = tmp_path / "caps"
    d.mkdir()
    os.mkfifo(d / ("x" + SUFFIX))
    script = tmp_path / "fifo.py"
    script.write_text(FIFO_SCRIPT.format(here=HERE))
    try:     # a freeze lasts forever; a busy CI machine starts a node in well under 200 s
        out = subprocess.run([sys.executable, str(script), str(d)], capture_output=True,
                             text=True, timeout=200)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the node froze on a FIFO named x.capsule: {(e.stderr or b'')[-2000:]!r}")
    assert out.returncode == 0 and "answered" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


@pytest.mark.parametrize("kind", STORES)
def test_a_symlink_in_the_capsule_dir_is_never_followed(tmp_path, kind):
    rt = _runtime()
    outside = _store(rt, tmp_path, kind, capsule_dir=str(tmp_path / "outside"))
    outside.snapshot("out", tier="disk")
    store = _store(rt, tmp_path, kind)
    os.symlink(capsule_path(outside.cfg.capsule_dir, "out"), capsule_path(store.cfg.capsule_dir, "out"))
    store.rebuild_index()
    assert "out" not in store.capsules
    assert any(s.startswith("out" + SUFFIX) and "link" in s for s in store.skipped_files)
    assert "link" in refused(rt, store, lambda: store.load("out"))


# -- row 10: an eviction is never paid for by a failed write ---------------------------------
class FullDisk:
    """ENOSPC from fsync of the store's temp files while `full` (where a full disk shows on
    delayed-allocation filesystems); every other fsync as it is."""

    def __init__(self, monkeypatch):
        self.full, real = False, os.fsync

        def fsync(fd):
            if self.full and ".tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd)
        monkeypatch.setattr(os, "fsync", fsync)


@pytest.fixture
def disk(monkeypatch):
    return FullDisk(monkeypatch)


def _room_for_one_file(rt, tmp_path, kind):
    """A store whose disk budget holds one capsule file, not two."""
    probe = _store(rt, tmp_path, kind, capsule_dir=str(tmp_path / "probe"))
    probe.snapshot("p", tier="disk")
    size = os.path.getsize(capsule_path(probe.cfg.capsule_dir, "p"))
    return _store(rt, tmp_path, kind, disk_budget_mb=1.5 * size / 2**20)


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("how", ["save", "disk-snapshot", "demote"])
def test_a_failed_write_that_needed_an_eviction_evicts_nothing(tmp_path, kind, how, disk):
    rt = _runtime()
    store = _room_for_one_file(rt, tmp_path, kind)
    store.snapshot("old", tier="disk")
    rt.step(np.ones(14, np.float32))
    if how != "disk-snapshot":
        store.snapshot("new", tier="host")
    write = {"save": lambda: store.save("new"), "demote": lambda: store.move("new", "disk"),
             "disk-snapshot": lambda: store.snapshot("new", tier="disk")}[how]
    disk.full = True
    msg = refused(rt, store, write, BudgetExceeded)
    disk.full = False
    assert "ENOSPC" in msg and "expected" in msg and "found" in msg and "nothing" in msg, msg
    store.load("old")                              # whole and verified


@pytest.mark.ros
def test_a_full_disk_answers_what_to_do_through_the_node(tmp_path, disk):
    pytest.importorskip("rclpy")
    with configured_node("/enospc", tmp_path / "caps") as n:
        assert call(n, "snapshot", name="home", tier="host").success
        before = _state(n.runtime, n.store)
        disk.full = True
        res = call(n, "save_capsule", name="home")
        assert not res.success and "ENOSPC" in res.message and "internal error" not in res.message
        assert "expected" in res.message and "found" in res.message, res.message
        assert _state(n.runtime, n.store) == before


# -- row 13: temp files at start are the store's own ------------------------------------------
@pytest.mark.parametrize("kind", STORES)
def test_start_removes_only_the_stores_own_temp_files(tmp_path, kind):
    rt = _runtime()
    store = _store(rt, tmp_path, kind)
    store.snapshot("base", tier="disk")
    d = store.cfg.capsule_dir
    os.mkdir(os.path.join(d, ".x.capsule.tmp-abc"))
    with open(os.path.join(d, ".notes.txt.tmp-mine"), "w") as f:
        f.write("a user's notes")
    os.symlink(capsule_path(d, "base"), os.path.join(d, ".y.capsule.tmp-0123456789abcdef"))
    own = capsule_file.temp_path(capsule_path(d, "crashed"))   # a write killed before its rename
    with open(own, "wb") as f:
        f.write(b"half a capsule")
    store = _store(rt, tmp_path, kind)
    left = sorted(os.listdir(d))
    assert ".notes.txt.tmp-mine" in left and ".x.capsule.tmp-abc" in left
    assert ".y.capsule.tmp-0123456789abcdef" in left and os.path.basename(own) not in left, left
    assert sorted(store.capsules) == ["base"]


@pytest.mark.ros
def test_a_directory_named_like_a_temp_file_does_not_fail_configure(tmp_path):
    pytest.importorskip("rclpy")
    d = tmp_path / "caps"
    d.mkdir()
    (d / ".x.capsule.tmp-abc").mkdir()
    (d / ".notes.txt.tmp-mine").write_text("a user's notes")
    with configured_node("/temps", d) as n:
        assert n.store is not None
    assert (d / ".notes.txt.tmp-mine").read_text() == "a user's notes"
    assert (d / ".x.capsule.tmp-abc").is_dir()


# -- the lineage names a stored capsule -------------------------------------------------------
@pytest.mark.parametrize("kind", STORES)
def test_evicting_the_lineage_capsule_clears_the_lineage(tmp_path, kind):
    rt = _runtime()
    probe = _store(rt, tmp_path, kind, capsule_dir=str(tmp_path / "probe"))
    probe.snapshot("p", tier="host")
    room = 2.5 * probe.capsules["p"].nbytes / 2**20     # two capsules, not three
    store = _store(rt, tmp_path, kind, host_budget_mb=room, eviction="drop")
    store.snapshot("a", tier="host")
    store.restore("a")
    assert store.lineage == "a"
    for name in ("b", "c"):
        rt.step(np.ones(14, np.float32))
        store.snapshot(name, tier="host")
    assert "a" not in store.capsules
    assert store.lineage in ("", *store.capsules), store.lineage


# -- also seen: a default tier the runtime does not have -------------------------------------
def test_a_gpu_default_tier_on_a_cpu_runtime_is_refused_when_the_store_is_made(tmp_path):
    rt = _runtime()
    with pytest.raises(ConfigError) as info:
        _store(rt, tmp_path, default_tier="gpu")
    msg = str(info.value)
    assert "store.default_tier" in msg and "CUDA" in msg and "host" in msg, msg


@pytest.mark.ros
def test_a_gpu_default_tier_on_a_cpu_runtime_fails_configure(tmp_path, capfd):
    pytest.importorskip("rclpy")
    import rclpy
    from rclpy.parameter import Parameter

    from flashrt_ros.ros.node import PolicyNode
    context = rclpy.Context()
    rclpy.init(context=context)
    params = {"managed": True, "runtime.device": "cpu", "store.default_tier": "gpu",
              "store.capsule_dir": str(tmp_path / "caps")}
    n = PolicyNode(context=context, namespace="/gpu_default",
                   parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    try:
        n.trigger_configure()
        assert n.runtime is None and n.store is None
        err = capfd.readouterr().err
        assert "store.default_tier" in err and "CUDA" in err, err[-2000:]
    finally:
        n.destroy_node()
        rclpy.try_shutdown(context=context)



# -- issue 28: files outside the store's control ----------------------------------------------
def vanish_after_first_look(monkeypatch, path: str) -> None:
    """Another process removes `path` right after the first os.stat of it (which os.path.exists
    and os.path.getsize both call): the race of a status publish with a rename or delete."""
    real = os.stat

    def stat(p, *args, **kwargs):
        st = real(p, *args, **kwargs)
        if os.fspath(p) == path and os.path.lexists(path):
            os.unlink(path)
        return st
    monkeypatch.setattr(os, "stat", stat)


@contextlib.contextmanager
def read_only(path):
    """`path` (a file or a directory) read-only, also for root: the immutable attribute
    (chattr +i; nothing creates, renames or removes entries of an immutable directory, nor an
    immutable file); a user who is not root gets chmod. Skips where neither can be set."""
    path = str(path)
    if os.geteuid() != 0:
        mode = os.stat(path).st_mode
        os.chmod(path, 0o555 if os.path.isdir(path) else 0o444)
        try:
            yield
        finally:
            os.chmod(path, mode)
        return
    got = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"root ignores permissions, and chattr +i failed on {path} "
                    f"({got.stderr.strip()}): no read-only file or directory to test with")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


@pytest.mark.parametrize("kind", STORES)
def test_the_disk_sum_survives_a_file_that_disappears(tmp_path, kind, monkeypatch):
    rt = _runtime()
    store = _store(rt, tmp_path, kind)
    store.snapshot("saved", tier="host")
    store.save("saved")
    store.snapshot("ondisk", tier="disk")
    path = capsule_path(store.cfg.capsule_dir, "saved")
    size, ondisk = os.path.getsize(path), store.capsules["ondisk"].nbytes
    vanish_after_first_look(monkeypatch, path)
    assert store.usage()["disk"]["used"] in (ondisk, ondisk + size)    # there, then gone
    assert not os.path.exists(path)
    assert store.usage()["disk"]["used"] == ondisk          # a file that went holds nothing


@pytest.mark.parametrize("kind", STORES)
def test_two_stores_on_one_directory_never_replace_each_others_files(tmp_path, kind):
    rt = _runtime()
    a, b = _store(rt, tmp_path, kind), _store(rt, tmp_path, kind)
    assert a.writer != b.writer
    a.snapshot("home", tier="host")
    a.save("home")
    a.snapshot("ondisk", tier="disk")
    rt.step(np.ones(14, np.float32))
    b.snapshot("home", tier="host")
    for call in (lambda: b.save("home"), lambda: b.move("home", "disk"),
                 lambda: b.snapshot("ondisk", tier="disk"),
                 lambda: b.fork("home", "ondisk", tier="disk")):
        msg = refused(rt, b, call, CapsuleConflict)
        assert a.writer in msg and "expected" in msg and "capsule_dir" in msg, msg
    ours = a.capsule_bytes("ondisk")
    a.delete("home")                 # a's own file, written by a: its to delete
    assert not os.path.exists(capsule_path(a.cfg.capsule_dir, "home"))
    assert torch.equal(a.capsule_bytes("ondisk"), ours)


@pytest.mark.parametrize("kind", STORES)
def test_a_file_replaced_under_the_store_is_refused_before_it_is_used(tmp_path, kind):
    """Another writer (a copy by hand, an older version that overwrote) replaced the store's
    files: nothing is restored, loaded, forked, promoted, dropped or deleted from them."""
    rt = _runtime()
    store = _store(rt, tmp_path, kind)
    other = _store(rt, tmp_path, kind, capsule_dir=str(tmp_path / "other"))
    store.snapshot("home", tier="disk")
    store.snapshot("kept", tier="host")
    store.save("kept")
    rt.step(np.ones(14, np.float32))
    for name in ("home", "kept"):
        other.snapshot(name, tier="disk")
        os.replace(shutil.copy(capsule_path(other.cfg.capsule_dir, name), tmp_path / "x"),
                   capsule_path(store.cfg.capsule_dir, name))
    for call in (lambda: store.restore("home"), lambda: store.load("home"),
                 lambda: store.fork("home", "branch"), lambda: store.move("home", "host"),
                 lambda: store.verify("home"), lambda: store.delete("home"),
                 lambda: store.move("kept", "disk"), lambda: store.save("kept"),
                 lambda: store.delete("kept")):
        msg = refused(rt, store, call, CapsuleConflict)
        assert other.writer in msg and "expected" in msg, msg
    store.restore("kept")            # the memory copy is the store's own
    assert store.lineage == "kept"


@pytest.mark.parametrize("kind", STORES)
def test_a_delete_that_fails_changes_nothing(tmp_path, kind):
    """A file that cannot be removed (immutable: root-proof) - a saved capsule, a disk capsule,
    a spill: the delete is refused with what to do, the index entry and memory copy stay."""
    rt = _runtime()
    probe = _store(rt, tmp_path, kind, capsule_dir=str(tmp_path / "probe"))
    probe.snapshot("p", tier="host")
    store = _store(rt, tmp_path, kind, host_budget_mb=1.5 * probe.capsules["p"].nbytes / 2**20)
    store.snapshot("saved", tier="host")
    store.save("saved")
    store.snapshot("ondisk", tier="disk")
    store.snapshot("spilled", tier="host")
    rt.step(np.ones(14, np.float32))                     # 'spilled' evicted 'saved' to its file
    store.snapshot("pushes", tier="host")                # evicts 'spilled' to a spill
    assert store.capsules["spilled"].file == "spill", store.capsules["spilled"]
    store.move("saved", "host")
    d = store.cfg.capsule_dir
    for name, call in (("saved", lambda: store.delete("saved")),
                       ("ondisk", lambda: store.delete("ondisk")),
                       ("spilled", lambda: store.delete("spilled")),
                       ("spilled", lambda: store.move("spilled", "host"))):
        with read_only(capsule_path(d, name)):
            msg = refused(rt, store, call, StorageError)
        assert "expected" in msg and "found" in msg and "nothing was changed" in msg, msg
    for name in ("saved", "ondisk", "spilled"):
        store.delete(name)
        assert not os.path.exists(capsule_path(d, name))


@pytest.mark.parametrize("kind", STORES)
def test_a_disk_eviction_that_cannot_remove_its_victim_evicts_nothing(tmp_path, kind):
    rt = _runtime()
    store = _room_for_one_file(rt, tmp_path, kind)
    store.snapshot("old", tier="disk")
    rt.step(np.ones(14, np.float32))
    store.snapshot("new", tier="host")
    with read_only(capsule_path(store.cfg.capsule_dir, "old")):
        for call in (lambda: store.save("new"), lambda: store.snapshot("new2", tier="disk")):
            msg = refused(rt, store, call, StorageError)
            assert "expected" in msg and "nothing was changed" in msg, msg
    store.save("new")
    assert "old" not in store.capsules
    assert not os.path.exists(capsule_path(store.cfg.capsule_dir, "old"))


@pytest.mark.parametrize("kind", STORES)
def test_a_read_only_capsule_directory_answers_what_to_do(tmp_path, kind):
    rt = _runtime()
    store = _store(rt, tmp_path, kind)
    store.snapshot("home", tier="host")
    store.snapshot("ondisk", tier="disk")
    with read_only(store.cfg.capsule_dir):
        for call in (lambda: store.save("home"), lambda: store.snapshot("d", tier="disk"),
                     lambda: store.move("home", "disk"), lambda: store.delete("ondisk"),
                     lambda: store.fork("home", "f", tier="disk")):
            msg = refused(rt, store, call, StorageError)
            assert "writable" in msg and "expected" in msg and "found" in msg, msg
        store.restore("ondisk")                      # reading goes on


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("how", ["removed", "a file"])
def test_a_capsule_directory_gone_while_running_answers_what_to_do(tmp_path, kind, how):
    rt = _runtime()
    store = _store(rt, tmp_path, kind)
    store.snapshot("home", tier="host")
    d = store.cfg.capsule_dir
    shutil.rmtree(d)
    if how == "a file":
        with open(d, "w") as f:
            f.write("not a directory")
    index = {n: c.tier for n, c in store.capsules.items()}
    for call in (lambda: store.save("home"), lambda: store.snapshot("d", tier="disk"),
                 lambda: store.move("home", "disk")):
        with pytest.raises(StorageError) as info:
            call()
        msg = str(info.value)
        assert d in msg and "expected" in msg and "found" in msg and "capsule_dir" in msg, msg
        assert {n: c.tier for n, c in store.capsules.items()} == index
    assert store.usage()["disk"]["used"] == 0 and [c.name for c in store.list()] == ["home"]
    store.restore("home")
    if how == "a file":          # a new store there: refused at construction, with what to do
        with pytest.raises(StorageError) as info:
            _store(rt, tmp_path, kind)
        assert "expected a directory" in str(info.value), info.value


def test_a_deeply_nested_header_is_refused_as_malformed(tmp_path):
    rt = _runtime()
    store = _store(rt, tmp_path)
    text = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    path = capsule_path(store.cfg.capsule_dir, "deep")
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
    store.rebuild_index()
    assert "deep" not in store.capsules
    assert any(s.startswith("deep" + SUFFIX) and "JSON" in s for s in store.skipped_files)
    msg = refused(rt, store, lambda: store.load("deep"), CapsuleCorrupt)
    assert "expected" in msg and "nested" in msg, msg
