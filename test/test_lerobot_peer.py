"""The peer column of bench/bench_smolvla.py: LeRobot's own SmolVLA beside the runtime
(bench/lerobot_peer.py).

Without LeRobot (the project's venv) the benchmark still runs and its table says why the peer is
missing. Where LeRobot 0.4.4 imports on the transformers it pins (its wheels of
tools/gpu-peer-wheels.sh first on PYTHONPATH), the peer, driven from the robot's uint8 frames,
reproduces the outputs LeRobot wrote into the reference fixtures, and a checkpoint whose tensors
LeRobot would not read is refused (its own from_pretrained loads with strict=False)."""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "smolvla")
CASES = sorted(c for c in os.listdir(FIXTURES)
               if os.path.isfile(os.path.join(FIXTURES, c, "reference.safetensors")))


def lerobot_on_its_transformers() -> str:
    """'' where LeRobot can run here as pinned, else why not."""
    if importlib.util.find_spec("lerobot") is None:
        return "lerobot is not installed"
    import transformers
    if int(transformers.__version__.split(".")[0]) >= 5:
        return (f"transformers {transformers.__version__}: LeRobot 0.4.4 pins transformers<5, "
                f"whose SmolVLM vision position ids differ (bench/lerobot_peer.py)")
    return ""


@pytest.mark.slow
def test_the_benchmark_runs_without_lerobot_and_says_why(tmp_path):
    if importlib.util.find_spec("lerobot") is not None:
        pytest.skip("lerobot is installed here")
    from bench import bench_smolvla
    torch_threads = torch.get_num_threads()
    try:
        bench_smolvla.main(["--shapes", "tiny", "--device", "cpu", "--iters", "2",
                            "--out", str(tmp_path / "smolvla")])
    finally:
        torch.set_num_threads(torch_threads)
    with open(tmp_path / "smolvla.json", encoding="utf-8") as f:
        results = json.load(f)["results"]
    assert "peer" not in results and "lerobot is not installed" in results["peer_error"]
    assert results["eager"]["predict_action_chunk"]["n"] == 2 and results["bytes"]["chunk_equal"]
    md = (tmp_path / "smolvla.md").read_text(encoding="utf-8")
    assert "**LeRobot's peer: not run**: ImportError: lerobot is not installed" in md


def fixture_batch(ref: dict, meta: dict, k: int) -> dict:
    """Chunk call k of a fixture as a robot gives it: the uint8 [H, W, 3] frames its float images
    were made from (img = frame / 255), the state, the task."""
    batch = {"observation.state": ref["chunk.observation.state"][k].numpy(),
             "task": meta["tasks"][f"chunk.{k}"]}
    for cam in meta["cameras"]:
        img = ref[f"chunk.observation.images.{cam}"][k]
        batch[f"observation.images.{cam}"] = \
            (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return batch


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_the_peer_reproduces_lerobots_fixtures(case):
    why = lerobot_on_its_transformers()
    if why:
        pytest.skip(why)
    from safetensors import safe_open
    from bench import lerobot_peer
    torch.set_num_threads(1)
    path = os.path.join(FIXTURES, case)
    peer = lerobot_peer.load(path, torch.device("cpu"), torch.float32)
    with safe_open(os.path.join(path, "reference.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["smolvla_reference"])
        ref = {k: f.get_tensor(k) for k in f.keys()}
    atol, rtol = meta["tolerances"]["atol"], meta["tolerances"]["rtol"]
    for k in range(meta["chunk_calls"]):
        got = peer.predict_action_chunk(fixture_batch(ref, meta, k), ref["chunk.noise"][k].numpy())
        want = ref["chunk.action"][k].numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


def test_the_peer_refuses_a_checkpoint_it_would_not_read(tmp_path):
    why = lerobot_on_its_transformers()
    if why:
        pytest.skip(why)
    from safetensors.torch import load_file, save_file
    from bench import lerobot_peer
    src = os.path.join(FIXTURES, "one_cam")
    case = tmp_path / "one_cam"
    shutil.copytree(src, case, ignore=shutil.ignore_patterns("reference.safetensors"))
    shutil.copytree(os.path.join(FIXTURES, "backbones"), tmp_path / "backbones")
    tensors = load_file(case / "model.safetensors")
    name = "model.state_proj.weight"
    tensors["model.state_projection.weight"] = tensors.pop(name)
    save_file(tensors, case / "model.safetensors")
    with pytest.raises(RuntimeError, match=r"model\.state_proj\.weight.*model\.state_projection"):
        lerobot_peer.load(str(case), torch.device("cpu"), torch.float32)
