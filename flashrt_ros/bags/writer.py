"""A rosbag2 MCAP bag written so that a killed recorder loses at most its last second.

`McapBagWriter(bag_dir)` creates `<bag>/<bag>_0.mcap` with the `mcap` library's Writer (zstd
chunks, message indexes, a summary) and, on `close()`, `metadata.yaml` (flashrt_ros.bags.rosbag2).

Crash safety, because a recorder can be killed (SIGKILL, power, an OOM killer) at any point:
  * the MCAP header is on disk when the writer is created, and a topic's schema and channel the
    moment the topic is added: written as records of their own in the data section (as well as
    into the chunk the library builds, which repeats them), then flushed;
  * messages reach disk in chunks closed by size (`chunk_size`) or by age: `flush_if_due()`, which
    the recorder calls every spin, closes the open chunk once its first message is
    `flush_interval_s` old. A killed recorder loses the chunk it was filling, at most about
    `flush_interval_s` of messages;
  * custom data (the recorded node, its parameters) goes into MCAP metadata records named
    `rosbag2.CUSTOM_RECORD` as soon as it is known, so a recovered bag keeps it;
  * data is flushed to the operating system, which keeps it when the process dies; `fsync` (for a
    power cut) is left to the file system's own write-back;
  * the writer holds an exclusive `flock` on the MCAP file from its creation until `close()`, so
    `bag recover` and the readers tell a file being recorded now from one a killed recorder left
    (the kernel drops the lock when the process dies).
What a killed recorder leaves - an MCAP file without its summary and footer, and no
metadata.yaml - `flashrt-ros bag recover` (flashrt_ros.bags.recover) turns into a complete bag.

One thread: the recorder's executor calls every method, so nothing here locks.
"""
from __future__ import annotations

import fcntl
import time
from pathlib import Path

from flashrt_ros.bags import rosbag2
from flashrt_ros.bags.types import BagError

CHUNK_SIZE = 768 * 1024           # libmcap's default, which rosbag2_storage_mcap keeps
FLUSH_INTERVAL_S = 1.0


def _library() -> str:
    from importlib import metadata

    from flashrt_ros import __version__
    return f"flashrt_ros {__version__}; mcap {metadata.version('mcap')}"


class McapBagWriter:
    """Writes one rosbag2 MCAP bag into the new directory `bag_dir`."""

    def __init__(self, bag_dir, *, chunk_size: int = CHUNK_SIZE,
                 flush_interval_s: float = FLUSH_INTERVAL_S, compression: str = "zstd",
                 clock=time.monotonic):
        from mcap.writer import CompressionType, Writer
        self.dir = Path(bag_dir)
        try:
            self.dir.mkdir(parents=True)
            self.path = rosbag2.storage_file(self.dir)
            self._file = open(self.path, "xb")
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        except OSError as e:
            raise BagError(f"cannot create the bag {self.dir}: {e.strerror or e}; expected a path "
                           f"that does not exist yet") from None
        self._mcap = Writer(self._file, chunk_size=chunk_size,
                            compression={"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4,
                                         "": CompressionType.NONE}[compression])
        self._mcap.start(profile="ros2", library=_library())
        self._file.flush()
        self.flush_interval_s, self._clock = flush_interval_s, clock
        self._schemas = {}            # type -> schema id
        self.topics = {}              # channel id -> rosbag2.TopicSummary
        self.custom = {}
        self.start_ns, self.end_ns = 0, 0
        self._pending_since = None    # when the open chunk got its first message
        self.flushes = 0

    # -- topics ---------------------------------------------------------------------------
    def add_topic(self, topic: str, msgtype: str, definition: str, type_hash: str,
                  offered_qos: list) -> int:
        """Register `topic` (its schema on first use of the type); returns the channel id.
        `offered_qos`: the publishers' QoS as rosbag2 v9 dicts."""
        from mcap.records import Channel, Schema
        records = []
        sid = self._schemas.get(msgtype)
        if sid is None:
            data = definition.encode()
            sid = self._mcap.register_schema(msgtype, "ros2msg", data)
            self._schemas[msgtype] = sid
            records.append(Schema(id=sid, name=msgtype, encoding="ros2msg", data=data))
        meta = {rosbag2.QOS_KEY: rosbag2.dump(offered_qos).strip() if offered_qos else "",
                rosbag2.HASH_KEY: type_hash}
        cid = self._mcap.register_channel(topic, rosbag2.SERIALIZATION, sid, meta)
        records.append(Channel(id=cid, topic=topic, message_encoding=rosbag2.SERIALIZATION,
                               schema_id=sid, metadata=meta))
        self._write_now(records)
        self.topics[cid] = rosbag2.TopicSummary(topic, msgtype, type_hash, list(offered_qos))
        return cid

    def _write_now(self, records):
        """Write records into the data section, outside any chunk, and flush them to the OS.
        The library's Writer has written all it holds (it writes a record out before returning),
        so its offsets stay right: they come from the file's position."""
        from mcap.data_stream import RecordBuilder
        builder = RecordBuilder()
        for r in records:
            r.write(builder)
        self._file.write(builder.end())
        self._file.flush()

    def set_custom(self, key: str, value: str):
        """A custom_data entry of metadata.yaml, also on disk at once (for `bag recover`)."""
        self.custom[key] = value
        self._mcap.add_metadata(rosbag2.CUSTOM_RECORD, {key: value})
        self._file.flush()

    # -- messages -------------------------------------------------------------------------
    def write(self, channel: int, log_time: int, data: bytes, publish_time: int = 0,
              sequence: int = 0):
        """One message: `log_time` when it was received, `publish_time` the sender's source
        timestamp (0: unknown, then the log time), `sequence` the publisher's sequence number."""
        self._mcap.add_message(channel, log_time, data, publish_time or log_time,
                               sequence % 2**32)
        t = self.topics[channel]
        t.count += 1
        self.start_ns = log_time if not self.start_ns else min(self.start_ns, log_time)
        self.end_ns = max(self.end_ns, log_time)
        if self._pending_since is None:
            self._pending_since = self._clock()
        self.flush_if_due()

    def flush_if_due(self):
        """Close the open chunk and hand it to the OS once its first message is
        `flush_interval_s` old (the library closes it earlier when it reaches `chunk_size`)."""
        if self._pending_since is not None and \
                self._clock() - self._pending_since >= self.flush_interval_s:
            self.flush()

    def flush(self):
        self._mcap.flush()
        self._pending_since = None
        self.flushes += 1

    # -- the end --------------------------------------------------------------------------
    def summary(self) -> rosbag2.BagSummary:
        return rosbag2.BagSummary("mcap", [self.path.name], list(self.topics.values()),
                                  self.start_ns, self.end_ns, dict(self.custom),
                                  size=self.path.stat().st_size if self.path.exists() else 0)

    def close(self):
        """Finish the MCAP file (rosbag2's metadata record, summary, footer), then metadata.yaml."""
        s = self.summary()
        inner = rosbag2.dump(rosbag2.metadata(s)["rosbag2_bagfile_information"])
        self._mcap.add_metadata(rosbag2.MCAP_RECORD, {"serialized_metadata": inner})
        self._mcap.finish()
        self._file.close()            # releases the lock: the file is complete
        s.size = self.path.stat().st_size
        rosbag2.write_metadata(self.dir, s)
        return s
