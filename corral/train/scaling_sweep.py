"""The sweep behind a scaling law: a grid of (model size, compute budget) runs, and the held-out check.

For every compute budget C and every candidate shape of N non-embedding parameters, the run
trains D = C / 6N tokens (rounded to whole steps) with its own cosine schedule ending at D,
as Chinchilla's IsoFLOP profiles do; runs shorter than min_steps or longer than max_steps are
left out. Every run is an ordinary ``run_pretrain`` on the corpus, and finished runs are
appended to <out_dir>/sweep.json at once, so an interrupted sweep resumes where it stopped.

``tokenizer = "bytes"`` trains on UTF-8 bytes (vocabulary 256): at CPU scale a 128,256-row
Llama 3 embedding would dwarf the blocks whose scaling we measure. ``"llama3"`` uses Meta's
tokenizer (for GPU-sized sweeps).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.config import load_toml_config
from corral.errors import ConfigError
from corral.train.scaling import ScalingRun, load_runs, non_embedding_params, save_runs


@dataclass
class SweepConfig:
    out_dir: str = "runs/scaling"
    """sweep.json, fit.json, fit.png, check.json and one run directory per run go here."""
    tokenizer: str = "bytes"
    """"bytes" (UTF-8 bytes, vocabulary 256) or "llama3" (Meta's tokenizer, vocabulary 128,256)."""
    train: list[str] = field(default_factory=list)
    """Training text files (or shards when tokenizer = "llama3")."""
    val: list[str] = field(default_factory=list)
    """Validation text files: the loss the law is fitted to."""
    budgets: list[float] = field(default_factory=list)
    """Compute budgets C in FLOPs (C = 6 N D)."""
    models: list[dict] = field(default_factory=list)
    """Candidate shapes, each a table of ModelConfig fields (dim, n_layers, n_heads, ...)."""
    min_steps: int = 40
    """Runs shorter than this are skipped (too few steps to leave warmup behind)."""
    max_steps: int = 2000
    """Runs longer than this are skipped (a small model on a big budget: costly and uninformative)."""
    pretrain: dict = field(default_factory=dict)
    """PretrainConfig tables shared by every run ([pretrain.data], [pretrain.optim], [pretrain.train], ...)."""
    target: dict = field(default_factory=dict)
    """The held-out larger run: model fields plus `tokens`, trained by `corral scaling check`."""


def load_sweep_config(path: str | Path) -> SweepConfig:
    """A SweepConfig from TOML; unknown keys and ill-typed values are ConfigErrors naming the key."""
    config = load_toml_config(SweepConfig, path, what="scaling config")
    if config.tokenizer not in ("bytes", "llama3"):
        raise ConfigError(f"tokenizer must be bytes or llama3, got {config.tokenizer!r}")
    if not config.budgets or not config.models or not config.train or not config.val:
        raise ConfigError("a scaling config needs budgets, models, train and val")
    if any(b <= 0 for b in config.budgets):
        raise ConfigError(f"budgets must be positive FLOP counts, got {config.budgets}")
    if config.target and "tokens" not in config.target:
        raise ConfigError("target needs `tokens` (training tokens of the held-out run) besides its model fields")
    return config


def byte_shards(sources: list[str], shard_dir: Path) -> list[str]:
    """Each text file as a shard of its UTF-8 bytes (ids 0..255), cached under its content digest."""
    import numpy as np

    from corral.data.shards import write_shard

    out = []
    for source in sources:
        data = Path(source).read_bytes()
        target = shard_dir / f"{Path(source).stem}-bytes-{hashlib.sha256(data).hexdigest()[:16]}.bin"
        if not target.exists():
            write_shard(target, np.frombuffer(data, dtype=np.uint8))
        out.append(str(target))
    return out


def _pretrain_config(config: SweepConfig, name: str, model: dict, steps: int, data: tuple[list, list]):
    """The PretrainConfig of one run: the shared [pretrain] tables plus this run's shape and length."""
    from corral.train.config import config_from_dict

    raw: dict[str, Any] = copy.deepcopy(config.pretrain)
    raw["out_dir"] = str(Path(config.out_dir) / "runs" / name)
    raw.setdefault("model", {}).update(model)
    if config.tokenizer == "bytes":
        raw["model"]["vocab_size"] = 256
    raw.setdefault("data", {}).update(train=data[0], val=data[1])
    raw.setdefault("train", {})["steps"] = steps
    raw.setdefault("checkpoint", {}).setdefault("every", 0)
    return config_from_dict(raw)


def tokens_per_step(config: SweepConfig) -> int:
    from corral.train.config import config_from_dict

    base = config_from_dict(copy.deepcopy(config.pretrain))
    return base.data.batch_size * base.data.seq_len * base.optim.grad_accum


def plan_runs(config: SweepConfig) -> list[tuple[str, float, dict, int]]:
    """(name, budget, model fields, steps) for every grid point inside [min_steps, max_steps]."""
    per_step = tokens_per_step(config)
    plan = []
    for budget in sorted(config.budgets):
        for model in config.models:
            probe = _pretrain_config(config, "probe", model, 1, (["-"], ["-"])).model
            steps = round(budget / (6 * non_embedding_params(probe)) / per_step)
            if config.min_steps <= steps <= config.max_steps:
                shape = "-".join(f"{k}{v}" for k, v in sorted(model.items()))
                plan.append((f"C{budget:.0e}-{shape}", float(budget), dict(model), steps))
    return plan


def train_one(config: SweepConfig, name: str, model: dict, steps: int, budget: float = 0.0) -> ScalingRun:
    """Train one run of the grid (or the target) and return its record."""
    from corral.train.pretrain import run_pretrain

    data = _data(config)
    cfg = _pretrain_config(config, name, model, steps, data)
    result = run_pretrain(cfg)
    if result.final_val_loss is None:
        raise ConfigError("the scaling runs need validation data (val)")
    return ScalingRun(name=name, n_params=non_embedding_params(cfg.model), tokens=result.tokens_seen,
                      val_loss=result.final_val_loss, budget=budget, model=dict(model), steps=result.steps,
                      seconds=round(result.seconds, 2))


def _data(config: SweepConfig) -> tuple[list[str], list[str]]:
    if config.tokenizer == "llama3":
        return list(config.train), list(config.val)
    shard_dir = Path(config.out_dir) / "shards"
    return byte_shards(config.train, shard_dir), byte_shards(config.val, shard_dir)


def run_sweep(config: SweepConfig, log=print) -> list[ScalingRun]:
    """Train every planned run not already in <out_dir>/sweep.json; return all runs."""
    path = Path(config.out_dir) / "sweep.json"
    runs = load_runs(path)[0] if path.exists() else []
    done = {r.name for r in runs}
    plan = plan_runs(config)
    for i, (name, budget, model, steps) in enumerate(plan, 1):
        if name in done:
            continue
        run = train_one(config, name, model, steps, budget)
        runs.append(run)
        save_runs(path, runs, {"config": dataclasses.asdict(config)})
        log(f"[{i}/{len(plan)}] {name}: N={run.n_params} D={run.tokens} loss={run.val_loss:.4f} ({run.seconds} s)")
    return runs


def target_run_spec(config: SweepConfig) -> tuple[dict, int, int]:
    """(model fields, N, D) of the held-out target."""
    if not config.target:
        raise ConfigError("the scaling config has no [target] table")
    model = {k: v for k, v in config.target.items() if k != "tokens"}
    probe = _pretrain_config(config, "probe", model, 1, (["-"], ["-"])).model
    return model, non_embedding_params(probe), int(config.target["tokens"])
