"""Supervised fine-tuning: next-token cross-entropy on the assistant tokens of rendered chats.

The loss is the pretraining loss (corral.train.loss.linear_cross_entropy, the output projection fused in
row chunks) with every prompt, system and padding position set to IGNORE_INDEX, as in InstructGPT's SFT
stage (Ouyang et al. 2022, arXiv 2203.02155) and Llama 3's (arXiv 2407.21783 section 4.1.3).
Packed rows run the trunk with a block-diagonal causal mask and per-sample positions (``hidden_states``).
"""

from __future__ import annotations

import torch
from torch import nn

from corral.model.rope import rope_angles, rope_frequencies
from corral.posttrain.data import IGNORE_INDEX, TokenBatch, packed_mask
from corral.train.loss import linear_cross_entropy, linear_logprobs, output_weight


def hidden_states(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Final-norm hidden states (B, T, dim) of a padded batch, or of a packed one with attention per sample."""
    if batch.segments is None:
        return model.hidden(batch.tokens)  # right padding: plain causal attention never sees it from real tokens
    # (B, T, head_dim/2) each: the angles of each token's position inside its own sample
    rope = rope_angles(rope_frequencies(model.config, batch.tokens.device), batch.positions)
    return model.hidden(batch.tokens, mask=packed_mask(batch.segments), rope=rope)


def token_logprobs(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """log p(target) per position (B, T) float32, 0 where the target is IGNORE_INDEX (padded or packed)."""
    return linear_logprobs(hidden_states(model, batch), output_weight(model), batch.targets)


def sft_loss(model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean -log p over the batch's assistant tokens; a loss_fn for corral.train.loop.train_loop."""
    h = hidden_states(model, batch)  # (B, T, dim)
    loss = linear_cross_entropy(h, output_weight(model), batch.targets)
    trained = int((batch.targets != IGNORE_INDEX).sum())
    return loss, {"tokens": batch.n_tokens, "trained_tokens": trained}


def sft_objective(device: torch.device):
    """loss_fn(model, batch) that moves each batch to the run's device first."""

    def loss_fn(model: nn.Module, batch: TokenBatch):
        return sft_loss(model, batch.to(device))

    return loss_fn


def sft_eval_loss(model: nn.Module, batches: list[TokenBatch], device: torch.device) -> float:
    """Token-weighted mean loss over held-out batches (the model in eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(device)
            n = int((batch.targets != IGNORE_INDEX).sum())
            total += float(sft_loss(model, batch)[0]) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)
