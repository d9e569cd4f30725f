"""The policy's parts around the backbone: observation encoder, action head, MTP head.

Their weights live in a checkpoint's `policy.safetensors` under these modules' names
(`obs_encoder.proj.weight`, `action_head.fc1.weight`, `action_head.fc2.weight`,
`mtp_head.proj.weight`, `mtp_head.scale`). Their state lives in the arena: the observation
normaliser (`obs_norm`), the action queue and last action, the MTP latents and the last hidden state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Observations are normalised by a running mean/variance (Welford) kept in the arena. Values far
# outside this range are refused at the input (see PolicyRuntime._check_obs) so that the running
# sums stay finite in fp32.
OBS_CLIP = 5.0          # normalised observations are clipped to +-OBS_CLIP
OBS_VAR_EPS = 1e-4


class ObservationEncoder(nn.Module):
    """obs [obs_dim] -> one input embedding [d]: running normalisation, then a linear projection."""

    def __init__(self, obs_dim: int, d: int):
        super().__init__()
        self.proj = nn.Linear(obs_dim, d, bias=False)

    def forward(self, obs, norm):
        """obs: [obs_dim] fp32; norm: the arena's [3, obs_dim] (mean, M2, count), updated in place."""
        mean, m2, count = norm[0], norm[1], norm[2]
        count.add_(1.0)
        delta = obs - mean
        mean.add_(delta / count)
        m2.add_(delta * (obs - mean))
        var = m2 / torch.clamp(count - 1.0, min=1.0)
        z = ((obs - mean) * torch.rsqrt(var + OBS_VAR_EPS)).clamp(-OBS_CLIP, OBS_CLIP)
        return self.proj(z.to(self.proj.weight.dtype))


class ActionHead(nn.Module):
    """hidden [d] -> action chunk [horizon, action_dim] (fp32)."""

    def __init__(self, d: int, horizon: int, action_dim: int):
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.fc1 = nn.Linear(d, d, bias=False)
        self.fc2 = nn.Linear(d, horizon * action_dim, bias=False)

    def forward(self, h):
        return self.fc2(F.silu(self.fc1(h))).float().view(self.horizon, self.action_dim)


class MTPHead(nn.Module):
    """Multi-token prediction: the next `depth` latent inputs from the hidden state; the first one
    is added (times `scale`) to the next observation's embedding."""

    def __init__(self, d: int, depth: int):
        super().__init__()
        self.d, self.depth = d, depth
        self.proj = nn.Linear(d, depth * d, bias=False)
        self.scale = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, h):
        return self.proj(h).view(self.depth, self.d)
