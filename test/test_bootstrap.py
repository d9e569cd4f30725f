"""tools/bootstrap.sh says what it left out: without the ros2 tools' wheels (../shared/ros2-tools,
or FLASHRT_ROS2_TOOLS) it ends by naming the tools it skipped, why, and where README.md says what
to do instead. It runs on the venv tools/run-tests.sh has just brought up to date, so every step
is already done and it only checks its stamps (well under a second).
"""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bootstrap(**env):
    out = subprocess.run(["bash", "tools/bootstrap.sh"], cwd=ROOT, env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    ready = [i for i, line in enumerate(lines) if line.startswith("[flashrt] ready: ")]
    assert ready, out.stdout
    return lines[ready[-1] + 1:]               # what it says after "ready"


def test_bootstrap_without_the_ros2_tools_says_it_skipped_them_and_why(tmp_path):
    missing = tmp_path / "ros2-tools"
    after = _bootstrap(FLASHRT_ROS2_TOOLS=str(missing))
    said = " ".join(after)
    assert after and after[0].startswith("[flashrt] skipped the ros2 launch and command-line "
                                         "tools"), after
    assert f"no wheels in {missing}/" in said and "not on PyPI" in said, said
    assert "FLASHRT_ROS2_TOOLS" in said and 'README.md, "Without the ros2 tools"' in said, said


def test_bootstrap_with_the_ros2_tools_ends_at_ready():
    tools = ROOT.parent / "shared" / "ros2-tools"
    if not tools.is_dir():
        import pytest
        pytest.skip(f"{tools} is not here")
    assert _bootstrap() == []
