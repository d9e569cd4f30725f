"""Where this package's data files are: its share directory, found without ROS.

The `.msg`/`.srv` definitions, `config/` (the default params file, the model presets and their
trained heads) and `launch/` are installed to `<prefix>/share/flashrt_ros` - by colcon, and by the
pip build (setup.py's data_files) - and lie at the top of a source checkout. `share_dirs()` lists
the directories that may hold them, in the order they are looked up:

  1. the ament index: every prefix in AMENT_PREFIX_PATH (a sourced ROS workspace) that has the
     marker `share/ament_index/resource_index/packages/flashrt_ros` -> `<prefix>/share/flashrt_ros`.
     This is what ament_index_python's get_package_share_directory finds, read by hand so that
     the ROS-free core (flashrt_ros.core) can use it without importing any ROS package;
  2. `<sys.prefix>/share/flashrt_ros`: a pip install into this interpreter's environment, which
     no ament environment names;
  3. the source checkout (the directory above this package that holds package.xml).

Only existing directories are listed. Imports no ROS.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = "flashrt_ros"
SOURCE_DIR = Path(__file__).resolve().parents[2]      # a checkout: package.xml, msg/, config/
_MARKER = Path("share", "ament_index", "resource_index", "packages", PACKAGE)


def ament_share_dirs() -> list[Path]:
    """`<prefix>/share/flashrt_ros` for each AMENT_PREFIX_PATH prefix that registers the package."""
    out = []
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix and (Path(prefix) / _MARKER).is_file():
            out.append(Path(prefix) / "share" / PACKAGE)
    return out


def share_dirs(prefer_source: bool = False) -> list[Path]:
    """The existing directories that may hold the package's data files, in lookup order (see the
    module docstring); with `prefer_source`, the source checkout first (files being edited in a
    checkout win over an installed copy of them)."""
    installed = ament_share_dirs() + [Path(sys.prefix) / "share" / PACKAGE]
    source = [SOURCE_DIR] if (SOURCE_DIR / "package.xml").is_file() else []
    out = []
    for d in (source + installed) if prefer_source else (installed + source):
        if d.is_dir() and d not in out:
            out.append(d)
    return out

