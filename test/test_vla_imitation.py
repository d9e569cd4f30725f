"""The smolvla-tiny preset and how it is trained (flashrt_ros/sim/imitation_vla.py, no ROS).

The shipped preset (`config/presets/smolvla-tiny/`, written by `flashrt-ros train-vla`) must load as
a LeRobot SmolVLA directory and steer the simulated arm from the camera's frames and its joints
better than sending no command. The training's loss is LeRobot's flow matching on the same network
the runtime samples (held together here with a one-step sampler), its time embedding LeRobot's, and
`save_lerobot` writes what the loader reads back.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from flashrt_ros.core.config import RuntimeConfig
from flashrt_ros.core.models.smolvla.checkpoint_smolvla import load_weights, read_smolvla_dir
from flashrt_ros.core.models.smolvla.modeling_smolvla import SmolVLAModel, sinusoidal_time_embedding
from flashrt_ros.core.models.smolvla.synthetic_smolvla import save_lerobot, write_checkpoint
from flashrt_ros.core.runtime import PolicyRuntime
from flashrt_ros.sim import imitation_vla as iv
from flashrt_ros.sim.arm import SimArm, expert_action
from flashrt_ros.sim.camera import ArmCamera

CPU = RuntimeConfig(device="cpu", rollback_depth=0)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(policy_dir: str):
    src = read_smolvla_dir(policy_dir)
    model = SmolVLAModel(src.cfg)
    load_weights(model, src.weights)
    return src, model


def test_the_shipped_preset_steers_the_arm_from_its_camera():
    rt = PolicyRuntime.from_pretrained(iv.PRESET, CPU)
    c = rt.model_cfg
    assert c.cameras == (iv.IMAGE_KEY,) and c.action_dim == iv.JOINTS
    ev = iv.evaluate(rt, ArmCamera(), episodes=2, steps=180, who=("policy", "idle"))
    assert ev.policy < 0.5 * ev.idle, ev


def test_the_time_embedding_is_lerobots():
    c = iv.SHAPES
    dim = int(c.text.hidden_size * c.expert_width_multiplier)
    for t in (0.001, 0.37, 1.0):
        got = iv.time_embedding(torch.tensor(t, dtype=torch.float32), dim, 4e-3, 4.0)
        assert torch.equal(got, sinusoidal_time_embedding(t, dim, 4e-3, 4.0))


def test_flow_times_are_lerobots_beta():
    torch.manual_seed(0)
    t = iv.sample_time(20000)
    assert 0.001 <= t.min() and t.max() <= 1.0
    assert abs(t.mean().item() - (0.6 * 0.999 + 0.001)) < 0.01    # Beta(1.5, 1) has mean 0.6


def test_the_loss_trains_the_network_the_runtime_samples(tmp_path):
    """With one flow step the runtime's chunk is noise - v(noise, t=1), so the training loss at
    t = 1 must be the squared distance of that chunk (normalised) from the actions."""
    shapes = dataclasses.replace(iv.SHAPES, num_steps=1)
    policy_dir = write_checkpoint(str(tmp_path), shapes, seed=3)
    rt = PolicyRuntime.from_pretrained(policy_dir, CPU)
    src, model = _model(policy_dir)
    arm = SimArm(6, iv.JOINTS, iv.DT, seed=7)
    batch = iv.batch_of(arm, ArmCamera())
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(shapes.chunk_size, shapes.max_action_dim, generator=gen)
    actions = torch.randn(shapes.chunk_size, shapes.max_action_dim, generator=gen)
    chunk = torch.from_numpy(rt.predict_action_chunk(batch, noise=noise.numpy()))
    sampled = src.normalizer.normalize(iv.ACTION_KEY, chunk)

    loss_fn = iv.FlowMatching(model, *(torch.from_numpy(x) for x in src.tokenizer(iv.TASK)))
    state = src.normalizer.normalize(iv.STATE_KEY, torch.from_numpy(batch[iv.STATE_KEY]))
    kv, mask = loss_fn.frozen_prefix(iv.prepare_frame(batch[iv.IMAGE_KEY], shapes.resize)[None],
                                     state[None])
    loss = loss_fn(kv, mask, actions[None], noise=noise[None], t=torch.ones(1))
    expected = ((actions - sampled) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_save_lerobot_writes_what_the_loader_reads(tmp_path):
    src, model = _model(write_checkpoint(str(tmp_path / "init"), iv.SHAPES, seed=1))
    with torch.no_grad():
        model.action_out_proj.bias.add_(1.0)
    stats = {f"{key}.{s}": torch.full((dim,), v) for key, dim in
             ((iv.STATE_KEY, iv.SHAPES.state_dim), (iv.ACTION_KEY, iv.SHAPES.action_dim))
             for s, v in (("mean", 0.25), ("std", 2.0))}
    out = save_lerobot(model, iv.SHAPES, str(tmp_path / "saved"), stats)
    assert out == str(tmp_path / "saved" / iv.PRESET)
    assert os.path.isfile(os.path.join(out, "backbone", "config.json"))
    back, again = _model(out)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(back.normalizer.stats[iv.ACTION_KEY]["std"], stats["action.std"])

    # refused before anything is written
    with pytest.raises(ValueError, match="action.std"):
        save_lerobot(model, iv.SHAPES, str(tmp_path / "bad"), {k: v for k, v in stats.items()
                                                                if k != "action.std"})
    with pytest.raises(ValueError, match="model_config"):
        save_lerobot(model, dataclasses.replace(iv.SHAPES, max_action_dim=4),
                     str(tmp_path / "bad"), stats)
    assert not (tmp_path / "bad").exists()


def test_demonstrations_are_the_frames_joints_and_the_experts_next_commands():
    arm = SimArm(6, iv.JOINTS, iv.DT, seed=4)
    chunk = iv.expert_chunk(arm, 6)
    np.testing.assert_allclose(chunk[0], expert_action(arm), rtol=1e-6)
    assert arm.t == 0                                   # rolled out on a copy

    camera = ArmCamera()
    demos = iv.collect(episodes=2, steps=3, seed=10, camera=camera)
    assert len(demos) == 6
    assert demos.actions.shape == (6, iv.SHAPES.chunk_size, iv.JOINTS)
    # the first step of the first episode, made again
    rng = np.random.default_rng(10)
    first = SimArm(3 * iv.JOINTS, iv.JOINTS, iv.DT, seed=10)
    first.q = rng.uniform(-1.5, 1.5, iv.JOINTS)
    batch = iv.batch_of(first, camera)
    assert torch.equal(demos.state[0], torch.from_numpy(batch[iv.STATE_KEY]))
    assert torch.equal(demos.pixels[0], iv.prepare_frame(batch[iv.IMAGE_KEY], iv.SHAPES.resize))
    np.testing.assert_allclose(demos.actions[0].numpy(),
                               iv.expert_chunk(first, iv.SHAPES.chunk_size), rtol=1e-6)


def test_train_writes_a_directory_the_runtime_serves(tmp_path):
    cfg = iv.TrainConfig(episodes=2, steps=6, train_steps=3, batch=4, eval_episodes=1)
    policy_dir, ev = iv.train(str(tmp_path), cfg, say=lambda m: None)
    assert policy_dir == str(tmp_path / iv.PRESET)
    assert np.isfinite([ev.policy, ev.idle, ev.expert]).all()
    rt = PolicyRuntime.from_pretrained(policy_dir, CPU)
    assert rt.predict_action_chunk(iv.batch_of(SimArm(6, iv.JOINTS, iv.DT), ArmCamera())).shape \
        == (iv.SHAPES.chunk_size, iv.JOINTS)


def test_train_vla_refuses_to_replace_what_is_not_a_checkpoint(tmp_path, capsys):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    assert iv.main(["--out", str(tmp_path)]) == 2
    assert "expected a new directory or a SmolVLA checkpoint" in capsys.readouterr().err
    assert keep.read_text() == "mine"
