"""AdamW with linear warmup and cosine decay (the Llama 3 recipe, arXiv 2407.21783 section 3.4.1).

Weight decay applies to matrices only: RMSNorm gains stay undecayed, as in most LLM recipes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from corral.train.config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, decaying only those with two or more dims.

    fused (plain tensors only, one process): one kernel updates every parameter (torch's fused AdamW, CPU
    and CUDA) instead of a dozen elementwise ops per parameter; deterministic, though not bitwise equal
    to the per-tensor loop.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # foreach=False otherwise: one kernel per tensor is bitwise reproducible and works with DTensor shards.
    kind = {"fused": True} if fused else {"foreach": False}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, **kind)


def lr_factor(step: int, config: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based): linear warmup, cosine to min."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, total_steps))

