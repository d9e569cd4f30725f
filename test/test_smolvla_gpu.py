"""SmolVLA on CUDA: the captured plans against the eager path and against LeRobot 0.4.4.

On every fixture case of test_smolvla.py (test/data/smolvla):

* kernels: the default runtime (core/fused.py's Triton kernels, the default on CUDA) equals the
  torch path (kernels="reference") within the GPU tolerance; the kernels as SmolVLA calls them
  against their references: test_fused_kernels.py;
* bitwise: each plan's graph replay equals the same function run eagerly from the same arena
  bytes; the default runtime (`RuntimeConfig()`, plans captured) gives the same chunk bytes and
  prefix keys/values as `RuntimeConfig(cuda_graphs=False)` for the same noise, and for the same
  seed of the arena's sampler; a capsule restored under graphs continues byte for byte;
* cross-device: chunks and a `select_action` episode under graphs equal LeRobot's reference (run
  in float32 on the CPU) within GPU_ATOL + GPU_RTOL * |LeRobot| per value. The runtime runs with
  PyTorch's defaults, which compute cuDNN convolutions (the patch embedding) in TF32 (10-bit
  mantissa); matmuls stay IEEE float32. Measured on an H100 (torch 2.11): at most 9.5e-7 over
  every chunk and episode (|actions| up to 6); the tolerance leaves room for TF32 convolutions,
  which, emulated on the CPU, move the actions by up to 1.2e-5. The tests print the differences.

The synthetic checkpoints the CUDA benchmark serves (bench/bench_smolvla.py) are checked here too,
on the CPU: the fixture layout, and the published shapes' size.

Needs a GPU for all but the synthetic checks (marker `gpu`: skipped without one): run on the
device with `python -m pytest -s test/test_smolvla_gpu.py -p no:cacheprovider`.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from flashrt_ros.core.config import RuntimeConfig
from flashrt_ros.core.models.smolvla import synthetic_smolvla
from flashrt_ros.core.runtime import PolicyRuntime
from test_smolvla import CASES, DATA, chunk_batch, episode_batch, reference, run_restore_run_again

gpu = pytest.mark.gpu
GPU_ATOL, GPU_RTOL = 1e-4, 1e-4


@functools.cache
def runtime(case: str, graphs: bool = True, kernels: str = "auto"):
    """One runtime per case and path (the tests of a case share it and reset what they use).
    kernels="reference": the torch forms of the elementwise chains instead of core/fused.py's."""
    return PolicyRuntime.from_pretrained(
        os.path.join(DATA, case), RuntimeConfig(device="cuda", cuda_graphs=graphs, kernels=kernels))


def close_to_lerobot(ours, theirs, what: str) -> None:
    theirs = np.asarray(theirs)
    err = np.abs(ours - theirs)
    print(f"{what}: max |CUDA graphs - LeRobot (CPU)| {err.max():.3g}")
    assert (err <= GPU_ATOL + GPU_RTOL * np.abs(theirs)).all(), \
        f"{what}: max |diff| {err.max():.3g} over {GPU_ATOL} + {GPU_RTOL} * |LeRobot|"


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@gpu
@pytest.mark.parametrize("case", CASES)
def test_the_default_runtime_captures_every_plan(case):
    rt = runtime(case)
    assert rt.use_graphs and {n for n, p in rt.plans.items() if p.captured} == \
        {"noise", "prefix", "denoise"}
    assert not any(p.captured for p in runtime(case, graphs=False).plans.values())


@gpu
@pytest.mark.parametrize("case", CASES)
def test_the_triton_kernels_equal_the_torch_path(case):
    """The default runtime (core/fused.py's kernels) against kernels="reference" (torch), both
    captured, same batch and noise: chunks and prefix keys/values within the GPU tolerance."""
    ref, meta = reference(case)
    fast, torch_path = runtime(case), runtime(case, kernels="reference")
    assert fast.model.model.fused and not torch_path.model.model.fused
    batch, noise = chunk_batch(ref, meta, 0), ref["chunk.noise"][0].numpy()
    a = fast.predict_action_chunk(batch, noise=noise)
    b = torch_path.predict_action_chunk(batch, noise=noise)
    err = np.abs(a - b)
    print(f"{case}: max |Triton - torch| chunk {err.max():.3g}, keys/values "
          f"{(fast.arena['kv'] - torch_path.arena['kv']).abs().max().item():.3g}")
    assert (err <= GPU_ATOL + GPU_RTOL * np.abs(b)).all(), f"max |diff| {err.max():.3g}"
    torch.testing.assert_close(fast.arena["kv"], torch_path.arena["kv"], atol=GPU_ATOL,
                               rtol=GPU_RTOL)


@gpu
@pytest.mark.parametrize("case", CASES)
def test_each_replay_equals_its_function_run_eagerly(case):
    """plan.run() (replay) vs plan.run_eager() from the same arena and input bytes."""
    ref, meta = reference(case)
    rt = runtime(case)
    rt.predict_action_chunk(chunk_batch(ref, meta, 0), noise=ref["chunk.noise"][0].numpy())
    start = rt.arena.base.clone()
    for name, plan in rt.plans.items():
        outs = []
        for run in (plan.run, plan.run_eager):
            rt.arena.base.copy_(start)
            run()
            torch.cuda.synchronize()
            outs.append((rt.arena.base.clone(), rt.io.noise.clone(), rt.io.chunk.clone()))
        for x, y in zip(*outs):
            assert torch.equal(x, y), f"plan {name}: replay differs from eager"
    rt.arena.base.copy_(start)


@gpu
@pytest.mark.parametrize("case", CASES)
def test_graph_chunks_equal_eager_bytes_and_lerobot(case):
    ref, meta = reference(case)
    graphs, eager = runtime(case), runtime(case, graphs=False)
    for k in range(meta["chunk_calls"]):
        batch, noise = chunk_batch(ref, meta, k), ref["chunk.noise"][k].numpy()
        a = graphs.predict_action_chunk(batch, noise=noise)
        b = eager.predict_action_chunk(batch, noise=noise)
        assert same_bytes(a, b), f"chunk {k}: max |graphs - eager| {np.abs(a - b).max():.3g}"
        assert torch.equal(graphs.arena["kv"], eager.arena["kv"])
        close_to_lerobot(a, ref["chunk.action"][k].numpy(), f"{case} chunk {k}")


@gpu
@pytest.mark.parametrize("case", CASES)
def test_the_sampled_noise_is_the_same_bytes_under_graphs(case):
    ref, meta = reference(case)
    graphs, eager = runtime(case), runtime(case, graphs=False)
    batch = chunk_batch(ref, meta, 0)
    for rt in (graphs, eager):
        rt.seed_noise(11)
    for _ in range(2):      # the second call reads the sampler's counter the first advanced
        assert same_bytes(graphs.predict_action_chunk(batch), eager.predict_action_chunk(batch))


@gpu
@pytest.mark.parametrize("case", CASES)
def test_a_select_action_episode_under_graphs_equals_lerobot(case):
    ref, meta = reference(case)
    rt = runtime(case)
    rt.reset()
    actions = []
    for t in range(meta["episode_steps"]):
        if t in meta["episode_reset_before"]:
            rt.reset()
        actions.append(rt.select_action(episode_batch(ref, meta, t),
                                        noise=ref["episode.noise"][t].numpy()))
    close_to_lerobot(np.stack(actions), ref["episode.action"].numpy(), f"{case} episode")


@gpu
@pytest.mark.parametrize("case", CASES)
def test_a_capsule_restored_under_graphs_continues_byte_identically(case, tmp_path):
    ref, meta = reference(case)
    rt = runtime(case)
    _, first, again, after = run_restore_run_again(rt, ref, meta, tmp_path)
    assert all(same_bytes(a, b) for a, b in zip(first, again))
    assert torch.equal(rt.live_state(), after)


# -- the synthetic checkpoints of the benchmark (CPU) -----------------------------------------------
def _tensor_layout(path: str) -> dict:
    with safe_open(path, "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def test_a_synthetic_checkpoint_has_the_fixture_layout_and_serves(tmp_path):
    """At one_cam's shapes the writer gives one_cam's files: the same JSON, the same tensor names,
    shapes and dtypes; the loader serves it."""
    import dataclasses
    shapes = dataclasses.replace(synthetic_smolvla.TINY, cameras=(("top", (3, 40, 56)),),
                                 chunk_size=10, n_action_steps=5, max_state_dim=8, max_action_dim=8)
    path = synthetic_smolvla.write_checkpoint(str(tmp_path), shapes, seed=3)
    fixture = os.path.join(DATA, "one_cam")
    for name in ("config.json", "policy_preprocessor.json", "policy_postprocessor.json"):
        with open(os.path.join(path, name)) as a, open(os.path.join(fixture, name)) as b:
            assert json.load(a) == json.load(b), name
    for name in ("model.safetensors",
                 "policy_preprocessor_step_5_normalizer_processor.safetensors"):
        assert _tensor_layout(os.path.join(path, name)) == \
            _tensor_layout(os.path.join(fixture, name)), name
    torch.set_num_threads(1)
    rt = PolicyRuntime.from_pretrained(path, RuntimeConfig(device="cpu"))
    ref, meta = reference("one_cam")
    chunk = rt.predict_action_chunk(chunk_batch(ref, meta, 0))
    assert chunk.shape == (10, 6) and np.isfinite(chunk).all()


def test_the_published_shapes_hold_smolvlas_450m_values():
    total, read = synthetic_smolvla.parameter_count(synthetic_smolvla.PUBLISHED)
    assert abs(total - 450e6) < 0.01 * 450e6, total
    # the loader reads all but the LM head and the final norm: 49280 x 960 + 960 values
    assert total - read == 49280 * 960 + 960
