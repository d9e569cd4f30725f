"""The node's output side: a committed step -> the messages it publishes.

    ~/action            flashrt_ros/ActionChunk, every committed step: the chunk
                        [horizon, action_dim] with its step, episode and capsule lineage, the
                        observation's frame and stamp, and `latency_ms` from the observation's
                        receipt to the chunk, stamped with the node's clock when it is built
    ~/command           std_msgs/Float64MultiArray (`command_output: float64_multi_array`): the
                        chunk's first row, for a forward command controller
    ~/joint_trajectory  trajectory_msgs/JointTrajectory (`command_output: joint_trajectory`): one
                        point per chunk row, its first len(joint_names) values, `action_dt` (0: one
                        control period) apart

`Outputs` is made with the node, so `~/action` exists while the node is unconfigured too and a
subscriber has matched it before the first chunk; the command publisher follows the
configuration: `configure` creates it (its type is `command_output`'s), `cleanup` destroys it.
Every topic is reliable, depth 10 (`RELIABLE`, also the node's status and diagnostics).

Concurrency: `publish` runs in the step, in the node's control group, after the step committed
and outside `runtime.lock`: a capsule call never waits for a publication.
"""
from __future__ import annotations

import time

from rclpy.qos import QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from flashrt_ros.msg import ActionChunk
from flashrt_ros.ros.stamps import s_to_duration

RELIABLE = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                      history=QoSHistoryPolicy.KEEP_LAST)
# command_output -> (message type, topic)
COMMANDS = {"float64_multi_array": (Float64MultiArray, "~/command"),
            "joint_trajectory": (JointTrajectory, "~/joint_trajectory")}


class Outputs:
    """The node's publications of a step (see the module docstring)."""

    def __init__(self, node):
        self.node = node
        self.action = node.create_publisher(ActionChunk, "~/action", RELIABLE)
        self.command = None
        self.kind, self.joint_names, self.dt = "none", (), 0.0

    def configure(self, cfg) -> None:
        """The command publisher `cfg.command_output` names, if any; its joints and row
        spacing (fixed while the node is configured)."""
        self.kind, self.joint_names = cfg.command_output, list(cfg.joint_names)
        self.dt = cfg.action_dt or cfg.period_s
        if self.kind in COMMANDS:
            self.command = self.node.create_publisher(*COMMANDS[self.kind], RELIABLE)

    def cleanup(self) -> None:
        if self.command is not None:
            self.node.destroy_publisher(self.command)
            self.command = None

    def publish(self, action, header, step: int, episode: int, lineage: str,
                received_ns: int) -> None:
        """The chunk of a committed step and its command.

        Args:
            action: numpy [horizon, action_dim], the step's chunk.
            header: std_msgs/Header of the observation stepped on (its frame and stamp).
            received_ns: time.monotonic_ns() at that observation's receipt.
        """
        out = ActionChunk()
        out.header.stamp = self.node.get_clock().now().to_msg()
        out.header.frame_id = header.frame_id
        out.step, out.episode_id = step, episode
        out.horizon, out.action_dim = action.shape
        out.data = action.reshape(-1).tolist()
        out.observation_stamp = header.stamp
        out.capsule_lineage = lineage
        out.latency_ms = float((time.monotonic_ns() - received_ns) * 1e-6)
        self.action.publish(out)
        if self.command is not None:
            self.command.publish(self._command(action))

    def _command(self, action):
        if self.kind == "float64_multi_array":
            return Float64MultiArray(data=action[0].astype(float).tolist())
        traj = JointTrajectory()
        traj.header.stamp = self.node.get_clock().now().to_msg()
        traj.joint_names = list(self.joint_names)
        n = len(traj.joint_names)
        for i, row in enumerate(action):
            p = JointTrajectoryPoint(positions=row[:n].astype(float).tolist())
            p.time_from_start = s_to_duration((i + 1) * self.dt)
            traj.points.append(p)
        return traj
