"""A camera policy served by the node: LeRobot SmolVLA (test/data/smolvla/one_cam: camera `top`,
state 6, action 6) fed sensor_msgs/Image or CompressedImage and JointState over DDS.

Each action chunk is compared byte for byte with a VLARuntime built here and given the same
inputs in the same order (the runtime's sampler is state, so the calls must match one for one).
"""
import os

import numpy as np
import pytest

from flashrt_ros.ros.waiting import wait_for
from node_client import chunk_bytes, make_node, ros_context  # noqa: F401 - fixtures

pytestmark = pytest.mark.ros

MODEL = os.path.join(os.path.dirname(__file__), "data", "smolvla", "one_cam")
JOINTS = [f"j{i}" for i in range(6)]
TASK = "pick up the cube"
H, W = 40, 56


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def states(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def reference():
    """A VLARuntime of the fixture, as the node builds it (CPU, sampler seed 0)."""
    from flashrt_ros.core.config import RuntimeConfig
    from flashrt_ros.core.runtime import PolicyRuntime
    return lambda: PolicyRuntime.from_pretrained(MODEL, RuntimeConfig(device="cpu"))


class CameraRig:
    """Publishers of the node's camera and joint-state inputs (reliable, as a bag replay's)."""

    def __init__(self, n):
        from sensor_msgs.msg import CompressedImage, Image, JointState
        c = n.client
        ns = c.target.rsplit("/", 1)[0]
        self.c, self.node = c, n.node
        self.image = c.publisher(Image, f"{c.target}/images/top")
        self.compressed = c.publisher(CompressedImage, f"{c.target}/images/top/compressed")
        self.joints = c.publisher(JointState, f"{ns}/joint_states")
        wait_for(lambda: all(p.get_subscription_count() for p in
                             (self.image, self.compressed, self.joints)) and c.statuses,
                 15, "the node's camera and joint-state subscriptions")
        self.t = self.now()

    def now(self) -> int:
        return self.c.node.get_clock().now().nanoseconds

    def stamp(self, k: int, offset_ns: int = 0):
        """Input k's stamp: 33 ms apart from the rig's start, or `offset_ns` from it."""
        from builtin_interfaces.msg import Time
        ns = self.t + k * 33_000_000 + offset_ns
        return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)

    def send_state(self, k: int, state):
        from sensor_msgs.msg import JointState
        msg = JointState(name=list(reversed(JOINTS)),
                         position=[float(x) for x in reversed(state)])
        msg.header.stamp = self.stamp(k)
        self.joints.publish(msg)

    def send_image(self, k: int, frame, encoding="rgb8", offset_ns=0):
        from sensor_msgs.msg import Image

        from flashrt_ros.inputs.images import to_image_msg_fields
        h, w, enc, step, data = to_image_msg_fields(frame, "rgb8")
        msg = Image(height=h, width=w, encoding=encoding, step=step, data=data)
        msg.header.stamp = self.stamp(k, offset_ns)
        self.image.publish(msg)

    def send_png(self, k: int, frame):
        from sensor_msgs.msg import CompressedImage

        from flashrt_ros.inputs.images import to_compressed_msg_fields
        fmt, data = to_compressed_msg_fields(frame, "png")
        msg = CompressedImage(format=fmt, data=data)
        msg.header.stamp = self.stamp(k)
        self.compressed.publish(msg)

    def action(self, count: int):
        wait_for(lambda: len(self.c.actions) >= count, 30, f"action {count} from the node")
        return self.c.actions[count - 1]


def camera_node(make_node, **params):
    params.setdefault("control_mode", "observation")
    n = make_node(model=MODEL, observation_qos="reliable", joint_names=JOINTS, instruction=TASK,
                  status_rate_hz=20.0, **params)
    assert n.client.transition("configure") and n.client.transition("activate")
    return n, CameraRig(n)


def test_synchronized_image_and_joint_state_give_the_runtimes_chunks(make_node, reference):
    # stale_observation_s 0: the stamps are the rig's, however long a busy machine takes
    n, rig = camera_node(make_node, stale_observation_s=0.0)
    ref = reference()
    f, s = frames(3), states(3)
    expected = []
    for k in range(3):
        batch = {"observation.state": s[k], "observation.images.top": f[k], "task": TASK}
        expected.append(ref.predict_action_chunk(batch).astype(np.float32).tobytes())
    rig.send_state(0, s[0])
    rig.send_image(0, f[0])                 # rgb8
    rig.send_image(1, f[1])                 # the frame may come first
    rig.send_state(1, s[1])
    rig.send_png(2, f[2])                   # lossless: the same frame
    rig.send_state(2, s[2])
    got = [rig.action(k + 1) for k in range(3)]
    assert [chunk_bytes(a) for a in got] == expected
    assert [(a.horizon, a.action_dim) for a in got] == [(10, 6)] * 3
    assert [a.observation_stamp for a in got] == [rig.stamp(k) for k in range(3)]
    # lockstep: once per complete set; a state alone waits for its frame (the camera is not
    # stale: stale_observation_s is 0)
    incomplete = n.node.inputs.incomplete
    rig.send_state(3, s[0])
    wait_for(lambda: n.node.inputs.sync.status().queued["state"] == 1, 15, "the lone state queued")
    assert n.node.inputs.sync.status().sets == 3 and n.node.inputs.incomplete == incomplete
    assert len(n.client.actions) == 3 and n.node.runtime.step_count == 3
    # the capsule services take the VLA's state: a restore gives the same chunk again (the
    # sampler is in the state)
    assert n.client.capsule("snapshot", name="after-3").success
    rig.send_image(4, f[0])
    rig.send_state(4, s[0])
    again = {"observation.state": s[0], "observation.images.top": f[0], "task": TASK}
    assert chunk_bytes(rig.action(4)) == ref.predict_action_chunk(again).astype(np.float32).tobytes()
    assert n.client.capsule("restore", name="after-3").success
    rig.send_image(5, f[0])
    rig.send_state(5, s[0])
    assert chunk_bytes(rig.action(5)) == chunk_bytes(n.client.actions[3])
    # ~/instruction is the task of the observations after it
    from std_msgs.msg import String

    from flashrt_ros.ros.publishing import LATCHED
    n.client.publisher(String, f"{n.client.target}/instruction", qos=LATCHED).publish(
        String(data="place the cube"))
    wait_for(lambda: n.node.inputs.task == "place the cube", 15, "the new task")
    rig.send_image(6, f[1])
    rig.send_state(6, s[1])
    placed = {"observation.state": s[1], "observation.images.top": f[1], "task": "place the cube"}
    assert chunk_bytes(rig.action(6)) == \
        ref.predict_action_chunk(placed).astype(np.float32).tobytes()


def test_wrong_encoding_and_missing_camera_are_counted_and_step_nothing(make_node):
    n, rig = camera_node(make_node, stale_observation_s=30.0)
    f, s = frames(2), states(3)
    rig.send_image(0, f[0], encoding="bgr16")
    wait_for(lambda: n.node._rejected == 1, 15, "the bgr16 image refused")
    assert "bgr16" in n.node._last_error and "rgb8" in n.node._last_error
    rig.send_state(0, s[0])                 # its frame was refused: the camera is missing
    wait_for(lambda: n.node.inputs.incomplete == 1, 15, "an incomplete observation counted")
    # a frame more than stale_observation_s older than the state: the camera is stale
    rig.send_image(1, f[1], offset_ns=-31_000_000_000)
    rig.send_state(1, s[1])
    wait_for(lambda: n.node.inputs.incomplete == 2, 15, "a stale camera counted")
    assert n.node.inputs.stale_cameras() == ("top",)
    status = n.client.latest_status()
    assert status.stale_observations == 2 and status.step == 0
    diag = wait_for(lambda: next((kv for d in reversed(n.client.diagnostics) for st in d.status
                                  for kv in st.values if kv.key == "inputs.stale_cameras"), None),
                    15, "inputs.stale_cameras in /diagnostics")
    assert diag.value == "top"
    assert not n.client.actions
    # a task is refused by its length before it is decoded: 100 characters per kept token
    from rclpy.serialization import serialize_message
    from std_msgs.msg import String
    n.node._on_instruction(serialize_message(String(data="x" * (100 * 48 + 1))))
    assert n.node._rejected == 2 and "at most 4800 characters" in n.node._last_error
    assert n.node.inputs.task == TASK
    rig.send_image(2, f[1])                 # the node lives on: a complete set steps
    rig.send_state(2, s[2])
    assert rig.action(1).step == 1


def test_a_preset_that_is_a_directory_names_that_checkpoint(monkeypatch, tmp_path):
    """`model:=one_cam` with the fixtures as a preset directory: the directory; a YAML preset and
    a path are as before."""
    from flashrt_ros.core.checkpoint import model_directory
    from flashrt_ros.core.models import vla_family
    from flashrt_ros.core.models.qwen3_5.checkpoint_qwen3_5 import resolve_model
    monkeypatch.setenv("FLASHRT_PRESET_DIR", os.path.dirname(MODEL))
    assert model_directory("one_cam") == MODEL and vla_family(model_directory("one_cam"))
    assert model_directory("tiny") == "" and resolve_model("tiny").cfg.obs_dim == 14
    assert model_directory("./somewhere") == "./somewhere"
    assert model_directory("no_such_preset") == ""


def test_timer_mode_steps_on_the_newest_complete_set(make_node, reference):
    n, rig = camera_node(make_node, stale_observation_s=0.0, control_mode="timer",
                         control_rate_hz=20.0)
    f, s = frames(1), states(1)
    rig.send_image(0, f[0])
    rig.send_state(0, s[0])
    second = rig.action(2)                  # a tick after the first steps the same set again
    assert [a.observation_stamp for a in n.client.actions[:2]] == [rig.stamp(0)] * 2
    ref = reference()
    batch = {"observation.state": s[0], "observation.images.top": f[0], "task": TASK}
    assert chunk_bytes(n.client.actions[0]) == \
        ref.predict_action_chunk(batch).astype(np.float32).tobytes()
    assert chunk_bytes(second) == ref.predict_action_chunk(batch).astype(np.float32).tobytes()
    assert n.client.transition("deactivate")      # the timer stops before the node goes
