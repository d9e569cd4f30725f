"""The tiny preset's shipped heads do the simulated arm's task (no ROS).

`config/presets/tiny.policy.safetensors` was written by `flashrt-ros train-heads` (behaviour
cloning of the arm's scripted expert on the seeded tiny backbone). The runtime must load it with
the preset, and the policy must close the arm's error: over the same episodes, at most half the
error of sending no command at all.
"""
from __future__ import annotations

import numpy as np
import torch

from flashrt_ros.core.config import RuntimeConfig
from flashrt_ros.core.runtime import PolicyRuntime
from flashrt_ros.sim.arm import TARGET_RANGE, SimArm, expert_action
from flashrt_ros.sim.imitation import _chunk_targets, evaluate



def test_tiny_loads_its_trained_heads_and_they_reach_the_target():
    torch.set_num_threads(1)
    rt = PolicyRuntime.from_pretrained("tiny", RuntimeConfig(device="cpu", rollback_depth=0))
    assert rt.model.untrained == ("backbone",)
    ev = evaluate(rt, episodes=2, steps=180, who=("policy", "idle"))
    assert ev.policy < 0.5 * ev.idle, ev


def test_the_policy_holds_the_moving_target_for_minutes():
    """The demo runs until Ctrl-C: three minutes at 30 Hz of the shipped policy on one arm (a
    seed on which heads trained on short episodes drove the arm into its joint limits after
    2.4 minutes) never lose the target once reached, and keep the error near the expert's."""
    torch.set_num_threads(1)
    rt = PolicyRuntime.from_pretrained("tiny", RuntimeConfig(device="cpu", rollback_depth=0))
    arm = SimArm(obs_dim=14, action_dim=7, dt=1 / 30, seed=101)
    rt.set_instruction("reach the moving target")
    errors = []
    for _ in range(3 * 60 * 30):
        arm.apply(rt.step(arm.observe())[0])
        errors.append(arm.error())
    worst = max(errors[300:])
    assert worst < 1.0, f"the arm lost the target: error {worst:.2f} at step " \
                        f"{300 + errors[300:].index(worst)}"
    assert np.mean(errors[-1800:]) < 0.2, np.mean(errors[-1800:])


def test_the_target_walks_within_the_workspace():
    arm = SimArm(obs_dim=14, action_dim=7, dt=1 / 30, seed=5)
    start = arm.target.copy()
    for _ in range(20000):
        arm.apply(np.zeros(7))
        assert np.abs(arm.target).max() <= TARGET_RANGE
    assert np.abs(arm.target - start).max() > 0.3, "it still moves"


def test_the_observation_carries_the_target_error():
    arm = SimArm(obs_dim=14, action_dim=7, dt=1 / 30, seed=3)
    obs = arm.observe()
    np.testing.assert_allclose(obs[:7], arm.target - arm.q, rtol=1e-6)
    assert np.linalg.norm(obs[:7]) > 0.1
    # the expert closes the error it sees
    for _ in range(300):
        arm.apply(expert_action(arm))
    assert arm.error() < 0.2


def test_chunk_targets_are_the_next_commands():
    cmds = np.arange(5, dtype=np.float32)[:, None]
    got = _chunk_targets(cmds, horizon=3)[:, :, 0]
    assert got.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4], [4, 4, 4]]
