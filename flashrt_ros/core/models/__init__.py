"""Model families, one folder each. The Qwen3.5 policy (qwen3_5/) is what `PolicyRuntime`
(core/runtime.py) serves; each VLA family has one line in `FAMILIES` (the `type` a checkpoint's
config.json names -> its loader and policy), and `VLARuntime` (core/vla_runtime.py) serves it.

A family folder holds its configuration, modules, checkpoint loading and processors, as LeRobot
and transformers lay out a model; what families share (the arena, plans, loader rules, runtime)
lives outside the folders.
"""
from __future__ import annotations

import torch

from flashrt_ros.core.arena import DTYPES


def _smolvla():
    from flashrt_ros.core.models.smolvla import checkpoint_smolvla, policy_smolvla
    return checkpoint_smolvla, policy_smolvla.SmolVLAPolicy


# config.json "type" -> () -> (its checkpoint module: is_dir/read_dir/load_weights, its policy class)
FAMILIES = {"smolvla": _smolvla}


def vla_family(path: str) -> str | None:
    """The VLA family a checkpoint directory holds (None: not one of FAMILIES)."""
    for name, family in FAMILIES.items():
        if family()[0].is_smolvla_dir(path):
            return name
    return None


def read_vla_dir(path: str, family: str, say=None, dtype: str | None = None):
    return FAMILIES[family]()[0].read_smolvla_dir(path, dtype=dtype, say=say)


def build_vla_policy(src, device) -> torch.nn.Module:
    """The policy of `src` on `device`: built without initialising (meta tensors), every weight
    written once from the checkpoint, then its constants."""
    ckpt, policy_cls = FAMILIES["smolvla"]()
    with torch.device("meta"):
        policy = policy_cls(src)
    dtype = DTYPES[src.cfg.dtype]
    for mod_name, mod in policy.named_modules():
        for leaf, p in list(mod._parameters.items()):
            if p is None:
                continue
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            mod._parameters[leaf] = torch.nn.Parameter(
                torch.empty(p.shape, dtype=ckpt.param_dtype(name.removeprefix("model."), dtype),
                            device=device), requires_grad=False)
    _materialize_buffers(policy, device)
    policy.model.fuse_projections()
    policy.weights_digest = ckpt.load_weights(policy.model, src.weights)
    policy.prepare(device)
    return policy


def _materialize_buffers(policy, device) -> None:
    """Non-persistent buffers (RoPE's timescale) computed again on the device."""
    from flashrt_ros.core.models.smolvla.modeling_smolvla import Rope
    for m in policy.modules():
        if isinstance(m, Rope):
            head_dim = 2 * m.timescale.shape[0]
            m.timescale = Rope(head_dim).timescale.to(device)
