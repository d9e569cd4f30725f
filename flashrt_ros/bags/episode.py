"""`RecordedEpisode`: a bag read and checked without ROS, and the steps a replay repeats.

`RecordedEpisode.open(path)` reads any layout flashrt_ros.bags.reader opens. It must hold
observations (`flashrt_ros/msg/Observation` or `sensor_msgs/msg/JointState`), and every topic it
finds under a known name must have the type that name promises (topics.py). Whatever is wrong
ends in one `BagError` that says what was expected, what was found (topics, types, counts), and
what to do.

The replay is a sequence of steps, each the observation one recorded step consumed - each
action names it by `observation_stamp`:
  * observation mode (the recorded node stepped once per observation): a step per observation;
  * timer mode (the node stepped the latest observation on each tick, so some observations
    were stepped twice and some never): a step per recorded action, on the observation it
    consumed. Into an observation-mode node in lockstep this repeats the recorded steps exactly.
  * a camera policy (the bag holds frames on camera topics): the node steps on a state joined
    with a frame of each camera by stamp (inputs/sync.py). The same join, run here over the
    inputs in the order the recorder received them, gives each step's frames; a state that
    joined none is not a step. The player sends a step's frames with its state.
A fresh node starts at step 1 of its first episode; a bag recorded from the middle of an episode
replays from its first instruction or reset (the steps before it are not replayed), and one
without either is refused with what to record instead.
Recorded capsule operations (from `capsule_events`) go before the step whose action the node
committed after the operation (the event's stamp against the actions' stamps, both the recording
node's clock); an instruction goes before the first step of the episode it started.
`timeline()` gives it all in order.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path

from flashrt_ros.bags.capsule_ops import CAPSULE_OPS
from flashrt_ros.bags.reader import open_bag
from flashrt_ros.bags.topics import select_connections
from flashrt_ros.bags.types import CAMERA_ROLES, META_NODE, META_PARAMETERS, BagError, store_for
from flashrt_ros.ros.operations import BY_SERVICE
from flashrt_ros.ros.stamps import s_to_ns, stamp_to_ns

STATE_STREAM = "state"      # the join's name for the state (observation or joint states)
FRESH_NODE_STEPS = ((1, 1), (1, 0))     # (step, episode) of a fresh node's first action


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
    camera: str = ""     # frames: the camera they are of
    frames: tuple = ()   # timeline, a camera policy's step: the frames joined with the state


@dataclass
class RecordedEpisode:
    path: Path
    storage: str
    node: str                                    # the recorded policy node ("" if unknown)
    parameters: dict | None                      # its parameters, if the recorder stored them
    observations: list = field(default_factory=list)   # Items (observation and joint_states)
    frames: list = field(default_factory=list)         # Items (image, compressed_image)
    joined: dict = field(default_factory=dict)         # observation index -> {camera: frame}
    unused_images: list = field(default_factory=list)  # image topics no camera is named for
    ambiguous: set = field(default_factory=set)        # observation indices: see _join_frames
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
    def open(cls, path, cameras: dict | None = None) -> "RecordedEpisode":
        """Read and check the bag at `path`; `cameras` ({topic: camera}) names image topics
        that are not the node's own names (topics.select_connections)."""
        bag = open_bag(path)
        ep = cls(bag.path, bag.storage, bag.custom.get(META_NODE, ""), None)
        if bag.custom.get(META_PARAMETERS):
            try:
                ep.parameters = json.loads(bag.custom[META_PARAMETERS])
            except ValueError:
                ep.parameters = None
        ep.topics = {t.name: (t.type, t.count) for t in bag.summary().topics}
        conns, camera_ids = select_connections(bag, cameras)
        ep.unused_images = sorted(c.topic for c in bag.topics
                                  if c.msgtype in CAMERA_ROLES and c.id not in camera_ids)
        ep._read(bag, conns, camera_ids)
        ep._link()
        return ep

    def _read(self, bag, conns, camera_ids):
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
            else:
                item.camera = camera_ids[m.topic.id]
                self.frames.append(item)
        for key in ("observations", "frames", "instructions", "capsule_ops"):
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
        if self.frames:
            self._join_frames(set(uses), {o: it.t_ns for it, o in consumed if o is not None})
        if self.timer_mode:
            # a step per recorded action, each on the observation it consumed (the latest one
            # at its tick: some twice, some never)
            self.steps = [o for _, o in consumed]
            recorded = {p: it for p, (it, _) in enumerate(consumed)}
        else:
            # a step per observation (a camera policy's: per observation joined with a frame of
            # each camera); its action, if the recorder has it
            self.steps = [it.index for it in self.observations
                          if not self.frames or it.index in self.joined]
            position = {o: p for p, o in enumerate(self.steps)}
            recorded = {position[o]: it for it, o in consumed if o is not None}
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

    def _join_frames(self, consumed: set, answered: dict):
        """Which frames each observation was joined with: the node's join (inputs/sync.py, with
        the recorded node's sync_slop_s and sync_queue_size) run over the inputs in the order
        the recorder received them. A consumed observation that join leaves out (the node
        received two inputs in another order than the recorder) takes each camera's frame
        nearest its stamp. `answered`: observation index -> when the recorder received the
        action of its step."""
        from flashrt_ros.inputs.sync import ApproximateSync
        from flashrt_ros.ros.params import parameter_table
        unstamped = [it for it in self.observations + self.frames
                     if not stamp_to_ns(it.msg.header.stamp)]
        if unstamped:
            raise BagError(f"bag {self.path}: {len(unstamped)} message(s) on "
                           f"{sorted({it.topic for it in unstamped})} have no header stamp; "
                           f"expected stamped states and frames, which a camera policy joins by "
                           f"stamp. Stamp them when they are taken, and record again")
        defaults = {name: default for name, default, *_ in parameter_table()}
        params = {**defaults, **{k: v for k, v in (self.parameters or {}).items()
                                 if v is not None}}
        cameras = sorted({f.camera for f in self.frames})
        sync = ApproximateSync((STATE_STREAM, *cameras), s_to_ns(params["sync_slop_s"]),
                               int(params["sync_queue_size"]), max_age_ns=None)
        arrivals = sorted(self.observations + self.frames, key=lambda it: it.t_ns)
        for it in arrivals:
            joined = sync.add(it.camera or STATE_STREAM, stamp_to_ns(it.msg.header.stamp), it)
            if joined is not None:
                self.joined[joined.items[STATE_STREAM].index] = {
                    c: joined.items[c] for c in cameras}
        for o in sorted(consumed - set(self.joined)):
            t = stamp_to_ns(self.observations[o].msg.header.stamp)
            self.joined[o] = {c: min((f for f in self.frames if f.camera == c),
                                     key=lambda f: abs(stamp_to_ns(f.msg.header.stamp) - t))
                              for c in cameras}
        # Ambiguous: a state with more than one frame of a camera it could join (within the
        # slop, newer than the frame the set before took, received before the step's action).
        # The node joins the newest it has taken when the state comes, and which it has taken
        # depends on when its executor woke (it takes the state's subscription before the
        # cameras'), which no bag holds.
        by_stamp = {c: sorted((stamp_to_ns(f.msg.header.stamp), f.t_ns) for f in self.frames
                              if f.camera == c) for c in cameras}
        taken = dict.fromkeys(cameras, -1)
        for o in sorted(self.joined):
            t = stamp_to_ns(self.observations[o].msg.header.stamp)
            before = answered.get(o, float("inf"))
            for c in cameras:
                frames = by_stamp[c]
                low = bisect.bisect_left(frames, (max(t - sync.slop_ns, taken[c] + 1),))
                high = bisect.bisect_right(frames, (t + sync.slop_ns, float("inf")))
                if sum(1 for _, received in frames[low:high] if received < before) > 1:
                    self.ambiguous.add(o)
                taken[c] = stamp_to_ns(self.joined[o][c].msg.header.stamp)

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
        """A fresh node's first step is step 1 of its first episode: episode 1 where configure
        prefilled the instruction (a text policy), episode 0 where nothing was prefilled (a
        VLA). A bag that does not start there replays from its first instruction or reset, which
        puts the node into a state the replay knows; steps before it are not replayed."""
        first = recorded[min(recorded)].msg if recorded else None
        if first is None or (int(first.step), int(first.episode_id)) in FRESH_NODE_STEPS:
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
            use = Item(o.kind, o.topic, o.t_ns, o.raw, o.msg, p, repeat=o.index in seen,
                       frames=tuple(self.joined.get(o.index, {}).values()))
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

    @property
    def ambiguous_steps(self) -> list:
        """Step positions whose frames the bag cannot tell for sure (_join_frames)."""
        return [p for p, o in enumerate(self.steps) if o in self.ambiguous and p >= self.start]

    def summary(self) -> str:
        roles = {}
        for it in self.observations:
            roles[it.kind] = roles.get(it.kind, 0) + 1
        for it in self.frames:
            key = f"camera {it.camera} ({it.kind})"
            roles[key] = roles.get(key, 0) + 1
        obs = ", ".join(f"{n} {k} message(s)" for k, n in roles.items())
        text = (f"{self.path} ({self.storage}): {obs}, {len(self.instructions)} instruction(s), "
                f"{len(self.capsule_ops)} capsule operation(s), {len(self.actions)} recorded "
                f"action(s)")
        if self.actions:
            first = self.actions[min(self.actions)]
            text += f" from step {first.step} of episode {first.episode_id}"
        if self.frames:
            text += (f"; {len(self.joined)} observation(s) joined with a frame of each camera "
                     f"(the others are not replayed)")
        if self.timer_mode:
            unused = len(self.observations) - len({o for o in self.steps if o is not None})
            text += (f"; timer mode: {len(self.steps)} steps on the observations they consumed "
                     f"({unused} observation(s) no step took are not replayed)")
        ambiguous = self.ambiguous_steps
        if ambiguous:
            text += (f"; {len(ambiguous)} step(s) had more than one frame of a camera within "
                     f"the slop (the first: step {ambiguous[0]}): the replay joins the newest "
                     f"the recorder had received, the live node joined the newest it had taken, "
                     f"and a bag does not hold which that was")
        if self.unused_images:
            text += (f"; image topics not replayed: {self.unused_images} (not named "
                     f"<node>/images/<camera>[/compressed]; name their camera with "
                     f"--camera CAMERA=TOPIC)")
        if self.start:
            text += f"; replayed from step {self.start} (the first instruction or reset)"
        return text + (f", recorded from {self.node}" if self.node else "")
