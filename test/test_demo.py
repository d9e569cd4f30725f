"""`flashrt-ros demo` (tools/run-demo.sh): Ctrl-C ends it with one line and no traceback, during its
start-up as after it. The demo runs as a process of its own; SIGINT is sent when a line of its
start-up (or of its live loop) appears."""
import sys

import pytest

from flashrt_ros.ros.process import NodeProcess

pytestmark = pytest.mark.ros


@pytest.mark.parametrize("line, live", [
    ("[flashrt] starting policy node", False),   # the node being created
    ("configuring: model", False),               # configure: the runtime, the instruction, warm-up
    ("[flashrt] t=", True),                      # the live loop
])
def test_ctrl_c_ends_the_demo_with_one_line(ros_env, tmp_path, line, live):
    cmd = [sys.executable, "-m", "flashrt_ros.cli", "demo", "--capsule-dir", str(tmp_path)]
    with NodeProcess(cmd, ros_env) as demo:
        demo.wait_log(line)
        code = demo.stop(timeout=60)            # SIGINT, as Ctrl-C
    out = demo.log()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert out.rstrip().endswith("[flashrt] stopped"), out[-3000:]
    assert ("[flashrt] live" in out) == live, "the interrupt came later than this case needs"
    assert code == 0, out[-3000:]


# Run as a program whose parent ignores SIGINT (a background job of a script, `nohup`, some CI
# runners): the ignored disposition is inherited across exec.
SIGINT_IGNORED = ["-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"]


def test_ctrl_c_ends_the_demo_whose_parent_ignored_sigint(ros_env, tmp_path):
    cmd = [sys.executable, *SIGINT_IGNORED, "-m", "flashrt_ros.cli", "demo",
           "--capsule-dir", str(tmp_path)]
    with NodeProcess(cmd, ros_env) as demo:
        demo.wait_log("[flashrt] t=")
        code = demo.stop(timeout=30)            # SIGINT, as Ctrl-C
    out = demo.log()
    assert out.rstrip().endswith("[flashrt] stopped"), out[-3000:]
    assert code == 0, out[-3000:]
