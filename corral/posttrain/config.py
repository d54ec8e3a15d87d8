"""Fine-tuning configuration: typed dataclasses loaded strictly from TOML, as pretraining's are.

A run is ``FinetuneConfig``; each TOML table is a section dataclass loaded by corral.config: unknown keys and
ill-typed values are ConfigErrors naming the dotted key, and ``--section.key=value`` overrides are parsed as
TOML values. The sections the shared loop reads (``optim``, ``train``, ``checkpoint``, ``parallel``,
``failure``, ``fault``) are pretraining's own dataclasses, with fine-tuning defaults for the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.config import from_dict, load_toml_config
from corral.errors import ConfigError
from corral.posttrain.rl_config import PPOConfig, RewardConfig, RSConfig, check_rl_sections
from corral.train.config import (
    CheckpointConfig,
    FailureConfig,
    FaultConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)

OBJECTIVES = ("sft", "rm", "dpo", "ppo", "rs")
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "preference")
PREFERENCE_LOSSES = ("sigmoid", "ipo", "robust")
REFERENCES = ("precompute", "online")


@dataclass
class ModelSource:
    source: str = ""
    """The model to start from: a checkpoint path (GGUF file, HF or Meta directory, a `corral pretrain` run or
    step directory) or the name of a model in the local store (`corral list`)."""
    chat_template: str = ""
    """A Jinja chat template file used instead of the model's own chat format; empty keeps the model's."""


@dataclass
class FinetuneDataConfig:
    train: list[str] = field(default_factory=list)
    """Training files: JSON arrays or JSONL (optionally .gz) of Alpaca, ShareGPT, `messages` or preference rows."""
    val: list[str] = field(default_factory=list)
    """Held-out files in the same forms; empty means `val_fraction` of the training rows are held out."""
    val_fraction: float = 0.0
    """Share of the training rows held out for validation when `val` is empty (taken after a seeded shuffle)."""
    format: str = "auto"
    """"auto" (each row by its keys), "alpaca", "sharegpt", "messages", "prompt_completion" or "preference":
    rows of another form are errors."""
    max_len: int = 512
    """Tokens per rendered sample; longer samples are cut at the end (a pair's prompt is cut from the left)."""
    batch_size: int = 4
    """Samples (or packed rows, or preference pairs) per micro-batch."""
    pack: bool = False
    """SFT only: pack several samples into each row of `max_len` tokens, attention kept inside each sample."""
    seed: int = 0
    """Seeds the order of samples (a new permutation every epoch) and the validation split."""
    system: str = ""
    """A system message put before every conversation that has none; empty adds nothing."""
    placeholders: dict[str, str] = field(default_factory=dict)
    """Text substitutions applied to every string, e.g. {name = "Corral"} turns "{{name}}" into "Corral"."""
    skip_bad_rows: bool = False
    """Leave malformed rows out (counted and reported) instead of stopping at the first with an error."""
    limit: int = 0
    """Use only the first `limit` rows of the training files (after reading, before the split); 0 uses all."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters (corral.model.lora.apply_lora) instead of the full weights."""
    rank: int = 8
    """Rank r of each adapter pair (A: r x in, B: out x r)."""
    alpha: float = 16.0
    """Adapter scale alpha / r (Hu et al. 2021, arXiv 2106.09685)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    targets: list[str] = field(default_factory=lambda: ["attention.wq", "attention.wk", "attention.wv",
                                                        "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                                        "feed_forward.w3"])
    """Linear layers of every block that get adapters, by Meta name (and "output" for the output projection)."""
    layers: list[int] = field(default_factory=list)
    """Blocks that get adapters (PEFT's layers_to_transform), e.g. the top few for a cheaper backward; empty: all."""


@dataclass
class TrainableConfig:
    layers: int = -1
    """Without LoRA: train only the last `layers` blocks (and the final norm); -1 trains every block, 0 none."""
    embeddings: bool = True
    """Without LoRA: train the token embedding and output projection as well."""


@dataclass
class PreferenceConfig:
    beta: float = 0.1
    """DPO's beta (the strength of the KL constraint to the reference; IPO's tau)."""
    loss: str = "sigmoid"
    """"sigmoid" (DPO, Rafailov et al. 2023; with label_smoothing > 0 conservative cDPO), "ipo" (Azar et al. 2023)
    or "robust" (rDPO, Chowdhury et al. 2024)."""
    label_smoothing: float = 0.0
    """Assumed probability that a pair's labels are flipped (cDPO and rDPO); must be below 0.5."""
    reference: str = "precompute"
    """Reference log-probs: "precompute" (one pass over the data before training) or "online" (a frozen copy
    of the starting model scores every batch)."""
    center_rewards: float = 0.0
    """Reward model: weight of the mean squared reward, which keeps rewards centred near 0 (TRL's
    center_rewards_coefficient); 0 disables it."""


@dataclass
class OutputConfig:
    dir: str = ""
    """Where the fine-tuned model is written; empty means <out_dir>/model."""
    store_name: str = ""
    """Also create the fine-tuned model in the local store under this name (`corral run NAME`); empty does not."""


def _finetune_optim() -> OptimConfig:
    return OptimConfig(lr=2e-5, warmup_steps=10, weight_decay=0.0, min_lr_ratio=0.1, beta2=0.999)


def _finetune_train() -> TrainConfig:
    return TrainConfig(steps=100, val_every=0, val_batches=8)


@dataclass
class FinetuneConfig:
    objective: str = "sft"
    """What to train: "sft" (next token on assistant turns), "rm" (reward model), "dpo" (direct preference
    optimization), "ppo" or "rs" (rejection sampling)."""
    out_dir: str = "runs/finetune"
    """Run directory: config.json, metrics.jsonl, metrics.png, tensorboard/, checkpoints/, model/."""
    model: ModelSource = field(default_factory=ModelSource)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """objective = "ppo": rollouts, KL penalty, GAE and clipping (corral.posttrain.ppo, .rollout)."""
    rs: RSConfig = field(default_factory=RSConfig)
    """objective = "rs": rejection sampling rounds (corral.posttrain.rejection)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """objective = "ppo" or "rs": what scores a response."""
    optim: OptimConfig = field(default_factory=_finetune_optim)
    train: TrainConfig = field(default_factory=_finetune_train)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        check_finetune(self)


_CHOICES = {
    "objective": OBJECTIVES,
    "data.format": DATA_FORMATS,
    "preference.loss": PREFERENCE_LOSSES,
    "preference.reference": REFERENCES,
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("float32", "bfloat16"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "failure.nan_policy": ("skip", "rollback", "raise"),
}
_POSITIVE = ("data.max_len", "data.batch_size", "optim.grad_accum", "train.steps", "train.log_every",
             "train.val_batches", "checkpoint.keep", "preference.beta")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_finetune(config: FinetuneConfig) -> None:
    """Value checks that types alone do not catch; each error names the dotted key."""
    for key, choices in _CHOICES.items():
        if _get(config, key) not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {_get(config, key)!r}")
    for key in _POSITIVE:
        if _get(config, key) <= 0:
            raise ConfigError(f"{key} must be positive; got {_get(config, key)!r}")
    if not 0 <= config.preference.label_smoothing < 0.5:
        raise ConfigError(f"preference.label_smoothing must be in [0, 0.5); got {config.preference.label_smoothing}")
    if not 0 <= config.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1); got {config.data.val_fraction}")
    if config.lora.enabled and config.lora.rank <= 0:
        raise ConfigError(f"lora.rank must be positive; got {config.lora.rank}")
    if config.lora.enabled and config.lora.alpha <= 0:
        raise ConfigError(f"lora.alpha must be positive; got {config.lora.alpha}")
    if not 0 <= config.lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1); got {config.lora.dropout}")
    if config.data.pack and config.objective != "sft":
        raise ConfigError(f"data.pack is for objective = \"sft\" only (got {config.objective!r}): preference pairs "
                          "are scored one sequence per row")
    if config.optim.lr <= 0 or not 0 <= config.optim.min_lr_ratio <= 1:
        raise ConfigError("optim.lr must be positive and optim.min_lr_ratio in [0, 1]")
    check_rl_sections(config.ppo, config.rs, config.reward)
    if config.objective == "rs" and config.train.steps != config.rs.rounds * config.rs.steps_per_round:
        raise ConfigError(f"train.steps={config.train.steps} must equal rs.rounds * rs.steps_per_round "
                          f"= {config.rs.rounds * config.rs.steps_per_round} for objective = \"rs\"")


# A table given in the TOML keeps fine-tuning's defaults for the keys it leaves out (not pretraining's).
_BUILDERS = {
    OptimConfig: lambda raw, key: from_dict(OptimConfig, raw, key, what="finetune config", base=_finetune_optim()),
    TrainConfig: lambda raw, key: from_dict(TrainConfig, raw, key, what="finetune config", base=_finetune_train()),
}


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """Read a TOML file (or start from defaults), apply ``--a.b=value`` overrides, build the dataclasses."""
    return load_toml_config(FinetuneConfig, path, overrides, what="finetune config", builders=_BUILDERS)
