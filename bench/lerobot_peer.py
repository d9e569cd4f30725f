"""LeRobot 0.4.4's own SmolVLA beside the runtime: the peer of bench/bench_smolvla.py.

`load(policy_dir, device, dtype)` builds LeRobot's `SmolVLAPolicy` and its pre/post processors
from a LeRobot SmolVLA directory (the benchmark's synthetic checkpoint) with LeRobot's own
`from_pretrained`, refuses to go on unless every tensor of `model.safetensors` is in the policy
with the same value (LeRobot loads with `strict=False`, which would pass a misnamed tensor), and
holds it as LeRobot holds SmolVLA when it loads SmolVLM2's weights: the VLM and the action expert
in `dtype` (`SmolVLMWithExpertModel` loads the VLM with `torch_dtype="bfloat16"`, and builds the
expert from the VLM's text config, whose dtype it follows), the projections around the expert
(state, action in/out, time MLP) in float32. `Peer.predict_action_chunk(batch, noise)` goes from a
robot's batch to the chunk in the dataset's units as LeRobot's `predict_action`
(lerobot/utils/control_utils.py) does, with `predict_action_chunk` in place of `select_action`:
under `torch.inference_mode()`, `prepare_observation_for_inference` (uint8 [H, W, 3] frames to
float32 [1, 3, H, W] in [0, 1] on the device), the preprocessor, the policy, the postprocessor
(which ends on the CPU).

Where LeRobot comes from. LeRobot 0.4.4 pins torch<2.11 and transformers<5 and pulls its dataset,
video and robot extras; the GPU machine has torch 2.11 and transformers 5 and no network. There it
travels as wheels (tools/gpu-peer-wheels.sh): lerobot without its dependencies, what its SmolVLA,
processor and policy modules import at their top level, and transformers 4.57.6 with the
tokenizers and huggingface_hub it needs, installed into their own folder that goes first on
PYTHONPATH. torch stays the machine's: the pin is metadata (the reference fixtures of
test/data/smolvla were written by LeRobot on a newer torch).

Under transformers 5 LeRobot's SmolVLA runs but is not the same function: transformers 5 rewrote
`SmolVLMVisionEmbeddings`' patch position ids (4.57 multiplies the patch coordinates by 1 - 1e-6
before bucketing them, 5.x clamps them below 1), so the vision tower reads other position
embeddings (on the fixtures, chunks move by up to 1.1e-2; with 4.57's embeddings put back they are
bit-identical). The runtime follows LeRobot as pinned; `versions()` names the transformers the
peer ran on, and the benchmark's table says it.

Two modules of LeRobot's import chain are not SmolVLA's and do not load on that machine; `imports()`
puts stand-ins in their place, and the code that runs is LeRobot's, unchanged:

  * `av` (PyAV, a 40 MB wheel with FFmpeg inside), only where it is not installed:
    lerobot/processor/normalize_processor.py imports lerobot.datasets.lerobot_dataset, which
    imports lerobot.datasets.video_utils, which imports av and reads `av.logging.WARNING` in a
    default argument. Nothing on a policy's path decodes or encodes video. The stand-in has
    `logging.WARNING` (30, PyAV's value) and raises AttributeError on anything else.
  * `lerobot.policies.groot`'s `__init__`, under transformers 5 only: lerobot/policies/__init__.py
    imports GR00T's config through that package, whose `__init__` imports GR00T's model, whose
    config is a dataclass that transformers 5's `PretrainedConfig` (itself a dataclass now) makes
    fail at import ("non-default argument follows default argument"). The package is registered
    with its path but without running its `__init__`, so lerobot/policies/__init__.py still
    imports `lerobot.policies.groot.configuration_groot`, and GR00T is never used.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

import numpy as np
import torch

LEROBOT_VERSION = "0.4.4"
AV_WARNING = 30            # av.logging.WARNING in PyAV


class _Missing(types.ModuleType):
    """A stand-in module: the attributes it was given, AttributeError for anything else (so
    `hasattr` probes see a package without that feature)."""

    def __getattr__(self, name):
        raise AttributeError(f"{self.__name__}.{name}: {self.__name__} is a stand-in put in place by "
                          f"bench/lerobot_peer.py (the real package is not installed); nothing "
                          f"on SmolVLA's path should use it")


def _stand_in_av() -> bool:
    """Registers the `av` stand-in where PyAV is not installed; returns whether it did."""
    if "av" in sys.modules or importlib.util.find_spec("av") is not None:
        return False
    av, log = _Missing("av"), _Missing("av.logging")
    # a spec, so that a later importlib.util.find_spec("av") answers instead of raising
    # ValueError; transformers is imported before (imports()), so its check saw no av
    av.__spec__ = importlib.machinery.ModuleSpec("av", None)
    log.__spec__ = importlib.machinery.ModuleSpec("av.logging", None)
    log.WARNING = AV_WARNING
    av.logging = log
    sys.modules["av"], sys.modules["av.logging"] = av, log
    return True


def _bare_groot() -> bool:
    """Under transformers 5: registers lerobot.policies.groot without running its __init__."""
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5 or "lerobot.policies.groot" in sys.modules:
        return False
    spec = importlib.util.find_spec("lerobot")
    pkg = types.ModuleType("lerobot.policies.groot")
    pkg.__path__ = [os.path.join(os.path.dirname(spec.origin), "policies", "groot")]
    pkg.__package__ = "lerobot.policies.groot"
    sys.modules["lerobot.policies.groot"] = pkg
    return True


_IMPORTED: dict = {}


def imports() -> dict:
    """LeRobot's SmolVLA modules, imported once (stand-ins as the module docstring says). Raises
    ImportError with what is missing and how to get it when LeRobot cannot be imported."""
    if _IMPORTED:
        return _IMPORTED
    os.environ.setdefault("HF_HUB_OFFLINE", "1")     # the backbone is a local folder
    if importlib.util.find_spec("lerobot") is None:
        raise ImportError("lerobot is not installed (on the GPU machine: tools/gpu-peer-wheels.sh "
                          "fetches its wheels into .whl-lerobot/; install them with pip --target "
                          "and put that folder first on PYTHONPATH)")
    import transformers  # noqa: F401 - first: its optional-package checks see no stand-in
    stand_ins = [name for name, put in (("av", _stand_in_av()),
                                        ("lerobot.policies.groot (package __init__ not run)",
                                         _bare_groot())) if put]
    try:
        import lerobot
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
        from lerobot.policies.smolvla import processor_smolvla  # noqa: F401 - registers its steps
        from lerobot.policies.utils import prepare_observation_for_inference
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.processor import PolicyProcessorPipeline
        from lerobot.processor.converters import (policy_action_to_transition,
                                                  transition_to_policy_action)
    except ImportError as e:
        raise ImportError(f"LeRobot's SmolVLA does not import: {type(e).__name__}: {e} (a "
                          f"dependency missing from .whl-lerobot/? see tools/gpu-peer-wheels.sh)") \
            from e
    if lerobot.__version__ != LEROBOT_VERSION:
        raise ImportError(f"lerobot: expected {LEROBOT_VERSION} (the version the runtime is held "
                          f"equal to), found {lerobot.__version__}")
    _IMPORTED.update(SmolVLAPolicy=SmolVLAPolicy, PreTrainedConfig=PreTrainedConfig,
                     PolicyProcessorPipeline=PolicyProcessorPipeline,
                     prepare_observation_for_inference=prepare_observation_for_inference,
                     policy_action_to_transition=policy_action_to_transition,
                     transition_to_policy_action=transition_to_policy_action,
                     stand_ins=stand_ins)
    return _IMPORTED


def versions() -> dict:
    """What the peer ran on (after `imports()`)."""
    import lerobot
    import transformers
    return {"lerobot": lerobot.__version__, "transformers": transformers.__version__,
            "stand_ins": list(imports()["stand_ins"])}


class Peer:
    """LeRobot's policy and processors on one device, driven as `predict_action` drives them."""

    def __init__(self, policy, pre, post, device: torch.device):
        self.policy, self.pre, self.post, self.device = policy, pre, post, device

    def predict_action_chunk(self, batch: dict, noise: np.ndarray | None = None) -> np.ndarray:
        """batch: the runtime's robot batch (uint8 [H, W, 3] frames, float32 state, task);
        noise: float32 [chunk_size, max_action_dim] or None. Returns [chunk_size, action_dim]."""
        lr = imports()
        obs = {k: v for k, v in batch.items() if k != "task"}
        if noise is not None:
            noise = torch.from_numpy(np.asarray(noise, dtype=np.float32))[None].to(self.device)
        with torch.inference_mode():
            obs = lr["prepare_observation_for_inference"](obs, self.device, batch["task"], None)
            chunk = self.post(self.policy.predict_action_chunk(self.pre(obs), noise=noise))
        return chunk[0].numpy()


def _check_weights(policy, path: str) -> None:
    """Every tensor of the checkpoint in the policy, same shape and value; no policy tensor left
    out (LeRobot's from_pretrained loads with strict=False)."""
    from safetensors import safe_open
    state = policy.state_dict()
    with safe_open(path, "pt", device="cpu") as f:
        keys = set(f.keys())
        missing, extra = sorted(set(state) - keys), sorted(keys - set(state))
        if missing or extra:
            raise RuntimeError(f"LeRobot's SmolVLAPolicy and {path} name other tensors: the "
                               f"policy's not in the file {missing[:5]}, the file's not in the "
                               f"policy {extra[:5]}")
        differ = [k for k in sorted(keys)
                  if not torch.equal(state[k].cpu(), f.get_tensor(k).to(state[k].dtype))]
    if differ:
        raise RuntimeError(f"LeRobot's SmolVLAPolicy holds other values than {path} in "
                           f"{len(differ)} tensors, e.g. {differ[:5]}")


def load(policy_dir: str, device: torch.device, dtype: torch.dtype) -> Peer:
    """LeRobot's policy and processors from `policy_dir` (see the module docstring)."""
    lr = imports()
    policy_dir = os.path.abspath(policy_dir)
    config = lr["PreTrainedConfig"].from_pretrained(policy_dir)
    # vlm_model_name may be relative to the policy directory; LeRobot would read it against the
    # working directory
    backbone = os.path.normpath(os.path.join(policy_dir, config.vlm_model_name))
    config.vlm_model_name, config.device = backbone, "cpu"
    policy = lr["SmolVLAPolicy"].from_pretrained(policy_dir, config=config)
    _check_weights(policy, os.path.join(policy_dir, "model.safetensors"))
    policy.model.vlm_with_expert.to(dtype)
    policy.to(device)
    policy.config.device = str(device)
    policy.eval()
    overrides = {"device_processor": {"device": str(device)},
                 "tokenizer_processor": {"tokenizer_name": backbone}}
    pre = lr["PolicyProcessorPipeline"].from_pretrained(
        policy_dir, config_filename="policy_preprocessor.json", overrides=overrides)
    post = lr["PolicyProcessorPipeline"].from_pretrained(
        policy_dir, config_filename="policy_postprocessor.json",
        to_transition=lr["policy_action_to_transition"],
        to_output=lr["transition_to_policy_action"])
    return Peer(policy, pre, post, device)
