"""The node serving a camera policy on CUDA, through real rclpy over DDS on loopback: the preset
smolvla-tiny (camera `top`, the state of 2 joint positions) fed sensor_msgs/Image (rgb8, bgr8)
and CompressedImage (png, jpeg) frames joined with JointState by stamp, in lockstep.

The GPU twin of test_node_cameras.py (its CameraRig publishes here too). On CUDA each frame goes
from the message's bytes (a host view, or for jpeg the nvjpeg decoder's CUDA tensor where
torchvision has it) through CuPy's one-pass kernel straight into the runtime's static image buffer
that the captured prefix plan reads (inputs/preprocess.py): the test counts the kernel's frames
(`prepared_counts`), finds that buffer unmoved and holding the kernel's output, and compares each
action chunk with the one `PolicyRuntime.from_pretrained("smolvla-tiny", RuntimeConfig(device=
"cuda"))` gives through the Python API for the same frames in the same order. Tolerance: none,
the chunks' bytes are compared. Both runtimes live in this process on one GPU and run the same
captured plans on the same input bytes, which gives the same bytes (a difference is a defect: the
message says by how much).

Marker gpu (skipped without a CUDA GPU) and ros (skipped without rclpy and the interfaces; a
failure where FLASHRT_REQUIRE_ROS=1). On the lent GPU machine: `source tools/gpu-ros-setup.sh`,
then `python3 -m pytest test/test_node_gpu.py`.
"""
import numpy as np
import pytest

from flashrt_ros.ros.waiting import wait_for
from node_client import chunk_bytes, make_node, ros_context  # noqa: F401 - fixtures
from test_node_cameras import CameraRig

MODEL = "smolvla-tiny"
JOINTS = ["shoulder", "elbow"]          # the preset's state: these joints' positions
TASK = "reach the red target"
H, W = 240, 320                         # a camera's frame, fitted into the preset's 48x48


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def states(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, len(JOINTS))).astype(np.float32)


def frame_message(frame: np.ndarray, kind: str):
    """`frame` as a camera driver sends it: kind an Image encoding (rgb8, bgr8) or a
    CompressedImage format (png, jpeg)."""
    from sensor_msgs.msg import CompressedImage, Image

    from flashrt_ros.inputs.images import to_compressed_msg_fields, to_image_msg_fields
    if kind in ("png", "jpeg"):
        fmt, data = to_compressed_msg_fields(frame, kind)
        return CompressedImage(format=fmt, data=data)
    height, width, encoding, step, data = to_image_msg_fields(frame, kind)
    return Image(height=height, width=width, encoding=encoding, step=step, data=data)


class JointRig(CameraRig):
    """CameraRig with the preset's joints, sending frame messages of any kind."""

    def send_state(self, k: int, state):
        from sensor_msgs.msg import JointState
        msg = JointState(name=list(reversed(JOINTS)), position=[float(x) for x in reversed(state)])
        msg.header.stamp = self.stamp(k)
        self.joints.publish(msg)

    def send_frame(self, k: int, msg):
        msg.header.stamp = self.stamp(k)
        (self.compressed if hasattr(msg, "format") else self.image).publish(msg)


@pytest.mark.ros
@pytest.mark.gpu
@pytest.mark.parametrize("kinds", [("rgb8", "bgr8", "png"), ("jpeg",)], ids=["raw-png", "jpeg"])
def test_camera_frames_are_prepared_on_the_gpu_into_the_plans_buffer(make_node, kinds):
    import torch

    from flashrt_ros.core.config import RuntimeConfig
    from flashrt_ros.core.runtime import PolicyRuntime
    from flashrt_ros.inputs.images import to_frame
    from flashrt_ros.inputs.preprocess import (KERNEL_ATOL, prepare_frame_reference,
                                               prepared_counts)
    n = make_node(model=MODEL, observation_qos="reliable", joint_names=JOINTS, instruction=TASK,
                  control_mode="observation", stale_observation_s=0.0, status_rate_hz=20.0,
                  **{"runtime.device": "cuda"})
    assert n.client.transition("configure") and n.client.transition("activate")
    rt = n.node.runtime
    assert rt.device.type == "cuda" and rt.use_graphs and all(p.captured for p in rt.plans.values())
    pixels, address = rt.io.pixels, rt.io.pixels.data_ptr()
    rig = JointRig(n)

    f, s = frames(len(kinds)), states(len(kinds))
    msgs = [frame_message(frame, kind) for frame, kind in zip(f, kinds)]
    # what the node makes of each message: a view of its bytes, or the decoded frame (nvjpeg's
    # CUDA tensor for jpeg where torchvision has it)
    seen = [to_frame(m, rt.device) for m in msgs]
    ref = PolicyRuntime.from_pretrained(MODEL, RuntimeConfig(device="cuda"))
    expected = [ref.predict_action_chunk({"observation.state": s[k],
                                          "observation.images.top": seen[k], "task": TASK})
                for k in range(len(kinds))]
    before = prepared_counts()

    for k, msg in enumerate(msgs):          # lockstep, as a robot's loop: a set, its chunk
        if k % 2:
            rig.send_frame(k, msg)          # the frame may come first
            rig.send_state(k, s[k])
        else:
            rig.send_state(k, s[k])
            rig.send_frame(k, msg)
        got = rig.action(k + 1)
        assert got.observation_stamp == rig.stamp(k)
        chunk = np.asarray(got.data, dtype=np.float32).reshape(got.horizon, got.action_dim)
        assert chunk.shape == expected[k].shape == (10, 2)
        assert chunk.tobytes() == expected[k].astype(np.float32).tobytes(), \
            f"{kinds[k]}: max |node - Python API| {np.abs(chunk - expected[k]).max():.3g}"

    after = prepared_counts()
    assert after["cuda-kernel"] - before["cuda-kernel"] == len(kinds), (before, after)
    assert after["torch"] == before["torch"], "a frame took the torch path on CUDA"
    # the kernel wrote the last frame into the buffer the captured prefix plan reads: the same
    # storage as at configure, holding what the reference runtime's kernel wrote and what
    # torch's path computes
    assert rt.io.pixels is pixels and pixels.data_ptr() == address
    assert torch.equal(pixels, ref.io.pixels)
    torch_path = torch.empty_like(pixels[0])
    prepare_frame_reference(seen[-1], torch_path)
    err = (pixels[0] - torch_path).abs().max().item()
    assert err <= KERNEL_ATOL, f"max |kernel - torch| {err:.3g} over {KERNEL_ATOL}"
    assert n.node._rejected == 0, n.node._last_error
    assert n.client.transition("deactivate")


def test_prepared_counts_count_the_path_each_frame_took():
    import torch

    from flashrt_ros.inputs.preprocess import prepare_frame, prepared_counts
    before = prepared_counts()
    out = torch.empty(3, 48, 48)
    for frame in frames(2):
        prepare_frame(frame, out)
    after = prepared_counts()
    assert after["torch"] - before["torch"] == 2
    assert after["cuda-kernel"] == before["cuda-kernel"]
