"""The runtime core imports no ROS: each core module imports in a Python where ROS cannot be imported.

Each module is imported in a fresh subprocess whose first act is to put a finder at the front of
sys.meta_path that refuses every ROS module (rclpy, rosidl*, rmw*, message packages, launch, and
this package's generated flashrt_ros.msg/srv) and records each attempt. A module passes when it
imports and attempted no ROS import at all, not even one guarded by try/except.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every module of the ROS-free layers, and the ROS-free helpers the ROS layer shares with them
ROS_FREE_HELPERS = ("flashrt_ros.ros.waiting", "flashrt_ros.ros.operations", "flashrt_ros.ros.stamps",
                    "flashrt_ros.sim.arm", "flashrt_ros.sim.imitation")


def ros_free_modules() -> list[str]:
    names = []
    for layer in ("core", "inputs", "capsules"):
        for dirpath, dirs, files in os.walk(os.path.join(ROOT, "flashrt_ros", layer)):
            dirs.sort()     # the model families' folders (core/models/<family>/) in a fixed order
            package = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
            names += [f"{package}.{f[:-3]}" for f in sorted(files)
                      if f.endswith(".py") and f != "__init__.py"]
    return names + list(ROS_FREE_HELPERS)


CORE_MODULES = ros_free_modules()

IMPORT_WITHOUT_ROS = r"""
import importlib, importlib.abc, json, sys, traceback

ROS_TOP_LEVEL = {"rclpy", "rpyutils", "ament_index_python", "launch", "launch_ros", "launch_testing",
                 "message_filters", "tf2_ros", "py_trees_ros", "ros2cli"}
attempts = []

def is_ros(name):
    top = name.split(".")[0]
    return (top in ROS_TOP_LEVEL or top.startswith(("rosidl", "rmw", "rcl"))
            or top.endswith(("_msgs", "_srvs", "_interfaces"))
            or name.startswith(("flashrt_ros.msg", "flashrt_ros.srv", "flashrt_ros.ros.node")))

class RefuseROS(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if is_ros(name):
            attempts.append(name)
            raise ImportError("%s refused: the runtime core must import no ROS" % name)
        return None

sys.meta_path.insert(0, RefuseROS())
error = None
try:
    importlib.import_module(sys.argv[1])
except BaseException:
    error = traceback.format_exc(limit=-3)
print(json.dumps({"error": error, "ros_imports": attempts}))
"""


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_without_ros(module):
    # _ROS_WHEELS_BOOTSTRAP_COMPLETE: the PyPI ROS wheels' .pth would otherwise re-exec the child once
    # to set LD_LIBRARY_PATH, which the core does not need.
    env = dict(os.environ, _ROS_WHEELS_BOOTSTRAP_COMPLETE="1")
    proc = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_ROS, module], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["ros_imports"]:
        pytest.fail("%s tried to import ROS modules %s; the core must not" % (module, result["ros_imports"]),
                    pytrace=False)
    if result["error"] is not None:
        pytest.fail("%s failed to import with ROS unavailable:\n%s" % (module, result["error"]), pytrace=False)
