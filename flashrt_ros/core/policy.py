"""Policy and VLAPolicy: what a policy network gives its runtime.

`Policy` is a language-model policy stepped on observation vectors (Qwen3.5, core/runtime.py);
`VLAPolicy` a vision-language-action policy that maps images, a task and a state to an action
chunk by denoising (SmolVLA, core/vla_runtime.py). Both keep their whole state in the arena.

The runtime, its plans, the capsule stores and the node see a policy only through this interface:

* `state_specs()`  - the state buffers it needs (name, dtype, shape, role); the runtime allocates
                     them once in the `StateArena` (plus the runtime's own `meta`) and passes the
                     arena to every call. A policy keeps no state of its own between calls.
* `prefill_chunk(arena, io, pos, tokens)` - append context tokens (the instruction).
* `predict_action_chunk(arena, io, pos)`  - one control step: `io.obs` -> `io.action`
                     [horizon, action_dim]; commits step += 1.
* `token_step(arena, io, pos)` - decode one token: `io.token` -> `io.logits`, `io.next_token`.
* `lm_head(arena, io)` - logits of the next token from the last hidden state.
* `prepare()` - called once by the runtime after the weights are loaded and before any step: the
                     policy derives what its steps read from the weights (packed projections...).
* `weights_digest` - a digest of every weight, which capsule fingerprints include.
* `reset` is the runtime's (`PolicyRuntime.reset`): state lives in the arena, so a reset is a copy
  of the post-instruction state or zeros, never a call into the network.

`pos` is the position of the first new token as a host int (the eager form), or None: the static
form captured in CUDA graphs, which reads the position from `arena.meta` on the device. Every
method runs under `torch.inference_mode()` and allocates nothing that outlives the call.
"""
from __future__ import annotations

from torch import nn

from flashrt_ros.core.arena import BufferSpec, StateArena, StaticIO
from flashrt_ros.core.config import ModelConfig


class Policy(nn.Module):
    """Base class of policy networks served by `PolicyRuntime` (see the module docstring)."""

    cfg: ModelConfig
    weights_digest: str
    untrained: tuple = ()      # names of parts whose weights came from the seed, not a file

    def state_specs(self) -> list[BufferSpec]:
        raise NotImplementedError

    def prepare(self) -> None:
        raise NotImplementedError

    def prefill_chunk(self, arena: StateArena, io: StaticIO, pos, tokens) -> None:
        raise NotImplementedError

    def predict_action_chunk(self, arena: StateArena, io: StaticIO, pos) -> None:
        raise NotImplementedError

    def token_step(self, arena: StateArena, io: StaticIO, pos) -> None:
        raise NotImplementedError

    def lm_head(self, arena: StateArena, io: StaticIO) -> None:
        raise NotImplementedError


class VLAPolicy(nn.Module):
    """Base class of vision-language-action policies served by `VLARuntime`.

    * `state_specs()` - the arena's buffers (the prefix KV as the one `kv` buffer, token-major);
    * `make_io(device)` - the static inputs/outputs of the plans (images, language, state, noise
                          in; the chunk out);
    * `load_batch(batch, io, noise)` - a LeRobot batch (a dataset's keys, before the
                          preprocessor) checked and written into the static inputs;
    * `prepare(device)` - after the weights are loaded: constants the plans read;
    * the plans, each reading only the arena and `io`: `sample_noise` (the arena's sampler ->
      io.noise, counter += 1), `prefix` (inputs -> kv, position = prefix length), `denoise`
      (io.noise -> io.chunk in the dataset's units);
    * `weights_digest` - a digest of every weight, which capsule fingerprints include.
    """

    cfg: object
    weights_digest: str

    def state_specs(self) -> list[BufferSpec]:
        raise NotImplementedError

    def make_io(self, device):
        raise NotImplementedError

    def load_batch(self, batch: dict, io, noise) -> None:
        raise NotImplementedError

    def prepare(self, device) -> None:
        raise NotImplementedError

    def sample_noise(self, arena: StateArena, io) -> None:
        raise NotImplementedError

    def prefix(self, arena: StateArena, io) -> None:
        raise NotImplementedError

    def denoise(self, arena: StateArena, io) -> None:
        raise NotImplementedError
