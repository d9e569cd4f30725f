"""flashrt_policy: the ROS 2 node that serves a policy and its execution-state capsules.

A thin adapter: all state lives in `PolicyRuntime` (live state) and `CapsuleStore` (capsules);
callbacks read the request, call the core, fill the response. Failures go back as
`success=false` with the core's message; no request and no input can kill the node.

Lifecycle (a managed node; `managed:=false` configures and activates at start):
  configure  - validate parameters, set torch's CPU threads (and the threads' `nice` value),
               build the runtime (allocate the arena, capture the plans a step needs;
               progress in the log), prefill `instruction`, warm up (every plan runs once, then
               the exact state is put back), open the capsule store; with capture_prefill
               background, the prefill plans follow in a thread (core/bringup.py: between
               steps; an instruction waits for its plans);
  activate   - start stepping (timer or per observation) and publishing actions;
  deactivate - stop stepping; capsule services keep working on the (frozen) live state;
  cleanup    - drop runtime and store (memory capsules are lost; disk capsules stay), the nice
               value back;
  shutdown   - as cleanup; then `main` ends the process (exit status 0): a finalized node can
               do nothing more.
A failed configure logs why, leaves the node unconfigured and alive; fix the parameter, configure
again. Fixed parameters refuse changes while the node is configured (see params.py).

Concurrency (a `PolicyExecutor`: rclpy's MultiThreadedExecutor without its busy loop, safe against
entities destroyed mid-collection, see executors.py, with a thread per callback group; five
groups, each mutually exclusive):
  * control group - observation and joint-state subscriptions, the control timer. A step holds
                    `runtime.lock` from the input copy to the committed state, and takes no other
                    lock: the control loop never waits for the store, for disk I/O or for a
                    capsule call other than the copy of live bytes it makes.
  * capsule group - snapshot, restore, fork, rollback, reset, delete, list.
  * instruction group - ~/instruction: an instruction may wait for its prefill plans while they
                    come in the background (core/bringup.py), and the capsule calls go on.
  * disk group    - save and load (file I/O), so that a long write does not queue the capsule
                    group behind it on the executor.
  * default group - lifecycle and parameter services, the status timer.
Locks, always taken in this order: `store.lock` (the capsule index and pools; every service
handler holds it throughout, so operations are serialised and see a consistent index), then
`runtime.lock` (the live state). The store takes `runtime.lock` only around copies of live bytes
and never while it reads or writes a file, so disk I/O never blocks the control loop (the one
exception, a fork of the live state into the disk tier that switches to it, is store.py's).
Committed boundary: `runtime.lock` is a `BoundaryLock` (core/serving.py), given to the runtime at
construction - a capsule call that arrives during a step waits for that step to commit and then
goes before the next one (a plain lock is not fair, and a fast observation stream could starve
the call). Operations whose effect must land at one boundary hold `runtime.lock` across it:
rollback, reset and instruction here; in the store, a restore (its copy and the new lineage) and
a fork of the live state that switches to the branch (`store.fork(..., switch_to=True)`). A
restore from the disk tier reads and verifies the file first, without the lock, and copies at the
next boundary. The lineage an action chunk names is read in the step's critical section.

Deadlines (`DeadlineMonitor`, core/serving.py): in timer mode tick k is scheduled at origin +
k * period on the timer's clock. A tick misses its deadline when its step has not committed `deadline_s` after the
tick's scheduled time, or when it never ran: an executor more than a period late makes rcl skip
ticks, and every skipped tick counts as a miss. A tick with no fresh observation steps nothing;
it is counted as stale (or idle before the first observation), not as a miss. In observation mode
the deadline runs from the observation's receipt to the committed step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import deque
from typing import NamedTuple

import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.serialization import deserialize_message
try:
    from rclpy.timer import TimerInfo
except ImportError:     # an rclpy older than TimerInfo: tick times from time_until_next_call
    TimerInfo = None
from rclpy.qos import (QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from flashrt_ros.ros.executors import PolicyExecutor
from flashrt_ros.msg import ActionChunk, CapsuleEvent, CapsuleInfo, Observation, PolicyStatus
from flashrt_ros.ros.operations import OPERATIONS
from flashrt_ros.ros.stamps import ns_to_s, s_to_duration, s_to_ns, s_to_stamp, stamp_to_s

from flashrt_ros.core.bringup import LatePlans, Phases
from flashrt_ros.core.checkpoint import resolve_model
from flashrt_ros.core.exceptions import (CapsuleConflict, ConfigError, FlashRTError, InputError,
                                         NotConfiguredError, StorageError)
from flashrt_ros.ros.publishing import LATCHED
from flashrt_ros.ros.params import (configs_from_values, constraint, parameter_table,
                                    unknown_parameters)
from flashrt_ros.core.runtime import PolicyRuntime
from flashrt_ros.core.serving import (BoundaryLock, DeadlineMonitor, pin_torch_threads,
                                      set_thread_nice, warm_up)
from flashrt_ros.capsules.store import make_store

NODE_NAME = "flashrt_policy"
# one executor thread per callback group (control, capsule, instruction, disk, default): each can
# run while the others wait
EXECUTOR_THREADS = 5
# An observation stamped further ahead of the node's clock than this is refused: it would become
# the ordering reference and every correctly stamped observation after it would look out of order.
FUTURE_STAMP_TOLERANCE_S = 1.0
# The late plans (core/bringup.py) wait for the first action, at most this long after configure
LATE_PLANS_HOLD_S = 5.0
# After the lifecycle shutdown transition the process ends: main() checks for it this often, and
# serves this long after it before it ends.
FINALIZED_POLL_S = 0.1
FINALIZED_LINGER_S = 0.5
RELIABLE = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                      history=QoSHistoryPolicy.KEEP_LAST)
# Services answer many clients through one response writer: with the default KEEP_LAST 10, a
# storm of calls from other clients can overwrite a response a slow client has not acknowledged
# yet, and that client never gets its answer (seen under a 10k-call storm on 2 cores).
SERVICE_QOS = QoSProfile(depth=1000, reliability=QoSReliabilityPolicy.RELIABLE,
                         history=QoSHistoryPolicy.KEEP_LAST)
EVENTS_QOS = QoSProfile(depth=1000, reliability=QoSReliabilityPolicy.RELIABLE,
                        durability=QoSDurabilityPolicy.VOLATILE)


# The loaded model's shapes, readable as read-only parameters once the node is configured (and in
# every ~/status).
MODEL_SHAPE = {"obs_dim": "observation size (Observation.state length)",
               "action_dim": "action size (ActionChunk.action_dim)",
               "horizon": "rows of an action chunk (ActionChunk.horizon)"}


class Latest(NamedTuple):
    """The latest accepted observation."""
    obs: np.ndarray          # [obs_dim] float32
    header: object           # std_msgs/Header of the message
    received_ns: int         # time.monotonic_ns() at receipt
    reset: bool              # reset the episode before stepping on it (applied once)


class PolicyNode(LifecycleNode):
    def __init__(self, **kwargs):
        # a set of an undeclared name reaches _on_set_parameters, which refuses it with the
        # closest declared name (rclpy's own refusal names none)
        kwargs.setdefault("allow_undeclared_parameters", True)
        super().__init__(NODE_NAME, **kwargs)
        self._fixed = {}
        self._threads = 0                      # torch CPU threads (0 = torch's default)
        self._nice_before = None               # the nice value before configure set one
        for name, default, help_text, fixed, _ in parameter_table():
            self._declare(name, default, help_text, fixed)
            self._fixed[name] = fixed
        # overrides (params file, -p) of names this node does not declare would be ignored:
        # configure refuses them (overrides are read at start: fix them and restart)
        self._unknown_overrides = unknown_parameters(
            getattr(self, "_parameter_overrides", {}), self._parameters_known())
        if self._unknown_overrides:
            self.get_logger().error(f"unknown parameter(s) in the params file or -p overrides: "
                                    f"{self._unknown_overrides}; configure refuses to run with "
                                    f"them - fix the names and restart the node")
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.finalized = threading.Event()      # set by the shutdown transition
        self.runtime: PolicyRuntime | None = None
        self.store = None
        self.node_cfg = None
        # bring-up: the time of each phase, and the late plans (core/bringup.py)
        self.bringup = Phases()
        self.bringup.mark("node")
        self.late: LatePlans | None = None
        self.active = False
        self.state_label = "unconfigured"
        self._latest: Latest | None = None
        self._last_obs_stamp = 0.0
        self._step_ms = deque(maxlen=1000)     # durations of the last 1000 steps (ms)
        self.deadlines = DeadlineMonitor(1, 1)
        self._stale = self._idle = self._rejected = 0
        self._last_error = ""
        self._control = MutuallyExclusiveCallbackGroup()
        self._capsule = MutuallyExclusiveCallbackGroup()
        self._instruction = MutuallyExclusiveCallbackGroup()
        self._disk = MutuallyExclusiveCallbackGroup()
        self.control_timer = None
        self.sub_obs = self.sub_instr = self.sub_joints = None
        self.pub_command = None
        self._make_services()
        self.pub_events = self.create_publisher(CapsuleEvent, "~/capsule_events", EVENTS_QOS)
        self.pub_status = self.create_publisher(PolicyStatus, "~/status", RELIABLE)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", RELIABLE)
        self.pub_action = self.create_publisher(ActionChunk, "~/action", RELIABLE)
        rate = self.get_parameter("status_rate_hz").value
        rate = rate if isinstance(rate, (int, float)) and 0 < rate <= 100 else 2.0
        self.status_timer = self.create_timer(1.0 / rate, self._publish_status)

    # -- parameters -----------------------------------------------------------------------
    def _declare(self, name, default, help_text, fixed):
        """Declare a parameter of the table, with its constraint in the descriptor (what `ros2
        param describe` shows). An override the descriptor refuses (a value out of range, a
        wrong type) must not kill the node at start: the parameter is then declared without the
        check, keeps that value, and configure refuses it with the dataclass's reason."""
        c = constraint(name)
        # floats take integers too (`control_rate_hz: 30` in YAML); configure checks the type
        desc = ParameterDescriptor(
            description=help_text + (" [fixed while configured]" if fixed else ""),
            additional_constraints=c.text(), dynamic_typing=isinstance(default, float))
        if c.low is not None and isinstance(default, float):
            desc.floating_point_range = [FloatingPointRange(from_value=float(c.low),
                                                            to_value=float(c.high))]
        elif c.low is not None and isinstance(default, int) and not isinstance(default, bool):
            desc.integer_range = [IntegerRange(from_value=int(c.low), to_value=int(c.high))]
        if isinstance(default, list) and not default:
            # an empty list has no type of its own (rclpy would make it a byte array), and a
            # parameter declared without a value makes every get_parameters that names it
            # answer no values at all (rclpy 9.1: `ros2 param dump` prints nothing): declared
            # as a string array, then given its empty value unless an override set one
            default = Parameter.Type.STRING_ARRAY
        try:
            self.declare_parameter(name, default, desc)
        except (InvalidParameterTypeException, InvalidParameterValueException) as e:
            self.get_logger().error(f"{name}: {e}; configure will refuse it until it is set")
            loose = ParameterDescriptor(description=desc.description, dynamic_typing=True,
                                        additional_constraints=desc.additional_constraints)
            default = [] if default is Parameter.Type.STRING_ARRAY else default
            self.declare_parameter(name, default, loose)
        if default is Parameter.Type.STRING_ARRAY and self.get_parameter_or(name).value is None:
            self.set_parameters([Parameter(name, Parameter.Type.STRING_ARRAY, [])])

    def _parameters_known(self) -> set:
        """Names a parameter of this node may have: the table, the model's shapes, rclpy's own."""
        return ({name for name, *_ in parameter_table()} | set(MODEL_SHAPE)
                | set(self.get_parameters_by_prefix("")))

    def _param_values(self) -> dict:
        out = {}
        for name, *_ in parameter_table():
            v = self.get_parameter(name).value
            out[name] = list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v
        return out

    def _on_set_parameters(self, params) -> SetParametersResult:
        unknown = unknown_parameters([p.name for p in params], self._parameters_known())
        if unknown:
            return SetParametersResult(successful=False, reason=(
                f"{unknown}: not a parameter of this node, nothing set; `ros2 param list "
                f"{self.get_fully_qualified_name()}` lists them"))
        # a parameter without a value would make every get_parameters that names it answer
        # nothing (see __init__), and configure needs them all: `ros2 param delete` is refused
        unset = [p.name for p in params if p.type_ == Parameter.Type.NOT_SET]
        if unset:
            return SetParametersResult(successful=False, reason=(
                f"{', '.join(unset)}: expected a value, found none (a delete); the node needs "
                f"every parameter - set one instead (its default: `flashrt-ros params`)"))
        if self.runtime is None:      # unconfigured: anything goes; configure validates
            return SetParametersResult(successful=True)
        fixed = [p.name for p in params if self._fixed.get(p.name)]
        if fixed:
            return SetParametersResult(successful=False, reason=(
                f"{', '.join(fixed)}: fixed while the node is {self.state_label} (they fix "
                f"captured shapes, allocations or the control loop); deactivate, cleanup, set "
                f"them, configure again"))
        values = self._param_values()
        values.update({p.name: (list(p.value) if hasattr(p.value, "tolist") else p.value)
                       for p in params})
        try:
            node_cfg, _, store_cfg = configs_from_values(values)
            store_cfg.resolve_tier(None, self.store.cuda)   # a default tier this runtime has
        except ConfigError as e:
            return SetParametersResult(successful=False, reason=str(e))
        self.node_cfg = node_cfg                    # stale_observation_s applies at once
        store = self.store
        with store.lock:                            # budgets, default tier, eviction at once
            store.cfg = dataclasses.replace(store_cfg, capsule_dir=store.cfg.capsule_dir)
        later = [p.name for p in params if p.name in ("instruction", "store.capsule_dir",
                                                      "runtime.sample_seed")]
        if later:
            self.get_logger().info(f"{', '.join(later)} set; takes effect at the next configure")
        return SetParametersResult(successful=True)

    # -- lifecycle ------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        log = self.get_logger()
        # this configure's phases; the interpreter's age at node creation stays
        phases = Phases({"node": self.bringup.marks["node"]})
        phase = phases.phase
        try:
            if self._unknown_overrides:
                raise ConfigError(f"unknown parameter(s) in the params file or -p overrides: "
                                  f"{self._unknown_overrides}; this node has no such parameter "
                                  f"and would ignore the value - fix the names (`flashrt-ros "
                                  f"params` lists every parameter) and restart the node")
            node_cfg, rt_cfg, store_cfg = configs_from_values(self._param_values())
            with phase("model"):
                model_dir = resolve_model(node_cfg.model, say=log.info)
            model_cfg = model_dir.cfg
            self._check_joints(node_cfg, model_cfg)
            self._check_model_shape(model_cfg)
            with phase("resolve"):      # CUDA context, compile cache, fla's import
                resolved = rt_cfg.resolve(model_cfg)    # every "auto" made concrete, once
            if resolved.compile_cache:
                log.info(f"compile cache {resolved.compile_cache}")
            late = node_cfg.capture_prefill == "background"
            self._threads = resolved.threads
            self._pin_torch_threads()
            if node_cfg.nice:
                self._nice_before = set_thread_nice(node_cfg.nice)
                log.info(f"nice {node_cfg.nice} for the node's threads")
            log.info(f"configuring: model {node_cfg.model}, device {resolved.device} "
                     f"(kernels {resolved.kernels}), "
                     f"{node_cfg.control_mode} control at {node_cfg.control_rate_hz:g} Hz, "
                     f"{torch.get_num_threads()} torch CPU thread(s)")
            # a BoundaryLock: fair to capsule calls (see the module docstring)
            with phase("runtime"):
                rt = PolicyRuntime(runtime_cfg=rt_cfg, progress=log.info, model_dir=model_dir,
                                   lock=BoundaryLock(), late_plans=late)
            untrained = rt.model.untrained
            if "heads" in untrained:
                log.warning(f"the {' and '.join(untrained)} of model {model_cfg.name!r} "
                            f"{'are' if len(untrained) > 1 else 'is'} drawn from the seed, not "
                            f"trained: its actions mean nothing")
            elif untrained:
                log.info(f"the backbone of model {model_cfg.name!r} is drawn from the seed; its "
                         f"heads were trained on that backbone")
            if node_cfg.instruction:
                with phase("instruction"):
                    n = rt.set_instruction(node_cfg.instruction)
                log.info(f"instruction prefilled: {n} tokens")
            if node_cfg.warm_up:
                with phase("warm-up"):
                    took = warm_up(rt, prefill=not late)
                log.info(f"warm-up: every {'step ' if late else ''}plan ran once in {took:.2f} s; "
                         f"state put back")
            with phase("store"):
                store = make_store(rt, store_cfg)
            for skipped in store.skipped_files:
                log.warning(f"capsule directory: skipped {skipped}")
        except Exception as e:  # noqa: BLE001 - a bad configuration must not kill the node
            self._restore_nice()
            what = str(e) if isinstance(e, FlashRTError) else f"{type(e).__name__}: {e}"
            log.error(f"configure failed: {what}. The node stays unconfigured: fix the "
                      f"parameter and configure again")
            return TransitionCallbackReturn.FAILURE
        self._declare_model_shape(model_cfg)
        self.node_cfg, self.runtime, self.store = node_cfg, rt, store
        self.bringup = phases
        self.late = LatePlans(rt, say=log.info, threads=self._threads) if late else None
        if self.late is not None and self.late.order:
            # from now on, also while the node waits for activate: an instruction waits for
            # the plans it runs, so they must come without a step or an activation
            log.info(f"capturing {len(self.late.order)} prefill plans in the background, "
                     f"between steps, from the first action on")
            self.late.start(hold_s=LATE_PLANS_HOLD_S)
        obs_qos = qos_profile_sensor_data if node_cfg.observation_qos == "sensor_data" else RELIABLE
        self.sub_obs = self.create_subscription(Observation, "~/observation", self._on_observation,
                                                obs_qos, callback_group=self._control)
        # latched: an instruction published just before this subscription matched still comes;
        # raw (serialized): an oversized one is refused by its length before it becomes a str
        self.sub_instr = self.create_subscription(String, "~/instruction", self._on_instruction,
                                                  LATCHED, callback_group=self._instruction,
                                                  raw=True)
        if node_cfg.joint_names:
            self.sub_joints = self.create_subscription(JointState, "joint_states",
                                                       self._on_joint_state, obs_qos,
                                                       callback_group=self._control)
        if node_cfg.command_output == "float64_multi_array":
            self.pub_command = self.create_publisher(Float64MultiArray, "~/command", RELIABLE)
        elif node_cfg.command_output == "joint_trajectory":
            self.pub_command = self.create_publisher(JointTrajectory, "~/joint_trajectory", RELIABLE)
        self.state_label = "inactive"
        log.info(f"configured: {rt.describe()['arena_bytes'] / 2**20:.2f} MiB state arena, "
                 f"capsule dir {store.cfg.capsule_dir}, {len(store.capsules)} capsule(s) on disk, "
                 f"default tier {store.cfg.resolve_tier(None, store.cuda)}")
        return TransitionCallbackReturn.SUCCESS

    def _pin_torch_threads(self):
        """`runtime.threads` in the calling executor thread (serving.pin_torch_threads says why
        every thread that steps needs it)."""
        pin_torch_threads(self._threads)

    def _check_model_shape(self, model_cfg):
        """A later configure must load a model of the shapes the read-only parameters declared:
        ROS never changes a read-only parameter, and they must not lie."""
        declared = {name: self.get_parameter(name).value for name in MODEL_SHAPE
                    if self.has_parameter(name)}
        found = {name: getattr(model_cfg, name) for name in declared}
        if declared != found:
            raise ConfigError(f"model: expected a model of the shapes this process declared as "
                              f"read-only parameters at its first configure ({declared}), found "
                              f"{found} in model {model_cfg.name!r}; restart the node to serve a "
                              f"model of other shapes")

    def _declare_model_shape(self, model_cfg):
        """`obs_dim`, `action_dim`, `horizon` of the loaded model as read-only parameters (at the
        first configure; a params file's values for them are ignored: the model says)."""
        for name, help_text in MODEL_SHAPE.items():
            if not self.has_parameter(name):
                self.declare_parameter(name, int(getattr(model_cfg, name)), ParameterDescriptor(
                    description=f"{help_text} of the loaded model (read-only: set at the first "
                                f"configure from the model)", read_only=True),
                    ignore_override=True)

    @staticmethod
    def _check_joints(node_cfg, model_cfg):
        n = len(node_cfg.joint_names)
        if n and model_cfg.obs_dim not in (n, 2 * n):
            raise ConfigError(f"joint_names: expected obs_dim ({model_cfg.obs_dim}) or half of it "
                              f"joint names (positions, or positions then velocities) for model "
                              f"{model_cfg.name!r}, found {n}")
        if node_cfg.command_output == "joint_trajectory" and n > model_cfg.action_dim:
            raise ConfigError(f"joint_names: expected at most action_dim ({model_cfg.action_dim}) "
                              f"joints for command_output joint_trajectory, found {n}")

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        cfg = self.node_cfg
        self._latest, self._last_obs_stamp = None, 0.0
        period_ns = s_to_ns(cfg.period_s)
        self.deadlines = DeadlineMonitor(period_ns, s_to_ns(cfg.deadline_s))
        if cfg.control_mode == "timer":
            if TimerInfo is None:
                callback = self._on_tick
            else:
                def callback(info):
                    self._on_tick(info)
                # rclpy passes a TimerInfo (the tick's scheduled time, from rcl) to a parameter
                # annotated with the class itself; this module's annotations are strings
                callback.__annotations__["info"] = TimerInfo
            self.control_timer = self.create_timer(cfg.period_s, callback,
                                                   callback_group=self._control)
            t = self.control_timer
            self.deadlines.start(t.clock.now().nanoseconds + t.time_until_next_call() - period_ns)
        self.active = True
        self.state_label = "active"
        self.bringup.mark("active")
        self.get_logger().info(f"active: stepping the policy ({self.bringup.text()})")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = False
        self._destroy_control_timer()
        self.state_label = "inactive"
        self.get_logger().info("inactive: stepping stopped; capsule services remain available")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.state_label = "unconfigured"
        self.get_logger().info("unconfigured: runtime and memory capsules dropped")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = False
        self._teardown()
        self.state_label = "finalized"
        self.get_logger().info("finalized: the process ends")
        self.finalized.set()          # main() stops spinning (a finalized node serves nothing)
        return TransitionCallbackReturn.SUCCESS

    def _destroy_control_timer(self):
        if self.control_timer is not None:
            self.destroy_timer(self.control_timer)
            self.control_timer = None

    def _teardown(self):
        self._destroy_control_timer()
        if self.late is not None:
            if not self.late.stop(timeout=0):
                self.get_logger().info("waiting for the late plan in progress to finish")
                self.late.stop()
            self.late = None
        for attr in ("sub_obs", "sub_instr", "sub_joints"):
            sub = getattr(self, attr)
            if sub is not None:
                self.destroy_subscription(sub)
                setattr(self, attr, None)
        if self.pub_command is not None:
            self.destroy_publisher(self.pub_command)
            self.pub_command = None
        rt, store = self.runtime, self.store
        if rt is not None and store is not None:
            with store.lock, rt.lock:         # let a call or step in flight finish first
                self.runtime = self.store = None
        self.runtime = self.store = None
        self._restore_nice()

    def _restore_nice(self):
        if self._nice_before is not None:
            with contextlib.suppress(ConfigError):   # raising nice back never needs a privilege
                set_thread_nice(self._nice_before)
            self._nice_before = None
        self._latest = None

    # -- control loop ---------------------------------------------------------------------
    def _on_observation(self, msg: Observation):
        self._take_observation(np.asarray(msg.state, dtype=np.float32), msg.header,
                               bool(msg.reset_episode))

    def _on_joint_state(self, msg: JointState):
        names = self.node_cfg.joint_names
        index = {n: i for i, n in enumerate(msg.name)}
        missing = [n for n in names if n not in index]
        if missing or len(msg.position) != len(msg.name):
            self._reject(f"joint_states: expected joints {list(names)} with positions, missing "
                         f"{missing}, {len(msg.position)} positions for {len(msg.name)} names")
            return
        values = [msg.position[index[n]] for n in names]
        rt = self.runtime
        if rt is not None and rt.model_cfg.obs_dim == 2 * len(names):
            if len(msg.velocity) != len(msg.name):
                self._reject(f"joint_states: obs_dim {rt.model_cfg.obs_dim} needs positions and "
                             f"velocities of {len(names)} joints, found {len(msg.velocity)} "
                             f"velocities for {len(msg.name)} names")
                return
            values += [msg.velocity[index[n]] for n in names]
        self._take_observation(np.asarray(values, dtype=np.float32), msg.header, False)

    def _take_observation(self, obs, header, reset):
        """Accept an observation for the next step, or refuse it whole: a refused observation
        applies nothing (no reset, no new ordering reference, the latest good one stays)."""
        if self.runtime is None or not self.active:
            return
        try:
            self.runtime.check_observation(obs)
        except FlashRTError as e:
            self._reject(f"{e}{'; its reset_episode was not applied' if reset else ''}")
            return
        stamp = stamp_to_s(header.stamp)
        if stamp:
            now = ns_to_s(self.get_clock().now().nanoseconds)
            if now and stamp - now > FUTURE_STAMP_TOLERANCE_S:
                self._reject(f"observation: expected a stamp at most {FUTURE_STAMP_TOLERANCE_S:g} s "
                             f"ahead of the node's clock ({now:.6f}), found {stamp:.6f}; dropped "
                             f"(check the sender's clock)")
                return
            if stamp < self._last_obs_stamp:
                self._reject(f"observation: stamp {stamp:.6f} is older than the last one "
                             f"({self._last_obs_stamp:.6f}); out-of-order observation dropped")
                return
            limit = self.node_cfg.stale_observation_s
            if limit and ns_to_s(self.get_clock().now().nanoseconds) - stamp > limit:
                self._stale += 1
                return
            self._last_obs_stamp = stamp
        latest = Latest(obs, header, time.monotonic_ns(), reset)
        if self.node_cfg.control_mode == "observation":
            self._step(latest, latest.received_ns, time.monotonic_ns)
        else:
            self._latest = latest

    def _on_tick(self, info=None):
        timer = self.control_timer
        if timer is None:
            return
        if info is not None:
            scheduled = info.expected_call_time.nanoseconds
        else:   # rclpy without TimerInfo: rcl has already moved the next call one period on
            now, until = timer.clock.now().nanoseconds, timer.time_until_next_call()
            scheduled = now + until - self.deadlines.period_ns if until is not None else now
        self.deadlines.tick(scheduled)
        latest = self._latest
        if latest is None:
            self._idle += 1
            return
        limit = self.node_cfg.stale_observation_s
        if limit and time.monotonic_ns() - latest.received_ns > limit * 1e9:
            self._stale += 1
            return
        if latest.reset:        # the latest observation is stepped on every tick; reset once
            self._latest = latest._replace(reset=False)
        self._step(latest, scheduled, lambda: timer.clock.now().nanoseconds)

    def _step(self, latest: Latest, scheduled_ns: int, clock_ns):
        rt, store = self.runtime, self.store
        if rt is None:
            return
        self._pin_torch_threads()
        try:
            with rt.lock.step():
                t0 = time.perf_counter()
                if latest.reset:
                    rt.reset(keep_context=True)
                    store.on_reset()        # takes runtime.lock only: never waits for a save
                action = rt.step(latest.obs)
                step, episode, lineage = rt.step_count, rt.episode, store.lineage
                t1 = time.perf_counter()
        except FlashRTError as e:
            self._reject(str(e))
            return
        except Exception as e:  # noqa: BLE001 - a bug must not take the control loop down
            self._reject(f"step: internal error {type(e).__name__}: {e}")
            return
        self.deadlines.commit(scheduled_ns, clock_ns())
        self._step_ms.append((t1 - t0) * 1e3)
        out = ActionChunk()
        out.header.stamp = self.get_clock().now().to_msg()
        out.header.frame_id = latest.header.frame_id
        out.step, out.episode_id = step, episode
        out.horizon, out.action_dim = action.shape
        out.data = action.reshape(-1).tolist()
        out.observation_stamp = latest.header.stamp
        out.capsule_lineage = lineage
        out.latency_ms = float((time.monotonic_ns() - latest.received_ns) * 1e-6)
        self.pub_action.publish(out)
        if self.pub_command is not None:
            self._publish_command(action)
        if "first action" not in self.bringup.marks:
            self.get_logger().info(f"first action {self.bringup.mark('first action'):.2f} s "
                                   f"after the interpreter started")
            if self.late is not None:
                self.late.release()

    def _publish_command(self, action):
        if self.node_cfg.command_output == "float64_multi_array":
            self.pub_command.publish(Float64MultiArray(data=action[0].astype(float).tolist()))
            return
        traj = JointTrajectory()
        traj.header.stamp = self.get_clock().now().to_msg()
        traj.joint_names = list(self.node_cfg.joint_names)
        dt = self.node_cfg.action_dt or self.node_cfg.period_s
        n = len(traj.joint_names)
        for i, row in enumerate(action):
            p = JointTrajectoryPoint(positions=row[:n].astype(float).tolist())
            p.time_from_start = s_to_duration((i + 1) * dt)
            traj.points.append(p)
        self.pub_command.publish(traj)

    def _on_instruction(self, raw: bytes):
        """A serialized std_msgs/String. Its text's length is read from the CDR (after the
        4-byte encapsulation header, a uint32 that counts the closing NUL): a text of more UTF-8
        bytes than 4 per character the runtime takes is refused before it is decoded (decoding
        30 MB holds the GIL about 60 ms: two control periods at 30 Hz)."""
        rt, store = self.runtime, self.store
        if rt is None:
            self.get_logger().warning("instruction ignored: the node is not configured")
            return
        self._pin_torch_threads()
        try:
            nbytes = int.from_bytes(raw[4:8], "little" if raw[1] & 1 else "big") - 1
            if nbytes > 4 * rt.max_instruction_chars:
                raise InputError(f"instruction: expected at most {rt.max_instruction_chars} "
                                 f"characters (the context's tokens; at most "
                                 f"{4 * rt.max_instruction_chars} bytes of UTF-8), found "
                                 f"{nbytes} bytes; shorten the instruction")
            text = deserialize_message(raw, String).data
            tokens = rt.instruction_tokens(text)     # refused now, not after a wait
            late = self.late
            if late is not None:      # before any lock: steps go on while it waits
                late.wait_for_instruction(len(tokens), say=self.get_logger().info)
            with late.kernels(say=self.get_logger().info) if late is not None else \
                    contextlib.nullcontext(), store.lock, rt.lock:
                n = rt.set_instruction(tokens)
                store.on_reset()
            self.get_logger().info(f"instruction prefilled: {n} tokens, episode {rt.episode}")
        except FlashRTError as e:
            self._reject(f"instruction refused: {e}")

    def _reject(self, why: str):
        self._rejected += 1
        self._last_error = why
        self.get_logger().warning(why, throttle_duration_sec=1.0)

    # -- status ---------------------------------------------------------------------------
    def _publish_status(self):
        rt, store = self.runtime, self.store
        s = PolicyStatus()
        s.header.stamp = self.get_clock().now().to_msg()
        s.lifecycle_state = self.state_label
        dl = self.deadlines
        s.deadline_misses, s.stale_observations = dl.misses, self._stale
        s.rejected_inputs = self._rejected
        if rt is not None and store is not None:
            s.device, s.preset = str(rt.device), rt.model_cfg.name
            s.obs_dim, s.action_dim, s.horizon = (getattr(rt.model_cfg, n) for n in MODEL_SHAPE)
            s.step, s.position, s.episode_id = rt.step_count, rt.position, rt.episode
            s.capsule_lineage = store.lineage
            late = self.late
            s.bringup = late.progress() if late is not None else "ready"
            lat = np.asarray(self._step_ms, dtype=np.float64)
            if lat.size:
                s.last_step_ms = float(lat[-1])
                s.p50_step_ms, s.p99_step_ms = (float(x) for x in np.percentile(lat, [50, 99]))
            usage = store.usage()
            s.capsules = sum(u["count"] for u in usage.values())
            s.gpu_bytes, s.host_bytes, s.disk_bytes = (usage[t]["used"] for t in ("gpu", "host", "disk"))
            s.gpu_budget, s.host_budget, s.disk_budget = (usage[t]["budget"] for t in ("gpu", "host", "disk"))
        self.pub_status.publish(s)
        late = np.asarray(dl.lateness_ms, dtype=np.float64)
        lat_p50, lat_p99 = np.percentile(late, [50, 99]) if late.size else (0.0, 0.0)
        st = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: policy",
                              hardware_id=s.device or "unconfigured")
        st.level = DiagnosticStatus.OK if dl.misses == 0 else DiagnosticStatus.WARN
        st.message = f"{self.state_label}, step {s.step}" + (
            f", {dl.misses} deadline misses" if dl.misses else "")
        kv = {"step": s.step, "position": s.position, "episode": s.episode_id,
              "p50_step_ms": f"{s.p50_step_ms:.3f}", "p99_step_ms": f"{s.p99_step_ms:.3f}",
              "deadline_misses": dl.misses, "late_steps": dl.late, "skipped_ticks": dl.skipped,
              "ticks": dl.ticks, "max_lateness_ms": f"{dl.max_lateness_ns * 1e-6:.3f}",
              "p50_lateness_ms": f"{lat_p50:.3f}", "p99_lateness_ms": f"{lat_p99:.3f}",
              "stale_observations": self._stale, "idle_ticks": self._idle,
              "rejected_inputs": self._rejected, "capsules": s.capsules,
              "gpu_bytes": f"{s.gpu_bytes}/{s.gpu_budget}", "host_bytes": f"{s.host_bytes}/{s.host_budget}",
              "disk_bytes": f"{s.disk_bytes}/{s.disk_budget}", "last_error": self._last_error,
              "bringup": s.bringup}
        kv.update({f"bringup.{k}": v for k, v in self.bringup.values().items()})
        late = self.late
        if late is not None:
            kv.update({f"late.{k}": v for k, v in late.values().items()})
        st.values = [KeyValue(key=k, value=str(v)) for k, v in kv.items()]
        self.pub_diag.publish(DiagnosticArray(header=s.header, status=[st]))

    # -- capsule services -----------------------------------------------------------------
    def _make_services(self):
        """One service per operation of the capsule-operation table (flashrt_ros.ros.operations):
        handled by `_srv_<operation>`, on the disk group if it does file I/O, else the capsule group."""
        self.capsule_services = [
            self.create_service(op.srv_type, f"~/{op.service}",
                                self._guarded(op, getattr(self, f"_srv_{op.name}")),
                                qos_profile=SERVICE_QOS,
                                callback_group=self._disk if op.file_io else self._capsule)
            for op in OPERATIONS]

    def _guarded(self, op, handler):
        """Run operation `op`'s handler under store.lock; turn every failure into success=false;
        emit its CapsuleEvent (and those of evictions), unless it is a query."""
        name = op.name

        def callback(request, response):
            t0 = time.perf_counter()
            event = CapsuleEvent(operation=name)
            rt, store = self.runtime, self.store
            evicted = []
            try:
                if rt is None or store is None:
                    raise NotConfiguredError(
                        f"{name}: the node is {self.state_label}; expected a configured node - "
                        f"configure it first (lifecycle transition 'configure', e.g. "
                        f"`flashrt-ros lifecycle configure`)")
                with store.lock:
                    before = {n: c.tier for n, c in store.capsules.items()}
                    handler(rt, store, request, response, event)
                    evicted = self._evictions(store, before, event.name)
                response.success = True
                response.message = response.message or "ok"
            except FlashRTError as e:
                response.success, response.message = False, str(e)
                if isinstance(e, (StorageError, CapsuleConflict)):    # the directory's fault
                    self.get_logger().warning(f"{name}: {e}")
            except Exception as e:  # noqa: BLE001 - a bug must not take the node down
                self.get_logger().error(f"{name}: unexpected error {type(e).__name__}: {e}")
                response.success = False
                response.message = f"{name}: internal error {type(e).__name__}: {e}"
            ms = (time.perf_counter() - t0) * 1e3
            if hasattr(response, "latency_ms"):
                response.latency_ms = float(ms)
            event.success, event.message, event.latency_ms = response.success, response.message, ms
            if not op.query:          # a query reports nothing
                for ev in evicted:
                    self._emit(ev, rt)
                self._emit(event, rt)
            return response
        return callback

    @staticmethod
    def _evictions(store, before: dict, named: str) -> list:
        """CapsuleEvents for capsules the store demoted or dropped to make room during a call."""
        out = []
        for name, tier in before.items():
            cap = store.capsules.get(name)
            if name == named or (cap is not None and cap.tier == tier):
                continue
            where = f"{tier} -> {cap.tier}" if cap is not None else f"dropped from {tier}"
            out.append(CapsuleEvent(operation="evict", name=name, source=tier,
                                    tier=cap.tier if cap is not None else "", success=True,
                                    message=f"evicted {name!r} ({where}) to make room"))
        return out

    def _emit(self, event: CapsuleEvent, rt):
        event.header.stamp = self.get_clock().now().to_msg()
        if rt is not None:
            event.step, event.position = rt.step_count, rt.position
        self.pub_events.publish(event)

    @staticmethod
    def _info(cap) -> CapsuleInfo:
        info = CapsuleInfo(name=cap.name, parent=cap.parent, step=cap.step, position=cap.position,
                           tier=cap.tier, nbytes=cap.nbytes, pinned=cap.pinned, file=cap.file,
                           fingerprint=cap.fingerprint, digest=cap.digest)
        info.created = s_to_stamp(cap.created)
        return info

    def _srv_snapshot(self, rt, store, req, res, ev):
        ev.name, ev.tier, ev.pin = req.name, req.tier, req.pin
        cap = store.snapshot(req.name, tier=req.tier or None, pin=req.pin)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"snapshot {cap.name!r}: step {cap.step}, {cap.nbytes} bytes in {cap.tier}"

    def _srv_restore(self, rt, store, req, res, ev):
        ev.name = req.name
        # at one boundary: the store copies and sets the lineage under runtime.lock (a disk
        # capsule's file is read and verified before it takes the lock)
        cap = store.restore(req.name)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"restored {cap.name!r}: step {cap.step}, position {cap.position}"

    def _srv_fork(self, rt, store, req, res, ev):
        ev.name, ev.source, ev.switch_to = req.name, req.source, req.switch_to
        # one store operation: a branch of the live state is snapshotted and switched to at one
        # boundary (store.fork holds runtime.lock across both)
        cap = store.fork(req.source, req.name, switch_to=req.switch_to, tier=req.tier or None)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"forked {req.source or '<live>'!r} -> {cap.name!r}" + \
            (" and switched to it" if req.switch_to else "")

    def _srv_rollback(self, rt, store, req, res, ev):
        ev.k = req.k
        with rt.lock:
            step, position = rt.rollback(int(req.k))
        res.step, res.position = step, position
        res.message = f"rolled back {req.k} step(s) to step {step}"

    def _srv_list(self, rt, store, req, res, ev):
        res.capsules = [self._info(c) for c in store.list(req.tier or None)]
        res.message = f"{len(res.capsules)} capsule(s)"

    def _srv_delete(self, rt, store, req, res, ev):
        """Without delete_file a saved file always stays: a capsule that has one is demoted to
        the disk tier (its memory copy dropped), one that is only on disk is refused. A file the
        store wrote itself to make room (a spill) was never asked for and goes with its capsule."""
        ev.name, ev.delete_file = req.name, req.delete_file
        cap = store.get(req.name)
        kind = cap.file
        if req.delete_file or kind != "saved":
            store.delete(req.name)
            res.message = f"deleted {req.name!r}" + (
                f" and its file {cap.path}" if kind == "saved" else
                f" and the file the store had spilled it to ({cap.path})" if kind == "spill" else "")
        elif cap.tier == "disk":
            raise InputError(f"delete {req.name!r}: the capsule is only on disk ({cap.path}); "
                             f"expected delete_file: true to delete its file - nothing deleted")
        else:
            store.move(req.name, "disk")
            res.message = (f"dropped the memory copy of {req.name!r}; its file {cap.path} stays "
                           f"(listed in the disk tier; delete_file: true deletes it)")
        ev.tier = cap.tier if req.name in store.capsules else ""

    def _srv_reset(self, rt, store, req, res, ev):
        ev.keep_context = req.keep_context
        with rt.lock:
            res.episode_id = rt.reset(keep_context=req.keep_context)
            res.step = rt.step_count
            store.on_reset()
        res.message = (f"reset to {'the instruction context' if req.keep_context else 'an empty context'}"
                       f", episode {res.episode_id}")

    def _srv_save(self, rt, store, req, res, ev):
        ev.name, ev.evict_from_memory = req.name, req.evict_from_memory
        res.path = store.save(req.name, keep_in_memory=not req.evict_from_memory)
        cap = store.get(req.name)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"saved {req.name!r} to {res.path}" + (
            " (memory copy dropped)" if req.evict_from_memory else f", {cap.tier} copy kept")

    def _srv_load(self, rt, store, req, res, ev):
        ev.name, ev.tier, ev.restore = req.name, req.tier, req.restore
        if req.tier == "disk":      # the store reads "disk" as its default memory tier
            raise InputError(f"load_capsule: expected tier gpu, host or '' (the default memory "
                             f"tier), found 'disk'; a load brings a capsule file into memory")
        cap = store.load(req.name, tier=req.tier or None)
        if req.restore:
            cap = store.restore(req.name)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"loaded {req.name!r} into {cap.tier}" + (" and restored it" if req.restore else "")


def main(args=None):
    """Entry point of `flashrt_node` (and `ros2 run flashrt_ros flashrt_node`)."""
    rclpy.init(args=args)
    node = PolicyNode()
    executor = PolicyExecutor(num_threads=EXECUTOR_THREADS)
    executor.add_node(node)
    if not node.get_parameter("managed").value:
        if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()
        else:
            node.get_logger().error("managed:=false but configure failed; the node stays "
                                    "unconfigured (fix the parameters, then `flashrt-ros lifecycle "
                                    "configure` and `activate`)")
    try:
        while rclpy.ok() and not node.finalized.is_set():
            executor.spin_once(timeout_sec=FINALIZED_POLL_S)
        if node.finalized.is_set():
            # the answer to the shutdown call is on the wire; serve a moment longer so that DDS
            # can resend it if it was lost, then end (exit status 0)
            deadline = time.monotonic() + FINALIZED_LINGER_S
            while rclpy.ok() and time.monotonic() < deadline:
                executor.spin_once(timeout_sec=FINALIZED_POLL_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node.late is not None:     # not mid-capture (or mid-autotune) at interpreter exit
            node.late.stop(timeout=10.0)
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()


if __name__ == "__main__":
    main()
