"""A small simulated robot for demos and tests: publishes observations, applies actions.

A point-mass arm of `action_dim` joints: the first row of each action chunk is a joint velocity
command (clipped), integrated at the control period; a target pose drifts slowly. The observation
is [target - position, joint velocities, joint positions] cut or zero-padded to `obs_dim`: the
tiny preset's 14 values hold what the task needs (the error to close and how fast it closes).
Deterministic given its seed, so runs can be compared.

Modes: `rate` publishes at a fixed rate (the policy node steps on its own timer); `lockstep`
publishes the next observation only after the action for the previous one arrived.
"""
from __future__ import annotations

import argparse

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, QoSReliabilityPolicy

from flashrt_ros.msg import ActionChunk, Observation


class SimArm:
    def __init__(self, obs_dim: int, action_dim: int, dt: float, seed: int = 0):
        self.obs_dim, self.action_dim, self.dt = obs_dim, action_dim, dt
        self.rng = np.random.default_rng(seed)
        self.q = np.zeros(action_dim)
        self.qd = np.zeros(action_dim)
        self.target = self.rng.uniform(-1, 1, action_dim)
        self.t = 0

    def observe(self) -> np.ndarray:
        full = np.concatenate([self.target - self.q, self.qd, self.q])
        obs = np.zeros(self.obs_dim, dtype=np.float32)
        n = min(self.obs_dim, full.size)
        obs[:n] = full[:n]
        return obs

    def apply(self, action_row: np.ndarray) -> None:
        cmd = np.clip(np.asarray(action_row[: self.action_dim], dtype=np.float64), -2.0, 2.0)
        self.qd = 0.8 * self.qd + 0.2 * cmd
        self.q = np.clip(self.q + self.dt * self.qd, -np.pi, np.pi)   # joint limits
        self.t += 1
        self.target += 0.01 * self.rng.standard_normal(self.action_dim)

    def error(self) -> float:
        return float(np.linalg.norm(self.target - self.q))


class SimRobotNode(Node):
    def __init__(self, policy: str = "/flashrt_policy", obs_dim: int = 14, action_dim: int = 7,
                 rate_hz: float = 30.0, lockstep: bool = False, seed: int = 0, steps: int = 0):
        super().__init__("flashrt_sim_robot")
        self.arm = SimArm(obs_dim, action_dim, 1.0 / rate_hz, seed)
        self.lockstep, self.max_steps = lockstep, steps
        qos = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
        self.pub = self.create_publisher(Observation, f"{policy}/observation", qos)
        self.sub = self.create_subscription(ActionChunk, f"{policy}/action", self._on_action, qos)
        self.sent = 0
        self.actions = 0
        self.last_action = None
        self.timer = self.create_timer(1.0 / rate_hz, self._tick)
        self._waiting = False

    @property
    def done(self) -> bool:
        return self.max_steps > 0 and self.actions >= self.max_steps

    def _tick(self):
        if self.done or (self.lockstep and self._waiting and self.sent > 0):
            return
        msg = Observation()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = "sim_arm"
        msg.state = self.arm.observe().tolist()
        self.pub.publish(msg)
        self.sent += 1
        self._waiting = True

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
