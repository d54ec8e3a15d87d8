"""The pretraining loop: ``run_pretrain(config)`` is a loop function plus a small state dataclass.

Order of one run (each numbered step is a function below):
 1. set up: process group and mesh (torchrun) or a lone process, seeds, shards, loaders;
 2. build the plain Transformer, then transform it: pipeline stage -> TP -> AC -> compile -> FSDP
    (corral.train.parallel, in torchtitan's order);
 3. resume from the latest committed checkpoint if asked;
 4. per step: ``train_step`` (forward, backward, clip, guarded update), metrics, validation, checkpoint;
    a watchdog thread ends a hung process, a LossGuard skips or rolls back NaN/spike steps.

Launch a cluster run with ``torchrun --nproc_per_node=N -m corral.train.pretrain CONFIG [overrides]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.config import to_dict
from corral.train.config import PretrainConfig, load_config


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


@dataclass
class LoopState:
    """What the loop carries from step to step (and saves in each checkpoint's meta.json)."""

    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    rollbacks: int = 0
    last_loss: float | None = None
    last_val: float | None = None
    guard_history: list[float] = field(default_factory=list)


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    verdict: str | None
    """None when the update was applied, else why it was not ("nan" or "spike")."""


@dataclass
class Run:
    """The objects one run trains with, built once by ``setup``."""

    config: PretrainConfig
    model: Any  # the module being optimized: the whole Transformer, or this rank's pipeline stage
    optimizer: Any
    scheduler: Any
    loader: Any
    val_loader: Any
    device: Any
    rank: int = 0
    world: int = 1
    dp_size: int = 1
    pipe: Any = None
    pp_mesh: Any = None
    loss_fn: Any = None
    """loss(inputs, targets) -> mean next-token loss, built by setup (corral.train.loss); unused by a pipeline."""
    n_params: int = 0
    flops_per_token: float = 0.0
    peak_flops: float | None = None


def _autocast(run: Run):
    import torch

    if run.config.train.dtype == "bfloat16":
        return torch.autocast(run.device.type, dtype=torch.bfloat16)
    return nullcontext()


def _mean_over_world(value, run: Run):
    """All ranks agree on the loss they judge (TP and PP ranks hold equal copies; dp ranks differ)."""
    import torch.distributed as dist

    if run.world > 1:
        dist.all_reduce(value)
        value = value / run.world
    return value


def train_step(run: Run, batches: list, guard, inject_nan: bool = False) -> StepStats:
    """One optimizer step over ``grad_accum`` micro-batches; the update is skipped if the guard objects."""
    import torch

    from corral.train.parallel import clip_grad_norm_
    from corral.train.pipeline import pipeline_step

    run.model.train()
    total = torch.zeros((), device=run.device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(run.device), targets.to(run.device)  # (B, T) each
        if run.pipe is not None:
            loss = pipeline_step(run.pipe, inputs, targets)  # forward and backward through every stage
        else:
            with _autocast(run):
                loss = run.loss_fn(inputs, targets)  # mean over B*T; float32
            if inject_nan:
                loss = loss * float("nan")
            (loss / len(batches)).backward()
        total += loss.detach().float()
    if inject_nan:
        total = total * float("nan")
    loss = _mean_over_world(total / len(batches), run)
    clip = run.config.optim.grad_clip or math.inf
    grad_norm = clip_grad_norm_(run.model.parameters(), clip, run.pp_mesh)
    loss, grad_norm = torch.stack([loss, grad_norm.to(loss.device)]).tolist()  # the step's one host sync
    verdict = guard.verdict(loss)
    if verdict is None:
        run.optimizer.step()
        guard.accept(loss)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return StepStats(loss=loss, grad_norm=grad_norm, verdict=verdict)


def evaluate(run: Run) -> float | None:
    """Mean loss over the first ``val_batches`` validation batches (the same ones every time)."""
    import torch

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
                with _autocast(run):
                    total += run.loss_fn(inputs, targets).float()
    return float(_mean_over_world(total / n, run))


class MetricsLog:
    """One JSON object per line in metrics.jsonl, mirrored to TensorBoard scalars; rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(path: str | Path) -> dict[int, dict[str, Any]]:
    """The last training record of each step (a resumed or rolled-back run writes some steps twice)."""
    records: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record and "event" not in record:
            records[record["step"]] = record
    return records


def _save(run: Run, state: LoopState, faults, log: MetricsLog) -> Path | None:
    """Checkpoint now; a failed save (disk full ...) is recorded and training goes on."""
    from corral.train.state import save_checkpoint

    extra = {k: v for k, v in dataclasses.asdict(state).items() if k != "step"}
    root = Path(run.config.out_dir) / "checkpoints"
    try:
        return save_checkpoint(root, state.step, run.model, run.optimizer, run.scheduler, run.loader, extra,
                               keep=run.config.checkpoint.keep, before_commit=faults.before_commit(state.step))
    except OSError as exc:
        log.write({"step": state.step, "event": "checkpoint_failed", "error": f"{type(exc).__name__}: {exc}"})
        print(f"corral: checkpoint at step {state.step} failed ({exc}); the last good one is kept", file=sys.stderr)
        return None


def _restore(run: Run, path: Path, state: LoopState, *, with_loader: bool) -> None:
    """Load a checkpoint into the run; a rollback keeps the loader moving so the bad data is not replayed."""
    from corral.train.state import load_checkpoint

    meta = load_checkpoint(path, run.model, run.optimizer, run.scheduler, run.loader if with_loader else None,
                           restore_rng=with_loader)
    extra = meta["extra"]
    rollbacks = state.rollbacks
    for key in ("tokens_seen", "skipped", "rollbacks", "last_loss", "last_val", "guard_history"):
        if key in extra:
            setattr(state, key, extra[key])
    state.step = meta["step"]
    if not with_loader:
        state.rollbacks = rollbacks  # the count of rollbacks must survive the rollback itself
    if with_loader and not meta["rng_restored"]:
        _seed(run.config.train.seed + 1000 * state.step + run.rank)  # another world size: per-rank RNG reseeded


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _handle_bad_step(run: Run, state: LoopState, stats: StepStats, log: MetricsLog) -> None:
    """Record a skipped update; roll back to the last checkpoint when the policy says so."""
    from corral.train.failure import TrainingDiverged
    from corral.train.state import latest_checkpoint

    policy = run.config.failure.nan_policy
    record = {"step": state.step, "event": f"{stats.verdict}_{policy}", "loss": stats.loss}
    if policy == "raise":
        log.write(record)
        raise TrainingDiverged(f"step {state.step}: loss {stats.loss} ({stats.verdict}); failure.nan_policy=raise")
    state.skipped += 1
    if policy == "rollback":
        path = latest_checkpoint(Path(run.config.out_dir) / "checkpoints")
        if path is None:
            record["event"] = f"{stats.verdict}_skip"
            record["note"] = "no checkpoint to roll back to; update skipped"
        else:
            state.rollbacks += 1
            if state.rollbacks > run.config.failure.max_rollbacks:
                log.write(record)
                raise TrainingDiverged(f"more than failure.max_rollbacks={run.config.failure.max_rollbacks} "
                                       "rollbacks; the run keeps diverging")
            _restore(run, path, state, with_loader=False)
            record["rolled_back_to"] = state.step
    log.write(record)


def _log_step(run: Run, state: LoopState, stats: StepStats, seconds: float, log: MetricsLog) -> None:
    tokens = run.config.data.batch_size * run.config.data.seq_len * run.config.optim.grad_accum * run.dp_size
    tps = tokens / max(seconds, 1e-9)
    mfu = run.flops_per_token * tps / (run.peak_flops * run.world) if run.peak_flops else None
    if state.step % run.config.train.log_every == 0 or stats.verdict is not None:
        log.write({"step": state.step, "loss": stats.loss, "lr": run.scheduler.get_last_lr()[0],
                   "grad_norm": stats.grad_norm, "tokens_per_s": tps, "mfu": mfu,
                   "tokens_seen": state.tokens_seen, "step_s": seconds, "applied": stats.verdict is None})


def run_pretrain(config: PretrainConfig) -> PretrainResult:
    """Train as the config says (resuming if asked) and return the final numbers."""
    from tqdm import tqdm

    from corral.train.failure import FaultInjector, LossGuard, Watchdog
    from corral.train.setup import resume_path, setup

    started = time.perf_counter()
    run = setup(config)
    run_dir = Path(config.out_dir)
    log = MetricsLog(run_dir, enabled=run.rank == 0, tensorboard=config.train.tensorboard)
    state = LoopState()
    resume = resume_path(config)
    if resume is not None:
        _restore(run, resume, state, with_loader=True)
        log.write({"step": state.step, "event": "resumed", "checkpoint": str(resume)})
    elif run.rank == 0:
        (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    guard = LossGuard(config.failure, state.guard_history)
    faults = FaultInjector(config.fault, run_dir, run.rank)
    watchdog = Watchdog(config.failure.watchdog_timeout_s, run_dir / f"watchdog_rank{run.rank}.txt").start()
    checkpoint = None
    bar = tqdm(total=config.train.steps, initial=state.step, disable=not (config.train.progress and run.rank == 0),
               desc="pretrain", dynamic_ncols=True)
    try:
        while state.step < config.train.steps:
            watchdog.beat(f"step {state.step + 1} start")
            t0 = time.perf_counter()
            state.step += 1
            faults.before_step(state.step)
            batches = [run.loader.next_batch() for _ in range(config.optim.grad_accum)]
            stats = train_step(run, batches, guard, inject_nan=faults.nan_now(state.step))
            state.tokens_seen += sum(x.numel() for x, _ in batches) * run.dp_size
            state.last_loss = stats.loss
            _log_step(run, state, stats, time.perf_counter() - t0, log)
            if stats.verdict is not None:
                _handle_bad_step(run, state, stats, log)
            state.guard_history = guard.history()
            bar.n = state.step
            bar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(0)
            watchdog.beat(f"step {state.step} end")
            last = state.step == config.train.steps
            if last or (config.train.val_every and state.step % config.train.val_every == 0):
                state.last_val = evaluate(run)
                if state.last_val is not None:
                    log.write({"step": state.step, "event": "val", "val_loss": state.last_val})
            if last or (config.checkpoint.every and state.step % config.checkpoint.every == 0):
                checkpoint = _save(run, state, faults, log) or checkpoint
    finally:
        watchdog.stop()
        bar.close()
        log.close()
    return PretrainResult(final_val_loss=state.last_val, final_train_loss=state.last_loss,
                          tokens_seen=state.tokens_seen, n_params=run.n_params, steps=state.step,
                          metrics_path=log.path, checkpoint=checkpoint, seconds=time.perf_counter() - started)


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
