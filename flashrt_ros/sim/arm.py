"""A point-mass arm for demos, tests and training the tiny preset's heads (no ROS).

`action_dim` joints; the first row of each action chunk is a joint velocity command (clipped to
+-2 rad/s), low-pass filtered and integrated at the control period; a target pose drifts slowly
within the workspace the episodes start in (+-TARGET_RANGE rad per joint, reflected at its
edges), so a run of any length stays where the tiny preset's heads were trained.
The observation is [target - position, joint velocities, joint positions] cut or zero-padded to
`obs_dim`: the tiny preset's 14 values hold what the task needs (the error to close and how fast
it is closing). Deterministic given its seed, so runs can be compared.

`expert_action` is the scripted expert the tiny preset's heads are trained to imitate
(`flashrt-ros train-heads`, flashrt_ros/sim/imitation.py): a PD law on the target error.
"""
from __future__ import annotations

import copy

import numpy as np

CMD_LIMIT = 2.0
TARGET_RANGE = 1.0
EXPERT_KP, EXPERT_KD = 3.0, 0.5


class SimArm:
    def __init__(self, obs_dim: int, action_dim: int, dt: float, seed: int = 0):
        self.obs_dim, self.action_dim, self.dt = obs_dim, action_dim, dt
        self.rng = np.random.default_rng(seed)
        self.q = np.zeros(action_dim)
        self.qd = np.zeros(action_dim)
        self.target = self.rng.uniform(-TARGET_RANGE, TARGET_RANGE, action_dim)
        self.t = 0

    def observe(self) -> np.ndarray:
        full = np.concatenate([self.target - self.q, self.qd, self.q])
        obs = np.zeros(self.obs_dim, dtype=np.float32)
        n = min(self.obs_dim, full.size)
        obs[:n] = full[:n]
        return obs

    def apply(self, action_row: np.ndarray) -> None:
        cmd = np.clip(np.asarray(action_row[: self.action_dim], dtype=np.float64), -CMD_LIMIT,
                      CMD_LIMIT)
        self.qd = 0.8 * self.qd + 0.2 * cmd
        self.q = np.clip(self.q + self.dt * self.qd, -np.pi, np.pi)   # joint limits
        self.t += 1
        target = self.target + 0.01 * self.rng.standard_normal(self.action_dim)
        self.target = np.where(target > TARGET_RANGE, 2 * TARGET_RANGE - target,
                               np.where(target < -TARGET_RANGE, -2 * TARGET_RANGE - target, target))

    def error(self) -> float:
        return float(np.linalg.norm(self.target - self.q))

    def copy(self) -> "SimArm":
        return copy.deepcopy(self)


def expert_action(arm: SimArm) -> np.ndarray:
    """The scripted expert's velocity command for the arm's current state."""
    err = arm.target - arm.q
    return np.clip(EXPERT_KP * err - EXPERT_KD * arm.qd, -CMD_LIMIT, CMD_LIMIT)
