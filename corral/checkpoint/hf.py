"""Hugging Face ``LlamaForCausalLM`` directories: ``config.json`` plus safetensors weights.

HF names map to Meta names through the declared dicts below; the only weight transform is the
q/k row permutation between HF's half-split RoPE layout and Meta's interleaved pairs
(``unpermute_qk`` on load, ``permute_qk`` on export). Both the transformers 4.x config
(``rope_theta`` + ``rope_scaling``) and the 5.x one (``rope_parameters``) are read; export writes
the 4.x form, which every version of transformers and llama.cpp's converter understand.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from corral.checkpoint.atomic import write_atomic
from corral.checkpoint.base import Checkpoint, permute_qk, read_config_file, read_json_object, unpermute_qk
from corral.checkpoint.meta import check_state_dict, drop_tied_output
from corral.checkpoint.safetensors_io import read_header, read_safetensors, write_safetensors
from corral.errors import ConfigError, FormatError
from corral.model.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

TOP_LEVEL_KEYS = {  # HF -> Meta
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_KEYS = {  # HF "model.layers.N.<key>" -> Meta "layers.N.<value>"
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
IGNORED_LAYER_KEYS = {"self_attn.rotary_emb.inv_freq"}  # a RoPE table some old conversions saved
_LAYER = re.compile(r"model\.layers\.(0|[1-9]\d*)\.(.+)")  # no leading zeros: "01" would alias "1"
_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_META_TO_HF_LAYER = {meta: hf for hf, meta in LAYER_KEYS.items()}
_META_TO_HF_TOP = {meta: hf for hf, meta in TOP_LEVEL_KEYS.items()}


def hf_to_meta_key(key: str) -> str | None:
    """The Meta name of an HF tensor; None for tensors we deliberately skip. FormatError if unknown."""
    if key in TOP_LEVEL_KEYS:
        return TOP_LEVEL_KEYS[key]
    match = _LAYER.fullmatch(key)
    if match and match.group(2) in IGNORED_LAYER_KEYS:
        return None
    if match and match.group(2) in LAYER_KEYS:
        return f"layers.{int(match.group(1))}.{LAYER_KEYS[match.group(2)]}"
    raise FormatError("unexpected tensor for a Llama model", field=key)


def meta_to_hf_key(key: str) -> str:
    if key in _META_TO_HF_TOP:
        return _META_TO_HF_TOP[key]
    match = _META_LAYER.fullmatch(key)
    if match and match.group(2) in _META_TO_HF_LAYER:
        return f"model.layers.{match.group(1)}.{_META_TO_HF_LAYER[match.group(2)]}"
    raise FormatError("not a Llama weight name", field=key)


# ---- config.json <-> ModelConfig -------------------------------------------------------------

def _field(cfg: dict, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise FormatError("config.json has no value", field=key)
        return default
    value = cfg[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise FormatError(f"must be {kind}, got {value!r}", field=key)
    if not isinstance(value, kind):
        raise FormatError(f"must be {kind}, got {value!r}", field=key)
    return value


def _rope_fields(cfg: dict) -> dict[str, Any]:
    """``rope_theta`` and Llama 3.1 scaling from either config style (module docstring)."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise FormatError("must be an object", field="rope_parameters")
    scaling = cfg.get("rope_scaling") or (params if params is not None else None)
    theta_source = params if params is not None and "rope_theta" in params else cfg
    out: dict[str, Any] = {"rope_theta": float(_field(theta_source, "rope_theta", (int, float), 10000.0))}
    if scaling is None:
        return out
    if not isinstance(scaling, dict):
        raise FormatError("must be an object or null", field="rope_scaling")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return out
    if kind != "llama3":
        raise FormatError(f"rope type {kind!r} is not supported (only 'llama3' frequency scaling)",
                          field="rope_scaling.rope_type")
    out.update(
        use_scaled_rope=True,
        rope_scaling_factor=float(_field(scaling, "factor", (int, float))),
        rope_low_freq_factor=float(_field(scaling, "low_freq_factor", (int, float))),
        rope_high_freq_factor=float(_field(scaling, "high_freq_factor", (int, float))),
        rope_old_context_len=_field(scaling, "original_max_position_embeddings", int),
    )
    return out


def config_from_hf(cfg: dict) -> ModelConfig:
    """ModelConfig from a ``config.json`` dict; FormatError for anything our Llama cannot run."""
    architectures = cfg.get("architectures") or []
    if not isinstance(architectures, list):
        raise FormatError(f"must be a list, got {architectures!r}", field="architectures")
    if "LlamaForCausalLM" not in architectures and cfg.get("model_type") != "llama":
        raise FormatError(f"not a Llama model (architectures={architectures!r}, model_type={cfg.get('model_type')!r})",
                          field="architectures")
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, supported) != supported:
            raise FormatError(f"{cfg[key]!r} is not supported (only {supported!r})", field=key)
    dim = _field(cfg, "hidden_size", int)
    n_heads = _field(cfg, "num_attention_heads", int)
    head_dim = _field(cfg, "head_dim", int, None)
    values = dict(
        dim=dim,
        n_layers=_field(cfg, "num_hidden_layers", int),
        n_heads=n_heads,
        n_kv_heads=_field(cfg, "num_key_value_heads", int, n_heads),
        vocab_size=_field(cfg, "vocab_size", int),
        ffn_hidden_dim=_field(cfg, "intermediate_size", int),
        norm_eps=float(_field(cfg, "rms_norm_eps", (int, float), 1e-6)),  # transformers' default, not Meta's
        max_seq_len=_field(cfg, "max_position_embeddings", int, 2048),
        tie_embeddings=_field(cfg, "tie_word_embeddings", bool, False),
        head_dim_override=head_dim if head_dim is not None and n_heads * head_dim != dim else None,
        **_rope_fields(cfg),
    )
    try:
        return ModelConfig(**values)
    except ConfigError as exc:
        raise FormatError(str(exc), field="config.json") from None


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def config_to_hf(config: ModelConfig, dtype: torch.dtype | None) -> dict[str, Any]:
    """A ``config.json`` dict that transformers' LlamaConfig reads back to the same shape."""
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "vocab_size": config.vocab_size,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if config.use_scaled_rope:
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": config.rope_scaling_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_old_context_len,
        }
    if dtype in _DTYPE_NAMES:
        cfg["torch_dtype"] = _DTYPE_NAMES[dtype]
    return cfg


# ---- loading ---------------------------------------------------------------------------------

def _plain_file_name(name: object, index: Path) -> str:
    """A weight_map value must name a file in the directory itself: no separators, no '..', not absolute."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise FormatError(f"file name {name!r} is not a plain file name in the model directory",
                          path=str(index), field="weight_map")
    return name


def header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as meta-device tensors (shape and dtype): only the header is read."""
    return {name: torch.empty(e.shape, dtype=e.dtype, device="meta") for name, e in read_header(path).tensors.items()}


def _read_weight_file(read: Callable[[Path], dict[str, torch.Tensor]], path: Path) -> dict[str, torch.Tensor]:
    try:
        return read(path)
    except FormatError as exc:  # say which of the weight files is bad (its name, never its directory)
        raise FormatError(f"bad safetensors file ({exc})", path=str(path), field=path.name) from None


def _read_hf_tensors(directory: Path, read: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """HF-named tensors from ``model.safetensors`` or the shards listed in its index."""
    if (directory / SINGLE_FILE).is_file():
        return _read_weight_file(read, directory / SINGLE_FILE)
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise FormatError(f"no {SINGLE_FILE} and no {INDEX_FILE}", path=str(directory))
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError("must be a non-empty object", path=str(index_path), field="weight_map")
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(_plain_file_name(file_name, index_path), []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file_name, names in by_file.items():
        path = directory / file_name
        if not path.is_file():
            raise FormatError(f"listed in the index but missing: {file_name}", path=str(index_path), field=names[0])
        found = _read_weight_file(read, path)
        for name in names:
            if name not in found:
                raise FormatError(f"listed in the index but not in {file_name}", path=str(path), field=name)
            tensors[name] = found[name]
    return tensors


def _to_meta(config: ModelConfig, hf_tensors: Mapping[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for key, tensor in hf_tensors.items():
        try:
            meta_key = hf_to_meta_key(key)
        except FormatError as exc:
            exc.path = str(directory)
            raise
        if meta_key is not None:
            state_dict[meta_key] = tensor
    drop_tied_output(config, state_dict, directory)
    # Shapes are right (and the depth is one the files hold) before the q/k views below.
    check_state_dict(config, state_dict, directory, layers_field="num_hidden_layers")
    for i in range(config.n_layers):
        # HF half-split RoPE rows -> Meta interleaved pairs; (n_heads*head_dim, dim) either way.
        wq, wk = f"layers.{i}.attention.wq.weight", f"layers.{i}.attention.wk.weight"
        state_dict[wq] = unpermute_qk(state_dict[wq], config.n_heads)
        state_dict[wk] = unpermute_qk(state_dict[wk], config.kv_heads)
    return state_dict


def load_hf(directory: str | Path, dtype: torch.dtype | None = None, *, weights: bool = True) -> Checkpoint:
    """Read an HF Llama directory into Meta names and layout; ``dtype=None`` keeps the stored dtype.

    ``weights=False`` checks everything a load checks from the safetensors headers alone and returns
    meta-device tensors (shapes and dtypes).
    """
    directory = Path(directory)
    config_path, hf_config = read_config_file(directory, "config.json")
    try:
        config = config_from_hf(hf_config)
    except FormatError as exc:
        exc.path = str(config_path)
        raise
    state_dict = _to_meta(config, _read_hf_tensors(directory, read_safetensors if weights else header_tensors),
                          directory)
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    metadata: dict[str, Any] = {"config": hf_config}
    if (directory / "tokenizer_config.json").is_file():
        metadata["tokenizer_config"] = read_json_object(directory / "tokenizer_config.json")
    if (directory / "tokenizer.json").is_file():
        metadata["tokenizer_json"] = directory / "tokenizer.json"
    if (directory / "generation_config.json").is_file():
        metadata["generation_config"] = read_json_object(directory / "generation_config.json")
    return Checkpoint(config=config, state_dict=state_dict, format="hf", path=directory, metadata=metadata)


# ---- export ----------------------------------------------------------------------------------

def _hf_tensors(config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = dict(state_dict)
    drop_tied_output(config, state, None)
    check_state_dict(config, state, None)
    out = {}
    for key, tensor in state.items():
        if key.endswith("attention.wq.weight"):
            tensor = permute_qk(tensor, config.n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = permute_qk(tensor, config.kv_heads)
        out[meta_to_hf_key(key)] = tensor if dtype is None else tensor.to(dtype)
    return out


def _plan_shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """Greedy packing in key order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def export_hf(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], directory: str | Path, *,
              dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
              tokenizer_files: Iterable[str | Path] = (), extra_config: Mapping[str, Any] | None = None) -> None:
    """Write a directory ``LlamaForCausalLM.from_pretrained`` loads: config.json, weights, tokenizer files.

    ``extra_config`` adds keys to config.json (``bos_token_id``, ``eos_token_id`` ...). Weight files an
    earlier export left in the directory are replaced, so the directory never mixes two exports.
    """
    directory = Path(directory)
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise ConfigError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    sources = [Path(source) for source in tokenizer_files]
    for source in sources:
        if not source.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {source}")
    tensors = _hf_tensors(config, state_dict, dtype)
    directory.mkdir(parents=True, exist_ok=True)
    plan = _plan_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(plan) == 1:
        write_safetensors(tensors, directory / SINGLE_FILE, metadata)
        written = {SINGLE_FILE}
    else:
        names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
        for file_name, keys in zip(names, plan):
            write_safetensors({k: tensors[k] for k in keys}, directory / file_name, metadata)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: file_name for file_name, keys in zip(names, plan) for k in keys}}
        text = json.dumps(index, indent=2) + "\n"
        write_atomic(directory / INDEX_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        written = set(names) | {INDEX_FILE}
    _remove_stale_weights(directory, written)
    cfg = config_to_hf(config, dtype or next(iter(tensors.values())).dtype) | dict(extra_config or {})
    text = json.dumps(cfg, indent=2) + "\n"
    write_atomic(directory / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    for source in sources:
        write_atomic(directory / source.name, lambda tmp, source=source: shutil.copyfile(source, tmp))


def _remove_stale_weights(directory: Path, written: set[str]) -> None:
    for path in directory.iterdir():
        is_weights = path.name in (SINGLE_FILE, INDEX_FILE) or SHARD_FILE.fullmatch(path.name)
        if is_weights and path.name not in written:
            path.unlink()
