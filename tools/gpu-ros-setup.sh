#!/usr/bin/env bash
# ROS 2 on the lent GPU machine (Python 3.12 with torch and CuPy, no ROS, no network), from the
# wheels tools/gpu-ros-wheels.sh put in ./.whl-ros (the device call carries that folder):
#
#   source tools/gpu-ros-setup.sh      # from the repository root; then python3 -m pytest ..., etc.
#
# It makes a prefix (default /tmp/ros, FLASHRT_ROS_PREFIX names another) laid out as tools/
# bootstrap.sh's .venv is: a venv without pip whose interpreter also sees the image's packages
# (a .pth adds the image's site directories after its own, so torch, CuPy and numpy are the
# image's), the wheels installed into it with no index and no dependency resolution (the folder
# holds exactly what is needed), and this package's msg/srv built by CMake + rosidl into it
# (setup.py build_interfaces, as the bootstrap does). The checkout's own sources are imported
# through PYTHONPATH; `flashrt_ros/__init__.py` merges the generated msg/srv into the package.
#
# Then it exports, in the calling shell: PATH (the prefix's bin first: `python3` is its
# interpreter), PYTHONPATH, LD_LIBRARY_PATH (the prefix's lib and the wheels' vendored libraries),
# AMENT_PREFIX_PATH, ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, ROS_DOMAIN_ID (random unless set),
# and FLASHRT_REQUIRE_ROS=1 (a test marked `ros` fails instead of skipping). Run a second time in
# the same machine it only exports: the prefix's stamp says it is complete.
# Output of the install and build goes to $OUT/gpu-ros-setup.log (or /tmp/gpu-ros-setup.log).

_flashrt_gpu_ros() (
  set -euo pipefail
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  prefix="$1" py="$2" log="$3"
  stamp="$prefix/.flashrt-gpu-ros"
  [ -f "$stamp" ] && exit 0
  ls "$root"/.whl-ros/*.whl >/dev/null 2>&1 || {
    echo "[gpu-ros] error: no wheels in $root/.whl-ros: run bash tools/gpu-ros-wheels.sh where PyPI" \
      "is reachable and name .whl-ros in the device call's carry" >&2
    exit 1
  }
  for tool in cmake c++ cc; do
    command -v "$tool" >/dev/null || { echo "[gpu-ros] error: '$tool' not found" >&2; exit 1; }
  done
  : >"$log"
  rm -rf "$prefix"
  echo "[gpu-ros] venv $prefix over $("$py" -c 'import sys; print(sys.prefix)')"
  "$py" -m venv --without-pip "$prefix" >>"$log" 2>&1
  site="$("$prefix/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$py" -c 'import os, sys; print("import site; " + "; ".join(
      f"site.addsitedir({p!r})" for p in sys.path
      if os.path.basename(p) in ("site-packages", "dist-packages")))' >"$site/zz_gpu_image.pth"
  echo "[gpu-ros] installing $(ls "$root"/.whl-ros/*.whl | wc -l) wheels"
  "$py" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --prefix "$prefix" "$root"/.whl-ros/*.whl >>"$log" 2>&1 ||
    { tail -n 30 "$log" >&2; exit 1; }
  echo "[gpu-ros] building flashrt_ros msg/srv (CMake + rosidl)"
  (cd "$root" && PATH="$prefix/bin:$PATH" "$prefix/bin/python" setup.py build_interfaces \
      --build-dir "$prefix/build/interfaces") >>"$log" 2>&1 ||
    { grep -i -m 15 -E "error|failed" "$log" >&2; tail -n 30 "$log" >&2; exit 1; }
  touch "$stamp"
)

_flashrt_gpu_ros_env() {
  local prefix="$1" root site libs
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  site="$("$prefix/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # the prefix's lib (rcl, rmw, Fast DDS, the typesupport libraries) and the wheels' vendored
  # libraries: what ros_wheels_bootstrapper sets before it re-executes Python (set here, so it
  # does not)
  libs="$prefix/lib$(for d in "$site"/ros_*.libs; do [ -d "$d" ] && printf ':%s' "$d"; done)"
  export PATH="$prefix/bin:$PATH"
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
  export AMENT_PREFIX_PATH="$prefix"
  export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
  unset ROS_STATIC_PEERS
  export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$((RANDOM % 101 + 1))}"
  export FLASHRT_REQUIRE_ROS=1 PYTHONUNBUFFERED=1
}

if _flashrt_gpu_ros "${FLASHRT_ROS_PREFIX:-/tmp/ros}" "${PYTHON:-python3}" \
    "${OUT:-/tmp}/gpu-ros-setup.log"; then
  _flashrt_gpu_ros_env "${FLASHRT_ROS_PREFIX:-/tmp/ros}"
  python3 -c "import rclpy, flashrt_ros.msg, flashrt_ros.srv, sensor_msgs.msg" &&
    echo "[gpu-ros] ready: $(command -v python3), ROS_DOMAIN_ID=$ROS_DOMAIN_ID"
else
  echo "[gpu-ros] failed" >&2
  false
fi
unset -f _flashrt_gpu_ros _flashrt_gpu_ros_env
