"""`flashrt-ros bag recover DIR`: make a killed recording a complete bag that plays.

A recorder killed with SIGKILL (or a power cut) leaves `<bag>_0.mcap` without its summary and
footer, and no metadata.yaml. `recover` reads the file record by record with the `mcap`
library's stream reader (chunks checked against their CRCs) up to the first incomplete record,
writes what it holds - every schema, channel, message (log and publish time, sequence) and the
custom data the recorder stored as it went - into a new complete file with McapBagWriter, and
writes metadata.yaml. Nothing is lost on the way: the unfinished file is kept beside it as
`<file>.unfinished` (a rosbag2 reader ignores a file metadata.yaml does not list), and the new
file replaces it only once it is complete (written under a temporary name, then renamed).

A bag that is complete but has no metadata.yaml (one written by mcap_ros2, or copied without
it) only gets its metadata.yaml, as `ros2 bag reindex` would write it.

A bag being recorded now (McapBagWriter holds an exclusive flock on its file until it closes) is
refused before anything is touched, and so is a `.mcap` file that is not MCAP at all. While it
works, `recover` holds a shared lock on each file it rewrites.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from flashrt_ros.bags import rosbag2
from flashrt_ros.bags.reader import _torn, being_recorded, open_bag, recording_error, scan_torn
from flashrt_ros.bags.types import BagError

UNFINISHED = ".unfinished"


@dataclass
class Recovered:
    bag: Path
    file: str
    messages: int
    topics: int
    kept: str            # the unfinished original, kept ("" if the file was complete)
    stopped: str         # why reading the torn file stopped

    def describe(self) -> str:
        if not self.kept:
            return (f"{self.bag}: {self.file} was complete ({self.messages} messages on "
                    f"{self.topics} topics); wrote metadata.yaml")
        return (f"{self.bag}: recovered {self.messages} messages on {self.topics} topics into "
                f"{self.file} (reading stopped at: {self.stopped or 'the end of the file'}); the "
                f"unfinished file is kept as {self.kept}")


def recover(bag_dir) -> list:
    """Recover every unfinished MCAP file of `bag_dir`; returns a Recovered per file."""
    bag_dir = Path(bag_dir)
    if not bag_dir.is_dir():
        raise BagError(f"bag recover {bag_dir}: expected a bag directory holding .mcap files, "
                       f"found {'a file' if bag_dir.exists() else 'nothing'} there")
    files = sorted(p for p in bag_dir.glob("*.mcap") if p.is_file())
    if not files:
        found = sorted(p.name for p in bag_dir.iterdir())
        raise BagError(f"bag recover {bag_dir}: expected .mcap files in it, found {found}")
    done = []
    with ExitStack() as locks:
        torn = []
        for path in files:                    # every file checked before any is touched
            if not _torn(path):
                continue
            if being_recorded(locks.enter_context(open(path, "rb"))):
                raise recording_error(f"bag recover {bag_dir}", path)
            torn.append(path)
        for path in torn:
            done.append(_rewrite(path, scan_torn(path, keep_messages=True)))
    if done or not (bag_dir / rosbag2.METADATA_FILE).exists():
        s = open_bag(bag_dir).summary()
        rosbag2.write_metadata(bag_dir, s)
        if not done:
            done.append(Recovered(bag_dir, ", ".join(s.files), s.count, len(s.topics), "", ""))
    return done


def _rewrite(path: Path, scan) -> Recovered:
    from flashrt_ros.bags.writer import McapBagWriter
    tmp_dir = Path(tempfile.mkdtemp(prefix=".recover_", dir=path.parent))
    try:
        w = McapBagWriter(tmp_dir / path.stem)
        channels = {}
        for cid, ch in scan.channels.items():
            schema = scan.schemas.get(ch.schema_id)
            channels[cid] = w.add_topic(
                ch.topic, schema.name if schema else "", schema.data.decode() if schema else "",
                ch.metadata.get(rosbag2.HASH_KEY, ""),
                rosbag2.parse_qos(ch.metadata.get(rosbag2.QOS_KEY, "")))
        for m in scan.metadata:
            if m.name == rosbag2.CUSTOM_RECORD:
                for k, v in m.metadata.items():
                    w.set_custom(k, v)
        for m in sorted(scan.messages, key=lambda m: m.log_time):
            if m.channel_id in channels:
                w.write(channels[m.channel_id], m.log_time, bytes(m.data), m.publish_time,
                        m.sequence)
        s = w.close()
        kept = path.with_name(path.name + UNFINISHED)
        if kept.exists():
            raise BagError(f"bag recover {path.parent}: {kept.name} exists already (an earlier "
                           f"recovery); move it away first")
        path.rename(kept)
        w.path.rename(path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return Recovered(path.parent, path.name, s.count, len(s.topics), kept.name, scan.stopped)
