"""Session setup shared by every test module.

DDS stays on loopback: before any test module can import rclpy, this module (pytest imports it
first) sets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, drops ROS_STATIC_PEERS, and picks a random
ROS_DOMAIN_ID in 1..101 unless one is set; FASTDDS_DEFAULT_PROFILES_FILE defaults to
config/fastdds.xml (a service reply waits for a client still being discovered). It writes them
into os.environ, so rclpy in this process and every child process a test starts inherit them, and
parallel test sessions don't see each other.

Markers (declared in pytest.ini), applied at test setup:
  ros   needs rclpy and the generated flashrt_ros.msg/srv. Skipped when they don't import, or failed
        when FLASHRT_REQUIRE_ROS=1 (tools/run-tests.sh sets it: its venv was just built with them,
        so a skip there would hide a broken build).
  ros2cli  needs the real `ros2` command-line tools (launch, run, param, service, ...): skipped
        without them, or failed when FLASHRT_REQUIRE_ROS2=1 (tools/run-tests.sh sets it where
        ../shared/ros2-tools is: the bootstrap installed them from there).
  gpu   needs a CUDA GPU; skipped when torch sees none.
  slow  takes more than a few seconds; no special handling.
"""
import os
import random

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.pop("ROS_STATIC_PEERS", None)
os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 101)))
# service replies wait up to 5 s for a client that is still being discovered (config/fastdds.xml)
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "fastdds.xml"))

import functools  # noqa: E402

import pytest  # noqa: E402

GPU_SKIP_REASON = "needs a CUDA GPU; CI has none — run on the device"


@functools.cache
def _ros_problem():
    """Why the `ros` tests cannot run here, or None when rclpy and the interfaces import."""
    try:
        import rclpy  # noqa: F401
        import flashrt_ros.msg  # noqa: F401
        import flashrt_ros.srv  # noqa: F401
    except ImportError as e:
        return ("needs rclpy and the generated flashrt_ros.msg/srv (%s); run `bash tools/bootstrap.sh`, "
                "or `colcon build` and `source install/setup.bash` on a ROS 2 machine" % e)
    return None


@functools.cache
def _has_cuda():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_report_header(config):
    return "DDS: ROS_AUTOMATIC_DISCOVERY_RANGE=%s ROS_DOMAIN_ID=%s" % (
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"], os.environ["ROS_DOMAIN_ID"])


def _missing(problem, require_variable):
    """Skip with `problem`, or fail where `require_variable`=1 says the setup provides it."""
    if problem is not None:
        if os.environ.get(require_variable) == "1":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)


def pytest_runtest_setup(item):
    if item.get_closest_marker("ros") is not None:
        _missing(_ros_problem(), "FLASHRT_REQUIRE_ROS")
    if item.get_closest_marker("ros2cli") is not None:
        from node_client import ros2_problem
        _missing(ros2_problem(), "FLASHRT_REQUIRE_ROS2")
    if item.get_closest_marker("gpu") is not None and not _has_cuda():
        pytest.skip(GPU_SKIP_REASON)


def pytest_sessionfinish(session):
    """A `ros2` verb run without --no-daemon starts the ros2cli daemon of this session's domain,
    which outlives the session: stop it (where this environment has the `ros2` tools)."""
    import subprocess
    import sys
    ros2 = os.path.join(os.path.dirname(sys.executable), "ros2")
    if os.path.exists(ros2):
        try:
            subprocess.run([ros2, "daemon", "stop"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="session")
def ros_env():
    """Environment for a child process: this session's loopback DDS settings, unbuffered output.

    Shared by the session: extend a copy (`dict(ros_env, KEY=value)`), never the dict itself.
    """
    env = dict(os.environ)
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    env["PYTHONUNBUFFERED"] = "1"
    return env
