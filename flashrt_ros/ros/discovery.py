"""Where DDS discovers peers: on this machine unless the environment says otherwise.

Every entry point of this package that starts ROS (the CLI, the recorder, the player, the demos,
the node as a child process, the bag regression helper) calls `loopback_by_default` before
`rclpy.init`, or on the environment it hands a child. Importing a module changes nothing.
"""
from __future__ import annotations

import os

DISCOVERY_RANGE = "ROS_AUTOMATIC_DISCOVERY_RANGE"


def loopback_by_default(env=None):
    """Set ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST in `env` (default os.environ) where it is
    unset; returns `env`."""
    env = os.environ if env is None else env
    env.setdefault(DISCOVERY_RANGE, "LOCALHOST")
    return env
