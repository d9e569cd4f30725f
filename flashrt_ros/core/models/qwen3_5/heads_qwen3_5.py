"""The policy's parts around the backbone: observation encoder, action head, MTP head.

Their weights live in a checkpoint's `policy.safetensors` under these modules' names
(`obs_encoder.mean`, `obs_encoder.std`, `obs_encoder.proj.weight`, `action_head.fc1.weight`,
`action_head.fc2.weight`, `mtp_head.proj.weight`, `mtp_head.scale`). Their state lives in the
arena: the action queue and last action, the MTP latents and the last hidden state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashrt_ros.core import kernels

OBS_CLIP = 5.0          # normalised observations are clipped to +-OBS_CLIP


class ObservationEncoder(nn.Module):
    """obs [obs_dim] -> one input embedding [d]: normalised with the statistics of the data the
    policy was trained on (`mean`, `std`, stored with the weights; a running normaliser would
    subtract away any signal that stays constant, such as a steady target error), clipped, then
    projected."""

    def __init__(self, obs_dim: int, d: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(obs_dim))
        self.std = nn.Parameter(torch.ones(obs_dim))
        self.proj = nn.Linear(obs_dim, d, bias=False)

    def forward(self, obs):
        """obs: [obs_dim] fp32 -> [d] in the weights' dtype."""
        z = ((obs - self.mean) / self.std).clamp(-OBS_CLIP, OBS_CLIP)
        w = self.proj.weight
        return F.linear(z if z.dtype == w.dtype else z.to(w.dtype), w)


class ActionHead(nn.Module):
    """hidden [d] -> action chunk [horizon, action_dim] (fp32)."""

    def __init__(self, d: int, horizon: int, action_dim: int):
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.fc1 = nn.Linear(d, d, bias=False)
        self.fc2 = nn.Linear(d, horizon * action_dim, bias=False)

    def forward(self, h):
        chunk = F.linear(F.silu(F.linear(h, self.fc1.weight)), self.fc2.weight)
        return kernels.f32(chunk).view(self.horizon, self.action_dim)


class MTPHead(nn.Module):
    """Multi-token prediction: the next `depth` latent inputs from the hidden state; the first one
    is added (times `scale`) to the next observation's embedding."""

    def __init__(self, d: int, depth: int):
        super().__init__()
        self.d, self.depth = d, depth
        self.proj = nn.Linear(d, depth * d, bias=False)
        self.scale = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, h):
        return F.linear(h, self.proj.weight).view(self.depth, self.d)
