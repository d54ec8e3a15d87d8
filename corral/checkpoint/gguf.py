"""Load a llama-architecture GGUF file as a Meta-named ``Checkpoint``.

GGUF is a key map away from Meta's layout (STYLE.md 3): tensor names are renamed by
``GGUF_TO_META`` and GGUF's reversed dims are undone by the parser. No q/k permute: ggml's
"normal" RoPE rotates adjacent pairs like Meta's, so llama.cpp's converter undoes HF's
half-split permute and attn_q/attn_k are stored in Meta's layout (checked against
llama.cpp's own predictions for SmolLM2 in the tests). Llama 3.1 files carry their RoPE
scaling as a ``rope_freqs.weight`` tensor of per-frequency divisors; we recover the scaling
parameters that reproduce it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from corral.checkpoint.base import Checkpoint, check_layer_count, weight_shapes
from corral.checkpoint.gguf_reader import GGUFFile, TensorInfo, read_gguf
from corral.errors import ConfigError, FormatError
from corral.model.config import ModelConfig
from corral.model.rope import rope_frequencies

__all__ = ["GGUF_TO_META", "GGUFFile", "RawTensor", "TensorInfo", "config_from_gguf", "load_gguf",
           "load_gguf_quantized", "read_gguf"]

# GGUF tensor name -> Meta name; "{i}" is the layer index.
GGUF_TO_META: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's Llama 3.1 frequency divisors: not a model weight
_LAYER = re.compile(r"blk\.(0|[1-9]\d*)\.")

# Llama-3-style scaling parameters tried, most common first, when matching a rope_freqs tensor:
# (low_freq_factor, high_freq_factor, old_context_len). The scale factor is read off the tensor.
# Different triples can give identical divisors ((1, 4, 4096) and (2, 8, 8192) do); any match is the same model.
_ROPE_CANDIDATES = [
    (low, high, ctx) for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (2.0, 8.0))
    for ctx in (8192, 4096, 2048, 16384, 32768, 65536, 131072)
]


def meta_name(gguf_name: str) -> str | None:
    """The Meta name of a GGUF tensor, or None if the key map does not know it."""
    m = _LAYER.match(gguf_name)
    if m is None:
        return GGUF_TO_META.get(gguf_name)
    template = GGUF_TO_META.get(f"blk.{{i}}.{gguf_name[m.end():]}")
    return template.format(i=m.group(1)) if template else None


def _get(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    if key not in meta:
        if default is None:
            raise FormatError("required key is missing", field=key)
        return default
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        wanted = "an integer" if kind is int else "a number"
        raise FormatError(f"expected {wanted}, got {type(value).__name__}", field=key)
    return value


def _rope_scaling(gguf: GGUFFile, base: ModelConfig) -> dict[str, Any]:
    """use_scaled_rope and its parameters such that ModelConfig's Llama 3.1 scaling reproduces rope_freqs."""
    where = f"tensor {ROPE_FREQS!r}"
    info = gguf.tensors[ROPE_FREQS]
    if info.shape != (base.head_dim // 2,):
        raise FormatError(f"shape {info.shape} should be ({base.head_dim // 2},)", field=where)
    factors = gguf.tensor(ROPE_FREQS, torch.float64)
    if not torch.isfinite(factors).all() or (factors < 1 - 1e-6).any():
        raise FormatError("frequency divisors must be finite and >= 1", field=where)
    if (factors - 1).abs().max() <= 1e-6:
        return {}
    plain = rope_frequencies(base).double()
    scale = round(float(factors.max()), 4)
    for low, high, ctx in _ROPE_CANDIDATES:
        params = dict(use_scaled_rope=True, rope_scaling_factor=scale, rope_low_freq_factor=low,
                      rope_high_freq_factor=high, rope_old_context_len=ctx)
        cfg = dataclasses.replace(base, **params)
        if torch.allclose(plain / rope_frequencies(cfg).double(), factors, rtol=1e-4, atol=1e-5):
            return params
    raise FormatError("frequency divisors match no Llama 3 style scaling (scale, low/high factor, old context)",
                      field=where)


def _head_dim(meta: dict[str, Any], values: dict[str, Any]) -> None:
    """Set head_dim_override where key_length says heads are not dim / n_heads; RoPE must cover whole heads."""
    key_len = _get(meta, "llama.attention.key_length", int, 0)
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
        other = _get(meta, key, int, 0)
        if key_len and other and other != key_len:
            raise FormatError(f"{other} differs from llama.attention.key_length {key_len}; not a Llama layout",
                              field=key)
        key_len = key_len or (other if key.endswith("dimension_count") else 0)
    if key_len and key_len * values["n_heads"] != values["dim"]:
        values["head_dim_override"] = key_len


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata (plus the rope_freqs tensor and whether `output.weight` exists)."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise FormatError(f"architecture {arch!r} is not supported; Corral runs 'llama'",
                          field="general.architecture")
    n_heads = _get(meta, "llama.attention.head_count", int)
    tokens = meta.get("tokenizer.ggml.tokens")
    embd = gguf.tensors.get("token_embd.weight")
    vocab_default = len(tokens) if isinstance(tokens, list) and tokens else embd.shape[0] if embd else None
    values: dict[str, Any] = dict(
        dim=_get(meta, "llama.embedding_length", int),
        n_layers=_get(meta, "llama.block_count", int),
        n_heads=n_heads,
        n_kv_heads=_get(meta, "llama.attention.head_count_kv", int, n_heads),
        vocab_size=_get(meta, "llama.vocab_size", int, vocab_default),
        ffn_hidden_dim=_get(meta, "llama.feed_forward_length", int),
        norm_eps=float(_get(meta, "llama.attention.layer_norm_rms_epsilon", (int, float))),
        rope_theta=float(_get(meta, "llama.rope.freq_base", (int, float), 10000.0)),
        max_seq_len=_get(meta, "llama.context_length", int),
        tie_embeddings="output.weight" not in gguf.tensors,
    )
    _head_dim(meta, values)
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" and _get(meta, "llama.rope.scaling.factor", (int, float), 1.0) != 1.0:
        raise FormatError(f"RoPE scaling {scaling!r} is not supported (Llama 3.1 scaling comes as rope_freqs)",
                          field="llama.rope.scaling.type")
    check_layer_count(values["n_layers"], len(gguf.tensors), field="llama.block_count")
    try:
        config = ModelConfig(**values)
        if ROPE_FREQS in gguf.tensors:
            config = ModelConfig(**{**values, **_rope_scaling(gguf, config)})
    except ConfigError as exc:
        raise FormatError(f"metadata gives an invalid model: {exc}", path=str(gguf.path), field="llama.*") from None
    return config


def _tensor_names(gguf: GGUFFile, config: ModelConfig) -> dict[str, str]:
    """Meta name -> GGUF name for every weight, after checking names and shapes against the config."""
    shapes = weight_shapes(config)
    names: dict[str, str] = {}
    for name, info in gguf.tensors.items():
        if name == ROPE_FREQS:
            continue
        meta = meta_name(name)
        if meta is None or meta not in shapes:
            raise FormatError(f"unexpected tensor for a {config.n_layers}-layer llama model",
                              field=f"tensor {name!r}")
        if info.shape != shapes[meta]:
            raise FormatError(f"shape {info.shape} does not match the metadata's {shapes[meta]}",
                              field=f"tensor {name!r}")
        names[meta] = name
    missing = [m for m in shapes if m not in names]
    if missing:
        inverse = {meta_name(g): g for g in _all_gguf_names(config)}
        raise FormatError(f"missing ({len(missing)} tensors missing)", field=f"tensor {inverse[missing[0]]!r}")
    return names


def _all_gguf_names(config: ModelConfig) -> list[str]:
    layered = [k for k in GGUF_TO_META if "{i}" in k]
    return [k for k in GGUF_TO_META if "{i}" not in k] + [
        k.format(i=i) for i in range(config.n_layers) for k in layered]


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, weights: bool = True) -> Checkpoint:
    """Read a llama GGUF file into Meta-named `dtype` weights; ``metadata`` is the file's key/value dict.

    ``weights=False`` checks the header and every tensor's name and shape, and returns meta-device tensors.
    """
    with read_gguf(path) as gguf:
        config = config_from_gguf(gguf)
        state_dict: dict[str, torch.Tensor] = {}
        for meta, name in _tensor_names(gguf, config).items():
            state_dict[meta] = (gguf.tensor(name, dtype) if weights
                                else torch.empty(gguf.tensors[name].shape, dtype=dtype, device="meta"))
        return Checkpoint(config=config, state_dict=state_dict, format="gguf", path=Path(path),
                          metadata=gguf.metadata)


class RawTensor(NamedTuple):
    """A GGUF weight kept as its stored blocks."""

    ggml_type: int
    data: torch.Tensor
    """Flat uint8 bytes: for K-quants and token tables a view of the mapped file (no copy; pages are shared
    with the page cache), for other linears a copy (they are repacked anyway)."""
    shape: tuple[int, ...]
    """Torch order, e.g. (out, in)."""


# Types corral.model.quant.apply_gguf_quant_ runs without widening: Q4_0, Q4_1, Q8_0 (ggml.h ids).
NATIVE_QUANT_TYPES = (2, 3, 8)
# And the K-quants corral.kernels.kquant runs: Q4_K, Q5_K, Q6_K.
KQUANT_TYPES = (12, 13, 14)
_NATIVE_LINEAR = re.compile(r"(layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])|output)\.weight")


def load_gguf_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        keep: tuple[int, ...] = NATIVE_QUANT_TYPES) -> tuple[Checkpoint, dict[str, RawTensor]]:
    """Like ``load_gguf``, but linear weights stored in one of the ggml types `keep` stay as raw blocks.

    Their ``state_dict`` slots hold meta tensors of the right shape, so the model builds on the meta device
    as usual; ``corral.model.quant.apply_gguf_quant_(model, raw)`` then fills them. The token table stays
    raw too when its type is kept: a lookup widens only the rows it takes, and in a tied model it also
    serves as the output projection. Raw blocks are views of the mapped file, which stays mapped while
    any of them lives (private mapping: nothing written through a view reaches the file).
    """
    with read_gguf(path) as gguf:
        config = config_from_gguf(gguf)
        state_dict: dict[str, torch.Tensor] = {}
        raw: dict[str, RawTensor] = {}
        for meta, name in _tensor_names(gguf, config).items():
            info = gguf.tensors[name]
            if info.ggml_type in keep and (_NATIVE_LINEAR.fullmatch(meta) or meta == "tok_embeddings.weight"):
                # K-quants and token tables run in place; Q4_0/Q4_1/Q8_0 linears are repacked from a copy
                in_place = info.ggml_type in KQUANT_TYPES or meta == "tok_embeddings.weight"
                data = gguf.raw_tensor(name) if in_place else gguf.copied_tensor(name)
                raw[meta] = RawTensor(info.ggml_type, data, info.shape)
                state_dict[meta] = torch.empty(info.shape, dtype=dtype, device="meta")
                continue
            state_dict[meta] = gguf.tensor(name, dtype)
        ckpt = Checkpoint(config=config, state_dict=state_dict, format="gguf", path=Path(path),
                          metadata=gguf.metadata)
        return ckpt, raw
