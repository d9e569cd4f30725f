"""Bags: record an episode, replay it into a fresh node, and get the same actions byte for byte.

Layers here:
  * no ROS: the typestore built from msg/*.msg agrees with rosidl (type hashes), the action
    comparison sees a one-ulp difference, and bad bags end in a BagError that explains itself;
  * processes over DDS on loopback (marker `ros`): a policy node process is driven through an
    episode with snapshot / restore / fork / rollback / reset / delete while two `flashrt-ros
    record` processes write it (MCAP and sqlite3); then each bag is replayed in lockstep into a
    fresh node process and every action must match the recorded one (payload bytes, step,
    episode, lineage); a bag laid out as `ros2 bag record` writes it (tools/make_joint_state_bag.py)
    replays JointState into a node started with `joint_names`.
Every wait has a deadline (flashrt_ros.ros.waiting: wait_for / spin_until); no fixed sleeps.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flashrt_ros.ros.stamps import stamp_to_ns
from flashrt_ros.ros.waiting import spin_until, wait_for

ROOT = Path(__file__).resolve().parent.parent
MAKE_JOINT_STATE_BAG = ROOT / "tools" / "make_joint_state_bag.py"
STARTUP_TIMEOUT_S = 120     # a node process imports torch, builds its runtime, prefills
DISCOVERY_TIMEOUT_S = 20    # discovery between processes takes 0.05 s to a few seconds here
STEP_TIMEOUT_S = 10
INSTRUCTION = "pick up the red cube"
NODE_PARAMS = {"managed": False, "control_mode": "observation", "observation_qos": "reliable",
               "stale_observation_s": 0.0, "instruction": INSTRUCTION, "status_rate_hz": 20.0,
               "runtime.device": "cpu"}
JOINTS = [f"joint_{i + 1}" for i in range(7)]     # tiny preset: obs_dim 14 = 7 positions + 7 velocities


# -- no ROS ----------------------------------------------------------------------------------
def test_typestore_types_hash_like_rosidl():
    """Our .msg files registered in rosbags give the type hashes rosidl generated (.json files)."""
    from flashrt_ros.bags.types import msg_dir, typestore
    store = typestore()
    jsons = sorted(msg_dir().glob("*.json"))
    if not jsons:
        pytest.skip(f"no rosidl type descriptions next to {msg_dir()} (source checkout only)")
    for path in jsons:
        want = json.loads(path.read_text())["type_hashes"][0]
        assert store.hash_rihs01(want["type_name"]) == want["hash_string"], path.name
    assert {p.stem for p in msg_dir().glob("*.msg")} == {p.stem for p in jsons}


def test_compare_actions_sees_one_ulp():
    from flashrt_ros.bags.play import compare_actions
    from flashrt_ros.bags.types import typestore
    cls = typestore().types["flashrt_ros/msg/ActionChunk"]
    time_cls = typestore().types["builtin_interfaces/msg/Time"]
    header_cls = typestore().types["std_msgs/msg/Header"]

    def chunk(data, step=3):
        return cls(header=header_cls(stamp=time_cls(0, 0), frame_id=""), step=step, episode_id=1,
                   horizon=2, action_dim=2, data=np.asarray(data, dtype=np.float32),
                   observation_stamp=time_cls(0, 0), capsule_lineage="", latency_ms=0.0)
    a = chunk([0.25, -1.0, 3.5, 7.0])
    same = chunk([0.25, -1.0, 3.5, 7.0])
    bumped = np.asarray([0.25, -1.0, 3.5, 7.0], dtype=np.float32)
    bumped[2] = np.nextafter(bumped[2], np.float32(np.inf))
    assert compare_actions({0: a}, {0: same}).all_identical
    cmp = compare_actions({0: a, 1: a, 2: a}, {0: same, 1: chunk(bumped), 2: chunk(a.data, step=4)})
    assert not cmp.all_identical and cmp.identical == 1
    assert [i for i, _ in cmp.mismatches] == [1, 2]
    assert "data differs in 1 of 4 values" in cmp.mismatches[0][1]
    assert "step 3 != 4" in cmp.mismatches[1][1]


def _make_foreign_bag(path: Path, *args) -> Path:
    subprocess.run([sys.executable, str(MAKE_JOINT_STATE_BAG), str(path), *args], check=True,
                   capture_output=True, text=True, timeout=60)
    return path


def _write_bag(path: Path, topics, storage="mcap"):
    """A small bag written by rosbags: topics = [(name, msgtype, [message objects])]."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from flashrt_ros.bags.types import typestore
    store = typestore()
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    with Writer(path, version=9, storage_plugin=plugin) as w:
        t = 1_000_000_000
        for name, msgtype, msgs in topics:
            conn = w.add_connection(name, msgtype, typestore=store)
            for m in msgs:
                t += 1_000_000
                w.write(conn, t, store.serialize_cdr(m, msgtype))
    return path


def _string(text):
    from flashrt_ros.bags.types import typestore
    return typestore().types["std_msgs/msg/String"](data=text)


def _observation(k):
    from flashrt_ros.bags.types import typestore
    t = typestore().types
    return t["flashrt_ros/msg/Observation"](
        header=t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](1, k), frame_id=""),
        state=np.full(14, k, dtype=np.float32), episode_id=0, reset_episode=False)


def _bad_bag(kind: str, tmp: Path) -> Path:
    bag = tmp / kind
    if kind == "missing_topics":
        return _write_bag(bag, [("/chatter", "std_msgs/msg/String", [_string("hi")])])
    if kind == "wrong_type":
        return _write_bag(bag, [("/flashrt_policy/observation", "std_msgs/msg/String",
                                 [_string("not an observation")])])
    if kind == "truncated_sqlite3":
        _write_bag(bag, [("/flashrt_policy/observation", "flashrt_ros/msg/Observation",
                          [_observation(k) for k in range(200)])], storage="sqlite3")
        db = next(bag.glob("*.db3"))
        db.write_bytes(db.read_bytes()[:len(db.read_bytes()) // 3])
        return bag
    bag = _make_foreign_bag(bag, "--messages", "20")
    mcap = next(bag.glob("*.mcap"))
    if kind == "truncated":
        data = mcap.read_bytes()
        mcap.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_tail":
        mcap.write_bytes(mcap.read_bytes()[:-20])
    elif kind == "unknown_storage":
        meta = bag / "metadata.yaml"
        meta.write_text(meta.read_text().replace("storage_identifier: mcap",
                                                 "storage_identifier: cassette"))
    elif kind == "db3_without_metadata":
        (bag / "metadata.yaml").unlink()
        mcap.rename(mcap.with_suffix(".db3"))
    elif kind == "missing_file":
        mcap.unlink()
    elif kind == "not_a_bag":
        bag = tmp / "notes.txt"
        bag.write_text("not a bag")
    elif kind == "empty_dir":
        (bag / "metadata.yaml").unlink()
        mcap.unlink()
    return bag


BAD_BAGS = {  # kind -> phrases the error must contain (what was expected / found / what to do)
    "missing_topics": ["expected an observation topic", "/chatter [std_msgs/msg/String] x1",
                       "flashrt-ros record"],
    "wrong_type": ["/flashrt_policy/observation has type std_msgs/msg/String",
                   "expected flashrt_ros/msg/Observation"],
    "truncated": ["without the MCAP footer", "holds 0 complete message(s): no topics",
                  "flashrt-ros bag recover"],
    "truncated_tail": ["without the MCAP footer", "holds 21 complete message(s)",
                       "/joint_states [sensor_msgs/msg/JointState] x20", "flashrt-ros bag recover"],
    "truncated_sqlite3": ["cannot read", "truncated or corrupt"],
    "unknown_storage": ["storage 'cassette' is not supported", "expected one of ['mcap', 'sqlite3']",
                        "ros2 bag convert"],
    "db3_without_metadata": ["no metadata.yaml and no .mcap", "_0.db3", "ros2 bag reindex"],
    "empty_dir": ["no metadata.yaml and no .mcap", "found no metadata.yaml"],
    "missing_file": ["lists", "not in the directory"],
    "not_a_bag": ["found a .txt file", "metadata.yaml"],
}


@pytest.mark.parametrize("kind", sorted(BAD_BAGS))
def test_bad_bag_is_a_clear_error(kind, tmp_path):
    from flashrt_ros.bags.play import RecordedEpisode
    from flashrt_ros.bags.types import BagError
    bag = _bad_bag(kind, tmp_path)
    with pytest.raises(BagError) as err:
        RecordedEpisode.open(bag)
    for phrase in BAD_BAGS[kind]:
        assert phrase in str(err.value), str(err.value)


def test_play_cli_reports_a_bad_bag_without_a_traceback(tmp_path, ros_env):
    bag = _bad_bag("wrong_type", tmp_path)
    out = subprocess.run([sys.executable, "-m", "flashrt_ros.cli", "play", str(bag)], env=ros_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "flashrt-ros play: bag" in out.stderr and "expected flashrt_ros/msg/Observation" in out.stderr
    assert "Traceback" not in out.stderr


def _capsule_event(store, **fields):
    t = store.types
    header = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](1, 500), frame_id="")
    cls = t["flashrt_ros/msg/CapsuleEvent"]
    values = dict(operation="", name="", source="", step=0, position=0, k=0, tier="host",
                  success=True, message="", latency_ms=0.0)
    values.update(fields)
    names = cls.__dataclass_fields__
    return cls(header=header, **{k: v for k, v in values.items() if k in names},
               **{k: False for k in names if k not in values and k != "header"})


def test_capsule_event_flags_replay_from_fields_and_from_bags_of_the_older_definition(tmp_path):
    """CapsuleEvent carries the request flags; a bag recorded before it had them (another type
    hash) still reads - decoded with its own definition - and the flags come from the message text
    as that release's node wrote it."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    from flashrt_ros.bags.play import RecordedEpisode, capsule_request
    from flashrt_ros.bags.types import msg_dir, typestore

    # the new definition: pin (which no message text shows) and switch_to from the fields
    new = _write_bag(tmp_path / "new", [
        ("/flashrt_policy/observation", "flashrt_ros/msg/Observation", [_observation(0)]),
        ("/flashrt_policy/capsule_events", "flashrt_ros/msg/CapsuleEvent", [
            _capsule_event(typestore(), operation="snapshot", name="a", pin=True,
                           message="snapshot 'a'"),
            _capsule_event(typestore(), operation="fork", name="b", switch_to=True,
                           message="forked '' -> 'b'")])])
    ops = RecordedEpisode.open(new).capsule_ops
    assert [capsule_request(it.msg)[1].pin for it in ops[:1]] == [True]
    assert capsule_request(ops[1].msg)[1].switch_to is True

    # the older definition: the .msg text before the flag fields were appended
    text = (msg_dir() / "CapsuleEvent.msg").read_text(encoding="utf-8")
    old_text = text[:text.index("# The request's flags")]
    old = get_typestore(Stores.ROS2_KILTED)
    old.register(get_types_from_msg(old_text, "flashrt_ros/msg/CapsuleEvent"))
    old.register({k: v for k, v in typestore().fielddefs.items()
                  if k == "flashrt_ros/msg/Observation"})
    assert old.hash_rihs01("flashrt_ros/msg/CapsuleEvent") != \
        typestore().hash_rihs01("flashrt_ros/msg/CapsuleEvent")
    bag = tmp_path / "old"
    with Writer(bag, version=9) as w:
        t = 1_000_000_000
        for topic, msgtype, msgs in [
                ("/flashrt_policy/observation", "flashrt_ros/msg/Observation", [_observation(0)]),
                ("/flashrt_policy/capsule_events", "flashrt_ros/msg/CapsuleEvent", [
                    _capsule_event(old, operation="fork", name="c",
                                   message="forked '' -> 'c' and switched to it"),
                    _capsule_event(old, operation="fork", name="d", message="forked '' -> 'd'")])]:
            conn = w.add_connection(topic, msgtype, typestore=old)
            for m in msgs:
                t += 1_000_000
                w.write(conn, t, old.serialize_cdr(m, msgtype))
    ops = RecordedEpisode.open(bag).capsule_ops
    assert [capsule_request(it.msg)[1].switch_to for it in ops] == [True, False]
    assert [capsule_request(it.msg)[1].name for it in ops] == ["c", "d"]


def test_foreign_bag_reads_as_ros2_bag_record_lays_it_out(tmp_path):
    from flashrt_ros.bags.play import RecordedEpisode
    bag = _make_foreign_bag(tmp_path / "rosbag2_2025_01_01-00_00_00")
    assert sorted(p.name for p in bag.iterdir()) == ["metadata.yaml",
                                                     "rosbag2_2025_01_01-00_00_00_0.mcap"]
    ep = RecordedEpisode.open(bag)
    assert len(ep.observations) == 40 and {it.kind for it in ep.observations} == {"joint_states"}
    assert list(ep.observations[0].msg.name) == JOINTS
    assert not ep.actions and not ep.capsule_ops and not ep.instructions
    again = _make_foreign_bag(tmp_path / "again" / bag.name)
    assert (next(again.glob("*.mcap")).read_bytes()
            == next(bag.glob("*.mcap")).read_bytes()), "the generator must be deterministic"


@pytest.mark.ros
def test_record_cli_stops_after_duration_and_refuses_an_existing_bag(tmp_path, ros_env):
    """No node at all: the recorder waits, stops at --duration and leaves a valid (empty) bag."""
    import yaml
    from rosbags.rosbag2 import Reader
    bag = tmp_path / "empty"
    cmd = [sys.executable, "-m", "flashrt_ros.cli", "record", "--node", f"/nobody_{os.getpid()}",
           "--out", str(bag), "--duration", "0.5"]
    out = subprocess.run(cmd, env=ros_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stopped (duration 0.5 s): wrote 0 messages" in out.stdout
    assert "parameters of" in out.stdout                 # the warning: none could be read
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["message_count"] == 0 and meta["storage_identifier"] == "mcap"
    with Reader(bag) as reader:
        assert reader.message_count == 0
    again = subprocess.run(cmd, env=ros_env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr and "--out" in again.stderr
    assert "Traceback" not in again.stderr


# -- processes over DDS ----------------------------------------------------------------------
class Recorder:
    """A `flashrt-ros record` child process; its output lines are collected as they come."""

    def __init__(self, node, out, storage, env):
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flashrt_ros.cli", "record", "--node", node, "--out", str(out),
             "--storage", storage, "--progress", "0.2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def saw(self, text):
        if self.proc.poll() is not None and not any(text in x for x in self.lines):
            raise RuntimeError(f"recorder exited with {self.proc.returncode}:\n{''.join(self.lines)}")
        return any(text in x for x in self.lines)

    def counts(self):
        progress = [x for x in self.lines if re.match(r"\[record\]\s+[\d.]+ s ", x)]
        return {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", progress[-1])} if progress else {}

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=30)
        self.reader.join(timeout=5)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class EpisodeDriver:
    """Drives a policy node in lockstep from this process and remembers what it did."""

    def __init__(self, target):
        import rclpy
        from flashrt_ros.ros.publishing import LATCHED
        from flashrt_ros.ros.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, QoSReliabilityPolicy
        from std_msgs.msg import String

        from flashrt_ros.msg import ActionChunk, Observation, PolicyStatus
        self.rclpy, self.target = rclpy, target
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("episode_driver", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        qos = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE)
        self.Observation = Observation
        self.obs_pub = self.node.create_publisher(Observation, f"{target}/observation", qos)
        self.instr_pub = self.node.create_publisher(String, f"{target}/instruction", LATCHED)
        self.actions_by_stamp = {}
        self.status = None
        self.action_sub = self.node.create_subscription(
            ActionChunk, f"{target}/action",
            lambda m: self.actions_by_stamp.__setitem__(stamp_to_ns(m.observation_stamp), m), qos)
        self.node.create_subscription(PolicyStatus, f"{target}/status",
                                      lambda m: setattr(self, "status", m), qos)
        self.actions = []            # in observation order
        self.ops_at = []             # (operation, observation index it went before)
        # created now, not at the first call: DDS drops a reply to a client the server has not
        # matched yet, and by the first call it has had the episode's first steps to match them
        from flashrt_ros.ros.operations import OPERATIONS
        self._clients = {o.service: self.node.create_client(o.srv_type, f"{target}/{o.service}")
                         for o in OPERATIONS}

    def spin_until(self, predicate, what, timeout=STEP_TIMEOUT_S):
        return spin_until(self.executor, predicate, timeout, what)

    def step(self, obs):
        msg = self.Observation(state=[float(x) for x in obs])
        msg.header.stamp = self.node.get_clock().now().to_msg()
        key = stamp_to_ns(msg.header.stamp)
        self.obs_pub.publish(msg)
        action = self.spin_until(lambda: self.actions_by_stamp.get(key),
                                 f"the action for observation {len(self.actions)}")
        self.actions.append(action)
        return action

    def call(self, srv_type, service, **fields):
        client = self._clients.get(service) or self.node.create_client(srv_type, f"{self.target}/{service}")
        self._clients[service] = client
        self.spin_until(client.service_is_ready, f"service {self.target}/{service}", DISCOVERY_TIMEOUT_S)
        future = client.call_async(srv_type.Request(**fields))
        self.spin_until(future.done, f"the answer of {service}")
        res = future.result()
        assert res.success, f"{service}: {res.message}"
        self.ops_at.append((service, len(self.actions)))
        return res

    def instruct(self, text):
        from std_msgs.msg import String
        before = self.status.episode_id
        t_pub = self.node.get_clock().now().nanoseconds
        self.instr_pub.publish(String(data=text))
        self.spin_until(lambda: self.status.episode_id != before and
                        stamp_to_ns(self.status.header.stamp) >= t_pub,
                        "the node to prefill the new instruction")

    def close(self):
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)


def _episode(driver):
    """Instruction, then steps with every capsule operation between them (26 distinct inputs)."""
    from flashrt_ros import srv
    obs = np.random.default_rng(7).standard_normal((26, 14)).astype(np.float32) * 0.5
    driver.instruct("stack the green block on the red one")
    for k in range(8):
        driver.step(obs[k])                                          # 0..7
    driver.call(srv.Snapshot, "snapshot", name="home")
    for k in range(8, 14):
        driver.step(obs[k])                                          # 8..13
    driver.call(srv.Restore, "restore", name="home")
    for k in range(8, 14):
        driver.step(obs[k])                                          # 14..19 == 8..13
    driver.call(srv.Fork, "fork", source="", name="branch", switch_to=True)
    for k in range(14, 20):
        driver.step(obs[k])                                          # 20..25
    driver.call(srv.Rollback, "rollback", k=2)
    for k in range(18, 20):
        driver.step(obs[k])                                          # 26..27 == 24..25
    driver.call(srv.Reset, "reset", keep_context=True)
    for k in range(20, 24):
        driver.step(obs[k])                                          # 28..31
    driver.call(srv.DeleteCapsule, "delete_capsule", name="branch")
    for k in range(24, 26):
        driver.step(obs[k])                                          # 32..33


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, ros_env):
    """One episode driven through a node process, recorded twice (MCAP and sqlite3)."""
    from flashrt_ros.testing import PolicyNodeProcess
    tmp = tmp_path_factory.mktemp("recorded")
    params = dict(NODE_PARAMS, **{"store.capsule_dir": str(tmp / "capsules")})
    name = f"flashrt_rec_{os.getpid()}"
    timings = {}
    t0 = time.monotonic()
    with PolicyNodeProcess(name, params, ros_env) as node:
        driver = EpisodeDriver(node.node)
        recorders = []
        try:
            node.wait_active(STARTUP_TIMEOUT_S)
            driver.spin_until(lambda: driver.status is not None, f"{node.node} status", STEP_TIMEOUT_S)
            timings["node_start_s"] = time.monotonic() - t0
            recorders = [Recorder(node.node, tmp / "episode_mcap", "mcap", ros_env),
                         Recorder(node.node, tmp / "episode_sqlite3", "sqlite3", ros_env)]
            for r in recorders:   # subscribed to all five topics, and the node's writers reach it
                wait_for(lambda: r.saw("[record] ready"), DISCOVERY_TIMEOUT_S, f"{r.out} to be ready")
                wait_for(lambda: r.saw(f"first message on {node.node}/status"), DISCOVERY_TIMEOUT_S,
                         f"{r.out} to receive the node's status")
                # the parameters are asked for over services, which a loaded machine can
                # discover after a short episode ended; the recorder asks again each second
                # until every answer came (~50 of them, one per parameter)
                wait_for(lambda: r.saw("parameters of"), 3 * DISCOVERY_TIMEOUT_S,
                         f"{r.out} to store the node's parameters")
            driver.spin_until(lambda: driver.obs_pub.get_subscription_count() >= 3 and
                              driver.instr_pub.get_subscription_count() >= 3 and
                              driver.action_sub.get_publisher_count() >= 1,
                              "the node and both recorders to match the driver", DISCOVERY_TIMEOUT_S)
            timings["recorders_ready_s"] = time.monotonic() - t0 - timings["node_start_s"]
            t1 = time.monotonic()
            _episode(driver)
            timings["episode_s"] = time.monotonic() - t1
            n = len(driver.actions)
            for r in recorders:
                wait_for(lambda: (lambda c: c.get("action") == n and c.get("observation") == n and
                                  c.get("capsule_events") == 6 and c.get("instruction") == 1)(r.counts()),
                         DISCOVERY_TIMEOUT_S, f"{r.out} to have the whole episode (has {r.counts()})")
            for r in recorders:
                assert r.stop() == 0, "".join(r.lines)
                assert any("stopped (SIGINT)" in x for x in r.lines), "".join(r.lines)
        except Exception as e:
            logs = "".join(f"--- {r.out} ---\n" + "".join(r.lines[-15:]) for r in recorders)
            raise AssertionError(f"{e}\nlast status: {driver.status}\n--- node log ---\n"
                                 f"{node.log()}{logs}") from e
        finally:
            for r in recorders:
                r.kill()
            driver.close()
    timings["record_total_s"] = time.monotonic() - t0
    return {"node": node.node, "mcap": tmp / "episode_mcap", "sqlite3": tmp / "episode_sqlite3",
            "actions": driver.actions, "ops_at": driver.ops_at, "params": params,
            "timings": timings, "recorder_output": [r.lines for r in recorders]}


@pytest.mark.ros
@pytest.mark.slow
@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_recorded_bag_holds_the_episode(recorded, storage):
    import yaml
    from flashrt_ros.bags.play import RecordedEpisode
    from flashrt_ros.bags.types import ros_distro
    bag = recorded[storage]
    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["version"] == 9 and meta["storage_identifier"] == storage
    assert meta["relative_file_paths"] == [f"{bag.name}_0.mcap" if storage == "mcap"
                                           else f"{bag.name}.db3"]
    assert meta["ros_distro"] == ros_distro()
    ep = RecordedEpisode.open(bag)
    print(f"\n{ep.summary()}; recording timings {recorded['timings']}")
    if storage == "mcap":       # rosbag2's conventions, read by readers this package does not use
        from test_bags_rosbag2 import check_with_independent_readers
        got = check_with_independent_readers(bag, recorded_live=True)
        assert len(got[f"{recorded['node']}/action"]) == 34
    assert ep.node == recorded["node"]
    n = len(recorded["actions"])
    assert len(ep.observations) == n == len(ep.actions) == 34 and ep.unlinked_actions == 0
    assert [it.msg.operation for it in ep.capsule_ops] == [
        "snapshot", "restore", "fork", "rollback", "reset", "delete"]
    # each operation is placed before the observation that followed it when it was recorded
    want = [(op.replace("delete_capsule", "delete"), at) for op, at in recorded["ops_at"]]
    assert [(it.msg.operation, it.index) for it in ep.capsule_ops] == want
    assert [it.index for it in ep.instructions] == [0]
    for i, live in enumerate(recorded["actions"]):       # the bag holds what the driver saw
        rec = ep.actions[i]
        assert np.asarray(rec.data, np.float32).tobytes() == np.asarray(live.data, np.float32).tobytes()
        assert (rec.step, rec.episode_id, rec.capsule_lineage) == (live.step, live.episode_id,
                                                                   live.capsule_lineage)
    # restore and rollback really happened: the same inputs gave the same actions again
    data = [np.asarray(ep.actions[i].data, np.float32).tobytes() for i in range(n)]
    assert data[14:20] == data[8:14] and data[26:28] == data[24:26]
    assert data[8:14] != data[20:26]


@pytest.mark.ros
@pytest.mark.slow
def test_recorder_stores_the_node_parameters(recorded):
    """The node's parameters ride along in custom_data, for a replay that configures a node alike."""
    from flashrt_ros.bags.play import RecordedEpisode
    output = "".join(recorded["recorder_output"][0])
    ep = RecordedEpisode.open(recorded["mcap"])
    assert ep.parameters is not None, "no parameters in the bag; the recorder said:\n" + output
    assert ep.parameters["instruction"] == INSTRUCTION and ep.parameters["managed"] is False
    assert ep.parameters["store.capsule_dir"] == recorded["params"]["store.capsule_dir"]


@pytest.mark.ros
@pytest.mark.slow
def test_replay_into_a_fresh_node_is_byte_identical(recorded, ros_env, tmp_path):
    """The MCAP bag, replayed in lockstep into a new node process, gives every action again."""
    import rclpy
    from flashrt_ros.bags.play import BagPlayer, RecordedEpisode
    from flashrt_ros.testing import PolicyNodeProcess
    episode = RecordedEpisode.open(recorded["mcap"])
    params = dict(recorded["params"], **{"store.capsule_dir": str(tmp_path / "capsules")})
    with PolicyNodeProcess(f"flashrt_fresh_{os.getpid()}", params, ros_env) as node:
        context = rclpy.Context()
        rclpy.init(context=context)
        player = BagPlayer(node.node, timeout=STEP_TIMEOUT_S, context=context, log=lambda s: None)
        try:
            startup = node.wait_active(STARTUP_TIMEOUT_S)
            result = player.play(episode, "lockstep")
        finally:
            player.close()
            rclpy.try_shutdown(context=context)
    print(f"\nfresh node up in {startup:.1f} s; {result.describe()}")
    assert not result.error, result.describe() + "\n" + node.log()
    assert result.capsule_ops == 6 and not result.capsule_failures, result.describe()
    assert result.instructions == 1
    cmp = result.comparison
    assert cmp.recorded == cmp.replayed == cmp.identical == 34, result.describe()
    assert cmp.all_identical and result.ok


@pytest.mark.ros
@pytest.mark.slow
def test_regression_helper_replays_the_sqlite3_bag(recorded):
    from flashrt_ros.testing import assert_bag_replays
    # all it takes (the instruction is also among the parameters the recorder stored)
    result = assert_bag_replays(recorded["sqlite3"], instruction=INSTRUCTION)
    assert result.comparison.identical == 34


@pytest.mark.ros
@pytest.mark.slow
def test_regression_helper_fails_when_capsule_ops_are_dropped(recorded, ros_env):
    """Without the recorded restore/fork/rollback/reset the actions differ: the check has teeth."""
    from flashrt_ros.testing import replay_into_fresh_node
    result, _, _ = replay_into_fresh_node(recorded["mcap"], capsule_ops=False, env=ros_env,
                                          instruction=INSTRUCTION)
    assert result.comparison.identical < 34 and not result.ok
    first = result.comparison.mismatches[0][0]
    assert first == 14, result.describe()     # identical up to the restore, not after it


@pytest.mark.ros
@pytest.mark.slow
def test_foreign_joint_state_bag_replays_into_a_node_with_joint_names(tmp_path, ros_env):
    """A bag as `ros2 bag record` writes it: JointState in, actions out (CLI, both modes)."""
    from flashrt_ros.testing import PolicyNodeProcess
    bag = _make_foreign_bag(tmp_path / "rosbag2_2025_01_01-00_00_00")
    params = dict(NODE_PARAMS, joint_names=JOINTS, **{"store.capsule_dir": str(tmp_path / "caps")})
    name = f"flashrt_joints_{os.getpid()}"
    with PolicyNodeProcess(name, params, ros_env) as node:
        node.wait_active(STARTUP_TIMEOUT_S)
        # a recorder beside the replay gets every input the player sends (the player waits
        # for all subscribers, the recorder subscribes at start)
        recorder = subprocess.Popen(
            [sys.executable, "-m", "flashrt_ros.cli", "record", "--node", f"/{name}", "--out",
             str(tmp_path / "replayed"), "--joint-states", "--progress", "0"], env=ros_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rec_lines = []
        threading.Thread(target=lambda: rec_lines.extend(recorder.stdout), daemon=True).start()
        wait_for(lambda: any("first message on" in x for x in rec_lines), DISCOVERY_TIMEOUT_S,
                 "the recorder to hear the node")
        # the node and the recorder: a fresh player may discover the recorder's process later
        # than the node's, so it is told how many listen
        play = [sys.executable, "-m", "flashrt_ros.cli", "play", str(bag), "--node", f"/{name}",
                "--timeout", str(DISCOVERY_TIMEOUT_S), "--subscribers", "2"]
        out = subprocess.run(play + ["--mode", "lockstep"], env=ros_env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr + node.log()
        assert "40 joint_states" in out.stdout
        assert "40 action(s) received; the bag holds no recorded actions" in out.stdout
        # timing mode at half speed (25 Hz): the node's input queue is 10 deep (KEEP_LAST), so a
        # CI machine that stalls it for 10 periods would drop inputs - that is not what this tests
        t0 = time.monotonic()
        out = subprocess.run(play + ["--mode", "timing", "--rate", "0.5"], env=ros_env,
                             capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert out.returncode == 0, out.stdout + out.stderr + node.log()
        replayed = float(re.search(r"in ([\d.]+) s", out.stdout).group(1))
        # 40 messages at 50 Hz span 0.78 s; at rate 0.5 that is 1.56 s of publishing
        assert 1.56 <= replayed < took, out.stdout
        assert "40 action(s) received" in out.stdout
        recorder.send_signal(signal.SIGINT)
        assert recorder.wait(timeout=30) == 0, "".join(rec_lines)
    from flashrt_ros.bags.reader import open_bag
    counts = {t.topic: t.count for t in open_bag(tmp_path / "replayed").topics}
    assert counts.get("/joint_states") == 80, ("".join(rec_lines), counts)   # both replays


@pytest.mark.ros
@pytest.mark.ros
def test_recorder_stamps_messages_when_they_arrive_not_when_it_takes_them(tmp_path):
    """An instruction, then an observation, both delivered before the recorder spins: its executor
    takes them in subscription order (observation first), but the bag must keep their order of
    arrival, or a replay sends the instruction after that observation (seen in CI under load)."""
    import rclpy
    from rclpy.qos import QoSProfile, QoSReliabilityPolicy
    from std_msgs.msg import String

    from flashrt_ros.bags.record import BagRecorder
    from flashrt_ros.bags.play import RecordedEpisode
    from flashrt_ros.msg import Observation
    from flashrt_ros.ros.publishing import LATCHED
    target = f"/stamp_policy_{os.getpid()}"
    contexts = [rclpy.Context(), rclpy.Context()]
    for c in contexts:
        rclpy.init(context=c)
    try:
        driver = rclpy.create_node(f"stamp_driver_{os.getpid()}", context=contexts[0])
        qos = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
        obs_pub = driver.create_publisher(Observation, f"{target}/observation", qos)
        instr_pub = driver.create_publisher(String, f"{target}/instruction", LATCHED)
        lines = []
        rec = BagRecorder(target, str(tmp_path / "bag"), "mcap", context=contexts[1],
                          log=lines.append)
        topics = {f"{target}/observation", f"{target}/instruction"}
        wait_for(lambda: (rec.spin_once(0.05), topics <= set(rec._subs))[1], DISCOVERY_TIMEOUT_S,
                 "the recorder to subscribe both topics")
        wait_for(lambda: obs_pub.get_subscription_count() and instr_pub.get_subscription_count(),
                 DISCOVERY_TIMEOUT_S, "the driver to match the recorder")
        instr_pub.publish(String(data="first"))
        assert instr_pub.wait_for_all_acked(rclpy.duration.Duration(seconds=DISCOVERY_TIMEOUT_S))
        obs_pub.publish(Observation(state=[0.0] * 14))
        assert obs_pub.wait_for_all_acked(rclpy.duration.Duration(seconds=DISCOVERY_TIMEOUT_S))
        # both are in the recorder's readers now; only here does it take them
        wait_for(lambda: (rec.spin_once(0.05), rec.counts["observation"] and
                          rec.counts["instruction"])[1], STEP_TIMEOUT_S, "the recorder to take both")
        rec.close()
        ep = RecordedEpisode.open(tmp_path / "bag")
        assert [it.index for it in ep.instructions] == [0], \
            (ep.instructions[0].t_ns, ep.observations[0].t_ns, lines)
    finally:
        for c in contexts:
            rclpy.try_shutdown(context=c)


def test_player_takes_the_capsule_event_when_an_answer_is_lost(tmp_path):
    """The player re-issues a recorded snapshot; the answer never comes (as when rmw_fastrtps
    drops it), but the node's capsule event does: the replay goes on and counts the lost answer.

    A stand-in node plays the policy node's part over real DDS (status, action per observation,
    ~/snapshot that publishes its CapsuleEvent and holds its answer): a lost answer cannot be
    provoked in a real node on demand."""
    import rclpy
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from flashrt_ros.ros.executors import MultiThreadedExecutor
    from rclpy.qos import QoSProfile, QoSReliabilityPolicy

    from flashrt_ros.bags.play import BagPlayer, RecordedEpisode
    from flashrt_ros.bags.types import typestore
    from flashrt_ros.msg import ActionChunk, CapsuleEvent, Observation, PolicyStatus
    from flashrt_ros.srv import Snapshot

    target = f"/stand_in_{os.getpid()}"
    bag = _write_bag(tmp_path / "ep", [
        (f"{target}/capsule_events", "flashrt_ros/msg/CapsuleEvent",
         [_capsule_event(typestore(), operation="snapshot", name="home", message="snapshot 'home'")]),
        (f"{target}/observation", "flashrt_ros/msg/Observation", [_observation(1)])])
    episode = RecordedEpisode.open(bag)
    assert len(episode.capsule_ops) == 1 and len(episode.observations) == 1

    qos = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE)
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node(target.strip("/"), context=ctx)
    release, requests = threading.Event(), []
    events = node.create_publisher(CapsuleEvent, f"{target}/capsule_events", qos)
    actions = node.create_publisher(ActionChunk, f"{target}/action", qos)
    status = node.create_publisher(PolicyStatus, f"{target}/status", qos)
    node.create_timer(0.05, lambda: status.publish(PolicyStatus(lifecycle_state="active")))
    node.create_subscription(Observation, f"{target}/observation",
                             lambda m: actions.publish(ActionChunk(observation_stamp=m.header.stamp)),
                             qos)

    def snapshot(request, response):
        requests.append(request.name)
        events.publish(CapsuleEvent(operation="snapshot", name=request.name, success=True,
                                    message=f"snapshot {request.name!r}"))
        release.wait(60)
        response.success = True
        return response
    # its own group: the held answer must not block the observation callback
    node.create_service(Snapshot, f"{target}/snapshot", snapshot,
                        callback_group=MutuallyExclusiveCallbackGroup())
    executor = MultiThreadedExecutor(num_threads=3, context=ctx)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    pctx = rclpy.Context()
    rclpy.init(context=pctx)
    player = BagPlayer(target, timeout=DISCOVERY_TIMEOUT_S, context=pctx, log=lambda *_: None)
    try:
        player.wait_for_node(episode)
        result = player.play(episode, mode="lockstep")
    finally:
        release.set()
        player.close()
        rclpy.try_shutdown(context=pctx)
        executor.shutdown(timeout_sec=5)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
    assert requests == ["home"]
    assert result.capsule_ops == 1 and result.answers_lost == 1 and not result.capsule_failures
    assert len(result.actions) == 1 and not result.error
    assert "1 capsule answer(s) lost in DDS" in result.describe()


@pytest.mark.ros
@pytest.mark.slow
def test_the_readme_demo_recording_replays_byte_identical(tmp_path, ros_env):
    """The README's record section, as a user does it: `flashrt-ros demo` (timer mode, the
    simulated robot at its own rate), `flashrt-ros record`, `flashrt-ros reset`, Ctrl-C. The
    timer-mode bag replays in lockstep into a fresh node: every step after the reset, on the
    observation it consumed, byte-identical; the steps before the reset are not replayed."""
    from flashrt_ros.bags.play import RecordedEpisode
    from flashrt_ros.testing import assert_bag_replays
    cli = [sys.executable, "-m", "flashrt_ros.cli"]
    demo = subprocess.Popen(cli + ["demo", "--capsule-dir", str(tmp_path / "capsules")],
                            env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True).start()
    rec = None
    try:
        wait_for(lambda: any("[flashrt] live" in x for x in lines) or demo.poll() is not None,
                 STARTUP_TIMEOUT_S, "the demo to go live")
        assert demo.poll() is None, "".join(lines)
        rec = Recorder("/flashrt_policy", tmp_path / "demo_ep", "mcap", ros_env)
        wait_for(lambda: rec.saw("first message on /flashrt_policy/action"), DISCOVERY_TIMEOUT_S,
                 "the recorder to hear the demo's actions")
        out = subprocess.run(cli + ["--discovery-timeout", str(DISCOVERY_TIMEOUT_S), "reset"],
                             env=ros_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        n = rec.counts().get("action", 0)
        wait_for(lambda: rec.counts().get("action", 0) >= n + 40, DISCOVERY_TIMEOUT_S,
                 "40 steps after the reset")
        assert rec.stop() == 0, "".join(rec.lines)
    finally:
        if rec is not None:
            rec.kill()
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=30)
    episode = RecordedEpisode.open(tmp_path / "demo_ep")
    print(f"\n{episode.summary()}")
    assert episode.timer_mode and episode.start > 0
    assert [it.msg.operation for it in episode.capsule_ops] == ["reset"]
    result = assert_bag_replays(tmp_path / "demo_ep", env=ros_env)
    print(result.describe())
    assert result.comparison.identical == len(episode.replayed_actions) >= 40
    assert result.counts_match
