"""Shared pieces of the benchmarks: timing, percentiles, the environment record, report files.

Timing rules: every measured call is warmed up first; GPU work is timed either with CUDA events
around each call (device time, launch overhead hidden when calls queue back to back) or with a
host clock around a call that ends in `torch.cuda.synchronize()` (what a caller waits for). Each
table says which one it reports.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # git runs here


def summary(samples_ms) -> dict:
    """p50/p99/mean/min of a list of milliseconds."""
    x = np.asarray(samples_ms, dtype=np.float64)
    return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)),
            "mean": float(x.mean()), "min": float(x.min()), "n": int(x.size)}


def wall_ms(fn, iters: int, warmup: int, sync: bool) -> list[float]:
    """Host time per call; with sync=True each call ends with torch.cuda.synchronize()."""
    for _ in range(warmup):
        fn()
    if sync:
        torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def shared_machine_note(env) -> str:
    """A sentence for a table measured while other work ran (1-minute load average of one or more
    per two cores), else ''."""
    load, cores = env.get("load_average_1min", 0.0), os.cpu_count() or 1
    if load < cores / 2:
        return ""
    return (f"The machine was shared: load average {load} on {cores} logical cores while this "
            f"ran (other processes' work); wall-clock figures include their turns on the cores.")


def thread_cpu_ms(fn, iters: int, warmup: int) -> list[float]:
    """CPU time of the calling thread per call (CPU only): on a shared machine the wall clock also
    counts the time other processes hold the core; this counts only the call's own work (cache
    and SMT contention still slow it)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.thread_time()
        fn()
        out.append((time.thread_time() - t) * 1e3)
    return out


def cuda_event_ms(fn, iters: int, warmup: int) -> list[float]:
    """Device time per call from CUDA events recorded around each call, calls queued back to back."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def package_version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001 - not installed, or installed without metadata
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device, code: tuple = ()) -> dict:
    """Everything a reader needs to reproduce a table: machine, versions, date, command, commit.

    code: the paths whose uncommitted changes would make the commit hash a lie (default: all).
    """
    try:
        # a copy of a commit without its repository (a lent machine) names it in the environment
        # or in a COMMIT file beside bench/
        named = os.environ.get("FLASHRT_BENCH_COMMIT", "")
        commit_file = os.path.join(REPO, "COMMIT")
        if not named and os.path.isfile(commit_file):
            with open(commit_file, encoding="utf-8") as f:
                named = f.read().strip()
        commit = named or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True, timeout=5,
                                         cwd=REPO).stdout.strip() or "unknown"
        dirty = "" if named else subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *code],
            capture_output=True, text=True, timeout=5, cwd=REPO).stdout
        if dirty.strip():       # porcelain lines are "XY path": the path starts at column 3
            commit += " (uncommitted changes in: %s)" % ", ".join(
                line[3:] for line in dirty.splitlines() if line.strip())
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fla": package_version("fla-core"),
        "triton": package_version("triton"),
        "numpy": np.__version__,
        "cpu": f"{_cpu_model()} ({os.cpu_count()} logical cores)",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),   # other work on the machine
        "device": str(device),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, driver_capability=f"sm_{p.major}{p.minor}")
        # the switches of core/fused.py's single-token kernels (FLASHRT_PDL, FLASHRT_GDN_FUSION)
        from flashrt_ros.core import fused
        env.update(pdl=fused.pdl(device), gdn_fusion=fused.gdn_fusion())
    return env


def runtime_environment(rt) -> dict:
    """environment() of a PolicyRuntime's device, plus how it runs (kernels, CUDA graphs)."""
    env = environment(rt.device)
    env.update(kernels=rt.kernel, cuda_graphs=rt.use_graphs)
    return env


def device_slug(env: dict) -> str:
    name = env.get("gpu") or "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(stem: str, title: str, env: dict, sections: list[dict], results: dict,
                 plot=None) -> tuple:
    """Write `<stem>.json` (env + raw results) and `<stem>.md` (env + tables); returns both paths.

    sections: [{"heading", "columns", "rows", "notes"}] rendered in order.
    plot: optional `plot(json_dict, png_path)`; writes `<stem>.png` and links it from the .md.
    """
    for ext in (".md", ".json"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    md_path, json_path = stem + ".md", stem + ".json"
    data = {"title": title, "environment": env, "results": results}
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    parts = [f"# {title}", "", "| | |", "|---|---|"]
    parts += [f"| {k} | `{v}` |" if k == "command" else f"| {k} | {v} |" for k, v in env.items()]
    for s in sections:
        parts += ["", f"## {s['heading']}", "", markdown_table(s["columns"], s["rows"])]
        if s.get("notes"):
            parts += [""] + list(s["notes"])
    if plot is not None:
        plot(data, stem + ".png")
        parts += ["", f"![plot]({os.path.basename(stem)}.png)"]
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return md_path, json_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported when first plotting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def grouped_bars(ax, groups: list[str], series: dict, log: bool = False):
    """One cluster per group, one bar per series ({name: [value per group]}), values on the bars;
    NaN draws no bar."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.3g}" if v == v else "" for v in values], fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    if log:
        log_y(ax)
    ax.grid(True, axis="y", alpha=0.3)


def log_y(ax):
    """Log y axis with plain tick labels at 1, 2, 5 x 10^k (not 6 x 10^3 style)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def cuda_kernel_profile(fn, top: int = 12) -> dict:
    """Kernels one call of `fn` runs on the GPU (graph replays included): count, summed kernel time
    and the `top` kernel names by time. Summed kernel time well below the call's wall time means
    the call is bound by launches and gaps, not by the kernels themselves."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_name: dict[str, list] = {}
    count, total_us = 0, 0.0
    for e in prof.events():
        if getattr(e, "device_type", None) is None or "CUDA" not in str(e.device_type):
            continue
        us = e.time_range.elapsed_us()
        count += 1
        total_us += us
        entry = by_name.setdefault(e.name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += us
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"kernels": count, "kernel_time_ms": total_us / 1e3,
            "top": [{"name": n, "calls": c, "ms": us / 1e3} for n, (c, us) in ranked]}
