"""Deterministic, resumable, data-parallel sampling of dataset entries.

The sampler sees an endless stream of entry ids: epoch e is a permutation of range(N) drawn from
numpy.random.default_rng([seed, e]) (or range(N) itself with shuffle=False), epochs follow each other.
A global batch is the next `world * batch_size` ids of the stream; data-parallel rank r takes the slice
[r * batch_size, (r + 1) * batch_size) of it, so ranks never share a sample within a step and every rank
agrees on the position. The whole state is one integer, `consumed` (ids of the stream already used by all
ranks together); restoring it after a restart reproduces the exact same batches.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np


class ShardedSampler:
    def __init__(self, num_entries: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if num_entries <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world <= 0 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a data-parallel world of size {world}")
        self.num_entries, self.batch_size, self.rank, self.world = num_entries, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.consumed = 0
        self._epoch_cache: Dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def epoch(self) -> float:
        """Fractional number of passes over the data so far."""
        return self.consumed / self.num_entries

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) > 2:
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(self.num_entries)
                                        if self.shuffle else np.arange(self.num_entries))
        return self._epoch_cache[epoch]

    def stream(self, start: int, count: int) -> List[int]:
        """Stream ids [start, start + count)."""
        out = []
        for k in range(start, start + count):
            epoch, pos = divmod(k, self.num_entries)
            out.append(int(self._permutation(epoch)[pos]))
        return out

    def next_batch(self) -> List[int]:
        """This rank's `batch_size` entry ids of the next global batch; advances `consumed`."""
        ids = self.stream(self.consumed + self.rank * self.batch_size, self.batch_size)
        self.consumed += self.global_batch
        return ids

    def state_dict(self) -> Dict[str, int]:
        return {"consumed": self.consumed, "seed": self.seed, "num_entries": self.num_entries,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for key in ("num_entries", "seed"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this run has {getattr(self, key)}: "
                                 "the dataset or seed changed since the checkpoint")
        self.consumed = int(state["consumed"])
