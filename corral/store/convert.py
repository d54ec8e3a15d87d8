"""``corral convert`` and ``corral quantize``: rewrite a model's weights in another format or type.

convert loads any checkpoint and writes it with ``corral.checkpoint.export.export_checkpoint``;
the tokenizer goes along where the target format can hold it (GGUF -> GGUF metadata, HF -> HF
tokenizer files, Meta -> Meta tokenizer.model; HF or Meta -> GGUF as the ``tokenizer.*`` keys
llama.cpp's converter writes, ``corral.tokenizer.gguf_vocab``) and a note says when it cannot.

quantize writes one of llama.cpp's mixes (Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0): each tensor gets the
type llama.cpp's quantizer would give it (``corral.checkpoint.gguf_quant``) and, from float
weights, the same blocks byte for byte. A GGUF source is read tensor by tensor: a tensor already in
its target type is copied, others are widened to float32 and quantized (a quantized source is
requantized, which llama.cpp refuses without --allow-requantize). Other sources are loaded and
written in the mix directly, with their tokenizer.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from corral.checkpoint.atomic import write_atomic
from corral.errors import CorralError

GGUF_QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0")
RUNTIME_QUANTS = ("int8", "int4")
_TOKENIZER_FILES = {"hf": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "generation_config.json"),
                    "meta": ("tokenizer.model",)}
# Keys the GGUF writer sets itself, or that a requantized file must not keep from its source.
_WRITER_KEYS = {"general.architecture", "general.alignment", "general.file_type", "general.quantization_version"}


def convert_checkpoint(source: Path, dest: Path, fmt: str, qtype: str = "F32",
                       step: Callable[[str], None] | None = None, adapters: Sequence[Path] = ()) -> list[str]:
    """Write `source` (any format Corral loads) as `fmt` at `dest`; returns notes for the user.

    `adapters` (PEFT directories or GGUF LoRA files) are merged into the weights first, in order.
    """
    import torch

    from corral.checkpoint.adapter import load_adapter, merge_adapter_weights
    from corral.checkpoint.export import export_checkpoint
    from corral.checkpoint.load import load_checkpoint

    if step:
        step("reading")
    ckpt = load_checkpoint(source, dtype=torch.float32)
    for path in adapters:
        ckpt.state_dict = merge_adapter_weights(ckpt.state_dict, load_adapter(path, ckpt.config))
    if step:
        step("writing")
    notes: list[str] = []
    metadata = ckpt.metadata if ckpt.format == "gguf" else None
    if fmt == "gguf" and ckpt.format in _TOKENIZER_FILES:
        metadata = _gguf_tokenizer(ckpt, notes)
    export_checkpoint(ckpt.config, ckpt.state_dict, dest, fmt, qtype=qtype, metadata=metadata)
    if fmt == ckpt.format and fmt in _TOKENIZER_FILES:
        for name in _TOKENIZER_FILES[fmt]:
            if (ckpt.path / name).is_file():
                write_atomic(dest / name, lambda tmp, name=name: shutil.copyfile(ckpt.path / name, tmp))
    elif fmt != ckpt.format and fmt != "gguf":
        notes.append(f"the tokenizer is not carried from {ckpt.format} to {fmt}; add its files to {dest} yourself")
    return notes


def _gguf_tokenizer(ckpt, notes: list[str]) -> dict | None:
    """tokenizer.* metadata for an HF or Meta checkpoint's own tokenizer files, or None with a note why not."""
    from corral.errors import TokenizerError
    from corral.tokenizer.gguf_vocab import gguf_vocab_from_hf, gguf_vocab_from_tiktoken

    source = ckpt.path / _TOKENIZER_FILES[ckpt.format][0]
    if not source.is_file():
        notes.append(f"{ckpt.path} has no {source.name}; the GGUF file has no tokenizer")
        return None
    try:
        if ckpt.format == "hf":
            return gguf_vocab_from_hf(ckpt.path, ckpt.config.vocab_size)
        return gguf_vocab_from_tiktoken(source, ckpt.config.vocab_size)
    except TokenizerError as e:
        notes.append(f"the tokenizer is not written to the GGUF file: {e}")
        return None


def _write_requantized(src: Path, tmp: Path, qtype: str, tick: Callable[[int], None] | None) -> None:
    """Stream `src` into `tmp` in the mix: the header first (every tensor's type and size is known from its
    shape), then one tensor at a time, so memory holds one quantized tensor, not the whole model."""
    from gguf import GGUFWriter
    from gguf.constants import GGML_QUANT_SIZES, GGUFValueType

    from corral.checkpoint.gguf_quant import MIXES, quantize_tensor, tensor_types
    from corral.checkpoint.gguf_reader import read_gguf

    with read_gguf(src) as g:
        meta = g.metadata
        writer = GGUFWriter(tmp, str(meta.get("general.architecture", "llama")))
        try:
            for key, value in meta.items():
                if key in _WRITER_KEYS:
                    continue
                vtype, etype = g.value_types[key]
                writer.add_key_value(key, value, GGUFValueType(vtype), GGUFValueType(etype) if etype is not None
                                     else None)
            writer.add_file_type(MIXES[qtype][1])
            writer.add_quantization_version(2)  # GGML_QNT_VERSION, as llama.cpp's quantizer writes
            arch = meta.get("general.architecture", "llama")
            n_heads = int(meta.get(f"{arch}.attention.head_count", 1))
            targets = tensor_types({n: (i.shape, i.ggml_type) for n, i in g.tensors.items()}, qtype,
                                   n_layers=int(meta.get(f"{arch}.block_count", 0)), n_heads=n_heads,
                                   n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)))
            for name, info in g.tensors.items():
                block, block_bytes = GGML_QUANT_SIZES[targets[name]]
                row_bytes = info.shape[-1] // block * block_bytes
                writer.add_tensor_info(name, (*info.shape[:-1], row_bytes), np.dtype(np.uint8),
                                       info.numel // info.shape[-1] * row_bytes, raw_dtype=targets[name])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, info in g.tensors.items():
                if targets[name] == info.ggml_type:  # llama.cpp copies a tensor already in its type
                    out = np.asarray(g.raw(name))
                else:
                    out = quantize_tensor(g.tensor(name).numpy(), targets[name])
                writer.write_tensor_data(np.ascontiguousarray(out).reshape(-1).view(np.uint8))
                if tick:
                    tick(info.nbytes)
        finally:
            writer.close()


def quantize_gguf(source: Path, dest: Path, qtype: str, tick: Callable[[int], None] | None = None) -> Path:
    """Write `source` (a GGUF file, or any checkpoint) as a GGUF with 2-D weights in `qtype` at `dest`."""
    from corral.checkpoint.load import detect_format

    if qtype not in GGUF_QUANTS:
        raise CorralError(f"GGUF quantization supports {', '.join(GGUF_QUANTS)}, not {qtype!r}")
    if detect_format(source) == "gguf" and source.is_file():
        write_atomic(dest, lambda tmp: _write_requantized(source, tmp, qtype, tick))
        return dest
    # HF or Meta: one pass, weights and tokenizer straight into the mix (export_gguf writes atomically).
    convert_checkpoint(source, dest, "gguf", qtype)
    if tick:
        files = [p for p in source.rglob("*") if p.is_file()] if source.is_dir() else [source]
        tick(sum(p.stat().st_size for p in files))
    return dest
