"""A frozen linear layer over quantized blocks that autograd can train through: the base of QLoRA.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) keeps the base weights in 4-bit blocks and trains LoRA
adapters on top; gradients flow through the frozen base to the adapters of earlier layers. Here the base
is a weight W (out, in) held as its GGUF rows (uint8, ``out`` rows of ``row_bytes``) and a row decoder
(``decode(rows) -> (n, in) float32``: Q4_0, Q8_0, Q4_K ... live in corral.kernels / corral.checkpoint, so
this module needs only torch). Forward and backward both widen W one tile of rows at a time:

    y[:, i:j]  = x @ W[i:j].T               forward, tile by tile
    dL/dx     += dL/dy[:, i:j] @ W[i:j]      backward, the same tiles again (recomputed, not saved)

so memory holds the blocks plus one (tile_rows, in) float32 tile, never the whole float W, and W gets no
gradient (it is a buffer, not a parameter).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

RowDecoder = Callable[[torch.Tensor], torch.Tensor]
"""(n, row_bytes) uint8 rows of a weight -> (n, in_features) float32."""


class _TiledMatmul(torch.autograd.Function):
    """y = x @ W.T with W widened tile by tile in forward and again in backward; no gradient for W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: TiledBlockLinear) -> torch.Tensor:  # x (M, in) float32
        ctx.layer = layer
        y = x.new_empty(x.shape[0], layer.out_features)  # (M, out)
        for start, tile in layer.tiles():
            y[:, start:start + tile.shape[0]] = x @ tile.T  # (M, in) @ (in, t)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # grad_y (M, out)
        if not ctx.needs_input_grad[0]:
            return None, None
        grad_x = grad_y.new_zeros(grad_y.shape[0], ctx.layer.in_features)  # (M, in)
        for start, tile in ctx.layer.tiles():
            grad_x.addmm_(grad_y[:, start:start + tile.shape[0]], tile)  # (M, t) @ (t, in)
        return grad_x, None


class TiledBlockLinear(nn.Module):
    """y = x @ W.T for W kept as quantized rows; differentiable in x, frozen in W (see the module docstring)."""

    def __init__(self, rows: torch.Tensor, in_features: int, decode: RowDecoder, tile_rows: int = 256):
        super().__init__()
        self.out_features, self.in_features = rows.shape[0], in_features
        self.decode, self.tile_rows = decode, tile_rows
        self.register_buffer("rows", rows, persistent=False)  # (out, row_bytes) uint8, e.g. a view of a GGUF file

    def tiles(self):
        """(first row, (t, in) float32 tile) for consecutive tiles of at most tile_rows rows."""
        for start in range(0, self.out_features, self.tile_rows):
            yield start, self.decode(self.rows[start:start + self.tile_rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _TiledMatmul.apply(x.reshape(-1, self.in_features).float(), self)  # (M, out)
        return y.view(*lead, self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The whole float32 weight (out, in): for merging an adapter, not for training."""
        return torch.cat([tile for _, tile in self.tiles()])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tile_rows={self.tile_rows}"
