"""A simple preallocated key/value cache: one (B, n_kv_heads, max_seq_len, head_dim) pair per layer.

The engine owns it and sizes it (max_batch_size and max_seq_len are runtime limits, not model shape).
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
