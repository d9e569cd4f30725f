"""`flashrt-ros play`: replay a bag's inputs into a policy node and compare the actions.

    flashrt-ros play BAG [--node /flashrt_policy] [--mode timing|lockstep] [--rate 1.0]

Two halves:
  * `RecordedEpisode.open(path)` reads and checks a bag without ROS (any layout
    flashrt_ros.bags.reader opens): it must hold observations (`flashrt_ros/msg/Observation` or
    `sensor_msgs/msg/JointState`), and every topic it finds under a known name must have the
    type that name promises. Whatever is wrong ends in one `BagError` that says what was
    expected, what was found (topics, types, counts), and what to do.
  * `BagPlayer` publishes the episode into a running node (rclpy), in one of two modes:
      timing    - inputs at their recorded receive times, scaled by 1/rate;
      lockstep  - the next input only after the action for the previous step arrived.

The replay is a sequence of steps, each the observation one recorded step consumed - each
action names it by `observation_stamp`:
  * observation mode (the recorded node stepped once per observation): a step per observation;
  * timer mode (the node stepped the latest observation on each tick, so some observations
    were stepped twice and some never): a step per recorded action, on the observation it
    consumed. Into an observation-mode node in lockstep this repeats the recorded steps exactly.
A fresh node starts at step 1 of its first episode; a bag recorded from the middle of an episode
replays from its first instruction or reset (the steps before it are not replayed), and one
without either is refused with what to record instead.
Recorded capsule operations (from `capsule_events`) are re-issued as service calls before the
step whose action the node committed after the operation (the event's stamp against the
actions' stamps, both the recording node's clock); an instruction goes before the first step of
the episode it started.

Observations are re-stamped with the player's clock when published (the node drops observations
older than `stale_observation_s`); each action names the stamp of its observation, which pairs it
with the recorded action of that step. Actions are compared field by field, the float32
payload byte for byte (whole CDR messages are never compared: their padding bytes are undefined).
The counts are part of the verdict: a step without an action, an action no step explains, or a
step the bag holds no action for fails the replay (`--tolerate-count-mismatch` reports them).

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

from flashrt_ros.bags.reader import open_bag
from flashrt_ros.bags.types import (META_NODE, META_PARAMETERS, PACKAGE, ROLES, BagError, knows,
                                    store_for, type_hash, typestore)
from flashrt_ros.ros.discovery import loopback_by_default
from flashrt_ros.ros.operations import BY_SERVICE, OPERATIONS, operation
from flashrt_ros.ros.publishing import LATCHED, wait_for_subscribers
from flashrt_ros.ros.stamps import ns_to_stamp, stamp_to_ns
from flashrt_ros.ros.waiting import spin_until

# capsule operations a client issues and an event reports (evict happens inside the store, list
# is a query, an instruction comes as a topic)
CAPSULE_OPS = tuple(op.name for op in OPERATIONS if not op.query)
SETTLE_S = 0.3     # after the last action: how long a late extra action is still counted
COMPARED_FIELDS = ("step", "episode_id", "horizon", "action_dim", "capsule_lineage")


@dataclass
class Item:
    """One recorded message the player acts on."""
    kind: str            # its role: observation, joint_states, instruction, capsule_events
    topic: str
    t_ns: int            # recorder receive time
    raw: bytes           # CDR as recorded
    msg: object          # decoded (rosbags) message
    index: int = -1      # observations: position among the episode's observations; the others
                         # (and an observation's use in the timeline): the step they go before
    repeat: bool = False  # timeline: this observation was consumed by an earlier step already


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
    actions: dict = field(default_factory=dict)        # step position -> recorded ActionChunk
    steps: list = field(default_factory=list)          # step position -> observation index
    start: int = 0                                      # first step position replayed
    timer_mode: bool = False                            # steps consumed observations on a timer
    unlinked_actions: int = 0
    topics: dict = field(default_factory=dict)          # topic -> (type, count)
    start_ns: int = 0                                   # first input's receive time
    recorded_actions: list = field(default_factory=list, repr=False)  # Items, step order

    # -- reading and checking -------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "RecordedEpisode":
        bag = open_bag(path)
        ep = cls(bag.path, bag.storage, bag.custom.get(META_NODE, ""), None)
        if bag.custom.get(META_PARAMETERS):
            try:
                ep.parameters = json.loads(bag.custom[META_PARAMETERS])
            except ValueError:
                ep.parameters = None
        ep.topics = {t.name: (t.type, t.count) for t in bag.summary().topics}
        conns = _select_connections(bag)
        ep._read(bag, conns)
        ep._link()
        return ep

    def _read(self, bag, conns):
        chosen = [c for cs in conns.values() for c in cs]
        store = store_for(chosen)
        by_role = {c.id: role for role, cs in conns.items() for c in cs}
        actions = []
        for m in bag.messages(chosen):
            role = by_role[m.topic.id]
            try:
                msg = store.deserialize_cdr(m.data, m.topic.msgtype)
            except Exception as e:  # noqa: BLE001
                raise BagError(f"bag {self.path}: a message on {m.topic.topic} does not decode as "
                               f"{m.topic.msgtype} ({type(e).__name__}: {e}); expected messages of "
                               f"that type - the bag was written with another definition of it, "
                               f"or is corrupt") from None
            item = Item(role, m.topic.topic, m.log_time, m.data, msg)
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
        # step order: the node's own commit stamps (a step's action is stamped when it committed)
        self.recorded_actions = sorted(actions, key=lambda it: (stamp_to_ns(it.msg.header.stamp),
                                                                it.t_ns))
        self.start_ns = min((it.t_ns for it in self.observations + self.instructions
                             + self.capsule_ops), default=0)
        if not self.observations:
            inputs = [c.topic for k in ("observation", "joint_states") for c in conns.get(k, [])]
            raise BagError(f"bag {self.path}: expected observation messages on "
                           f"{', '.join(inputs)}, found none (the bag holds {bag.found()}); "
                           f"record while observations are published")

    def _link(self):
        """The steps to replay: which observation each recorded step consumed, where the capsule
        operations and instructions go among them, and the first step a fresh node can repeat."""
        stamp_index, sharing = {}, {}                 # stamp -> index; stamp -> how many share it
        for it in self.observations:
            s = stamp_to_ns(it.msg.header.stamp)
            sharing[s] = sharing.get(s, 0) + 1
            stamp_index.setdefault(s, it.index)
        stamp_index.pop(0, None)
        consumed = []                                 # (action Item, observation index or None)
        for n, it in enumerate(self.recorded_actions):
            s = stamp_to_ns(it.msg.observation_stamp)
            obs = stamp_index.get(s)
            if obs is None and not stamp_index and n < len(self.observations):
                obs = n                               # unstamped inputs: one action per observation
            if s and sharing.get(s, 0) > 1:
                raise BagError(
                    f"bag {self.path}: the action of step {it.msg.step} names observation stamp "
                    f"{s}, which {sharing[s]} observations share; expected distinct observation "
                    f"stamps, which pair each "
                    f"step with the observation it consumed. Stamp every observation (header.stamp) "
                    f"when it is published, and record again")
            consumed.append((it, obs))
        uses = [o for _, o in consumed if o is not None]
        declared = (self.parameters or {}).get("control_mode")
        self.timer_mode = declared == "timer" or (declared is None and len(uses) != len(set(uses)))
        if self.timer_mode:
            # a step per recorded action, each on the observation it consumed (the latest one
            # at its tick: some twice, some never)
            self.steps = [o for _, o in consumed]
            recorded = {p: it for p, (it, _) in enumerate(consumed)}
        else:
            # a step per observation; its action, if the recorder has it
            self.steps = [it.index for it in self.observations]
            recorded = {o: it for it, o in consumed if o is not None}
        self.unlinked_actions = sum(1 for _, o in consumed if o is None) if not self.timer_mode \
            else 0
        self.actions = {p: it.msg for p, it in recorded.items()}
        action_at = sorted((stamp_to_ns(it.msg.header.stamp), p) for p, it in recorded.items())
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
            before = [p for t, p in action_at if t <= ev_stamp]
            if action_at and ev_stamp:
                it.index = (max(before) + 1) if before else 0   # goes before step `index`
            else:
                it.index = self._position_after(it.t_ns)
            ops.append(it)
        self.capsule_ops = ops
        for it in self.instructions:
            it.index = self._instruction_position(it.t_ns, recorded)
        self._find_start(recorded)

    def _position_after(self, t_ns: int) -> int:
        """The first step whose observation the recorder received after `t_ns`."""
        return next((p for p, o in enumerate(self.steps)
                     if o is not None and self.observations[o].t_ns > t_ns), len(self.steps))

    def _instruction_position(self, t_ns: int, recorded: dict) -> int:
        """The step an instruction received at `t_ns` goes before: the first step after it that
        starts a new episode (the node prefills, then steps in the new episode), else the first
        step after it."""
        p = (next((p for p in sorted(recorded) if recorded[p].t_ns > t_ns), len(self.steps))
             if recorded else self._position_after(t_ns))
        first = p
        while p in recorded and p - 1 in recorded and \
                recorded[p].msg.episode_id == recorded[p - 1].msg.episode_id:
            p += 1
        return p if p in recorded else first

    def _find_start(self, recorded: dict):
        """A fresh node is at step 0 of its first episode (configure prefilled the instruction).
        A bag that does not start there replays from its first instruction or reset, which puts
        the node into a state the replay knows; steps before it are not replayed."""
        first = recorded[min(recorded)].msg if recorded else None
        if first is None or (int(first.step), int(first.episode_id)) == (1, 1):
            self.start = 0
        else:
            known = [it.index for it in self.instructions] + [
                it.index for it in self.capsule_ops if it.msg.operation == "reset"]
            if not known:
                raise BagError(
                    f"bag {self.path}: the recording starts at step {first.step} of episode "
                    f"{first.episode_id}, in the middle of an episode, and holds no instruction "
                    f"or reset after which a fresh node's state is known: it cannot replay "
                    f"faithfully. Record from the node's start (start the recorder before the "
                    f"node is activated), or run `flashrt-ros reset` (or `flashrt-ros instruct "
                    f"...`) once the recorder is ready: the steps after it replay")
            self.start = min(known)
        for it in [o for o in self.capsule_ops if o.index < self.start]:
            self.skipped_ops.append((it.msg, f"it came before step {self.start}, where the "
                                             f"replay starts"))
        self.capsule_ops = [it for it in self.capsule_ops if it.index >= self.start]
        self.instructions = [it for it in self.instructions if it.index >= self.start]
        missing = [p for p in range(self.start, len(self.steps)) if self.steps[p] is None]
        if missing:
            a = self.actions[missing[0]]
            raise BagError(
                f"bag {self.path}: the action of step {a.step} (episode {a.episode_id}) consumed "
                f"the observation stamped {stamp_to_ns(a.observation_stamp)}, which the bag does "
                f"not hold ({len(missing)} such step(s)): the recorder missed it. Expected every "
                f"consumed observation in the bag; start the recorder before the episode and "
                f"record observations with reliable QoS")

    def timeline(self) -> list:
        """Everything to replay, in order: capsule operations and instructions before the step
        they preceded (in recorded order among themselves), then that step's observation."""
        keyed = [((it.index, 0, it.t_ns), it) for it in self.capsule_ops + self.instructions]
        seen = set()
        for p in range(self.start, len(self.steps)):
            o = self.observations[self.steps[p]]
            use = Item(o.kind, o.topic, o.t_ns, o.raw, o.msg, p, repeat=o.index in seen)
            if self.timer_mode and p in self.actions:
                use.t_ns = max(o.t_ns, self._recorded_t(p - 1))
            seen.add(o.index)
            keyed.append(((p, 1, 0), use))
        return [it for _, it in sorted(keyed, key=lambda kv: kv[0])]

    def _recorded_t(self, p: int) -> int:
        """When the recorder received step p's action (0 for none): a timer-mode step came after
        the previous one, so timing mode sends its observation no earlier."""
        for it in self.recorded_actions:
            if it.msg is self.actions.get(p):
                return it.t_ns
        return 0

    @property
    def replayed_actions(self) -> dict:
        """The recorded actions the replay is compared with: those of the replayed steps."""
        return {p: a for p, a in self.actions.items() if p >= self.start}

    def summary(self) -> str:
        roles = {}
        for it in self.observations:
            roles[it.kind] = roles.get(it.kind, 0) + 1
        obs = ", ".join(f"{n} {k} message(s)" for k, n in roles.items())
        text = (f"{self.path} ({self.storage}): {obs}, {len(self.instructions)} instruction(s), "
                f"{len(self.capsule_ops)} capsule operation(s), {len(self.actions)} recorded "
                f"action(s)")
        if self.actions:
            first = self.actions[min(self.actions)]
            text += f" from step {first.step} of episode {first.episode_id}"
        if self.timer_mode:
            unused = len(self.observations) - len({o for o in self.steps if o is not None})
            text += (f"; timer mode: {len(self.steps)} steps on the observations they consumed "
                     f"({unused} observation(s) no step took are not replayed)")
        if self.start:
            text += f"; replayed from step {self.start} (the first instruction or reset)"
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


def _select_connections(bag) -> dict:
    """Topics by role; a known name with a wrong type, or no observations, is an error."""
    conns = {}
    for c in bag.topics:
        role = _role_by_name(c.topic)
        if role is not None and c.msgtype != role.msgtype:
            raise BagError(f"bag {bag.path}: topic {c.topic} has type {c.msgtype}; expected "
                           f"{role.msgtype} for a policy node's {role.role} topic. Record the node "
                           f"with `flashrt-ros record`, or remap the topic")
        by_type = next((r for r in ROLES.values() if r.msgtype == c.msgtype and
                        (r.role != "instruction" or role is not None)), None)
        if by_type is None:
            continue
        # Capsule events are only read (their fields build the requests), so a bag from a
        # release with an older CapsuleEvent still replays, decoded with its own definition
        # (store_for). Observations and actions are re-published or compared as CDR: same
        # definition only - told by the bag's type hash, or by its definition when it states
        # no hash (mcap_ros2's writer, a salvaged file).
        if c.msgtype.startswith(f"{PACKAGE}/") and by_type.role != "capsule_events":
            ours = typestore().hash_rihs01(c.msgtype)
            try:
                theirs = c.type_hash or (type_hash(c.msgtype, c.msgdef) if c.msgdef else "")
            except Exception as e:  # noqa: BLE001 - rosbags' parser raises several types
                raise BagError(f"bag {bag.path}: the definition of {c.msgtype} stored for "
                               f"{c.topic} does not parse as ros2msg text ({type(e).__name__}: "
                               f"{e}); expected the .msg text rosbag2 stores") from None
            if theirs and theirs != ours:
                raise BagError(f"bag {bag.path}: {c.topic} was recorded with another definition "
                               f"of {c.msgtype} (type hash {theirs}; this package's is {ours}); "
                               f"replay it with the {PACKAGE} version that recorded it")
        if not knows(c.msgtype) or by_type.role == "status":      # status: not replayed
            continue
        conns.setdefault(by_type.role, []).append(c)
    if "observation" not in conns and "joint_states" not in conns:
        raise BagError(f"bag {bag.path}: expected an observation topic "
                       f"({ROLES['observation'].msgtype}, `<node>/observation`) or a joint state "
                       f"topic ({ROLES['joint_states'].msgtype}), found {bag.found()}. Record the "
                       f"node with `flashrt-ros record` (add --joint-states for JointState input)")
    if len(conns.get("observation", [])) > 1:
        names = sorted({c.topic for c in conns["observation"]})
        if len(names) > 1:
            raise BagError(f"bag {bag.path}: expected one observation topic, found {names}; a bag "
                           f"of one node's episode has one")
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
        # older bags recorded deletes that took the saved file along
        request = Request(name=event.name, delete_file=bool(getattr(event, "delete_file", True)))
    elif op == "reset":
        request = Request(keep_context=_flag(event, "keep_context", "instruction context"))
    elif op == "save":
        evict = getattr(event, "evict_from_memory", None)
        if evict is None:       # older bags: keep_in_memory (its default True), or no flag at all
            evict = not getattr(event, "keep_in_memory", True)
        request = Request(name=event.name, evict_from_memory=bool(evict))
    else:   # load
        request = Request(name=event.name, tier="" if event.tier == "disk" else event.tier,
                          restore=_flag(event, "restore", "and restored it"))
    return o, request


# -- playing into a node --------------------------------------------------------------------
@dataclass
class ReplayResult:
    mode: str
    observations: int = 0       # observations published (one per replayed step)
    instructions: int = 0
    capsule_ops: int = 0
    capsule_failures: list = field(default_factory=list)   # (operation, recorded msg, replay msg)
    answers_lost: int = 0       # capsule calls whose answer DDS lost; their events stood in
    actions: dict = field(default_factory=dict)            # step position -> ActionChunk
    steps: list = field(default_factory=list)              # step positions replayed, in order
    extra: list = field(default_factory=list)              # actions no replayed step explains
    unrecorded: list = field(default_factory=list)         # replayed steps the bag has no action for
    recorded_steps: dict = field(default_factory=dict)     # position -> recorded ActionChunk
    tolerate_counts: bool = False
    comparison: ActionComparison | None = None
    error: str = ""
    seconds: float = 0.0

    @property
    def missing(self) -> list:
        """Replayed steps no action came back for."""
        return [p for p in self.steps if p not in self.actions]

    @property
    def counts_match(self) -> bool:
        return not (self.missing or self.extra or (self.unrecorded and self.recorded_steps))

    @property
    def ok(self) -> bool:
        if self.error or self.capsule_failures:
            return False
        if not self.counts_match and not self.tolerate_counts:
            return False
        c = self.comparison
        return c.all_identical if c and c.recorded else not self.missing

    def describe(self) -> str:
        lines = [f"replayed ({self.mode}) {self.observations} observation(s), "
                 f"{self.instructions} instruction(s), {self.capsule_ops} capsule operation(s) "
                 f"in {self.seconds:.2f} s"]
        lines.append(f"steps: {len(self.steps)} replayed, {len(self.actions)} answered, "
                     f"{len(self.extra)} extra action(s), {len(self.recorded_steps)} recorded")
        if self.comparison is not None:
            lines.append("actions: " + self.comparison.describe())
        verdict = "reported only (--tolerate-count-mismatch)" if self.tolerate_counts else "FAILED"
        missing = self.missing
        if missing:
            p = missing[0]
            rec = self.recorded_steps.get(p)
            what = f" (recorded step {rec.step} of episode {rec.episode_id})" if rec else ""
            lines.append(f"counts {verdict}: no action came back for {len(missing)} step(s) "
                         f"{_ranges(missing)}; the first missing step is {p}{what}")
        if self.unrecorded and self.recorded_steps:
            lines.append(f"counts {verdict}: the bag holds no action for step(s) "
                         f"{_ranges(self.unrecorded)}, which the replay stepped (the recorder "
                         f"lost it, or the recorded node refused that observation); the first "
                         f"is step {self.unrecorded[0]}")
        if self.extra:
            lines.append(f"counts {verdict}: {len(self.extra)} extra action(s); the first: "
                         f"{self.extra[0]}")
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
                 timeout: float = 10.0, context=None, log=print, subscribers: int = 1):
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
        self.subscribers = subscribers     # each input topic waits for at least this many
        self.log = log
        self.node = rclpy.create_node(f"flashrt_bag_player_{os.getpid()}", context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        qos = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE)
        self.joint_states_topic = joint_states_topic or ROLES["joint_states"].suffix
        self.pub = {
            "observation": self.node.create_publisher(Observation, f"{self.target}/observation", qos),
            "instruction": self.node.create_publisher(String, f"{self.target}/instruction",
                                                      LATCHED),
            "joint_states": self.node.create_publisher(JointState, self.joint_states_topic, qos),
        }
        self.msg_class = {"observation": Observation, "joint_states": JointState}
        self._actions = {}                        # observation stamp (ns) -> [ActionChunk, ...]
        self.status = None
        self.action_sub = self.node.create_subscription(ActionChunk, f"{self.target}/action",
                                                        self._on_action, qos)
        self.node.create_subscription(PolicyStatus, f"{self.target}/status", self._on_status, qos)
        # capsule calls; the node's capsule events stand in for answers lost in DDS
        self.capsules = CapsuleClient(self.node, self.target,
                                      spin=lambda t: self.executor.spin_once(timeout_sec=t))
        self._last_stamp = 0

    def _on_action(self, msg):
        self._actions.setdefault(stamp_to_ns(msg.observation_stamp), []).append(msg)

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
                # the node and every other subscriber, a recorder's included: none misses the
                # first input
                wait_for_subscribers(
                    self.node, self.pub[kind], timeout,
                    idle=lambda t: self.executor.spin_once(timeout_sec=t),
                    at_least=self.subscribers,
                    hint="the node subscribes to joint_states only when started with "
                         "joint_names:=[...]" if kind == "joint_states" else "")
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
        if it.repeat and hasattr(msg, "reset_episode"):
            msg.reset_episode = False        # the node applied it on the step that took it first
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
             ops: bool = True, tolerate_counts: bool = False) -> ReplayResult:
        """Replay `episode`; returns what came back and how it compares with the recording.
        A step without an action, an action no step explains, or a replayed step the bag has
        no action for fail the replay unless `tolerate_counts` (then they are reported)."""
        if mode not in ("timing", "lockstep"):
            raise BagError(f"play: mode: expected timing or lockstep, found {mode!r}")
        if not rate > 0:
            raise BagError(f"play: rate: expected a number > 0, found {rate!r}")
        self.wait_for_node(episode)
        result = ReplayResult(mode, tolerate_counts=tolerate_counts,
                              recorded_steps=episode.replayed_actions)
        stamps = {}                               # step position -> stamp published
        t0 = time.monotonic()
        timeline = episode.timeline()
        t_first = min((it.t_ns for it in timeline), default=0)
        lockstep = mode == "lockstep"
        self._actions.clear()
        try:
            for it in timeline:
                if not lockstep:
                    due = t0 + (it.t_ns - t_first) / 1e9 / rate
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
                    result.steps.append(it.index)
                    result.observations += 1
                    if lockstep:
                        self._spin_until(lambda: stamp in self._actions, self.timeout,
                                         f"the action for step {it.index} (did the node reject "
                                         f"its observation? see its log or /diagnostics "
                                         f"last_error)")
            pending = lambda: all(s in self._actions for s in stamps.values())  # noqa: E731
            self._spin_until(pending, self.timeout, "the actions for the last steps")
        except TimeoutError as e:
            result.error = str(e)
        # an action that comes a little late (a timer-mode node stepping again) counts as well
        end = time.monotonic() + SETTLE_S
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=max(0.0, end - time.monotonic()))
        result.seconds = time.monotonic() - t0
        result.actions = {p: self._actions[s][0] for p, s in stamps.items() if s in self._actions}
        by_stamp = {s: p for p, s in stamps.items()}
        for s, got in sorted(self._actions.items()):
            p = by_stamp.get(s)
            for a in (got[1:] if p is not None else got):
                result.extra.append(f"step {a.step} of episode {a.episode_id} for "
                                    + (f"step {p}, which had its action already" if p is not None
                                       else f"an observation stamped {s}, which the replay did "
                                            f"not publish"))
        result.unrecorded = [p for p in result.steps if p not in episode.actions]
        result.comparison = compare_actions(episode.replayed_actions, result.actions)
        return result


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, found {text!r}")
    return n


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
    p.add_argument("--tolerate-count-mismatch", action="store_true",
                   help="report a missing or extra action instead of failing on it")
    p.add_argument("--subscribers", type=_at_least_one, default=1, metavar="N",
                   help="wait until each input topic has at least N matched subscriptions (the "
                        "node, and a recorder beside it: 2) before publishing; without it, until "
                        "every subscription discovered so far is matched (default %(default)s)")


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
                           log=lambda s: print(s, flush=True), subscribers=args.subscribers)
        result = player.play(episode, args.mode, args.rate, ops=not args.no_capsule_ops,
                             tolerate_counts=args.tolerate_count_mismatch)
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
