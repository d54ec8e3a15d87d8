"""What every checkpoint reader returns, and the one weight transform formats share.

Inside Corral every weight has Meta's name and Meta's layout. A format module is a key map
plus named transforms applied at this boundary (STYLE.md 3), and returns a ``Checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from corral.errors import FormatError
from corral.model.config import ModelConfig
from corral.model.llama import Transformer


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    """Meta key names (``layers.0.attention.wq.weight``), Meta RoPE layout, no ``output.weight`` when tied."""
    format: str
    """"gguf", "hf" or "meta"."""
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    """Format-specific extras: GGUF key/values (tokenizer, chat template), HF config and tokenizer_config."""


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a model of this shape has (Meta names, no ``output.weight`` when tied) -> its shape.

    Read off the Transformer itself, built on the meta device, so each format checks a file against the
    model that will load it rather than against a table of its own. Every block has the same shapes, so
    one block is built and its names repeated per layer (a whole 80-layer model takes ~0.1 s to build).
    """
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(config, n_layers=1))
    one = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    block = {name.removeprefix("layers.0."): shape for name, shape in one.items() if name.startswith("layers.0.")}
    shapes = {"tok_embeddings.weight": one.pop("tok_embeddings.weight")}
    shapes |= {f"layers.{i}.{name}": shape for i in range(config.n_layers) for name, shape in block.items()}
    return shapes | {name: shape for name, shape in one.items() if not name.startswith("layers.")}


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved-pair RoPE) -> HF (half-split RoPE) layout of a wq/wk weight. GGUF keeps Meta's layout.

    (n_heads*head_dim, dim) viewed as (n_heads, head_dim//2, 2, dim): pairs move to halves.
    """
    out_features, dim = w.shape
    head_dim = out_features // n_heads
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(out_features, dim)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (half-split) -> Meta (interleaved pairs); the inverse of ``permute_qk``.

    REFERENCE.md: ``w.view(n_heads, 2, head_dim//2, dim).transpose(1, 2).reshape(n_heads*head_dim, dim)``.
    """
    out_features, dim = w.shape
    head_dim = out_features // n_heads
    return w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(out_features, dim)


TENSORS_PER_LAYER = 9
"""wq, wk, wv, wo, w1, w2, w3 and the two norms: the fewest tensors one transformer block can have."""


def check_layer_count(n_layers: int, n_tensors: int, *, field: str, path: str | None = None) -> None:
    """Refuse a layer count the tensors that exist cannot fill, before anything is built per layer.

    Every format's config names its depth (GGUF ``llama.block_count``, HF ``num_hidden_layers``, Meta
    ``n_layers``); trusting it would let a 1 KB config that asks for 10^9 layers list 9 * 10^9 expected
    tensors, or build that model, before any shape check could fail (RELIABILITY.md 2, 40).
    """
    if n_layers > n_tensors // TENSORS_PER_LAYER:
        raise FormatError(f"{n_layers} layers need more than the {n_tensors} tensors the weights hold",
                          path=path, field=field)


def read_config_file(directory: Path, name: str) -> tuple[Path, dict]:
    """A checkpoint directory's config (config.json, params.json): its path and its JSON object."""
    path = directory / name
    if not path.is_file():
        raise FormatError(f"no {name}", path=str(directory))
    return path, read_json_object(path)


def read_json_object(path: Path) -> dict:
    """A small JSON config file (config.json, params.json, an index) as a dict, or a FormatError naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"not valid JSON ({exc})", path=str(path)) from None
    if not isinstance(value, dict):
        raise FormatError("is not a JSON object", path=str(path))
    return value
