"""LoRA adapters as llama.cpp GGUF files (what its convert_lora_to_gguf.py writes and llama-adapter.cpp reads).

Facts of the format (llama.cpp as vendored in llama-cpp-python 0.3.36):
- ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32), and
  ``general.architecture`` of the base ("llama"); no shape keys.
- Tensors are the base weight's GGUF name plus ``.lora_a`` / ``.lora_b``: ``blk.3.attn_q.weight.lora_a``.
  In torch order A is (r, in) and B is (out, r) (ggml: a.ne = [in, r], b.ne = [r, out]).
- q/k are in the GGUF (= Meta) RoPE layout: the converter's row permute of q_proj/k_proj reaches only B.
- scale = alpha / r with r read off B, and alpha 0 means scale 1 (llama.cpp's adapter scale).
One alpha serves the whole file, so on export a module whose alpha differs has B scaled by its ratio.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter

from corral.checkpoint.adapter import LoraAdapter, check_adapter_shapes
from corral.checkpoint.atomic import write_atomic
from corral.checkpoint.gguf import meta_name
from corral.checkpoint.gguf_reader import read_gguf
from corral.checkpoint.gguf_write import gguf_name
from corral.errors import FormatError
from corral.model.config import ModelConfig

SUFFIXES = {".lora_a": ".lora_a.weight", ".lora_b": ".lora_b.weight"}  # GGUF suffix -> Corral suffix


def _corral_name(name: str, path: Path) -> str:
    for suffix, ours in SUFFIXES.items():
        if name.endswith(suffix):
            base = meta_name(name.removesuffix(suffix))
            if base is not None and base.endswith(".weight") and "norm" not in base and "tok_embeddings" not in base:
                return base.removesuffix(".weight") + ours
    raise FormatError("not a LoRA tensor of a Llama linear layer (token-embedding and norm adapters are not "
                      "supported)", path=str(path), field=f"tensor {name!r}")


def load_gguf_adapter(path: str | os.PathLike, config: ModelConfig) -> LoraAdapter:
    """Read a GGUF LoRA file for a base of `config`; tensors come back Corral-named (GGUF is Meta's layout)."""
    path = Path(path)
    with read_gguf(path) as g:
        meta = g.metadata
        for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", "llama")):
            if meta.get(key) != want:
                raise FormatError(f"must be {want!r} for a llama LoRA adapter, got {meta.get(key)!r}",
                                  path=str(path), field=key)
        alpha = meta.get("adapter.lora.alpha", 0.0)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not np.isfinite(alpha) or alpha < 0:
            raise FormatError(f"must be a number >= 0, got {alpha!r}", path=str(path), field="adapter.lora.alpha")
        names = {_corral_name(n, path): n for n in g.tensors}
        if not names:
            raise FormatError("the adapter holds no tensors", path=str(path))
        # Shapes come from the header, so a mismatch is reported before any tensor is decoded.
        shells = {ours: torch.empty(g.tensors[n].shape, device="meta") for ours, n in names.items()}
        check_adapter_shapes(shells, config, {ours: f"tensor {n!r}" for ours, n in names.items()}, path)
        tensors = {ours: g.tensor(n, torch.float32) for ours, n in names.items()}
    alphas = {}
    for name, t in tensors.items():
        if name.endswith(".lora_a.weight"):
            alphas[name.removesuffix(".lora_a.weight")] = float(alpha) if alpha else float(t.shape[0])
    return LoraAdapter(tensors=tensors, alphas=alphas, format="gguf", path=path, metadata=dict(meta))


def export_gguf_adapter(adapter: LoraAdapter, path: str | os.PathLike) -> Path:
    """Write `adapter` as a GGUF LoRA file llama.cpp loads (``--lora``); float32 tensors."""
    path = Path(path)
    values = list(adapter.alphas.values())
    alpha = max(set(values), key=values.count) or 1.0  # the most common; 0 would mean scale 1 to llama.cpp
    arrays = {}
    for name, t in adapter.tensors.items():
        module, _, which = name.rpartition(".lora_")
        t = t.detach().float()
        if which == "b.weight" and adapter.alphas[module] != alpha:
            t = t * (adapter.alphas[module] / alpha)  # scale_m B = (alpha / r) (alpha_m / alpha) B
        arrays[f"{gguf_name(module + '.weight')}.lora_{which[0]}"] = t.contiguous().numpy()

    def write(tmp: Path) -> None:
        writer = GGUFWriter(tmp, "llama")
        try:
            writer.add_type("adapter")
            writer.add_string("adapter.type", "lora")
            writer.add_float32("adapter.lora.alpha", float(alpha))
            for name in sorted(arrays):
                writer.add_tensor(name, arrays[name])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    write_atomic(path, write)
    return path
