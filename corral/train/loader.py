"""A rank-aware, resumable loader of fixed-length token windows from shards.

The shards are one virtual token stream cut into ``n_windows`` windows of ``seq_len + 1`` tokens
(window i starts at token i * seq_len; its last token is the next window's first, so every token is
a target once). Each epoch visits the windows in a seeded permutation. A global batch takes
``batch_size * world_size`` consecutive windows of that order and rank r reads its own slice, so
the position is one global cursor: it survives a restart and a change of world size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corral.data.shards import read_shard
from corral.errors import ConfigError


class TokenLoader:
    """Yields (inputs, targets) int64 tensors of shape (batch_size, seq_len) for one rank."""

    def __init__(self, shards: Sequence[str | Path], seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, verify: bool = True):
        if not shards:
            raise ConfigError("the loader needs at least one shard")
        self.arrays = [read_shard(p, verify=verify) for p in shards]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])  # token offset of each shard
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.n_windows = max(0, (int(self.starts[-1]) - 1) // seq_len)
        if self.n_windows < self.global_batch:
            raise ConfigError(f"the data has {int(self.starts[-1])} tokens: fewer than one global batch of "
                              f"{self.global_batch} windows of {seq_len + 1} tokens")
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.n_windows // self.global_batch

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(self.n_windows) if self.shuffle else np.arange(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def _window(self, index: int) -> np.ndarray:
        """Tokens [index * seq_len, index * seq_len + seq_len + 1) of the virtual stream, across shards."""
        start, stop = index * self.seq_len, index * self.seq_len + self.seq_len + 1
        out = np.empty(stop - start, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < len(out):
            array, base = self.arrays[shard], int(self.starts[shard])
            lo = start + filled - base
            take = min(len(array) - lo, len(out) - filled)
            out[filled:filled + take] = array[lo:lo + take]
            filled += take
            shard += 1
        return out

    def batch_at(self, epoch: int, cursor: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch that starts at window ``cursor`` of ``epoch``'s order."""
        order = self._order_for(epoch)
        first = cursor + self.rank * self.batch_size
        windows = np.stack([self._window(int(i)) for i in order[first:first + self.batch_size]])
        tokens = torch.from_numpy(windows)  # (batch_size, seq_len + 1)
        return tokens[:, :-1], tokens[:, 1:]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; an epoch ends when fewer than a global batch of windows is left."""
        if self.cursor + self.global_batch > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
        batch = self.batch_at(self.epoch, self.cursor)
        self.cursor += self.global_batch
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_windows": self.n_windows,
                "seq_len": self.seq_len, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; the data and seq_len must be those the position was taken on."""
        for key in ("n_windows", "seq_len", "seed"):
            if int(state[key]) != getattr(self, key):
                raise ConfigError(f"loader state was saved with {key}={state[key]}, but this run has "
                                  f"{key}={getattr(self, key)}: the data or its settings changed")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
