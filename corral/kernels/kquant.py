"""Linear layers and token tables on GGUF K-quant weights (Q4_K, Q5_K, Q6_K), run by ``kquant.c``.

The modules hold the file's rows as they are (uint8 views of the memory-mapped GGUF, no copy and no
repacking): a weight (out, in) is ``out`` rows of ``in / 256`` blocks (144, 176 or 210 bytes, layouts in
kquant.c). Fusing q|k|v or w1|w3 stacks the parts instead of concatenating bytes, so a fused module
still points into the file, and its parts may differ in type (Q4_K_M files keep some v and w2 rows in Q6_K).

Without the kernels (no compiler, or the module moved off the CPU) a forward widens the weight for the
call: correct, slow, and it keeps nothing widened.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from corral import kernels
from corral.errors import ConfigError, FormatError
from corral.kernels.linear import PointerCache

GGML_Q4_K, GGML_Q5_K, GGML_Q6_K = 12, 13, 14
KQ_BLOCK_BYTES = {GGML_Q4_K: 144, GGML_Q5_K: 176, GGML_Q6_K: 210}
QK_K = 256
MAX_PARTS = 4  # KQ_MAXPARTS in kquant.c


def _check(ggml_type: int, raw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """raw flat uint8 blocks of an (out, in) weight -> (out, row bytes) view, after checking every size."""
    if ggml_type not in KQ_BLOCK_BYTES:
        raise ConfigError(f"K-quant kernels run ggml types {tuple(KQ_BLOCK_BYTES)}, got {ggml_type}")
    out_features, in_features = shape
    if in_features <= 0 or in_features % QK_K:
        raise ConfigError(f"K-quant weights need in_features a positive multiple of {QK_K}, got {in_features}")
    row_bytes = in_features // QK_K * KQ_BLOCK_BYTES[ggml_type]
    if raw.dtype != torch.uint8 or raw.numel() != out_features * row_bytes:
        raise FormatError(f"expected {out_features * row_bytes} bytes of ggml type {ggml_type} blocks for shape "
                          f"{tuple(shape)}, got {raw.numel()} of {raw.dtype}", field="blocks")
    return raw.view(out_features, row_bytes)


def dequantize_rows(ggml_type: int, rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """(n, row bytes) uint8 K-quant rows -> (n, in_features) float32, as the kernels read them."""
    n = rows.shape[0]
    out = torch.empty(n, in_features)
    if n and kernels.available() and rows.is_cpu:
        rows = rows.contiguous()
        ids = torch.arange(n, dtype=torch.int64)
        kernels.library().corral_kq_dequant_rows(ggml_type, rows.data_ptr(), in_features, ids.data_ptr(), n,
                                                 out.data_ptr())
        return out
    from corral.checkpoint.gguf_dequant import dequantize  # the torch decoders, for builds without a compiler

    return dequantize(rows.reshape(-1).cpu(), ggml_type, n * in_features, torch.float32, "kquant").view(n, -1)


class KQuantLinear(PointerCache):
    """y = x @ w.T with w as K-quant rows, in one or more stacked parts (each its own ggml type)."""

    def __init__(self, parts: list[tuple[int, torch.Tensor]], in_features: int):
        super().__init__()
        if not 1 <= len(parts) <= MAX_PARTS:
            raise ConfigError(f"a K-quant module holds 1 to {MAX_PARTS} parts, got {len(parts)}")
        self.in_features = in_features
        self.types = tuple(t for t, _ in parts)
        self.out_features = sum(rows.shape[0] for _, rows in parts)
        for i, (t, rows) in enumerate(parts):
            assert rows.shape[1] == in_features // QK_K * KQ_BLOCK_BYTES[t], (t, rows.shape)
            # not in state_dict: the bytes are the file's (views of its mapping), not parameters to save
            self.register_buffer(f"part{i}", rows, persistent=False)

    @classmethod
    def from_gguf_blocks(cls, raw: torch.Tensor, ggml_type: int, shape: tuple[int, int]) -> KQuantLinear:
        """Raw GGUF blocks (flat uint8, typically a view of the mapped file) of an (out, in) weight."""
        return cls([(ggml_type, _check(ggml_type, raw, shape))], shape[1])

    @classmethod
    def fuse_rows(cls, linears: list[KQuantLinear]) -> KQuantLinear:
        """One module whose output is the outputs of `linears` side by side; the parts are stacked, not copied."""
        if any(type(lin) is not cls or lin.in_features != linears[0].in_features for lin in linears):
            raise ConfigError("fuse_rows needs K-quant modules of one in_features")
        return cls([p for lin in linears for p in lin.parts()], linears[0].in_features)

    def parts(self) -> list[tuple[int, torch.Tensor]]:
        return [(t, self._buffers[f"part{i}"]) for i, t in enumerate(self.types)]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) the kernel multiplies by."""
        return torch.cat([dequantize_rows(t, rows, self.in_features) for t, rows in self.parts()])

    def _kernel(self) -> tuple:
        """(buffers, C function or None, descriptor address, descriptor), rebuilt when a buffer is replaced."""
        bufs = tuple(b for _, b in self.parts())
        usable = all(b.is_cpu and b.is_contiguous() for b in bufs) and kernels.available()
        if not usable:
            cache = (bufs, None, 0, None)
        else:
            fields = [kernels.KIND_KQ, self.in_features, self.out_features, len(bufs), 0, 0,
                      kernels.MIN_WORK_PER_THREAD]
            for t, b in zip(self.types, bufs):
                fields += [t, b.shape[0], b.data_ptr()]
            desc = (ctypes.c_int64 * len(fields))(*fields)
            cache = (bufs, kernels.library().corral_linear, ctypes.addressof(desc), desc)
        self.__dict__["_cache"] = cache
        return cache

    def descriptor(self) -> int | None:
        """The address of the C descriptor (corral_linear, corral_block_step), or None where no kernel runs."""
        cache = self.__dict__.get("_cache")
        if cache is None or any(a is not b for a, b in zip(cache[0], self._buffers.values())):
            cache = self._kernel()
        return cache[2] if cache[1] is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.__dict__.get("_cache")
        if cache is None or any(a is not b for a, b in zip(cache[0], self._buffers.values())):
            cache = self._kernel()
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected (..., {self.in_features}) input, got {tuple(x.shape)}")
        dtype = x.dtype
        if cache[1] is None:
            return F.linear(x, self.dequantize().to(x.device, dtype))
        if dtype is not torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        y = torch.empty(*x.shape[:-1], self.out_features)
        rc = cache[1](cache[2], x.data_ptr(), x.numel() // self.in_features, y.data_ptr(), torch.get_num_threads(),
                      kernels.simd_flag())
        if rc:
            raise MemoryError("corral kernels: no memory for the activation buffer")
        return y if dtype is torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        names = {GGML_Q4_K: "Q4_K", GGML_Q5_K: "Q5_K", GGML_Q6_K: "Q6_K"}
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"types={'|'.join(names[t] for t in self.types)}")


class KQuantEmbedding(nn.Module):
    """A token table kept as K-quant rows (a view of the file): a lookup widens only the rows it takes."""

    def __init__(self, ggml_type: int, raw: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        self.ggml_type, self.dim, self.dtype = ggml_type, shape[1], dtype
        self.register_buffer("rows", _check(ggml_type, raw, shape), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        if kernels.available() and self.rows.is_cpu:
            ids = flat.to(torch.int64).contiguous()
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.rows.shape[0]):
                raise IndexError(f"token id out of range for a {self.rows.shape[0]}-row table")
            out = torch.empty(ids.numel(), self.dim)
            kernels.library().corral_kq_dequant_rows(self.ggml_type, self.rows.data_ptr(), self.dim, ids.data_ptr(),
                                                     ids.numel(), out.data_ptr())
        else:
            out = dequantize_rows(self.ggml_type, self.rows[flat], self.dim)
        return out.to(self.dtype).view(*tokens.shape, self.dim)
