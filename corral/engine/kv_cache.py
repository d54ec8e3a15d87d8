"""Key/value caches.

KVCache: the reference path's cache, one sequence batch starting together at position 0.
SlotCache: the engine's. One row ("slot") per sequence, each at its own position; it grows on
demand (rows and length) so a batch-1 chat does not pay for eight 8K-token rows up front, and a
slot keeps its keys and values after its request ends so the next request with the same prefix
(the next turn of a chat) starts from them.
"""

from __future__ import annotations

import torch

from corral.model.config import ModelConfig


class KVCache:
    def __init__(
        self, config: ModelConfig, max_batch_size: int, max_seq_len: int, *, dtype: torch.dtype, device=None
    ):
        shape = (max_batch_size, config.kv_heads, max_seq_len, config.head_dim)
        self.max_seq_len = max_seq_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]

    def update(
        self, layer_id: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, T, _ = k.shape  # (B, n_kv_heads, T, head_dim)
        end = start_pos + T
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; asked to write up to {end}")
        self.k[layer_id][:B, :, start_pos:end] = k
        self.v[layer_id][:B, :, start_pos:end] = v
        return self.k[layer_id][:B, :, :end], self.v[layer_id][:B, :, :end]

    def rows_of(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole key and value buffers (max_batch_size, n_kv_heads, max_seq_len, head_dim)."""
        return self.k[layer_id], self.v[layer_id]


class SlotCache:
    """Per-slot keys and values (slots, n_kv_heads, length + 1, head_dim) per layer.

    Before each forward the engine calls `view(rows, kv_len)`: the forward then touches only those
    rows and reads the first kv_len positions. The last position of every row is scratch: idle
    rows of a batched decode write there, so they never clobber a kept prefix.
    """

    GROW = 256  # lengths are rounded up to this, so the cache reallocates rarely

    def __init__(self, config: ModelConfig, max_slots: int, max_len: int, *, dtype: torch.dtype, device=None):
        self.config, self.max_slots, self.max_len = config, max_slots, max_len
        self.dtype, self.device = dtype, device
        self.slots, self.length = 0, 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows, self.kv_len = slice(0, 0), 0

    @property
    def scratch(self) -> int:
        return self.length

    def reserve(self, slots: int, length: int) -> None:
        """Make room for `slots` rows of `length` positions, keeping what is stored."""
        if slots <= self.slots and length <= self.length:
            return
        slots = min(max(slots, self.slots), self.max_slots)
        length = min(max(-(-length // self.GROW) * self.GROW, self.length), self.max_len)
        shape = (slots, self.config.kv_heads, length + 1, self.config.head_dim)  # +1: the scratch position
        for store in (self.k, self.v):
            for i in range(self.config.n_layers):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if store and i < len(store):
                    new[: self.slots, :, : self.length] = store[i][:, :, : self.length]
                    store[i] = new
                else:
                    store.append(new)
        self.slots, self.length = slots, length

    def view(self, rows: slice, kv_len: int) -> SlotCache:
        self.rows, self.kv_len = rows, kv_len
        return self

    def copy_slot(self, src: int, dst: int, n: int) -> None:
        """Copy the first n positions of slot src into slot dst (n samples sharing one prompt)."""
        for store in (self.k, self.v):
            for layer in store:
                layer[dst, :, :n] = layer[src, :, :n]

    def rows_of(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values for the viewed rows, all positions: (B, n_kv_heads, length + 1, head_dim)."""
        return self.k[layer_id][self.rows], self.v[layer_id][self.rows]

    def update(
        self, layer_id: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.k[layer_id][self.rows], self.v[layer_id][self.rows]  # views: (B, n_kv_heads, length+1, hd)
        B, _, T, _ = k.shape  # (B, n_kv_heads, T, head_dim)
        if isinstance(start_pos, int):
            kc[:, :, start_pos : start_pos + T] = k
            vc[:, :, start_pos : start_pos + T] = v
        else:  # each row at its own position: start_pos (B,)
            positions = start_pos[:, None] + torch.arange(T, device=k.device)  # (B, T)
            rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
            kc[rows, :, positions] = k.transpose(1, 2)  # indexed view is (B, T, n_kv_heads, hd)
            vc[rows, :, positions] = v.transpose(1, 2)
        return kc[:, :, : self.kv_len], vc[:, :, : self.kv_len]


def cache_dtype(model) -> torch.dtype:
    """The dtype a model's keys and values are kept in: its activations' dtype, unless its attention reads a
    narrower cache (corral.kernels.attention sets `kv_cache_dtype` to float16: half the bytes to read)."""
    return getattr(model, "kv_cache_dtype", None) or model.norm.weight.dtype
