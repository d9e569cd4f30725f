"""`flashrt-ros bt-demo`: the branch-and-choose tree against the simulated robot, with a report and a plot.

One process, three nodes on one PolicyExecutor (a MultiThreadedExecutor, see executors.py) spun in a background thread: the policy node
(the same PolicyNode class as `flashrt_node`; managed=false, one step per observation, reliable
observations), the simulated robot (lockstep, wrapped in a SimWorld), and the tree's node, whose
capsule service calls go over DDS like any client's. The main thread ticks the tree
(`trees.run_tree`). At the end it prints the branches and their scores, the capsule operations with
their latencies, and writes `<out>/bt_demo.png` (arm error against control step, decision points
marked, chosen branches highlighted) and `<out>/report.txt`.

How the branches differ (`--vary`, branch_and_choose's `vary`): a policy that samples its actions (a
VLA such as `--model smolvla-tiny`: its robot gets a camera, sim/robot.py) is branched by noise
seed, branch i restoring the fork with its own seed; a deterministic one (the Qwen presets) by
exploration noise on the executed command. Whether the policy samples is the runtime's own answer:
it takes a noise seed (`check_noise_seed`). As each decision is made, the tree's node logs its
scores (ChooseBest), with each branch's seed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from flashrt_ros.ros.discovery import loopback_by_default

DEFAULT_NODE = "flashrt_bt_policy"   # not /flashrt_policy: a running `flashrt-ros demo` keeps its own


def build_parser() -> argparse.ArgumentParser:
    from flashrt_ros.bt.trees import VARY
    p = argparse.ArgumentParser(
        prog="flashrt-ros bt-demo", description=__doc__.splitlines()[0],
        epilog="Each decision's scores are logged as the tree chooses (the tree node's log: "
               "\"ChooseBest d0: scores: d0-b0 -0.5300 (live sampler), d0-b1 -0.5283 (seed 1) <- "
               "chosen\" with --model smolvla-tiny), then reported with the capsule operations' latencies. With a VLA "
               "(--model smolvla-tiny, or a LeRobot SmolVLA directory) the robot has a camera and "
               "the branches differ by noise seed.")
    p.add_argument("--branches", type=int, default=3, help="N, branches per decision point")
    p.add_argument("--steps", type=int, default=20, help="M, control steps per branch")
    p.add_argument("--decisions", type=int, default=2, help="decision points")
    p.add_argument("--warmup", type=int, default=20, help="steps before the first decision point")
    p.add_argument("--vary", choices=("auto",) + VARY, default="auto",
                   help="how branches 1..N-1 differ from branch 0 (the policy as it runs): "
                        "'seed', each restores the fork with its own noise seed (a policy that "
                        "samples: a VLA); 'command', exploration noise on the executed command; "
                        "'auto' (default): 'seed' if the policy samples, else 'command'")
    p.add_argument("--explore", type=float, default=0.5,
                   help="--vary command: exploration noise of branches 1..N-1")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sim and of the branches' exploration noise or noise seeds")
    p.add_argument("--out", default="bt_demo", help="directory for bt_demo.png and report.txt")
    p.add_argument("--model", default="tiny",
                   help="a preset name or a checkpoint directory (smolvla-tiny: a VLA on the CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rate", type=float, default=100.0,
                   help="the robot's highest step rate in Hz (lockstep: slower if the policy is)")
    p.add_argument("--node-name", default=DEFAULT_NODE, help="name of the in-process policy node")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the tree is halted")
    return p


def main(argv=None) -> int:
    loopback_by_default()
    a = build_parser().parse_args(argv)
    if a.branches < 1 or a.steps < 1 or a.decisions < 1 or a.warmup < 0:
        raise SystemExit(f"flashrt-ros bt-demo: expected --branches, --steps, --decisions >= 1 and "
                         f"--warmup >= 0, found {a.branches}, {a.steps}, {a.decisions}, {a.warmup}")
    import py_trees
    import rclpy
    import torch
    from rclpy.parameter import Parameter

    from flashrt_ros.bt.behaviours import CALLS_KEY, ERROR_KEY
    from flashrt_ros.cli.demo import robot_for
    from flashrt_ros.ros.executors import PolicyExecutor, SpinThread
    from flashrt_ros.ros.node import EXECUTOR_THREADS, PolicyNode
    from flashrt_ros.sim.robot import SimRobotNode
    from flashrt_ros.bt.trees import (CHOSEN_KEY, SCORES_KEY, SEEDS_KEY, SimWorld,
                                      branch_and_choose, run_tree)

    # The tree, three nodes' callbacks and DDS share this process: one intra-op thread keeps the
    # tiny preset's step at ~1.6 ms instead of ~13 ms on 2 busy cores (measured on CI).
    torch.set_num_threads(1)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    robot_args, params, instruction = robot_for(a.model, a.rate)
    policy_name = "/" + a.node_name.strip("/")
    rclpy.init()
    overrides = [Parameter("managed", value=False), Parameter("model", value=a.model),
                 Parameter("runtime.device", value=a.device),
                 Parameter("control_mode", value="observation"),
                 Parameter("observation_qos", value="reliable"),
                 # lockstep: the robot waits for each action, so a late observation is still the
                 # next one; dropping it as stale would stall the robot
                 Parameter("stale_observation_s", value=0.0),
                 Parameter("status_rate_hz", value=10.0),
                 Parameter("instruction", value=instruction),
                 Parameter("store.capsule_dir", value=os.path.join(out, "capsules"))]
    overrides += [Parameter(k, value=v) for k, v in params.items()]
    policy = PolicyNode(parameter_overrides=overrides,
                        cli_args=["--ros-args", "-r", f"__node:={a.node_name.strip('/')}"])
    robot = SimRobotNode(policy_name, **robot_args, lockstep=True, seed=a.seed)
    world = SimWorld(robot, seed=a.seed)
    tree_node = rclpy.create_node("flashrt_bt_demo")
    # the policy node's groups, and one for the robot and the tree (executors.py: without rclpy's
    # executor busy loop)
    executor = PolicyExecutor(num_threads=EXECUTOR_THREADS + 1)
    for n in (policy, robot, tree_node):
        executor.add_node(n)
    tree = None
    try:
        policy.trigger_configure()
        if policy.runtime is None:
            print("[bt-demo] the policy node failed to configure (see the log above)")
            return 1
        a.vary = way_to_vary(a.vary, policy.runtime)
        policy.trigger_activate()
        root = branch_and_choose(world, policy=policy_name, branches=a.branches, steps=a.steps,
                                 decisions=a.decisions, warmup=a.warmup, explore=a.explore,
                                 seed=a.seed, vary=a.vary)
        tree = py_trees.trees.BehaviourTree(root)
        tree.setup(node=tree_node)
        spin = SpinThread(executor)
        spin.start()
        print(f"[bt-demo] policy {policy_name} ({a.model}, {a.device}); {a.branches} branches x "
              f"{a.steps} steps at {a.decisions} decision point(s), warmup {a.warmup}; "
              f"branches differ by {VARIES_BY[a.vary]} (vary={a.vary})", flush=True)
        t0 = time.monotonic()
        status = run_tree(tree, timeout_s=a.timeout)
        elapsed = time.monotonic() - t0
        if spin.error is not None:      # a failed tree whose executor died: say so, not the timeouts
            print(f"[bt-demo] the executor's spin thread died: {spin.error!r}", flush=True)
            return 1
        bb = py_trees.blackboard.Blackboard
        scores, chosen = bb.get(SCORES_KEY), bb.get(CHOSEN_KEY)
        calls = list(bb.get(CALLS_KEY)) if bb.exists(CALLS_KEY) else []
        lines = report_lines(a, status.value, elapsed, world, scores, chosen, bb.get(SEEDS_KEY),
                             calls, bb.get(ERROR_KEY) if bb.exists(ERROR_KEY) else "")
        png = os.path.join(out, "bt_demo.png")
        plot_episode(world, chosen, a, png)
        lines.append(f"plot: {png}")
        text = "\n".join(lines)
        print(text, flush=True)
        with open(os.path.join(out, "report.txt"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        return 0 if status == py_trees.common.Status.SUCCESS else 1
    finally:
        if tree is not None:
            tree.shutdown()
        executor.shutdown(timeout_sec=2.0)
        for n in (tree_node, robot, policy):
            n.destroy_node()
        rclpy.try_shutdown()


VARIES_BY = {"seed": "noise seed", "command": "exploration noise on the command"}


def way_to_vary(vary: str, runtime) -> str:
    """`--vary` for the configured `runtime`: "auto" is "seed" for a policy that samples (it takes
    a noise seed), else "command"; "seed" for a policy that samples nothing is refused with the
    runtime's reason."""
    from flashrt_ros.core.exceptions import InputError
    try:
        runtime.check_noise_seed(0)
    except InputError as e:
        if vary == "seed":
            raise SystemExit(f"flashrt-ros bt-demo: --vary seed: {e}. Branch this policy with "
                             f"--vary command (exploration noise on the command)") from None
        return "command"
    return "seed" if vary == "auto" else vary


def _decision_steps(world, decisions: int) -> list[int]:
    return [world.saved[f"d{r}"].t for r in range(decisions) if f"d{r}" in world.saved]


def report_lines(a, status: str, elapsed: float, world, scores: dict, chosen: list, seeds: dict,
                 calls: list, error: str) -> list[str]:
    lines = [f"[bt-demo] tree {status} in {elapsed:.2f} s; world at step {world.t}, arm error "
             f"{world.error():.3f}"]
    if status != "SUCCESS":
        lines.append(f"  stopped by: {error}")
    for r, t in enumerate(_decision_steps(world, a.decisions)):
        lines.append(f"decision {r} at step {t}:")
        for i in range(a.branches):
            b = f"d{r}-b{i}"
            if b in scores:
                mark = "  <- chosen" if r < len(chosen) and chosen[r] == b else ""
                if i == 0:
                    kind = "policy, its live sampler" if b in seeds else "policy"
                elif b in seeds:
                    kind = f"policy, noise seed {seeds[b]}"
                else:
                    kind = f"policy + N(0, {a.explore:g}) exploration"
                lines.append(f"  {b:<8} score {scores[b]:8.4f}  ({kind}){mark}")
    by_op: dict[str, list] = {}
    for c in calls:
        by_op.setdefault(c.service.rsplit("/", 1)[-1], []).append(c)
    lines.append(f"capsule operations: {len(calls)} calls "
                 f"({sum(c.outcome != 'ok' for c in calls)} not ok); latency in ms")
    lines.append(f"  {'operation':<15}{'calls':>6}{'node p50':>10}{'node max':>10}"
                 f"{'rtt p50':>10}{'rtt max':>10}")
    for op, cs in sorted(by_op.items()):
        node = [c.node_ms for c in cs if c.node_ms is not None]
        rtt = [c.round_trip_ms for c in cs if c.round_trip_ms is not None]

        def fmt(xs, f):
            return f"{f(xs):10.3f}" if xs else f"{'-':>10}"
        lines.append(f"  {op:<15}{len(cs):>6}{fmt(node, statistics.median)}{fmt(node, max)}"
                     f"{fmt(rtt, statistics.median)}{fmt(rtt, max)}")
    lines.append("  (node: the service's own latency_ms; rtt: request sent -> response in this "
                 "process, over DDS)")
    return lines


def plot_episode(world, chosen: list, a, path: str) -> None:
    """Arm error against control step: the executed episode, every branch, decision points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pieces = []                      # consecutive trace entries of one segment
    for seg, t, err in world.trace:
        if not pieces or pieces[-1][0] != seg:
            pieces.append((seg, [], []))
        pieces[-1][1].append(t)
        pieces[-1][2].append(err)
    executed = {}                    # step -> error along the executed path (main + chosen)
    for seg, ts, es in pieces:
        if seg == "main" or seg in chosen:
            executed.update(zip(ts, es))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    drawn = set()
    for seg, ts, es in pieces:
        if ts[0] - 1 in executed:   # join each piece to the point it started from
            ts, es = [ts[0] - 1] + ts, [executed[ts[0] - 1]] + es
        if seg == "main":
            style, label = dict(color="black", lw=1.6), "executed"
        elif seg in chosen:
            style, label = dict(color="tab:orange", lw=2.4), "chosen branch"
        else:
            style, label = dict(color="tab:blue", lw=0.9, alpha=0.45), "other branches"
        ax.plot(ts, es, label=None if label in drawn else label, **style)
        drawn.add(label)
    for r, t in enumerate(_decision_steps(world, a.decisions)):
        ax.axvline(t, color="grey", ls="--", lw=0.8)
        ax.annotate(f"decision {r}", (t, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
    ax.set_xlabel("control step")
    ax.set_ylabel("arm error |target - q|")
    ax.set_title(f"branch and choose: {a.branches} branches x {a.steps} steps, "
                 f"{a.decisions} decision point(s)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
