"""Importing the command modules changes nothing; running the commands keeps DDS on loopback.

`flashrt-ros`, `flashrt-ros record` and `flashrt-ros play` default ROS_AUTOMATIC_DISCOVERY_RANGE to
LOCALHOST in their entry points, before rclpy is initialised. Each check runs in a fresh
interpreter whose environment lacks the variable; none of them initialises rclpy or opens DDS.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAR = "ROS_AUTOMATIC_DISCOVERY_RANGE"
MODULES = ("flashrt_ros.cli.main", "flashrt_ros.bags.record", "flashrt_ros.bags.play")

IMPORT_THEN_RUN = r"""
import contextlib, importlib, io, json, os, sys
before = dict(os.environ)
for name in sys.argv[1:]:
    importlib.import_module(name)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
from flashrt_ros.cli.main import main
with contextlib.redirect_stdout(io.StringIO()):
    main(["params"])                       # an entry point that needs no ROS graph
print(json.dumps({"changed_by_import": changed, "after_main": os.environ.get("%s")}))
""" % VAR


def test_importing_changes_no_environment_and_the_entry_point_defaults_to_loopback():
    # _ROS_WHEELS_BOOTSTRAP_COMPLETE: the PyPI ROS wheels' .pth would otherwise re-exec the child
    # once to set LD_LIBRARY_PATH (and change the environment before the check starts)
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env["_ROS_WHEELS_BOOTSTRAP_COMPLETE"] = "1"
    proc = subprocess.run([sys.executable, "-c", IMPORT_THEN_RUN, *MODULES], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["changed_by_import"] == [], result
    assert result["after_main"] == "LOCALHOST", result
