"""LoRA adapters in Hugging Face PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

The tensor names are the HF key map of corral.checkpoint.hf under PEFT's prefix, with the base weight's
``.weight`` replaced by the adapter's matrices:

    layers.{i}.attention.wq.lora_a.weight <-> base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
    output.lora_b.weight                  <-> base_model.model.lm_head.lora_B.weight

One layout transform, the q/k RoPE permute HF applies to wq/wk rows (corral.checkpoint.base.permute_qk):
W_hf = P W_meta for a row permutation P, so delta W_hf = P (B_meta A) = (P B_meta) A. Only lora_B's rows
are permuted; A (r, in) acts on the input side, which the permute leaves alone.

The scale is lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora`` (Kalajdzievski 2023,
arXiv 2312.03732), which is stored as an equivalent alpha (alpha * sqrt(r)) since Corral's scale is alpha / r.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from corral.checkpoint.adapter import PEFT_CONFIG, LoraAdapter, check_adapter_shapes
from corral.checkpoint.atomic import write_atomic
from corral.checkpoint.base import permute_qk, read_json_object, unpermute_qk
from corral.checkpoint.hf import hf_to_meta_key, meta_to_hf_key
from corral.checkpoint.safetensors_io import read_safetensors, write_safetensors
from corral.errors import FormatError
from corral.model.config import ModelConfig

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
_REFUSED_OPTIONS = {  # adapter_config.json settings whose adapters are not plain LoRA on Linear layers
    "use_dora": "DoRA adapters (use_dora) are not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D models) are not Llama adapters",
    "modules_to_save": "adapters that also save whole modules (modules_to_save) are not supported",
}


def peft_key(name: str) -> str:
    """PEFT tensor name of a Corral adapter tensor (``layers.0.attention.wq.lora_a.weight``)."""
    module, _, which = name.rpartition(".lora_")
    hf_module = meta_to_hf_key(f"{module}.weight").removesuffix(".weight")
    return f"{PREFIX}{hf_module}.lora_{which[0].upper()}.weight"


def corral_key(name: str) -> str:
    """Corral name of a PEFT adapter tensor; FormatError for anything but lora_A/lora_B of a Llama linear."""
    match = _PEFT_KEY.fullmatch(name)
    module = match and hf_to_meta_key(f"{match.group(1)}.weight")
    if not module or module.endswith("norm.weight") or module == "tok_embeddings.weight":
        raise FormatError("not a LoRA tensor of a Llama linear layer", field=name)
    return f"{module.removesuffix('.weight')}.lora_{match.group(2).lower()}.weight"


def _read_config(directory: Path) -> dict:
    cfg = read_json_object(directory / PEFT_CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise FormatError(f"peft_type {cfg.get('peft_type')!r} is not LORA", path=str(directory), field="peft_type")
    for key, why in _REFUSED_OPTIONS.items():
        if cfg.get(key):
            raise FormatError(why, path=str(directory), field=key)
    if cfg.get("bias", "none") != "none":
        raise FormatError("adapters with trained biases are not supported", path=str(directory), field="bias")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise FormatError(f"must be a number >= 0, got {alpha!r}", path=str(directory), field="lora_alpha")
    for key in ("alpha_pattern", "rank_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise FormatError("must be an object", path=str(directory), field=key)
    return cfg


def _alpha(cfg: dict, hf_module: str, rank: int) -> float:
    """PEFT's alpha for one module: the first alpha_pattern key matching the end of its name, else lora_alpha."""
    alpha = float(cfg.get("lora_alpha", 8))
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", hf_module):
            alpha = float(value)
            break
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha


def load_peft_adapter(directory: str | Path, config: ModelConfig) -> LoraAdapter:
    """Read a PEFT LoRA directory for a base of `config`; tensors come back Corral-named in Meta layout."""
    directory = Path(directory)
    cfg = _read_config(directory)
    if not (directory / WEIGHTS).is_file():
        raise FormatError(f"no {WEIGHTS} (a .bin adapter must be converted to safetensors first)",
                          path=str(directory))
    raw = read_safetensors(directory / WEIGHTS)
    if not raw:
        raise FormatError("the adapter holds no tensors", path=str(directory / WEIGHTS))
    tensors = {corral_key(name): t for name, t in raw.items()}
    check_adapter_shapes(tensors, config, {corral_key(n): n for n in raw}, directory / WEIGHTS)
    alphas: dict[str, float] = {}
    for name, t in tensors.items():
        module = name.rpartition(".lora_")[0]
        if name.endswith("attention.wq.lora_b.weight"):
            tensors[name] = unpermute_qk(t, config.n_heads)
        elif name.endswith("attention.wk.lora_b.weight"):
            tensors[name] = unpermute_qk(t, config.kv_heads)
        if name.endswith("lora_a.weight"):
            hf_module = peft_key(name).removeprefix(PREFIX).removesuffix(".lora_A.weight")
            alphas[module] = _alpha(cfg, hf_module, t.shape[0])
    return LoraAdapter(tensors=tensors, alphas=alphas, format="peft", path=directory, metadata=cfg)


def save_peft_adapter(adapter: LoraAdapter, config: ModelConfig, directory: str | Path, *,
                      base_model: str | None = None) -> Path:
    """Write `adapter` (for a base of `config`) as a PEFT directory that ``PeftModel.from_pretrained`` loads.

    ``save_peft_adapter(adapter_of(model), model.config, path)`` saves what apply_lora trained.
    """
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in adapter.tensors.items():
        if name.endswith("attention.wq.lora_b.weight"):
            t = permute_qk(t, config.n_heads)
        elif name.endswith("attention.wk.lora_b.weight"):
            t = permute_qk(t, config.kv_heads)
        tensors[peft_key(name)] = t.detach().contiguous()
    ranks = {name.removesuffix(".lora_a.weight"): t.shape[0] for name, t in adapter.tensors.items()
             if name.endswith(".lora_a.weight")}
    text = json.dumps(_adapter_config(ranks, adapter.alphas, base_model, config.n_layers), indent=2) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, directory / WEIGHTS, {"format": "pt"})
    write_atomic(directory / PEFT_CONFIG, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return directory


def _adapter_config(ranks: dict[str, int], alphas: dict[str, float], base_model: str | None, n_layers: int) -> dict:
    """adapter_config.json: the most common rank and alpha, patterns (escaped full names) for the others.

    target_modules are short names ("q_proj") when every block has them, else full module names, which
    PEFT matches exactly, so it adds no layers the adapter does not hold.
    """
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    hf = {name: meta_to_hf_key(f"{name}.weight").removesuffix(".weight") for name in ranks}
    short = {h.rpartition(".")[2] for h in hf.values()}
    every_block = all(sum(h.endswith(f".{s}") and h.startswith("model.layers.") for h in hf.values()) == n_layers
                      for s in short - {"lm_head"})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(short if every_block else hf.values()),
        "rank_pattern": {re.escape(hf[n]): r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(hf[n]): a for n, a in alphas.items() if a != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
