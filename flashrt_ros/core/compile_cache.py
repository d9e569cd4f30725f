"""Compile caches that survive restarts, keyed so that a stale entry is never reused (no ROS).

On CUDA the slow part of a cold start is Triton: compiling fla's kernels and autotuning them
(tens of seconds for the hybrid-0.8b prefill plans). Triton keeps compiled kernels in
TRITON_CACHE_DIR and, with TRITON_CACHE_AUTOTUNING=1, the autotuner's choices beside them.
`use_compile_cache(root, device)` points both at

    <root>/<key>/triton        key = blake2b of the GPU (name, compute capability), the driver,
    <root>/<key>/key.json            CUDA, Python, torch, triton, fla and this package's versions

so a different GPU, driver or package version gets a directory of its own (key.json says what
the key covers). torch.compile is not used, so TORCHINDUCTOR_CACHE_DIR is left alone.

When to call it: before fla is imported. fla's autotuners read TRITON_CACHE_AUTOTUNING when
their modules load, and RuntimeConfig.resolve (which imports fla) calls this first. A process
that imported fla before keeps compiled kernels in the directory, but autotunes again.
On the CPU nothing is compiled (no Triton): nothing is set and no directory is made.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform

from flashrt_ros.core.exceptions import ConfigError

KEY_FILE = "key.json"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def _driver() -> str:
    """The NVIDIA kernel driver's version line ('' where it cannot be read)."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            return f.readline().strip()
    except OSError:
        return ""


def _driver_api() -> int:
    """The CUDA driver API version (cuDriverGetVersion of libcuda, e.g. 13000; 0 where absent).

    torch exposes only the runtime's version, so the driver library is asked directly."""
    import ctypes
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return 0
    return version.value


def package_fields() -> dict:
    """The versions of the software a compiled kernel depends on."""
    import torch
    import flashrt_ros
    return {"cuda": torch.version.cuda or "", "python": platform.python_version(),
            "torch": torch.__version__, "triton": _version("triton") or _version("pytorch-triton"),
            "fla": _version("fla-core") or _version("flash-linear-attention"),
            "flashrt_ros": flashrt_ros.__version__}


def key_fields(device) -> dict:
    """What a compiled kernel or an autotuning choice depends on, for CUDA `device`."""
    import torch
    p = torch.cuda.get_device_properties(device)
    return {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "driver": _driver(),
            "driver_api": _driver_api(), **package_fields()}


def cache_key(fields: dict) -> str:
    """The directory name for `fields` (key_fields): 16 hex digits of their blake2b."""
    text = json.dumps(fields, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def use_compile_cache(root: str, device) -> str:
    """Point Triton's caches at `<root>/<key>/triton` for `device`; returns that directory ('' on
    the CPU or for an empty `root`: then nothing is changed)."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]      # also "cuda:0"
    if not root or kind != "cuda":
        return ""
    fields = key_fields(device)
    keyed = os.path.join(os.path.abspath(os.path.expanduser(root)), cache_key(fields))
    triton_dir = os.path.join(keyed, "triton")
    key_path = os.path.join(keyed, KEY_FILE)
    try:
        os.makedirs(triton_dir, exist_ok=True)
        if not os.path.isfile(key_path):
            tmp = f"{key_path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(fields, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, key_path)
    except OSError as e:
        raise ConfigError(f"runtime.cache_dir: expected a writable directory at {root}, found "
                          f"{type(e).__name__}: {e}; set runtime.cache_dir to one, or '' for "
                          f"Triton's defaults") from None
    os.environ["TRITON_CACHE_DIR"] = triton_dir
    os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
    return triton_dir

