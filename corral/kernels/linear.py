"""Linear layers that run corral.kernels on 4-bit and 8-bit block weights (GGUF Q4_0, Q4_1, Q8_0).

A weight (out, in) is out rows of in/32 blocks; a block is a fp16 scale d, for Q4_1 a fp16 min m, and 32
codes: Q4_0 w = d * (q - 8), Q4_1 w = d * q + m (q in 0..15, two per byte, element j in the low nibble of
byte j and element j + 16 in the high one), Q8_0 w = d * q (q int8). The modules keep those exact codes
and scales, repacked for the kernel (see q4q8.c): rows in tiles of 8, blocks of a tile contiguous,
scales in separate arrays. Every buffer is uint8 (fp16 scales as their bytes), so ``model.to(dtype)``
leaves them alone and ``state_dict`` carries them.

``fuse_rows([wq, wk, wv])`` concatenates weights along the output dimension, so several projections of the
same input are one kernel call (the caller splits the output).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from corral import kernels
from corral.errors import ConfigError, FormatError

GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 2, 3, 8
BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q4_1: 20, GGML_Q8_0: 34}  # fp16 d | [fp16 m] | codes
SCHEMES = {"q4_0": GGML_Q4_0, "q4_1": GGML_Q4_1, "q8_0": GGML_Q8_0}
QK, TR = kernels.QK, kernels.TILE_ROWS


class PointerCache(nn.Module):
    """A module whose kernel call keeps ctypes pointers to its buffers in ``_cache``: dropped whenever the
    buffers may move or the module is copied."""

    def _apply(self, *args, **kwargs):  # .to() / .cpu() replace the buffers: drop the stale pointers first
        self.__dict__.pop("_cache", None)
        return super()._apply(*args, **kwargs)

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: ctypes pointers do not travel
        state = self.__dict__.copy()
        state.pop("_cache", None)
        return state


class BlockLinear(PointerCache):
    """y = x @ w.T with w in blocks of 32; Q4Linear and Q8Linear differ only in the block kind."""

    kind: int = -1
    code_bytes: int = 0  # bytes of codes per block: 16 (Q4) or 32 (Q8)
    ggml_types: tuple[int, ...] = ()

    def __init__(self, qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, in_features: int,
                 out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qs", qs)  # (T, nb, TR * code_bytes) uint8, layout in q4q8.c
        self.register_buffer("scales", scales)  # (T, nb, TR * 2) uint8: fp16 d
        self.register_buffer("mins", mins)  # like scales (Q4_1 m), or None (Q4_0: m = -8 d; Q8_0)

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def fuse_rows(cls, linears: list[BlockLinear]) -> BlockLinear:
        """See the module-level fuse_rows (corral.model.fuse calls it through the class)."""
        return fuse_rows(linears)

    @classmethod
    def from_blocks(cls, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> BlockLinear:
        """Row-major blocks -> repacked module. codes (out, nb, code_bytes) uint8; d, m (out, nb) float16."""
        out_features, nb, width = codes.shape
        assert width == cls.code_bytes and d.shape == (out_features, nb), (codes.shape, d.shape)
        T = -(-out_features // TR)
        pad = T * TR - out_features  # zero rows with zero scales complete the last tile

        def tiles(t: torch.Tensor) -> torch.Tensor:  # (out, nb, ...) -> (T, nb, TR, ...)
            t = torch.cat((t, t.new_zeros(pad, *t.shape[1:]))) if pad else t
            return t.reshape(T, TR, *t.shape[1:]).transpose(1, 2).contiguous()

        # (T, nb, TR rows, code_bytes) -> 4-byte chunks of the tile's rows side by side: (T, nb, chunks, TR rows, 4)
        qs = tiles(codes.to(torch.uint8)).view(T, nb, TR, width // 4, 4).transpose(2, 3)

        def scale_bytes(s: torch.Tensor) -> torch.Tensor:  # (out, nb) fp16 -> (T, nb, 2 TR) uint8
            return tiles(s.to(torch.float16)).view(torch.uint8)

        mins = None if m is None else scale_bytes(m)
        return cls(qs.reshape(T, nb, TR * width), scale_bytes(d), mins, nb * QK, out_features)

    @classmethod
    def from_gguf_blocks(cls, raw: torch.Tensor, ggml_type: int, shape: tuple[int, int]) -> BlockLinear:
        """Raw GGUF blocks (flat uint8) of an (out, in) weight, as ``load_gguf_quantized`` returns them."""
        if ggml_type not in cls.ggml_types:
            raise ConfigError(f"{cls.__name__} runs ggml types {cls.ggml_types}, got {ggml_type}")
        out_features, in_features = shape
        _check_in_features(in_features)
        size, nb = BLOCK_BYTES[ggml_type], in_features // QK
        if raw.dtype != torch.uint8 or raw.numel() != out_features * nb * size:
            raise FormatError(f"expected {out_features * nb * size} bytes of ggml type {ggml_type} blocks for "
                              f"shape {tuple(shape)}, got {raw.numel()} of {raw.dtype}", field="blocks")
        b = raw.reshape(out_features * nb, size)

        def half(col: int) -> torch.Tensor:  # (out, nb) fp16 from the 2 bytes at col
            return b[:, col:col + 2].contiguous().view(torch.float16).view(out_features, nb)

        codes = b[:, size - cls.code_bytes:].reshape(out_features, nb, cls.code_bytes)
        return cls.from_blocks(codes, half(0), half(2) if ggml_type == GGML_Q4_1 else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, scheme: str) -> BlockLinear:
        """Quantize a float weight (out, in) with scheme "q4_0", "q4_1" or "q8_0" (round to nearest)."""
        if SCHEMES.get(scheme) not in cls.ggml_types:
            raise ConfigError(f"{cls.__name__} schemes are {[s for s, t in SCHEMES.items() if t in cls.ggml_types]}, "
                              f"got {scheme!r}")
        out_features, in_features = weight.shape
        _check_in_features(in_features)
        return cls.from_blocks(*_quantize_blocks(weight.detach().float().reshape(out_features, -1, QK), scheme))

    # -- inspection ---------------------------------------------------------------------------------------------
    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The row-major blocks back: codes (out, nb, code_bytes) uint8, d and m (out, nb) float16 (m may be None)."""
        def rows(t: torch.Tensor) -> torch.Tensor:  # (T, nb, TR, ...) -> (out, nb, ...)
            return t.transpose(1, 2).reshape(-1, *t.shape[1:2], *t.shape[3:])[: self.out_features]

        def half(s: torch.Tensor) -> torch.Tensor:
            return rows(s.view(torch.float16).unsqueeze(-1)).squeeze(-1)

        T, nb, _ = self.qs.shape
        chunks = self.code_bytes // 4  # undo the 4-byte chunk interleave
        qs = self.qs.view(T, nb, chunks, TR, 4).transpose(2, 3).reshape(T, nb, TR, self.code_bytes)
        return rows(qs), half(self.scales), None if self.mins is None else half(self.mins)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) the kernel multiplies by."""
        codes, d, m = self.blocks()
        d = d.float()[..., None]  # (out, nb, 1)
        if self.kind == kernels.KIND_Q8:
            w = codes.view(torch.int8).float() * d
        else:
            q = torch.cat((codes & 0x0F, codes >> 4), dim=-1).float()  # (out, nb, 32)
            w = q * d + (m.float()[..., None] if m is not None else -8 * d)
        return w.reshape(self.out_features, self.in_features)

    # -- compute ------------------------------------------------------------------------------------------------
    def _kernel(self) -> tuple:
        """(qs, scales, mins, C function or None, descriptor address, descriptor): rebuilt when a buffer is
        replaced (.to(), load_state_dict(assign=True)); the function is None where no kernel can run."""
        b = self._buffers
        qs, scales, mins = b["qs"], b["scales"], b["mins"]
        usable = qs.is_cpu and all(t is None or t.is_contiguous() for t in (qs, scales, mins)) and kernels.available()
        if not usable:
            cache = (qs, scales, mins, None, 0, None)
        else:
            desc = kernels.weight_descriptor(self.kind, self.in_features, self.out_features, qs, scales, mins)
            cache = (qs, scales, mins, kernels.library().corral_linear, ctypes.addressof(desc), desc)
        self.__dict__["_cache"] = cache
        return cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The hot path of decode (200+ calls per token): plain attribute reads, one allocation, one C call.
        cache, b = self.__dict__.get("_cache"), self._buffers
        if cache is None or cache[0] is not b["qs"] or cache[1] is not b["scales"] or cache[2] is not b["mins"]:
            cache = self._kernel()
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected (..., {self.in_features}) input, got {tuple(x.shape)}")
        dtype = x.dtype
        if cache[3] is None:  # no kernel here (no compiler, or off the CPU): correct but slow
            return F.linear(x, self.dequantize().to(x.device, dtype))
        if dtype is not torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        y = torch.empty(*x.shape[:-1], self.out_features)
        if cache[3](cache[4], x.data_ptr(), x.numel() // self.in_features, y.data_ptr(), torch.get_num_threads(),
                    kernels.simd_flag()):
            raise MemoryError("corral kernels: no memory for the activation buffer")
        return y if dtype is torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Q4Linear(BlockLinear):
    """Q4_0 / Q4_1 blocks (Q4_0 keeps no mins: the kernel uses m = -8 d)."""

    kind, code_bytes, ggml_types = kernels.KIND_Q4, 16, (GGML_Q4_0, GGML_Q4_1)


class Q8Linear(BlockLinear):
    """Q8_0 blocks."""

    kind, code_bytes, ggml_types = kernels.KIND_Q8, 32, (GGML_Q8_0,)


def _check_in_features(in_features: int) -> None:
    if in_features <= 0 or in_features % QK:
        raise ConfigError(f"block weights need in_features a positive multiple of {QK}, got {in_features}")


def _quantize_blocks(g: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """g (out, nb, 32) float32 -> codes, d, m as BlockLinear.from_blocks takes them. Scales are rounded
    to fp16 before the codes are chosen, so the codes fit the scales the kernel will use."""
    if scheme == "q8_0":
        d = (g.abs().amax(-1) / 127).half()
        q = torch.round(g / _nonzero(d)[..., None]).clamp_(-127, 127)
        return q.to(torch.int8).view(torch.uint8), d, None
    if scheme == "q4_0":  # the largest-magnitude value maps to code 0 (-8 d), keeping its sign
        idx = g.abs().argmax(-1, keepdim=True)
        d = (g.gather(-1, idx).squeeze(-1) / -8).half()
        m = None
        q = torch.round(g / _nonzero(d)[..., None] + 8)
    else:  # q4_1: codes 0..15 span [min, max]
        lo, hi = g.amin(-1), g.amax(-1)
        d, m = ((hi - lo) / 15).half(), lo.half()
        q = torch.round((g - m.float()[..., None]) / _nonzero(d)[..., None])
    q = q.clamp_(0, 15).to(torch.uint8)  # (out, nb, 32)
    return q[..., :16] | (q[..., 16:] << 4), d, m


def _nonzero(d: torch.Tensor) -> torch.Tensor:
    d = d.float()
    return torch.where(d == 0, torch.ones_like(d), d)


def fuse_rows(linears: list[BlockLinear]) -> BlockLinear:
    """One module whose output is the outputs of `linears` side by side (out = sum of their outs).

    All must be the same class and in_features; Q4_0 and Q4_1 mix by giving the Q4_0 rows their
    implicit mins (-8 d), exactly representable in fp16 for any finite Q4_0 scale below 8192.
    """
    cls = type(linears[0])
    if any(type(lin) is not cls or lin.in_features != linears[0].in_features for lin in linears):
        raise ConfigError("fuse_rows needs modules of one class and one in_features")
    parts = [lin.blocks() for lin in linears]
    mins = None
    if any(m is not None for _, _, m in parts):
        mins = torch.cat([m if m is not None else (-8 * d.float()).half() for _, d, m in parts])
        if not torch.isfinite(mins.float()).all():
            raise ConfigError("fuse_rows: a Q4_0 scale too large for an fp16 min")
    return cls.from_blocks(torch.cat([c for c, _, _ in parts]), torch.cat([d for _, d, _ in parts]), mins)


def gguf_linear(ggml_type: int, raw: torch.Tensor, shape: tuple[int, int]) -> nn.Module:
    """The fastest module for one GGUF weight: ours when the kernels built, else torch's (corral.model.quant).

    K-quants run in place (views of the file); without the kernels they are widened to a dense layer.
    """
    from corral.kernels.kquant import KQ_BLOCK_BYTES, KQuantLinear

    if ggml_type in KQ_BLOCK_BYTES:
        lin = KQuantLinear.from_gguf_blocks(raw, ggml_type, shape)
        if kernels.available():
            return lin
        dense = nn.Linear(shape[1], shape[0], bias=False, device="meta")
        dense.weight = nn.Parameter(lin.dequantize(), requires_grad=False)
        return dense
    if kernels.available() and ggml_type in BLOCK_BYTES:
        cls = Q8Linear if ggml_type == GGML_Q8_0 else Q4Linear
        return cls.from_gguf_blocks(raw, ggml_type, shape)
    from corral.model.quant import gguf_linear as torch_gguf_linear

    return torch_gguf_linear(ggml_type, raw, shape)


def gguf_embedding(ggml_type: int, raw: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> nn.Module:
    """The token table of a GGUF file kept as its blocks: a lookup widens only the rows it takes."""
    from corral.kernels.kquant import KQ_BLOCK_BYTES, KQuantEmbedding
    from corral.model.quant import BlockEmbedding

    cls = KQuantEmbedding if ggml_type in KQ_BLOCK_BYTES else BlockEmbedding
    return cls(ggml_type, raw, shape, dtype)
