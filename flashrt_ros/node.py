"""flashrt_policy: the ROS 2 node that serves a policy and its execution-state capsules.

A thin adapter: all state lives in `PolicyRuntime` (live state) and `CapsuleStore` (capsules);
callbacks read the request, call the core, fill the response. Failures go back as
`success=false` with the core's message; no request can kill the node.

Lifecycle (a managed node; `managed:=false` configures and activates at start):
  configure  - validate parameters, build the runtime (allocate the arena, capture graphs; progress
               in the log), open the capsule store, prefill `instruction`;
  activate   - start stepping (timer or per observation) and publishing;
  deactivate - stop stepping; capsule services keep working on the (frozen) live state;
  cleanup    - drop runtime and store (memory capsules are lost; disk capsules stay);
  shutdown   - as cleanup.

Concurrency (a MultiThreadedExecutor, three mutually exclusive callback groups):
  * control group   - observation / joint-state / instruction subscriptions and the control timer.
                      A step holds `runtime.lock` from input copy to committed state.
  * capsule group   - snapshot, restore, fork, rollback, reset, delete, list. They take
                      `store.lock`, then `runtime.lock` only around the copy of live bytes.
  * disk group      - save and load (file I/O); they hold `store.lock`, never `runtime.lock`
                      while writing, so disk I/O never blocks the control loop.
  * status timer    - default group; reads counters only.
Committed boundary: a capsule call that arrives during a step waits for the step to finish and
is applied before the next one - the `BoundaryGate` makes a pending call take precedence over the
next step (a plain lock is not fair, and a fast observation stream could starve the call).
"""
from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import rclpy
from builtin_interfaces.msg import Time as TimeMsg
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import (QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from flashrt_ros.msg import ActionChunk, CapsuleEvent, CapsuleInfo, Observation, PolicyStatus
from flashrt_ros.srv import (DeleteCapsule, Fork, ListCapsules, LoadCapsule, Reset, Restore,
                             Rollback, SaveCapsule, Snapshot)

from .config import load_preset
from .exceptions import FlashRTError
from .node_config import configs_from_values, parameter_table
from .runtime import PolicyRuntime
from .store import CapsuleStore

NODE_NAME = "flashrt_policy"
RELIABLE = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE,
                      history=QoSHistoryPolicy.KEEP_LAST)
EVENTS_QOS = QoSProfile(depth=100, reliability=QoSReliabilityPolicy.RELIABLE,
                        durability=QoSDurabilityPolicy.VOLATILE)


class BoundaryGate:
    """Capsule calls wait for the step in progress and go before the next step."""

    def __init__(self, lock):
        self.lock = lock
        self._cv = threading.Condition()
        self._pending = 0

    def step_section(self):
        gate = self

        class _Step:
            def __enter__(self):
                with gate._cv:
                    gate._cv.wait_for(lambda: gate._pending == 0)
                gate.lock.acquire()

            def __exit__(self, *exc):
                gate.lock.release()
        return _Step()

    def call_section(self):
        gate = self

        class _Call:
            def __enter__(self):
                with gate._cv:
                    gate._pending += 1

            def __exit__(self, *exc):
                with gate._cv:
                    gate._pending -= 1
                    gate._cv.notify_all()
        return _Call()


def _stamp_to_s(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


class PolicyNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        for name, default, help_text, read_only, _ in parameter_table():
            desc = ParameterDescriptor(description=help_text, read_only=read_only,
                                       dynamic_typing=isinstance(default, float))
            if isinstance(default, list) and not default:
                desc.type = ParameterType.PARAMETER_STRING_ARRAY   # an empty list has no type
            self.declare_parameter(name, default, desc)
        self.runtime: PolicyRuntime | None = None
        self.store: CapsuleStore | None = None
        self.gate: BoundaryGate | None = None
        self.active = False
        self._latest_obs = None        # (np.ndarray, header, receipt time, reset flag)
        self._last_obs_stamp = 0.0
        self._step_ms = deque(maxlen=1000)
        self._deadline_misses = 0
        self._stale = 0
        self._rejected = 0
        self._last_tick = None
        self._last_error = ""
        self._control = MutuallyExclusiveCallbackGroup()
        self._capsule = MutuallyExclusiveCallbackGroup()
        self._disk = MutuallyExclusiveCallbackGroup()
        self._timers = []
        self._make_services()
        self.pub_events = self.create_publisher(CapsuleEvent, "~/capsule_events", EVENTS_QOS)
        self.pub_status = self.create_publisher(PolicyStatus, "~/status", RELIABLE)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", RELIABLE)
        self.pub_action = self.create_publisher(ActionChunk, "~/action", RELIABLE)
        self.pub_command = None
        self.state_label = "unconfigured"

    # -- lifecycle ------------------------------------------------------------------------
    def _param_values(self) -> dict:
        out = {}
        for name, *_ in parameter_table():
            v = self.get_parameter(name).value
            out[name] = list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v
        return out

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            node_cfg, rt_cfg, store_cfg = configs_from_values(self._param_values())
            model_cfg = load_preset(node_cfg.preset)
            self.node_cfg = node_cfg
            log = self.get_logger()
            log.info(f"configuring: preset {node_cfg.preset}, device {rt_cfg.device}, "
                     f"{node_cfg.control_mode} control at {node_cfg.control_rate_hz:g} Hz")
            self.runtime = PolicyRuntime(model_cfg, rt_cfg, progress=log.info)
            self.store = CapsuleStore(self.runtime, store_cfg)
            for skipped in self.store.skipped_files:
                log.warning(f"capsule directory: skipped {skipped}")
            self.gate = BoundaryGate(self.runtime.lock)
            if node_cfg.instruction:
                n = self.runtime.set_instruction(node_cfg.instruction)
                log.info(f"instruction prefilled: {n} tokens")
        except Exception as e:  # noqa: BLE001 - a bad configuration must not kill the node
            what = str(e) if isinstance(e, FlashRTError) else f"{type(e).__name__}: {e}"
            self.get_logger().error(f"configure failed: {what}")
            self.runtime = self.store = None
            return TransitionCallbackReturn.FAILURE
        obs_qos = qos_profile_sensor_data if node_cfg.observation_qos == "sensor_data" else RELIABLE
        self.sub_obs = self.create_subscription(Observation, "~/observation", self._on_observation,
                                                obs_qos, callback_group=self._control)
        self.sub_instr = self.create_subscription(String, "~/instruction", self._on_instruction,
                                                  RELIABLE, callback_group=self._control)
        self.sub_joints = None
        if node_cfg.joint_names:
            self.sub_joints = self.create_subscription(JointState, "joint_states",
                                                       self._on_joint_state, obs_qos,
                                                       callback_group=self._control)
        if node_cfg.command_output == "float64_multi_array":
            self.pub_command = self.create_publisher(Float64MultiArray, "~/command", RELIABLE)
        elif node_cfg.command_output == "joint_trajectory":
            self.pub_command = self.create_publisher(JointTrajectory, "~/joint_trajectory", RELIABLE)
        self._timers.append(self.create_timer(1.0 / node_cfg.status_rate_hz, self._publish_status))
        self.state_label = "inactive"
        self.get_logger().info(f"configured: {self.runtime.describe()['arena_bytes'] / 2**20:.2f} MiB "
                               f"state arena, capsule dir {store_cfg.capsule_dir}, "
                               f"{len(self.store.capsules)} capsule(s) on disk")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = True
        self._last_tick = None
        if self.node_cfg.control_mode == "timer":
            self.control_timer = self.create_timer(self.node_cfg.period_s, self._on_tick,
                                                   callback_group=self._control)
        self.state_label = "active"
        self.get_logger().info("active: stepping the policy")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = False
        if getattr(self, "control_timer", None) is not None:
            self.destroy_timer(self.control_timer)
            self.control_timer = None
        self.state_label = "inactive"
        self.get_logger().info("inactive: stepping stopped; capsule services remain available")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.active = False
        self._teardown()
        self.state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self):
        for attr in ("sub_obs", "sub_instr", "sub_joints"):
            sub = getattr(self, attr, None)
            if sub is not None:
                self.destroy_subscription(sub)
                setattr(self, attr, None)
        for t in self._timers:
            self.destroy_timer(t)
        self._timers = []
        if getattr(self, "control_timer", None) is not None:
            self.destroy_timer(self.control_timer)
            self.control_timer = None
        if self.pub_command is not None:
            self.destroy_publisher(self.pub_command)
            self.pub_command = None
        self.runtime = self.store = self.gate = None

    # -- control loop ---------------------------------------------------------------------
    def _on_observation(self, msg: Observation):
        self._take_observation(np.asarray(msg.state, dtype=np.float32), msg.header,
                               bool(msg.reset_episode))

    def _on_joint_state(self, msg: JointState):
        names = self.node_cfg.joint_names
        index = {n: i for i, n in enumerate(msg.name)}
        missing = [n for n in names if n not in index]
        if missing or len(msg.position) < len(msg.name):
            self._reject(f"joint_states: expected joints {list(names)} with positions, "
                         f"missing {missing}")
            return
        pos = [msg.position[index[n]] for n in names]
        values = pos
        if self.runtime and self.runtime.model_cfg.obs_dim == 2 * len(names):
            vel = [msg.velocity[index[n]] if len(msg.velocity) == len(msg.name) else 0.0
                   for n in names]
            values = pos + vel
        self._take_observation(np.asarray(values, dtype=np.float32), msg.header, False)

    def _take_observation(self, obs, header, reset):
        if self.runtime is None or not self.active:
            return
        stamp = _stamp_to_s(header.stamp)
        if stamp:
            if stamp < self._last_obs_stamp:
                self._reject(f"observation: stamp {stamp:.6f} is older than the last one "
                             f"({self._last_obs_stamp:.6f}); out-of-order observation dropped")
                return
            age = self.get_clock().now().nanoseconds * 1e-9 - stamp
            limit = self.node_cfg.stale_observation_s
            if limit and age > limit:
                self._stale += 1
                return
            self._last_obs_stamp = stamp
        self._latest_obs = (obs, header, time.monotonic(), reset)
        if self.node_cfg.control_mode == "observation":
            self._step(self._latest_obs)
            self._latest_obs = None

    def _on_tick(self):
        now = time.monotonic()
        if self._last_tick is not None and now - self._last_tick > self.node_cfg.period_s * 1.5:
            self._deadline_misses += 1            # the tick itself came late
        self._last_tick = now
        latest = self._latest_obs
        if latest is None:
            return
        limit = self.node_cfg.stale_observation_s
        if limit and now - latest[2] > limit:
            self._stale += 1
            return
        self._latest_obs = None
        self._step(latest, tick=now)

    def _step(self, latest, tick=None):
        obs, header, received, reset = latest
        rt = self.runtime
        try:
            with self.gate.step_section():
                t0 = time.monotonic()
                if reset:
                    rt.reset(keep_context=True)
                    self.store.on_reset()
                action = rt.step(obs)
                step, episode = rt.step_count, rt.episode
                lineage = self.store.lineage
                t1 = time.monotonic()
        except FlashRTError as e:
            self._reject(str(e))
            return
        self._step_ms.append((t1 - t0) * 1e3)
        if t1 - (tick if tick is not None else received) > self.node_cfg.deadline_s:
            self._deadline_misses += 1
        out = ActionChunk()
        out.header.stamp = self.get_clock().now().to_msg()
        out.header.frame_id = header.frame_id
        out.step, out.episode_id = step, episode
        out.horizon, out.action_dim = action.shape
        out.data = action.reshape(-1).tolist()
        out.observation_stamp = header.stamp
        out.capsule_lineage = lineage
        out.latency_ms = float((time.monotonic() - received) * 1e3)
        self.pub_action.publish(out)
        if self.pub_command is not None:
            self._publish_command(action)

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
            t = (i + 1) * dt
            p.time_from_start.sec, p.time_from_start.nanosec = int(t), int((t % 1) * 1e9)
            traj.points.append(p)
        self.pub_command.publish(traj)

    def _on_instruction(self, msg: String):
        if self.runtime is None:
            self.get_logger().warning("instruction ignored: the node is not configured")
            return
        try:
            with self.gate.call_section(), self.gate.lock:
                n = self.runtime.set_instruction(msg.data)
                self.store.on_reset()
            self.get_logger().info(f"instruction prefilled: {n} tokens, episode "
                                   f"{self.runtime.episode}")
        except FlashRTError as e:
            self._reject(f"instruction refused: {e}")

    def _reject(self, why: str):
        self._rejected += 1
        self._last_error = why
        self.get_logger().warning(why, throttle_duration_sec=1.0)

    # -- status ---------------------------------------------------------------------------
    def _publish_status(self):
        rt, store = self.runtime, self.store
        if rt is None or store is None:
            return
        s = PolicyStatus()
        s.header.stamp = self.get_clock().now().to_msg()
        s.lifecycle_state = self.state_label
        s.device, s.preset = str(rt.device), rt.model_cfg.name
        s.step, s.position, s.episode_id = rt.step_count, rt.position, rt.episode
        s.capsule_lineage = store.lineage
        lat = np.asarray(self._step_ms, dtype=np.float64)
        if lat.size:
            s.last_step_ms = float(lat[-1])
            s.p50_step_ms, s.p99_step_ms = (float(x) for x in np.percentile(lat, [50, 99]))
        s.deadline_misses, s.stale_observations = self._deadline_misses, self._stale
        usage = store.usage()
        s.capsules = sum(u["count"] for u in usage.values())
        s.gpu_bytes, s.host_bytes, s.disk_bytes = (usage[t]["used"] for t in ("gpu", "host", "disk"))
        s.gpu_budget, s.host_budget, s.disk_budget = (usage[t]["budget"] for t in ("gpu", "host", "disk"))
        self.pub_status.publish(s)
        diag = DiagnosticArray()
        diag.header.stamp = s.header.stamp
        st = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: policy",
                              hardware_id=str(rt.device))
        st.level = DiagnosticStatus.OK if self._deadline_misses == 0 else DiagnosticStatus.WARN
        st.message = f"{self.state_label}, step {s.step}" + (
            f", {self._deadline_misses} deadline misses" if self._deadline_misses else "")
        kv = {"step": s.step, "position": s.position, "episode": s.episode_id,
              "p50_step_ms": f"{s.p50_step_ms:.3f}", "p99_step_ms": f"{s.p99_step_ms:.3f}",
              "deadline_misses": s.deadline_misses, "stale_observations": s.stale_observations,
              "rejected_inputs": self._rejected, "capsules": s.capsules,
              "gpu_bytes": f"{s.gpu_bytes}/{s.gpu_budget}", "host_bytes": f"{s.host_bytes}/{s.host_budget}",
              "disk_bytes": f"{s.disk_bytes}/{s.disk_budget}", "last_error": self._last_error}
        st.values = [KeyValue(key=k, value=str(v)) for k, v in kv.items()]
        diag.status = [st]
        self.pub_diag.publish(diag)

    # -- capsule services -----------------------------------------------------------------
    def _make_services(self):
        table = [  # (type, name, handler, callback group)
            (Snapshot, "~/snapshot", self._srv_snapshot, self._capsule),
            (Restore, "~/restore", self._srv_restore, self._capsule),
            (Fork, "~/fork", self._srv_fork, self._capsule),
            (Rollback, "~/rollback", self._srv_rollback, self._capsule),
            (ListCapsules, "~/list_capsules", self._srv_list, self._capsule),
            (DeleteCapsule, "~/delete_capsule", self._srv_delete, self._capsule),
            (Reset, "~/reset", self._srv_reset, self._capsule),
            (SaveCapsule, "~/save_capsule", self._srv_save, self._disk),
            (LoadCapsule, "~/load_capsule", self._srv_load, self._disk),
        ]
        self._services = [self.create_service(t, n, self._guarded(n.split("/")[-1], h), callback_group=g)
                          for t, n, h, g in table]

    def _guarded(self, op, handler):
        """Run a handler at the committed boundary; turn every failure into success=false."""
        def callback(request, response):
            t0 = time.perf_counter()
            event = CapsuleEvent(operation=op)
            try:
                if self.runtime is None:
                    raise FlashRTError(f"{op}: the node is {self.state_label}; expected a configured "
                                       f"node - configure it first (lifecycle transition "
                                       f"'configure')")
                with self.gate.call_section():
                    handler(request, response, event)
                response.success = True
                if not response.message:
                    response.message = "ok"
            except FlashRTError as e:
                response.success, response.message = False, str(e)
            except Exception as e:  # noqa: BLE001 - a bug must not take the node down
                self.get_logger().error(f"{op}: unexpected error {type(e).__name__}: {e}")
                response.success = False
                response.message = f"{op}: internal error {type(e).__name__}: {e}"
            ms = (time.perf_counter() - t0) * 1e3
            if hasattr(response, "latency_ms"):
                response.latency_ms = float(ms)
            event.success, event.message, event.latency_ms = response.success, response.message, ms
            if op != "list_capsules":
                self._emit(event)
            return response
        return callback

    def _emit(self, event: CapsuleEvent):
        event.header.stamp = self.get_clock().now().to_msg()
        rt = self.runtime
        if rt is not None:
            event.step, event.position = rt.step_count, rt.position
        self.pub_events.publish(event)

    def _info(self, cap) -> CapsuleInfo:
        info = CapsuleInfo(name=cap.name, parent=cap.parent, step=cap.step, position=cap.position,
                           tier=cap.tier, nbytes=cap.nbytes, pinned=cap.pinned,
                           fingerprint=cap.fingerprint, digest=cap.digest)
        info.created = TimeMsg(sec=int(cap.created), nanosec=int((cap.created % 1) * 1e9))
        return info

    def _srv_snapshot(self, req, res, ev):
        ev.name, ev.tier = req.name, req.tier
        cap = self.store.snapshot(req.name, tier=req.tier or None, pin=req.pin)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"snapshot {cap.name!r}: step {cap.step}, {cap.nbytes} bytes in {cap.tier}"

    def _srv_restore(self, req, res, ev):
        ev.name = req.name
        cap = self.store.restore(req.name)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"restored {cap.name!r}: step {cap.step}, position {cap.position}"

    def _srv_fork(self, req, res, ev):
        ev.name, ev.source = req.name, req.source
        cap = self.store.fork(req.source, req.name, switch_to=req.switch_to, tier=req.tier or None)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"forked {req.source or '<live>'!r} -> {cap.name!r}" + \
            (" and switched to it" if req.switch_to else "")

    def _srv_rollback(self, req, res, ev):
        ev.k = req.k
        with self.gate.lock:
            step, position = self.runtime.rollback(int(req.k))
        res.step, res.position = step, position
        res.message = f"rolled back {req.k} step(s) to step {step}"

    def _srv_list(self, req, res, ev):
        res.capsules = [self._info(c) for c in self.store.list(req.tier or None)]
        res.message = f"{len(res.capsules)} capsule(s)"

    def _srv_delete(self, req, res, ev):
        ev.name = req.name
        self.store.delete(req.name)
        res.message = f"deleted {req.name!r}"

    def _srv_reset(self, req, res, ev):
        with self.gate.lock:
            res.episode_id = self.runtime.reset(keep_context=req.keep_context)
            self.store.on_reset()
        res.message = f"reset to {'the instruction context' if req.keep_context else 'an empty context'}, " \
                      f"episode {res.episode_id}"

    def _srv_save(self, req, res, ev):
        ev.name = req.name
        res.path = self.store.save(req.name, keep_in_memory=req.keep_in_memory)
        cap = self.store.get(req.name)
        res.capsule = self._info(cap)
        ev.tier = "disk"
        res.message = f"saved {req.name!r} to {res.path}"

    def _srv_load(self, req, res, ev):
        ev.name, ev.tier = req.name, req.tier
        cap = self.store.load(req.name, tier=req.tier or None)
        if req.restore:
            cap = self.store.restore(req.name)
        res.capsule = self._info(cap)
        ev.tier = cap.tier
        res.message = f"loaded {req.name!r} into {cap.tier}" + (" and restored it" if req.restore else "")


def main(args=None):
    """Entry point of `flashrt_node` (and `ros2 run flashrt_ros flashrt_node`)."""
    rclpy.init(args=args)
    node = PolicyNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    if not node.get_parameter("managed").value:
        node.trigger_configure()
        if node.runtime is not None:
            node.trigger_activate()
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()


if __name__ == "__main__":
    main()
