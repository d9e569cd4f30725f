"""Can the package run on a Jetson AGX Thor? Its runtime requirements there, and no x86 in it.

JetPack 7 on Thor is Ubuntu 24.04 on aarch64: glibc 2.39, CPython 3.12, CUDA 13. ROS 2 (rclpy,
launch, the message packages) comes from the distro's apt packages and colcon (README.md, "On a
ROS 2 robot"); what pip installs there is the rest, checked here without an aarch64 machine:

  1. Each runtime requirement (RUNTIME, at requirements.txt's pin where it pins one) has a wheel
     for manylinux aarch64 (glibc 2.17 to 2.39) and CPython 3.12: `pip index versions` with
     those platform flags, which reads the index's file lists and downloads nothing.
  2. pip resolves the dependencies of the light ones (all but torch, fla-core and cupy-cuda13x)
     for that platform, wheels only: `pip install --dry-run --report`, which installs nothing
     and reads each wheel's metadata from the index (PEP 658), or, where the index has none,
     downloads the wheel to read it (about 60 MB here). The dependencies of torch, fla-core
     and cupy-cuda13x are the CUDA 13 wheels, gigabytes that an index without that metadata
     makes pip download (3.0 GB, 65 packages in all); `--full` resolves them too.
  3. Every resolved wheel is pure Python or built for aarch64.
  4. Nothing the package installs names x86: no architecture name, x86 instruction-set flag,
     x86 library path or MKL call in its sources, and no compiled file in the repository.
  5. With a Python 3.12 interpreter (`python3.12` on PATH, or --python), every module of the
     package compiles under it.

Run by .ci/run as its own lane (`.venv/bin/python tools/check_aarch64.py`, about 20 s). Exits
non-zero if any check fails, saying what was found.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What pip installs beside the distro's ROS 2 on the robot: setup.py's install_requires, the bag
# and behaviour-tree libraries (its "ros" extra), matplotlib (package.xml: bt-demo's plot) and the
# GPU kernels' packages (its "gpu" extra, for CUDA 13). Not here: the ROS wheels (the distro's),
# the test tools, and behaviortreepy (BT.CPP's bindings for test/test_btcpp.py; it has no linux
# aarch64 wheel, and a robot runs BT.CPP through BehaviorTree.ROS2 in C++).
RUNTIME = ["numpy", "PyYAML", "safetensors", "tokenizers", "torch",
           "rosbags", "mcap", "zstandard", "py_trees",
           "matplotlib",
           "fla-core", "cupy-cuda13x"]
# whose dependencies are the CUDA wheels: resolved only with --full
HEAVY = {"torch", "fla-core", "cupy-cuda13x"}
GLIBC = range(17, 40)                     # manylinux_2_17 (manylinux2014) to Ubuntu 24.04's 2.39
PYTHON = "3.12"

# What the package installs (setup.py, CMakeLists.txt): its sources, scripts, launch files,
# parameters and interfaces.
INSTALLED = ["flashrt_ros", "scripts", "launch", "config", "msg", "srv", "resource",
             "CMakeLists.txt", "setup.py", "package.xml"]
X86 = re.compile(r"x86[_-]?64|\bx86\b|\bamd64\b|\bi[3-6]86\b|-march=|-mtune=|-m(avx|sse)|"
                 r"\bavx(2|512)?\b|\bsse[1-4]|x86_64-linux-gnu|torch\.backends\.mkl\b|"
                 r"\bimport mkl\b|\bcpuid\b|platform\.(machine|processor)\(", re.IGNORECASE)
ELF = b"\x7fELF"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path = ROOT / "requirements.txt") -> list[str]:
    """RUNTIME at the versions `path` pins (a name it does not pin: any version)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if m:
            pins[_normalize(m.group(1))] = m.group(2)
    return [f"{name}=={pins[_normalize(name)]}" if _normalize(name) in pins else name
            for name in RUNTIME]


def _target(python: str) -> list[str]:
    """pip's options for manylinux aarch64 / CPython `python`, wheels only."""
    opts = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            "--abi", "cp" + python.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    for platform in [f"manylinux_2_{v}_aarch64" for v in GLIBC] + ["manylinux2014_aarch64"]:
        opts += ["--platform", platform]
    return opts


def _pip_errors(out) -> str:
    lines = [x for x in (out.stdout + out.stderr).splitlines()
             if not x.startswith("WARNING: Location")]      # this machine's extra file indexes
    return "\n".join(lines[-20:])


def versions(req: str, python: str = PYTHON) -> list[str]:
    """The versions of `req`'s project that have a wheel for the target ([] if none)."""
    name = req.split("==")[0]
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name, *_target(python)],
                         capture_output=True, text=True)
    m = re.search(r"^Available versions: (.*)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not m:
        if "No matching distribution" in out.stdout + out.stderr:
            return []
        raise RuntimeError(f"pip index versions {name}:\n{_pip_errors(out)}")
    return [v.strip() for v in m.group(1).split(",")]


def resolve(reqs: list[str], python: str = PYTHON) -> tuple[list[dict], float, list[str]]:
    """pip's resolution of `reqs` for the target: the report's `install` entries, the seconds it
    took, and the wheels pip downloaded to read their metadata ("name (size)"). Raises
    RuntimeError with pip's output."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--verbose", "--report", str(report), *_target(python)]
        t0 = time.monotonic()
        out = subprocess.run(cmd + reqs, capture_output=True, text=True)
        took = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError("pip could not resolve them for linux aarch64 / CPython "
                               f"{python}:\n{_pip_errors(out)}")
        downloaded = re.findall(r"^\s*Downloading \S+\.whl \(([\d.]+ [kMG]?B)\)",
                                out.stdout, re.MULTILINE)
        return json.loads(report.read_text())["install"], took, downloaded


def megabytes(sizes: list[str]) -> float:
    scale = {"B": 1e-6, "kB": 1e-3, "MB": 1.0, "GB": 1e3}
    return sum(float(n) * scale[unit] for n, unit in (s.split() for s in sizes))


def wheel_of(item: dict) -> str:
    return item["download_info"]["url"].rsplit("/", 1)[-1]


def not_aarch64(items: list[dict]) -> list[str]:
    """Wheels among `items` that are neither pure Python nor built for aarch64."""
    wrong = []
    for item in items:
        platform_tags = wheel_of(item)[:-len(".whl")].split("-")[-1].split(".")
        if not all(t == "any" or t.endswith("_aarch64") for t in platform_tags):
            wrong.append(wheel_of(item))
    return wrong


def x86_findings(root: Path = ROOT, installed=INSTALLED) -> list[str]:
    """`path:line: text` of every line naming x86 in the installed files, and `path: compiled
    file` of every ELF file among them (files git tracks, or every file outside git)."""
    try:
        files = subprocess.run(["git", "ls-files", "--", *installed], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(root)) for name in installed for p in
                 ((root / name).rglob("*") if (root / name).is_dir() else [root / name])
                 if p.is_file()]
    found = []
    for name in files:
        data = (root / name).read_bytes()
        if data.startswith(ELF):
            found.append(f"{name}: compiled file (ELF)")
            continue
        if b"\0" in data:        # other binary data (weights, images): no text to name a platform
            continue
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if X86.search(line):
                found.append(f"{name}:{n}: {line.strip()}")
    return found


def compiles_under(python: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """(`python`'s version, errors) of compiling every module of flashrt_ros with it. Raises
    OSError if `python` does not run (a pyenv shim of a version pyenv does not select)."""
    code = ("import pathlib, sys\n"
            "errors = []\n"
            "for p in sorted(pathlib.Path('flashrt_ros').rglob('*.py')):\n"
            "    try:\n"
            "        compile(p.read_bytes(), str(p), 'exec')\n"
            "    except SyntaxError as e:\n"
            "        errors.append(f'{p}:{e.lineno}: {e.msg}')\n"
            "print(sys.version.split()[0])\n"
            "print('\\n'.join(errors))\n")
    run = subprocess.run([python, "-c", code], cwd=root, capture_output=True, text=True)
    if run.returncode != 0:
        raise OSError(f"{python} exited with {run.returncode}: {run.stderr.strip()[-300:]}")
    out = run.stdout.splitlines()
    return out[0], [x for x in out[1:] if x]


def interpreters(version: str, given: str | None) -> list[str]:
    """`given`, or the interpreters of Python `version` this machine may have: on PATH, pyenv's,
    the system's (a pyenv shim on PATH runs only where pyenv selects that version)."""
    if given:
        return [given]
    found = [shutil.which(f"python{version}")]
    found += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")))
    found += [f"/usr/bin/python{version}"]
    return [p for p in found if p and os.path.exists(p)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python-version", default=PYTHON, help="target CPython (default %(default)s)")
    p.add_argument("--python", default=None, metavar="INTERPRETER",
                   help="an interpreter of that version to compile the package with (default: "
                        "python<version> on PATH; none: that step is skipped)")
    p.add_argument("--full", action="store_true",
                   help="resolve the dependencies of torch, fla-core and cupy-cuda13x too (the "
                        "CUDA wheels: pip downloads gigabytes from an index without PEP 658 "
                        "metadata)")
    args = p.parse_args(argv)
    say = lambda s: print(f"[aarch64] {s}", flush=True)    # noqa: E731
    failed = False
    target = (f"manylinux aarch64 (glibc 2.{GLIBC[0]}-2.{GLIBC[-1]}) / CPython "
              f"{args.python_version}")

    reqs = requirements()
    say(f"wheels for {target} (the index's file lists; nothing downloaded):")
    for req in reqs:
        try:
            available = versions(req, args.python_version)
        except RuntimeError as e:
            say(f"error: {e}")
            return 1
        pin = req.split("==")[1] if "==" in req else None
        if not available or (pin is not None and pin not in available):
            failed = True
            say(f"  error: {req}: no wheel for {target}; versions with one: "
                f"{', '.join(available[:8]) or 'none'}")
        else:
            say(f"  {req}: yes" + ("" if pin == available[0] else f" (newest {available[0]})"))

    light = [r for r in reqs if args.full or _normalize(r.split("==")[0]) not in HEAVY]
    try:
        items, took, downloaded = resolve(light, args.python_version)
    except RuntimeError as e:
        say(f"error: {e}")
        return 1
    say(f"resolved {' '.join(light)} with their dependencies for {target}: {len(items)} "
        f"packages in {took:.0f} s, {megabytes(downloaded):.0f} MB downloaded for metadata the "
        f"index lacks" + ("" if args.full else f" (not resolved: the dependencies of "
                                                 f"{', '.join(sorted(HEAVY))}; see --full)"))
    wrong = not_aarch64(items)
    if wrong:
        failed = True
        say(f"error: wheels that are neither pure Python nor aarch64: {wrong}")

    found = x86_findings()
    if found:
        failed = True
        say("error: x86-specific content in what the package installs (make it portable, or "
            "choose it by platform at run time):\n  " + "\n  ".join(found))
    else:
        say(f"no x86-specific line or compiled file in {', '.join(INSTALLED)}")

    compiled = None
    tried = []
    for python in interpreters(args.python_version, args.python):
        try:
            compiled = compiles_under(python)
            break
        except OSError as e:
            tried.append(str(e))
    if compiled is None:
        say(f"compiling under Python {args.python_version} skipped: no interpreter of it runs "
            f"here ({'; '.join(tried) or 'none found'}); pass --python")
    elif compiled[1]:
        failed = True
        say(f"error: modules that Python {compiled[0]} does not compile:\n  " +
            "\n  ".join(compiled[1]))
    else:
        say(f"every module of flashrt_ros compiles under Python {compiled[0]}")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
