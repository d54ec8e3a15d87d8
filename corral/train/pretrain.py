"""Pretraining: next-token loss over token windows, one objective of the shared loop (corral.train.loop).

Order of one run:
 1. ``setup``: processes and mesh (torchrun) or a lone process, shards and loaders, a fresh seeded model,
    its parallel transforms (pipeline stage -> TP -> AC -> compile -> FSDP), the optimizer;
 2. ``train_loop`` with the token loader as batch source and ``next_token_objective`` as loss_fn: it resumes,
    steps, logs, validates (``evaluate``), checkpoints, and guards against NaN/spikes and hangs.

Launch a cluster run with ``torchrun --nproc_per_node=N -m corral.train.pretrain CONFIG [overrides]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral.train.config import PretrainConfig, load_config
from corral.train.run import Run


@dataclass
class PretrainResult:
    final_val_loss: float | None
    """Validation loss after the last step (None without validation data)."""
    final_train_loss: float | None
    tokens_seen: int
    """Training tokens consumed over all data-parallel ranks, including steps before a resume."""
    n_params: int
    steps: int
    metrics_path: Path
    checkpoint: Path | None
    seconds: float


def next_token_objective(run: Run):
    """loss_fn(model, (inputs, targets)) for the loop: the run's next-token loss, or a pipeline step."""
    import torch

    from corral.train.pipeline import pipeline_step

    def loss_fn(model, batch):
        inputs, targets = (t.to(run.device) for t in batch)  # (B, T) each
        if run.pipe is not None:
            with torch.autocast(run.device.type, enabled=False):  # stages manage their own dtypes
                loss = pipeline_step(run.pipe, inputs, targets)  # forward and backward through every stage
        else:
            loss = run.loss_fn(inputs, targets)  # mean over B*T; float32
        return loss, {"tokens": inputs.numel()}

    return loss_fn


def evaluate(run: Run) -> float | None:
    """Mean loss over the first ``val_batches`` validation batches (the same ones every time)."""
    import torch

    from corral.train.loop import autocast, mean_over_world
    from corral.train.pipeline import pipeline_step

    if run.val_loader is None:
        return None
    run.model.eval()
    total = torch.zeros((), device=run.device)
    n = run.config.train.val_batches
    with torch.no_grad():
        for i in range(n):
            cursor = (i * run.val_loader.global_batch) % max(1, run.val_loader.batches_per_epoch
                                                               * run.val_loader.global_batch)
            inputs, targets = run.val_loader.batch_at(0, cursor)
            inputs, targets = inputs.to(run.device), targets.to(run.device)
            if run.pipe is not None:
                total += pipeline_step(run.pipe, inputs, targets, train=False)
            else:
                with autocast(run):
                    total += run.loss_fn(inputs, targets).float()
    return float(mean_over_world(total / n, run))


def run_pretrain(config: PretrainConfig, *, on_evaluate: Callable[[Run], None] | None = None) -> PretrainResult:
    """Train as the config says (resuming if asked) and return the final numbers.

    on_evaluate(run) runs after each validation (benchmark tasks: corral.eval wires it, train cannot import eval).
    """
    from corral.train.loop import train_loop
    from corral.train.setup import setup

    started = time.perf_counter()
    run = setup(config)

    def validate() -> float | None:
        val = evaluate(run)
        if on_evaluate is not None:
            on_evaluate(run)
        return val

    result = train_loop(run, run.loader, next_token_objective(run), evaluate=validate, name="pretrain")
    state = result.state
    return PretrainResult(final_val_loss=state.last_val, final_train_loss=state.last_loss,
                          tokens_seen=state.tokens_seen, n_params=run.n_params, steps=state.step,
                          metrics_path=result.metrics_path, checkpoint=result.checkpoint,
                          seconds=time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    """``python -m corral.train.pretrain CONFIG [--section.key=value ...] [--resume auto|PATH]`` (torchrun too)."""
    parser = argparse.ArgumentParser(prog="corral.train.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("config", help='a TOML file such as configs/pretrain/debug.toml; "-" for the defaults')
    parser.add_argument("--resume", default=None, help='"auto" (latest committed checkpoint) or a checkpoint path')
    args, overrides = parser.parse_known_args(argv)
    if args.resume is not None:
        overrides.append(f"--checkpoint.resume={json.dumps(args.resume)}")
    config = load_config(None if args.config == "-" else args.config, overrides)
    result = run_pretrain(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": result.steps, "final_train_loss": result.final_train_loss,
                          "final_val_loss": result.final_val_loss, "tokens_seen": result.tokens_seen,
                          "n_params": result.n_params, "seconds": round(result.seconds, 2),
                          "checkpoint": str(result.checkpoint) if result.checkpoint else None}))
    _shutdown()
    return 0


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
