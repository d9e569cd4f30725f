"""The simulated robot as a ROS node: publishes the arm's observations, applies the node's actions.

The arm itself (`SimArm`, ROS-free) is in `arm.py`; the first row of each action chunk is its
joint velocity command.

Modes: `rate` publishes at a fixed rate (the policy node steps on its own timer); `lockstep`
publishes the next observation only after the action for the previous one arrived.

With a camera (`CameraFeed`: a camera policy, e.g. SmolVLA), the robot publishes what a robot with
a camera publishes: `sensor_msgs/JointState` on `joint_states` beside the policy node (joints
`j0`, `j1`, ...: positions and velocities, the VLA's state), and the frame of the camera over the
arm (sim/camera.py) as `sensor_msgs/Image` (rgb8) on `<policy>/images/<camera>` at the camera's
own rate: on the first state tick at least a camera period after the last frame, stamped with
that tick's stamp, so the policy node joins the two by stamp. Without a camera it publishes
`flashrt_ros/Observation` on `<policy>/observation`.

Pausing. `pause()` and `resume()` may be called from any thread while an executor spins the node:
they set a flag that the timer callback reads, under a lock the callback holds while it publishes,
so once `pause()` returns no further observation goes out. The timer itself keeps running: a timer
cancelled by another thread while the executor holds it ready raises out of rclpy 7.1.6's (Jazzy's)
executor (`RCLError: timer is canceled`; later rclpy skips it as TimerCancelledError), which kills
the spin thread.
"""
from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, QoSReliabilityPolicy
from sensor_msgs.msg import Image, JointState

from flashrt_ros.inputs.images import to_image_msg_fields
from flashrt_ros.msg import ActionChunk, Observation
from flashrt_ros.ros.stamps import stamp_to_ns
from flashrt_ros.sim.arm import SimArm
from flashrt_ros.sim.camera import ArmCamera


@dataclass(frozen=True)
class CameraFeed:
    """A camera over the simulated arm: its topic's name under the policy node, frame size and
    rate."""
    name: str = "top"
    width: int = 96
    height: int = 96
    rate_hz: float = 30.0


def joint_names(n: int) -> list:
    """The simulated arm's joint names."""
    return [f"j{i}" for i in range(n)]


class SimRobotNode(Node):
    def __init__(self, policy: str = "/flashrt_policy", obs_dim: int = 14, action_dim: int = 7,
                 rate_hz: float = 30.0, lockstep: bool = False, seed: int = 0, steps: int = 0,
                 context=None, camera: CameraFeed | None = None):
        super().__init__("flashrt_sim_robot", context=context)
        self.arm = SimArm(obs_dim, action_dim, 1.0 / rate_hz, seed)
        self.lockstep, self.max_steps = lockstep, steps
        qos = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
        self.feed, self.camera, self.pub_image, self._last_frame_ns = camera, None, None, None
        if camera is None:
            self.pub = self.create_publisher(Observation, f"{policy}/observation", qos)
        else:
            self.camera = ArmCamera(width=camera.width, height=camera.height)
            self.pub = self.create_publisher(JointState, joint_states_topic(policy), qos)
            self.pub_image = self.create_publisher(Image, f"{policy}/images/{camera.name}", qos)
            self.frames = 0
        self.sub = self.create_subscription(ActionChunk, f"{policy}/action", self._on_action, qos)
        self.sent = 0
        self.actions = 0
        self.last_action = None
        self.paused = False
        self._publishing = threading.Lock()      # held by _tick while it decides and publishes
        self.timer = self.create_timer(1.0 / rate_hz, self._tick)
        self._waiting = False
        self._said_waiting = False

    @property
    def done(self) -> bool:
        return self.max_steps > 0 and self.actions >= self.max_steps

    def pause(self):
        """Send no more observations (any thread); an observation already sent still gets its action."""
        with self._publishing:
            self.paused = True

    def resume(self):
        with self._publishing:
            self.paused = False

    def _tick(self):
        with self._publishing:
            if self.paused or self.done or (self.lockstep and self._waiting and self.sent > 0):
                return
            if self.lockstep and self.sent == 0 and not self._policy_matched():
                return          # lockstep waits for an action: the first observation must arrive
            stamp = self.get_clock().now().to_msg()
            if self.camera is None:
                msg = Observation(state=self.arm.observe().tolist())
            else:
                self._publish_frame(stamp)
                msg = JointState(name=joint_names(self.arm.action_dim),
                                 position=self.arm.q.tolist(), velocity=self.arm.qd.tolist())
            msg.header.stamp = stamp
            msg.header.frame_id = "sim_arm"
            self.pub.publish(msg)
            self.sent += 1
            self._waiting = True

    def _publish_frame(self, stamp) -> None:
        """The camera's frame, stamped as this tick's joint state, when a camera period has
        passed since the last one (always in lockstep: one frame per observation)."""
        now = stamp_to_ns(stamp)
        # due half a state tick early: a camera at the state's rate sends a frame every tick
        due_ns = int(1e9 / self.feed.rate_hz - 0.5e9 * self.arm.dt)
        if not self.lockstep and self._last_frame_ns is not None and \
                now - self._last_frame_ns < due_ns:
            return
        self._last_frame_ns = now
        height, width, encoding, step, data = to_image_msg_fields(self.camera.render_arm(self.arm))
        msg = Image(height=height, width=width, encoding=encoding, step=step, data=data)
        msg.header.stamp, msg.header.frame_id = stamp, "sim_camera"
        self.pub_image.publish(msg)
        self.frames += 1

    def _policy_matched(self) -> bool:
        """The policy node hears the observations and we hear its actions; says once that it
        waits for that."""
        if self.pub.get_subscription_count() and self.sub.get_publisher_count() and (
                self.pub_image is None or self.pub_image.get_subscription_count()):
            return True
        if not self._said_waiting:
            self._said_waiting = True
            images = f" and {self.pub_image.topic_name}" if self.pub_image is not None else ""
            self.get_logger().info(f"lockstep: waiting for the policy node to subscribe "
                                   f"{self.pub.topic_name}{images} and publish "
                                   f"{self.sub.topic_name}")
        return False

    def _on_action(self, msg: ActionChunk):
        chunk = np.asarray(msg.data, dtype=np.float32).reshape(msg.horizon, msg.action_dim)
        self.arm.apply(chunk[0])
        self.actions += 1
        self.last_action = msg
        self._waiting = False


def joint_states_topic(policy: str) -> str:
    """`joint_states` in the policy node's namespace (the node subscribes it relative)."""
    namespace = policy.rsplit("/", 1)[0]
    return f"{namespace}/joint_states"


def main(argv=None):
    p = argparse.ArgumentParser(prog="flashrt-ros sim", description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="/flashrt_policy", help="the policy node's name/namespace")
    p.add_argument("--obs-dim", type=int, default=14)
    p.add_argument("--action-dim", type=int, default=7)
    p.add_argument("--rate", type=float, default=30.0, help="observation rate (Hz)")
    p.add_argument("--lockstep", action="store_true", help="wait for each action before the next observation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--camera", default="", help="publish JointState and this camera's frames "
                                                "(<policy>/images/<camera>) for a camera policy")
    p.add_argument("--camera-size", type=int, nargs=2, default=(96, 96), metavar=("W", "H"))
    p.add_argument("--camera-rate", type=float, default=30.0, help="frames per second")
    a = p.parse_args(argv)
    rclpy.init()
    camera = CameraFeed(a.camera, *a.camera_size, a.camera_rate) if a.camera else None
    node = SimRobotNode(a.policy, a.obs_dim, a.action_dim, a.rate, a.lockstep, a.seed,
                        camera=camera)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
