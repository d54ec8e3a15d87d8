"""QLoRA bases from GGUF blocks: every block linear becomes a TiledBlockLinear (corral.model.qlora) over the
file's own rows, so LoRA adapters (corral.model.lora) train on a base that stays in Q4_0 / Q4_1 / Q8_0 /
Q4_K / Q5_K / Q6_K blocks.

Rows are widened by the kernels' K-quant row decoder (C, ``kquant.dequantize_rows``) or by the torch
block decoders of corral.checkpoint.gguf_dequant; the token table stays a block embedding (a lookup widens
only the rows it takes), and a tied model's output projection reads the same blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from corral.checkpoint.gguf_dequant import dequantize
from corral.errors import FormatError
from corral.kernels.kquant import KQ_BLOCK_BYTES, dequantize_rows
from corral.kernels.linear import gguf_embedding
from corral.model.qlora import RowDecoder, TiledBlockLinear
from corral.model.quant import apply_gguf_quant_

TILE_ROWS = 256
"""Rows widened at once: a (256, 8192) float32 tile is 8 MiB."""


def row_decoder(ggml_type: int, in_features: int) -> RowDecoder:
    """(n, row_bytes) uint8 rows of `ggml_type` -> (n, in_features) float32."""
    if ggml_type in KQ_BLOCK_BYTES:
        return lambda rows: dequantize_rows(ggml_type, rows, in_features)

    def decode(rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        return dequantize(rows.reshape(-1), ggml_type, n * in_features, torch.float32, "qlora").view(n, in_features)

    return decode


def qlora_linear(ggml_type: int, raw: torch.Tensor, shape: tuple[int, int], tile_rows: int = TILE_ROWS
                 ) -> TiledBlockLinear:
    """A trainable-through, frozen linear over the flat uint8 GGUF blocks `raw` of an (out, in) weight."""
    out_features, in_features = shape
    if raw.dtype != torch.uint8 or raw.numel() == 0 or raw.numel() % out_features:
        raise FormatError(f"{raw.numel()} bytes of {raw.dtype} are not {out_features} rows of ggml type {ggml_type}",
                          field="blocks")
    return TiledBlockLinear(raw.view(out_features, -1), in_features, row_decoder(ggml_type, in_features), tile_rows)


def apply_qlora_base_(model: nn.Module, quantized: dict) -> nn.Module:
    """Put GGUF blocks (Meta name -> (ggml_type, flat uint8, shape), as load_gguf_quantized returns them) in
    place of the model's dense weights as QLoRA bases; returns the model. Apply LoRA afterwards."""
    return apply_gguf_quant_(model, quantized, make_linear=qlora_linear, make_embedding=gguf_embedding)
