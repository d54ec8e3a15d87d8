"""Weight-only quantization as a transform on a finished model (STYLE.md 2).

``quantize_(model, "int8" | "int4")`` swaps the block linears (wq wk wv wo w1 w2 w3) and the output
projection for modules that keep small integer weights and run torch's fused weight-only kernels:

- int8: symmetric per output channel, w = q * s, q in [-127, 127]; ``_weight_int8pack_mm``.
- int4: asymmetric per group of ``group_size`` inputs, w = (q - 8) * scale + zero, q in [0, 15];
  ``_weight_int4pack_mm_for_cpu`` on CPU, ``_weight_int4pack_mm`` on CUDA.

``apply_gguf_quant_`` builds the same modules straight from GGUF blocks: a Q4_0/Q4_1 block of 32
weights is exactly one int4 group (Q4_1 w = d*q + m is (q - 8)*d + (m + 8d); Q4_0 w = (q - 8)*d).

Kernel facts (torch 2.13): both kernels want activations and scales in the same dtype (fp32, bf16 or
fp16 on CPU, bf16 only for CUDA int4). On AVX2 CPUs the fp32 variants are scalar code and 10-15x
slower than bf16, so activations are cast to ``compute_dtype`` (bf16 by default) around the kernel and
the result cast back. Scales are stored in ``compute_dtype``: with bf16 a GGUF fp16 scale loses its
last 3 mantissa bits (pass compute_dtype=torch.float32 for bit-exact GGUF weights).
CPU int4 needs out_features % 16 == 0 and in_features % group_size == 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from corral.errors import ConfigError

SCHEMES = ("int8", "int4")
BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# ggml type ids (ggml.h) of the blocks apply_gguf_quant_ runs natively; the model package imports only torch.
GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 2, 3, 8
GGUF_NATIVE_TYPES = (GGML_Q4_0, GGML_Q4_1, GGML_Q8_0)


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scale with q int8 (out, in) and one scale per output channel."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_int8", q.to(torch.int8).contiguous())  # (out, in)
        self.register_buffer("scales", scales.to(compute_dtype).contiguous())  # (out,)

    @classmethod
    def from_float(cls, w: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        w = w.detach().float()
        # The scale is rounded to compute_dtype before q is chosen, so q is optimal for the scale the kernel sees.
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(compute_dtype).float()  # (out,)
        q = torch.round(w / scales[:, None]).clamp_(-127, 127)
        return cls(q, scales, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # (M, in)
        if self.weight_int8.is_cpu:
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        else:  # no fused int8 kernel off the CPU: widen in the matmul (torch.compile fuses this)
            y = nn.functional.linear(x2, self.weight_int8.to(x2.dtype)) * self.scales
        return y.view(*lead, self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) this module multiplies by."""
        return self.weight_int8.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype={self.compute_dtype}"


class Int4Linear(nn.Module):
    """Group-wise int4: w[n, k] = (q[n, k] - 8) * scale[k // G, n] + zero[k // G, n], packed for the kernel."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int, group_size: int):
        super().__init__()
        self.in_features, self.group_size = in_features, group_size
        self.out_features = scales_and_zeros.shape[1]
        self.compute_dtype = scales_and_zeros.dtype
        self.register_buffer("packed", packed)  # CPU: uint8 (out, in/2) tiled; CUDA: int32 tiles
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (in/G, out, 2)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None) -> Int4Linear:
        """q (out, in) in 0..15, scales and zeros (out, in/G): w = (q - 8) * scale + zero."""
        out_features, in_features = q.shape
        _check_int4_shape(out_features, in_features, group_size)
        device = torch.device(device) if device is not None else q.device
        sz = torch.stack((scales, zeros), dim=-1).transpose(0, 1).to(device, compute_dtype).contiguous()
        return cls(_pack_int4(q.to(device, torch.int32), device), sz, in_features, group_size)

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 32, compute_dtype: torch.dtype = torch.bfloat16,
                   device: torch.device | None = None) -> Int4Linear:
        out_features, in_features = w.shape
        _check_int4_shape(out_features, in_features, group_size)
        g = w.detach().float().reshape(out_features, in_features // group_size, group_size)  # (out, groups, G)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (out, groups)
        # Rounded to compute_dtype first so the codes are chosen against the scale the kernel will use.
        scales = ((hi - lo).clamp(min=1e-12) / 15).to(compute_dtype).float()
        zeros = (lo + 8 * scales).to(compute_dtype).float()
        q = torch.round((g - zeros[..., None]) / scales[..., None] + 8).clamp_(0, 15)
        return cls.from_codes(q.reshape(out_features, in_features), scales, zeros, group_size, compute_dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # (M, in)
        if self.packed.is_cpu:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        return y.view(*lead, self.out_features).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) as the kernel computes it (rounded to compute_dtype), as float32."""
        eye = torch.eye(self.in_features, dtype=self.compute_dtype, device=self.packed.device)
        return self(eye).t().float()  # x = I gives rows of w.T

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"compute_dtype={self.compute_dtype}")


def _check_int4_shape(out_features: int, in_features: int, group_size: int) -> None:
    if group_size not in (32, 64, 128, 256):
        raise ConfigError(f"int4 group_size must be 32, 64, 128 or 256, got {group_size}")
    if in_features % group_size or out_features % 16:
        raise ConfigError(f"int4 needs in_features % group_size == 0 and out_features % 16 == 0; "
                          f"got ({out_features}, {in_features}) with group_size {group_size}")


def _pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 codes (out, in) in 0..15 -> the kernel's packed layout on `device`."""
    if q.is_cpu:
        return torch._convert_weight_to_int4pack_for_cpu(q, 2)  # innerKTiles is ignored on CPU
    if not q.is_cuda or not hasattr(torch, "_weight_int4pack_mm"):
        raise ConfigError(f"int4 has no kernel on {device}; quantize on CPU or CUDA")
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (out, in/2): even index in the high nibble
    inner_k_tiles = 8 if q.shape[1] % 1024 == 0 else 4 if q.shape[1] % 512 == 0 else 2
    try:
        return torch._convert_weight_to_int4pack(pairs, inner_k_tiles)
    except RuntimeError as exc:  # e.g. a GPU older than the kernel's minimum architecture
        raise ConfigError(f"the CUDA int4 kernel is unavailable here: {exc}") from None


def _quantized(w: torch.Tensor, scheme: str, group_size: int, compute_dtype: torch.dtype,
               device: torch.device | None) -> nn.Module:
    if scheme == "int8":
        return Int8Linear.from_float(w.to(device) if device is not None else w, compute_dtype)
    return Int4Linear.from_float(w, group_size, compute_dtype, device)


def quantize_(model: nn.Module, scheme: str, *, group_size: int = 32, device: torch.device | str | None = None,
              compute_dtype: torch.dtype = torch.bfloat16, output_scheme: str | None = "int8") -> nn.Module:
    """Replace the block linears of a Transformer with `scheme` modules, in place; returns the model.

    ``output_scheme`` quantizes the output projection too ("int8" by default for both schemes: it is
    the largest matrix, per-row int8 keeps the logits close, and its kernel measured faster than int4
    here); None leaves it dense. A tied model keeps its embedding table dense for the lookup and gets a
    separate quantized ``output`` module.
    """
    for name in (scheme, output_scheme or "int8"):
        if name not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "int4":
        _check_int4_shape(16, group_size, group_size)
    for layer in model.layers:
        for path in BLOCK_LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            linear = getattr(parent, name)
            if not isinstance(linear, nn.Linear):
                continue  # already quantized (or replaced by another transform)
            if linear.bias is not None:
                raise ConfigError(f"{path} has a bias; weight-only quantization here handles bias-free linears")
            setattr(parent, name, _quantized(linear.weight, scheme, group_size, compute_dtype, device))
    if output_scheme is not None and (model.output is None or isinstance(model.output, nn.Linear)):
        source = model.tok_embeddings.weight if model.output is None else model.output.weight
        model.output = _quantized(source, output_scheme, group_size, compute_dtype, device)
    return model


class BlockEmbedding(nn.Module):
    """A token table kept as GGUF blocks (Q8_0, Q4_0, Q4_1): a lookup widens only the rows it takes.

    A tied model's table doubles as its output projection; keeping it in blocks instead of float32
    saves vocab x dim x 4 bytes (113 MB for SmolLM2) of resident memory.
    """

    def __init__(self, ggml_type: int, data: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        if ggml_type not in GGUF_NATIVE_TYPES:
            raise ConfigError(f"ggml type {ggml_type} has no block embedding; native types are {GGUF_NATIVE_TYPES}")
        vocab, dim = shape
        self.ggml_type, self.dim, self.dtype = ggml_type, dim, dtype
        self.register_buffer("rows", data.view(vocab, -1), persistent=False)  # (vocab, bytes per row)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        size = _BLOCK_BYTES[self.ggml_type]
        b = self.rows[tokens.reshape(-1)].view(-1, size)  # (n * dim / 32, bytes per block)
        d = b[:, 0:2].view(torch.float16).float()
        if self.ggml_type == GGML_Q8_0:
            w = b[:, 2:].view(torch.int8).float() * d
        else:
            qs = b[:, size - 16:]
            q = torch.cat((qs & 0x0F, qs >> 4), dim=1).float()  # low nibbles are weights 0-15, high 16-31
            w = q * d + b[:, 2:4].view(torch.float16).float() if self.ggml_type == GGML_Q4_1 else (q - 8) * d
        return w.to(self.dtype).view(*tokens.shape, self.dim)


_BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q4_1: 20, GGML_Q8_0: 34}


def int4_from_gguf(ggml_type: int, data: torch.Tensor, shape: tuple[int, int],
                   compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None) -> Int4Linear:
    """Q4_0 / Q4_1 blocks (flat uint8) of an (out, in) weight -> Int4Linear, group_size 32, same codes."""
    out_features, in_features = shape
    size = {GGML_Q4_0: 18, GGML_Q4_1: 20}[ggml_type]
    b = data.view(-1, size)  # (out * in / 32, bytes): d fp16 | [m fp16] | 16 bytes of nibbles
    d = b[:, 0:2].view(torch.float16).float()  # (n_blocks, 1)
    qs = b[:, size - 16:]
    # Low nibbles are weights 0-15 of the block, high nibbles 16-31.
    q = torch.cat((qs & 0x0F, qs >> 4), dim=1).reshape(out_features, in_features)
    if ggml_type == GGML_Q4_1:  # w = d*q + m = (q - 8)*d + (m + 8d)
        zeros = b[:, 2:4].view(torch.float16).float() + 8 * d
    else:  # Q4_0: w = (q - 8)*d
        zeros = torch.zeros_like(d)
    groups = (out_features, in_features // 32)
    return Int4Linear.from_codes(q, d.view(groups), zeros.view(groups), 32, compute_dtype, device)


def int8_from_gguf_q8_0(data: torch.Tensor, shape: tuple[int, int],
                        compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None) -> Int8Linear:
    """Q8_0 blocks (d fp16 | 32 int8) -> per-channel Int8Linear: the int8 kernel has one scale per row,
    so the blocks are widened once and re-quantized (error measured in tests/model/test_quant.py)."""
    b = data.view(-1, 34)
    w = (b[:, 2:].view(torch.int8).float() * b[:, 0:2].view(torch.float16).float()).view(shape)
    return Int8Linear.from_float(w.to(device) if device is not None else w, compute_dtype)


def gguf_linear(ggml_type: int, data: torch.Tensor, shape: tuple[int, int],
                compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None) -> nn.Module:
    """The quantized module that runs one GGUF weight of a type in GGUF_NATIVE_TYPES."""
    if ggml_type == GGML_Q8_0:
        return int8_from_gguf_q8_0(data, shape, compute_dtype, device)
    if ggml_type in (GGML_Q4_0, GGML_Q4_1):
        return int4_from_gguf(ggml_type, data, shape, compute_dtype, device)
    raise ConfigError(f"ggml type {ggml_type} has no native path; native types are {GGUF_NATIVE_TYPES}")


def apply_gguf_quant_(model: nn.Module, quantized: dict, *, compute_dtype: torch.dtype = torch.bfloat16,
                      device: torch.device | str | None = None, include_output: bool = True,
                      make_linear: Callable[[int, torch.Tensor, tuple[int, int]], nn.Module] | None = None,
                      make_embedding: Callable[[int, torch.Tensor, tuple[int, int], torch.dtype], nn.Module]
                      | None = None) -> nn.Module:
    """Put GGUF blocks to work in place of dense linears; returns the model.

    ``quantized`` maps Meta weight names to (ggml_type, flat uint8 blocks, shape), as returned by
    ``corral.checkpoint.gguf.load_gguf_quantized``. Block linears and ``output`` named there are replaced;
    a ``tok_embeddings.weight`` entry becomes a BlockEmbedding (rows widened on lookup) and, in a tied
    model, also gives the model its quantized ``output``. ``make_linear(ggml_type, blocks, shape)``
    builds each module instead of torch's kernels (``corral.kernels.linear.gguf_linear`` does), and
    ``make_embedding(ggml_type, blocks, shape, dtype)`` the token table instead of a BlockEmbedding.
    """
    make_embedding = make_embedding or BlockEmbedding
    for name, (ggml_type, data, shape) in quantized.items():
        module_name = name.removesuffix(".weight")
        if name == "tok_embeddings.weight":
            dtype = model.norm.weight.dtype  # the activations' dtype
            if model.tok_embeddings.weight.is_meta:
                model.tok_embeddings = make_embedding(ggml_type, data.to(device) if device else data, shape, dtype)
            if not include_output or model.output is not None:
                continue
            module_name = "output"
        elif module_name == "output" and not include_output:
            raise ConfigError("output.weight came quantized; load it dense to leave the output projection alone")
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if make_linear is not None:
            setattr(parent, attr, make_linear(ggml_type, data, tuple(shape)))
        else:
            setattr(parent, attr, gguf_linear(ggml_type, data, tuple(shape), compute_dtype, device))
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ConfigError(f"weights without data after apply_gguf_quant_: {still_meta[:3]}")
    return model
