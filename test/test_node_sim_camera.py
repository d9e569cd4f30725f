"""The simulated robot with a camera drives a camera policy (test/data/smolvla/one_cam) over DDS:
its joint states and rendered frames, stamped alike, join in the node, and each action chunk is
the one a VLARuntime built here gives for the same joint state and frame."""
import os

import numpy as np
import pytest

from flashrt_ros.ros.waiting import wait_for
from node_client import chunk_bytes, make_node, ros_context  # noqa: F401 - fixtures

pytestmark = pytest.mark.ros

MODEL = os.path.join(os.path.dirname(__file__), "data", "smolvla", "one_cam")
TASK = "reach the red target"
STEPS = 3


def test_sim_robot_camera_feeds_the_camera_policy_in_lockstep(make_node, ros_context):
    from sensor_msgs.msg import Image, JointState

    from flashrt_ros.core.config import RuntimeConfig
    from flashrt_ros.core.runtime import PolicyRuntime
    from flashrt_ros.inputs.images import image_to_frame
    from flashrt_ros.ros.executors import SingleThreadedExecutor, SpinThread
    from flashrt_ros.sim.robot import CameraFeed, SimRobotNode, joint_names
    n = make_node(model=MODEL, control_mode="observation", observation_qos="reliable",
                  joint_names=joint_names(3), instruction=TASK, stale_observation_s=0.0)
    c = n.client
    assert c.transition("configure") and c.transition("activate")
    ns = c.target.rsplit("/", 1)[0]
    states, frames = c.collect(JointState, f"{ns}/joint_states"), c.collect(Image, f"{c.target}/images/top")
    robot = SimRobotNode(c.target, obs_dim=6, action_dim=3, rate_hz=50.0, lockstep=True,
                         steps=STEPS, context=ros_context, camera=CameraFeed("top", 56, 40, 50.0))
    robot.pause()               # until this test hears what the robot sends, too
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(robot)
    spin = SpinThread(executor)
    spin.start()
    try:
        wait_for(lambda: robot.pub.get_subscription_count() == 2 and
                 robot.pub_image.get_subscription_count() == 2, 15,
                 "the node and this test subscribing the robot's joint states and frames")
        robot.resume()
        wait_for(lambda: robot.done, 60, f"{STEPS} lockstep steps of the robot")
        assert robot.frames == robot.sent == STEPS
        wait_for(lambda: len(states) >= STEPS and len(frames) >= STEPS, 15, "the robot's messages")
    finally:
        executor.shutdown(timeout_sec=2.0)
        spin.join(timeout=2.0)
        robot.destroy_node()
    ref = PolicyRuntime.from_pretrained(MODEL, RuntimeConfig(device="cpu"))
    for action, state, image in zip(c.actions[:STEPS], states, frames):
        assert state.header.stamp == image.header.stamp == action.observation_stamp
        batch = {"observation.state": np.asarray([*state.position, *state.velocity], np.float32),
                 "observation.images.top": image_to_frame(image), "task": TASK}
        assert chunk_bytes(action) == ref.predict_action_chunk(batch).astype(np.float32).tobytes()
