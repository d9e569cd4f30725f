"""What every runtime shares: a StateArena whose live bytes are the whole state, a RollbackRing
over it, the counters mirrored on the host and a lock (PolicyRuntime, VLARuntime)."""
from __future__ import annotations

import torch

from flashrt_ros.core.arena import META_RNG_COUNTER, META_RNG_SEED
from flashrt_ros.core.seeded import check_seed


class StateRuntime:
    """The sampler's seed and the live bytes, over `self.arena`, `self.ring`, `self.lock` and the
    counters `step_count`, `position`, `episode` that a subclass keeps."""

    def check_noise_seed(self, seed) -> None:
        """Refuse what `seed_noise` would refuse, changing nothing."""
        check_seed(seed, "noise seed")

    def seed_noise(self, seed: int) -> None:
        """Restart the arena's noise sampler at `seed` (a branch or fork that should sample
        differently); the state after it is what rollback and reset return to."""
        self.check_noise_seed(seed)
        with self.lock:
            self.arena.meta[META_RNG_SEED].fill_(seed)
            self.arena.meta[META_RNG_COUNTER].fill_(0)
            self.ring.rebase(self.step_count, self.position, self.episode)

    def live_nbytes(self) -> int:
        return self.arena.live_nbytes(self.position)

    def live_state(self) -> torch.Tensor:
        """A view of the live state bytes (valid until the next call that changes state)."""
        return self.arena.live_bytes(self.position)
