"""GGML block formats -> torch tensors, vectorised over all blocks of a tensor at once.

Each quantised type stores a row as consecutive blocks; a block is a few fp16 scales plus
packed integers. The byte layouts are ggml's (``ggml-common.h``); the code is ours and is
tested against ``gguf.quants.dequantize`` (an independent numpy implementation).
Sizes: Q4_0 18 B / 32 weights, Q4_1 20, Q5_0 22, Q5_1 24, Q8_0 34; K-quants 256 weights in
Q4_K 144 B, Q5_K 176 B, Q6_K 210 B. Everything is computed in float32, then cast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf.constants import GGMLQuantizationType as T

from corral.errors import FormatError


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scale at byte `start` of every block, as float32: (n_blocks, 1)."""
    return blocks[:, start : start + 2].view(torch.float16).float()


# The decoders write small integer codes straight into one float32 output and scale it in place:
# every float pass costs 4 bytes per weight of memory traffic, so intermediates stay uint8/int8.


def _nibbles_into(qs: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(n, 16) packed bytes -> float32 (n, 32): low nibbles are weights 0-15, high nibbles 16-31, minus `offset`."""
    out = torch.empty(qs.shape[0], 2, 16)
    out[:, 0] = (qs & 0x0F).view(torch.int8) - offset
    out[:, 1] = (qs >> 4).view(torch.int8) - offset
    return out.view(-1, 32)


def _high_bits(packed: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 fifth bits: (n, 4) bytes of a little-endian u32 -> uint8 (n, 32), 16 where bit k is set."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return (((packed.unsqueeze(-1) >> shifts) & 1) << 4).reshape(-1, 32)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # d | qs[16]: w = (q - 8) * d
    return _nibbles_into(b[:, 2:18], 8).mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    # d | m | qs[16]: w = q * d + m
    return _nibbles_into(b[:, 4:20]).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # d | qh (u32: fifth bit of weight k is bit k) | qs[16]: w = ((q | h << 4) - 16) * d
    q = torch.cat((b[:, 6:22] & 0x0F, b[:, 6:22] >> 4), dim=1) | _high_bits(b[:, 2:6])
    return (q.view(torch.int8) - 16).float().mul_(_f16(b, 0))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    # d | m | qh | qs[16]: w = (q | h << 4) * d + m
    q = torch.cat((b[:, 8:24] & 0x0F, b[:, 8:24] >> 4), dim=1) | _high_bits(b[:, 4:8])
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # d | qs int8[32]: w = q * d
    out = torch.empty(b.shape[0], 32)
    out.copy_(b[:, 2:34].view(torch.int8))
    return out.mul_(_f16(b, 0))


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (n, 8).

    Sub-blocks 0-3 keep their low 6 bits in bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 keep
    their low 4 bits in the nibbles of bytes 8-11 and their top 2 bits in the top bits of bytes 0-7.
    """
    sc = torch.cat((s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)), dim=1)
    mn = torch.cat((s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)), dim=1)
    return sc.float(), mn.float()


def _k4_low(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32): chunk j of 32 bytes holds sub-block 2j in low nibbles, 2j+1 in high."""
    chunks = qs.view(-1, 4, 1, 32)
    return torch.cat((chunks & 0x0F, chunks >> 4), dim=2).view(-1, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qs[128]: w = d*sc*q - dmin*m per 32-weight sub-block
    sc, mn = _k_scales(b[:, 4:16])
    q = _k4_low(b[:, 16:144]).float()  # (n, 8, 32)
    return q.mul_((_f16(b, 0) * sc).unsqueeze(-1)).sub_((_f16(b, 2) * mn).unsqueeze(-1)).view(-1, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qh[32] | qs[128]: bit k of qh[l] is the fifth bit of sub-block k, weight l
    sc, mn = _k_scales(b[:, 4:16])
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    high = (b[:, 16:48].unsqueeze(1) >> shifts) & 1  # (n, 8, 32)
    q = (_k4_low(b[:, 48:176]) | (high << 4)).float()  # (n, 8, 32)
    return q.mul_((_f16(b, 0) * sc).unsqueeze(-1)).sub_((_f16(b, 2) * mn).unsqueeze(-1)).view(-1, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # ql[128] | qh[64] | scales int8[16] | d: two halves of 128 weights, each four groups of 32;
    # group g takes low bits from ql (nibble g//2 of bytes 32*(g%2)...) and 2 high bits at qh >> 2g.
    ql = b[:, 0:128].reshape(-1, 2, 64)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2).view(-1, 2, 4, 32)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).view(1, 1, 4, 1)
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3  # (n, 2, 4, 32)
    q = ((low | (high << 4)).view(torch.int8) - 32).float().view(-1, 16, 16)  # 16 runs of 16 weights
    scales = b[:, 192:208].view(torch.int8).float() * _f16(b, 208)  # (n, 16): one scale per run
    return q.mul_(scales.unsqueeze(-1)).view(-1, 256)


# ggml type -> (weights per block, bytes per block, block decoder).
_BLOCK_DECODERS: dict[int, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    T.Q4_0: (32, 18, _q4_0), T.Q4_1: (32, 20, _q4_1), T.Q5_0: (32, 22, _q5_0), T.Q5_1: (32, 24, _q5_1),
    T.Q8_0: (32, 34, _q8_0), T.Q4_K: (256, 144, _q4_k), T.Q5_K: (256, 176, _q5_k), T.Q6_K: (256, 210, _q6_k),
}
_PLAIN: dict[int, torch.dtype] = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
SUPPORTED_TYPES = tuple(T(t).name for t in (*_PLAIN, *_BLOCK_DECODERS))


def dequantize(raw: torch.Tensor, ggml_type: int, numel: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Flat uint8 bytes of one tensor -> a new 1-D tensor of `numel` values in `dtype`."""
    if ggml_type in _PLAIN:
        return raw.view(_PLAIN[ggml_type]).to(dtype, copy=True)
    if ggml_type not in _BLOCK_DECODERS:
        try:
            type_name = T(ggml_type).name
        except ValueError:
            type_name = str(ggml_type)
        raise FormatError(f"ggml type {type_name} is not supported (supported: {', '.join(SUPPORTED_TYPES)})",
                          field=f"tensor {name!r}")
    block, size, decode = _BLOCK_DECODERS[ggml_type]
    blocks = raw.view(-1, size)  # (n_blocks, bytes per block)
    assert blocks.shape[0] * block == numel, "the parser checked nbytes against the shape"
    return decode(blocks).reshape(numel).to(dtype)
