#!/usr/bin/env bash
# Runs the test suite in .venv (set up by tools/bootstrap.sh) with DDS kept on loopback.
# Arguments go to pytest: `bash tools/run-tests.sh -k capsule -x`, `bash tools/run-tests.sh -m "not slow"`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

bash "$root/tools/bootstrap.sh"

# DDS stays on this machine (a rule of this workplace), and each run gets its own domain so that
# parallel runs don't discover each other.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
unset ROS_STATIC_PEERS
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$((RANDOM % 101 + 1))}"
# The venv was just built with the interfaces: a test marked `ros` that cannot import them fails
# here instead of being skipped.
export FLASHRT_REQUIRE_ROS=1

cd "$root"
rc=0
.venv/bin/python -m pytest test/ "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "[flashrt] pytest ran no test; that counts as a failure" >&2
fi
exit "$rc"
