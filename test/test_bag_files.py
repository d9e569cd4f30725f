"""Bag files on disk as `bag info` / `bag recover` meet them: a bag a recorder still writes, a
`.mcap` file that is not MCAP, MCAP files without statistics, torn bare files, split bags,
hand-edited metadata.yaml, a bag the tools cannot write into; and waiting for subscribers.

Bags are written with McapBagWriter and the `mcap` library; no mocks. The waits of the ROS test
have deadlines; no fixed sleeps.
"""
import os
import shutil
from pathlib import Path

import pytest
import yaml

from flashrt_ros.ros.waiting import wait_for

DISCOVERY_TIMEOUT_S = 20
CDR = b"\x00\x01\x00\x00\x03\x00\x00\x00hi\x00\x00"      # std_msgs/String "hi"


def small_bag(bag: Path, log_times, close=True):
    """A bag of std_msgs/String messages at `log_times`; the open writer if not `close`."""
    from flashrt_ros.bags.writer import McapBagWriter
    w = McapBagWriter(bag)
    cid = w.add_topic("/chatter", "std_msgs/msg/String", "string data\n", "", [])
    for t in log_times:
        w.write(cid, t, CDR)
    w.flush()
    if not close:
        return w
    w.close()
    return bag


def bag_cli(capsys, *argv):
    from flashrt_ros.bags.command import main
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_bag_being_recorded_is_refused_not_recovered(tmp_path, capsys):
    from flashrt_ros.bags.reader import open_bag
    from flashrt_ros.bags.recover import recover
    from flashrt_ros.bags.types import BagError
    bag = tmp_path / "live"
    w = small_bag(bag, [10, 20, 30], close=False)
    before = w.path.read_bytes()
    with pytest.raises(BagError) as err:
        recover(bag)
    assert "is being recorded now" in str(err.value) and "stop the recorder" in str(err.value)
    assert sorted(p.name for p in bag.iterdir()) == ["live_0.mcap"]   # nothing renamed or added
    assert w.path.read_bytes() == before
    with pytest.raises(BagError) as err:
        open_bag(bag)
    assert "is being recorded now" in str(err.value)
    rc, out, errs = bag_cli(capsys, "info", str(bag))
    assert rc == 2 and "being recorded" in errs and "run `flashrt-ros bag recover" not in errs, errs
    w.close()                                  # the lock goes with the writer
    assert open_bag(bag).summary().count == 3


def test_a_file_that_is_not_mcap_is_named_and_left_alone(tmp_path):
    from flashrt_ros.bags.reader import open_bag
    from flashrt_ros.bags.recover import recover
    from flashrt_ros.bags.types import BagError
    bag = tmp_path / "notes"
    bag.mkdir()
    text = bag / "notes_0.mcap"
    text.write_text("these are my notes, not a recording\n")
    for call in (open_bag, recover, lambda b: open_bag(text)):
        with pytest.raises(BagError) as err:
            call(bag)
        assert f"{text} is not an MCAP file (starts with b'these ar')" in str(err.value)
        assert "expected a file starting with the MCAP magic" in str(err.value)
    assert sorted(p.name for p in bag.iterdir()) == ["notes_0.mcap"]
    assert text.read_text() == "these are my notes, not a recording\n"
    text.write_bytes(b"")                      # zero length: a recorder killed at once
    (done,) = recover(bag)
    assert done.messages == 0 and done.kept == "notes_0.mcap.unfinished"


def test_an_mcap_file_without_statistics_is_counted(tmp_path):
    from mcap.writer import Writer

    from flashrt_ros.bags.reader import open_bag
    path = tmp_path / "nostats.mcap"
    with open(path, "wb") as f:
        w = Writer(f, use_statistics=False)
        w.start(profile="ros2", library="test")
        sid = w.register_schema("std_msgs/msg/String", "ros2msg", b"string data\n")
        cid = w.register_channel("/chatter", "cdr", sid)
        for t in (1_000, 1_500, 4_000):
            w.add_message(cid, t, CDR, t)
        w.finish()
    s = open_bag(path).summary()
    assert [(t.name, t.count) for t in s.topics] == [("/chatter", 3)]
    assert (s.count, s.start_ns, s.end_ns) == (3, 1_000, 4_000)


def test_a_torn_bare_file_names_the_directory_to_recover(tmp_path):
    from flashrt_ros.bags.reader import open_bag
    from flashrt_ros.bags.recover import recover
    from flashrt_ros.bags.types import BagError
    bag = small_bag(tmp_path / "cut", [10, 20])
    (bag / "metadata.yaml").unlink()
    mcap = bag / "cut_0.mcap"
    mcap.write_bytes(mcap.read_bytes()[:-20])
    with pytest.raises(BagError) as err:
        open_bag(mcap)
    assert f"run `flashrt-ros bag recover {bag}` to make it one" in str(err.value), str(err.value)
    (done,) = recover(bag)                     # the command the hint gives works
    assert done.messages == 2


def test_describing_a_torn_file_counts_its_messages_without_keeping_them(tmp_path):
    """`bag info` on a killed recording counts what it holds; only recover keeps the messages
    (a recording of many gigabytes would otherwise be read into memory to be described)."""
    from flashrt_ros.bags.reader import scan_torn
    bag = small_bag(tmp_path / "cut", [0, 30, 20, 10])      # log time 0 counts as a time
    mcap = bag / "cut_0.mcap"
    mcap.write_bytes(mcap.read_bytes()[:-20])
    counted = scan_torn(mcap)
    assert counted.messages == [] and counted.count == 4
    assert (counted.start, counted.end) == (0, 30)
    assert "4 complete message(s): /chatter [std_msgs/msg/String] x4" in counted.describe()
    kept = scan_torn(mcap, keep_messages=True)
    assert [m.log_time for m in kept.messages] == [0, 30, 20, 10] and kept.counts == counted.counts


def test_the_bag_cli_reports_a_file_it_cannot_write_without_a_traceback(tmp_path, capsys):
    bag = small_bag(tmp_path / "ro", [10])
    (bag / "metadata.yaml").unlink()
    (bag / "metadata.yaml.tmp").mkdir()        # recover cannot write its metadata.yaml
    rc, out, err = bag_cli(capsys, "recover", str(bag))
    assert rc == 2, out + err
    assert f"cannot read/write {bag / 'metadata.yaml.tmp'}: Is a directory" in err, err
    assert "Traceback" not in err


FOREIGN_METADATA = {   # a field of rosbag2_bagfile_information -> a value other writers leave
    "topic_without_name": ("topics_with_message_count", [{"topic_metadata": {"type": "x"}}]),
    "topic_not_a_mapping": ("topics_with_message_count", [{"topic_metadata": 3}]),
    "topics_not_a_list": ("topics_with_message_count", 7),
    "custom_data_a_list": ("custom_data", ["a"]),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_METADATA))
def test_foreign_metadata_yaml_is_a_bag_error(kind, tmp_path):
    from flashrt_ros.bags.reader import open_bag
    from flashrt_ros.bags.types import BagError
    bag = small_bag(tmp_path / "edited", [10])
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())
    key, value = FOREIGN_METADATA[kind]
    meta["rosbag2_bagfile_information"][key] = value
    (bag / "metadata.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(BagError) as err:
        open_bag(bag)
    assert "metadata.yaml is not rosbag2 metadata" in str(err.value)
    assert "custom_data a mapping" in str(err.value) and "topic_metadata" in str(err.value)


def test_a_split_bag_gets_each_file_its_own_entry(tmp_path):
    from flashrt_ros.bags.recover import recover
    bag = tmp_path / "split"
    bag.mkdir()
    for i, times in enumerate([[100, 110, 120], [200, 250]]):
        part = small_bag(tmp_path / f"part{i}", times)
        shutil.move(part / f"part{i}_0.mcap", bag / f"split_{i}.mcap")
    recover(bag)                               # complete files: writes metadata.yaml
    info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert info["message_count"] == 5
    assert [(f["path"], f["message_count"], f["starting_time"]["nanoseconds_since_epoch"],
             f["duration"]["nanoseconds"]) for f in info["files"]] == \
        [("split_0.mcap", 3, 100, 20), ("split_1.mcap", 2, 200, 50)]


# -- waiting for subscribers -------------------------------------------------------------------
@pytest.fixture
def graph():
    import rclpy

    from flashrt_ros.ros.executors import SingleThreadedExecutor
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    nodes = []

    def node(name):
        n = rclpy.create_node(f"{name}_{os.getpid()}", context=ctx)
        ex.add_node(n)
        nodes.append(n)
        return n
    try:
        yield node, (lambda t: ex.spin_once(timeout_sec=t))
    finally:
        ex.shutdown(timeout_sec=1.0)
        for n in nodes:
            n.destroy_node()
        rclpy.try_shutdown(context=ctx)


@pytest.mark.ros
def test_wait_for_subscribers_returns_when_all_matched_at_the_deadline(graph):
    from std_msgs.msg import String

    from flashrt_ros.ros.publishing import SETTLE_S, wait_for_subscribers
    node, idle = graph
    topic = f"/settle_{os.getpid()}"
    talker = node("settle_pub")
    pub = talker.create_publisher(String, topic, 10)
    node("settle_sub").create_subscription(String, topic, lambda m: None, 10)
    wait_for(lambda: pub.get_subscription_count() == 1, DISCOVERY_TIMEOUT_S,
             "the subscription to match", idle=idle)
    wait_for_subscribers(talker, pub, SETTLE_S / 4, idle)   # shorter than SETTLE_S: no error


@pytest.mark.ros
def test_wait_for_subscribers_names_the_subscription_with_incompatible_qos(graph):
    from rclpy.qos import QoSDurabilityPolicy, QoSProfile
    from std_msgs.msg import String

    from flashrt_ros.ros.publishing import wait_for_subscribers
    node, idle = graph
    topic = f"/incompatible_{os.getpid()}"
    talker = node("talker")
    pub = talker.create_publisher(String, topic, 10)                      # volatile
    node("plain_sub").create_subscription(String, topic, lambda m: None, 10)
    node("latched_sub").create_subscription(
        String, topic, lambda m: None,
        QoSProfile(depth=1, durability=QoSDurabilityPolicy.TRANSIENT_LOCAL))
    wait_for(lambda: pub.get_subscription_count() == 1 and
             len(talker.get_subscriptions_info_by_topic(topic)) == 2, DISCOVERY_TIMEOUT_S,
             "one subscription matched, two in the graph", idle=idle)
    with pytest.raises(TimeoutError) as err:
        wait_for_subscribers(talker, pub, 1.0, idle)
    msg = str(err.value)
    assert f"/latched_sub_{os.getpid()} (reliable, transient_local): incompatible QoS" in msg, msg
    assert "Volatile publisher and transient local subscription" in msg
    assert "plain_sub" not in msg
