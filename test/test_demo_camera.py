"""`flashrt-ros demo` with a camera policy (test/data/smolvla/one_cam): the node and the simulated
robot with its camera in one process, on the CPU; the policy steps on the joined frames."""
import os
import re
import sys

import pytest

from flashrt_ros.ros.process import NodeProcess
from flashrt_ros.ros.waiting import wait_for

pytestmark = pytest.mark.ros

MODEL = os.path.join(os.path.dirname(__file__), "data", "smolvla", "one_cam")


def test_the_demo_serves_a_camera_policy_from_the_robots_camera(ros_env, tmp_path):
    cmd = [sys.executable, "-m", "flashrt_ros.cli", "demo", "--model", MODEL, "--rate", "10",
           "--capsule-dir", str(tmp_path)]
    with NodeProcess(cmd, ros_env) as demo:
        # a line of the live loop after a step: the frames and joint states joined in the node
        stepped = re.compile(r"\[flashrt\] t=.* step [1-9]")
        wait_for(lambda: stepped.search(demo.log()) or demo.check_alive(), 120,
                 "a live line of the demo after a step")
        code = demo.stop(timeout=60)
    out = demo.log()
    assert "cameras observation.images.top" in out, out[-3000:]
    assert "Traceback" not in out and code == 0, out[-3000:]
