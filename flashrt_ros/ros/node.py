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
  activate   - start stepping (timer or per observation) and publishing actions; a step is
               `rt.step(state)`, or a VLA's `rt.predict_action_chunk(batch)` on the state and
               frames inputs.py joined; outputs.py publishes its chunk and command;
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
  * control group - the inputs' subscriptions (observation, joint states, camera images: see
                    inputs.py), the control timer; a step publishes its outputs (outputs.py)
                    once committed. A step holds `runtime.lock` from the input copy to the
                    committed state, and takes no other lock: the control loop never waits for
                    the store, for disk I/O or for a capsule call other than the copy of live
                    bytes it makes.
  * capsule group - snapshot, restore, fork, rollback, reset, delete, list.
  * instruction group - ~/instruction (instruction.py): an instruction may wait for its prefill
                    plans while they come in the background (core/bringup.py), and the capsule
                    calls go on.
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

Start (`main`): the node is created before the runtime side - torch and the core, most of a
start's time - is imported, so that its DDS participant exists first: peers discover a new
participant up to ~3 s after it appears (Fast DDS on loopback: 0 to 2.8 s, measured), and they do
so while torch imports rather than after configure, when the first observation is due. This
module's top imports only ROS and torch-free modules (core/phases.py, core/serving.py); the
runtime side is imported by `main` right after the node, and where it is used. (A thread that
imported it beside rclpy.init and the node's creation was measured slower on 2 cores: the imports
hold the GIL, so the node came later and the imports ended no sooner.)
"""
from __future__ import annotations

import contextlib
import importlib
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
try:
    from rclpy.timer import TimerInfo
except ImportError:     # an rclpy older than TimerInfo: tick times from time_until_next_call
    TimerInfo = None
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy

from flashrt_ros.core.exceptions import ConfigError, FlashRTError
from flashrt_ros.core.phases import Phases
from flashrt_ros.core.serving import (BoundaryLock, DeadlineMonitor, pin_torch_threads,
                                      set_thread_nice)
from flashrt_ros.msg import CapsuleEvent, PolicyStatus
from flashrt_ros.ros.capsule_services import CapsuleServices
from flashrt_ros.ros.executors import PolicyExecutor
from flashrt_ros.ros.inputs import Inputs
from flashrt_ros.ros.instruction import InstructionInput
from flashrt_ros.ros.outputs import RELIABLE, Outputs
from flashrt_ros.ros.parameters import NodeParameters, model_shape
from flashrt_ros.ros.params import configs_from_values, parameter_table, unknown_parameters
from flashrt_ros.ros.stamps import ns_to_s, s_to_ns, stamp_to_s
from flashrt_ros.ros.status import StatusReporting

if TYPE_CHECKING:       # the runtime side (see the module docstring)
    from flashrt_ros.core.bringup import LatePlans
    from flashrt_ros.core.runtime import PolicyRuntime

NODE_NAME = "flashrt_policy"
# one executor thread per callback group (control, capsule, instruction, disk, default): each can
# run while the others wait
EXECUTOR_THREADS = 5
# An observation stamped further ahead of the node's clock than this is refused: it would become
# the ordering reference and every correctly stamped observation after it would look out of order.
FUTURE_STAMP_TOLERANCE_S = 1.0
# The late plans (core/bringup.py) wait for the first action, at most this long after configure
LATE_PLANS_HOLD_S = 5.0
# What main() imports once the node is created: torch and the core (the rest of the runtime side
# is small, imported by configure)
RUNTIME_SIDE = "flashrt_ros.core.runtime"
# After the lifecycle shutdown transition the process ends: main() checks for it this often, and
# serves this long after it before it ends.
FINALIZED_POLL_S = 0.1
FINALIZED_LINGER_S = 0.5
EVENTS_QOS = QoSProfile(depth=1000, reliability=QoSReliabilityPolicy.RELIABLE,
                        durability=QoSDurabilityPolicy.VOLATILE)


class Latest(NamedTuple):
    """The latest accepted observation."""
    obs: object              # float32 [obs_dim]; a VLA's: a LeRobot batch (ros/inputs.py)
    header: object           # std_msgs/Header of the message
    received_ns: int         # time.monotonic_ns() at receipt
    reset: bool              # reset the episode before stepping on it (applied once)


class PolicyNode(CapsuleServices, InstructionInput, NodeParameters, StatusReporting,
                 LifecycleNode):
    """The policy node; its capsule services, instruction, parameters and status reports are in
    capsule_services.py, instruction.py, parameters.py and status.py, its inputs and outputs in
    inputs.py and outputs.py."""

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
        self.inputs: Inputs | None = None      # the subscriptions of the observation's inputs
        self.sub_instr = None
        self._make_services()
        self.pub_events = self.create_publisher(CapsuleEvent, "~/capsule_events", EVENTS_QOS)
        self.pub_status = self.create_publisher(PolicyStatus, "~/status", RELIABLE)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", RELIABLE)
        self.outputs = Outputs(self)          # ~/action now; the command at configure
        rate = self.get_parameter("status_rate_hz").value
        rate = rate if isinstance(rate, (int, float)) and 0 < rate <= 100 else 2.0
        self.status_timer = self.create_timer(1.0 / rate, self._publish_status)

    # -- lifecycle ------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from flashrt_ros.capsules.store import make_store
        from flashrt_ros.core.bringup import LatePlans
        log = self.get_logger()
        # this configure's phases; the interpreter's age at the start's milestones (node
        # created, runtime side imported) stays
        phases = Phases({n: t for n, t in self.bringup.marks.items() if n in ("node", "imports")})
        phase = phases.phase
        try:
            if self._unknown_overrides:
                raise ConfigError(f"unknown parameter(s) in the params file or -p overrides: "
                                  f"{self._unknown_overrides}; this node has no such parameter "
                                  f"and would ignore the value - fix the names (`flashrt-ros "
                                  f"params` lists every parameter) and restart the node")
            node_cfg, rt_cfg, store_cfg = configs_from_values(self._param_values())
            rt, late = self._build_runtime(node_cfg, rt_cfg, phase)
            model_cfg = rt.model_cfg
            if node_cfg.warm_up:
                with phase("warm-up"):
                    took = rt.warm_up(prefill=not late)
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
        self.inputs = Inputs(self, node_cfg, model_cfg, model_shape(model_cfg)["obs_dim"],
                             self._control, self._take_observation, self._reject, rt.device)
        self._subscribe_instruction()
        self.outputs.configure(node_cfg)
        self.state_label = "inactive"
        log.info(f"configured: {rt.describe()['arena_bytes'] / 2**20:.2f} MiB state arena, "
                 f"capsule dir {store.cfg.capsule_dir}, {len(store.capsules)} capsule(s) on disk, "
                 f"default tier {store.cfg.resolve_tier(None, store.cuda)}")
        return TransitionCallbackReturn.SUCCESS

    def _build_runtime(self, node_cfg, rt_cfg, phase):
        """The runtime `model` names, checked against the node's parameters first: a
        `PolicyRuntime` (a preset or a Qwen3.5 checkpoint), or a `VLARuntime` (a LeRobot SmolVLA
        directory, or a preset that is one). Returns it and whether plans come late."""
        import torch

        from flashrt_ros.core.checkpoint import model_directory
        from flashrt_ros.core.models import read_vla_dir, vla_family
        from flashrt_ros.core.models.qwen3_5.checkpoint_qwen3_5 import resolve_model
        from flashrt_ros.core.runtime import PolicyRuntime
        from flashrt_ros.core.vla_runtime import VLARuntime
        log = self.get_logger()
        directory = model_directory(node_cfg.model)
        family = vla_family(directory) if directory else None
        with phase("model"):
            src = read_vla_dir(directory, family, say=log.info) if family else \
                resolve_model(node_cfg.model, say=log.info)
        model_cfg = src.cfg
        self._check_joints(node_cfg, model_cfg)
        self._check_model_shape(model_cfg)
        if family:
            self._threads, device, late = rt_cfg.threads, rt_cfg.device, False
        else:
            with phase("resolve"):      # CUDA context, compile cache, fla's import
                resolved = rt_cfg.resolve(model_cfg)    # every "auto" made concrete, once
            if resolved.compile_cache:
                log.info(f"compile cache {resolved.compile_cache}")
            self._threads, device = resolved.threads, f"{resolved.device} (kernels {resolved.kernels})"
            late = node_cfg.capture_prefill == "background"
        self._pin_torch_threads()
        if node_cfg.nice:
            self._nice_before = set_thread_nice(node_cfg.nice)
            log.info(f"nice {node_cfg.nice} for the node's threads")
        log.info(f"configuring: model {node_cfg.model}, device {device}, "
                 f"{node_cfg.control_mode} control at {node_cfg.control_rate_hz:g} Hz, "
                 f"{torch.get_num_threads()} torch CPU thread(s)")
        # a BoundaryLock: fair to capsule calls (see the module docstring)
        with phase("runtime"):
            if family:
                rt = VLARuntime(src, rt_cfg, progress=log.info, lock=BoundaryLock())
                log.info(f"serving {family} {model_cfg.name!r}: cameras "
                         f"{', '.join(model_cfg.cameras) or 'none'}, task from ~/instruction")
                return rt, late
            rt = PolicyRuntime(runtime_cfg=rt_cfg, progress=log.info, model_dir=src,
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
        return rt, late

    def _pin_torch_threads(self):
        """`runtime.threads` in the calling executor thread (serving.pin_torch_threads says why
        every thread that steps needs it)."""
        pin_torch_threads(self._threads)

    @staticmethod
    def _check_joints(node_cfg, model_cfg):
        n, obs_dim = len(node_cfg.joint_names), model_shape(model_cfg)["obs_dim"]
        if n and obs_dim not in (n, 2 * n):
            raise ConfigError(f"joint_names: expected obs_dim ({obs_dim}) or half of it "
                              f"joint names (positions, or positions then velocities) for model "
                              f"{model_cfg.name!r}, found {n}")
        if node_cfg.command_output == "joint_trajectory" and n > model_cfg.action_dim:
            raise ConfigError(f"joint_names: expected at most action_dim ({model_cfg.action_dim}) "
                              f"joints for command_output joint_trajectory, found {n}")

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        cfg = self.node_cfg
        self._latest, self._last_obs_stamp = None, 0.0
        self.inputs.clear()
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
        if self.inputs is not None:
            self.inputs.destroy(self)
            self.inputs = None
        self._unsubscribe_instruction()
        self.outputs.cleanup()
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
    def _take_observation(self, obs, header, reset):
        """Accept an observation for the next step, or refuse it whole: a refused observation
        applies nothing (no reset, no new ordering reference, the latest good one stays)."""
        from flashrt_ros.core.runtime import PolicyRuntime
        rt = self.runtime
        if rt is None or not self.active:
            return
        try:
            if isinstance(rt, PolicyRuntime):       # a VLA's batch was checked by its inputs
                rt.check_observation(obs)
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
        from flashrt_ros.core.runtime import PolicyRuntime
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
                action = rt.step(latest.obs) if isinstance(rt, PolicyRuntime) else \
                    rt.predict_action_chunk(latest.obs)
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
        self.outputs.publish(action, latest.header, step, episode, lineage, latest.received_ns)
        if "first action" not in self.bringup.marks:
            self.get_logger().info(f"first action {self.bringup.mark('first action'):.2f} s "
                                   f"after the interpreter started")
            if self.late is not None:
                self.late.release()

    def _reject(self, why: str):
        self._rejected += 1
        self._last_error = why
        self.get_logger().warning(why, throttle_duration_sec=1.0)


def main(args=None):
    """Entry point of `flashrt_node` (and `ros2 run flashrt_ros flashrt_node`): the node first,
    then the runtime side (see the module docstring)."""
    rclpy.init(args=args)
    node = PolicyNode()
    importlib.import_module(RUNTIME_SIDE)
    node.bringup.mark("imports")
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
