"""Write Meta-named weights as a GGUF v3 file that llama.cpp (and ``load_gguf``) load.

What llama.cpp's converter does to a Llama checkpoint, we do to ours: the inverse key map,
q/k left in Meta's adjacent-pair RoPE layout (the converter un-permutes HF weights back to
it), 1-D norms kept in F32, ``{arch}.*`` shape keys, and for Llama 3.1 scaling a
``rope_freqs.weight`` tensor of per-frequency divisors. The
byte-level writing is ``gguf.GGUFWriter``'s, so our reader is tested against another
implementation's files. The file appears atomically: written to a temp file beside the
destination, fsynced, then renamed over it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType, GGUFValueType

from corral.checkpoint.atomic import write_atomic
from corral.checkpoint.base import weight_shapes
from corral.checkpoint.gguf import GGUF_TO_META, ROPE_FREQS
from corral.checkpoint.gguf_quant import MIXES, quantize_tensor, tensor_types
from corral.errors import ConfigError
from corral.model.config import ModelConfig
from corral.model.rope import rope_frequencies

# qtype -> (base type of 2-D weights, general.file_type); llama.cpp's mixes, see gguf_quant.
QTYPES = MIXES
META_TO_GGUF: dict[str, str] = {meta: gguf for gguf, meta in GGUF_TO_META.items()}

# Keys this module writes itself; a caller's metadata cannot override them.
_OWN_KEYS = {"general.architecture", "general.alignment", "general.file_type", "general.quantization_version"}
_PASSTHROUGH_PREFIXES = ("general.", "tokenizer.")
# Value types llama.cpp's converter uses for known keys; other values get a type from their Python type.
_KEY_TYPES: dict[str, GGUFValueType] = {
    **{f"tokenizer.ggml.{name}_token_id": GGUFValueType.UINT32
       for name in ("bos", "eos", "eot", "eom", "unknown", "padding", "seperator", "cls", "mask")},
    "tokenizer.ggml.token_type": GGUFValueType.INT32,
    "tokenizer.ggml.scores": GGUFValueType.FLOAT32,
}


def gguf_name(meta_name: str) -> str:
    """The GGUF name of a Meta-named weight (``layers.3.attention.wq.weight`` -> ``blk.3.attn_q.weight``)."""
    parts = meta_name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[1].isdigit():
        return META_TO_GGUF[f"layers.{{i}}.{parts[2]}"].format(i=parts[1])
    return META_TO_GGUF[meta_name]


def _value_type(key: str, value: Any) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        if key in _KEY_TYPES:
            return _KEY_TYPES[key]
        return GGUFValueType.UINT32 if 0 <= value < 2**32 else GGUFValueType.INT64
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    raise ConfigError(f"metadata {key!r}: cannot store a {type(value).__name__} in GGUF")


def _add_metadata(writer: GGUFWriter, metadata: dict[str, Any]) -> None:
    """Pass through general.* and tokenizer.* keys (names, vocabulary, chat template); others are ours."""
    for key, value in metadata.items():
        if key in _OWN_KEYS or not key.startswith(_PASSTHROUGH_PREFIXES):
            continue
        if isinstance(value, (list, tuple)):
            if not value:
                continue  # GGUF arrays need an element type; llama.cpp's converter skips empty ones too
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, _KEY_TYPES.get(key, _value_type(key, value[0])))
        else:
            writer.add_key_value(key, value, _value_type(key, value))


def _add_config(writer: GGUFWriter, config: ModelConfig, qtype: str) -> None:
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.n_heads != config.dim:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(QTYPES[qtype][1])
    writer.add_quantization_version(2)  # GGML_QNT_VERSION: the block layouts of ggml today


def _types(config: ModelConfig, shapes: dict[str, tuple[int, ...]], qtype: str) -> dict[str, GGMLQuantizationType]:
    """Meta name -> ggml type: llama.cpp's choice for `qtype` (norms F32; rows not whole blocks fall back)."""
    f32 = int(GGMLQuantizationType.F32)
    by_gguf = tensor_types({gguf_name(n): (s, f32) for n, s in shapes.items()}, qtype, n_layers=config.n_layers,
                           n_heads=config.n_heads, n_kv_heads=config.kv_heads)
    return {name: by_gguf[gguf_name(name)] for name in shapes}


def _encode(weight: torch.Tensor, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """One weight as GGUF data of `ggml_type`."""
    return quantize_tensor(weight.detach().to(device="cpu", dtype=torch.float32).numpy(), ggml_type)


def _check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    shapes = weight_shapes(config)
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in shapes]
    if missing or unexpected:
        raise ConfigError(f"state dict does not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in shapes.items():
        if tuple(state_dict[name].shape) != shape:
            raise ConfigError(f"{name} has shape {tuple(state_dict[name].shape)}, the config says {shape}")
    return shapes


def _rope_divisors(config: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs: plain frequency / scaled frequency, (head_dim/2,) float32."""
    plain = rope_frequencies(dataclasses.replace(config, use_scaled_rope=False))
    return (plain / rope_frequencies(config)).numpy().astype(np.float32)


def _write(path: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor], qtype: str,
           metadata: dict[str, Any]) -> None:
    writer = GGUFWriter(path, "llama")
    try:
        _add_config(writer, config, qtype)
        _add_metadata(writer, metadata)
        if config.use_scaled_rope:
            writer.add_tensor(ROPE_FREQS, _rope_divisors(config))
        for name, ggml_type in _types(config, _check_state_dict(config, state_dict), qtype).items():
            # Quantized data is (rows, bytes) uint8; the writer turns that back into the weight's shape.
            writer.add_tensor(gguf_name(name), _encode(state_dict[name], ggml_type), raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def export_gguf(config: ModelConfig, state_dict: dict[str, torch.Tensor], path: str | os.PathLike, *,
                qtype: str = "F32", metadata: dict[str, Any] | None = None) -> Path:
    """Write `state_dict` (Meta names and layout) as a llama GGUF file at `path`; 2-D weights in `qtype`."""
    if qtype not in QTYPES:
        raise ConfigError(f"GGUF export supports {', '.join(QTYPES)}, not {qtype!r}")
    path = Path(path)
    write_atomic(path, lambda tmp: _write(tmp, config, state_dict, qtype, metadata or {}))
    return path
