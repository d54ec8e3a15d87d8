"""The training loop every objective shares: ``train_loop(run, source, loss_fn)``.

An objective is a batch source and a ``loss_fn(model, batch) -> (loss, metrics)``: pretraining's
next-token loss over token windows is one (corral.train.pretrain); DPO, reward models or a toy loss on
reversed sequences are others. Whatever the objective, the loop does, per optimizer step:
 1. ``grad_accum`` batches from the source, each through loss_fn under autocast, then backward;
 2. the global gradient norm clipped, the LossGuard asked (NaN/inf, spikes), the update applied or skipped;
 3. metrics: loss, lr, grad norm, tokens/s and MFU (from ``metrics["tokens"]``), the objective's own metrics;
 4. a bad step skipped, rolled back to the last checkpoint or raised (failure.nan_policy);
 5. evaluation and checkpoints on their schedules; a watchdog thread ends a hung step.
A run resumes from its newest committed checkpoint (checkpoint.resume) with the model, optimizer,
scheduler, RNG and the source's position, so a killed and resumed run equals a straight one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from corral.config import to_dict
from corral.errors import ConfigError
from corral.train.run import Run, seed_everything

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
"""loss_fn(model, batch) -> (scalar loss, metrics). metrics["tokens"] (tokens this batch trained on, on
this rank) feeds tokens/s, MFU and tokens_seen; other entries are averaged over micro-batches and logged.
A loss_fn that runs its own backward (a pipeline schedule) returns a loss that does not require grad."""


class BatchSource(Protocol):
    """Where the loop takes batches from; its position is saved in every checkpoint."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class IterableSource:
    """A BatchSource over ``make_batches()``, a function returning the same batch sequence each call.

    Its position is the count of batches taken; a resumed run calls make_batches again and skips that
    many, so any deterministic iterable resumes exactly.
    """

    def __init__(self, make_batches: Callable[[], Iterable[Any]]):
        self.make_batches = make_batches
        self.taken = 0
        self._it: Iterator[Any] = iter(make_batches())

    def next_batch(self) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            raise ConfigError(f"the batch source ran out after {self.taken} batches; give it more or "
                              "train fewer steps") from None
        self.taken += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._it, self.taken = iter(self.make_batches()), 0
        for _ in range(int(state["taken"])):
            self.next_batch()


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
    tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopResult:
    state: LoopState
    metrics_path: Path
    checkpoint: Path | None
    """The last checkpoint this run committed (None if it wrote none)."""


def autocast(run: Run):
    """bf16 autocast of the forward when train.dtype says so (weights and optimizer stay fp32)."""
    if run.config.train.dtype == "bfloat16":
        return torch.autocast(run.device.type, dtype=torch.bfloat16)
    return nullcontext()


def mean_over_world(value: torch.Tensor, run: Run) -> torch.Tensor:
    """All ranks agree on the loss they judge (TP and PP ranks hold equal copies; dp ranks differ)."""
    import torch.distributed as dist

    if run.world > 1:
        dist.all_reduce(value)
        value = value / run.world
    return value


def train_step(run: Run, batches: list, loss_fn: LossFn, guard, inject_nan: bool = False) -> StepStats:
    """One optimizer step over the micro-batches; the update is skipped if the guard objects."""
    from corral.train.parallel import clip_grad_norm_

    run.model.train()
    total = torch.zeros((), device=run.device)
    sums: dict[str, float] = {}
    for batch in batches:
        with autocast(run):
            loss, metrics = loss_fn(run.model, batch)  # mean over the batch; float32
        if inject_nan:
            loss = loss * float("nan")
        if loss.requires_grad:
            (loss / len(batches)).backward()
        total += loss.detach().float()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0) + value
    if inject_nan:
        total = total * float("nan")
    loss = mean_over_world(total / len(batches), run)
    clip = run.config.optim.grad_clip or math.inf
    grad_norm = clip_grad_norm_(run.model.parameters(), clip, run.pp_mesh)
    loss, grad_norm = torch.stack([loss, grad_norm.to(loss.device)]).tolist()  # the step's one host sync
    verdict = guard.verdict(loss)
    if verdict is None:
        run.optimizer.step()
        guard.accept(loss)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    tokens = int(sums.pop("tokens", 0))
    return StepStats(loss=loss, grad_norm=grad_norm, verdict=verdict, tokens=tokens,
                     metrics={k: v / len(batches) for k, v in sums.items()})


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


def resume_path(config: Any) -> Path | None:
    """The checkpoint to resume from: none, the newest committed one ("auto"), or a named path."""
    from corral.train.state import latest_checkpoint, resolve_checkpoint

    resume = config.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(Path(config.out_dir) / "checkpoints")
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"checkpoint.resume: {path} does not exist")
    return resolve_checkpoint(path)


def _save(run: Run, source: BatchSource, state: LoopState, faults, log: MetricsLog) -> Path | None:
    """Checkpoint now; a failed save (disk full ...) is recorded and training goes on."""
    from corral.train.state import save_checkpoint

    extra = {k: v for k, v in dataclasses.asdict(state).items() if k != "step"}
    root = Path(run.config.out_dir) / "checkpoints"
    try:
        return save_checkpoint(root, state.step, run.model, run.optimizer, run.scheduler, source, extra,
                               keep=run.config.checkpoint.keep, before_commit=faults.before_commit(state.step))
    except OSError as exc:
        log.write({"step": state.step, "event": "checkpoint_failed", "error": f"{type(exc).__name__}: {exc}"})
        print(f"corral: checkpoint at step {state.step} failed ({exc}); the last good one is kept", file=sys.stderr)
        return None


def _restore(run: Run, path: Path, state: LoopState, source: BatchSource | None) -> None:
    """Load a checkpoint into the run; a rollback (no source) keeps the data moving so bad data is not replayed."""
    from corral.train.state import load_checkpoint

    meta = load_checkpoint(path, run.model, run.optimizer, run.scheduler, source, restore_rng=source is not None)
    extra = meta["extra"]
    rollbacks = state.rollbacks
    for key in ("tokens_seen", "skipped", "rollbacks", "last_loss", "last_val", "guard_history"):
        if key in extra:
            setattr(state, key, extra[key])
    state.step = meta["step"]
    if source is None:
        state.rollbacks = rollbacks  # the count of rollbacks must survive the rollback itself
    elif not meta["rng_restored"]:
        seed_everything(run.config.train.seed + 1000 * state.step + run.rank)  # another world size: reseeded


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
            _restore(run, path, state, None)
            record["rolled_back_to"] = state.step
    log.write(record)


def _log_step(run: Run, state: LoopState, stats: StepStats, seconds: float, log: MetricsLog) -> None:
    tps = stats.tokens * run.dp_size / max(seconds, 1e-9)
    mfu = run.flops_per_token * tps / (run.peak_flops * run.world) if run.peak_flops else None
    if state.step % run.config.train.log_every == 0 or stats.verdict is not None:
        log.write({"step": state.step, "loss": stats.loss, "lr": run.scheduler.get_last_lr()[0],
                   "grad_norm": stats.grad_norm, "tokens_per_s": tps, "mfu": mfu,
                   "tokens_seen": state.tokens_seen, "step_s": seconds, "applied": stats.verdict is None,
                   **stats.metrics})


def _start(run: Run, source: BatchSource, log: MetricsLog) -> LoopState:
    """A fresh state, or the one of the checkpoint named by checkpoint.resume (with the source's position)."""
    state = LoopState()
    resume = resume_path(run.config)
    if resume is not None:
        _restore(run, resume, state, source)
        log.write({"step": state.step, "event": "resumed", "checkpoint": str(resume)})
    elif run.rank == 0:
        (Path(run.config.out_dir) / "config.json").write_text(json.dumps(to_dict(run.config), indent=2) + "\n")
    return state


def train_loop(run: Run, source: BatchSource, loss_fn: LossFn, *, evaluate: Callable[[], float | None] | None = None,
               name: str = "train") -> LoopResult:
    """Train ``run.model`` on ``source`` until train.steps, resuming if asked; see the module docstring."""
    from tqdm import tqdm

    from corral.train.failure import FaultInjector, LossGuard, Watchdog

    config = run.config
    run_dir = Path(config.out_dir)
    log = MetricsLog(run_dir, enabled=run.rank == 0, tensorboard=config.train.tensorboard)
    state = _start(run, source, log)
    guard = LossGuard(config.failure, state.guard_history)
    faults = FaultInjector(config.fault, run_dir, run.rank)
    watchdog = Watchdog(config.failure.watchdog_timeout_s, run_dir / f"watchdog_rank{run.rank}.txt").start()
    checkpoint = None
    bar = tqdm(total=config.train.steps, initial=state.step, disable=not (config.train.progress and run.rank == 0),
               desc=name, dynamic_ncols=True)
    try:
        while state.step < config.train.steps:
            watchdog.beat(f"step {state.step + 1} start")
            t0 = time.perf_counter()
            state.step += 1
            faults.before_step(state.step)
            batches = [source.next_batch() for _ in range(config.optim.grad_accum)]
            stats = train_step(run, batches, loss_fn, guard, inject_nan=faults.nan_now(state.step))
            state.tokens_seen += stats.tokens * run.dp_size
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
            if evaluate is not None and (last or (config.train.val_every and state.step % config.train.val_every == 0)):
                state.last_val = evaluate()
                if state.last_val is not None:
                    log.write({"step": state.step, "event": "val", "val_loss": state.last_val})
            if last or (config.checkpoint.every and state.step % config.checkpoint.every == 0):
                checkpoint = _save(run, source, state, faults, log) or checkpoint
    finally:
        watchdog.stop()
        bar.close()
        log.close()
    return LoopResult(state=state, metrics_path=log.path, checkpoint=checkpoint)
