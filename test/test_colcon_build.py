"""The robot's build route: `colcon build` of a copy of this package, and the install tree it makes.

On a ROS 2 machine the package is built with colcon through CMakeLists.txt (not setup.py). Here the
same build runs against the venv's PyPI ROS wheels (AMENT_PREFIX_PATH = the venv prefix), into a
temporary build/install tree. The install tree must hold the generated interfaces beside the
hand-written package and the `ros2 run` executables, and `flashrt_ros.msg` must import from it alone.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("package.xml", "CMakeLists.txt", "msg", "srv", "flashrt_ros", "launch", "config", "scripts",
           "resource")
# Directories CMakeLists.txt installs with install(DIRECTORY): CMake fails on a missing one, and git
# keeps no empty directory, so each needs at least one file.
INSTALLED_DIRS = ("launch", "config")
BUILD_TIMEOUT_S = 240  # the build takes about 70 s on 2 cores; this only guards against a hang

# Runs in the install tree's environment; prints where the package, the generated module and the
# interface libraries came from.
IMPORT_CHECK = r"""
import json
import flashrt_ros, flashrt_ros.msg
from flashrt_ros.msg import CapsuleInfo
from rclpy.serialization import deserialize_message, serialize_message

info = CapsuleInfo(name="root", step=3, tier="host", digest="ab")
assert deserialize_message(serialize_message(info), CapsuleInfo) == info
with open("/proc/self/maps") as f:
    libs = sorted({line.split()[-1] for line in f if "libflashrt_ros__" in line})
print(json.dumps({"package": flashrt_ros.__file__, "msg": flashrt_ros.msg.__file__, "libs": libs}))
"""

pytestmark = [pytest.mark.slow, pytest.mark.ros]


def _copy_sources(dest):
    for name in INSTALLED_DIRS:
        path = os.path.join(ROOT, name)
        if not os.path.isdir(path) or not any(files for _, _, files in os.walk(path)):
            pytest.fail("%s/ is missing or holds no file; CMakeLists.txt installs it, so `colcon build` "
                        "fails without it (add its files)" % name, pytrace=False)
    for name in SOURCES:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest)


@pytest.fixture(scope="module")
def install_prefix(tmp_path_factory):
    """Builds a copy of the package with colcon; returns the package's install prefix."""
    work = tmp_path_factory.mktemp("colcon")
    src = work / "src" / "flashrt_ros"
    src.mkdir(parents=True)
    _copy_sources(str(src))
    venv_bin = os.path.dirname(sys.executable)
    env = dict(os.environ, AMENT_PREFIX_PATH=sys.prefix, PATH=venv_bin + os.pathsep + os.environ["PATH"])
    generator = ["-G", "Ninja"] if shutil.which("ninja", path=env["PATH"]) else []
    cmd = [os.path.join(venv_bin, "colcon"), "--log-base", str(work / "log"), "build",
           "--base-paths", str(work / "src"), "--build-base", str(work / "build"),
           "--install-base", str(work / "install"),
           "--event-handlers", "console_direct+",
           "--cmake-args", *generator, "-DPython3_EXECUTABLE=" + sys.executable, "-DBUILD_TESTING=OFF"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail("colcon build took over %d s:\n%s" % (BUILD_TIMEOUT_S, (e.output or "")[-4000:]))
    assert proc.returncode == 0, "colcon build failed:\n" + proc.stdout[-6000:]
    return work / "install" / "flashrt_ros"


def _site_packages(prefix):
    return prefix / "lib" / ("python%d.%d" % sys.version_info[:2]) / "site-packages"


def test_install_tree_holds_generated_and_handwritten_files(install_prefix):
    pkg = _site_packages(install_prefix) / "flashrt_ros"
    expected = [
        pkg / "__init__.py",
        pkg / "msg" / "__init__.py",
        pkg / "msg" / "_capsule_info.py",
        pkg / "srv" / "_snapshot.py",
        install_prefix / "lib" / "libflashrt_ros__rosidl_typesupport_c.so",
        install_prefix / "lib" / "flashrt_ros" / "flashrt_node",
        install_prefix / "lib" / "flashrt_ros" / "flashrt-ros",
        install_prefix / "share" / "flashrt_ros" / "package.xml",
        install_prefix / "share" / "ament_index" / "resource_index" / "packages" / "flashrt_ros",
    ]
    missing = [str(p.relative_to(install_prefix)) for p in expected if not p.exists()]
    assert not missing, "install tree %s lacks %s" % (install_prefix, missing)
    # The hand-written package, not rosidl's empty __init__, is what gets imported.
    assert "extend_path" in (pkg / "__init__.py").read_text()
    for exe in ("flashrt_node", "flashrt-ros"):
        assert os.access(install_prefix / "lib" / "flashrt_ros" / exe, os.X_OK), exe + " is not executable"
    for name in os.listdir(os.path.join(ROOT, "flashrt_ros")):
        if name.endswith(".py"):
            assert (pkg / name).exists(), "flashrt_ros/%s was not installed" % name
    for name in INSTALLED_DIRS:
        assert (install_prefix / "share" / "flashrt_ros" / name).is_dir(), "share/flashrt_ros/%s missing" % name


def test_generated_msg_imports_from_install_tree(install_prefix, ros_env):
    site = _site_packages(install_prefix)
    lib = install_prefix / "lib"
    # The venv's .pth would re-exec Python with LD_LIBRARY_PATH in set order (so the venv's own copy of
    # the interface libraries could come first); with its guard set, install/lib comes first for sure.
    wheel_libs = [os.path.join(sysconfig.get_paths()["purelib"], d)
                  for d in os.listdir(sysconfig.get_paths()["purelib"]) if d.startswith("ros_") and d.endswith(".libs")]
    env = dict(ros_env, PYTHONPATH=str(site), _ROS_WHEELS_BOOTSTRAP_COMPLETE="1",
               LD_LIBRARY_PATH=os.pathsep.join([str(lib), *wheel_libs, os.path.join(sys.prefix, "lib")]))
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK], env=env, cwd=str(install_prefix),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, "importing from the install tree failed:\n" + proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["package"].startswith(str(site)), found
    assert found["msg"].startswith(str(site)), found
    assert found["libs"] and all(p.startswith(str(lib)) for p in found["libs"]), found


def install_env(install_prefix, ros_env, tmp_path):
    """What `source install/setup.bash` gives a shell: the install prefix first in the ament index
    and on PYTHONPATH/LD_LIBRARY_PATH. On PATH only a `python3` (the scripts' `#!/usr/bin/env
    python3`), none of this venv's console scripts: a launch must find the package's executables
    in lib/flashrt_ros/ as on a robot."""
    site, lib = _site_packages(install_prefix), install_prefix / "lib"
    wheel_libs = [os.path.join(sysconfig.get_paths()["purelib"], d)
                  for d in os.listdir(sysconfig.get_paths()["purelib"]) if d.startswith("ros_") and d.endswith(".libs")]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # a wrapper, not a link: a linked interpreter would not find the venv (its pyvenv.cfg)
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    return dict(ros_env, PYTHONPATH=str(site), _ROS_WHEELS_BOOTSTRAP_COMPLETE="1",
                AMENT_PREFIX_PATH=os.pathsep.join([str(install_prefix), sys.prefix]),
                LD_LIBRARY_PATH=os.pathsep.join([str(lib), *wheel_libs, os.path.join(sys.prefix, "lib")]),
                PATH=os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"]), HOME=str(tmp_path))


@pytest.mark.ros2cli
def test_ros2_launch_record_runs_the_installed_recorder(install_prefix, ros_env, tmp_path):
    """`ros2 launch ... record:=true` on a colcon install: the recorder is the package's
    lib/flashrt_ros/flashrt-ros (not a `flashrt-ros` on PATH, which a colcon install has none of)."""
    from flashrt_ros.ros.process import NodeProcess, executable
    env = install_env(install_prefix, ros_env, tmp_path)
    prefix = subprocess.run([executable("ros2"), "pkg", "prefix", "flashrt_ros"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert prefix.stdout.strip() == str(install_prefix), prefix.stdout + prefix.stderr
    cmd = [executable("ros2"), "launch", "flashrt_ros", "flashrt_policy.launch.py", "device:=cpu",
           f"namespace:=colcon_{os.getpid()}", "record:=true", f"bag:={tmp_path / 'bag'}"]
    with NodeProcess(cmd, env, stop_timeout=30) as proc:
        # the recorder runs (waiting for the node): found in lib/flashrt_ros/, PATH has none
        proc.wait_log("[record] mcap bag")
        assert "process has died" not in proc.log(), proc.log(40)
