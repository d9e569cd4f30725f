"""py_trees behaviours that drive a flashrt_policy node: capsule service calls and status conditions.

py_trees 2.x over plain rclpy, in the shape of py_trees_ros (which is not a dependency): a
behaviour gets its rclpy node from `setup(node=...)` (`tree.setup(node=node)` hands it to every
behaviour), creates its client or subscriptions there and destroys them in `shutdown()`.

Service behaviours, one per capsule service of the node:
    Snapshot  Restore  Fork  Rollback  Reset  SaveCapsule  LoadCapsule  DeleteCapsule
Keyword arguments named after the srv's request fields fill the request (`Restore(name="home")`,
`Rollback(k=5)`); a field given as `FromBlackboard(key)` is read when the request is sent. The
behaviour's own display name is `label` (the request already has a field called `name`).
One call, never blocking the tick:
    first ticks - RUNNING until the service is ready, at most `wait_s` -> else FAILURE, unreachable;
                  then the request goes out (`call_async`) and the tick returns RUNNING;
    next ticks  - RUNNING until the response, at most `timeout_s` after sending -> else FAILURE,
                  timeout - unless the node's ~/capsule_events reported this operation (and
                  capsule name) after the request went out: rmw_fastrtps can drop an answer the
                  node sent (docs/node.md), so that event counts as the answer (CapsuleClient,
                  flashrt_ros.ros.client) -> applied: SUCCESS, outcome `ok-by-event`
                  (response_key is then set to the CapsuleEvent); not applied: FAILURE, refused;
    response    - success=true -> SUCCESS (the response goes to `response_key`, if given);
                  success=false -> FAILURE, refused.
Conditions:
    StepReached(n)             the node's committed step (newest of ~/status and ~/action) >= n;
    DeadlineHealthy(max_misses) deadline misses since this behaviour's first ~/status <= max_misses;
    CapsulePresent(name)       `name` is in the node's list_capsules answer.
StepReached and DeadlineHealthy return RUNNING until their first message (FAILURE after
`status_timeout_s` without one), then SUCCESS or FAILURE on every tick; wrap them in
`FailureIsRunning` to wait for a step.

Blackboard keys (absolute; see docs/behaviour_trees.md):
    ERROR_KEY  /flashrt/error  str: "<label>: <outcome>: <reason>" of the most recent failure of any
                               behaviour here (kept until the next failure);
    CALLS_KEY  /flashrt/calls  deque of ServiceCall, the last CALL_HISTORY finished, failed or halted
                               service calls, oldest first (what the demo's latency table reads);
    response_key (optional, per behaviour) the response of its last successful call.

Threading model. Behaviours never block and never spin: the node given to setup must be spun by
an executor, and the tree is ticked either
  * from a timer callback on that executor (ticks, responses and messages are callbacks of the
    node's default mutually exclusive group: they interleave, never overlap), or
  * from a loop in another thread while the executor spins in its own (what `trees.run_tree`, the
    demo and the tests do). Responses complete their rclpy Future in the executor thread; the tick
    thread only reads `done()`/`result()`. Subscription callbacks replace one reference (the latest
    message) that the tick reads. No lock of ours is needed in either case.
Halt: `terminate(INVALID)` while a call is pending removes the request from the client and cancels
its future. A response that arrives later finds no pending request and the executor drops it; the
next run sends a new request with its own future, so a stale response can never complete it.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import py_trees
from py_trees.common import Access, Status
from rclpy.qos import QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy

from flashrt_ros.msg import ActionChunk, PolicyStatus
from flashrt_ros.ros.client import CapsuleClient, NoAnswer
from flashrt_ros.ros.executors import subscribe_without_event_handlers
from flashrt_ros.ros.operations import operation as lookup_operation
from flashrt_ros.ros.stamps import stamp_to_ns

DEFAULT_POLICY = "/flashrt_policy"
ERROR_KEY = "/flashrt/error"
CALLS_KEY = "/flashrt/calls"
CALL_HISTORY = 1000
_RELIABLE = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                       history=QoSHistoryPolicy.KEEP_LAST)   # as the node's ~/status and ~/action


class FromBlackboard:
    """A request field (or condition argument) read from the blackboard when it is needed."""

    def __init__(self, key: str):
        self.key = key

    def __repr__(self):
        return f"FromBlackboard({self.key!r})"


@dataclass
class ServiceCall:
    """One service call as the tree saw it (appended to CALLS_KEY when it ends)."""
    label: str                  # the behaviour's label
    service: str                # full service name, e.g. /flashrt_policy/restore
    request: str                # the request fields, e.g. "name='home'"
    outcome: str                # ok, ok-by-event, refused, timeout, unreachable, halted
    message: str                # the node's message, or why the tree gave up
    node_ms: float | None       # the node's own latency_ms (services that report one)
    round_trip_ms: float | None  # request sent -> response arrived in this process (or was
                                 # first seen by a tick, if that came first)
    wait_ms: float              # first tick -> request sent (service discovery)



def _node_from(kwargs, who: str):
    try:
        return kwargs["node"]
    except KeyError:
        raise KeyError(f"{who}: setup() expected node=<rclpy node> in its kwargs (tree.setup(node="
                       f"node)), found {sorted(kwargs)}") from None


class _Blackboard:
    """The blackboard keys one behaviour writes and reads."""

    def __init__(self, behaviour: py_trees.behaviour.Behaviour, writes=(), reads=()):
        self.client = behaviour.attach_blackboard_client(name=behaviour.name)
        for key in (ERROR_KEY, *writes):
            self.client.register_key(key, access=Access.WRITE)
        for key in reads:
            self.client.register_key(key, access=Access.READ)

    def resolve(self, value):
        return self.client.get(value.key) if isinstance(value, FromBlackboard) else value

    def error(self, text: str):
        self.client.set(ERROR_KEY, text)


class _Call:
    """One run's call. initialise makes a new one, so a late response can only touch its own."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.sent = self.arrived = None
        self.request = self.pending = None      # the request, its PendingCall once sent

    def on_arrival(self, _future):          # runs in the executor thread
        self.arrived = time.perf_counter()


class CapsuleService(py_trees.behaviour.Behaviour):
    """Base of the service behaviours: one non-blocking call of `<policy>/<service>` per run.

    A subclass names its capsule operation (flashrt_ros.ros.operations) in its class statement,
    `class Restore(CapsuleService, operation="restore")`; `op`, `srv_type` and `service` come
    from the operations table.
    """
    op = None
    srv_type = None
    service = ""

    def __init_subclass__(cls, operation: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if operation:
            cls.op = lookup_operation(operation)
            cls.srv_type, cls.service = cls.op.srv_type, cls.op.service

    def __init__(self, label: str | None = None, *, policy: str = DEFAULT_POLICY,
                 wait_s: float = 5.0, timeout_s: float = 10.0, response_key: str | None = None,
                 **fields):
        known = list(self.srv_type.Request.get_fields_and_field_types())
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown request field(s) {unknown}; a "
                             f"{self.srv_type.__name__} request has {known}")
        if wait_s <= 0 or timeout_s <= 0:
            raise ValueError(f"{type(self).__name__}: expected wait_s and timeout_s > 0 seconds, "
                             f"found {wait_s!r} and {timeout_s!r}")
        shown = " ".join(str(v) for v in fields.values())
        super().__init__(label or f"{type(self).__name__} {shown}".strip())
        self.fields = fields
        self.service_name = f"{policy.rstrip('/')}/{self.service}"
        self.events_topic = f"{policy.rstrip('/')}/capsule_events"
        self.wait_s, self.timeout_s = float(wait_s), float(timeout_s)
        self.response_key = response_key
        reads = [v.key for v in fields.values() if isinstance(v, FromBlackboard)]
        writes = [CALLS_KEY] + ([response_key] if response_key else [])
        self.bb = _Blackboard(self, writes=writes, reads=reads)
        self.policy = policy
        self.node = self.client = self.capsules = None
        self._call: _Call | None = None

    # -- py_trees lifecycle ---------------------------------------------------------------
    def setup(self, **kwargs):
        self.node = _node_from(kwargs, self.name)
        # the tick only polls: the executor that spins the node runs the callbacks
        self.capsules = CapsuleClient(self.node, self.policy, events=not self.op.query)
        self.client = self.capsules.client(self.op)

    def initialise(self):
        self._call = _Call()

    def update(self) -> Status:
        call, now = self._call, time.perf_counter()
        if call.pending is None:
            if not self.client.service_is_ready():
                if now - call.t0 > self.wait_s:
                    return self._fail("unreachable", f"no service {self.service_name} within "
                                      f"{self.wait_s:g} s; is the policy node running under that "
                                      f"name, in this ROS_DOMAIN_ID?")
                self.feedback_message = f"waiting for {self.service_name}"
                return Status.RUNNING
            call.request = self.make_request()
            call.pending = self.capsules.send(self.op, call.request)
            call.sent = call.pending.sent
            call.pending.future.add_done_callback(call.on_arrival)
            self.feedback_message = f"sent {self.service_name}"
            return Status.RUNNING
        try:
            response = call.pending.poll(self.timeout_s)
        except NoAnswer as e:
            return self._fail("timeout", str(e))
        if response is None:
            return Status.RUNNING
        if call.pending.by_event:
            return self._by_event(response)
        outcome = "ok" if response.success else "refused"
        self._record(outcome, response.message, response)
        self.feedback_message = f"{outcome}: {response.message}"
        if not response.success:
            self.bb.error(f"{self.name}: refused: {response.message}")
        status = self.on_response(response)
        if status == Status.SUCCESS and self.response_key:
            self.bb.client.set(self.response_key, response)
        return status

    def terminate(self, new_status: Status):
        call = self._call
        if new_status == Status.INVALID and call is not None and call.pending is not None \
                and not call.pending.done():
            call.pending.forget()
            self._record("halted", "halted while waiting for the response")
        self._call = None

    def shutdown(self):
        if self.capsules is not None:
            self.capsules.destroy()
            self.capsules = self.client = None

    # -- hooks ----------------------------------------------------------------------------
    def make_request(self):
        request = self.srv_type.Request()
        for field, value in self.fields.items():
            setattr(request, field, self.bb.resolve(value))
        return request

    def on_response(self, response) -> Status:
        """SUCCESS or FAILURE for an answer (the base: the node's success flag)."""
        return Status.SUCCESS if response.success else Status.FAILURE

    # -- helpers --------------------------------------------------------------------------
    def _by_event(self, event) -> Status:
        """No answer within timeout_s, but the node's CapsuleEvent reports the call: it is the
        answer (ok-by-event when the node applied it, refused when it did not)."""
        lost = f"{self.service_name} did not answer within {self.timeout_s:g} s"
        if not event.success:
            return self._fail("refused", f"{event.message} ({lost}; {self.events_topic} "
                                         f"reports the node refused it)")
        self._record("ok-by-event", f"{lost}; {self.events_topic} reports it applied: "
                                    f"{event.message}")
        self.feedback_message = f"ok-by-event: {event.message}"
        if self.response_key:
            self.bb.client.set(self.response_key, event)
        return Status.SUCCESS

    def _fail(self, outcome: str, why: str) -> Status:
        self._record(outcome, why)
        self.bb.error(f"{self.name}: {outcome}: {why}")
        self.feedback_message = f"{outcome}: {why}"
        return Status.FAILURE

    def _record(self, outcome: str, message: str, response=None):
        call = self._call
        shown = ", ".join(f"{f}={getattr(call.request, f)!r}" for f in self.fields) \
            if call.request is not None else ""
        node_ms = float(response.latency_ms) if hasattr(response, "latency_ms") else None
        # the done callback is a task of the executor and may run after the tick saw done()
        rtt = ((call.arrived or time.perf_counter()) - call.sent) * 1e3 if response is not None \
            else None
        wait = ((call.sent or time.perf_counter()) - call.t0) * 1e3
        client = self.bb.client
        if not client.exists(CALLS_KEY):
            client.set(CALLS_KEY, collections.deque(maxlen=CALL_HISTORY))
        client.get(CALLS_KEY).append(ServiceCall(self.name, self.service_name, shown, outcome,
                                                 message, node_ms, rtt, wait))


class Snapshot(CapsuleService, operation="snapshot"):
    """Capture the live state as capsule `name` (fields: name, tier, pin)."""


class Restore(CapsuleService, operation="restore"):
    """Copy capsule `name` into the live state at the next committed boundary (field: name)."""


class Fork(CapsuleService, operation="fork"):
    """Copy capsule `source` ('' = the live state) into a new capsule `name` (fields: source,
    name, switch_to, tier)."""


class Rollback(CapsuleService, operation="rollback"):
    """Go back `k` committed steps (field: k; bounded by the node's rollback ring)."""


class Reset(CapsuleService, operation="reset"):
    """New episode from the instruction prefill (keep_context=True) or an empty context."""


class SaveCapsule(CapsuleService, operation="save"):
    """Write capsule `name` to the node's capsule directory (fields: name, evict_from_memory)."""


class LoadCapsule(CapsuleService, operation="load"):
    """Verify and load capsule file `name` into memory (fields: name, tier, restore)."""


class DeleteCapsule(CapsuleService, operation="delete"):
    """Delete capsule `name` (fields: name, delete_file; its saved file stays unless delete_file)."""


class CapsulePresent(CapsuleService, operation="list"):
    """SUCCESS if the node stores a capsule called `name` (in `tier`, '' = any), else FAILURE.

    Asks `list_capsules` on every run. An absent capsule is an answer, not an error: it sets the
    feedback message and leaves ERROR_KEY alone; unreachable, timeout and refused write it as usual.
    """
    def __init__(self, name, label: str | None = None, *, tier: str = "", **kwargs):
        super().__init__(label or f"CapsulePresent {name}", tier=tier, **kwargs)
        self.capsule = name
        if isinstance(name, FromBlackboard):
            self.bb.client.register_key(name.key, access=Access.READ)

    def on_response(self, response) -> Status:
        if not response.success:
            return Status.FAILURE
        name = self.bb.resolve(self.capsule)
        if any(c.name == name for c in response.capsules):
            return Status.SUCCESS
        self.feedback_message = f"no capsule {name!r}"
        return Status.FAILURE


class _StatusCondition(py_trees.behaviour.Behaviour):
    """Base of the conditions on the node's published status (and, for steps, its actions)."""
    follows_actions = False

    def __init__(self, label: str, *, policy: str = DEFAULT_POLICY, status_timeout_s: float = 5.0,
                 reads=()):
        super().__init__(label)
        self.policy = policy.rstrip("/")
        self.status_timeout_s = float(status_timeout_s)
        self.bb = _Blackboard(self, reads=reads)
        self.node = None
        self._subs = []
        self.last_status: PolicyStatus | None = None   # the latest status message
        self.step: tuple[int, int] | None = None    # (step, stamp ns) of the newest status/action
        self._t0 = None

    def setup(self, **kwargs):
        self.node = _node_from(kwargs, self.name)
        self._subs.append(subscribe_without_event_handlers(self.node, PolicyStatus, f"{self.policy}/status",
                                     self._on_status, _RELIABLE))
        if self.follows_actions:
            self._subs.append(subscribe_without_event_handlers(self.node, ActionChunk, f"{self.policy}/action",
                                         self._on_action, _RELIABLE))

    def shutdown(self):
        for sub in self._subs:
            self.node.destroy_subscription(sub)
        self._subs = []

    # executor thread: each callback replaces whole values the tick reads
    def _on_status(self, msg: PolicyStatus):
        self.last_status = msg
        self._take_step(msg.step, msg.header.stamp)

    def _on_action(self, msg: ActionChunk):
        self._take_step(msg.step, msg.header.stamp)

    def _take_step(self, step, stamp):
        ns = stamp_to_ns(stamp)
        if self.step is None or ns >= self.step[1]:
            self.step = (int(step), ns)

    def initialise(self):
        self._t0 = time.perf_counter()

    def update(self) -> Status:
        if not self.has_data():
            if time.perf_counter() - self._t0 > self.status_timeout_s:
                why = f"no message on {self.policy}/status within {self.status_timeout_s:g} s"
                self.bb.error(f"{self.name}: no status: {why}")
                self.feedback_message = why
                return Status.FAILURE
            self.feedback_message = f"waiting for {self.policy}/status"
            return Status.RUNNING
        ok, self.feedback_message = self.check()
        return Status.SUCCESS if ok else Status.FAILURE

    def has_data(self) -> bool:
        return self.last_status is not None

    def check(self) -> tuple[bool, str]:
        raise NotImplementedError


class StepReached(_StatusCondition):
    """SUCCESS once the node's committed step is >= `n` (an int or a FromBlackboard key).

    The step is the newest (by header stamp) of ~/status (status_rate_hz) and ~/action (every
    step), so it follows restores and rollbacks as well as steps.
    """
    follows_actions = True

    def __init__(self, n, label: str | None = None, **kwargs):
        self.n = n
        reads = [n.key] if isinstance(n, FromBlackboard) else []
        super().__init__(label or f"StepReached {n}", reads=reads, **kwargs)

    def has_data(self) -> bool:
        return self.step is not None

    def check(self):
        n, step = int(self.bb.resolve(self.n)), self.step[0]
        return step >= n, f"step {step} {'>=' if step >= n else '<'} {n}"


class DeadlineHealthy(_StatusCondition):
    """SUCCESS while the node missed at most `max_misses` deadlines since this behaviour's first
    status message (so a tree judges its own run, not the node's whole uptime)."""

    def __init__(self, max_misses: int = 0, label: str | None = None, **kwargs):
        if max_misses < 0:
            raise ValueError(f"DeadlineHealthy: expected max_misses >= 0, found {max_misses!r}")
        super().__init__(label or f"DeadlineHealthy <={max_misses}", **kwargs)
        self.max_misses = int(max_misses)
        self.baseline: int | None = None

    def _on_status(self, msg: PolicyStatus):
        if self.baseline is None:
            self.baseline = int(msg.deadline_misses)
        super()._on_status(msg)

    def check(self):
        misses = int(self.last_status.deadline_misses) - self.baseline
        return misses <= self.max_misses, f"{misses} deadline miss(es), at most {self.max_misses}"
