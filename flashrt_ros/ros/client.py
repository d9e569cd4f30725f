"""A client of a policy node's capsule services that survives a lost answer.

rmw_fastrtps can lose a service answer although the node applied the request (docs/node.md,
Reliability). Most of those losses come from the client's side: every client of a service
receives every answer of that service and keeps only its own when it takes it, so a client that
has not taken its answer yet while other clients get as many answers as its response history
holds (rclpy's default: 10) loses it. The clients here keep `RESPONSE_QOS` (1000 answers). The
rest - an answer the node drops because it has not discovered a brand-new client yet - is what
the events are for. The node publishes a CapsuleEvent on `<node>/capsule_events` for every operation it
applies, just before the answer, so a client that listens to those events from before its call
can take the matching event (operations.reports) in place of an answer that does not come.
`CapsuleClient` is that client; the CLI, the behaviour-tree behaviours and the bag player use it.

    capsules = CapsuleClient(node, "/flashrt_policy", spin=lambda t: executor.spin_once(t))
    answer = capsules.call("snapshot", Snapshot.Request(name="home"), timeout=10.0)
    # the response, or - when the answer was lost - the CapsuleEvent that reports the call

The rule, one call at a time (`PendingCall.poll`):
  * the answer arrived                  -> the response;
  * `timeout` seconds after sending     -> the first event received after sending that reports
                                           this call (success or failure, as the node says), or
                                           NoAnswer when there is none;
  * with `grace`: once a reporting event arrived, the answer gets `grace` more seconds, then the
    event stands in (the node sends the answer right after the event, so a replay need not wait
    out the whole timeout).
A query (list) is reported by no event: without an answer it ends in NoAnswer.

Threads: the subscription callback (executor thread) appends to a deque; `poll` (any thread)
reads a copy of it and the future's state, so a tick thread can poll while an executor spins the
node elsewhere. `call` blocks and spins the node itself through `spin`, or, without one, sleeps
between polls while another thread spins.
"""
from __future__ import annotations

import collections
import time

from rclpy.qos import QoSProfile, QoSReliabilityPolicy

from flashrt_ros.msg import CapsuleEvent
from flashrt_ros.ros.executors import subscribe_without_event_handlers
from flashrt_ros.ros.operations import Operation, operation, reports

EVENT_HISTORY = 1000     # events kept for matching (the node publishes one per operation)
# A client's response history: it also holds the answers to other clients of the service until
# they are taken and dropped (see the module docstring), so it must outlast a storm of them.
RESPONSE_QOS = QoSProfile(depth=1000, reliability=QoSReliabilityPolicy.RELIABLE)
ANSWER_GRACE_S = 1.0     # a grace for callers that need not wait out the timeout (the player)
POLL_INTERVAL_S = 0.01   # longest pause between polls of a blocking call


class NoAnswer(TimeoutError):
    """A capsule call got neither its answer nor an event that reports it in time."""


class PendingCall:
    """One request sent by a CapsuleClient; `poll` says whether it is answered yet."""

    def __init__(self, capsules: "CapsuleClient", op: Operation, request, client, future,
                 seen: int):
        self.capsules, self.operation, self.request = capsules, op, request
        self.client, self.future = client, future
        self.sent = time.perf_counter()
        self.seen = seen             # events received before the request went out
        self.by_event = False        # poll returned the node's event, not an answer

    def done(self) -> bool:
        return self.future.done()

    def event(self):
        """(arrival, CapsuleEvent) of an event received after sending that reports this call, or
        None (always None for a query). A successful one goes first: another client's refused
        call on the same capsule reports alike, and must not hide that ours was applied."""
        if self.operation.query:
            return None
        failed = None
        for seq, arrival, ev in list(self.capsules.events):
            if seq > self.seen and reports(ev, self.operation.name, self.request):
                if ev.success:
                    return arrival, ev
                failed = failed or (arrival, ev)
        return failed

    def poll(self, timeout: float, grace: float | None = None):
        """The response once it arrived; the reporting CapsuleEvent when the answer is overdue
        (see the module docstring); None while still waiting.

        Raises:
            NoAnswer: `timeout` seconds passed without an answer or a reporting event.
        """
        if self.future.done():
            return self.future.result()
        found = self.event()
        if found is not None and grace is not None:
            deadline = found[0] + grace
        else:
            deadline = self.sent + timeout
        if time.perf_counter() < deadline:
            return None
        self.forget()
        if found is not None:
            self.by_event = True
            return found[1]
        raise NoAnswer(self.capsules.no_answer_message(self.operation, timeout))

    def forget(self):
        """Give up on the answer: an answer that arrives later finds no pending request."""
        self.client.remove_pending_request(self.future)
        self.future.cancel()


class CapsuleClient:
    """Capsule service clients of policy node `target` on `node`, created when first used, and a
    subscription to its capsule events (unless `events` is False).

    Args:
        node: the rclpy node the clients and the subscription belong to.
        target: the policy node's fully qualified name ("/flashrt_policy").
        spin: how a blocking `call` runs callbacks for t seconds (an executor's spin_once);
            None: another thread spins `node`, and `call` sleeps between polls.
        events: subscribe to `<target>/capsule_events` (needed for all but queries).
    """

    def __init__(self, node, target: str = "/flashrt_policy", *, spin=None, events: bool = True):
        self.node = node
        self.target = target.rstrip("/")
        self.events_topic = f"{self.target}/capsule_events"
        self._idle = spin if spin is not None else time.sleep
        self._clients = {}
        self.events = collections.deque(maxlen=EVENT_HISTORY)   # (seq, arrival, CapsuleEvent)
        self._received = 0
        self.events_sub = None
        if events:
            self.events_sub = subscribe_without_event_handlers(
                node, CapsuleEvent, self.events_topic, self._on_event,
                QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE))

    def _on_event(self, msg):                 # executor thread
        self._received += 1
        self.events.append((self._received, time.perf_counter(), msg))

    def service_name(self, name) -> str:
        return f"{self.target}/{operation(name).service}"

    def client(self, name):
        """The rclpy client of operation `name` (created on first use)."""
        op = operation(name)
        if op.name not in self._clients:
            self._clients[op.name] = self.node.create_client(op.srv_type, self.service_name(op),
                                                             qos_profile=RESPONSE_QOS)
        return self._clients[op.name]

    def service_ready(self, name) -> bool:
        return self.client(name).service_is_ready()

    def events_heard(self) -> bool:
        """Whether the node's event publisher matched our subscription. The events are volatile:
        one published before the match never arrives, so a caller waits for this first."""
        return self.events_sub is not None and self.events_sub.get_publisher_count() > 0

    def send(self, name, request) -> PendingCall:
        """Send `request` to operation `name`'s service without waiting."""
        op = operation(name)
        client = self.client(op)
        seen = self._received
        return PendingCall(self, op, request, client, client.call_async(request), seen)

    def call(self, name, request, timeout: float, grace: float | None = None):
        """Send `request` and wait: the response, or the CapsuleEvent that reports the call when
        the answer was lost (PendingCall.poll). Raises NoAnswer when neither came."""
        self._idle(0)                         # take events of earlier calls first
        pending = self.send(name, request)
        while (answer := pending.poll(timeout, grace)) is None:
            self._idle(POLL_INTERVAL_S)
        return answer

    def no_answer_message(self, op: Operation, timeout: float) -> str:
        return (f"{self.service_name(op)} did not answer within {timeout:g} s"
                + ("" if op.query else f" and {self.events_topic} reported no such operation"))

    def destroy(self):
        """Destroy the clients and the subscription (the node stays)."""
        for client in self._clients.values():
            self.node.destroy_client(client)
        self._clients = {}
        if self.events_sub is not None:
            self.node.destroy_subscription(self.events_sub)
            self.events_sub = None
