"""Where a fine-tuned model goes: files `corral run`, `corral.load` and the server open, and the store.

The format follows the base: a GGUF base gives a GGUF (the base's tokenizer and chat template carried
over as metadata), an HF directory an HF directory (its tokenizer files copied), a Meta directory or a
`corral pretrain` run an HF directory with Meta's Llama 3 tokenizer. A reward model is its trunk in that
form plus ``reward_head.safetensors``. ``output.store_name`` also creates the result in the local store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corral.posttrain.config import FinetuneConfig

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded float32 CPU weights of a plain or FSDP/TP module (every rank must call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().float().cpu() for k, v in state.items()}


def _trunk_state(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Meta-named Transformer weights: a reward model's trunk.* (PPO's policy.*) prefix dropped, the head left out."""
    for prefix in ("trunk.", "policy."):
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if config.tie_embeddings:
        state.pop("output.weight", None)
    return state


def _chat_template(config: FinetuneConfig) -> str | None:
    path = config.model.chat_template
    return Path(path).read_text(encoding="utf-8") if path else None


def write_model(base, config: FinetuneConfig, state: dict[str, torch.Tensor], out: Path) -> Path:
    """The weights in the base's format (see the module docstring); returns what `corral.load` opens."""
    from corral.checkpoint.export import export_checkpoint, export_with_llama3_tokenizer

    model_config = base.model.config
    state = _trunk_state(state, model_config)
    out.mkdir(parents=True, exist_ok=True)
    template = _chat_template(config)
    if base.kind == "gguf":
        metadata: dict[str, Any] = dict(base.metadata)
        if template is not None:
            metadata["tokenizer.chat_template"] = template
        return export_checkpoint(model_config, state, out / "model.gguf", "gguf", metadata=metadata)
    if base.kind == "hf":
        from corral.checkpoint.hf import export_hf

        files = [base.path / name for name in HF_TOKENIZER_FILES if (base.path / name).is_file()]
        export_hf(model_config, state, out, tokenizer_files=files)
        if template is not None:
            _set_hf_template(out, template)
        return out
    export_with_llama3_tokenizer(model_config, state, out, "hf")
    return out


def _set_hf_template(directory: Path, template: str) -> None:
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_result(run, base, config: FinetuneConfig) -> Path | None:
    """Write the trained model (rank 0) and, if asked, store it; returns the model path (None off rank 0)."""
    if config.lora.enabled:
        return _save_adapter(run, base, config)
    state = full_state_dict(run.model)
    if run.rank != 0:
        return None
    out = Path(config.output.dir or Path(config.out_dir) / "model")
    path = write_model(base, config, state, out)
    if config.objective == "rm":
        from corral.posttrain.reward import save_reward_head

        save_reward_head(run.model, out)
    if config.output.store_name:
        store_model(path, config.output.store_name)
    return path


def _save_adapter(run, base, config: FinetuneConfig) -> Path | None:
    """The adapter alone, in the PEFT layout (corral.checkpoint.peft); stored as ADAPTER over the base if asked."""
    from corral.checkpoint.adapter import adapter_of
    from corral.checkpoint.peft import save_peft_adapter

    if run.rank != 0:
        return None
    out = Path(config.output.dir or Path(config.out_dir) / "adapter")
    policy = getattr(run.model, "policy", run.model)  # PPO's ActorCritic: the policy's adapter
    save_peft_adapter(adapter_of(policy), base.model.config, out, base_model=config.model.source)
    if config.output.store_name:
        store_model(base.path, config.output.store_name, adapter=out)
    return out


def store_model(path: Path, name: str, adapter: Path | None = None) -> None:
    """``corral create NAME`` with ``FROM path`` (and ``ADAPTER adapter``): ``corral run NAME``-able."""
    from corral.store.create import create_model
    from corral.store.modelfile import Modelfile
    from corral.store.store import Store

    adapters = [str(adapter.resolve())] if adapter is not None else []
    create_model(Store(), name, Modelfile(from_=str(path.resolve()), adapters=adapters))
