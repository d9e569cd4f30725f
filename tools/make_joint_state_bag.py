#!/usr/bin/env python3
"""Write a rosbag2 bag laid out as `ros2 bag record` (Jazzy, MCAP storage) writes it.

    python tools/make_joint_state_bag.py OUT_DIR [--messages 40] [--rate 50] [--joints 7]

OUT_DIR gets what `ros2 bag record -s mcap /joint_states /robot_description` leaves behind:
  OUT_DIR/metadata.yaml            version 9, ros_distro jazzy, key order as rosbag2 emits it
  OUT_DIR/<OUT_DIR name>_0.mcap    profile ros2; schemas as ros2msg text; channels carrying
                                   offered_qos_profiles and topic_type_hash; messages in chunks
                                   (uncompressed, no chunk CRC: rosbag2_storage_mcap's defaults),
                                   message indexes, a `rosbag2` metadata record, and a summary
                                   (schemas, channels, statistics, chunk and metadata indexes)
Topics: /joint_states (sensor_msgs/msg/JointState, joints joint_1..joint_N with position,
velocity and effort, like joint_state_broadcaster) and /robot_description (std_msgs/msg/String,
transient local, one message).

Deliberately stdlib only: neither the MCAP container nor the CDR payloads come from `rosbags`, the
library the player reads bags with, so a replay test of this bag is a test against a bag that
our own writer did not produce. Deterministic: the same arguments give the same bytes.
"""
from __future__ import annotations

import argparse
import math
import struct
from pathlib import Path

MAGIC = b"\x89MCAP0\r\n"
LIBRARY = "libmcap 1.4.0"
START_NS = 1_735_689_600_000_000_000          # 2025-01-01T00:00:00Z

JOINT_STATE_HASH = "RIHS01_a13ee3a330e346c9d87b5aa18d24e11690752bd33a0350f11c5882bc9179260e"
STRING_HASH = "RIHS01_df668c740482bbd48fb39d76a70dfd4bd59db1288021743503259e948f6b1a18"
SEP = "=" * 80 + "\n"
JOINT_STATE_DEF = ("std_msgs/Header header\n\nstring[] name\nfloat64[] position\nfloat64[] velocity\n"
                   "float64[] effort\n" + SEP + "MSG: std_msgs/Header\n"
                   "builtin_interfaces/Time stamp\n\nstring frame_id\n" + SEP +
                   "MSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec\n")
STRING_DEF = "string data\n"


def qos_yaml(indent: str, durability: str) -> str:
    """offered_qos_profiles as rosbag2 (metadata version 9) writes a discovered publisher's QoS."""
    lines = ["- history: unknown", "  depth: 0", "  reliability: reliable",
             f"  durability: {durability}", "  deadline:", "    sec: 9223372036",
             "    nsec: 854775807", "  lifespan:", "    sec: 9223372036", "    nsec: 854775807",
             "  liveliness: automatic", "  liveliness_lease_duration:", "    sec: 9223372036",
             "    nsec: 854775807", "  avoid_ros_namespace_conventions: false"]
    return "\n".join(indent + line for line in lines)


# -- CDR (little endian, XCDR1), alignment relative to the end of the 4-byte encapsulation --------
class Cdr:
    def __init__(self):
        self.buf = bytearray(b"\x00\x01\x00\x00")

    def _align(self, n):
        self.buf += b"\x00" * (-(len(self.buf) - 4) % n)

    def put(self, fmt, value, size):
        self._align(size)
        self.buf += struct.pack("<" + fmt, value)

    def string(self, s: str):
        data = s.encode() + b"\x00"
        self.put("I", len(data), 4)
        self.buf += data

    def doubles(self, values):
        self.put("I", len(values), 4)
        if values:
            self._align(8)
            self.buf += struct.pack(f"<{len(values)}d", *values)


def joint_state_cdr(stamp_ns: int, names, pos, vel, eff) -> bytes:
    c = Cdr()
    c.put("i", stamp_ns // 1_000_000_000, 4)
    c.put("I", stamp_ns % 1_000_000_000, 4)
    c.string("")                                   # frame_id
    c.put("I", len(names), 4)
    for n in names:
        c.string(n)
    c.doubles(pos)
    c.doubles(vel)
    c.doubles(eff)
    return bytes(c.buf)


def string_cdr(text: str) -> bytes:
    c = Cdr()
    c.string(text)
    return bytes(c.buf)


# -- MCAP records ------------------------------------------------------------------------------
def s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<I", len(b)) + b


def smap(d: dict) -> bytes:
    body = b"".join(s(k) + s(v) for k, v in d.items())
    return struct.pack("<I", len(body)) + body


def record(op: int, body: bytes) -> bytes:
    return struct.pack("<BQ", op, len(body)) + body


def schema_rec(sid, name, text):
    data = text.encode()
    return record(0x03, struct.pack("<H", sid) + s(name) + s("ros2msg")
                  + struct.pack("<I", len(data)) + data)


def channel_rec(cid, sid, topic, meta):
    return record(0x04, struct.pack("<HH", cid, sid) + s(topic) + s("cdr") + smap(meta))


def write_mcap(path: Path, topics, messages, rosbag2_metadata: str):
    """topics: [(channel id, schema name, definition, topic, channel metadata)];
    messages: [(channel id, sequence, log time, publish time, cdr)] in log-time order."""
    schema_ids, schemas, channels = {}, [], []
    for cid, sname, text, topic, meta in topics:
        sid = schema_ids.setdefault(sname, len(schema_ids) + 1)
        if len(schemas) < sid:
            schemas.append(schema_rec(sid, sname, text))
        channels.append(channel_rec(cid, sid, topic, meta))

    out = bytearray(MAGIC)
    out += record(0x01, s("ros2") + s(LIBRARY))
    # one chunk (libmcap's default chunk size is 768 KiB): schemas and channels, then messages
    chunk = bytearray(b"".join(schemas) + b"".join(channels))
    index = {}
    for cid, seq, log_t, pub_t, data in messages:
        index.setdefault(cid, []).append((log_t, len(chunk)))
        chunk += record(0x05, struct.pack("<HIQQ", cid, seq, log_t, pub_t) + data)
    t_start, t_end = messages[0][2], messages[-1][2]
    chunk_start = len(out)
    out += record(0x06, struct.pack("<QQQI", t_start, t_end, len(chunk), 0) + s("")
                  + struct.pack("<Q", len(chunk)) + chunk)
    chunk_len = len(out) - chunk_start
    index_offsets = {}
    for cid, entries in sorted(index.items()):
        index_offsets[cid] = len(out)
        body = b"".join(struct.pack("<QQ", t, o) for t, o in entries)
        out += record(0x07, struct.pack("<HI", cid, len(body)) + body)
    index_len = len(out) - chunk_start - chunk_len
    meta_start = len(out)
    out += record(0x0C, s("rosbag2") + smap({"serialized_metadata": rosbag2_metadata}))
    meta_len = len(out) - meta_start
    out += record(0x0F, struct.pack("<I", 0))                      # DataEnd

    summary_start = len(out)
    groups = []

    def group(op, recs):
        start = len(out)
        out.extend(b"".join(recs))
        groups.append((op, start, len(out) - start))
    group(0x03, schemas)
    group(0x04, channels)
    counts = {}
    for cid, *_ in messages:
        counts[cid] = counts.get(cid, 0) + 1
    stats = struct.pack("<QHIIIIQQ", len(messages), len(schemas), len(channels), 0, 1, 1,
                        t_start, t_end)
    cmc = b"".join(struct.pack("<HQ", c, n) for c, n in sorted(counts.items()))
    group(0x0B, [record(0x0B, stats + struct.pack("<I", len(cmc)) + cmc)])
    offsets = b"".join(struct.pack("<HQ", c, o) for c, o in sorted(index_offsets.items()))
    group(0x08, [record(0x08, struct.pack("<QQQQ", t_start, t_end, chunk_start, chunk_len)
                        + struct.pack("<I", len(offsets)) + offsets
                        + struct.pack("<Q", index_len) + s("")
                        + struct.pack("<QQ", len(chunk), len(chunk)))])
    group(0x0D, [record(0x0D, struct.pack("<QQ", meta_start, meta_len) + s("rosbag2"))])
    summary_offset_start = len(out)
    for op, start, length in groups:
        out += record(0x0E, struct.pack("<BQQ", op, start, length))
    out += record(0x02, struct.pack("<QQI", summary_start, summary_offset_start, 0))
    out += MAGIC
    path.write_bytes(bytes(out))


def metadata_yaml(file_name, duration, topics, counts) -> str:
    """metadata.yaml in rosbag2's key order (yaml-cpp's emitter, Jazzy)."""
    total = sum(counts.values())
    lines = ["rosbag2_bagfile_information:", "  version: 9", "  storage_identifier: mcap",
             "  duration:", f"    nanoseconds: {duration}", "  starting_time:",
             f"    nanoseconds_since_epoch: {START_NS}", f"  message_count: {total}",
             "  topics_with_message_count:"]
    for _, stype, _, topic, meta in topics:
        lines += ["    - topic_metadata:", f"        name: {topic}", f"        type: {stype}",
                  "        serialization_format: cdr", "        offered_qos_profiles:",
                  qos_yaml("          ", meta["_durability"]),
                  f"        type_description_hash: {meta['topic_type_hash']}",
                  f"      message_count: {counts[topic]}"]
    lines += ['  compression_format: ""', '  compression_mode: ""', "  relative_file_paths:",
              f"    - {file_name}", "  files:", f"    - path: {file_name}", "      starting_time:",
              f"        nanoseconds_since_epoch: {START_NS}", "      duration:",
              f"        nanoseconds: {duration}", f"      message_count: {total}",
              "  custom_data: ~", "  ros_distro: jazzy"]
    return "\n".join(lines) + "\n"


def make_bag(out: Path, messages: int = 40, rate: float = 50.0, joints: int = 7) -> Path:
    """Write the bag into directory `out` (must not exist); returns `out`."""
    out = Path(out)
    out.mkdir(parents=True)
    file_name = f"{out.name}_0.mcap"
    names = [f"joint_{i + 1}" for i in range(joints)]
    topics = []
    for cid, (stype, text, topic, thash, durability) in enumerate([
            ("sensor_msgs/msg/JointState", JOINT_STATE_DEF, "/joint_states", JOINT_STATE_HASH,
             "volatile"),
            ("std_msgs/msg/String", STRING_DEF, "/robot_description", STRING_HASH,
             "transient_local")], start=1):
        meta = {"offered_qos_profiles": qos_yaml("", durability), "topic_type_hash": thash}
        topics.append((cid, stype, text, topic, dict(meta, _durability=durability)))
    msgs = [(2, 1, START_NS, START_NS - 150_000, string_cdr("<robot name='arm'/>"))]
    period = int(1e9 / rate)
    for k in range(messages):
        t = START_NS + 1_000_000 + k * period                 # receive time
        sent = t - 250_000                                    # header stamp / publish time
        pos = [0.5 * math.sin(0.1 * k + 0.3 * j) for j in range(joints)]
        vel = [0.05 * math.cos(0.1 * k + 0.3 * j) * rate for j in range(joints)]
        eff = [0.0] * joints
        msgs.append((1, k + 1, t, sent, joint_state_cdr(sent, names, pos, vel, eff)))
    counts = {"/joint_states": messages, "/robot_description": 1}
    duration = msgs[-1][2] - START_NS
    meta_text = metadata_yaml(file_name, duration, topics, counts)
    chan_topics = [(cid, st, tx, tp, {k: v for k, v in m.items() if not k.startswith("_")})
                   for cid, st, tx, tp, m in topics]
    # the MCAP's own copy of the metadata (what `ros2 bag reindex` would read): the inner mapping
    inner = "\n".join(line[2:] for line in meta_text.splitlines()[1:]) + "\n"
    write_mcap(out / file_name, chan_topics, msgs, inner)
    (out / "metadata.yaml").write_text(meta_text, encoding="utf-8")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="bag directory to create (ros2 bag record names it "
                               "rosbag2_YYYY_MM_DD-HH_MM_SS)")
    p.add_argument("--messages", type=int, default=40, help="JointState messages (default 40)")
    p.add_argument("--rate", type=float, default=50.0, help="publish rate in Hz (default 50)")
    p.add_argument("--joints", type=int, default=7, help="joints per message (default 7)")
    a = p.parse_args(argv)
    out = make_bag(Path(a.out), a.messages, a.rate, a.joints)
    print(f"wrote {out}: {a.messages} sensor_msgs/msg/JointState on /joint_states at {a.rate:g} Hz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
