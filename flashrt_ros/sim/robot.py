"""The simulated robot as a ROS node: publishes the arm's observations, applies the node's actions.

The arm itself (`SimArm`, ROS-free) is in `arm.py`; the first row of each action chunk is its
joint velocity command.

Modes: `rate` publishes at a fixed rate (the policy node steps on its own timer); `lockstep`
publishes the next observation only after the action for the previous one arrived.

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

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, QoSReliabilityPolicy

from flashrt_ros.msg import ActionChunk, Observation
from flashrt_ros.sim.arm import SimArm


class SimRobotNode(Node):
    def __init__(self, policy: str = "/flashrt_policy", obs_dim: int = 14, action_dim: int = 7,
                 rate_hz: float = 30.0, lockstep: bool = False, seed: int = 0, steps: int = 0,
                 context=None):
        super().__init__("flashrt_sim_robot", context=context)
        self.arm = SimArm(obs_dim, action_dim, 1.0 / rate_hz, seed)
        self.lockstep, self.max_steps = lockstep, steps
        qos = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
        self.pub = self.create_publisher(Observation, f"{policy}/observation", qos)
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
            msg = Observation()
            msg.header.stamp = self.get_clock().now().to_msg()
            msg.header.frame_id = "sim_arm"
            msg.state = self.arm.observe().tolist()
            self.pub.publish(msg)
            self.sent += 1
            self._waiting = True

    def _policy_matched(self) -> bool:
        """The policy node hears the observations and we hear its actions; says once that it
        waits for that."""
        if self.pub.get_subscription_count() and self.sub.get_publisher_count():
            return True
        if not self._said_waiting:
            self._said_waiting = True
            self.get_logger().info(f"lockstep: waiting for the policy node to subscribe "
                                   f"{self.pub.topic_name} and publish {self.sub.topic_name}")
        return False

    def _on_action(self, msg: ActionChunk):
        chunk = np.asarray(msg.data, dtype=np.float32).reshape(msg.horizon, msg.action_dim)
        self.arm.apply(chunk[0])
        self.actions += 1
        self.last_action = msg
        self._waiting = False


def main(argv=None):
    p = argparse.ArgumentParser(prog="flashrt-ros sim", description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="/flashrt_policy", help="the policy node's name/namespace")
    p.add_argument("--obs-dim", type=int, default=14)
    p.add_argument("--action-dim", type=int, default=7)
    p.add_argument("--rate", type=float, default=30.0, help="observation rate (Hz)")
    p.add_argument("--lockstep", action="store_true", help="wait for each action before the next observation")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rclpy.init()
    node = SimRobotNode(a.policy, a.obs_dim, a.action_dim, a.rate, a.lockstep, a.seed)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
