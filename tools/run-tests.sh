#!/usr/bin/env bash
# Runs the test suite in the venv of a ROS 2 distro (set up by tools/bootstrap.sh) with DDS kept on
# loopback. Arguments go to pytest (default: every test under test/):
#   bash tools/run-tests.sh -k capsule -x
#   bash tools/run-tests.sh -m "not slow"
#   FLASHRT_ROS_DISTRO=jazzy bash tools/run-tests.sh -m ros      # the Jazzy venv, .venv-jazzy
# Environment: FLASHRT_ROS_DISTRO  kilted (default, .venv) or jazzy (.venv-jazzy), as for bootstrap.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
distro="${FLASHRT_ROS_DISTRO:-kilted}"

bash "$root/tools/bootstrap.sh"
# bootstrap.sh names the venvs: .venv for the default distro (Kilted), .venv-<distro> else
venv="$root/.venv"
[ "$distro" = kilted ] || venv="$root/.venv-$distro"

# DDS stays on this machine (a rule of this workplace), and each run gets its own domain so that
# parallel runs don't discover each other.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
unset ROS_STATIC_PEERS
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$((RANDOM % 101 + 1))}"
# The venv was just built with the interfaces: a test marked `ros` that cannot import them fails
# here instead of being skipped.
export FLASHRT_REQUIRE_ROS=1
# Likewise the `ros2` tools (marker ros2cli) where the bootstrap installed them from
# ../shared/ros2-tools (its stamp is there only then).
if [ -f "$venv/.flashrt-ros2-tools.sha256" ]; then
  export FLASHRT_REQUIRE_ROS2=1
fi

# Where torch sees no CUDA device (what skips the tests marked gpu), core/fused.py's Triton
# kernels run on the CPU through Triton's interpreter (test/test_fused_kernels.py); Triton reads
# this as its modules load, so it is set before the session. A value already set is kept.
if [ -z "${TRITON_INTERPRET+x}" ] && ! "$venv/bin/python" -c \
    "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export TRITON_INTERPRET=1
fi

cd "$root"
echo "[flashrt] tests on ROS 2 $distro ($venv), ROS_DOMAIN_ID=$ROS_DOMAIN_ID${TRITON_INTERPRET:+, TRITON_INTERPRET=$TRITON_INTERPRET}"
rc=0
# no path among the arguments: pytest.ini's testpaths (test/)
"$venv/bin/python" -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "[flashrt] pytest ran no test; that counts as a failure" >&2
fi
exit "$rc"
