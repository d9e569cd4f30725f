#!/usr/bin/env bash
# Starts the demo (`flashrt-ros demo`: the node with a simulated robot on the tiny CPU preset) in
# .venv with DDS kept on loopback. Arguments go to `flashrt-ros demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

bash "$root/tools/bootstrap.sh"

export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
unset ROS_STATIC_PEERS
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$((RANDOM % 101 + 1))}"
echo "[flashrt] DDS on loopback, ROS_DOMAIN_ID=$ROS_DOMAIN_ID (set it to the same value to reach the demo from another shell)"

cd "$root"
exec .venv/bin/flashrt-ros demo "$@"
