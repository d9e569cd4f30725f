"""Bags with cameras: sensor_msgs/Image and CompressedImage topics recorded, read and replayed.

  * no ROS: a bag another tool wrote (rosbags' MCAP writer) with Image and CompressedImage
    topics reads back with every frame's bytes and stamps, and each state is joined with the
    frame the node's join takes; the types' hashes are rosidl's;
  * processes over DDS on loopback (marker `ros`): a SmolVLA node (test/data/smolvla/one_cam,
    camera `top`) driven with frames and states while `flashrt-ros record` writes the bag; the
    bag replays in lockstep into a fresh node with byte-identical action chunks, and the foreign
    bag plays into the node through `play --camera`.
Every wait has a deadline; no fixed sleeps.
"""
import json
import os
import re
import subprocess
import sys
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from flashrt_ros.ros.stamps import stamp_to_ns
from flashrt_ros.ros.waiting import spin_until, wait_for

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "test" / "data" / "smolvla" / "one_cam")      # camera top, state 6, action 6
JOINTS = [f"j{i}" for i in range(6)]
TASK = "pick up the cube"
H, W = 40, 56
T0 = 1_735_689_600_000_000_000           # 2025-01-01T00:00:00Z
PERIOD_NS = 33_000_000
FRAME_LAG_NS = 4_000_000                 # a frame is taken 4 ms before the joint state
FOREIGN_TOPICS = {"/cam/top/image_raw": "top", "/cam/top/image_raw/compressed": "top"}
STARTUP_TIMEOUT_S = 120
DISCOVERY_TIMEOUT_S = 20
STEP_TIMEOUT_S = 30


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def states(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 6)).astype(np.float32)


def write_foreign_camera_bag(path: Path, n: int = 8) -> dict:
    """A bag as another tool writes it (rosbags' rosbag2 Writer, MCAP): /joint_states, and the
    frames of one camera, even ones as rgb8 Image on /cam/top/image_raw, odd ones as png on its
    /compressed topic, each stamped FRAME_LAG_NS before its state and received 1 ms after it was
    stamped. Returns what was written: {"frames", "states", "stamps": [(frame, state)], "data"}."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from flashrt_ros.inputs.images import to_compressed_msg_fields, to_image_msg_fields
    store = get_typestore(Stores.ROS2_JAZZY)
    T = store.types
    Time, Header = T["builtin_interfaces/msg/Time"], T["std_msgs/msg/Header"]
    f, s = frames(n), states(n)

    def header(ns):
        return Header(stamp=Time(sec=ns // 10**9, nanosec=ns % 10**9), frame_id="top_camera")
    written = {"frames": f, "states": s, "stamps": [], "data": []}
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conns = {"image": w.add_connection("/cam/top/image_raw", "sensor_msgs/msg/Image",
                                           typestore=store),
                 "compressed": w.add_connection("/cam/top/image_raw/compressed",
                                                "sensor_msgs/msg/CompressedImage", typestore=store),
                 "joints": w.add_connection("/joint_states", "sensor_msgs/msg/JointState",
                                            typestore=store)}
        for k in range(n):
            t_state = T0 + k * PERIOD_NS
            t_frame = t_state - FRAME_LAG_NS
            if k % 2 == 0:
                h, wd, enc, step, data = to_image_msg_fields(f[k], "rgb8")
                msg = T["sensor_msgs/msg/Image"](
                    header=header(t_frame), height=h, width=wd, encoding=enc, is_bigendian=0,
                    step=step, data=np.frombuffer(data, dtype=np.uint8))
                kind, msgtype = "image", "sensor_msgs/msg/Image"
            else:
                fmt, data = to_compressed_msg_fields(f[k], "png")
                msg = T["sensor_msgs/msg/CompressedImage"](
                    header=header(t_frame), format=fmt, data=np.frombuffer(data, dtype=np.uint8))
                kind, msgtype = "compressed", "sensor_msgs/msg/CompressedImage"
            w.write(conns[kind], t_frame + 1_000_000, store.serialize_cdr(msg, msgtype))
            joints = T["sensor_msgs/msg/JointState"](
                header=header(t_state), name=list(JOINTS),
                position=s[k].astype(np.float64), velocity=np.zeros(0), effort=np.zeros(0))
            w.write(conns["joints"], t_state + 1_000_000,
                    store.serialize_cdr(joints, "sensor_msgs/msg/JointState"))
            written["stamps"].append((t_frame, t_state))
            written["data"].append(data)
    return written


# -- no ROS ----------------------------------------------------------------------------------
def test_image_types_hash_like_rosidl():
    """The definition and hash a recorder stores for the camera types are rosidl's."""
    from flashrt_ros.bags.types import type_hash
    from flashrt_ros.core.paths import share_dirs
    for name in ("Image", "CompressedImage"):
        found = [d.parent / "sensor_msgs" / "msg" / f"{name}.json" for d in share_dirs()]
        found = [p for p in found if p.is_file()]
        if not found:
            pytest.skip("no rosidl type description of sensor_msgs (no ROS interfaces installed)")
        want = json.loads(found[0].read_text())["type_hashes"][0]
        assert type_hash(f"sensor_msgs/msg/{name}") == want["hash_string"]


def test_a_foreign_camera_bag_reads_back_every_frame_and_stamp(tmp_path):
    from flashrt_ros.bags.episode import RecordedEpisode
    from flashrt_ros.bags.reader import open_bag
    from flashrt_ros.inputs.images import to_frame
    bag = tmp_path / "rosbag2_2025_01_01-00_00_00"
    written = write_foreign_camera_bag(bag)
    topics = {t.topic: (t.msgtype, t.count) for t in open_bag(bag).topics}
    assert topics == {"/cam/top/image_raw": ("sensor_msgs/msg/Image", 4),
                      "/cam/top/image_raw/compressed": ("sensor_msgs/msg/CompressedImage", 4),
                      "/joint_states": ("sensor_msgs/msg/JointState", 8)}

    # without names for them the image topics are not a camera's, and the summary says so
    plain = RecordedEpisode.open(bag)
    assert not plain.frames and "--camera CAMERA=TOPIC" in plain.summary()

    ep = RecordedEpisode.open(bag, FOREIGN_TOPICS)
    assert [it.kind for it in ep.frames] == ["image", "compressed_image"] * 4
    assert {it.camera for it in ep.frames} == {"top"} and not ep.unused_images
    for k, it in enumerate(ep.frames):
        t_frame, _ = written["stamps"][k]
        assert stamp_to_ns(it.msg.header.stamp) == t_frame and it.t_ns == t_frame + 1_000_000
        assert it.msg.data.tobytes() == written["data"][k]          # bytes as written
        assert np.array_equal(to_frame(it.msg), written["frames"][k])  # png: lossless too
    assert [stamp_to_ns(o.msg.header.stamp) for o in ep.observations] == \
        [t for _, t in written["stamps"]]
    # every state is a step, joined with the frame taken 4 ms before it, the only one within
    # the slop (the next is 29 ms after it)
    assert ep.steps == list(range(8)) and ep.ambiguous_steps == []
    for o in ep.observations:
        (frame,) = ep.joined[o.index].values()
        assert frame is ep.frames[o.index]
    timeline = ep.timeline()
    assert [len(it.frames) for it in timeline] == [1] * 8
    assert "8 joint_states message(s)" in ep.summary() and \
        "4 camera top (image) message(s), 4 camera top (compressed_image)" in ep.summary()


def test_the_join_takes_the_newest_frame_within_the_slop_as_the_node_does(tmp_path):
    """Two frames before a state: the node joins the newer; a frame further than the slop
    (sync_slop_s, default 0.02 s) from every state joins nothing and is not replayed."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from flashrt_ros.bags.episode import RecordedEpisode
    store = get_typestore(Stores.ROS2_JAZZY)
    T = store.types

    def header(ns):
        return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](
            sec=ns // 10**9, nanosec=ns % 10**9), frame_id="")
    bag = tmp_path / "two_frames"
    image = T["sensor_msgs/msg/Image"]
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        cam = w.add_connection("/robot/images/top", "sensor_msgs/msg/Image", typestore=store)
        js = w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=store)
        for t_frame, value in ((T0 - 15_000_000, 1), (T0 - 5_000_000, 2),
                               (T0 + 200_000_000, 3)):
            msg = image(header=header(t_frame), height=1, width=1, encoding="rgb8",
                        is_bigendian=0, step=3, data=np.full(3, value, dtype=np.uint8))
            w.write(cam, t_frame + 1000, store.serialize_cdr(msg, "sensor_msgs/msg/Image"))
            if value == 2:
                joints = T["sensor_msgs/msg/JointState"](
                    header=header(T0), name=list(JOINTS), position=np.zeros(6),
                    velocity=np.zeros(0), effort=np.zeros(0))
                w.write(js, T0 + 1000, store.serialize_cdr(joints, "sensor_msgs/msg/JointState"))
    ep = RecordedEpisode.open(bag)                  # <anything>/images/<camera>: no names needed
    assert len(ep.frames) == 3 and ep.steps == [0]
    (frame,) = ep.joined[0].values()
    assert frame.msg.data.tobytes() == bytes([2, 2, 2])
    # had the node taken the state before the second frame, it joined the first: said up front
    assert ep.ambiguous_steps == [0]
    assert "1 step(s) had more than one frame of a camera within the slop" in ep.summary()


def test_an_unstamped_camera_bag_is_refused(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from flashrt_ros.bags.episode import RecordedEpisode
    from flashrt_ros.bags.types import BagError
    store = get_typestore(Stores.ROS2_JAZZY)
    T = store.types
    header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=0, nanosec=0),
                                      frame_id="")
    bag = tmp_path / "unstamped"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        cam = w.add_connection("/n/images/top", "sensor_msgs/msg/Image", typestore=store)
        js = w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=store)
        msg = T["sensor_msgs/msg/Image"](header=header, height=1, width=1, encoding="rgb8",
                                         is_bigendian=0, step=3, data=np.zeros(3, dtype=np.uint8))
        w.write(cam, T0, store.serialize_cdr(msg, "sensor_msgs/msg/Image"))
        joints = T["sensor_msgs/msg/JointState"](header=header, name=list(JOINTS),
                                                 position=np.zeros(6), velocity=np.zeros(0),
                                                 effort=np.zeros(0))
        w.write(js, T0 + 1, store.serialize_cdr(joints, "sensor_msgs/msg/JointState"))
    with pytest.raises(BagError) as err:
        RecordedEpisode.open(bag)
    assert "no header stamp" in str(err.value) and "/n/images/top" in str(err.value)


# -- processes over DDS ----------------------------------------------------------------------
class CameraDriver:
    """Drives a camera policy node in lockstep: each step's frames, then its state."""

    def __init__(self, target):
        import rclpy
        from rclpy.qos import QoSProfile, QoSReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        from std_msgs.msg import String

        from flashrt_ros.msg import ActionChunk, Observation
        from flashrt_ros.ros.executors import SingleThreadedExecutor
        from flashrt_ros.ros.publishing import LATCHED
        self.rclpy, self.target = rclpy, target
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("camera_driver", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        qos = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE)
        self.Observation, self.Image, self.CompressedImage = Observation, Image, CompressedImage
        self.obs = self.node.create_publisher(Observation, f"{target}/observation", qos)
        self.image = self.node.create_publisher(Image, f"{target}/images/top", qos)
        self.compressed = self.node.create_publisher(CompressedImage,
                                                     f"{target}/images/top/compressed", qos)
        # a recorder is ready once every input topic has its publishers matched: the task is
        # the node's parameter, so this one publishes nothing
        self.instruction = self.node.create_publisher(String, f"{target}/instruction", LATCHED)
        self.actions = {}
        self.action_sub = self.node.create_subscription(
            ActionChunk, f"{target}/action",
            lambda m: self.actions.__setitem__(stamp_to_ns(m.observation_stamp), m), qos)

    def wait_subscribers(self, n: int):
        spin_until(self.executor, lambda: all(p.get_subscription_count() >= n for p in
                                              (self.obs, self.image, self.compressed))
                   and self.action_sub.get_publisher_count() >= 1, DISCOVERY_TIMEOUT_S,
                   f"{n} subscriber(s) of each input of {self.target}")

    def step(self, state, frames):
        """`frames`: (offset from the state's stamp in ns, frame, "rgb8" or "png")."""
        from flashrt_ros.inputs.images import to_compressed_msg_fields, to_image_msg_fields
        from flashrt_ros.ros.stamps import ns_to_stamp
        base = self.node.get_clock().now().nanoseconds
        for offset, frame, kind in frames:
            if kind == "png":
                fmt, data = to_compressed_msg_fields(frame, "png")
                msg, pub = self.CompressedImage(format=fmt, data=data), self.compressed
            else:
                h, w, enc, step, data = to_image_msg_fields(frame, kind)
                msg, pub = self.Image(height=h, width=w, encoding=enc, step=step, data=data), \
                    self.image
            msg.header.stamp = ns_to_stamp(base + offset)
            pub.publish(msg)
        obs = self.Observation(state=[float(x) for x in state])
        obs.header.stamp = ns_to_stamp(base)
        self.obs.publish(obs)
        return spin_until(self.executor, lambda: self.actions.get(base), STEP_TIMEOUT_S,
                          f"the action for the observation stamped {base}")

    def close(self):
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)


def _episode(driver):
    """Six steps: raw frames, a frame further than the slop before a state and one within (the
    node joins the second, whatever the order it takes them in), a frame stamped after its
    state, png frames. (Two frames within the slop would make the join depend on the order the
    node's executor took them: RecordedEpisode.ambiguous_steps.)"""
    f, s = frames(7, seed=3), states(6, seed=4)
    plan = [[(-4_000_000, f[0], "rgb8")],
            [(-3_000_000, f[1], "bgr8")],
            [(-40_000_000, f[6], "rgb8"), (-5_000_000, f[2], "rgb8")],
            [(-4_000_000, f[3], "png")],
            [(3_000_000, f[4], "rgb8")],
            [(-2_000_000, f[5], "png")]]
    return [driver.step(s[k], plan[k]) for k in range(6)]


@pytest.mark.ros
def test_a_recorded_camera_episode_replays_byte_identical(tmp_path, ros_env):
    """record -> play in lockstep into a fresh node: the same chunks byte for byte; the bag's
    camera topics are stored as rosbag2 stores them; a foreign camera bag plays too."""
    from mcap.reader import make_reader

    from flashrt_ros.bags.reader import open_bag
    from flashrt_ros.bags.rosbag2 import read_metadata
    from flashrt_ros.bags.types import type_hash, typestore
    from flashrt_ros.testing import PolicyNodeProcess, assert_bag_replays
    name = f"flashrt_cams_{os.getpid()}"
    bag = tmp_path / "camera_episode"
    params = {"model": MODEL, "managed": False, "control_mode": "observation",
              "observation_qos": "reliable", "stale_observation_s": 0.0, "instruction": TASK,
              "joint_names": JOINTS, "status_rate_hz": 20.0, "runtime.device": "cpu",
              "store.capsule_dir": str(tmp_path / "capsules")}
    foreign = tmp_path / "rosbag2_2025_01_01-00_00_00"
    write_foreign_camera_bag(foreign)
    with PolicyNodeProcess(name, params, ros_env) as node:
        node.wait_active(STARTUP_TIMEOUT_S)
        rec = subprocess.Popen(
            [sys.executable, "-m", "flashrt_ros.cli", "record", "--node", node.node, "--out",
             str(bag), "--progress", "0.2"], env=ros_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        threading.Thread(target=lambda: lines.extend(rec.stdout), daemon=True).start()
        driver = CameraDriver(node.node)
        try:
            wait_for(lambda: any("[record] ready" in x for x in lines), DISCOVERY_TIMEOUT_S,
                     "the recorder to be ready")
            wait_for(lambda: any("parameters of" in x for x in lines), 3 * DISCOVERY_TIMEOUT_S,
                     "the recorder to store the node's parameters")
            driver.wait_subscribers(2)             # the node and the recorder
            actions = _episode(driver)
            wait_for(lambda: any(re.search(r"\baction 6\b", x) for x in lines),
                     DISCOVERY_TIMEOUT_S, "the recorder to have the six actions")
            rec.send_signal(signal.SIGINT)
            assert rec.wait(timeout=30) == 0, "".join(lines)
        except Exception as e:
            raise AssertionError(f"{e}\n--- recorder ---\n{''.join(lines[-20:])}\n--- node ---\n"
                                 f"{node.log(40)}") from e
        finally:
            if rec.poll() is None:
                rec.kill()
            driver.close()
        assert any("recording " + f"{node.node}/images/top (sensor_msgs/msg/Image" in x
                   for x in lines), "".join(lines)

        # a bag another tool wrote, its image topics named for the camera: every step answered
        out = subprocess.run(
            [sys.executable, "-m", "flashrt_ros.cli", "play", str(foreign), "--node", node.node,
             "--timeout", str(STEP_TIMEOUT_S), "--camera", "top=/cam/top/image_raw",
             "--camera", "top=/cam/top/image_raw/compressed"],
            env=ros_env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr + node.log(40)
        assert "8 action(s) received; the bag holds no recorded actions" in out.stdout, out.stdout

    # rosbag2's conventions for the camera topics: types, definitions, hashes
    counts = {t.topic: (t.msgtype, t.count) for t in open_bag(bag).topics}
    assert counts[f"{node.node}/images/top"] == ("sensor_msgs/msg/Image", 5)
    assert counts[f"{node.node}/images/top/compressed"] == ("sensor_msgs/msg/CompressedImage", 2)
    assert counts[f"{node.node}/action"] == ("flashrt_ros/msg/ActionChunk", 6)
    meta = {t["topic_metadata"]["name"]: t["topic_metadata"]
            for t in read_metadata(bag)["topics_with_message_count"]}
    with open(bag / f"{bag.name}_0.mcap", "rb") as fh:
        summary = make_reader(fh).get_summary()
    for topic, msgtype in ((f"{node.node}/images/top", "sensor_msgs/msg/Image"),
                           (f"{node.node}/images/top/compressed",
                            "sensor_msgs/msg/CompressedImage")):
        channel = next(c for c in summary.channels.values() if c.topic == topic)
        schema = summary.schemas[channel.schema_id]
        assert (schema.name, schema.encoding) == (msgtype, "ros2msg")
        assert schema.data.decode() == typestore().generate_msgdef(msgtype, ros_version=2)[0]
        assert channel.metadata["topic_type_hash"] == type_hash(msgtype).strip()
        assert "reliability: reliable" in channel.metadata["offered_qos_profiles"]
        assert meta[topic]["type"] == msgtype
        assert meta[topic]["type_description_hash"] == type_hash(msgtype)

    result = assert_bag_replays(bag, timeout=STEP_TIMEOUT_S, startup_timeout=STARTUP_TIMEOUT_S,
                                env=ros_env)
    c = result.comparison
    assert (c.recorded, c.identical) == (6, 6), result.describe()
    replayed = [np.asarray(result.actions[p].data, np.float32).tobytes()
                for p in sorted(result.actions)]
    assert replayed == [np.asarray(a.data, np.float32).tobytes() for a in actions]
