"""rosbag2's conventions for the files a bag directory holds, in one place.

What `ros2 bag record` (rosbag2, MCAP storage) leaves, and so what this package writes and what
`ros2 bag info` / `ros2 bag play` / `ros2 bag reindex` expect:

  * the directory `<bag>/` holds `<bag>_0.mcap` (split files count on: `_1`, `_2`, ...) and
    `metadata.yaml` (`rosbag2_bagfile_information`, version 9, rosbag2's key order);
  * every MCAP channel carries `offered_qos_profiles` (the publishers' QoS as YAML) and
    `topic_type_hash` (the type's RIHS01 hash); schemas are `ros2msg` text named by the type;
  * a message's log time is when the recorder received it, its publish time the sender's source
    timestamp, its sequence the publisher's sequence number;
  * `ros_distro` names the distro (`$ROS_DISTRO`, else the one rclpy was built for).

`metadata(...)` builds the YAML mapping, `format_info(...)` the text `ros2 bag info` prints.
Imports no rclpy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flashrt_ros.bags.types import ros_distro

METADATA_FILE = "metadata.yaml"
METADATA_VERSION = 9
SERIALIZATION = "cdr"
QOS_KEY = "offered_qos_profiles"
HASH_KEY = "topic_type_hash"
MCAP_RECORD = "rosbag2"                 # MCAP metadata record holding the serialized metadata
CUSTOM_RECORD = "flashrt_ros.custom_data"   # ours: custom_data as soon as known (bag recover)
STORAGE_SUFFIX = {"mcap": ".mcap", "sqlite3": ".db3"}


def storage_file(bag_dir: Path, index: int = 0, storage: str = "mcap") -> Path:
    """`<bag>/<bag>_<index>.mcap`, as rosbag2 names a bag's storage files."""
    return bag_dir / f"{bag_dir.name}_{index}{STORAGE_SUFFIX[storage]}"


@dataclass
class TopicSummary:
    name: str
    type: str
    type_hash: str = ""
    offered_qos: list = field(default_factory=list)      # rosbag2 v9 QoS dicts
    count: int = 0
    serialization_format: str = SERIALIZATION


@dataclass
class BagSummary:
    """What metadata.yaml and `ros2 bag info` say about a bag."""
    storage: str
    files: list                          # names relative to the bag directory
    topics: list                         # TopicSummary, in channel order
    start_ns: int = 0
    end_ns: int = 0                      # last message's log time
    custom: dict = field(default_factory=dict)
    distro: str = ""
    file_counts: list = field(default_factory=list)   # messages per file (default: all in one)
    file_times: list = field(default_factory=list)    # (first, last log time) per file
    size: int = 0                        # bytes of the storage files

    @property
    def count(self) -> int:
        return sum(t.count for t in self.topics)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns) if self.count else 0


def metadata(s: BagSummary) -> dict:
    """The `metadata.yaml` mapping in rosbag2's key order (version 9)."""
    start = s.start_ns if s.count else 0
    counts = s.file_counts or [s.count] + [0] * (len(s.files) - 1)
    times = s.file_times or [(s.start_ns, s.end_ns)] + [(0, 0)] * (len(s.files) - 1)
    info = {
        "version": METADATA_VERSION,
        "storage_identifier": s.storage,
        "duration": {"nanoseconds": s.duration_ns},
        "starting_time": {"nanoseconds_since_epoch": start},
        "message_count": s.count,
        "topics_with_message_count": [
            {"topic_metadata": {"name": t.name, "type": t.type,
                                "serialization_format": t.serialization_format,
                                "offered_qos_profiles": list(t.offered_qos),
                                "type_description_hash": t.type_hash},
             "message_count": t.count} for t in s.topics],
        "compression_format": "",
        "compression_mode": "",
        "relative_file_paths": list(s.files),
        "files": [{"path": f, "starting_time": {"nanoseconds_since_epoch": first if n else 0},
                   "duration": {"nanoseconds": max(0, last - first) if n else 0},
                   "message_count": n}
                  for f, n, (first, last) in zip(s.files, counts, times)],
        "custom_data": dict(s.custom) or None,
        "ros_distro": s.distro or ros_distro(),
    }
    return {"rosbag2_bagfile_information": info}


def dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def write_metadata(bag_dir: Path, s: BagSummary):
    """Write `<bag>/metadata.yaml` whole or not at all (a temporary file, then a rename)."""
    tmp = bag_dir / (METADATA_FILE + ".tmp")
    tmp.write_text(dump(metadata(s)), encoding="utf-8")
    tmp.replace(bag_dir / METADATA_FILE)


def parse_qos(text: str) -> list:
    """A channel's `offered_qos_profiles` YAML -> the list of QoS dicts ([] if empty or not a
    list: other writers leave it out or write something else)."""
    try:
        got = yaml.safe_load(text) if text else []
    except yaml.YAMLError:
        return []
    return got if isinstance(got, list) else []


def read_metadata(bag_dir: Path) -> dict:
    """The `rosbag2_bagfile_information` mapping of `<bag>/metadata.yaml`."""
    return yaml.safe_load((bag_dir / METADATA_FILE).read_text(encoding="utf-8"))[
        "rosbag2_bagfile_information"]


# -- `ros2 bag info` ---------------------------------------------------------------------------
INDENT = " " * 19      # rosbag2: the longest field name ("Topic information: ") plus nothing


def _size(n: int) -> str:
    units, size, i = ("B", "KiB", "MiB", "GiB", "TiB"), float(n), 0
    while size >= 1024 and i < 4:
        size /= 1024
        i += 1
    return f"{size:.0f} {units[i]}" if i == 0 else f"{size:.1f} {units[i]}"


def _seconds(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _time_point(ns: int) -> str:
    t = time.localtime(ns // 1_000_000_000)
    day = f"{t.tm_mday:2d}"
    return (f"{time.strftime('%b', t)} {day} {t.tm_year} {time.strftime('%H:%M:%S', t)}"
            f".{ns % 1_000_000_000:09d} ({_seconds(ns)})")


def format_info(s: BagSummary) -> str:
    """The text `ros2 bag info` (rosbag2_py's format_bag_meta_data, Jazzy) prints for a bag."""
    lines = ["", "Files:             " + (s.files[0] if s.files else "")]
    lines += [INDENT + f for f in s.files[1:]]
    lines += [f"Bag size:          {_size(s.size)}",
              f"Storage id:        {s.storage}",
              f"ROS Distro:        {s.distro or 'unknown'}",
              f"Duration:          {_seconds(s.duration_ns)}s",
              f"Start:             {_time_point(s.start_ns if s.count else 0)}",
              f"End:               {_time_point((s.start_ns + s.duration_ns) if s.count else 0)}",
              f"Messages:          {s.count}"]
    topics = [f"Topic: {t.name} | Type: {t.type} | Count: {t.count} | Serialization Format: "
              f"{t.serialization_format}" for t in s.topics]
    lines.append("Topic information: " + (topics[0] if topics else ""))
    lines += [INDENT + t for t in topics[1:]]
    lines += ["Service:           0", "Service information: "]
    return "\n".join(lines) + "\n"
