"""apply_fused_projections_: one matmul for q/k/v and one for w1/w3 in every block (inference only).

At batch 1 a small model's decode is bound by per-call overhead as much as by bandwidth: SmolLM2
runs 7 projections per block, 210 per token. Concatenating wq|wk|wv and w1|w3 along the output
dimension leaves 4 calls per block with the same arithmetic. The fused modules keep the Meta
names of nothing (their weight is `wqkv` / `w13`), so fuse after loading and never save a fused
model as a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from corral.model.llama import Attention, FeedForward

Fuser = Callable[[list[nn.Module]], nn.Module | None]


class FusedAttention(Attention):
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)


class FusedFeedForward(FeedForward):
    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w13(x).chunk(2, dim=-1)


def concat_linears(parts: list[nn.Module]) -> nn.Module | None:
    """Row-concatenate plain nn.Linear layers or kernels that know how (a `fuse_rows` classmethod); else None."""
    kinds = {type(p) for p in parts}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is nn.Linear and all(p.bias is None for p in parts):
        weight = torch.cat([p.weight.detach() for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        return fused
    fuse_rows = getattr(kind, "fuse_rows", None)
    return fuse_rows(parts) if fuse_rows is not None else None


def apply_fused_projections_(model: nn.Module, fuse: Fuser = concat_linears) -> nn.Module:
    """Fuse every block's q/k/v and w1/w3 projections where `fuse` can; returns the model."""
    for module in model.modules():
        if type(module) is Attention:
            fused = fuse([module.wq, module.wk, module.wv])
            if fused is not None:
                module.__class__ = FusedAttention
                module.wqkv = fused
                del module.wq, module.wk, module.wv
        elif type(module) is FeedForward:
            fused = fuse([module.w1, module.w3])
            if fused is not None:
                module.__class__ = FusedFeedForward
                module.w13 = fused
                del module.w1, module.w3
    return model
