"""apply_kernel_attention_: cached steps of a block in C (corral_attn_decode, corral_block_step in q4q8.c).

For one new token of one sequence, torch spends more time dispatching a block's small ops (two
norms, rotate q and k, transpose, write the cache, SDPA, reshape, SiLU, residual adds) than
computing them: SmolLM2's attention alone was about 0.27 ms a layer, 8 ms of a token's 36 ms at
one thread. Two levels:

- KernelAttention: rotate, write the cache rows and attend in one call (any linear layers).
- KernelBlock: the whole block in one call when its four projections are our block kernels.

Both take cached steps only: one token per row (batched decode) or one sequence's tokens at an
int position (prefill, prefix-cached prefill, speculative checks). Every row is computed with the
same arithmetic whatever the batch, so those paths agree bit for bit. Anything else (no cache,
masks of other shapes, other dtypes, autograd, a GPU) takes the model's own path.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from corral import kernels
from corral.kernels.kquant import KQuantLinear
from corral.kernels.linear import BlockLinear
from corral.model.fuse import FusedAttention, FusedFeedForward
from corral.model.llama import Block


class KernelAttention(FusedAttention):
    def forward(self, x, cos, sin, mask, cache, start_pos):
        plan = _plan(x, cos, mask, cache, start_pos, self.layer_id)
        if plan is None:
            return super().forward(x, cos, sin, mask, cache, start_pos)
        pos, rows, row_stride, kc, vc = plan
        qkv = self.wqkv(x).contiguous()  # (B, T, (n_heads + 2 n_kv_heads) * head_dim)
        y = torch.empty(*x.shape[:2], self.n_heads * self.head_dim)
        rc = kernels.library().corral_attn_decode(
            qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(), row_stride, kc.stride(1),
            self.n_heads, self.n_kv_heads, self.head_dim, ctypes.addressof(pos), rows, y.data_ptr(),
            torch.get_num_threads(), int(kc.dtype is torch.float16))
        if rc != 0:
            raise MemoryError("corral kernels: no memory for attention scores")
        return self.wo(y)


class KernelBlock(Block):
    def forward(self, x, cos, sin, mask, cache, start_pos):
        plan = _plan(x, cos, mask, cache, start_pos, self.attention.layer_id)
        if plan is None:
            return super().forward(x, cos, sin, mask, cache, start_pos)
        pos, rows, row_stride, kc, vc = plan
        attn, ffn = self.attention, self.feed_forward
        descs = [_descriptor(m) for m in (attn.wqkv, attn.wo, ffn.w13, ffn.w2)]
        if None in descs:
            return super().forward(x, cos, sin, mask, cache, start_pos)
        h = x.contiguous().clone()  # (B, T, dim), updated in place by the C step
        rc = kernels.library().corral_block_step(
            h.data_ptr(), rows, h.shape[-1], self.attention_norm.weight.data_ptr(), self.ffn_norm.weight.data_ptr(),
            self.attention_norm.eps, *descs, cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(),
            row_stride, kc.stride(1), attn.n_heads, attn.n_kv_heads, attn.head_dim, ctypes.addressof(pos),
            ffn.w2.in_features, torch.get_num_threads(), kernels.simd_flag(), int(kc.dtype is torch.float16))
        if rc != 0:
            raise MemoryError("corral kernels: no memory for a block step")
        return h


def _plan(x, cos, mask, cache, start_pos, layer_id):
    """(positions, rows, cache row stride, keys, values) for a C step, or None for the model's own path."""
    B, T = x.shape[:2]
    if not (x.dtype is torch.float32 and x.is_cpu and hasattr(cache, "rows_of") and cos.is_contiguous()
            and cos.dtype is torch.float32 and not torch.is_grad_enabled()):
        return None
    kc, vc = cache.rows_of(layer_id)  # (cache rows >= B, n_kv_heads, length, head_dim)
    row_stride = kc.stride(0)
    if T > 1:  # one sequence's T tokens as T rows of one cache row, token t at start_pos + t: causal
        if B != 1 or not isinstance(start_pos, int):
            return None
        positions, rows, row_stride = list(range(start_pos, start_pos + T)), T, 0
    elif isinstance(start_pos, int):  # the batch-1 hot path: no tensor ops for the positions
        if B > 1:  # cos holds one row here, the C step reads one per batch row: rows past 0 read garbage
            return None
        positions, rows = [start_pos], 1
    else:
        positions, rows = start_pos.to(torch.int64).tolist(), B
        if mask is not None:  # batched decode: rows writing to the scratch column are idle, skip them
            positions = [-1 if p == getattr(cache, "scratch", -1) else p for p in positions]
    half_ok = kc.dtype is torch.float16 and kernels.has_simd()
    if not (kc.dtype is torch.float32 or half_ok) or kc.shape[0] < B or max(positions) >= kc.shape[2]:
        return None
    return (ctypes.c_int64 * rows)(*positions), rows, row_stride, kc, vc


def _descriptor(linear: nn.Module) -> int | None:
    """The C descriptor address of one of our block linears with a usable kernel, else None."""
    if isinstance(linear, KQuantLinear):
        return linear.descriptor()
    if not isinstance(linear, BlockLinear):
        return None
    cache, b = linear.__dict__.get("_cache"), linear._buffers
    if cache is None or cache[0] is not b["qs"] or cache[1] is not b["scales"] or cache[2] is not b["mins"]:
        cache = linear._kernel()  # built once, rebuilt only when a buffer was replaced (as forward does)
    return cache[4] if cache[3] is not None else None


def apply_kernel_attention_(model: nn.Module) -> nn.Module:
    """Run fused blocks' cached steps in C where the kernels built; returns the model."""
    if not kernels.available():
        return model
    if kernels.has_simd():  # keys and values in float16: half the bytes for batched decode over long contexts
        model.kv_cache_dtype = torch.float16
    for module in model.modules():
        if type(module) is FusedAttention:
            module.__class__ = KernelAttention
    for module in model.modules():
        if type(module) is Block and isinstance(module.feed_forward, FusedFeedForward) and all(
                isinstance(m, (BlockLinear, KQuantLinear)) for m in (module.attention.wqkv, module.attention.wo,
                                                     module.feed_forward.w13, module.feed_forward.w2)):
            module.__class__ = KernelBlock
    return model
