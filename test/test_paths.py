"""The share-directory lookup (flashrt_ros.core.paths) reads the ament index by hand, in order.

Fake install prefixes in tmp_path stand in for a sourced ROS workspace: one without the ament
marker (ignored), one with it (found). Needs no ROS.
"""
import os
import sys
from pathlib import Path

from flashrt_ros.core import paths

MARKER = Path("share", "ament_index", "resource_index", "packages", "flashrt_ros")


def _prefix(root: Path, registered: bool, msg: bool = False) -> Path:
    share = root / "share" / "flashrt_ros"
    (share / "config" / "presets").mkdir(parents=True)
    if msg:
        (share / "msg").mkdir()
        (share / "msg" / "Observation.msg").write_text("float32[] state\n", encoding="utf-8")
    if registered:
        (root / MARKER).parent.mkdir(parents=True)
        (root / MARKER).write_text("", encoding="utf-8")
    return share


def test_the_ament_index_names_registered_prefixes_in_order(tmp_path, monkeypatch):
    _prefix(tmp_path / "plain", registered=False)
    first = _prefix(tmp_path / "ws1", registered=True)
    second = _prefix(tmp_path / "ws2", registered=True)
    monkeypatch.setenv("AMENT_PREFIX_PATH", os.pathsep.join(
        str(tmp_path / p) for p in ("plain", "ws1", "ws2", "missing")))
    assert paths.ament_share_dirs() == [first, second]
    dirs = paths.share_dirs()
    assert dirs[:2] == [first, second]
    assert dirs[-1] == paths.SOURCE_DIR                     # this test runs from a checkout
    assert paths.share_dirs(prefer_source=True)[0] == paths.SOURCE_DIR
    assert all(d.is_dir() for d in dirs)


def test_without_an_ament_environment_the_prefix_and_the_checkout_remain(monkeypatch):
    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    assert paths.ament_share_dirs() == []
    installed = Path(sys.prefix) / "share" / "flashrt_ros"
    assert paths.share_dirs() == [d for d in (installed, paths.SOURCE_DIR) if d.is_dir()]


def test_presets_and_message_definitions_use_the_lookup(tmp_path, monkeypatch):
    from flashrt_ros.bags.types import msg_dir
    from flashrt_ros.core.config import preset_dirs
    ws = _prefix(tmp_path / "ws", registered=True, msg=True)
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path / "ws"))
    monkeypatch.setenv("FLASHRT_PRESET_DIR", str(tmp_path / "mine"))
    dirs = preset_dirs()
    assert dirs[:2] == [str(tmp_path / "mine"), str(paths.SOURCE_DIR / "config" / "presets")]
    assert str(ws / "config" / "presets") in dirs
    assert msg_dir() == ws / "msg"                         # an installed copy before the checkout


CALL_WITHOUT_ROS = r"""
import importlib.abc, json, sys
attempts = []

class RefuseROS(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("rclpy", "ament_index_python", "rosidl_runtime_py") or top.startswith("rcl"):
            attempts.append(name)
            raise ImportError(name + " refused")
        return None

sys.meta_path.insert(0, RefuseROS())
from flashrt_ros.core.config import available_presets, preset_dirs, preset_path
from flashrt_ros.bags.types import msg_dir
found = [preset_dirs(), available_presets(), preset_path("hybrid-0.8b"), str(msg_dir())]
print(json.dumps({"ros_imports": attempts, "found": found}))
"""


def test_the_lookups_import_no_ros_when_called(tmp_path):
    """core/ imports no ROS, not even ament_index_python at call time (nor does msg_dir)."""
    import json
    import subprocess
    _prefix(tmp_path / "ws", registered=True, msg=True)
    env = dict(os.environ, AMENT_PREFIX_PATH=str(tmp_path / "ws"), _ROS_WHEELS_BOOTSTRAP_COMPLETE="1")
    proc = subprocess.run([sys.executable, "-c", CALL_WITHOUT_ROS], cwd=paths.SOURCE_DIR, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ros_imports"] == [], result
    _, presets, hybrid, msgs = result["found"]
    assert "tiny" in presets and hybrid.endswith("hybrid-0.8b.yaml")
    assert msgs == str(tmp_path / "ws" / "share" / "flashrt_ros" / "msg")
