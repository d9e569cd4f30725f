"""The main job for a newcomer: the policy node and a simulated robot in one process, live.

Both nodes share one PolicyExecutor (executors.py: a MultiThreadedExecutor without rclpy's busy loop). The policy node runs exactly as `flashrt_node` does
(same class, parameters given as overrides: managed=false, timer control); the simulated robot
publishes observations at the control rate and applies the first row of each action chunk.
With a camera policy (`--model smolvla-tiny`, or a LeRobot SmolVLA directory) the robot publishes
its joint states and the frames of a camera over the arm (sim/robot.py), which the node joins by
stamp; it all runs on the CPU.
A line a second reports what was measured in this run; the capsule services can be called
from a second shell with `flashrt-ros ...` while it runs.
"""
from __future__ import annotations

import os
import signal
import time


def add_arguments(p):
    p.add_argument("--model", default="tiny", help="a preset name or a checkpoint directory (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default %(default)s)")
    p.add_argument("--rate", type=float, default=30.0, help="control rate in Hz (default %(default)s)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run (0 = until Ctrl-C)")
    p.add_argument("--capsule-dir", default="capsules", help="disk-tier capsule directory")
    p.add_argument("--instruction", default="", help="the task ('' = reach the moving target; a "
                                                     "camera policy: the task it was trained on, "
                                                     "if it is the smolvla-tiny preset)")
    p.add_argument("--camera-rate", type=float, default=0.0,
                   help="a camera policy's frames per second (0 = the control rate)")


def run_demo(args) -> int:
    """Run the demo until --duration ends or Ctrl-C; Ctrl-C at any point, start-up included,
    ends it with one line, no traceback."""
    # Ctrl-C is Python's KeyboardInterrupt even where the parent ignored SIGINT (a background
    # job of a script, as some CI runners start tests): the child inherits the ignored signal,
    # and Python then installs no handler of its own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = {}                    # what exists so far, for the teardown
    try:
        code = _run(args, started)
    except KeyboardInterrupt:
        code = 0
    finally:
        _teardown(started)
    print("[flashrt] stopped", flush=True)
    return code


def _run(args, started: dict) -> int:
    import numpy as np
    import rclpy
    from rclpy.parameter import Parameter
    from rclpy.signals import SignalHandlerOptions

    from flashrt_ros.ros.executors import PolicyExecutor, SpinThread
    from flashrt_ros.ros.node import EXECUTOR_THREADS, PolicyNode
    from flashrt_ros.sim.robot import SimRobotNode

    robot_args, params, instruction = robot_for(args.model, args.rate, args.camera_rate,
                                                args.instruction)
    # Ctrl-C is Python's KeyboardInterrupt alone: rclpy's SIGINT handler would also shut the
    # context down under a start-up still using it (an RCLError instead of a clean stop)
    rclpy.init(signal_handler_options=SignalHandlerOptions.SIGTERM)
    started["rclpy"] = rclpy
    overrides = [Parameter("managed", value=False), Parameter("model", value=args.model),
                 Parameter("runtime.device", value=args.device),
                 Parameter("control_rate_hz", value=float(args.rate)),
                 Parameter("instruction", value=instruction),
                 Parameter("store.capsule_dir", value=os.path.abspath(args.capsule_dir))]
    overrides += [Parameter(k, value=v) for k, v in params.items()]
    print(f"[flashrt] starting policy node /flashrt_policy: model {args.model}, device "
          f"{args.device}, {args.rate:g} Hz",
          flush=True)
    policy = started["policy"] = PolicyNode(parameter_overrides=overrides)
    robot = started["robot"] = SimRobotNode("/flashrt_policy", **robot_args)
    # the policy node's groups, and the robot
    executor = started["executor"] = PolicyExecutor(num_threads=EXECUTOR_THREADS + 1)
    executor.add_node(policy)
    executor.add_node(robot)
    policy.trigger_configure()
    if policy.runtime is None:
        print("[flashrt] configure failed (see the log above)")
        return 1
    policy.trigger_activate()
    domain = os.environ.get("ROS_DOMAIN_ID", "0")
    env = f"ROS_DOMAIN_ID={domain} ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST"
    print(f"[flashrt] live. From a second shell in this directory:\n"
          f"    export {env}\n"
          f"    .venv/bin/flashrt-ros snapshot home\n"
          f"    .venv/bin/flashrt-ros fork home branch-a --switch\n"
          f"    .venv/bin/flashrt-ros rollback 5\n"
          f"    .venv/bin/flashrt-ros restore home\n"
          f"    .venv/bin/flashrt-ros list        .venv/bin/flashrt-ros status\n"
          f"[flashrt] Ctrl-C stops.", flush=True)
    spin = started["spin"] = SpinThread(executor)
    spin.start()
    t0 = time.monotonic()
    while rclpy.ok() and (args.duration <= 0 or time.monotonic() - t0 < args.duration):
        time.sleep(1.0)
        try:
            spin.check()            # a dead executor would leave these lines frozen, not failing
        except RuntimeError as e:
            print(f"[flashrt] stopping: {e}", flush=True)
            return 1
        rt, store = policy.runtime, policy.store
        if rt is None:
            break
        lat = np.asarray(policy._step_ms, dtype=np.float64)
        last = robot.last_action
        p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (0.0, 0.0))
        print(f"[flashrt] t={time.monotonic() - t0:5.1f}s episode {rt.episode} step "
              f"{rt.step_count:<6} step p50 {p50:.2f} ms p99 {p99:.2f} ms | obs->action "
              f"{(last.latency_ms if last else 0):.1f} ms (incl. the wait for the next tick) | arm error {robot.arm.error():.3f} | "
              f"deadline misses {policy.deadlines.misses} | capsules {len(store.capsules)} "
              f"lineage {store.lineage or '-'}", flush=True)
    return 0


def robot_for(model: str, rate: float, camera_rate: float = 0.0, instruction: str = ""):
    """The simulated robot's arguments, the node's extra parameters and the instruction for
    `model`: a camera policy gets a robot with a camera (its first camera's size, `camera_rate`
    frames per second, 0: `rate`) and the node reads its joint states."""
    from flashrt_ros.core.checkpoint import model_directory
    from flashrt_ros.core.models import read_vla_dir, vla_family
    from flashrt_ros.core.models.qwen3_5.checkpoint_qwen3_5 import resolve_model
    from flashrt_ros.ros.inputs import camera_name
    from flashrt_ros.sim.robot import CameraFeed, joint_names

    directory = model_directory(model)
    family = vla_family(directory) if directory else None
    if family is None:
        cfg = resolve_model(model).cfg
        return (dict(obs_dim=cfg.obs_dim, action_dim=cfg.action_dim, rate_hz=rate), {},
                instruction or "reach the moving target")
    from flashrt_ros.sim import imitation_vla
    cfg = read_vla_dir(directory, family).cfg
    joints = cfg.action_dim               # one command per joint
    _, height, width = cfg.camera_shapes[0]
    feed = CameraFeed(camera_name(cfg.cameras[0]), width, height, camera_rate or rate)
    task = imitation_vla.TASK if model == imitation_vla.PRESET else ""
    return (dict(obs_dim=cfg.state_dim, action_dim=joints, rate_hz=rate, camera=feed),
            {"joint_names": joint_names(joints)}, instruction or task)


def _teardown(started: dict) -> None:
    """End what `_run` started, in order: no callback may run on a node being destroyed."""
    policy = started.get("policy")
    if policy is not None and policy.late is not None:    # not mid-capture at interpreter exit
        policy.late.stop(timeout=10.0)
    if "executor" in started:
        started["executor"].shutdown(timeout_sec=2.0)
    if "spin" in started:
        started["spin"].join(timeout=2.0)
    for name in ("policy", "robot"):
        if name in started:
            started[name].destroy_node()
    if "rclpy" in started:
        started["rclpy"].try_shutdown()
    if "executor" in started:
        started["executor"].retrieve_outcomes()
