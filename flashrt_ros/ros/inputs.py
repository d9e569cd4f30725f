"""The node's input side: ROS messages -> what a step takes, one class per kind of input.

    ObservationInput  flashrt_ros/Observation on `~/observation`: the state vector as sent
    JointStateInput   sensor_msgs/JointState on `joint_states` (when `joint_names` is set): the
                      named joints' positions, then velocities, in `joint_names`' order
    CameraInput       sensor_msgs/Image on `~/images/<camera>` and CompressedImage on
                      `~/images/<camera>/compressed`: a uint8 [H, W, 3] RGB frame
                      (inputs/images.py; a view of the message's data, decoded if compressed)

`Inputs` creates them from the node's configuration and the served model and hands the node what a
step takes, with the header it answers to and the observation's reset flag:

* a state-vector policy: the state, float32 [obs_dim], on each message (the node checks it);
* a camera policy (a VLA, whose config names `cameras`): a LeRobot batch ({`observation.state`,
  `observation.images.<camera>`..., `task`}) when the state and a frame of every camera are joined
  by header stamp within `sync_slop_s` (inputs/sync.py: ApproximateTime semantics, the newest
  complete set at once). A step never sees mismatched inputs: a state without a frame of every
  camera within the slop makes no batch. When a camera has sent nothing yet, or nothing within
  `stale_observation_s` of the newest input, each state message that finds it so is counted as
  an incomplete observation (`incomplete`, with the cameras' names in `stale_cameras()`); the node
  reports both. The task is the last `~/instruction` (or the `instruction` parameter).

A message that cannot be read (an image encoding other than those inputs/images.py accepts, a
state of the wrong size, a message without a stamp where stamps join the inputs) is refused
through `reject` with a message naming what was expected and found, and changes nothing.

Concurrency: every subscription is in the node's control group, so the callbacks run one at a
time, as the steps they start; the join has its own lock all the same. A compressed image is
decoded in its callback (Pillow on the CPU; nvjpeg for JPEG when the runtime is on CUDA).
"""
from __future__ import annotations

import numpy as np
from rclpy.qos import QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState

from flashrt_ros.core.exceptions import InputError
from flashrt_ros.inputs.images import to_frame
from flashrt_ros.inputs.sync import ApproximateSync
from flashrt_ros.msg import Observation
from flashrt_ros.ros.stamps import s_to_ns, stamp_to_ns

STATE_KEY, TASK_KEY, IMAGE_PREFIX = "observation.state", "task", "observation.images."
STATE_STREAM = "state"
RELIABLE_INPUT = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                            history=QoSHistoryPolicy.KEEP_LAST)


def input_qos(name: str) -> QoSProfile:
    """`observation_qos`: sensor_data (what camera and joint-state drivers publish with) or
    reliable (bag replay: nothing dropped)."""
    return qos_profile_sensor_data if name == "sensor_data" else RELIABLE_INPUT


def camera_name(key: str) -> str:
    """A camera feature key -> its topic's name: `observation.images.top` -> `top`."""
    name = key[len(IMAGE_PREFIX):] if key.startswith(IMAGE_PREFIX) else key
    return name.replace(".", "_")


class ObservationInput:
    """flashrt_ros/Observation on `~/observation`."""

    def __init__(self, node, qos, group, on_state):
        self.on_state = on_state
        self.subs = [node.create_subscription(Observation, "~/observation", self._on_message,
                                              qos, callback_group=group)]

    def _on_message(self, msg):
        self.on_state(np.asarray(msg.state, dtype=np.float32), msg.header,
                      bool(msg.reset_episode))


class JointStateInput:
    """sensor_msgs/JointState on `joint_states`: `joint_names`' positions (then velocities, when
    the policy's state is twice their number), in that order, whatever the message's order."""

    def __init__(self, node, joint_names, state_dim: int, qos, group, on_state, reject):
        self.names, self.velocities = tuple(joint_names), state_dim == 2 * len(joint_names)
        self.on_state, self.reject = on_state, reject
        self.subs = [node.create_subscription(JointState, "joint_states", self._on_message, qos,
                                              callback_group=group)]

    def _on_message(self, msg):
        names = self.names
        index = {n: i for i, n in enumerate(msg.name)}
        missing = [n for n in names if n not in index]
        if missing or len(msg.position) != len(msg.name):
            self.reject(f"joint_states: expected joints {list(names)} with positions, missing "
                        f"{missing}, {len(msg.position)} positions for {len(msg.name)} names")
            return
        values = [msg.position[index[n]] for n in names]
        if self.velocities:
            if len(msg.velocity) != len(msg.name):
                self.reject(f"joint_states: a state of {2 * len(names)} values needs positions "
                            f"and velocities of {len(names)} joints, found {len(msg.velocity)} "
                            f"velocities for {len(msg.name)} names")
                return
            values += [msg.velocity[index[n]] for n in names]
        self.on_state(np.asarray(values, dtype=np.float32), msg.header, False)


class CameraInput:
    """One camera: sensor_msgs/Image on `~/images/<name>` and CompressedImage on
    `~/images/<name>/compressed` (either may be remapped; a camera driver publishes one of them)."""

    def __init__(self, node, key: str, qos, group, on_frame, reject, device=None):
        self.key, self.name = key, camera_name(key)
        self.on_frame, self.reject, self.device = on_frame, reject, device
        topic = f"~/images/{self.name}"
        self.subs = [node.create_subscription(Image, topic, self._on_message, qos,
                                              callback_group=group),
                     node.create_subscription(CompressedImage, f"{topic}/compressed",
                                              self._on_message, qos, callback_group=group)]

    def _on_message(self, msg):
        try:
            frame = to_frame(msg, self.device)
        except InputError as e:
            self.reject(f"images/{self.name}: {e}")
            return
        self.on_frame(self.name, frame, msg.header)


class Inputs:
    """The node's inputs for one configured model (see the module docstring)."""

    def __init__(self, node, cfg, model_cfg, state_dim: int, group, accept, reject, device=None):
        self.accept, self.reject = accept, reject
        self.cameras = {camera_name(k): k for k in getattr(model_cfg, "cameras", ())}
        self.state_dim = state_dim
        self.task = cfg.instruction
        self.incomplete = 0
        qos = input_qos(cfg.observation_qos)
        on_state = self._on_state if self.cameras else accept
        self.parts = [ObservationInput(node, qos, group, on_state)]
        if cfg.joint_names:
            self.parts.append(JointStateInput(node, cfg.joint_names, state_dim, qos, group,
                                              on_state, reject))
        self.parts += [CameraInput(node, key, qos, group, self._on_frame, reject, device)
                       for key in self.cameras.values()]
        self.sync = None
        if self.cameras:
            age = s_to_ns(cfg.stale_observation_s) if cfg.stale_observation_s else None
            self.sync = ApproximateSync((STATE_STREAM, *self.cameras), s_to_ns(cfg.sync_slop_s),
                                        cfg.sync_queue_size, max_age_ns=age)

    def destroy(self, node) -> None:
        for part in self.parts:
            for sub in part.subs:
                node.destroy_subscription(sub)
        self.parts = []

    def clear(self) -> None:
        """Forget queued inputs (a new activation: stamps start again)."""
        if self.sync is not None:
            self.sync.clear()

    def stale_cameras(self) -> tuple:
        """The cameras that have sent nothing, or nothing recent (see the module docstring)."""
        return tuple(s for s in self.sync.stale() if s != STATE_STREAM) if self.sync else ()

    # -- a camera policy's join ------------------------------------------------------------------
    def _stamp_ns(self, what: str, header) -> int | None:
        stamp = stamp_to_ns(header.stamp)
        if not stamp:
            self.reject(f"{what}: expected a header stamp (a camera policy joins the state and "
                        f"the frames by stamp), found none; stamp the message when it is taken")
            return None
        return stamp

    def _on_state(self, state, header, reset):
        if state.shape != (self.state_dim,) or not np.isfinite(state).all():
            self.reject(f"observation: expected {self.state_dim} finite values, found "
                        f"{state.size}{'' if np.isfinite(state).all() else ' (not all finite)'}"
                        f"{'; its reset_episode was not applied' if reset else ''}")
            return
        stamp = self._stamp_ns("observation", header)
        if stamp is not None:
            self._joined(self.sync.add(STATE_STREAM, stamp, (state, header, reset)), True)

    def _on_frame(self, name, frame, header):
        stamp = self._stamp_ns(f"images/{name}", header)
        if stamp is not None:
            self._joined(self.sync.add(name, stamp, frame), False)

    def _joined(self, joined, on_state: bool):
        if joined is None:
            if on_state and self.stale_cameras():
                self.incomplete += 1
            return
        state, header, reset = joined.items[STATE_STREAM]
        batch = {STATE_KEY: state, TASK_KEY: self.task}
        batch.update({key: joined.items[name] for name, key in self.cameras.items()})
        self.accept(batch, header, reset)
