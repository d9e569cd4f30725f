"""Open any rosbag2 bag: its topics, its messages, what its metadata says.

`open_bag(path)` takes what other writers leave as well as this package's bags:
  * a rosbag2 directory with `metadata.yaml` and MCAP files (`<bag>_0.mcap`, ...; chunks
    compressed or not) or sqlite3 files;
  * a directory of MCAP files without `metadata.yaml` (written by `mcap-ros2-support`, or copied
    without it);
  * a bare `.mcap` file.
MCAP files are read with the `mcap` library, whatever their channels' metadata holds (rosbag2's
`offered_qos_profiles` and `topic_type_hash`, or nothing, as mcap_ros2's writer leaves them);
`metadata.yaml` only adds custom data and the distro. sqlite3 files are read with `rosbags`.

An MCAP file without its footer (a recorder that was killed) is refused with what it holds and
the command that recovers it (`flashrt-ros bag recover`); `scan_torn` reads what such a file
holds up to the torn record, for that command. A file without a footer that a recorder still
writes (McapBagWriter holds an exclusive `flock` on it until it closes) is refused as being
recorded, and a `.mcap` file that does not start with the MCAP magic as not MCAP at all.
Imports no rclpy.
"""
from __future__ import annotations

import fcntl
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flashrt_ros.bags import rosbag2
from flashrt_ros.bags.types import BagError

MCAP_MAGIC = b"\x89MCAP0\r\n"
WHAT = ("a rosbag2 bag: a directory with metadata.yaml and .mcap or .db3 files (as `flashrt-ros "
        "record` or `ros2 bag record` write it), a directory of .mcap files, or one .mcap file")


@dataclass
class BagTopic:
    id: int
    topic: str
    msgtype: str
    msgdef: str = ""                  # the ros2msg text the bag stores (with its dependencies)
    type_hash: str = ""               # RIHS01, as the bag states it ("" if it does not)
    offered_qos: str = ""             # the channel's offered_qos_profiles YAML
    count: int = 0
    serialization_format: str = rosbag2.SERIALIZATION


@dataclass
class BagMessage:
    topic: BagTopic
    log_time: int                     # received by the recorder (ns)
    publish_time: int                 # the sender's source timestamp (ns), as recorded
    sequence: int
    data: bytes


@dataclass
class Bag:
    path: Path
    storage: str                      # mcap | sqlite3
    files: list                       # storage files, in order
    topics: list                      # BagTopic
    custom: dict = field(default_factory=dict)
    distro: str = ""
    start_ns: int = 0
    end_ns: int = 0
    has_metadata: bool = False        # a metadata.yaml was there
    file_times: list = field(default_factory=list)   # (first, last log time) per mcap file

    def messages(self, topics=None):
        """Every message (of `topics`, BagTopic list) in log-time order within each file."""
        want = {t.id for t in (topics if topics is not None else self.topics)}
        by_id = {t.id: t for t in self.topics}
        if self.storage == "sqlite3":
            yield from _sqlite3_messages(self, want, by_id)
            return
        from mcap.reader import make_reader
        for i, path in enumerate(self.files):
            with open(path, "rb") as f:
                for _, channel, m in make_reader(f).iter_messages(log_time_order=True):
                    topic = by_id.get((i, channel.id))
                    if topic is not None and topic.id in want:
                        yield BagMessage(topic, m.log_time, m.publish_time, m.sequence,
                                         bytes(m.data))

    def summary(self) -> rosbag2.BagSummary:
        import dataclasses
        merged = {}
        per_file = [0] * len(self.files)
        for t in self.topics:                  # split files repeat their channels
            if isinstance(t.id, tuple):        # mcap: (file index, channel id)
                per_file[t.id[0]] += t.count
            s = merged.setdefault((t.topic, t.msgtype), rosbag2.TopicSummary(
                t.topic, t.msgtype, t.type_hash, rosbag2.parse_qos(t.offered_qos), 0,
                t.serialization_format))
            s.count += t.count
        return rosbag2.BagSummary(self.storage, [p.name for p in self.files],
                                  [dataclasses.replace(s) for s in merged.values()],
                                  self.start_ns, self.end_ns, dict(self.custom), self.distro,
                                  file_counts=per_file if self.storage == "mcap" else [],
                                  file_times=list(self.file_times),
                                  size=sum(p.stat().st_size for p in self.files))

    def found(self) -> str:
        """The topics, types and counts, for an error message."""
        s = self.summary()
        return ", ".join(f"{t.name} [{t.type}] x{t.count}" for t in s.topics) or "no topics"


def open_bag(path) -> Bag:
    """Open a bag in any of the layouts above; a BagError says what was found otherwise."""
    path = Path(path)
    if not path.exists():
        raise BagError(f"bag {path}: no such file or directory; expected {WHAT}")
    if path.is_file():
        if path.suffix != ".mcap":
            raise BagError(f"bag {path}: expected {WHAT}, found a {path.suffix or 'plain'} file; "
                           f"pass the bag directory (the one holding metadata.yaml)")
        return _open_mcap(path, [path], {})
    if not path.is_dir():
        raise BagError(f"bag {path}: expected {WHAT}, found neither a file nor a directory")
    meta_path = path / rosbag2.METADATA_FILE
    if meta_path.is_file():
        meta = _metadata(path)
        storage, files = meta["storage_identifier"], meta["files"]
    else:
        meta, storage = {}, "mcap"
        files = sorted((p.name for p in path.glob("*.mcap") if p.is_file()), key=_split_index)
        if not files:
            found = sorted(p.name for p in path.iterdir())
            hint = (" (a sqlite3 bag needs its metadata.yaml: `ros2 bag reindex` rebuilds it on a "
                    "ROS machine)" if any(f.endswith(".db3") for f in found) else "")
            raise BagError(f"bag {path}: expected {WHAT}; found no metadata.yaml and no .mcap "
                           f"file in it, only {found}{hint}")
    files = [_regular(path, f) for f in files]
    if storage == "sqlite3":
        return _open_sqlite3(path, files, meta)
    return _open_mcap(path, files, meta)


def _split_index(name: str):
    m = re.search(r"_(\d+)\.mcap$", name)
    return (int(m.group(1)) if m else -1, name)


def _regular(bag_dir: Path, name: str) -> Path:
    """A storage file named in metadata.yaml: a plain name of a regular file in the bag."""
    p = bag_dir / name
    if Path(name).name != name or name in ("", ".", ".."):
        raise BagError(f"bag {bag_dir}: metadata.yaml names the storage file {name!r}; expected "
                       f"a file name inside the bag directory")
    if not p.exists():
        raise BagError(f"bag {bag_dir}: metadata.yaml lists {name}, which is not in the "
                       f"directory; copy the whole bag directory")
    if not p.is_file():
        raise BagError(f"bag {bag_dir}: {name} is not a regular file; expected a storage file")
    return p


def _metadata(bag_dir: Path) -> dict:
    try:
        info = rosbag2.read_metadata(bag_dir)
        storage = info["storage_identifier"]
        files = [Path(f).name if "/" not in f else f for f in info.get("relative_file_paths") or []]
        custom = {str(k): str(v) for k, v in (info.get("custom_data") or {}).items()}
        distro = str(info.get("ros_distro") or "")
        hashes = {}
        for t in info.get("topics_with_message_count") or []:
            topic = t["topic_metadata"]
            hashes[str(topic["name"])] = str(topic.get("type_description_hash") or "")
    except Exception as e:  # noqa: BLE001 - yaml and the mapping fail in several ways
        raise BagError(f"bag {bag_dir}: metadata.yaml is not rosbag2 metadata ({type(e).__name__}:"
                       f" {e}); expected a `rosbag2_bagfile_information` mapping with a "
                       f"storage_identifier, relative_file_paths a list of file names, "
                       f"custom_data a mapping and topics_with_message_count a list of "
                       f"{{topic_metadata: {{name: ..., type: ...}}, message_count: ...}}; "
                       f"fix metadata.yaml, or move it away and run `flashrt-ros bag recover "
                       f"{bag_dir}` to write it anew from the .mcap files") from None
    if storage not in rosbag2.STORAGE_SUFFIX:
        raise BagError(f"bag {bag_dir}: storage {storage!r} is not supported; expected one of "
                       f"{sorted(rosbag2.STORAGE_SUFFIX)}; convert the bag on a ROS machine with "
                       f"`ros2 bag convert` to mcap")
    odd = [f for f in files if not f.endswith(rosbag2.STORAGE_SUFFIX[storage])]
    if odd:
        raise BagError(f"bag {bag_dir}: metadata.yaml says storage {storage!r} but lists {odd}; "
                       f"expected {rosbag2.STORAGE_SUFFIX[storage]} files")
    return {"storage_identifier": storage, "files": files, "custom": custom, "distro": distro,
            "hashes": hashes}


def _torn(path: Path) -> bool:
    """Whether the MCAP file `path` lacks its footer (an unfinished recording). A zero-length
    file counts as torn; a file that starts with anything but the MCAP magic is a BagError."""
    with open(path, "rb") as f:
        head = f.read(len(MCAP_MAGIC))
        if head != MCAP_MAGIC[:len(head)]:
            raise BagError(f"{path} is not an MCAP file (starts with {head!r}); expected a file "
                           f"starting with the MCAP magic {MCAP_MAGIC!r}; move it out of the bag "
                           f"directory, or give it another name than .mcap")
        size = f.seek(0, 2)
        if size < 2 * len(MCAP_MAGIC):
            return True
        f.seek(-len(MCAP_MAGIC), 2)
        return f.read() != MCAP_MAGIC


def being_recorded(f) -> bool:
    """Whether a writer holds its lock on the open file `f` (McapBagWriter's exclusive flock,
    held until it closes the file). Takes a shared lock when none does: it lasts until `f` is
    closed, so no writer can start on the file meanwhile."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    return False


def recording_error(what: str, path: Path) -> BagError:
    return BagError(f"{what}: {path.name} is being recorded now (a recorder holds its lock and has "
                    f"not written the MCAP footer yet); expected a finished recording; stop the "
                    f"recorder first: it finishes the file and writes metadata.yaml, and the bag "
                    f"then opens as it is, with nothing to recover")


def recover_target(path: Path) -> Path:
    """What `flashrt-ros bag recover` takes for `path`: its bag directory."""
    return path.parent if path.is_file() else path


def _open_mcap(bag_dir: Path, files, meta) -> Bag:
    from mcap.reader import make_reader
    bag = Bag(bag_dir, "mcap", files, [], dict(meta.get("custom", {})), meta.get("distro", ""),
              has_metadata=bool(meta))
    hashes = meta.get("hashes", {})
    target = recover_target(bag_dir)
    for i, path in enumerate(files):
        if _torn(path):
            with open(path, "rb") as f:
                if being_recorded(f):
                    raise recording_error(f"bag {bag_dir}", path)
            scan = scan_torn(path)
            raise BagError(f"bag {bag_dir}: {path.name} ends without the MCAP footer: an "
                           f"unfinished recording (the recorder was killed, or the copy is cut "
                           f"short). It holds {scan.describe()}. Expected a complete .mcap file; "
                           f"run `flashrt-ros bag recover {target}` to make it one")
        try:
            with open(path, "rb") as f:
                reader = make_reader(f)
                summary = reader.get_summary()
                if summary is None:            # complete, but written without a summary
                    summary = _summary_of_scan(scan_torn(path))
                elif summary.statistics is None:   # a summary without a Statistics record
                    summary.statistics = _summary_of_scan(scan_torn(path)).statistics
                counts = summary.statistics.channel_message_counts
                for cid, ch in summary.channels.items():
                    schema = summary.schemas.get(ch.schema_id)
                    bag.topics.append(BagTopic(
                        (i, cid), ch.topic, schema.name if schema else "",
                        schema.data.decode("utf-8", "replace") if schema else "",
                        ch.metadata.get(rosbag2.HASH_KEY) or hashes.get(ch.topic, ""),
                        ch.metadata.get(rosbag2.QOS_KEY, ""), int(counts.get(cid, 0)),
                        ch.message_encoding))
                st = summary.statistics
                if st.message_count:
                    bag.start_ns = min(bag.start_ns or st.message_start_time,
                                       st.message_start_time)
                    bag.end_ns = max(bag.end_ns, st.message_end_time)
                    bag.file_times.append((st.message_start_time, st.message_end_time))
                else:
                    bag.file_times.append((0, 0))
                if not bag.custom:
                    bag.custom.update(_custom_from_mcap(reader))
                if not bag.distro:
                    bag.distro = _distro_from_mcap(reader)
        except BagError:
            raise
        except Exception as e:  # noqa: BLE001 - the mcap library raises several types
            raise BagError(f"bag {bag_dir}: cannot read {path.name} ({type(e).__name__}: {e}); "
                           f"expected a complete mcap file - it is truncated or corrupt. "
                           f"Re-record, or try `flashrt-ros bag recover {target}`") from None
    return bag


def _summary_of_scan(scan):
    from mcap.records import Statistics
    from mcap.summary import Summary
    s = Summary()
    s.schemas, s.channels = dict(scan.schemas), dict(scan.channels)
    s.statistics = Statistics(message_count=scan.count, schema_count=len(scan.schemas),
                              channel_count=len(scan.channels), attachment_count=0,
                              metadata_count=len(scan.metadata), chunk_count=0,
                              message_start_time=scan.start, message_end_time=scan.end,
                              channel_message_counts=dict(scan.counts))
    return s


def _custom_from_mcap(reader) -> dict:
    """custom_data kept inside the MCAP file: rosbag2's serialized metadata, then ours."""
    custom = {}
    for m in reader.iter_metadata():
        if m.name == rosbag2.MCAP_RECORD and "serialized_metadata" in m.metadata:
            try:
                inner = yaml.safe_load(m.metadata["serialized_metadata"]) or {}
                custom.update({str(k): str(v) for k, v in (inner.get("custom_data") or {}).items()})
            except (yaml.YAMLError, AttributeError):
                pass
        elif m.name == rosbag2.CUSTOM_RECORD:
            custom.update(m.metadata)
    return custom


def _distro_from_mcap(reader) -> str:
    for m in reader.iter_metadata():
        if m.name == rosbag2.MCAP_RECORD and "serialized_metadata" in m.metadata:
            try:
                return str((yaml.safe_load(m.metadata["serialized_metadata"]) or {})
                           .get("ros_distro") or "")
            except (yaml.YAMLError, AttributeError):
                return ""
    return ""


# -- torn files --------------------------------------------------------------------------------
@dataclass
class TornScan:
    """What an MCAP file without a footer holds, up to its first incomplete record."""
    header_library: str = ""
    schemas: dict = field(default_factory=dict)     # id -> mcap Schema
    channels: dict = field(default_factory=dict)    # id -> mcap Channel
    messages: list = field(default_factory=list)    # mcap Message records (keep_messages)
    metadata: list = field(default_factory=list)    # mcap Metadata records
    counts: dict = field(default_factory=dict)      # channel id -> complete messages
    start: int = 0                                  # first and last log time (ns; 0: none)
    end: int = 0
    stopped: str = ""                               # why reading stopped ("" = the file ended)

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        schemas = {s.id: s.name for s in self.schemas.values()}
        topics = ", ".join(f"{c.topic} [{schemas.get(c.schema_id, '?')}] "
                           f"x{self.counts.get(c.id, 0)}"
                           for c in self.channels.values()) or "no topics"
        return f"{self.count} complete message(s): {topics}"


def scan_torn(path: Path, keep_messages: bool = False) -> TornScan:
    """Read an MCAP file record by record (chunks checked against their CRCs) until it ends or
    a record is incomplete or corrupt. Everything before that is counted; the messages
    themselves are kept only with `keep_messages` (what recover rewrites), so that describing a
    killed recording of many gigabytes does not hold it in memory."""
    from mcap.exceptions import EndOfFile
    from mcap.records import Channel, Header, Message, Metadata, Schema
    from mcap.stream_reader import StreamReader
    scan = TornScan()
    with open(path, "rb") as f:
        try:
            for r in StreamReader(f, validate_crcs=True).records:
                if isinstance(r, Header):
                    scan.header_library = r.library
                elif isinstance(r, Schema):
                    scan.schemas[r.id] = r
                elif isinstance(r, Channel):
                    scan.channels[r.id] = r
                elif isinstance(r, Message):
                    first = not scan.counts
                    scan.counts[r.channel_id] = scan.counts.get(r.channel_id, 0) + 1
                    scan.start = r.log_time if first else min(scan.start, r.log_time)
                    scan.end = r.log_time if first else max(scan.end, r.log_time)
                    if keep_messages:
                        scan.messages.append(r)
                elif isinstance(r, Metadata):
                    scan.metadata.append(r)
        except EndOfFile:
            scan.stopped = "the file ends inside a record (or between records, with no footer)"
        except Exception as e:  # noqa: BLE001 - a corrupt tail ends in struct, zstd or CRC errors
            scan.stopped = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return scan


def _open_sqlite3(bag_dir: Path, files, meta) -> Bag:
    from rosbags.rosbag2 import Reader
    try:
        with Reader(bag_dir) as r:
            topics = [BagTopic(c.id, c.topic, c.msgtype,
                               getattr(c.msgdef, "data", "") or "", c.digest or "", "",
                               c.msgcount) for c in r.connections]
            start, end = (r.start_time, r.end_time - 1) if r.message_count else (0, 0)
    except Exception as e:  # noqa: BLE001 - rosbags raises several types for one cause
        raise BagError(f"bag {bag_dir}: cannot read its storage file(s) ({type(e).__name__}: {e});"
                       f" expected a complete sqlite3 file - it is truncated or corrupt. "
                       f"Re-record, or try sqlite3's `.recover` on the .db3 file") from None
    return Bag(bag_dir, "sqlite3", files, topics, dict(meta.get("custom", {})),
               meta.get("distro", ""), start, end, has_metadata=True)


def _sqlite3_messages(bag: Bag, want, by_id):
    from rosbags.rosbag2 import Reader
    try:
        with Reader(bag.path) as r:
            conns = [c for c in r.connections if c.id in want]
            for conn, t, raw in r.messages(connections=conns):
                yield BagMessage(by_id[conn.id], t, t, 0, bytes(raw))
    except BagError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BagError(f"bag {bag.path}: cannot read its storage file(s) ({type(e).__name__}: "
                       f"{e}); expected a complete sqlite3 file - it is truncated or corrupt. "
                       f"Re-record, or try sqlite3's `.recover` on the .db3 file") from None
