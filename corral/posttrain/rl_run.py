"""Setting up and running the RL objectives (PPO, rejection sampling) on a chat model, in named phases.

 1. ``load_chat_policy``: any checkpoint corral.load reads (the embedded SmolLM2 GGUF is dequantized to
    float32, the only form that trains) with its tokenizer, chat format and stop tokens;
 2. ``apply_train_last_layers_``: what trains (the last blocks and the final norm) when LoRA is not used;
 3. ``read_prompts`` / ``render_prompts``: prompts from JSONL, rendered with the model's own chat format;
 4. ``run_ppo``: the actor-critic, its rollout source and optimizer, reward and KL on held prompts measured
    before and after the one training loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corral.errors import ConfigError, FormatError


@dataclass
class ChatPolicy:
    model: nn.Module
    """A float32 Transformer."""
    tokenizer: Any
    chat_format: Any
    stop_ids: frozenset[int]


def load_chat_policy(path: str | Path | None, device: torch.device) -> ChatPolicy:
    """A checkpoint as a trainable float32 model (None: the embedded SmolLM2-135M-Instruct, dequantized)."""
    from corral.checkpoint.load import load_checkpoint
    from corral.llm import LLM, build_model, chat_format_for, default_model_path, load_tokenizer_for

    ckpt = load_checkpoint(Path(path) if path else default_model_path(), dtype=torch.float32)
    model = build_model(ckpt.config, {k: v.to(device) for k, v in ckpt.state_dict.items()})
    tokenizer, add_bos = load_tokenizer_for(ckpt)
    chat_format = chat_format_for(ckpt, tokenizer)
    if chat_format is None:
        raise ConfigError(f"{ckpt.path}: the model carries no chat template; RL needs chat-formatted prompts")
    stop_ids = LLM(model, tokenizer, chat_format, add_bos=add_bos).stop_ids  # turn ends + end of text
    return ChatPolicy(model.train(), tokenizer, chat_format, stop_ids)


def apply_train_last_layers_(model: nn.Module, n_layers: int) -> nn.Module:
    """Freeze everything but the last n_layers blocks and the final norm (the embedding, tied or not, stays)."""
    if n_layers <= 0:
        raise ConfigError(f"the number of trained layers must be positive; got {n_layers}")
    model.requires_grad_(False)
    for block in list(model.blocks())[-n_layers:]:
        block.requires_grad_(True)
    model.norm.requires_grad_(True)
    return model


def read_prompts(path: str | Path) -> tuple[list[str], list[str]]:
    """(train, held) prompts of a JSONL file of {"prompt": text, "split": "train" | "held"} rows."""
    train, held = [], []
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"prompt file not found: {path}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path}:{number}: not JSON ({exc.msg})", path=str(path)) from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise FormatError(f"{path}:{number}: needs a non-empty string \"prompt\"", path=str(path), field="prompt")
        split = row.get("split", "train")
        if split not in ("train", "held"):
            raise FormatError(f"{path}:{number}: split must be \"train\" or \"held\"; got {split!r}",
                              path=str(path), field="split")
        (held if split == "held" else train).append(prompt)
    if not train:
        raise ConfigError(f"{path}: no training prompts (rows with split \"train\" or no split)")
    return train, held


def render_prompts(chat_format, texts: list[str]) -> list[list[int]]:
    """Each text as one user turn, ending with the open assistant header the reply continues."""
    return [chat_format.encode_dialog([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]


def run_ppo(run, policy: ChatPolicy, train: list[str], held: list[str], scorer, config) -> dict[str, Any]:
    """PPO through train_loop; run.model is the ActorCritic over policy.model. Returns before/after figures."""
    from corral.posttrain.ppo import PPOParams, ppo_loss
    from corral.posttrain.rollout import RolloutParams, build_rollout_source, evaluate_policy
    from corral.train.loop import autocast, train_loop

    c = config
    params = RolloutParams(prompts_per_rollout=c.prompts_per_rollout, samples_per_prompt=c.samples_per_prompt,
                           max_new_tokens=c.max_new_tokens, kl_coef=c.kl_coef, gamma=c.gamma, lam=c.lam,
                           epochs=c.epochs, minibatches=c.minibatches, missing_eos_penalty=c.missing_eos_penalty,
                           seed=run.config.train.seed)
    loss_params = PPOParams(clip=c.clip, value_clip=c.value_clip, vf_coef=c.vf_coef)
    fmt = policy.chat_format
    source = build_rollout_source(run.model, policy.tokenizer, policy.stop_ids, render_prompts(fmt, train), train,
                                  scorer, params, precision=lambda: autocast(run))
    held_ids = render_prompts(fmt, held or train)
    before = evaluate_policy(source, held_ids, held or train, samples=c.eval_samples)
    result = train_loop(run, source, lambda model, batch: ppo_loss(model, batch, loss_params), name="ppo")
    after = evaluate_policy(source, held_ids, held or train, samples=c.eval_samples)
    return {"before": before, "after": after, "result": result, "source": source}
