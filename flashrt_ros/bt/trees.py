"""Example behaviour trees over the capsule behaviours, and the restorable sim world they run against.

Two trees (built by functions, ticked with `run_tree`; docs/behaviour_trees.md draws them):
  * `episode_with_recovery` - snapshot "home" right after the instruction prefill, run the episode
    under a guard (failure signal flag, arm error threshold, optionally deadline health); on a
    failure, roll back k steps (policy and world) or, if that is not possible, restore "home", and
    retry - at most `max_retries` times.
  * `branch_and_choose` - at each decision point fork N branches from the live policy state; for
    each: restore it, run M steps against the simulated robot, score the arm error, snapshot the
    branch end; then restore the best branch end and continue. The scores and each decision's
    choice are on the blackboard and in the tree node's log.

The world. A capsule holds the policy's state, not the world's: the simulated arm is the world. To
run several futures from one decision point the tree must restore the world too, so `SimWorld`
keeps copies of the SimArm on the tree side (`save`/`restore`, and `rewind(k)` from a history of
the last steps, mirroring the node's rollback ring). SimWorld stands in for the robot node's arm
(`robot.arm = world`): the SimRobotNode keeps the transport (observation out, action in,
lockstep), the world keeps the state and is paused between runs (`SimRobotNode.pause`: a flag its
timer reads; the timer is never cancelled from the tick thread, see sim/robot.py), so the
policy node - stepping once per observation - and the world advance together, step for step. Run
that node with `control_mode: observation`, reliable observations and `stale_observation_s: 0` (in
lockstep a late observation is still the next one; dropping it would stall the robot).
Deterministic replay makes an identical retry pointless, so branches differ in one of two ways
(`vary`): a deterministic policy (the Qwen presets) gets exploration noise on the executed command
(seeded, so a run is reproducible); a policy that samples (a VLA's flow matching, a Qwen policy
with runtime.action_noise > 0) restores each branch with its own noise seed (Restore's
noise_seed), so the policy itself samples another future from the same state. Branch 0 is the
policy as it runs (its own command, its live sampler). Retries use command noise.

Threading. The world's `apply`/`observe` run in the executor thread (robot callbacks); `save`,
`restore` and `rewind` run in the tick thread, and only when the world is settled - paused with no
observation awaiting its action - so the two never touch the state at once (`SimWorld.lock`
guards the state anyway). World behaviours return RUNNING until the world is settled: a halted run
may leave one observation in flight, and its action must land before the policy's state or the
world's is moved, or the two would disagree by one step.

Blackboard keys written here (besides behaviours.ERROR_KEY and CALLS_KEY):
  /episode/failure_signal bool  set True (by a monitor, a test, a user) to fail the running attempt;
  /episode/attempts       int   attempts started by episode_with_recovery;
  /branches/scores        dict  branch label ("d0-b2") -> score (-mean arm error over the branch);
  /branches/seeds         dict  branch label -> the noise seed it was restored with (vary="seed";
                                -1: the live sampler);
  /branches/chosen        list  the chosen branch label of each decision point, in order;
  /branches/best_end      str   capsule (and world copy) name of the last chosen branch's end.
"""
from __future__ import annotations

import collections
import copy
import logging
import math
import operator
import threading
import time

import numpy as np
import py_trees
from py_trees.common import Access, ComparisonExpression, Status

from flashrt_ros.bt.behaviours import (DEFAULT_POLICY, ERROR_KEY, CapsulePresent, DeadlineHealthy, DeleteCapsule,
                         Fork, FromBlackboard, Reset, Restore, Rollback, Snapshot)
from flashrt_ros.ros.capsule_services import KEEP_SAMPLER
from flashrt_ros.sim.arm import SimArm
from flashrt_ros.sim.robot import SimRobotNode

FAILURE_SIGNAL_KEY = "/episode/failure_signal"
ATTEMPTS_KEY = "/episode/attempts"
SCORES_KEY = "/branches/scores"
SEEDS_KEY = "/branches/seeds"
CHOSEN_KEY = "/branches/chosen"
BEST_END_KEY = "/branches/best_end"
VARY = ("command", "seed")      # how branch_and_choose's branches differ


class SimWorld:
    """The simulated robot as a world the tree can pause, run, copy, restore and rewind."""

    def __init__(self, robot: SimRobotNode, history: int = 16, seed: int = 0):
        if not robot.lockstep:
            raise ValueError("SimWorld: expected a SimRobotNode in lockstep mode (one observation, "
                             "then wait for its action), found rate mode; create it with "
                             "lockstep=True")
        self.robot = robot
        self.state: SimArm = robot.arm
        robot.arm = self
        robot.pause()                             # until run()
        self.lock = threading.Lock()
        self.saved: dict[str, SimArm] = {}
        self.history: collections.deque[SimArm] = collections.deque(maxlen=history)
        self.segment = "main"
        self.trace: list[tuple[str, int, float]] = []   # (segment, step t after apply, arm error)
        self._seeds = np.random.SeedSequence(seed)
        self._explore_sigma, self._explore_rng = 0.0, None
        self.save("start")

    # -- the arm interface SimRobotNode calls (executor thread) ---------------------------
    def observe(self) -> np.ndarray:
        with self.lock:
            return self.state.observe()

    def apply(self, action_row) -> None:
        with self.lock:
            self.history.append(copy.deepcopy(self.state))
            row = np.asarray(action_row[: self.state.action_dim], dtype=np.float64)
            if self._explore_sigma > 0:
                row = row + self._explore_sigma * self._explore_rng.standard_normal(row.size)
            self.state.apply(row)
            self.trace.append((self.segment, self.state.t, self.state.error()))

    def error(self) -> float:
        with self.lock:
            return self.state.error()

    # what a robot with a camera reads besides observe() (its joint states and rendered frame)
    @property
    def q(self) -> np.ndarray:
        with self.lock:
            return self.state.q.copy()

    @property
    def qd(self) -> np.ndarray:
        with self.lock:
            return self.state.qd.copy()

    @property
    def target(self) -> np.ndarray:
        with self.lock:
            return self.state.target.copy()

    @property
    def action_dim(self) -> int:
        return self.state.action_dim

    @property
    def dt(self) -> float:
        return self.state.dt

    # -- control (tick thread) ------------------------------------------------------------
    @property
    def t(self) -> int:
        """Steps the world has taken since its start (restored and rewound with the state)."""
        return self.state.t

    def connected(self) -> bool:
        """The policy node subscribes the observations and publishes actions (discovery done)."""
        return self.robot.pub.get_subscription_count() > 0 and \
            self.robot.sub.get_publisher_count() > 0

    def settled(self) -> bool:
        """No observation is waiting for its action."""
        return self.robot.sent == self.robot.actions

    def run(self, steps: int) -> int:
        """Let the robot take `steps` more lockstep steps; returns the action count that ends it."""
        target = self.robot.actions + steps
        self.robot.max_steps = target             # the robot stops itself there (SimRobotNode.done)
        self.robot.resume()
        return target

    def pause(self) -> None:
        self.robot.pause()

    def explore(self, sigma: float, seed: int | None = None) -> None:
        """Add N(0, sigma) to each executed command from now on (seed None: the next of the world's)."""
        if seed is None:
            seed = int(self._seeds.spawn(1)[0].generate_state(1)[0])
        self._explore_sigma, self._explore_rng = float(sigma), np.random.default_rng(seed)

    def save(self, name: str) -> None:
        with self.lock:
            self.saved[name] = copy.deepcopy(self.state)

    def restore(self, name: str) -> None:
        with self.lock:
            if name not in self.saved:
                raise KeyError(f"no saved world {name!r}; saved: {sorted(self.saved)}")
            self.state = copy.deepcopy(self.saved[name])
            self.history.clear()

    def rewind(self, k: int) -> None:
        with self.lock:
            if not 1 <= k <= len(self.history):
                raise KeyError(f"cannot rewind the world {k} step(s): it holds {len(self.history)} "
                               f"since the last restore (history {self.history.maxlen})")
            for _ in range(k - 1):
                self.history.pop()
            self.state = self.history.pop()


# -- world behaviours ---------------------------------------------------------------------
class _WorldBehaviour(py_trees.behaviour.Behaviour):
    """Waits (RUNNING) until the world is settled, then acts once; FAILURE after `timeout_s`."""

    def __init__(self, label: str, world: SimWorld, timeout_s: float = 5.0, reads=()):
        super().__init__(label)
        self.world, self.timeout_s = world, float(timeout_s)
        self.bb = self.attach_blackboard_client(name=label)
        self.bb.register_key(ERROR_KEY, access=Access.WRITE)
        for key in reads:
            self.bb.register_key(key, access=Access.READ)

    def initialise(self):
        self._t0 = time.perf_counter()

    def update(self) -> Status:
        if not self.world.settled():
            if time.perf_counter() - self._t0 > self.timeout_s:
                return self.fail(f"the robot's last observation got no action within "
                                 f"{self.timeout_s:g} s; is the policy node active?")
            self.feedback_message = "waiting for the in-flight action"
            return Status.RUNNING
        try:
            self.feedback_message = self.act() or "done"
        except KeyError as e:
            return self.fail(e.args[0])
        return Status.SUCCESS

    def act(self) -> str | None:
        raise NotImplementedError

    def resolve(self, value):
        return self.bb.get(value.key) if isinstance(value, FromBlackboard) else value

    def fail(self, why: str) -> Status:
        self.bb.set(ERROR_KEY, f"{self.name}: {why}")
        self.feedback_message = why
        return Status.FAILURE


class SaveWorld(_WorldBehaviour):
    def __init__(self, world: SimWorld, name, label: str | None = None):
        self.world_name = name
        super().__init__(label or f"SaveWorld {name}", world,
                         reads=[name.key] if isinstance(name, FromBlackboard) else [])

    def act(self):
        self.world.save(self.resolve(self.world_name))


class RestoreWorld(_WorldBehaviour):
    """Restore a saved world, start a trace segment, and set the exploration noise from here on."""

    def __init__(self, world: SimWorld, name, segment: str | None = None, explore: float = 0.0,
                 seed: int | None = None, label: str | None = None):
        self.world_name, self.segment = name, segment
        self.sigma, self.seed = explore, seed
        super().__init__(label or f"RestoreWorld {name}", world,
                         reads=[name.key] if isinstance(name, FromBlackboard) else [])

    def act(self):
        name = self.resolve(self.world_name)
        self.world.restore(name)
        self.world.explore(self.sigma, self.seed)
        if self.segment is not None:
            self.world.segment = self.segment
        return f"world at {name!r}, step {self.world.t}"


class RewindWorld(_WorldBehaviour):
    """Take the world back k steps (as Rollback(k) takes the policy), then explore afresh."""

    def __init__(self, world: SimWorld, k, explore: float = 0.0, label: str | None = None):
        self.k, self.sigma = k if isinstance(k, FromBlackboard) else int(k), explore
        super().__init__(label or f"RewindWorld {k}", world,
                         reads=[k.key] if isinstance(k, FromBlackboard) else [])

    def act(self):
        self.world.rewind(int(self.resolve(self.k)))
        self.world.explore(self.sigma)
        return f"world back at step {self.world.t}"


class RunSimSteps(py_trees.behaviour.Behaviour):
    """RUNNING while the robot takes `steps` more steps (or until world step `until`), then SUCCESS.

    `steps` or `until` may be a FromBlackboard key, read when the run starts. FAILURE if the policy
    node is not discovered, or an action takes longer than `timeout_s`. A halt pauses the robot (an
    observation already sent still gets its action).
    """

    def __init__(self, world: SimWorld, steps=None, until=None, timeout_s: float = 5.0,
                 label: str | None = None):
        if (steps is None) == (until is None):
            raise ValueError(f"RunSimSteps: expected exactly one of steps or until, found "
                             f"steps={steps!r}, until={until!r}")
        super().__init__(label or (f"RunSimSteps {steps}" if steps is not None else
                                   f"RunSimSteps until {until}"))
        self.world, self.steps, self.until, self.timeout_s = world, steps, until, float(timeout_s)
        self.bb = self.attach_blackboard_client(name=self.name)
        self.bb.register_key(ERROR_KEY, access=Access.WRITE)
        for value in (steps, until):
            if isinstance(value, FromBlackboard):
                self.bb.register_key(value.key, access=Access.READ)

    def _resolve(self, value) -> int:
        return int(self.bb.get(value.key) if isinstance(value, FromBlackboard) else value)

    def initialise(self):
        self._target = None
        self._seen, self._since = self.world.robot.actions, time.perf_counter()

    def update(self) -> Status:
        world, robot, now = self.world, self.world.robot, time.perf_counter()
        if self._target is None:
            if not (world.connected() and world.settled()):
                if now - self._since > self.timeout_s:
                    return self._fail("the policy node's observation/action topics were not "
                                      f"matched within {self.timeout_s:g} s")
                self.feedback_message = "waiting for the policy node"
                return Status.RUNNING
            n = self._resolve(self.steps) if self.steps is not None else \
                self._resolve(self.until) - world.t
            if n <= 0:
                return Status.SUCCESS
            self._target, self._since = world.run(n), now
        if robot.actions >= self._target:
            world.pause()
            self.feedback_message = f"world at step {world.t}"
            return Status.SUCCESS
        if robot.actions != self._seen:
            self._seen, self._since = robot.actions, now
        elif now - self._since > self.timeout_s:
            world.pause()
            return self._fail(f"no action for {self.timeout_s:g} s at world step {world.t}")
        self.feedback_message = f"world at step {world.t}, {self._target - robot.actions} to go"
        return Status.RUNNING

    def terminate(self, new_status: Status):
        if new_status == Status.INVALID:
            self.world.pause()

    def _fail(self, why: str) -> Status:
        self.bb.set(ERROR_KEY, f"{self.name}: {why}")
        self.feedback_message = why
        return Status.FAILURE


class _Guard(py_trees.behaviour.Behaviour):
    """A guard of a run: SUCCESS while it holds; FAILURE writes why to ERROR_KEY."""

    def __init__(self, label: str, reads=()):
        super().__init__(label)
        self.bb = self.attach_blackboard_client(name=label)
        self.bb.register_key(ERROR_KEY, access=Access.WRITE)
        for key in reads:
            self.bb.register_key(key, access=Access.READ)

    def update(self) -> Status:
        why = self.violation()
        if why is None:
            self.feedback_message = "holds"
            return Status.SUCCESS
        self.bb.set(ERROR_KEY, f"{self.name}: {why}")
        self.feedback_message = why
        return Status.FAILURE

    def violation(self) -> str | None:
        raise NotImplementedError


class NoFailureSignal(_Guard):
    """SUCCESS while FAILURE_SIGNAL_KEY is False (a missing key counts as raised)."""

    def __init__(self, world: SimWorld):
        super().__init__("NoFailureSignal", reads=[FAILURE_SIGNAL_KEY])
        self.world = world

    def violation(self):
        if self.bb.exists(FAILURE_SIGNAL_KEY) and self.bb.get(FAILURE_SIGNAL_KEY) is False:
            return None
        return f"failure signal raised at world step {self.world.t}"


class ArmErrorBelow(_Guard):
    """SUCCESS while the sim arm's distance to its target is below `threshold`."""

    def __init__(self, world: SimWorld, threshold: float, label: str | None = None):
        super().__init__(label or f"ArmErrorBelow {threshold:g}")
        self.world, self.threshold = world, float(threshold)

    def violation(self):
        err = self.world.error()
        if err < self.threshold:
            return None
        return f"arm error {err:.3f} >= {self.threshold:g} at world step {self.world.t}"


class ScoreBranch(py_trees.behaviour.Behaviour):
    """Score branch `label` as -mean(arm error) over its steps; writes SCORES_KEY[label]."""

    def __init__(self, world: SimWorld, label: str):
        super().__init__(f"ScoreBranch {label}")
        self.world, self.branch = world, label
        self.bb = self.attach_blackboard_client(name=self.name)
        self.bb.register_key(SCORES_KEY, access=Access.WRITE)

    def update(self) -> Status:
        errors = [e for seg, _, e in self.world.trace if seg == self.branch]
        if not errors:
            self.feedback_message = f"branch {self.branch} took no step"
            return Status.FAILURE
        self.bb.get(SCORES_KEY)[self.branch] = -float(np.mean(errors))
        self.feedback_message = f"score {-np.mean(errors):.4f}"
        return Status.SUCCESS


def scores_line(scores: dict, best: str, seeds: dict | None = None) -> str:
    """One decision for a log: each branch's score (and noise seed), the chosen one marked."""
    def shown(b):
        seed = (seeds or {}).get(b)
        how = "" if seed is None else " (live sampler)" if seed == KEEP_SAMPLER else f" (seed {seed})"
        return f"{b} {scores[b]:.4f}{how}" + (" <- chosen" if b == best else "")
    return "scores: " + ", ".join(shown(b) for b in scores)


class ChooseBest(py_trees.behaviour.Behaviour):
    """Pick the best-scored of `labels`; writes BEST_END_KEY, appends to CHOSEN_KEY, and logs the
    scores (the tree node's logger, given to setup)."""

    def __init__(self, labels: list[str], label: str = "ChooseBest"):
        super().__init__(label)
        self.labels = list(labels)
        self.log = logging.getLogger(__name__).info
        self.bb = self.attach_blackboard_client(name=label)
        for key in (SCORES_KEY, CHOSEN_KEY, BEST_END_KEY):
            self.bb.register_key(key, access=Access.WRITE)
        self.bb.register_key(SEEDS_KEY, access=Access.READ)

    def setup(self, **kwargs):
        node = kwargs.get("node")
        if node is not None:
            self.log = node.get_logger().info

    def update(self) -> Status:
        scores = self.bb.get(SCORES_KEY)
        best = max(self.labels, key=lambda b: scores[b])
        self.bb.get(CHOSEN_KEY).append(best)
        self.bb.set(BEST_END_KEY, f"{best}-end")
        seeds = self.bb.get(SEEDS_KEY) if self.bb.exists(SEEDS_KEY) else None
        self.log(f"{self.name}: " + scores_line({b: scores[b] for b in self.labels}, best, seeds))
        self.feedback_message = f"best {best} ({scores[best]:.4f})"
        return Status.SUCCESS


class CountAttempt(py_trees.behaviour.Behaviour):
    """Count an episode attempt (ATTEMPTS_KEY) and label the world's trace segment after it."""

    def __init__(self, world: SimWorld):
        super().__init__("CountAttempt")
        self.world = world
        self.bb = self.attach_blackboard_client(name=self.name)
        self.bb.register_key(ATTEMPTS_KEY, access=Access.WRITE)

    def update(self) -> Status:
        n = self.bb.get(ATTEMPTS_KEY) + 1
        self.bb.set(ATTEMPTS_KEY, n)
        self.world.segment = f"attempt {n}"
        return Status.SUCCESS


def _sequence(label, children, memory=True):
    return py_trees.composites.Sequence(label, memory=memory, children=children)


def _selector(label, children, memory=True):
    return py_trees.composites.Selector(label, memory=memory, children=children)


def _set(key, value):
    return py_trees.behaviours.SetBlackboardVariable(f"set {key}", key, value, overwrite=True)


# -- the example trees --------------------------------------------------------------------
def episode_with_recovery(world: SimWorld, *, policy: str = DEFAULT_POLICY, episode_steps: int = 60,
                          max_retries: int = 2, rollback_k: int = 5,
                          error_threshold: float = math.inf, max_deadline_misses: int | None = None,
                          retry_explore: float = 0.3, service: dict | None = None):
    """An episode that recovers from failures: roll back k steps, else restore "home", and retry.

    Args:
        world: the SimWorld the episode runs against (saved as "home" with the policy).
        policy: the policy node's name.
        episode_steps: the episode ends when the world reaches this step (world steps count from
            "start"; the policy's step counter may be offset: reset returns it to the step of the
            instruction context, or of the last capsule restored into it).
        max_retries: attempts after the first; the tree fails when they are used up.
        rollback_k: steps a recovery rolls back (policy and world).
        error_threshold: an arm error at or above this is a failure signal.
        max_deadline_misses: if set, more deadline misses during the run are a failure signal.
        retry_explore: exploration noise of a retry (so a retry is not a replay).
        service: keyword arguments for every capsule behaviour (wait_s, timeout_s).
    """
    svc = dict(policy=policy, **(service or {}))
    guard = [NoFailureSignal(world), ArmErrorBelow(world, error_threshold)]
    if max_deadline_misses is not None:
        guard.append(DeadlineHealthy(max_deadline_misses, policy=policy))
    guarded_run = _sequence("guarded run", guard + [RunSimSteps(world, until=episode_steps)],
                            memory=False)
    recover = _sequence("recover", [
        _selector("rewind", [
            _sequence(f"roll back {rollback_k}", [RewindWorld(world, rollback_k, retry_explore),
                                                  Rollback(k=rollback_k, **svc)]),
            _sequence("restore home", [RestoreWorld(world, "home", explore=retry_explore),
                                       Restore(name="home", **svc)]),
        ]),
        _set(FAILURE_SIGNAL_KEY, False),
    ])
    attempt = _sequence("attempt", [
        _selector("recover before a retry", [
            py_trees.behaviours.CheckBlackboardVariableValue(
                "first attempt", ComparisonExpression(ATTEMPTS_KEY, 0, operator.eq)),
            recover,
        ]),
        CountAttempt(world),
        guarded_run,
    ])
    return _sequence("episode with recovery", [
        _set(FAILURE_SIGNAL_KEY, False),
        _set(ATTEMPTS_KEY, 0),
        Reset(keep_context=True, **svc),                    # back to just after the instruction
        RestoreWorld(world, "start", segment="setup"),
        _selector("no stale home", [py_trees.decorators.Inverter("absent", CapsulePresent("home", **svc)),
                                    DeleteCapsule(name="home", **svc)]),
        Snapshot(name="home", **svc),
        SaveWorld(world, "home"),
        py_trees.decorators.Retry("bounded retries", attempt, num_failures=max_retries + 1),
    ])


def branch_seed(seed: int, decision: int, branch: int, branches: int) -> int:
    """The seed of branch `branch` at decision point `decision`: its exploration noise's
    (vary="command") or its policy noise sampler's (vary="seed"), in [0, 2^32)."""
    return (seed * 100_003 + decision * branches + branch) % (1 << 32)


def branch_and_choose(world: SimWorld, *, policy: str = DEFAULT_POLICY, branches: int = 3,
                      steps: int = 20, decisions: int = 2, warmup: int = 20,
                      continue_steps: int | None = None, explore: float = 0.5, seed: int = 0,
                      vary: str = "command", service: dict | None = None):
    """Fork N branches at each decision point, run and score each, restore the best and go on.

    Args:
        world: the SimWorld the branches run against.
        policy: the policy node's name.
        branches: N, branches per decision point (branch 0 runs the policy as it is).
        steps: M, steps each branch runs before it is scored.
        decisions: decision points; each is followed by `continue_steps` steps of the chosen branch.
        warmup: steps before the first decision point.
        continue_steps: steps after each choice (default M).
        explore: vary="command": exploration noise of branches 1..N-1.
        seed: base of the branches' seeds (`branch_seed`; a run is reproducible).
        vary: how branches 1..N-1 differ from branch 0. "command": N(0, explore) on the executed
            command (a deterministic policy would replay its branch exactly); "seed": the branch
            is restored with its own noise seed, so a policy that samples (a VLA) draws another
            future from the same state; nothing is added to the command.
        service: keyword arguments for every capsule behaviour (wait_s, timeout_s).
    Branch i of decision r is labelled "d{r}-b{i}": its start capsule has that name, its end
    capsule and end world copy "d{r}-b{i}-end". Branch capsules are deleted after each choice.
    """
    if branches < 1 or steps < 1 or decisions < 1 or warmup < 0:
        raise ValueError(f"branch_and_choose: expected branches, steps, decisions >= 1 and warmup "
                         f">= 0, found {branches}, {steps}, {decisions}, {warmup}")
    if vary not in VARY:
        raise ValueError(f"branch_and_choose: expected vary in {VARY} (command noise for a "
                         f"deterministic policy, noise seeds for one that samples), found {vary!r}")
    svc = dict(policy=policy, **(service or {}))
    cont = steps if continue_steps is None else continue_steps
    by_seed = vary == "seed"
    seeds = {}                   # branch label -> its noise seed (vary="seed")
    rounds = []
    for r in range(decisions):
        labels = [f"d{r}-b{i}" for i in range(branches)]
        for i, b in enumerate(labels):
            seeds[b] = branch_seed(seed, r, i, branches) if i else KEEP_SAMPLER
        runs = [_sequence(f"branch {b}", [
                    RestoreWorld(world, f"d{r}", segment=b,
                                 explore=explore if i and not by_seed else 0.0,
                                 seed=branch_seed(seed, r, i, branches)),
                    Restore(name=b, **svc, **({"noise_seed": seeds[b]} if by_seed else {})),
                    RunSimSteps(world, steps=steps),
                    ScoreBranch(world, b),
                    Snapshot(name=f"{b}-end", **svc),
                    SaveWorld(world, f"{b}-end"),
                ]) for i, b in enumerate(labels)]
        rounds.append(_sequence(f"decision {r}", [
            SaveWorld(world, f"d{r}"),
            *[Fork(source="", name=b, **svc) for b in labels],
            *runs,
            ChooseBest(labels, label=f"ChooseBest d{r}"),
            RestoreWorld(world, FromBlackboard(BEST_END_KEY), segment="main"),
            Restore(name=FromBlackboard(BEST_END_KEY), **svc),
            *[DeleteCapsule(name=n, **svc) for b in labels for n in (b, f"{b}-end")],
            RunSimSteps(world, steps=cont),
        ]))
    return _sequence("branch and choose", [
        _set(SCORES_KEY, dict),
        _set(CHOSEN_KEY, list),
        _set(SEEDS_KEY, dict(seeds) if by_seed else {}),
        Reset(keep_context=True, **svc),
        RestoreWorld(world, "start", segment="main"),
        RunSimSteps(world, steps=warmup),
        *rounds,
    ])


def run_tree(tree: py_trees.trees.BehaviourTree, timeout_s: float, period_s: float = 0.002,
             on_tick=None) -> Status:
    """Tick `tree` every `period_s` until its root is not RUNNING; returns the root's status.

    Runs in the caller's thread while an executor spins the tree's node in another. On timeout the
    tree is halted (every running behaviour terminates) and TimeoutError names where it stood.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        tree.tick()
        if on_tick is not None:
            on_tick(tree)
        if tree.root.status != Status.RUNNING:
            return tree.root.status
        if time.monotonic() > deadline:
            tip = tree.root.tip()
            where = f"{tip.name}: {tip.feedback_message}" if tip is not None else "?"
            tree.root.stop(Status.INVALID)
            raise TimeoutError(f"tree {tree.root.name!r} still running after {timeout_s:g} s, at {where}")
        time.sleep(period_s)
