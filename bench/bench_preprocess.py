"""Camera frames into the policy's image buffers: the per-frame cost of `prepare_frame`.

For each frame size (default 640x480 and 1280x720) and 1-3 cameras, a call prepares every camera's
uint8 [H, W, 3] frame into its [3, S, S] float32 buffer (S = 512, SmolVLA's published size):
LeRobot's /255, bilinear resize to fit, pad left and top, * 2 - 1 (flashrt_ros/inputs/preprocess.py).

  * CPU (`--device cpu`): the torch path, the one that runs there; host clock per call and the
    calling thread's CPU time (on a shared machine the wall clock also counts other processes'
    turns), torch on `--threads` threads.
  * CUDA (`--device cuda`): the CuPy kernel and the torch CUDA path side by side, each from a host
    frame (numpy, as a message gives it: the upload is part of the call) and from a frame already on
    the device (nvjpeg's output, say); CUDA events around each call, calls queued back to back
    (device time), and the host clock of a call ending in torch.cuda.synchronize() (what a caller
    waits for). The kernel's largest difference from the torch path is recorded beside.

Not a test: numbers go to <out>.json and <out>.md (default docs/bench/preprocess-<device>) and
the table is printed.

    python bench/bench_preprocess.py                  # CPU, about a minute
    python bench/bench_preprocess.py --device cuda    # the kernel and torch's CUDA path
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

if __package__ in (None, ""):      # `python bench/bench_preprocess.py` from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (cuda_event_ms, device_slug, environment,  # noqa: E402
                          shared_machine_note, summary, thread_cpu_ms, wall_ms, write_report)
from flashrt_ros.core.config import resolve_device  # noqa: E402
from flashrt_ros.inputs import preprocess  # noqa: E402

MEASURED_CODE = ("flashrt_ros/inputs", "flashrt_ros/core/models/smolvla/processor_smolvla.py",
                 "bench")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--frames", default="640x480,1280x720",
                   help="frame sizes WxH, comma separated (default 640x480,1280x720)")
    p.add_argument("--cameras", default="1,2,3", help="camera counts (default 1,2,3)")
    p.add_argument("--size", type=int, default=512, help="the policy's image side S (default 512)")
    p.add_argument("--iters", type=int, default=None,
                   help="measured calls per figure (default 200 on CUDA, 30 on the CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    p.add_argument("--out", default=None,
                   help="output path stem, or a directory for the default file name; writes "
                        "<stem>.json and <stem>.md (default: docs/bench/preprocess-<device>)")
    return p.parse_args(argv)


def log(msg):
    print(f"[bench_preprocess {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def frame_sizes(text: str) -> list[tuple[int, int]]:
    """'640x480,1280x720' -> [(480, 640), (720, 1280)] as (height, width)."""
    out = []
    for item in text.split(","):
        w, h = (int(v) for v in item.lower().split("x"))
        out.append((h, w))
    return out


def calls(frames, buffers, prepare):
    def call():
        for f, b in zip(frames, buffers):
            prepare(f, b)
    return call


def bench_cpu(args, sizes, counts, iters) -> list[dict]:
    rows = []
    for h, w in sizes:
        for n in counts:
            rng = np.random.RandomState(n)
            frames = [rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8) for _ in range(n)]
            buffers = torch.zeros(n, 3, args.size, args.size)
            fn = calls(frames, buffers, preprocess.prepare_frame)
            row = {"frame": f"{w}x{h}", "cameras": n, "path": preprocess.prepare_path(
                frames[0], buffers[0]), "wall_ms": summary(wall_ms(fn, iters, 3, sync=False)),
                "cpu_ms": summary(thread_cpu_ms(fn, iters, 3))}
            rows.append(row)
            log(f"{w}x{h} x{n}: wall p50 {row['wall_ms']['p50']:.2f} ms, thread CPU p50 "
                f"{row['cpu_ms']['p50']:.2f} ms")
    return rows


def bench_cuda(args, device, sizes, counts, iters) -> list[dict]:
    rows = []
    kernel = preprocess._cuda_kernel() is not None
    paths = {"torch": preprocess.prepare_frame_reference}
    if kernel:
        paths = {"cuda-kernel": preprocess.prepare_frame_cuda, **paths}
    else:
        log("CuPy does not import: only the torch path is measured")
    for h, w in sizes:
        for n in counts:
            rng = np.random.RandomState(n)
            host = [rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8) for _ in range(n)]
            on_device = [torch.from_numpy(f).to(device) for f in host]
            buffers = torch.zeros(n, 3, args.size, args.size, device=device)
            diff = None
            if kernel:
                a, b = torch.zeros_like(buffers[0]), torch.zeros_like(buffers[0])
                preprocess.prepare_frame_cuda(host[0], a)
                preprocess.prepare_frame_reference(host[0], b)
                diff = float((a - b).abs().max())
            for path, prepare in paths.items():
                for source, frames in (("host", host), ("device", on_device)):
                    fn = calls(frames, buffers, prepare)
                    row = {"frame": f"{w}x{h}", "cameras": n, "path": path, "source": source,
                           "events_ms": summary(cuda_event_ms(fn, iters, 5)),
                           "wall_ms": summary(wall_ms(fn, iters, 5, sync=True)),
                           "max_abs_diff_to_torch": diff}
                    rows.append(row)
                    log(f"{w}x{h} x{n} {path:11s} {source:6s}: events p50 "
                        f"{row['events_ms']['p50']:.3f} ms, wall p50 {row['wall_ms']['p50']:.3f} ms")
    return rows


def report(env, results, out):
    cuda = "gpu" in env
    s = results["size"]
    common = (f"Each call prepares every camera's uint8 [H, W, 3] frame into its own float32 "
              f"[3, {s}, {s}] buffer: /255, bilinear resize to fit, pad left and top, * 2 - 1. "
              f"Per frame = per call / cameras.")
    if not cuda:
        rows = [[r["frame"], r["cameras"], r["path"], r["wall_ms"]["p50"], r["wall_ms"]["p99"],
                 r["cpu_ms"]["p50"], r["cpu_ms"]["p50"] / r["cameras"]] for r in results["rows"]]
        notes = [common, f"torch on {env['torch_threads']} thread(s); {results['iters']} calls "
                 f"per row after 3 warm-up calls. Thread CPU time counts the call's own work."]
        shared = shared_machine_note(env)
        if shared:
            notes.append(shared)
        sections = [{"heading": "prepare_frame on the CPU (ms)",
                     "columns": ["frame", "cameras", "path", "wall p50", "wall p99",
                                 "thread CPU p50", "thread CPU p50 per frame"],
                     "rows": rows, "notes": notes}]
    else:
        rows = []
        for r in results["rows"]:
            diff = r["max_abs_diff_to_torch"]
            rows.append([r["frame"], r["cameras"], r["path"], r["source"], r["events_ms"]["p50"],
                         r["events_ms"]["p50"] / r["cameras"], r["wall_ms"]["p50"],
                         r["wall_ms"]["p99"], "" if diff is None else f"{diff:.2g}"])
        notes = [common,
                 "source host: a numpy frame, as a message gives it (the upload of its uint8 bytes "
                 "is part of the call); device: a uint8 CUDA tensor (a decoder's output). CUDA "
                 "events: device time per call, calls queued back to back; wall: host clock of a "
                 f"call ending in torch.cuda.synchronize(). {results['iters']} calls per row. "
                 "max |diff|: the kernel against the torch path on the same frame."]
        sections = [{"heading": "prepare_frame on CUDA: CuPy kernel vs torch (ms)",
                     "columns": ["frame", "cameras", "path", "source", "events p50",
                                 "events p50 per frame", "wall p50", "wall p99", "max |diff|"],
                     "rows": rows, "notes": notes}]
    title = f"Camera frame preparation on {env.get('gpu', 'the CPU')}"
    return write_report(out, title, env, sections, results)


def cupy_version() -> str:
    try:
        import cupy
        return cupy.__version__
    except ImportError:
        return "not installed"


def out_stem(args, env) -> str:
    name = f"preprocess-{device_slug(env)}"
    if args.out is None:
        return os.path.join("docs", "bench", name)
    if args.out.endswith(os.sep) or os.path.isdir(args.out):
        return os.path.join(args.out, name)
    return args.out


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    iters = args.iters or (200 if cuda else 30)
    sizes, counts = frame_sizes(args.frames), [int(n) for n in args.cameras.split(",")]
    t0 = time.perf_counter()
    rows = bench_cuda(args, device, sizes, counts, iters) if cuda else \
        bench_cpu(args, sizes, counts, iters)
    env = environment(device, code=MEASURED_CODE)
    env.update(cupy=cupy_version())
    results = {"size": args.size, "iters": iters, "rows": rows}
    md, js = report(env, results, out_stem(args, env))
    log(f"done in {time.perf_counter() - t0:.0f} s: wrote {md} and {js}")
    with open(md, encoding="utf-8") as f:
        print(f.read())


if __name__ == "__main__":
    main()
