#!/usr/bin/env bash
# Fetches into ./.whl-ros (ignored through .git/info/exclude) every wheel that the lent GPU machine
# needs to run the node through ROS 2: rclpy, rmw_fastrtps_cpp and the message packages of
# requirements.txt's `ros-*` lines with everything they need, and what building this package's
# msg/srv takes (ament_cmake, the rosidl generators, catkin_pkg), for CPython 3.12 (the image's)
# on manylinux x86_64. tools/gpu-ros-setup.sh installs them there.
#
#   bash tools/gpu-ros-wheels.sh          # from the repository root, on a machine with PyPI
#
# Left out: what the GPU image has already (numpy, PyYAML, setuptools, packaging, pyparsing,
# python-dateutil, typing_extensions, ...), so that nothing shadows its versions, and ROS's lint
# CMake modules (cppcheck, cpplint, flake8, pep257, uncrustify), which the build with
# BUILD_TESTING=OFF never reads. The folder travels in the device call's `carry` (64 MiB with the repository).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dir=.whl-ros
grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
rm -rf "$dir"
mkdir -p "$dir"
py="${PYTHON:-python3}"
# the pins are requirements.txt's: its ROS wheels and the build's catkin_pkg
roots="$(grep -E '^(ros-|catkin_pkg)' requirements.txt | sed 's/ *#.*//')"
# FLASHRT_WHEELS_PYTHON=3.11 fetches the same for CPython 3.11: a rehearsal of the GPU machine's
# recipe on the CPU machines (a venv of torch CPU and the image's other packages as its python3)
version="${FLASHRT_WHEELS_PYTHON:-3.12}"
target=(--only-binary=:all: --python-version "$version" --implementation cp --abi "cp${version/./}"
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)

# empy: an sdist only, built here (pure Python), at the release .venv resolved (rosidl_adapter
# names empy without a version)
"$py" -m pip wheel -q --no-deps --no-binary empy -w "$dir" empy==4.2.1
# shellcheck disable=SC2086
"$py" -m pip download -q "${target[@]}" --find-links "$dir" -d "$dir" $roots

# On the GPU image already, or never used there (see above).
drop='^(numpy|pyyaml|setuptools|packaging|pyparsing|python_dateutil|six|typing_extensions|tzdata'
drop+='|ros_ament_cmake_(cppcheck|cpplint|flake8|pep257|uncrustify|lint_cmake|copyright|xmllint)'
drop+='|ros_ament_(cppcheck|cpplint|flake8|pep257|uncrustify|lint|lint_cmake|copyright|xmllint))-'
for f in "$dir"/*.whl; do
  name="$(basename "$f" | tr 'A-Z' 'a-z')"
  if [[ "$name" =~ $drop ]]; then rm -f "$f"; fi
done
# one version of each: two would stop the install there
dups="$(ls "$dir" | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
[ -z "$dups" ] || { echo "error: more than one version of: $dups" >&2; exit 1; }
echo "[gpu-ros-wheels] $(ls "$dir" | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
