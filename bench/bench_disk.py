"""Disk capsules at storage speed: save and load MB/s of one capsule, beside what the disk and
the hash do alone, in the same run.

    python bench/bench_disk.py                              # 221 MB capsule, CPU, in ./.bench-disk
    python bench/bench_disk.py --mb 221 --device cuda --dir /data/capsules --out docs/bench

Rows (each the median of --repeat runs, MB = 10^6 bytes of the file):
  dd write        `dd if=/dev/zero of=F bs=4M count=N conv=fsync`: the disk's sequential write
                  with one fsync, as the capsule write ends;
  dd read         `dd if=F of=/dev/null bs=4M` after the file's pages were dropped from the page
                  cache (posix_fadvise DONTNEED), and again with `iflag=direct` (O_DIRECT);
  BLAKE2b, 1 thr  one hashlib.blake2b pass over the capsule's bytes (the version-1 digest);
  tree digest     digest.py's BLAKE2b tree over the same bytes on every core;
  safetensors     safetensors.torch.save_file + fsync (a serialised copy, no digest);
  save            CapsuleStore.save of a host-tier capsule: header, streamed tensor bytes hashed
                  in threads, fsync, rename, directory fsync;
  load            CapsuleStore.load of the file into the host tier, pages dropped first: large
                  sequential reads (into pinned memory on CUDA) hashed in threads, verified before
                  the bytes are used; restore from disk as well (read, verify, copy into the state).
The capsule is the tiny preset's state with a context long enough for --mb of state, its bytes
drawn at random (the disk and the digest do not care what they hold). Dropping the page cache
with posix_fadvise needs no privileges; a filesystem that ignores it reads from memory, which the
dd read row then shows.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, markdown_table, package_version, write_report  # noqa: E402
from flashrt_ros.capsules.capsule import content_digest  # noqa: E402
from flashrt_ros.capsules.file import capsule_path  # noqa: E402
from flashrt_ros.capsules.store import CapsuleStore  # noqa: E402
from flashrt_ros.core.arena import META_EPISODE, META_POSITION, META_STEP  # noqa: E402
from flashrt_ros.core.config import RuntimeConfig, StoreConfig, load_preset  # noqa: E402
from flashrt_ros.core.runtime import PolicyRuntime  # noqa: E402


def drop_cache(path: str) -> None:
    """Evict a file's clean pages from the page cache (the next read comes from the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn, repeat: int, before=None) -> list[float]:
    """Seconds per call of fn(), `before()` run untimed ahead of each."""
    out = []
    for _ in range(repeat):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def synthetic_runtime(mb: float, device: str) -> PolicyRuntime:
    """The tiny preset with a context long enough that its live state is `mb` MB, holding random
    bytes at that position (as a restore would put them there)."""
    tiny = load_preset("tiny")
    probe = PolicyRuntime(tiny, RuntimeConfig(device="cpu"))
    rows = max(1, int((mb * 1e6 - probe.arena.small_nbytes) // probe.arena.kv_row_nbytes))
    rt = PolicyRuntime(dataclasses.replace(tiny, max_context=rows + 2),
                       RuntimeConfig(device=device, cuda_graphs=False))
    raw = torch.randint(0, 256, (rt.arena.live_nbytes(rows),), dtype=torch.uint8)
    meta = raw[rt.arena.specs["meta"].offset:][:rt.arena.specs["meta"].nbytes].view(torch.int64)
    meta.zero_()
    meta[META_POSITION], meta[META_STEP], meta[META_EPISODE] = rows, 1, 1
    rt.restore_state(raw.to(rt.device))
    return rt


def dd(*args) -> None:
    subprocess.run(["dd", *args, "status=none"], check=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=221.0, help="capsule size in MB (default 221)")
    ap.add_argument("--device", default="cpu", help="runtime device: cpu or cuda (default cpu)")
    ap.add_argument("--dir", default=os.path.join(os.getcwd(), ".bench-disk"),
                    help="directory on the disk to measure (created, emptied at the end)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per row (default 5)")
    ap.add_argument("--out", default="", help="write <out>/disk-<tag>.md and .json")
    ap.add_argument("--tag", default="", help="report name (default: the device kind)")
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    say = print if sys.stdout.isatty() else (lambda *a, **k: print(*a, **k, flush=True))

    say(f"building a {args.mb:g} MB capsule state on {args.device} ...")
    rt = synthetic_runtime(args.mb, args.device)
    store = CapsuleStore(rt, StoreConfig(capsule_dir=os.path.join(args.dir, "capsules"),
                                         host_budget_mb=4 * args.mb, gpu_budget_mb=64,
                                         disk_budget_mb=8 * args.mb, default_tier="host"))
    store.snapshot("bench", tier="host")
    path = capsule_path(store.cfg.capsule_dir, "bench")
    host = store.capsule_bytes("bench")
    env = environment(rt.device, code=("flashrt_ros/capsules", "bench/bench_disk.py"))
    env.update(safetensors=package_version("safetensors"), directory=args.dir,
               filesystem=subprocess.run(["stat", "-f", "-c", "%T", args.dir], capture_output=True,
                                         text=True).stdout.strip() or "unknown",
               hashing_threads=len(os.sched_getaffinity(0)))
    rows, results = [], {}

    def row(what, seconds, nbytes, note=""):
        s = statistics.median(seconds)
        results[what] = {"seconds": seconds, "bytes": nbytes}
        rows.append([what, round(s * 1e3, 1), round(min(seconds) * 1e3, 1),
                     round(nbytes / s / 1e6), note])
        say(f"  {what}: {s * 1e3:.1f} ms, {nbytes / s / 1e6:.0f} MB/s")

    def save():
        store.save("bench")

    def unsave():
        if os.path.exists(path):
            os.unlink(path)
            store.capsules["bench"].path = None

    save_s = timed(save, args.repeat, before=unsave)
    size = os.path.getsize(path)
    say(f"capsule file: {size / 1e6:.1f} MB in {args.dir} ({env['filesystem']})")

    blob = os.path.join(args.dir, "dd.bin")
    count = -(-size // (4 << 20))
    row("dd write (conv=fsync)", timed(lambda: dd("if=/dev/zero", f"of={blob}", "bs=4M",
                                                  f"count={count}", "conv=fsync"), args.repeat),
        count * (4 << 20))
    row("dd read (page cache dropped)", timed(lambda: dd(f"if={blob}", "of=/dev/null", "bs=4M"),
                                              args.repeat, before=lambda: drop_cache(blob)),
        count * (4 << 20))
    try:
        row("dd read (iflag=direct)", timed(lambda: dd(f"if={blob}", "of=/dev/null", "bs=4M",
                                                       "iflag=direct"), args.repeat),
            count * (4 << 20))
    except subprocess.CalledProcessError:
        rows.append(["dd read (iflag=direct)", "-", "-", "-", "O_DIRECT refused by this filesystem"])
    os.unlink(blob)

    data = host.numpy()
    row("BLAKE2b-256, one thread", timed(lambda: hashlib.blake2b(memoryview(data),
                                                                 digest_size=32).digest(),
                                         args.repeat), data.nbytes, "the version-1 digest")
    row(f"tree digest, {env['hashing_threads']} threads",
        timed(lambda: content_digest(rt.arena, host, rt.position), args.repeat), data.nbytes,
        "digest.py")

    from safetensors.torch import save_file
    st_path = os.path.join(args.dir, "plain.safetensors")
    tensors = {"state": host}

    def st_save():
        save_file(tensors, st_path)
        fd = os.open(st_path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    row("safetensors save_file + fsync", timed(st_save, args.repeat), os.path.getsize(st_path),
        "a serialised copy, no digest")
    os.unlink(st_path)

    row("capsule save (streamed, digest, fsync)", save_s, size, "CapsuleStore.save")

    def unload():
        store.move("bench", "disk")               # the saved file stays: a cold copy on disk
        drop_cache(path)
    row("capsule load (cache dropped, verified)", timed(lambda: store.load("bench", "host"),
                                                        args.repeat, before=unload),
        size, "CapsuleStore.load -> host tier")
    store.move("bench", "disk")
    row("capsule restore from disk (cache dropped)",
        timed(lambda: store.restore("bench"), args.repeat, before=lambda: drop_cache(path)),
        size, "read, verify, copy into the live state")
    assert content_digest(rt.arena, rt.live_state().cpu(), rt.position) == \
        content_digest(rt.arena, host, rt.position), "the restored state differs"

    say("")
    columns = ["what", "median ms", "best ms", "MB/s (median)", "note"]
    print(markdown_table(columns, rows))
    if args.out:
        tag = args.tag or (env.get("gpu", "cpu").lower().replace(" ", "-"))
        md, _ = write_report(os.path.join(args.out, f"disk-{tag}"),
                             f"Disk capsules: {size / 1e6:.0f} MB on {env['device']}", env,
                             [{"heading": "Save and load beside the disk and the hash",
                               "columns": columns, "rows": rows,
                               "notes": [f"{args.repeat} runs per row; MB = 10^6 bytes; "
                                         f"{env['hashing_threads']} hashing threads."]}],
                             results)
        say(f"wrote {md}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
