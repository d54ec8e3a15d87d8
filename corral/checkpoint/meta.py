"""Meta's own checkpoint layout: ``params.json`` plus ``consolidated.NN.pth`` model-parallel shards.

Meta's Llama 3 code (fairscale) splits each weight across NN ranks one of three ways, and the
merge below undoes exactly that:
  column-parallel (output features split, concatenated on dim 0): wq, wk, wv, w1, w3, output, and
  tok_embeddings (a VocabParallelEmbedding: vocabulary rows split);
  row-parallel (input features split, concatenated on dim 1): wo, w2;
  replicated (every rank holds the same copy): the RMSNorm weights.
Shards are unpickled with ``weights_only=True``, so a pickle that would run code is refused
before it runs (RELIABILITY.md 8).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from corral.checkpoint.atomic import write_atomic
from corral.checkpoint.base import Checkpoint, check_layer_count, read_config_file, weight_shapes
from corral.errors import ConfigError, FormatError
from corral.model.config import ModelConfig

SHARD_NAME = re.compile(r"consolidated\.(\d{2})\.pth")
IGNORED_KEYS = {"rope.freqs"}  # precomputed RoPE table older Meta checkpoints carry; we recompute it

# Last two components of a Meta key (module name, "weight") -> the dim its shards are concatenated on;
# None means replicated.
SPLIT_DIM: dict[str, int | None] = {
    "tok_embeddings": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
    "wo": 1, "w2": 1,
    "attention_norm": None, "ffn_norm": None, "norm": None,
}


def check_state_dict(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], path: Path | None,
                     layers_field: str = "n_layers") -> None:
    """Raise FormatError naming missing, unexpected or wrongly shaped tensors (Meta names).

    The config's layer count (``layers_field`` in the file) is checked against the tensors first, so the
    expected names are only listed for a depth the weights can hold.
    """
    where = str(path) if path is not None else None
    check_layer_count(config.n_layers, len(state_dict), field=layers_field, path=where)
    expected = weight_shapes(config)
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise FormatError(f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}",
                          path=where, field=missing[0])
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise FormatError(f"unexpected tensors: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}",
                          path=where, field=unexpected[0])
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise FormatError(f"shape {tuple(state_dict[key].shape)} does not match the config's {shape}",
                              path=where, field=key)


def drop_tied_output(config: ModelConfig, state_dict: dict[str, torch.Tensor], path: Path | None) -> None:
    """A tied model keeps no ``output.weight``; one that differs from the embedding contradicts the config."""
    output = state_dict.get("output.weight")
    if not config.tie_embeddings or output is None:
        return
    embed = state_dict.get("tok_embeddings.weight")
    # Meta-device tensors (a load without weights) have shapes but no values to compare.
    same = embed is not None and output.shape == embed.shape and (output.is_meta or embed.is_meta
                                                                  or torch.equal(output, embed))
    if not same:
        raise FormatError("config ties embeddings but the output weight differs from tok_embeddings",
                          path=str(path) if path is not None else None, field="output.weight")
    del state_dict["output.weight"]


def _split_dim(key: str, path: Path | None = None) -> int | None:
    module = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else key
    if module not in SPLIT_DIM:
        raise FormatError("not a Llama weight; cannot tell how model-parallel shards split it",
                          path=str(path) if path is not None else None, field=key)
    return SPLIT_DIM[module]


def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """One ``consolidated.NN.pth``: a flat {name: tensor} dict, unpickled without running code."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, MemoryError) as exc:
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
            raise
        raise FormatError(f"cannot read the archive ({type(exc).__name__}: {exc})", path=str(path)) from None
    except Exception as exc:  # noqa: BLE001 -- a hostile archive can raise anything from zip, pickle or torch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FormatError(f"refused or unreadable pickle ({type(exc).__name__}: {first[:300]})",
                          path=str(path)) from None
    if not isinstance(obj, dict):
        raise FormatError(f"holds a {type(obj).__name__}, not a dict of tensors", path=str(path))
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise FormatError(f"entry is a {type(value).__name__}, not a tensor", path=str(path), field=str(key))
    return {k: v for k, v in obj.items() if k not in IGNORED_KEYS}


def _shard_paths(directory: Path) -> list[Path]:
    numbered = {}
    for p in directory.iterdir():
        match = SHARD_NAME.fullmatch(p.name)
        if match:
            numbered[int(match.group(1))] = p
    if not numbered:
        raise FormatError("no consolidated.NN.pth file", path=str(directory))
    gaps = [i for i in range(max(numbered) + 1) if i not in numbered]
    if gaps:
        raise FormatError(f"shard numbers must run 00..{max(numbered):02d} without gaps; missing {gaps}",
                          path=str(directory), field=f"consolidated.{gaps[0]:02d}.pth")
    return [numbered[i] for i in range(len(numbered))]


def merge_shards(shards: list[dict[str, torch.Tensor]], paths: list[Path]) -> dict[str, torch.Tensor]:
    """Undo Meta's model-parallel split (module docstring); every shard must hold the same keys."""
    if len(shards) == 1:
        return dict(shards[0])
    for shard, path in zip(shards[1:], paths[1:]):
        if shard.keys() != shards[0].keys():
            diff = sorted(shard.keys() ^ shards[0].keys())
            raise FormatError(f"holds different tensors than {paths[0].name}: {diff[:8]}", path=str(path),
                              field=diff[0])
    merged = {}
    for key in shards[0]:
        parts = [shard[key] for shard in shards]
        split = _split_dim(key, paths[0])
        if split is None:
            for part, path in zip(parts[1:], paths[1:]):
                if part.shape != parts[0].shape or not (part.is_meta or torch.equal(part, parts[0])):
                    raise FormatError(f"replicated tensor differs from {paths[0].name}", path=str(path), field=key)
            merged[key] = parts[0]
            continue
        if any(p.dim() != 2 or p.shape[1 - split] != parts[0].shape[1 - split] for p in parts):
            raise FormatError(f"shards cannot be joined on dim {split}: shapes {[tuple(p.shape) for p in parts]}",
                              path=str(paths[0].parent), field=key)
        merged[key] = torch.cat(parts, dim=split)
    return merged


def load_meta(directory: str | Path, dtype: torch.dtype | None = None, *, weights: bool = True) -> Checkpoint:
    """Read a Meta checkpoint directory; ``dtype=None`` keeps the stored dtype.

    ``weights=False`` checks everything a load checks but keeps only shapes (meta-device tensors): the
    pickles are still opened (memory-mapped, ``weights_only``), so one that would run code is refused.
    """
    directory = Path(directory)
    params_path, params = read_config_file(directory, "params.json")
    try:
        config = ModelConfig.from_params(params)
    except ConfigError as exc:
        raise FormatError(str(exc), path=str(params_path)) from None
    paths = _shard_paths(directory)
    shards = [read_pth(p) for p in paths]
    if not weights:
        shards = [{k: v.to("meta") for k, v in shard.items()} for shard in shards]
    state_dict = merge_shards(shards, paths)
    if "output.weight" not in state_dict and "tie_embeddings" not in params:
        # Meta's params.json has no field for tying; a checkpoint without an output projection is tied.
        config = dataclasses.replace(config, tie_embeddings=True)
    drop_tied_output(config, state_dict, directory)
    check_state_dict(config, state_dict, directory)
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    metadata: dict = {"params": params}
    if (directory / "tokenizer.model").is_file():
        metadata["tokenizer_model"] = directory / "tokenizer.model"
    return Checkpoint(config=config, state_dict=state_dict, format="meta", path=directory, metadata=metadata)


def split_for_shards(state_dict: Mapping[str, torch.Tensor], n_shards: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of ``merge_shards``: rank r's slice of every tensor (each its own compact copy)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for key, tensor in state_dict.items():
        split = _split_dim(key)
        if split is not None and tensor.shape[split] % n_shards:
            raise ConfigError(f"{key}: dim {split} of size {tensor.shape[split]} does not split into {n_shards} shards")
        parts = [tensor] * n_shards if split is None else list(torch.chunk(tensor, n_shards, dim=split))
        for shard, part in zip(shards, parts):
            # clone: torch.save writes a view's whole underlying storage, not just the view.
            shard[key] = part.detach().to("cpu").clone()
    return shards


def export_meta(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], directory: str | Path, *,
                n_shards: int = 1, tokenizer_model: str | Path | None = None) -> None:
    """Write ``params.json`` and ``consolidated.00..NN.pth`` split as Meta's model-parallel code expects."""
    directory = Path(directory)
    if not isinstance(n_shards, int) or n_shards < 1 or n_shards > 99:
        raise ConfigError(f"n_shards must be an integer in 1..99, got {n_shards!r}")
    state = dict(state_dict)
    drop_tied_output(config, state, None)
    check_state_dict(config, state, None)
    shards = split_for_shards(state, n_shards)
    directory.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(shards):
        write_atomic(directory / f"consolidated.{rank:02d}.pth", lambda tmp, shard=shard: torch.save(shard, tmp))
    # Shards left from an earlier export with more ranks would be merged in by the next load.
    for stale in directory.glob("consolidated.*.pth"):
        match = SHARD_NAME.fullmatch(stale.name)
        if match and int(match.group(1)) >= n_shards:
            stale.unlink()
    params = json.dumps(config.to_params(), indent=2) + "\n"
    write_atomic(directory / "params.json", lambda tmp: tmp.write_text(params, encoding="utf-8"))
    if tokenizer_model is not None:
        write_atomic(directory / "tokenizer.model", lambda tmp: shutil.copyfile(tokenizer_model, tmp))
