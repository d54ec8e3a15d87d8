"""Pretraining configuration: typed dataclasses loaded strictly from TOML.

A run is ``PretrainConfig``; each TOML table is one section dataclass, loaded by corral.config: unknown
keys and values of the wrong type are ConfigErrors that name the dotted key, and ``--section.key=value``
overrides are parsed as TOML values (``--optim.lr=3e-4``, ``--data.train=["a.txt"]``, bare words are strings).
The ``[model]`` table is a ``ModelConfig``: ``preset = "debug"`` starts from ``PRESETS`` and the other
keys override single fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.config import from_dict, load_toml_config
from corral.errors import ConfigError
from corral.model.config import PRESETS, ModelConfig


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training sources: text files, JSONL files ({"text": ...} per line), token shards or directories of them."""
    val: list[str] = field(default_factory=list)
    """Validation sources, in the same forms; empty means no validation loss."""
    seq_len: int = 128
    """Tokens per training sequence (the model sees seq_len inputs and predicts seq_len targets)."""
    batch_size: int = 8
    """Sequences per micro-batch on each data-parallel rank."""
    seed: int = 0
    """Seeds the order in which sequences are visited (a new permutation every epoch)."""
    shard_dir: str = ""
    """Where tokenized text sources are cached as shards; empty means <out_dir>/shards."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many optimizer steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not norms)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay (Llama 3 uses 0.95)."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed into one optimizer step."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps in the whole run (a resumed run continues up to this number)."""
    seed: int = 0
    """Seeds weight initialisation and every random generator."""
    device: str = "auto"
    """"cpu", "cuda" or "auto" (cuda when available)."""
    dtype: str = "float32"
    """"float32", or "bfloat16" for bf16 autocast of the forward pass (weights and optimizer stay fp32)."""
    activation_checkpointing: str = "none"
    """"none", "full" or "selective": recompute activations in backward (corral.train.parallel.apply_ac)."""
    compile: bool = False
    """torch.compile the model: one process compiles everything before the output projection as one graph
    (corral.train.loss.build_loss); with a device mesh each block is compiled (corral.train.parallel.apply_compile)."""
    loss_chunk_rows: int = 256
    """Rows of logits computed at once by the fused output-projection + cross-entropy (corral.train.loss), which
    never holds the whole (tokens, vocab) logits; 0 takes the reference path (full logits from the model's forward).
    Used by one process; with a device mesh (FSDP, TP, pipeline) the reference path is always taken."""
    log_every: int = 1
    """Write a metrics record every this many steps."""
    val_every: int = 0
    """Compute validation loss every this many steps (and at the end); 0 only at the end."""
    val_batches: int = 4
    """Micro-batches averaged for one validation loss."""
    tensorboard: bool = True
    """Also write the metrics as TensorBoard scalars under <out_dir>/tensorboard."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device, for MFU; 0 guesses (a table for GPUs, cores x 32 FLOP x 2.5 GHz for CPUs)."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a checkpoint every this many steps (and at the end); 0 only at the end."""
    keep: int = 2
    """Committed checkpoints to keep; older ones are deleted only after a newer one commits."""
    resume: str = "none"
    """"none", "auto" (the latest committed checkpoint in <out_dir>/checkpoints, if any) or a checkpoint path."""


@dataclass
class ParallelConfig:
    dp: int = 1
    """Data-parallel (FSDP2) degree; -1 means the world size divided by tp * pp."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel stages."""
    pp_microbatches: int = 2
    """Microbatches per batch in the pipeline schedule (at least pp; data.batch_size must divide by it)."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: "1f1b" or "gpipe"."""


@dataclass
class FailureConfig:
    nan_policy: str = "skip"
    """On a NaN/inf loss or a spike: "skip" the update, "rollback" to the last checkpoint, or "raise"."""
    spike_factor: float = 0.0
    """A loss above spike_factor x the running mean counts as a spike; 0 disables spike detection."""
    spike_window: int = 20
    """Finite losses in the running mean; spikes are only judged once the window is full."""
    max_rollbacks: int = 3
    """Rollbacks allowed before the run stops with an error (a run that keeps diverging)."""
    watchdog_timeout_s: float = 0.0
    """Dump every thread's stack and exit non-zero when one step takes longer; 0 disables the watchdog."""


@dataclass
class FaultConfig:
    """Injected faults, for tests. Each fires once per run directory (a marker file remembers it)."""

    crash_at_step: int = 0
    """Raise inside step k (the process exits non-zero); 0 disables."""
    nan_at_step: int = 0
    """Make the loss of step k NaN; 0 disables."""
    hang_at_step: int = 0
    """Sleep forever inside step k (the watchdog or a kill must end it); 0 disables."""
    kill_in_save_at_step: int = 0
    """SIGKILL this process after the checkpoint of step k is written but before it commits; 0 disables."""


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    """Run directory: metrics.jsonl, tensorboard/, checkpoints/, shards/."""
    model: ModelConfig = field(default_factory=lambda: PRESETS["debug"])
    """Model shape ([model] table: preset = "name" plus field overrides)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        check_choices(self)


_CHOICES = {
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("float32", "bfloat16"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "parallel.pp_schedule": ("1f1b", "gpipe"),
    "failure.nan_policy": ("skip", "rollback", "raise"),
}
_POSITIVE = ("data.seq_len", "data.batch_size", "optim.grad_accum", "train.steps", "train.log_every",
             "train.val_batches", "checkpoint.keep", "parallel.tp", "parallel.pp", "failure.spike_window")


def check_choices(config: PretrainConfig) -> None:
    """Value checks that types alone do not catch; each error names the dotted key."""
    for key, choices in _CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    for key in _POSITIVE:
        if _get(config, key) <= 0:
            raise ConfigError(f"{key} must be positive; got {_get(config, key)!r}")
    if config.parallel.dp == 0 or config.parallel.dp < -1:
        raise ConfigError(f"parallel.dp must be positive or -1; got {config.parallel.dp}")
    if config.optim.lr <= 0 or not 0 <= config.optim.min_lr_ratio <= 1:
        raise ConfigError("optim.lr must be positive and optim.min_lr_ratio in [0, 1]")
    if config.train.loss_chunk_rows < 0:
        raise ConfigError(f"train.loss_chunk_rows must be 0 or positive; got {config.train.loss_chunk_rows}")
    if config.data.seq_len > config.model.max_seq_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={config.model.max_seq_len}")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def model_from_table(raw: Any, key: str = "model") -> ModelConfig:
    """The [model] table: ``preset = "name"`` starts from PRESETS, the other keys override single fields."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{key} must be a table, got {type(raw).__name__}")
    raw = dict(raw)
    preset = raw.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"{key}.preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    if "head_dim_override" in raw:  # set by checkpoint readers only; a trained model keeps dim / n_heads
        raise ConfigError(f"unknown config key {key}.head_dim_override")
    return from_dict(ModelConfig, raw, key, base=PRESETS[preset] if preset else ModelConfig())


MODEL_BUILDERS = {ModelConfig: model_from_table}
"""How load_config builds a ModelConfig field (any *Config that holds one passes this to corral.config)."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read a TOML file (or start from defaults), apply ``--a.b=value`` overrides, build the dataclasses."""
    return load_toml_config(PretrainConfig, path, overrides, builders=MODEL_BUILDERS)


def config_from_dict(raw: dict[str, Any]) -> PretrainConfig:
    """Strictly build a PretrainConfig: unknown keys and ill-typed values raise ConfigError naming the key."""
    return from_dict(PretrainConfig, raw, builders=MODEL_BUILDERS)
