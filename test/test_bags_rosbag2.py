"""Bags as rosbag2 has them: other writers' bags in, rosbag2's conventions out, crash safety.

Checked against libraries this package does not use to read or write: bags from other writers
are written with `mcap` and `mcap-ros2-support` (its own CDR encoder), and the bags this package
writes are read back with mcap-ros2-support's decoder and with `rosbags`. A recorder process is
killed with SIGKILL at random points; `flashrt-ros bag recover` must give back every message
flushed before the kill. Every wait has a deadline; no fixed sleeps.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from flashrt_ros.ros.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
MSG = ROOT / "msg"
DISCOVERY_TIMEOUT_S = 20
SEP = "=" * 80 + "\n"
HEADER_DEF = "builtin_interfaces/Time stamp\nstring frame_id\n"
TIME_DEF = "int32 sec\nuint32 nanosec\n"
NODE = "/flashrt_policy"

mcap_ros2 = pytest.importorskip("mcap_ros2.writer", reason="mcap-ros2-support (requirements.txt) "
                                "is the independent reader/writer these tests use")


def ros2msg(name: str) -> str:
    """The ros2msg schema text of a flashrt_ros type with its dependencies, as rosbag2 stores it,
    written from the .msg file (not through this package's typestore)."""
    return ((MSG / f"{name}.msg").read_text() + SEP + "MSG: std_msgs/Header\n" + HEADER_DEF + SEP
            + "MSG: builtin_interfaces/Time\n" + TIME_DEF)


def observation(k: int, sec: int = 1) -> dict:
    return {"header": {"stamp": {"sec": sec, "nanosec": 1000 * k}, "frame_id": ""},
            "state": [float(k) + 0.25 * j for j in range(14)], "episode_id": 0,
            "reset_episode": k == 0}


def action(step: int, obs_k: int, episode: int = 1, commit_ns: int = 0) -> dict:
    return {"header": {"stamp": {"sec": 2, "nanosec": commit_ns or 1000 * step}, "frame_id": ""},
            "step": step, "episode_id": episode, "horizon": 2, "action_dim": 2,
            "data": [0.5 * step, -1.0, float(obs_k), 3.0],
            "observation_stamp": {"sec": 1, "nanosec": 1000 * obs_k},
            "capsule_lineage": "", "latency_ms": 0.5}


def write_mcap_ros2(path: Path, topics, channel_metadata=None):
    """An MCAP file written by mcap-ros2-support: topics = [(topic, type, definition, [dicts])];
    messages interleave in the order given, 1 ms apart. `channel_metadata`: topic -> dict, written
    with the plain mcap Writer (zstd chunks) instead, as rosbag2 does."""
    from mcap.writer import CompressionType
    path.parent.mkdir(parents=True, exist_ok=True)
    t = 1_700_000_000_000_000_000
    events = []
    for i, (topic, msgtype, definition, msgs) in enumerate(topics):
        events += [(k, i, m) for k, m in enumerate(msgs)]
    events.sort(key=lambda e: (e[0], e[1]))
    with open(path, "wb") as f:
        w = mcap_ros2.Writer(f, compression=CompressionType.ZSTD)
        schemas = {}
        if channel_metadata is not None:      # rosbag2's channel metadata: register channels first
            raw = w._writer
            for topic, msgtype, definition, _ in topics:
                schema = schemas.setdefault(msgtype, w.register_msgdef(msgtype, definition))
                w._channel_ids[topic] = raw.register_channel(topic, "cdr", schema.id,
                                                             channel_metadata.get(topic, {}))
        for n, (_, i, m) in enumerate(events):
            topic, msgtype, definition, _ = topics[i]
            schema = schemas.setdefault(msgtype, w.register_msgdef(msgtype, definition))
            w.write_message(topic, schema, m, log_time=t + n * 1_000_000,
                            publish_time=t + n * 1_000_000 - 5000, sequence=n + 1)
        w.finish()
    return path


EPISODE = [(f"{NODE}/observation", "flashrt_ros/msg/Observation", ros2msg("Observation"),
            [observation(k) for k in range(12)]),
           (f"{NODE}/instruction", "std_msgs/msg/String", "string data\n",
            [{"data": "pick up the red cube"}])]


def rosbag2_metadata_yaml(bag: Path, files, counts, custom=None):
    """metadata.yaml as rosbag2 writes it (written here by hand, not by this package)."""
    topics = [{"topic_metadata": {"name": t, "type": ty, "serialization_format": "cdr",
                                  "offered_qos_profiles": "", "type_description_hash": ""},
               "message_count": counts[t]} for t, ty, _, _ in EPISODE]
    info = {"version": 9, "storage_identifier": "mcap", "duration": {"nanoseconds": 1},
            "starting_time": {"nanoseconds_since_epoch": 1}, "message_count": sum(counts.values()),
            "topics_with_message_count": topics, "compression_format": "",
            "compression_mode": "", "relative_file_paths": files, "files": [],
            "custom_data": custom, "ros_distro": "jazzy"}
    (bag / "metadata.yaml").write_text(yaml.safe_dump({"rosbag2_bagfile_information": info}))


def foreign_bag(layout: str, tmp: Path) -> Path:
    bag = tmp / "rosbag2_2025_06_01-12_00_00"
    counts = {t: len(m) for t, _, _, m in EPISODE}
    if layout == "rosbag2_zstd":             # rosbag2's layout and channel metadata
        qos = yaml.safe_dump([{"history": "keep_last", "depth": 10, "reliability": "reliable",
                               "durability": "volatile"}])
        meta = {t: {"offered_qos_profiles": qos, "topic_type_hash": ""} for t, *_ in EPISODE}
        write_mcap_ros2(bag / f"{bag.name}_0.mcap", EPISODE, channel_metadata=meta)
        rosbag2_metadata_yaml(bag, [f"{bag.name}_0.mcap"], counts)
    elif layout == "mcap_ros2_with_metadata_yaml":   # channels without offered_qos_profiles
        write_mcap_ros2(bag / "episode.mcap", EPISODE)
        rosbag2_metadata_yaml(bag, ["episode.mcap"], counts)
    elif layout == "mcap_ros2_without_metadata_yaml":
        write_mcap_ros2(bag / "episode.mcap", EPISODE)
    elif layout == "bare_mcap_file":
        bag = write_mcap_ros2(tmp / "episode.mcap", EPISODE)
    return bag


@pytest.mark.parametrize("layout", ["rosbag2_zstd", "mcap_ros2_with_metadata_yaml",
                                    "mcap_ros2_without_metadata_yaml", "bare_mcap_file"])
def test_bags_from_other_writers_open_with_every_message(layout, tmp_path):
    from flashrt_ros.bags.play import RecordedEpisode
    ep = RecordedEpisode.open(foreign_bag(layout, tmp_path))
    assert len(ep.observations) == 12 and len(ep.instructions) == 1
    assert [np.asarray(it.msg.state, np.float32)[1] for it in ep.observations] == \
        [np.float32(k + 0.25) for k in range(12)]
    assert ep.instructions[0].msg.data == "pick up the red cube"
    assert [it.index for it in ep.instructions] == [1]     # received after observation 0
    out = subprocess.run([sys.executable, "-m", "flashrt_ros.cli", "bag", "info",
                          str(foreign_bag(layout, tmp_path / "again"))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Messages:          13" in out.stdout
    assert (f"Topic: {NODE}/observation | Type: flashrt_ros/msg/Observation | Count: 12 | "
            f"Serialization Format: cdr") in out.stdout


def test_a_bag_that_cannot_be_used_says_what_it_holds(tmp_path):
    from flashrt_ros.bags.play import RecordedEpisode
    from flashrt_ros.bags.types import BagError
    bag = write_mcap_ros2(tmp_path / "chatter" / "chatter.mcap", [
        ("/chatter", "std_msgs/msg/String", "string data\n", [{"data": "hi"}] * 3)])
    with pytest.raises(BagError) as err:
        RecordedEpisode.open(bag.parent)
    assert "/chatter [std_msgs/msg/String] x3" in str(err.value)
    assert "found none" not in str(err.value)


def test_another_definition_without_a_hash_is_refused_by_its_definition(tmp_path):
    """The type guard works on salvaged bags too: no topic_type_hash, but the schema text."""
    from flashrt_ros.bags.play import RecordedEpisode
    from flashrt_ros.bags.types import BagError
    other = ros2msg("Observation").replace("bool reset_episode", "bool reset_episode\nint32 extra")
    bag = write_mcap_ros2(tmp_path / "old" / "old.mcap", [
        (f"{NODE}/observation", "flashrt_ros/msg/Observation", other,
         [dict(observation(0), extra=3)])])
    with pytest.raises(BagError) as err:
        RecordedEpisode.open(bag)
    assert "another definition of flashrt_ros/msg/Observation" in str(err.value)


# -- what this package writes, read by the independent readers ---------------------------------
def check_with_independent_readers(bag: Path, *, recorded_live: bool = False):
    """Every message of `bag` decodes with mcap-ros2-support; channels and metadata.yaml carry
    rosbag2's conventions; rosbags reads it as well. Returns {topic: [decoded messages]}."""
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory
    from rosbags.rosbag2 import Reader

    from flashrt_ros.bags.types import msg_dir, ros_distro
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["relative_file_paths"] == [f"{bag.name}_0.mcap"], meta["relative_file_paths"]
    assert meta["ros_distro"] == ros_distro() and meta["ros_distro"] not in ("rosbags", "")
    rosidl = {json.loads(p.read_text())["type_hashes"][0]["type_name"]:
              json.loads(p.read_text())["type_hashes"][0]["hash_string"]
              for p in msg_dir().glob("*.json")}
    got, seq = {}, {}
    with open(bag / f"{bag.name}_0.mcap", "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        summary = reader.get_summary()
        for ch in summary.channels.values():
            schema = summary.schemas[ch.schema_id]
            assert ch.metadata["topic_type_hash"].startswith("RIHS01_"), ch
            if schema.name in rosidl:
                assert ch.metadata["topic_type_hash"] == rosidl[schema.name], schema.name
            qos = yaml.safe_load(ch.metadata["offered_qos_profiles"])
            assert isinstance(qos, list), ch.metadata
            if recorded_live:
                assert qos and {"reliability", "durability", "depth"} <= set(qos[0]), qos
        for schema, channel, message, decoded in reader.iter_decoded_messages():
            got.setdefault(channel.topic, []).append(decoded)
            if recorded_live:
                # the sender's stamp and sequence, not copies of the receive time and 0
                assert 0 < message.publish_time <= message.log_time, channel.topic
                seq.setdefault(channel.topic, []).append((message.sequence, message.publish_time))
    for topic, sent in seq.items():
        # messages are in receive order (log time), which a reliable repair can make differ from
        # the send order; in send order the sequence numbers are distinct and the publish times
        # do not go back
        sent.sort()
        numbers = [n for n, _ in sent]
        assert numbers[0] > 0 and len(set(numbers)) == len(numbers), (topic, numbers)
        assert all(a[1] <= b[1] for a, b in zip(sent, sent[1:])), (topic, sent)
    for t in meta["topics_with_message_count"]:
        assert t["message_count"] == len(got.get(t["topic_metadata"]["name"], []))
        assert t["topic_metadata"]["type_description_hash"].startswith("RIHS01_")
    with Reader(bag) as r:
        assert r.message_count == sum(len(v) for v in got.values())
    return got


def test_the_writer_writes_rosbag2_conventions(tmp_path):
    from flashrt_ros.bags.rosbag2 import format_info
    from flashrt_ros.bags.reader import open_bag
    from flashrt_ros.bags.types import type_hash, typestore
    from flashrt_ros.bags.writer import McapBagWriter
    bag = tmp_path / "ep"
    w = McapBagWriter(bag)
    st = typestore()
    forever = {"sec": 9223372036, "nsec": 854775807}
    qos = [{"history": "keep_last", "depth": 10, "reliability": "reliable",
            "durability": "volatile", "deadline": forever, "lifespan": forever,
            "liveliness": "automatic", "liveliness_lease_duration": forever,
            "avoid_ros_namespace_conventions": False}]
    cid = w.add_topic(f"{NODE}/observation", "flashrt_ros/msg/Observation",
                      st.generate_msgdef("flashrt_ros/msg/Observation", ros_version=2)[0],
                      type_hash("flashrt_ros/msg/Observation"), qos)
    obs = st.types["flashrt_ros/msg/Observation"]
    hdr, tm = st.types["std_msgs/msg/Header"], st.types["builtin_interfaces/msg/Time"]
    for k in range(5):
        m = obs(header=hdr(stamp=tm(1, k), frame_id="x"), state=np.full(14, k, np.float32),
                episode_id=0, reset_episode=False)
        w.write(cid, 10**18 + 10 * k, st.serialize_cdr(m, "flashrt_ros/msg/Observation"),
                10**18 + 10 * k - 3, 100 + k)
    w.set_custom("flashrt_ros.ros.node", NODE)
    w.close()
    got = check_with_independent_readers(bag, recorded_live=True)
    assert [list(m.state)[:2] for m in got[f"{NODE}/observation"]] == [[k, k] for k in range(5)]
    info = format_info(open_bag(bag).summary())
    fields = [line.split(":")[0] for line in info.splitlines() if line and not line[0] == " "]
    # the fields `ros2 bag info` prints, in its order
    assert fields == ["Files", "Bag size", "Storage id", "ROS Distro", "Duration", "Start", "End",
                      "Messages", "Topic information", "Service", "Service information"]
    assert "Duration:          0.000000040s" in info and "Messages:          5" in info


def test_recover_keeps_every_message_flushed_before_a_cut(tmp_path):
    """The file a killed recorder leaves, cut at random offsets: recover gives back every message
    of every chunk flushed before the cut, in order, and plays."""
    from flashrt_ros.bags.play import RecordedEpisode
    from flashrt_ros.bags.recover import recover
    from flashrt_ros.bags.types import type_hash, typestore
    from flashrt_ros.bags.writer import McapBagWriter
    st = typestore()
    now = [0.0]
    bag = tmp_path / "live"
    w = McapBagWriter(bag, clock=lambda: now[0], flush_interval_s=1.0)
    header_end = w.path.stat().st_size
    assert w.path.read_bytes().startswith(b"\x89MCAP0\r\n")     # the header is on disk at once
    cid = w.add_topic(f"{NODE}/observation", "flashrt_ros/msg/Observation",
                      st.generate_msgdef("flashrt_ros/msg/Observation", ros_version=2)[0],
                      type_hash("flashrt_ros/msg/Observation"), [])
    assert w.path.stat().st_size > header_end          # the channel is on disk at once
    obs = st.types["flashrt_ros/msg/Observation"]
    hdr, tm = st.types["std_msgs/msg/Header"], st.types["builtin_interfaces/msg/Time"]
    flushed = [(header_end, 0)]                        # (file size, messages on disk then)
    for k in range(300):
        now[0] += 0.05                                 # 20 messages a second
        m = obs(header=hdr(stamp=tm(1, k), frame_id=""), state=np.full(14, k, np.float32),
                episode_id=0, reset_episode=False)
        before = w.flushes
        w.write(cid, 10**18 + k, st.serialize_cdr(m, "flashrt_ros/msg/Observation"))
        if w.flushes != before:
            flushed.append((w.path.stat().st_size, k + 1))
    assert len(flushed) >= 10                          # by time: about one flush per second
    data = w.path.read_bytes()
    rng = random.Random(16)
    for cut in sorted(rng.sample(range(header_end, len(data)), 12)) + [len(data)]:
        torn = tmp_path / f"cut_{cut}"
        torn.mkdir()
        (torn / f"{torn.name}_0.mcap").write_bytes(data[:cut])
        (done,) = recover(torn)
        want = max(n for size, n in flushed if size <= cut)
        assert done.messages >= want, (cut, done.describe())
        assert (torn / f"{torn.name}_0.mcap.unfinished").read_bytes() == data[:cut]
        if done.messages:
            ep = RecordedEpisode.open(torn)
            assert [int(it.msg.state[0]) for it in ep.observations] == list(range(done.messages))
    w.close()


# -- timer-mode episodes and the count verdict --------------------------------------------------
def timer_bag(tmp: Path, consumed, first_step=1, reset_after=None) -> Path:
    """Observations 0..5 and one action per tick, on the observation `consumed` names."""
    params = json.dumps({"control_mode": "timer"})
    acts = [action(first_step + i, k, commit_ns=1000 * (i + 1)) for i, k in enumerate(consumed)]
    topics = [EPISODE[0][:3] + ([observation(k) for k in range(6)],),
              (f"{NODE}/action", "flashrt_ros/msg/ActionChunk", ros2msg("ActionChunk"), acts)]
    if reset_after is not None:
        ev = {"header": {"stamp": {"sec": 2, "nanosec": 1000 * (reset_after + 1) + 500},
                         "frame_id": ""}, "operation": "reset", "name": "", "source": "",
              "step": 0, "position": 0, "k": 0, "tier": "", "success": True, "message": "",
              "latency_ms": 0.0}
        text = (MSG / "CapsuleEvent.msg").read_text()
        for line in text.splitlines():
            m = re.match(r"\s*(bool)\s+(\w+)", line)
            if m and m.group(2) not in ev:       # the request's flags
                ev[m.group(2)] = m.group(2) == "keep_context"
        topics.append((f"{NODE}/capsule_events", "flashrt_ros/msg/CapsuleEvent",
                       ros2msg("CapsuleEvent"), [ev]))
    bag = tmp / "timer"
    write_mcap_ros2(bag / "timer_0.mcap", topics)
    rosbag2_metadata_yaml(bag, ["timer_0.mcap"], {t: 0 for t, *_ in EPISODE},
                          custom={"flashrt_ros.node_parameters": params})
    return bag


def test_a_timer_mode_episode_replays_the_steps_on_the_observations_they_consumed(tmp_path):
    from flashrt_ros.bags.play import RecordedEpisode
    ep = RecordedEpisode.open(timer_bag(tmp_path, [0, 0, 1, 3, 3, 3, 5]))
    assert ep.timer_mode and ep.steps == [0, 0, 1, 3, 3, 3, 5] and ep.start == 0
    uses = [(it.index, int(it.msg.state[0]), it.repeat) for it in ep.timeline()
            if it.kind == "observation"]
    assert uses == [(0, 0, False), (1, 0, True), (2, 1, False), (3, 3, False), (4, 3, True),
                    (5, 3, True), (6, 5, False)]
    assert sorted(ep.actions) == list(range(7)) and ep.actions[4].step == 5
    assert "2 observation(s) no step took are not replayed" in ep.summary()


def test_a_recording_from_mid_episode_replays_from_its_reset_or_is_refused(tmp_path):
    from flashrt_ros.bags.play import RecordedEpisode
    from flashrt_ros.bags.types import BagError
    with pytest.raises(BagError) as err:
        RecordedEpisode.open(timer_bag(tmp_path / "a", [0, 1, 2], first_step=40))
    for phrase in ("starts at step 40 of episode 1", "in the middle of an episode",
                   "flashrt-ros reset"):
        assert phrase in str(err.value)
    ep = RecordedEpisode.open(timer_bag(tmp_path / "b", [0, 1, 2, 3, 4], first_step=40,
                                        reset_after=1))
    assert ep.start == 2 and [it.index for it in ep.capsule_ops] == [2]
    assert min(it.index for it in ep.timeline()) == 2 and sorted(ep.replayed_actions) == [2, 3, 4]


def test_missing_and_extra_actions_fail_the_replay_naming_the_first_missing_step():
    from flashrt_ros.bags.play import ReplayResult, compare_actions
    from flashrt_ros.bags.types import typestore
    cls = typestore().types["flashrt_ros/msg/ActionChunk"]

    def chunk(step):
        t = typestore().types["builtin_interfaces/msg/Time"](0, 0)
        h = typestore().types["std_msgs/msg/Header"](stamp=t, frame_id="")
        return cls(header=h, step=step, episode_id=1, horizon=1, action_dim=1,
                   data=np.asarray([step], np.float32), observation_stamp=t, capsule_lineage="",
                   latency_ms=0.0)
    recorded = {p: chunk(p + 1) for p in range(4)}
    dropped = ReplayResult("lockstep", steps=[0, 1, 2, 3], recorded_steps=recorded,
                           actions={p: chunk(p + 1) for p in (0, 1, 3)})
    dropped.comparison = compare_actions({p: recorded[p] for p in (0, 1, 3)}, dropped.actions)
    assert dropped.comparison.all_identical and not dropped.ok       # identical, but one short
    assert "the first missing step is 2 (recorded step 3 of episode 1)" in dropped.describe()
    extra = ReplayResult("lockstep", steps=[0, 1], recorded_steps={0: recorded[0], 1: recorded[1]},
                         actions={0: recorded[0], 1: recorded[1]},
                         extra=["step 3 of episode 1 for step 1, which had its action already"])
    extra.comparison = compare_actions(extra.recorded_steps, extra.actions)
    assert not extra.ok and "1 extra action(s)" in extra.describe()
    extra.tolerate_counts = True
    assert extra.ok and "reported only" in extra.describe()
    unrecorded = ReplayResult("lockstep", steps=[0, 1, 2], recorded_steps={0: recorded[0]},
                              actions={0: recorded[0], 1: recorded[1], 2: recorded[2]},
                              unrecorded=[1, 2])
    unrecorded.comparison = compare_actions(unrecorded.recorded_steps, unrecorded.actions)
    assert not unrecorded.ok and "no action for step(s) 1-2" in unrecorded.describe()


# -- a recorder process over DDS ---------------------------------------------------------------
class RecorderProcess:
    def __init__(self, node, out, env, *extra):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flashrt_ros.cli", "record", "--node", node, "--out", str(out),
             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def saw(self, text):
        if self.proc.poll() is not None and not any(text in x for x in self.lines):
            raise RuntimeError(f"recorder exited with {self.proc.returncode}:\n{''.join(self.lines)}")
        return any(text in x for x in self.lines)

    def end(self, sig=signal.SIGINT):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


def _on_disk(path: Path) -> int:
    """Messages an unfinished MCAP file holds now (read as `bag recover` reads it)."""
    from flashrt_ros.bags.reader import scan_torn
    return scan_torn(path).count if path.exists() else 0


@pytest.mark.ros
def test_a_killed_recorder_loses_at_most_its_last_flush(tmp_path, ros_env):
    """SIGKILL at random points: every message on disk before the kill (the recorder flushes by
    time, at most a second after a message came) comes back from `bag recover`, and the bag plays."""
    import rclpy
    from rclpy.duration import Duration
    from rclpy.qos import QoSProfile, QoSReliabilityPolicy

    from flashrt_ros.bags.play import RecordedEpisode
    from flashrt_ros.msg import Observation
    rng = random.Random(44)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node(f"kill_driver_{os.getpid()}", context=ctx)
    try:
        for trial in range(3):
            target = f"/kill_policy_{os.getpid()}_{trial}"
            pub = node.create_publisher(Observation, f"{target}/observation",
                                        QoSProfile(depth=100,
                                                   reliability=QoSReliabilityPolicy.RELIABLE))
            bag = tmp_path / f"trial{trial}"
            rec = RecorderProcess(target, bag, ros_env, "--progress", "0")
            try:
                mcap = bag / f"{bag.name}_0.mcap"
                wait_for(lambda: rec.saw(f"recording {target}/observation"), DISCOVERY_TIMEOUT_S,
                         "the recorder to see the publisher")
                wait_for(lambda: pub.get_subscription_count() > 0, DISCOVERY_TIMEOUT_S,
                         "the recorder's subscription")
                sent = 0

                def burst(n):
                    nonlocal sent
                    for _ in range(n):
                        msg = Observation(state=[float(sent)] * 14)
                        msg.header.stamp.sec, msg.header.stamp.nanosec = 1, sent
                        pub.publish(msg)
                        sent += 1
                    assert pub.wait_for_all_acked(Duration(seconds=DISCOVERY_TIMEOUT_S))
                burst(rng.randint(1, 40))
                flushed = sent
                wait_for(lambda: _on_disk(mcap) >= flushed, 10, f"{flushed} messages on disk "
                                                                f"(the flush by time)")
                burst(rng.randint(0, 40))               # these may still be in the open chunk
                rec.end(signal.SIGKILL)
                assert not (bag / "metadata.yaml").exists()
                out = subprocess.run([sys.executable, "-m", "flashrt_ros.cli", "bag", "recover",
                                      str(bag)], env=ros_env, capture_output=True, text=True,
                                     timeout=60)
                assert out.returncode == 0, out.stdout + out.stderr
                ep = RecordedEpisode.open(bag)
                got = [int(it.msg.state[0]) for it in ep.observations]
                assert flushed <= len(got) <= sent and got == list(range(len(got))), \
                    (flushed, sent, got, out.stdout)
                assert ep.node == target                  # custom data survives the kill
                check_with_independent_readers(bag, recorded_live=True)
            finally:
                rec.end(signal.SIGKILL)
                node.destroy_publisher(pub)
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)


@pytest.mark.ros
def test_an_instruction_sent_during_a_recording_is_in_the_bag(tmp_path, ros_env):
    """`flashrt-ros instruct` waits for every subscriber - here only the recorder - so the
    one-shot instruction is recorded; with nobody listening it says so and sends nothing."""
    target = f"/instruct_policy_{os.getpid()}"
    bag = tmp_path / "instructed"
    rec = RecorderProcess(target, bag, ros_env, "--progress", "0")
    try:
        wait_for(lambda: rec.saw("waiting for publishers"), DISCOVERY_TIMEOUT_S, "the recorder")
        out = subprocess.run([sys.executable, "-m", "flashrt_ros.cli", "--node", target,
                              "--discovery-timeout", str(DISCOVERY_TIMEOUT_S), "instruct",
                              "stack the cubes"], env=ros_env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for(lambda: rec.saw(f"first message on {target}/instruction"), DISCOVERY_TIMEOUT_S,
                 "the recorder to take the instruction")
    finally:
        assert rec.end() == 0, "".join(rec.lines)
    got = check_with_independent_readers(bag, recorded_live=True)
    assert [m.data for m in got[f"{target}/instruction"]] == ["stack the cubes"]
    nobody = subprocess.run([sys.executable, "-m", "flashrt_ros.cli", "--node", "/nobody_here",
                             "--discovery-timeout", "1", "instruct", "x"], env=ros_env,
                            capture_output=True, text=True, timeout=60)
    assert nobody.returncode != 0 and "no subscriber at all" in nobody.stderr, nobody.stderr


# -- nothing one-shot is lost ------------------------------------------------------------------
@pytest.mark.ros
def test_an_instruction_published_before_the_node_subscribed_still_reaches_it(tmp_path):
    """~/instruction is latched on both sides: an instruction published while the node is not
    configured yet (no subscription at all) is taken once the node subscribes."""
    import rclpy
    from std_msgs.msg import String

    from flashrt_ros.ros.publishing import LATCHED
    from node_client import InProcessNode
    ns = f"/latched_{os.getpid()}"
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    sender = rclpy.create_node("latched_sender", context=ctx)
    pub = sender.create_publisher(String, f"{ns}/flashrt_policy/instruction", LATCHED)
    pub.publish(String(data="stack the cubes"))            # nobody subscribes yet
    node = None
    try:
        node = InProcessNode(ctx, ns, instruction="", status_rate_hz=20.0,
                             **{"runtime.device": "cpu", "store.capsule_dir": str(tmp_path)})
        assert node.client.transition("configure")        # the subscription is made here
        wait_for(lambda: node.node.runtime is not None and node.node.runtime.context_len > 0,
                 DISCOVERY_TIMEOUT_S, "the node to prefill the latched instruction")
    finally:
        if node is not None:
            node.close()
        sender.destroy_node()
        rclpy.try_shutdown(context=ctx)


@pytest.mark.ros
def test_the_lockstep_sim_sends_its_first_observation_only_to_a_matched_policy():
    """`flashrt-ros sim --lockstep` waits for one action per observation: a first observation
    sent before the policy node matched is lost, and the loop would stall for good."""
    import rclpy
    from rclpy.qos import QoSProfile, QoSReliabilityPolicy

    from flashrt_ros.msg import ActionChunk, Observation
    from flashrt_ros.ros.executors import SingleThreadedExecutor
    from flashrt_ros.sim.robot import SimRobotNode
    policy = f"/lockstep_policy_{os.getpid()}"
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    qos = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
    try:
        sim = SimRobotNode(policy, lockstep=True, rate_hz=100.0, context=ctx)
        stand_in = rclpy.create_node("lockstep_stand_in", context=ctx)
        got = []
        stand_in.create_subscription(Observation, f"{policy}/observation", got.append, qos)
        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(sim)
        ex.add_node(stand_in)
        spin = lambda t: ex.spin_once(timeout_sec=t)   # noqa: E731
        wait_for(lambda: sim.pub.get_subscription_count() > 0, DISCOVERY_TIMEOUT_S,
                 "the stand-in to subscribe the observations", idle=spin)
        # matched one way only (no action publisher yet): the sim ticks, says it waits, sends nothing
        wait_for(lambda: sim._said_waiting, DISCOVERY_TIMEOUT_S, "a tick of the sim", idle=spin)
        assert sim.sent == 0 and not got
        actions = stand_in.create_publisher(ActionChunk, f"{policy}/action", qos)
        wait_for(lambda: got, DISCOVERY_TIMEOUT_S, "the first observation", idle=spin)
        assert sim.sent == 1
        actions.publish(ActionChunk(horizon=1, action_dim=7, data=[0.0] * 7))
        wait_for(lambda: len(got) >= 2, DISCOVERY_TIMEOUT_S, "the next observation", idle=spin)
        ex.shutdown(timeout_sec=1.0)
    finally:
        rclpy.try_shutdown(context=ctx)
