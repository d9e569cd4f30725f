"""The node's start (ros/node.py: main): the node, and with it its DDS participant, exists before
the runtime side (torch and the core) is imported, so that peers discover it while torch imports.
Order only, never time: bench/bench_bringup.py measures the seconds."""
import re
import subprocess
import sys

import pytest

from flashrt_ros.ros.process import ACTIVE_LOG_LINE, NodeProcess


@pytest.mark.ros
def test_the_node_module_imports_no_torch():
    code = ("import sys, flashrt_ros.ros.node; "
            "print(*[m for m in ('torch', 'flashrt_ros.core.runtime') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "", f"importing flashrt_ros.ros.node imported {out.strip()}"


@pytest.mark.ros
@pytest.mark.slow
def test_the_node_is_created_before_the_runtime_side_is_imported(ros_env, tmp_path):
    with NodeProcess(params={"managed": False, "runtime": {"device": "cpu"},
                             "store": {"capsule_dir": str(tmp_path)}},
                     namespace=f"start_{tmp_path.name}", env=ros_env) as node:
        node.wait_log(ACTIVE_LOG_LINE)
        line = next(l for l in node.output if ACTIVE_LOG_LINE in l)
    marks = dict((name, float(s)) for name, s in
                 re.findall(r"(node|imports|active) at ([0-9.]+) s", line))
    assert set(marks) == {"node", "imports", "active"}, line
    assert marks["node"] <= marks["imports"] <= marks["active"], line
