"""`flashrt-ros record`: write a policy node's episode topics to a rosbag2 bag.

    flashrt-ros record [--node /flashrt_policy] [--out DIR] [--storage mcap|sqlite3]
                       [--duration S] [--joint-states [TOPIC]]

Topics (bag_types.TOPIC_ROLES): `<node>/observation`, `<node>/instruction`, `<node>/action`,
`<node>/status`, `<node>/capsule_events`, with `--joint-states` the JointState topic, and the
node's camera topics when it has them (`<node>/images/<camera>`, sensor_msgs/Image, and
`<node>/images/<camera>/compressed`, CompressedImage), found in the graph as the node subscribes
them; a camera driver publishes one of a camera's two topics, so one without publishers does
not hold up `ready`.
The bag is a rosbag2 directory as `ros2 bag record` leaves it (flashrt_ros.bags.rosbag2):
`<bag>_0.mcap`, written crash-safe by McapBagWriter (a killed recorder loses at most its last
second; `flashrt-ros bag recover` completes the file), and `metadata.yaml`. `--storage sqlite3`
writes `<bag>.db3` with `rosbags` instead, complete only when the recorder stops.

Design:
  * Every topic is subscribed at start (reliable; the instruction latched, as the node takes
    it), so a recorder that runs before an input's publisher appears is matched as soon as it
    is discovered: a player or `flashrt-ros instruct` that waits for its subscribers
    (ros/publishing.py) then waits for the recorder too, and nothing one-shot escapes the bag.
    Once a topic's publishers show up, it is subscribed as `ros2 bag record` does, with their
    QoS (best effort if any publisher is; transient local if all are) - a new subscription when
    that differs from the first; the one it replaces is ignored from then on - and their offered
    QoS goes into the bag's channel. A topic nobody publishes is not in the bag.
  * Ready means every publisher of every topic reaches the recorder, not that the recorder has
    subscribed. Two sides of DDS must match. The recorder's readers match the publishers it
    knows of: each subscription's matched publisher count must equal the publishers the graph
    shows (reported per topic as it changes). The publishers' writers must match the
    recorder's readers, which the recorder cannot ask the publishing process about; it hears
    it instead. A writer sends only to readers it has matched, and a process learns of another
    process's subscriptions in the order they were created (DDS discovery announces them over
    one reliable, ordered stream). So a message from the node's status publisher, received on a
    status subscription made after the subscriptions of the node's other outputs (action,
    capsule_events), shows that the node has matched all of them. On a busy machine that
    takes seconds after the graph shows the node; a recorder that said ready earlier lost the
    node's first actions. Inputs (observations, instructions, JointState) come from publishers
    that wait for their subscribers themselves (ros/publishing.py, the player). Should actions
    still not come while the node's status shows it stepping, the recorder warns.
  * Raw subscriptions: the CDR bytes rclpy receives are written unchanged, stamped from rclpy's
    MessageInfo as rosbag2 stamps them: log time = when the middleware received the message,
    publish time = the sender's source timestamp, sequence = the publisher's sequence number.
  * The policy node's parameters (read once over its parameter services) go into the bag's
    custom data, so that a replay can start a node configured as the recorded one was.
  * One thread: a single-threaded executor runs every callback and the writer, so the writer
    needs no lock. Ctrl-C (SIGINT), SIGTERM and --duration all end in `close()`, which finishes
    the bag.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime

from flashrt_ros.bags.types import (CAMERA_ROLES, META_NODE, META_PARAMETERS, META_RECORDER, ROLES,
                                    TOPIC_ROLES, BagError, camera_of, topic_name, type_hash,
                                    typestore)
from flashrt_ros.ros.discovery import loopback_by_default
from flashrt_ros.ros.stamps import sec_nanosec

STORAGES = ("mcap", "sqlite3")
PARAMETER_RETRY_S = 1.0     # ask the node for its parameters again when answers are missing
# status messages with a new step, after the action topic was ready, without any action: warn
SILENT_ACTION_STEPS = 3


def _qos_to_bag(profile):
    """rclpy QoSProfile (a publisher's, from graph introspection) -> rosbags Qos."""
    from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness,
                                    QosReliability, QosTime)

    def t(duration):
        return QosTime(*sec_nanosec(duration.nanoseconds))

    def enum(cls, value):
        try:
            return cls(int(value))
        except ValueError:
            return cls.UNKNOWN
    return Qos(enum(QosHistory, profile.history), int(profile.depth),
               enum(QosReliability, profile.reliability), enum(QosDurability, profile.durability),
               t(profile.deadline), t(profile.lifespan), enum(QosLiveliness, profile.liveliness),
               t(profile.liveliness_lease_duration), bool(profile.avoid_ros_namespace_conventions))


def _subscription_qos(publishers=None, latched=False):
    """The QoS that receives from all `publishers` (what `ros2 bag record` chooses); before any
    publisher is known, reliable, and transient local for a latched input."""
    from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy)
    if publishers:
        reliable = all(p.qos_profile.reliability == ReliabilityPolicy.RELIABLE for p in publishers)
        latched = all(p.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
                      for p in publishers)
    else:
        reliable = True
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=1000,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def _parameter_value(value):
    """rcl_interfaces ParameterValue -> a JSON-able Python value (None for 'not set')."""
    from rcl_interfaces.msg import ParameterType as T
    return {
        T.PARAMETER_BOOL: lambda v: v.bool_value,
        T.PARAMETER_INTEGER: lambda v: v.integer_value,
        T.PARAMETER_DOUBLE: lambda v: v.double_value,
        T.PARAMETER_STRING: lambda v: v.string_value,
        T.PARAMETER_BOOL_ARRAY: lambda v: list(v.bool_array_value),
        T.PARAMETER_INTEGER_ARRAY: lambda v: list(v.integer_array_value),
        T.PARAMETER_DOUBLE_ARRAY: lambda v: list(v.double_array_value),
        T.PARAMETER_STRING_ARRAY: lambda v: list(v.string_array_value),
    }.get(value.type, lambda v: None)(value)


class _Sqlite3Bag:
    """`--storage sqlite3`: a bag written by rosbags (complete only once closed), behind the
    McapBagWriter methods the recorder calls."""

    def __init__(self, out):
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.rosbag2.errors import WriterError
        self.writer = Writer(out, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.SQLITE3)
        try:
            self.writer.open()
        except (WriterError, OSError) as e:
            raise BagError(f"cannot create the bag {out}: {e} Expected a path that does not exist "
                           f"yet") from None
        self._conns = []

    def add_topic(self, topic, msgtype, definition, type_hash, offered_qos):
        from rosbags.rosbag2.metadata import parse_qos
        qos = parse_qos(list(offered_qos)) if offered_qos else []
        self._conns.append(self.writer.add_connection(topic, msgtype, typestore=typestore(),
                                                      offered_qos_profiles=qos))
        return len(self._conns) - 1

    def set_custom(self, key, value):
        self.writer.set_custom_data(key, value)

    def write(self, channel, log_time, data, publish_time=0, sequence=0):
        self.writer.write(self._conns[channel], log_time, data)

    def flush_if_due(self):
        pass

    def close(self):
        from flashrt_ros.bags import rosbag2
        from flashrt_ros.bags.types import ros_distro
        self.writer.close()
        # rosbags names itself the distro; rosbag2 writes the distro's name
        meta = rosbag2.read_metadata(self.writer.path)
        meta["ros_distro"] = ros_distro()
        (self.writer.path / rosbag2.METADATA_FILE).write_text(
            rosbag2.dump({"rosbag2_bagfile_information": meta}), encoding="utf-8")


class BagRecorder:
    """Records the episode topics of policy node `node` into a new bag at `out`.

    Drive it with `spin_once()`; `close()` finishes the bag. `counts` holds the messages written
    per role; `matched` holds (matched, known) publishers per topic: how many publishers this
    recorder's subscription has matched, of those the graph shows; `ready` is True once every
    topic's publishers are all matched and the node's status showed that its writers matched
    the recorder (module docstring); `node_parameters` holds the policy node's parameters once
    they were read.
    """

    def __init__(self, node: str = "/flashrt_policy", out: str | None = None,
                 storage: str = "mcap", joint_states: str | None = None, context=None,
                 log=print, flush_interval_s: float | None = None):
        from rcl_interfaces.srv import GetParameters, ListParameters
        from flashrt_ros.ros.executors import SingleThreadedExecutor
        from rclpy.node import Node

        from flashrt_ros.bags.writer import FLUSH_INTERVAL_S, McapBagWriter

        if storage not in STORAGES:
            raise BagError(f"record: storage: expected one of {list(STORAGES)}, found {storage!r}")
        self.target = "/" + node.strip("/")
        self.out = out or datetime.now().strftime("flashrt_%Y_%m_%d-%H_%M_%S")
        self.log = log
        self.topics = {}                         # topic name -> role
        for role in TOPIC_ROLES:
            if role.camera:
                continue                         # found in the graph (_find_cameras)
            if role.role == "joint_states":
                if joint_states:
                    self.topics[joint_states] = role
            else:
                self.topics[topic_name(role, self.target)] = role
        self.counts = {r.role: 0 for r in self.topics.values()}
        self.matched = {t: (0, 0) for t in self.topics}
        self.nbytes = 0
        self._subs = {}                          # topic -> (subscription, its QoS, its serial)
        self._serial = 0                         # subscriptions made so far
        self._channels = {}                      # topic -> channel in the bag
        self._warned = set()
        # the node's outputs, whose writers a status message shows matched (module docstring);
        # status is subscribed last, after the others
        self._status_topic = topic_name(ROLES["status"], self.target)
        self._outputs = [t for t, r in self.topics.items() if not r.input and r.under_node]
        self._status_heard = 0                   # serial of the status subscription heard from
        self._was_ready = False
        self._action_steps = None                # new steps in status since the actions were ready
        self._actions_then = 0                   # actions recorded then
        self._last_step = None
        self._params_sent = None        # when the parameters were last asked for, or answered
        self._param_names = None        # the node's parameter names, once listed
        self._param_values = {}         # name -> value, as the answers come
        self.node_parameters = None
        try:
            self.writer = (McapBagWriter(self.out, flush_interval_s=flush_interval_s
                                         or FLUSH_INTERVAL_S)
                           if storage == "mcap" else _Sqlite3Bag(self.out))
        except BagError as e:
            raise BagError(f"{e}: choose another --out") from None
        self.writer.set_custom(META_NODE, self.target)
        from flashrt_ros import __version__
        self.writer.set_custom(META_RECORDER, f"flashrt_ros {__version__}")
        self.node = Node(f"flashrt_bag_recorder_{os.getpid()}", context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._list_client = self.node.create_client(ListParameters,
                                                    f"{self.target}/list_parameters")
        self._get_client = self.node.create_client(GetParameters, f"{self.target}/get_parameters")
        self.started = time.monotonic()
        for topic, role in sorted(self.topics.items(), key=lambda t: t[0] == self._status_topic):
            self._subscribe(topic, role, _subscription_qos(latched=role.role == "instruction"))
        self.node.create_timer(0.1, self._discover)

    @property
    def ready(self) -> bool:
        return all(self._topic_ready(t) for t in self.topics)

    def _topic_ready(self, topic) -> bool:
        """Every publisher of `topic` reaches the recorder, and its channel is in the bag."""
        matched, known = self.matched[topic]
        if self.topics[topic].camera and not known:
            return True
        return topic in self._channels and 0 < known <= matched and (
            topic not in self._outputs or self._outputs_matched())

    def _outputs_matched(self) -> bool:
        """A status message came on a status subscription no older than the subscriptions of
        the node's other outputs: the node's writers have matched all of them."""
        return self._status_heard >= max(self._subs[t][2] for t in self._outputs)

    def _check_ready(self):
        if self.ready and not self._was_ready:
            self._was_ready = True
            self.log(f"[record] ready: recording {len(self.topics)} topics to {self.out}")

    # -- discovery: the publishers' QoS and types ------------------------------------------
    def _find_cameras(self):
        """Subscribe the node's camera topics the graph shows and the recorder does not know."""
        prefix = topic_name(ROLES["image"], self.target, "")
        for topic, types in self.node.get_topic_names_and_types():
            msgtype = next((t for t in types if camera_of(topic, t)), None)
            if topic in self.topics or not topic.startswith(prefix) or msgtype is None:
                continue
            role = CAMERA_ROLES[msgtype]
            self.topics[topic] = role
            self.counts.setdefault(role.role, 0)
            self.matched[topic] = (0, 0)
            self._subscribe(topic, role, _subscription_qos())

    def _discover(self):
        self._poll_parameters()
        self._find_cameras()
        for topic, role in self.topics.items():
            pubs = self.node.get_publishers_info_by_topic(topic)
            self._count_matches(topic, [p for p in pubs if p.topic_type == role.msgtype])
            if not pubs:
                continue
            wrong = {p.topic_type for p in pubs} - {role.msgtype}
            if wrong:
                if topic not in self._warned:
                    self._warned.add(topic)
                    self.log(f"[record] {topic}: expected type {role.msgtype}, found publishers "
                             f"of {sorted(wrong)}; not recording those")
                pubs = [p for p in pubs if p.topic_type == role.msgtype]
                if not pubs:
                    continue
            self._channel(topic, role, pubs)
            want = _subscription_qos(pubs)
            have = self._subs[topic][1]
            if (want.reliability, want.durability) != (have.reliability, have.durability):
                self._subscribe(topic, role, want)
                if topic in self._outputs and topic != self._status_topic:
                    # again after it, so that a status message can show the node matched it
                    self._subscribe(self._status_topic, self.topics[self._status_topic],
                                    self._subs[self._status_topic][1])
        self._check_ready()

    def _count_matches(self, topic, pubs):
        """Keep and report how many of the publishers `pubs` the topic's subscription matched."""
        counts = (min(self._subs[topic][0].get_publisher_count(), len(pubs)), len(pubs))
        if counts != self.matched[topic]:
            self.matched[topic] = counts
            if counts[1]:
                self.log(f"[record] {topic}: {counts[0]} of {counts[1]} publisher(s) matched")

    def _channel(self, topic, role, pubs=None) -> int:
        """The topic's channel in the bag, added with the publishers' offered QoS on first use."""
        if topic in self._channels:
            return self._channels[topic]
        if pubs is None:
            pubs = [p for p in self.node.get_publishers_info_by_topic(topic)
                    if p.topic_type == role.msgtype]
        from rosbags.rosbag2.metadata import dump_qos_v9
        profiles = [_qos_to_bag(p.qos_profile) for p in pubs]
        definition, _ = typestore().generate_msgdef(role.msgtype, ros_version=2)
        self._channels[topic] = self.writer.add_topic(topic, role.msgtype, definition,
                                                      type_hash(role.msgtype),
                                                      dump_qos_v9(profiles))
        self.log(f"[record] recording {topic} ({role.msgtype}, {len(pubs)} publisher(s))")
        return self._channels[topic]

    def _subscribe(self, topic, role, qos):
        msg_class = _message_class(role.msgtype)
        previous = self._subs.get(topic)

        # Two parameters, neither with a default: rclpy passes the MessageInfo only to a callback
        # that cannot be called with the message alone. The log time is the reception time in
        # the DDS layer (as `ros2 bag record` stamps), not when this callback runs: an executor
        # that wakes to several ready topics takes them in subscription order, so callback times
        # can put an instruction after the observation that followed it.
        def on_message(raw: bytes, info):
            if self._subs[topic][0] is not sub:        # replaced by one with the publishers' QoS
                return
            received = info.get("received_timestamp") or time.time_ns()
            self.writer.write(self._channel(topic, role), received, raw,
                              info.get("source_timestamp") or 0,
                              info.get("publication_sequence_number") or 0)
            self.counts[role.role] += 1
            self.nbytes += len(raw)
            if self.counts[role.role] == 1:
                self.log(f"[record] first message on {topic}")
            if topic == self._status_topic:
                self._on_status(raw, serial)
        self._serial += 1
        serial = self._serial
        sub = self.node.create_subscription(msg_class, topic, on_message, qos, raw=True)
        self._subs[topic] = (sub, qos, serial)
        if previous is not None:
            self.log(f"[record] {topic}: subscribed again ({qos.reliability.name.lower()}, "
                     f"{qos.durability.name.lower()})")

    def _on_status(self, raw: bytes, serial: int):
        """The node's writers matched every subscription up to `serial`; and the actions' check:
        a node whose status keeps showing new steps while no action arrives is warned about."""
        from rclpy.serialization import deserialize_message
        self._status_heard = max(self._status_heard, serial)
        self._check_ready()
        step = deserialize_message(raw, _message_class(ROLES["status"].msgtype)).step
        action = topic_name(ROLES["action"], self.target)
        if self._action_steps is None:
            if self._topic_ready(action):      # from here on, each step's action reaches us
                self._action_steps, self._actions_then = 0, self.counts["action"]
        elif step != self._last_step:
            self._action_steps += 1
            if self._action_steps == SILENT_ACTION_STEPS and \
                    self.counts["action"] == self._actions_then:
                self.log(f"[record] warning: {action}: the node's status showed "
                         f"{SILENT_ACTION_STEPS} new steps (now step {step}) since its action "
                         f"publisher matched this recorder, and none of their actions arrived; "
                         f"the bag misses them. Stop and record again, and check that one node "
                         f"publishes {action}")
        self._last_step = step

    # -- the node's parameters, for a replay that configures a node the same way ----------
    def _poll_parameters(self):
        """Ask for the parameter names, then for each value, and again for what has not come
        after PARAMETER_RETRY_S without any answer: rmw_fastrtps can drop a fresh client's
        answer (docs/node.md). A node slow to answer is not asked again while its answers still
        come: a second round on top of the first made a busy node fall further behind each
        second, and the recorder never stored the parameters."""
        from rcl_interfaces.srv import ListParameters
        if self.node_parameters is not None or not self._list_client.service_is_ready():
            return
        now = time.monotonic()
        if self._params_sent is not None and now - self._params_sent < PARAMETER_RETRY_S:
            return
        self._params_sent = now
        if self._param_names is None:
            self._list_client.call_async(ListParameters.Request()).add_done_callback(
                self._on_parameter_names)
        else:
            self._ask_values([n for n in self._param_names if n not in self._param_values])

    def _on_parameter_names(self, future):
        if self._param_names is not None:
            return
        self._params_sent = time.monotonic()
        self._param_names = list(future.result().result.names)
        self._ask_values(self._param_names)

    def _ask_values(self, names):
        # one request per name: rclpy answers a request naming a declared-but-unset parameter
        # (an empty joint_names) with no values at all
        from rcl_interfaces.srv import GetParameters
        for name in names:
            self._get_client.call_async(GetParameters.Request(names=[name])).add_done_callback(
                lambda f, name=name: self._on_parameter_value(name, f))

    def _on_parameter_value(self, name, future):
        self._params_sent = time.monotonic()
        got = future.result().values
        self._param_values[name] = _parameter_value(got[0]) if got else None
        if self.node_parameters is None and len(self._param_values) == len(self._param_names):
            params = {n: self._param_values[n] for n in sorted(self._param_names)}
            self.writer.set_custom(META_PARAMETERS, json.dumps(params, sort_keys=True))
            self.node_parameters = params
            self.log(f"[record] stored the {len(params)} parameters of {self.target} in the bag")

    # -- running --------------------------------------------------------------------------
    def spin_once(self, timeout_sec: float = 0.1):
        self.executor.spin_once(timeout_sec=timeout_sec)
        self.writer.flush_if_due()

    def progress_line(self) -> str:
        per_topic = "  ".join(f"{k} {v}" for k, v in self.counts.items())
        waiting = [t for t, (matched, known) in self.matched.items()
                   if (known or not self.topics[t].camera)
                   and (not known or matched < known or t not in self._channels)]
        line = (f"[record] {time.monotonic() - self.started:6.1f} s  {per_topic}  "
                f"({self.nbytes / 2**20:.2f} MiB)")
        if waiting:
            return line + f"  waiting for publishers of {waiting} to match"
        if not self._outputs_matched():
            return line + (f"  waiting for a message on {self._status_topic} (the node's "
                           f"writers have not matched this recorder yet)")
        return line

    def close(self):
        """Finish the bag (MCAP summary and metadata.yaml / sqlite3 commit) and release ROS."""
        # a short episode may end before a lost parameter answer was asked for again, or before
        # the node's parameter services were discovered (a loaded machine discovers its topics
        # first); a node that published nothing is not waited for
        end = time.monotonic() + 2 * PARAMETER_RETRY_S
        heard = any(self.counts.values())
        while self.node_parameters is None and (self._params_sent is not None or heard) \
                and time.monotonic() < end:
            self._poll_parameters()
            self.executor.spin_once(timeout_sec=0.05)
        if self.node_parameters is None:
            self.log(f"[record] warning: the parameters of {self.target} were not read (is it "
                     f"running?); a replay must be given the node's parameters by hand")
        self.writer.close()
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()


def _message_class(msgtype: str):
    import importlib
    pkg, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), name)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--node", default="/flashrt_policy", help="the policy node (default %(default)s)")
    p.add_argument("--out", "-o", default=None,
                   help="bag directory to create (default flashrt_<date>-<time>)")
    p.add_argument("--storage", "-s", default="mcap", choices=STORAGES,
                   help="storage plugin (default %(default)s)")
    p.add_argument("--duration", "-d", type=float, default=0.0,
                   help="stop after S seconds (0 = until Ctrl-C)")
    p.add_argument("--joint-states", nargs="?", const=ROLES["joint_states"].suffix, default=None,
                   metavar="TOPIC", help="also record sensor_msgs/JointState (default topic "
                                         f"{ROLES['joint_states'].suffix})")
    p.add_argument("--progress", type=float, default=None, metavar="S",
                   help="seconds between progress lines (0 = none; default: 1 on a terminal, "
                        "none when the output goes to a file or a launch log)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="flashrt-ros record",
                                description="Record a policy node's episode topics to a rosbag2 bag.")
    add_arguments(p)
    args = p.parse_args(argv)
    loopback_by_default()
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.signals import SignalHandlerOptions

    stop = {"why": None}

    def on_signal(signum, _frame):
        stop["why"] = signal.Signals(signum).name
    # our own handlers: the bag is closed by this loop, not by rclpy tearing the context down
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        rec = BagRecorder(args.node, args.out, args.storage, args.joint_states,
                          log=lambda s: print(s, flush=True))
    except BagError as e:
        print(f"flashrt-ros record: {e}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    print(f"[record] {args.storage} bag {rec.out}: waiting for publishers of "
          f"{list(rec.topics)} (Ctrl-C stops)", flush=True)
    end = time.monotonic() + args.duration if args.duration > 0 else None
    if args.progress is None:
        args.progress = 1.0 if sys.stdout.isatty() else 0.0
    next_progress = time.monotonic() + args.progress
    try:
        while stop["why"] is None:
            rec.spin_once(0.05)
            now = time.monotonic()
            if end is not None and now >= end:
                stop["why"] = f"duration {args.duration:g} s"
            if args.progress > 0 and now >= next_progress:
                print(rec.progress_line(), flush=True)
                next_progress = now + args.progress
    except (KeyboardInterrupt, ExternalShutdownException):
        stop["why"] = "interrupted"
    finally:
        rec.close()
        rclpy.try_shutdown()
    total = sum(rec.counts.values())
    print(f"[record] stopped ({stop['why']}): wrote {total} messages on "
          f"{sum(1 for c in rec.counts.values() if c)} topics to {rec.out}; "
          f"inspect with `ros2 bag info {rec.out}`, replay with `flashrt-ros play {rec.out}`",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
