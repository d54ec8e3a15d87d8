"""LoRA adapters on disk: what every adapter reader returns, format detection, and stacking on a model.

Two formats, each a key map (STYLE.md 3): Hugging Face PEFT directories (``adapter_config.json`` +
``adapter_model.safetensors``, corral.checkpoint.peft) and llama.cpp GGUF LoRA files
(``general.type = adapter``, corral.checkpoint.gguf_lora). Inside Corral an adapter is Meta-named
``{module}.lora_a.weight`` (r, in) / ``{module}.lora_b.weight`` (out, r) tensors in Meta's RoPE layout,
and one alpha per module (scale = alpha / r, Hu et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corral.checkpoint.base import weight_shapes
from corral.errors import FormatError, ModelNotFoundError, UnknownFormatError
from corral.model.config import ModelConfig
from corral.model.lora import apply_lora_weights, lora_modules

PEFT_CONFIG = "adapter_config.json"
GGUF_MAGIC = b"GGUF"


@dataclass
class LoraAdapter:
    tensors: dict[str, torch.Tensor]
    """Corral names (``layers.0.attention.wq.lora_a.weight``), Meta layout: A (r, in), B (out, r)."""
    alphas: dict[str, float]
    """Module name (``layers.0.attention.wq``, ``output``) -> alpha; the scale is alpha / r."""
    format: str
    """"peft", "gguf", or "corral" for one taken from a model in memory (adapter_of)."""
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    """The format's own settings: PEFT's adapter_config.json, GGUF key/values."""

    @property
    def rank(self) -> int:
        """The largest rank of any module (PEFT's ``r`` when it is uniform)."""
        return max(t.shape[0] for name, t in self.tensors.items() if name.endswith("lora_a.weight"))


def check_adapter_shapes(tensors: dict[str, torch.Tensor], config: ModelConfig, file_names: dict[str, str],
                         path: Path) -> None:
    """FormatError naming the tensor (as the file names it) whose shape does not fit a base of `config`.

    Runs before any layout transform, so an adapter for another base fails here with both shapes,
    not later inside a reshape.
    """
    shapes = weight_shapes(config)
    for name, t in tensors.items():
        module, _, which = name.rpartition(".lora_")
        base = shapes.get(f"{module}.weight")
        where = file_names.get(name, name)
        if base is None:
            raise FormatError(f"adapter targets a weight this {config.n_layers}-layer base does not have",
                              path=str(path), field=where)
        if t.dim() != 2:
            raise FormatError(f"adapter tensor must be 2-d, got shape {tuple(t.shape)}", path=str(path), field=where)
        a = tensors.get(f"{module}.lora_a.weight")
        b = tensors.get(f"{module}.lora_b.weight")
        if a is None or b is None:
            raise FormatError("adapter has lora_a without lora_b or the other way round", path=str(path), field=where)
        rank = a.shape[0]
        expected = (rank, base[1]) if which == "a.weight" else (base[0], rank)
        if tuple(t.shape) != expected:
            raise FormatError(f"shape {tuple(t.shape)} does not fit the base model, whose {module} weight is "
                              f"{base} (expected {expected}): an adapter made for another base?",
                              path=str(path), field=where)


def detect_adapter_format(path: str | Path) -> str:
    """"peft" for a directory with adapter_config.json, "gguf" for a file starting with the GGUF magic."""
    path = Path(path)
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return "peft"
        raise UnknownFormatError(f"a directory without {PEFT_CONFIG} is not a PEFT adapter", path=str(path))
    if not path.is_file():
        raise ModelNotFoundError(f"adapter not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) == GGUF_MAGIC:
            return "gguf"
    raise UnknownFormatError("not a PEFT adapter directory or a GGUF LoRA file", path=str(path))


def load_adapter(path: str | Path, config: ModelConfig) -> LoraAdapter:
    """Read a PEFT directory or GGUF LoRA file for a base of `config` (format decided by content)."""
    kind = detect_adapter_format(path)
    if kind == "peft":
        from corral.checkpoint.peft import load_peft_adapter

        return load_peft_adapter(path, config)
    from corral.checkpoint.gguf_lora import load_gguf_adapter

    return load_gguf_adapter(path, config)


def adapter_of(model: nn.Module) -> LoraAdapter:
    """The LoRA layers of `model` (apply_lora or apply_adapter put them there) as an adapter to save."""
    modules = lora_modules(model)
    if not modules:
        raise FormatError("the model has no LoRA layers (apply_lora or apply_adapter first)")
    tensors = {f"{name}.lora_{ab}.weight": getattr(m, f"lora_{ab}").weight.detach()
               for name, m in modules.items() for ab in "ab"}
    return LoraAdapter(tensors=tensors, alphas={name: m.alpha for name, m in modules.items()}, format="corral",
                       path=Path("."))


def merge_adapter_weights(state_dict: dict[str, torch.Tensor], adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """A copy of `state_dict` (Meta names) with W + (alpha / r) B A for every module of `adapter`.

    The same sum merge_lora forms on a model, for a checkpoint that is only written out again.
    """
    out = dict(state_dict)
    for module, alpha in adapter.alphas.items():
        a, b = adapter.tensors[f"{module}.lora_a.weight"], adapter.tensors[f"{module}.lora_b.weight"]
        w = out.get(f"{module}.weight")
        if w is None:  # e.g. an lm_head adapter on a tied model, which has no output weight
            raise FormatError("adapter targets a weight the checkpoint does not have", field=f"{module}.weight")
        out[f"{module}.weight"] = (w.float() + (alpha / a.shape[0]) * (b.float() @ a.float())).to(w.dtype)
    return out


def apply_adapter(model: nn.Module, adapter: LoraAdapter) -> nn.Module:
    """Stack `adapter` on `model` as LoRA layers (merge_lora folds them in for float bases); returns model."""
    return apply_lora_weights(model, adapter.tensors, adapter.alphas)
