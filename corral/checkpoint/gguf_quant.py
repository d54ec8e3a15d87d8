"""llama.cpp's quantization mixes: which ggml type each tensor of a Llama GGUF gets, and the blocks.

A mix (``Q4_K_M``, ``Q5_K_M``, ``Q6_K``, ``Q8_0``, ``Q4_0``) names a base type; llama.cpp's rules
(``llama_tensor_get_type`` in src/llama-quant.cpp) move some tensors to other types:

- ``output.weight``, or ``token_embd.weight`` when there is no output (tied): Q8_0 when its rows are
  not whole base blocks, Q8_0 stays Q8_0, any other base becomes Q6_K.
- ``attn_v`` and ``ffn_down`` in the ``_M`` mixes: Q6_K on "more bits" layers (``use_more_bits``: the
  first and last eighth of the layers and every third layer between); in a 70B shape (80 layers, GQA)
  an attn_v left at Q4_K becomes Q5_K.
- rows that are not whole blocks of the chosen type fall back: Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0; still not whole blocks -> F16.
- 1-D tensors (norms, rope_freqs) are kept as they are.

A tensor already stored in its target type is copied, not requantized, as llama.cpp does.
Blocks: Q4_K, Q5_K, Q6_K are ``corral.checkpoint.kquants``; the 32-weight types are ``gguf.quants``
(both equal to ggml's reference quantizers bit for bit, tests/checkpoint/test_kquants.py).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import quantize as gguf_quantize

from corral.checkpoint.kquants import QK_K, QUANTIZERS
from corral.errors import ConfigError

T = GGMLQuantizationType
# mix -> (base type, general.file_type)
MIXES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "F32": (T.F32, LlamaFileType.ALL_F32),
    "F16": (T.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q6_K": (T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "Q5_K_M": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "Q4_K_M": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
}
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_FLOAT = (T.F32, T.F16, T.BF16)
_CHUNK_BLOCKS = 2048  # super-blocks per task: arrays of ~2 MiB stay in cache, and threads share the work


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer(name: str) -> int:
    return int(name.split(".")[1])


def _fits(cols: int, ggml_type: GGMLQuantizationType) -> bool:
    return cols % GGML_QUANT_SIZES[ggml_type][0] == 0


def _mix_type(name: str, cols: int, mix: str, base: GGMLQuantizationType, n_layers: int, tied: bool,
              big_gqa: bool) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl for the Llama tensors and the mixes above."""
    more_bits_mix = mix in ("Q4_K_M", "Q5_K_M")
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if not _fits(cols, base):
            return T.Q8_0
        return base if base == T.Q8_0 else T.Q6_K
    if name.endswith("attn_v.weight"):
        chosen = T.Q6_K if more_bits_mix and _use_more_bits(_layer(name), n_layers) else base
        return T.Q5_K if big_gqa and chosen == T.Q4_K else chosen
    if name.endswith("ffn_down.weight") and more_bits_mix and _use_more_bits(_layer(name), n_layers):
        return T.Q6_K
    return base


def _fallback(cols: int, chosen: GGMLQuantizationType) -> GGMLQuantizationType:
    """tensor_type_fallback: a type whose blocks fit the row, else F16."""
    if _fits(cols, chosen):
        return chosen
    chosen = _FALLBACK.get(chosen, chosen)
    return chosen if _fits(cols, chosen) else T.F16


def tensor_types(tensors: dict[str, tuple[tuple[int, ...], int]], mix: str, *, n_layers: int,
                 n_heads: int = 1, n_kv_heads: int = 1) -> dict[str, GGMLQuantizationType]:
    """GGUF name -> the type llama.cpp's `mix` gives it; `tensors` maps names to (torch shape, ggml type now).

    Shapes are torch order, so a row (ggml's ne[0]) is the last dim. Float mixes (F32, F16) convert
    every 2-D weight to that type.
    """
    if mix not in MIXES:
        raise ConfigError(f"quantization type {mix!r} is not one of {', '.join(MIXES)}")
    base = MIXES[mix][0]
    tied = "output.weight" not in tensors
    big_gqa = n_layers == 80 and n_heads != n_kv_heads  # llama.cpp's LLM_TYPE_70B
    out = {}
    for name, (shape, now) in tensors.items():
        if len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight"):
            out[name] = GGMLQuantizationType(now)
        elif base in _FLOAT:
            out[name] = base
        else:
            cols = shape[-1]
            out[name] = _fallback(cols, _mix_type(name, cols, mix, base, n_layers, tied, big_gqa))
    return out


def _kquant(rows: np.ndarray, quantizer) -> np.ndarray:
    """(n, cols) float32 -> (n, bytes per row): super-blocks in chunks, on as many threads as there are CPUs."""
    blocks = rows.reshape(-1, QK_K)
    starts = range(0, blocks.shape[0], _CHUNK_BLOCKS)
    workers = min(len(starts), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # numpy drops the GIL inside each operation
        parts = list(pool.map(lambda s: quantizer(blocks[s:s + _CHUNK_BLOCKS]), starts))
    return np.concatenate(parts).reshape(rows.shape[0], -1)


def _bf16_bits(data: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even like ggml's fp32_to_bf16; NaN stays NaN."""
    bits = data.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(data), np.uint16(0x7FC0), rounded)


def quantize_tensor(data: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """A float32 tensor (torch order) as GGUF data of `ggml_type`: F32/F16 arrays, else (rows, bytes) uint8."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if ggml_type == T.F32:
        return data
    if ggml_type == T.F16:
        return data.astype(np.float16)
    if ggml_type == T.BF16:
        return _bf16_bits(data)
    rows = data.reshape(-1, data.shape[-1])
    if not _fits(rows.shape[1], ggml_type):
        raise ConfigError(f"rows of {rows.shape[1]} weights are not whole {ggml_type.name} blocks")
    if ggml_type.name in QUANTIZERS:
        return _kquant(rows, QUANTIZERS[ggml_type.name])
    return gguf_quantize(rows, ggml_type)
