"""`flashrt-ros play`: replay a bag's inputs into a policy node and compare the actions.

    flashrt-ros play BAG [--node /flashrt_policy] [--mode timing|lockstep] [--rate 1.0]

Two halves:
  * `RecordedEpisode.open(path)` reads and checks a bag without ROS: it must hold observations
    (`flashrt_ros/msg/Observation` or `sensor_msgs/msg/JointState`), and every topic it finds under
    a known name must have the type that name promises. Whatever is wrong - no such path, no
    metadata.yaml, an unknown storage, a truncated file, a missing topic, a wrong type - ends in
    one `BagError` that says what was expected, what was found, and what to do.
  * `BagPlayer` publishes the episode into a running node (rclpy), in one of two modes:
      timing    - inputs at their recorded receive times, scaled by 1/rate;
      lockstep  - the next input only after the action for the previous observation arrived.
    Recorded capsule operations (from `capsule_events`) are re-issued as service calls at the same
    place in the input stream: before the observation whose action the node committed after the
    operation. That place comes from node-side stamps (an event's stamp against the actions'
    stamps, both the recording node's clock, and each action's `observation_stamp` naming its
    observation); the recorder's receive times are only a fallback.

Observations are re-stamped with the player's clock when published (the node drops observations
older than `stale_observation_s`); each action names the stamp of its observation, which pairs it
with the recorded action for that observation. Actions are compared field by field, the float32
payload byte for byte (whole CDR messages are never compared: their padding bytes are undefined).

Threads: one. The player spins its own single-threaded executor while it waits; every wait has
a timeout and says what it waited for.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flashrt_ros.bags.types import (META_NODE, META_PARAMETERS, PACKAGE, ROLES, BagError, knows, store_for,
                        typestore)
from flashrt_ros.ros.discovery import loopback_by_default
from flashrt_ros.ros.operations import BY_SERVICE, OPERATIONS, operation
from flashrt_ros.ros.stamps import ns_to_stamp, stamp_to_ns
from flashrt_ros.ros.waiting import spin_until

STORAGES = {"mcap": ".mcap", "sqlite3": ".db3"}
# capsule operations a client issues and an event reports (evict happens inside the store, list
# is a query, an instruction comes as a topic)
CAPSULE_OPS = tuple(op.name for op in OPERATIONS if not op.query)
COMPARED_FIELDS = ("step", "episode_id", "horizon", "action_dim", "capsule_lineage")


@dataclass
class Item:
    """One recorded message the player acts on."""
    kind: str            # its role: observation, joint_states, instruction, capsule_events
    topic: str
    t_ns: int            # recorder receive time
    raw: bytes           # CDR as recorded
    msg: object          # decoded (rosbags) message
    index: int = -1      # observations: position among the episode's observations


@dataclass
class RecordedEpisode:
    path: Path
    storage: str
    node: str                                    # the recorded policy node ("" if unknown)
    parameters: dict | None                      # its parameters, if the recorder stored them
    observations: list = field(default_factory=list)   # Items (observation and joint_states)
    instructions: list = field(default_factory=list)
    capsule_ops: list = field(default_factory=list)
    skipped_ops: list = field(default_factory=list)    # (event, why)
    actions: dict = field(default_factory=dict)        # observation index -> recorded ActionChunk
    unlinked_actions: int = 0
    topics: dict = field(default_factory=dict)          # topic -> (type, count)
    start_ns: int = 0                                   # first input's receive time
    recorded_actions: list = field(default_factory=list, repr=False)  # Items, receive order

    # -- reading and checking -------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "RecordedEpisode":
        path = Path(path)
        storage = _check_layout(path)
        from rosbags.rosbag2 import Reader
        try:
            reader = Reader(path)
            reader.open()
        except BagError:
            raise
        except Exception as e:  # noqa: BLE001 - rosbags raises several types for one cause
            raise _unreadable(path, storage, e) from None
        try:
            ep = cls(path, storage, "", None)
            custom = reader.storage.metadata.custom or {}
            ep.node = custom.get(META_NODE, "")
            if custom.get(META_PARAMETERS):
                ep.parameters = json.loads(custom[META_PARAMETERS])
            conns = _select_connections(path, reader)
            ep.topics = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
            ep._read(reader, conns)
        except BagError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated file fails while messages are read
            raise _unreadable(path, storage, e) from None
        finally:
            reader.close()
        ep._link()
        return ep

    def _read(self, reader, conns):
        store = store_for([c for cs in conns.values() for c in cs])
        by_role = {}
        for role, cs in conns.items():
            for c in cs:
                by_role[c.id] = role
        actions = []
        for conn, t_ns, raw in reader.messages(connections=[c for cs in conns.values() for c in cs]):
            role = by_role[conn.id]
            try:
                msg = store.deserialize_cdr(raw, conn.msgtype)
            except Exception as e:  # noqa: BLE001
                raise BagError(f"bag {self.path}: a message on {conn.topic} does not decode as "
                               f"{conn.msgtype} ({type(e).__name__}: {e}); expected messages of "
                               f"that type - the bag was written with another definition of it, "
                               f"or is corrupt") from None
            item = Item(role, conn.topic, t_ns, bytes(raw), msg)
            if role in ("observation", "joint_states"):
                self.observations.append(item)
            elif role == "instruction":
                self.instructions.append(item)
            elif role == "capsule_events":
                self.capsule_ops.append(item)
            elif role == "action":
                actions.append(item)
        for key in ("observations", "instructions", "capsule_ops"):
            getattr(self, key).sort(key=lambda it: it.t_ns)
        for i, it in enumerate(self.observations):
            it.index = i
        self.recorded_actions = sorted(actions, key=lambda it: it.t_ns)
        self.start_ns = min((it.t_ns for it in self.observations + self.instructions
                             + self.capsule_ops), default=0)
        if not self.observations:
            raise BagError(f"bag {self.path}: expected observation messages, found none (topics: "
                           f"{_topic_list(self.topics)}); record while observations are published")

    def _link(self):
        """Pair recorded actions with their observations; place each capsule operation."""
        stamp_index = {}
        for it in self.observations:
            s = stamp_to_ns(it.msg.header.stamp)
            if s:
                stamp_index.setdefault(s, it.index)
        action_at = []                                # (node stamp of the action, obs index)
        for n, it in enumerate(self.recorded_actions):
            obs = stamp_index.get(stamp_to_ns(it.msg.observation_stamp))
            if obs is None and not stamp_index and n < len(self.observations):
                obs = n                               # unstamped inputs: one action per observation
            if obs is None:
                self.unlinked_actions += 1
                continue
            self.actions[obs] = it.msg
            action_at.append((stamp_to_ns(it.msg.header.stamp), obs))
        action_at.sort()
        ops = []
        for it in self.capsule_ops:
            ev = it.msg
            if ev.operation in BY_SERVICE:    # older bags name some by their service
                ev.operation = BY_SERVICE[ev.operation].name
            if ev.operation not in CAPSULE_OPS:
                self.skipped_ops.append((ev, f"{ev.operation!r} is not a client operation"))
                continue
            if not ev.success:
                self.skipped_ops.append((ev, f"it failed when recorded: {ev.message}"))
                continue
            ev_stamp = stamp_to_ns(ev.header.stamp)
            before = [obs for t, obs in action_at if t <= ev_stamp]
            if action_at and ev_stamp:
                it.index = (max(before) + 1) if before else 0   # goes before observation `index`
            else:
                it.index = sum(1 for o in self.observations if o.t_ns <= it.t_ns)
            ops.append(it)
        self.capsule_ops = ops
        for it in self.instructions:
            it.index = sum(1 for o in self.observations if o.t_ns <= it.t_ns)

    def timeline(self) -> list:
        """Everything to replay, in order: capsule operations and instructions before the
        observation they preceded (in recorded order among themselves), then that observation."""
        keyed = [((it.index, 0, it.t_ns), it) for it in self.capsule_ops + self.instructions]
        keyed += [((it.index, 1, it.t_ns), it) for it in self.observations]
        return [it for _, it in sorted(keyed, key=lambda kv: kv[0])]

    def summary(self) -> str:
        roles = {}
        for it in self.observations:
            roles[it.kind] = roles.get(it.kind, 0) + 1
        obs = ", ".join(f"{n} {k} message(s)" for k, n in roles.items())
        text = (f"{self.path} ({self.storage}): {obs}, {len(self.instructions)} instruction(s), "
                f"{len(self.capsule_ops)} capsule operation(s), {len(self.actions)} recorded "
                f"action(s)")
        if self.actions:    # a fresh node starts at step 0: a bag cut from mid-episode won't match
            first = self.actions[min(self.actions)]
            text += f" from step {first.step} of episode {first.episode_id}"
        return text + (f", recorded from {self.node}" if self.node else "")


def _ranges(indices) -> str:
    """[0, 1, 2, 7] -> "0-2, 7"."""
    out, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            out.append(f"{start}-{k}" if k > start else f"{k}")
            start = None
    return ", ".join(out)


def _topic_list(topics: dict) -> str:
    return ", ".join(f"{t} [{ty}]" for t, (ty, _) in sorted(topics.items())) or "none"


def _check_layout(path: Path) -> str:
    """The bag's storage identifier, after checking what rosbags would otherwise trip over."""
    what = ("a rosbag2 bag directory (metadata.yaml + .mcap or .db3 files), as written by "
            "`flashrt-ros record` or `ros2 bag record`")
    if not path.exists():
        raise BagError(f"bag {path}: no such file or directory; expected {what}")
    if not path.is_dir():
        raise BagError(f"bag {path}: expected {what}, found a file; pass the directory that holds "
                       f"it and its metadata.yaml")
    meta = path / "metadata.yaml"
    if not meta.exists():
        found = sorted(p.name for p in path.iterdir())
        raise BagError(f"bag {path}: expected metadata.yaml in the bag directory, found {found}; "
                       f"a recorder that was killed instead of stopped (Ctrl-C) leaves no "
                       f"metadata.yaml - `ros2 bag reindex {path}` can rebuild it on a ROS machine")
    import yaml
    try:
        info = yaml.safe_load(meta.read_text(encoding="utf-8"))["rosbag2_bagfile_information"]
        storage = info["storage_identifier"]
        files = list(info.get("relative_file_paths") or [])
    except Exception as e:  # noqa: BLE001
        raise BagError(f"bag {path}: metadata.yaml is not rosbag2 metadata ({type(e).__name__}: "
                       f"{e}); expected a `rosbag2_bagfile_information` mapping with a "
                       f"storage_identifier") from None
    if storage not in STORAGES:
        raise BagError(f"bag {path}: storage {storage!r} is not supported; expected one of "
                       f"{sorted(STORAGES)} (what rosbags reads); convert the bag on a ROS machine "
                       f"with `ros2 bag convert` to mcap")
    missing = [f for f in files if not (path / Path(f).name).exists()]
    if missing:
        raise BagError(f"bag {path}: metadata.yaml lists {missing}, which are not in the directory; "
                       f"copy the whole bag directory")
    odd = [f for f in files if not f.endswith(STORAGES[storage])]
    if odd:
        raise BagError(f"bag {path}: metadata.yaml says storage {storage!r} but lists {odd}; "
                       f"expected {STORAGES[storage]} files")
    return storage


def _unreadable(path: Path, storage: str, e: Exception) -> BagError:
    fix = ("`mcap recover` (the mcap CLI) on the .mcap file, then `ros2 bag reindex`"
           if storage == "mcap" else "sqlite3's `.recover` on the .db3 file")
    return BagError(f"bag {path}: cannot read its storage file(s) ({type(e).__name__}: {e}); "
                    f"expected a complete {storage} file - it is truncated or corrupt (a recorder "
                    f"that was killed instead of stopped leaves an unfinished file, and a copy "
                    f"can be cut short). Re-record, or try {fix}")


def _select_connections(path: Path, reader) -> dict:
    """Connections by role; a known name with a wrong type, or no observations, is an error."""
    conns = {}
    found = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
    for c in reader.connections:
        role = _role_by_name(c.topic)
        if role is not None and c.msgtype != role.msgtype:
            raise BagError(f"bag {path}: topic {c.topic} has type {c.msgtype}; expected "
                           f"{role.msgtype} for a policy node's {role.role} topic. Record the node "
                           f"with `flashrt-ros record`, or remap the topic")
        by_type = next((r for r in ROLES.values() if r.msgtype == c.msgtype and
                        (r.role != "instruction" or role is not None)), None)
        if by_type is None:
            continue
        # Capsule events are only read (their fields build the requests), so a bag from a
        # release with an older CapsuleEvent still replays, decoded with its own definition
        # (store_for). Observations and actions are re-published or compared as CDR: same
        # definition only.
        if c.msgtype.startswith(f"{PACKAGE}/") and c.digest and by_type.role != "capsule_events":
            ours = typestore().hash_rihs01(c.msgtype)
            if c.digest != ours:
                raise BagError(f"bag {path}: {c.topic} was recorded with another definition of "
                               f"{c.msgtype} (type hash {c.digest}; this package's is {ours}); "
                               f"replay it with the {PACKAGE} version that recorded it")
        if not knows(c.msgtype) or by_type.role == "status":      # status: not replayed
            continue
        conns.setdefault(by_type.role, []).append(c)
    if "observation" not in conns and "joint_states" not in conns:
        raise BagError(f"bag {path}: expected an observation topic ({ROLES['observation'].msgtype}, "
                       f"`<node>/observation`) or a joint state topic "
                       f"({ROLES['joint_states'].msgtype}), found topics: {_topic_list(found)}. "
                       f"Record the node with `flashrt-ros record` (add --joint-states for "
                       f"JointState input)")
    if len(conns.get("observation", [])) > 1:
        names = [c.topic for c in conns["observation"]]
        raise BagError(f"bag {path}: expected one observation topic, found {names}; a bag of one "
                       f"node's episode has one")
    return conns


def _role_by_name(topic: str):
    """The role a topic's name promises (`*/observation` -> observation, ...), if any."""
    last = topic.rstrip("/").rsplit("/", 1)[-1]
    for r in ROLES.values():
        if r.under_node and last == r.suffix:
            return r
    if topic == ROLES["joint_states"].suffix:
        return ROLES["joint_states"]
    return None


# -- comparing actions ----------------------------------------------------------------------
@dataclass
class ActionComparison:
    recorded: int                  # recorded actions paired with an observation
    replayed: int                  # actions received for replayed observations
    compared: int = 0
    identical: int = 0
    mismatches: list = field(default_factory=list)   # (observation index, what differs)

    @property
    def all_identical(self) -> bool:
        return self.recorded > 0 and self.identical == self.recorded == self.compared

    def describe(self) -> str:
        if not self.recorded:
            return f"{self.replayed} action(s) received; the bag holds no recorded actions to compare"
        head = (f"{self.replayed} action(s) received for {self.recorded} recorded; byte-identical "
                f"{self.identical}/{self.recorded}")
        if self.mismatches:
            i, why = self.mismatches[0]
            head += f"; first difference at observation {i}: {why}"
        return head


def compare_actions(recorded: dict, replayed: dict) -> ActionComparison:
    """Compare recorded and replayed ActionChunks per observation index (payload as bytes)."""
    cmp = ActionComparison(len(recorded), len(replayed))
    for i, rec in sorted(recorded.items()):
        got = replayed.get(i)
        if got is None:
            cmp.mismatches.append((i, "no action was received"))
            continue
        cmp.compared += 1
        a = np.asarray(rec.data, dtype=np.float32)
        b = np.asarray(got.data, dtype=np.float32)
        diffs = [f"{f} {getattr(rec, f)!r} != {getattr(got, f)!r}" for f in COMPARED_FIELDS
                 if getattr(rec, f) != getattr(got, f)]
        if a.tobytes() != b.tobytes():
            if a.shape == b.shape:
                d = np.abs(a.astype(np.float64) - b.astype(np.float64))
                diffs.append(f"data differs in {int((a != b).sum())} of {a.size} values "
                             f"(max |diff| {float(np.nanmax(d)):.3g})")
            else:
                diffs.append(f"data has {b.size} values, recorded {a.size}")
        if diffs:
            cmp.mismatches.append((i, "; ".join(diffs)))
        else:
            cmp.identical += 1
    return cmp


# -- re-issuing capsule operations ----------------------------------------------------------
def _flag(event, name, pattern=None) -> bool:
    """A request flag the event carries, or else what its message text shows: bags recorded before
    CapsuleEvent had the flag fields (the node's messages name switch_to, keep_context, restore)."""
    value = getattr(event, name, None)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return pattern is not None and pattern in (event.message or "")


def capsule_request(event):
    """(operation, request) that repeats a recorded CapsuleEvent (flashrt_ros.ros.operations)."""
    op = event.operation
    if op not in CAPSULE_OPS:
        raise BagError(f"capsule operation {op!r}: expected one of {list(CAPSULE_OPS)}")
    o = operation(op)
    Request = o.srv_type.Request
    if op == "snapshot":
        request = Request(name=event.name, tier=event.tier, pin=_flag(event, "pin"))
    elif op == "restore":
        request = Request(name=event.name)
    elif op == "fork":
        request = Request(source=event.source, name=event.name, tier=event.tier,
                          switch_to=_flag(event, "switch_to", "switched to it"))
    elif op == "rollback":
        request = Request(k=int(event.k))
    elif op == "delete":
        request = Request(name=event.name)
    elif op == "reset":
        request = Request(keep_context=_flag(event, "keep_context", "instruction context"))
    elif op == "save":
        keep = getattr(event, "keep_in_memory", None)     # older bags: the default, True
        request = Request(name=event.name, keep_in_memory=bool(keep) if keep is not None else True)
    else:   # load
        request = Request(name=event.name, tier="" if event.tier == "disk" else event.tier,
                          restore=_flag(event, "restore", "and restored it"))
    return o, request


# -- playing into a node --------------------------------------------------------------------
@dataclass
class ReplayResult:
    mode: str
    observations: int = 0
    instructions: int = 0
    capsule_ops: int = 0
    capsule_failures: list = field(default_factory=list)   # (operation, recorded msg, replay msg)
    answers_lost: int = 0       # capsule calls whose answer DDS lost; their events stood in
    actions: dict = field(default_factory=dict)            # observation index -> ActionChunk
    comparison: ActionComparison | None = None
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        if self.error or self.capsule_failures:
            return False
        c = self.comparison
        return c.all_identical if c and c.recorded else len(self.actions) == self.observations

    def describe(self) -> str:
        lines = [f"replayed ({self.mode}) {self.observations} observation(s), "
                 f"{self.instructions} instruction(s), {self.capsule_ops} capsule operation(s) "
                 f"in {self.seconds:.2f} s"]
        if self.comparison is not None:
            lines.append("actions: " + self.comparison.describe())
        missing = [i for i in range(self.observations) if i not in self.actions]
        if missing:
            lines.append(f"no action for observation(s) {_ranges(missing)}")
        for op, rec, got in self.capsule_failures:
            lines.append(f"capsule operation {op} failed on replay: {got} (recorded: {rec})")
        if self.answers_lost:
            lines.append(f"{self.answers_lost} capsule answer(s) lost in DDS; the node's capsule "
                         f"events stood in for them")
        if self.error:
            lines.append("stopped: " + self.error)
        return "\n".join(lines)


class BagPlayer:
    """Publishes a RecordedEpisode into policy node `node` and collects its actions."""

    def __init__(self, node: str = "/flashrt_policy", joint_states_topic: str | None = None,
                 timeout: float = 10.0, context=None, log=print):
        import rclpy
        from flashrt_ros.ros.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, QoSReliabilityPolicy
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String

        from flashrt_ros.msg import ActionChunk, Observation, PolicyStatus
        from flashrt_ros.ros.client import CapsuleClient
        self.rclpy = rclpy
        self.target = "/" + node.strip("/")
        self.timeout = timeout
        self.log = log
        self.node = rclpy.create_node(f"flashrt_bag_player_{os.getpid()}", context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        qos = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE)
        self.joint_states_topic = joint_states_topic or ROLES["joint_states"].suffix
        self.pub = {
            "observation": self.node.create_publisher(Observation, f"{self.target}/observation", qos),
            "instruction": self.node.create_publisher(String, f"{self.target}/instruction", qos),
            "joint_states": self.node.create_publisher(JointState, self.joint_states_topic, qos),
        }
        self.msg_class = {"observation": Observation, "joint_states": JointState}
        self._actions = {}                        # observation stamp (ns) -> ActionChunk
        self.status = None
        self.action_sub = self.node.create_subscription(ActionChunk, f"{self.target}/action",
                                                        self._on_action, qos)
        self.node.create_subscription(PolicyStatus, f"{self.target}/status", self._on_status, qos)
        # capsule calls; the node's capsule events stand in for answers lost in DDS
        self.capsules = CapsuleClient(self.node, self.target,
                                      spin=lambda t: self.executor.spin_once(timeout_sec=t))
        self._last_stamp = 0

    def _on_action(self, msg):
        self._actions[stamp_to_ns(msg.observation_stamp)] = msg

    def _on_status(self, msg):
        self.status = msg

    def close(self):
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()

    # -- waiting ---------------------------------------------------------------------------
    def _spin_until(self, predicate, timeout, what):
        return spin_until(self.executor, predicate, timeout, what)

    def wait_for_node(self, episode: RecordedEpisode, timeout: float | None = None):
        """Wait until the node is active and hears every topic the episode will publish."""
        timeout = self.timeout if timeout is None else timeout
        kinds = {it.kind for it in episode.observations}
        if episode.instructions:
            kinds.add("instruction")
        try:
            self._spin_until(lambda: self.status is not None, timeout,
                             f"a status message from {self.target} (is the node running, with "
                             f"the same ROS_DOMAIN_ID?)")
            self._spin_until(lambda: self.status.lifecycle_state == "active", timeout,
                             f"{self.target} to be active (it is {self.status.lifecycle_state}; "
                             f"`flashrt-ros lifecycle activate`)")
            self._spin_until(lambda: self.action_sub.get_publisher_count() > 0, timeout,
                             f"the action publisher of {self.target}")
            for kind in sorted(kinds):
                pub = self.pub[kind]
                hint = " (start the node with joint_names:=[...])" if kind == "joint_states" else ""
                self._spin_until(lambda: pub.get_subscription_count() > 0, timeout,
                                 f"a subscriber of {pub.topic_name}{hint}")
            ops = {operation(it.msg.operation) for it in episode.capsule_ops}
            if ops:
                self._spin_until(self.capsules.events_heard, timeout,
                                 f"the capsule event publisher of {self.target}")
            for op in sorted(ops, key=lambda o: o.service):
                self._spin_until(lambda: self.capsules.service_ready(op), timeout,
                                 f"service {self.capsules.service_name(op)}")
        except TimeoutError as e:
            raise BagError(f"play: {e}") from None

    # -- publishing ------------------------------------------------------------------------
    def _stamp(self):
        """A fresh, strictly increasing stamp (pairs each action with its observation)."""
        now = max(self.node.get_clock().now().nanoseconds, self._last_stamp + 1)
        self._last_stamp = now
        return now

    def _publish_observation(self, it: Item) -> int:
        from rclpy.serialization import deserialize_message
        msg = deserialize_message(it.raw, self.msg_class[it.kind])
        stamp = self._stamp()
        msg.header.stamp = ns_to_stamp(stamp)
        self.pub[it.kind].publish(msg)
        return stamp

    def _instruction(self, it: Item, lockstep: bool):
        if not lockstep:
            self.pub["instruction"].publish(it.raw)
            return
        # The node starts a new episode when it takes an instruction, and steps no observation
        # until the prefill is done; ~/status is the only sign of it. So: a status from now (the
        # episode before), publish, then a status showing another episode.
        def fresh_status(since):
            s = self.status
            return s if s is not None and stamp_to_ns(s.header.stamp) >= since else None
        try:
            now = self.node.get_clock().now().nanoseconds
            before = self._spin_until(lambda: fresh_status(now), self.timeout,
                                      f"a status message from {self.target}").episode_id
            self.pub["instruction"].publish(it.raw)
            t_pub = self.node.get_clock().now().nanoseconds
            self._spin_until(lambda: (s := fresh_status(t_pub)) and s.episode_id != before,
                             self.timeout, f"{self.target} to take the instruction "
                                           f"{it.msg.data!r} (a new episode on ~/status)")
        except TimeoutError as e:
            self.log(f"[play] warning: {e}; continuing")

    def _capsule_op(self, it: Item, result: ReplayResult):
        """Re-issue one recorded capsule operation. When its answer is lost in DDS (docs/node.md,
        known issues), the node's event for it says what the node did (CapsuleClient); once that
        event is in, the answer gets ANSWER_GRACE_S more, not the whole timeout."""
        from flashrt_ros.msg import CapsuleEvent
        from flashrt_ros.ros.client import ANSWER_GRACE_S
        ev = it.msg
        op, request = capsule_request(ev)
        res = self.capsules.call(op, request, self.timeout, grace=ANSWER_GRACE_S)
        if isinstance(res, CapsuleEvent):
            result.answers_lost += 1
            self.log(f"[play] {self.capsules.service_name(op)}: answer lost; the node reported "
                     f"{'success' if res.success else 'failure'}: {res.message}")
        result.capsule_ops += 1
        if not res.success:
            result.capsule_failures.append((ev.operation, ev.message, res.message))

    def play(self, episode: RecordedEpisode, mode: str = "lockstep", rate: float = 1.0,
             ops: bool = True) -> ReplayResult:
        """Replay `episode`; returns what came back and how it compares with the recording."""
        if mode not in ("timing", "lockstep"):
            raise BagError(f"play: mode: expected timing or lockstep, found {mode!r}")
        if not rate > 0:
            raise BagError(f"play: rate: expected a number > 0, found {rate!r}")
        self.wait_for_node(episode)
        result = ReplayResult(mode)
        stamps = {}                               # observation index -> stamp published
        t0 = time.monotonic()
        lockstep = mode == "lockstep"
        try:
            for it in episode.timeline():
                if not lockstep:
                    due = t0 + (it.t_ns - episode.start_ns) / 1e9 / rate
                    while time.monotonic() < due:
                        self.executor.spin_once(timeout_sec=min(0.005, due - time.monotonic()))
                if it.kind == "capsule_events":
                    if ops:
                        self._capsule_op(it, result)
                elif it.kind == "instruction":
                    self._instruction(it, lockstep)
                    result.instructions += 1
                else:
                    stamp = self._publish_observation(it)
                    stamps[it.index] = stamp
                    result.observations += 1
                    if lockstep:
                        self._spin_until(lambda: stamp in self._actions, self.timeout,
                                         f"the action for observation {it.index} (did the node "
                                         f"reject it? see its log or /diagnostics last_error)")
            pending = lambda: all(s in self._actions for s in stamps.values())  # noqa: E731
            self._spin_until(pending, self.timeout, "the actions for the last observations")
        except TimeoutError as e:
            result.error = str(e)
        result.seconds = time.monotonic() - t0
        result.actions = {i: self._actions[s] for i, s in stamps.items() if s in self._actions}
        result.comparison = compare_actions(episode.actions, result.actions)
        return result


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("bag", help="bag directory (metadata.yaml + .mcap/.db3)")
    p.add_argument("--node", default="/flashrt_policy", help="the policy node (default %(default)s)")
    p.add_argument("--mode", default="lockstep", choices=("timing", "lockstep"),
                   help="timing: recorded times / rate; lockstep: next input after the action "
                        "(default %(default)s)")
    p.add_argument("--rate", type=float, default=1.0, help="time scale in timing mode")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the node, an action or a service answer")
    p.add_argument("--joint-states-topic", default=None,
                   help=f"where to publish JointState (default {ROLES['joint_states'].suffix})")
    p.add_argument("--no-capsule-ops", action="store_true",
                   help="do not re-issue the recorded capsule operations")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="flashrt-ros play",
                                description="Replay a bag into a policy node and compare actions.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        episode = RecordedEpisode.open(args.bag)
    except BagError as e:
        print(f"flashrt-ros play: {e}", file=sys.stderr)
        return 2
    print(f"[play] {episode.summary()}", flush=True)
    for ev, why in episode.skipped_ops:
        print(f"[play] not re-issuing {ev.operation} {ev.name!r}: {why}", flush=True)
    loopback_by_default()
    import rclpy
    rclpy.init()
    player = None
    try:
        player = BagPlayer(args.node, args.joint_states_topic, args.timeout,
                           log=lambda s: print(s, flush=True))
        result = player.play(episode, args.mode, args.rate, ops=not args.no_capsule_ops)
    except BagError as e:
        print(f"flashrt-ros play: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if player is not None:
            player.close()
        rclpy.try_shutdown()
    print(result.describe(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
