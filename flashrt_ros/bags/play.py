"""`flashrt-ros play`: replay a bag's inputs into a policy node and compare the actions.

    flashrt-ros play BAG [--node /flashrt_policy] [--mode timing|lockstep] [--rate 1.0]
                         [--camera CAMERA=TOPIC ...]

The parts, one concept per module:
  * episode.py: `RecordedEpisode.open(path)` reads and checks a bag without ROS and plans the
    steps (which observation, and which camera frames, each recorded step consumed; where the
    capsule operations and instructions go among them); topics.py: which topics it uses, as what;
  * capsule_ops.py: a recorded capsule event -> the service request that repeats it;
  * report.py: `compare_actions` and `ReplayResult`, what came back and the verdict;
  * here, `BagPlayer` publishes the episode into a running node (rclpy), in one of two modes:
      timing    - inputs at their recorded receive times, scaled by 1/rate;
      lockstep  - the next input only after the action for the previous step arrived.

Inputs are re-stamped with the player's clock when published (the node drops observations older
than `stale_observation_s`); each action names the stamp of its observation, which pairs it with
the recorded action of that step. A camera policy's frames go out just before their step's state,
each as far from the state's new stamp as it was from the recorded one: the node joins the same
frames with the same state, and its join starts each step with empty queues (every input the
replay sent before was joined), so the order in which DDS delivers a step's messages across
topics does not matter. Actions are compared field by field, the float32 payload byte for byte.
The counts are part of the verdict: a step without an action, an action no step explains, or a
step the bag holds no action for fails the replay (`--tolerate-count-mismatch` reports them).

Threads: one. The player spins its own single-threaded executor while it waits; every wait has
a timeout and says what it waited for.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from flashrt_ros.bags.capsule_ops import capsule_request
from flashrt_ros.bags.episode import Item, RecordedEpisode
from flashrt_ros.bags.report import ReplayResult, compare_actions
from flashrt_ros.bags.types import ROLES, BagError, topic_name
from flashrt_ros.ros.discovery import loopback_by_default
from flashrt_ros.ros.operations import operation
from flashrt_ros.ros.publishing import LATCHED, wait_for_subscribers
from flashrt_ros.ros.stamps import ns_to_stamp, stamp_to_ns
from flashrt_ros.ros.waiting import spin_until

__all__ = ["BagPlayer", "RecordedEpisode", "ReplayResult", "capsule_request", "compare_actions",
           "main"]

SETTLE_S = 0.3     # after the last action: how long a late extra action is still counted


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
        self._qos = qos
        self._camera_pubs = {}                    # (role, camera) -> publisher
        self._frame_stamps = {}                   # (role, camera) -> last stamp published
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
            pubs = [(kind, self.pub[kind]) for kind in sorted(kinds)]
            pubs += [(f"images/{f.camera}", self._camera_pub(f))
                     for f in {(f.kind, f.camera): f for f in episode.frames}.values()]
            for kind, pub in pubs:
                # the node and every other subscriber, a recorder's included: none misses the
                # first input
                wait_for_subscribers(
                    self.node, pub, timeout,
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
    def _camera_pub(self, frame: Item):
        """The publisher of `frame`'s camera topic on the node, as the node names it."""
        key = (frame.kind, frame.camera)
        if key not in self._camera_pubs:
            from sensor_msgs.msg import CompressedImage, Image
            cls = CompressedImage if frame.kind == "compressed_image" else Image
            topic = topic_name(ROLES[frame.kind], self.target, frame.camera)
            self._camera_pubs[key] = self.node.create_publisher(cls, topic, self._qos)
        return self._camera_pubs[key]

    def _stamp(self, floor: int = 0):
        """A fresh, strictly increasing stamp, at least `floor` (pairs each action with its
        observation)."""
        now = max(self.node.get_clock().now().nanoseconds, self._last_stamp + 1, floor)
        self._last_stamp = now
        return now

    def _publish_observation(self, it: Item) -> int:
        """Publish a step's input, re-stamped: its frames first (a camera policy's), each as far
        from the state's new stamp as it was from the recorded one, so the node joins the same
        set; then the state. Returns the state's stamp, which the action names."""
        from rclpy.serialization import deserialize_message
        msg = deserialize_message(it.raw, self.msg_class[it.kind])
        recorded = stamp_to_ns(msg.header.stamp)
        offsets = [(f, stamp_to_ns(f.msg.header.stamp) - recorded) for f in it.frames]
        # each camera's stamps rise too: the node's join drops a frame no newer than the last
        stamp = self._stamp(max((self._frame_stamps.get((f.kind, f.camera), 0) - off + 1
                                 for f, off in offsets), default=0))
        for f, off in offsets:
            pub = self._camera_pub(f)
            frame = deserialize_message(f.raw, pub.msg_type)
            frame.header.stamp = ns_to_stamp(stamp + off)
            self._frame_stamps[(f.kind, f.camera)] = stamp + off
            pub.publish(frame)
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
                              recorded_steps=episode.replayed_actions,
                              ambiguous=episode.ambiguous_steps)
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


def _camera_topic(text: str) -> tuple:
    camera, _, topic = text.partition("=")
    if not camera or not topic.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected CAMERA=TOPIC (e.g. top=/camera/image_raw), "
                                         f"found {text!r}")
    return topic, camera


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
    p.add_argument("--camera", action="append", type=_camera_topic, default=[],
                   metavar="CAMERA=TOPIC",
                   help="replay the Image or CompressedImage topic TOPIC as the node's camera "
                        "CAMERA (repeatable; topics named <node>/images/<camera>[/compressed] "
                        "need none)")
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
        episode = RecordedEpisode.open(args.bag, dict(args.camera))
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
