"""apply_kernel_attention_: batch-1 decode attention in one C call (corral_attn_decode in q4q8.c).

For one new token of one sequence, torch spends more time dispatching the dozen small ops of a
layer's attention (rotate q and k, transpose, write the cache, SDPA, reshape) than computing them:
about 0.27 ms a layer on SmolLM2, 8 ms of a token's 36 ms at one thread. The C step rotates, writes
the cache rows and attends in one call. Anything else (prefill, batches, masks, other caches,
other dtypes, a GPU) takes the model's own path, so results stay those of the reference model.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from corral import kernels
from corral.model.fuse import FusedAttention


class KernelAttention(FusedAttention):
    def forward(self, x, cos, sin, mask, cache, start_pos):
        if not _kernel_step(x, cache, cos, start_pos):
            return super().forward(x, cos, sin, mask, cache, start_pos)
        B, T = x.shape[:2]
        kc, vc = cache.rows_of(self.layer_id)  # (rows >= B, n_kv_heads, length, head_dim)
        row_stride = kc.stride(0)
        if T > 1:  # one sequence's T tokens as T rows of one cache row, token t at start_pos + t: causal
            pos, last, B, row_stride = (ctypes.c_int64 * T)(*range(start_pos, start_pos + T)), start_pos + T - 1, T, 0
        elif isinstance(start_pos, int):  # the batch-1 hot path: no tensor ops for the positions
            pos, last = (ctypes.c_int64 * B)(*([start_pos] * B)), start_pos
        else:
            positions = start_pos.to(torch.int64).tolist()
            if mask is not None:  # batched decode: rows writing to the scratch column are idle, skip them
                positions = [-1 if p == getattr(cache, "scratch", -1) else p for p in positions]
            pos, last = (ctypes.c_int64 * B)(*positions), max(positions)
        if kc.dtype is not torch.float32 or kc.shape[0] < x.shape[0] or last >= kc.shape[2]:
            return super().forward(x, cos, sin, mask, cache, start_pos)
        qkv = self.wqkv(x).contiguous()  # (B, T, (n_heads + 2 n_kv_heads) * head_dim)
        y = torch.empty(x.shape[0], T, self.n_heads * self.head_dim)
        rc = kernels.library().corral_attn_decode(
            qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(), row_stride, kc.stride(1),
            self.n_heads, self.n_kv_heads, self.head_dim, ctypes.addressof(pos), B, y.data_ptr(),
            torch.get_num_threads())
        if rc != 0:
            raise MemoryError("corral kernels: no memory for attention scores")
        return self.wo(y)


def _kernel_step(x, cache, cos, start_pos) -> bool:
    """One new token per row, or several of one sequence at an int position; float32 on the CPU, a cache
    that exposes its rows, no autograd."""
    shape_ok = x.shape[1] == 1 or (x.shape[0] == 1 and isinstance(start_pos, int))
    return (shape_ok and x.dtype is torch.float32 and x.is_cpu and hasattr(cache, "rows_of")
            and cos.is_contiguous() and cos.dtype is torch.float32 and not torch.is_grad_enabled())


def apply_kernel_attention_(model: nn.Module) -> nn.Module:
    """Run fused attention modules' single-token decode steps in C where the kernels built; returns the model."""
    if not kernels.available():
        return model
    for module in model.modules():
        if type(module) is FusedAttention:
            module.__class__ = KernelAttention
    return model
