"""One fine-tuning run, whatever the objective: the phases of pretraining's setup, then the shared loop.

Order of a run (``run_finetune``):
 1. ``start_processes`` (threads, device, torchrun's process group) and ``load_base``: the starting
    model (a checkpoint path, a `corral pretrain` run or a stored name) with its tokenizer and chat format;
 2. the dataset rendered with that chat format (corral.posttrain.data);
 3. the objective's module (``OBJECTIVES``): the Transformer itself, or a RewardModel around it;
 4. what trains: LoRA adapters (corral.model.lora.apply_lora) or the last ``trainable.layers`` blocks;
 5. ``parallelize_model`` (TP -> AC -> compile -> FSDP under torchrun) and ``build_optim``;
 6. the objective's loss_fn and evaluation (DPO scores every pair with the reference first);
 7. ``train_loop`` (checkpoints, resume, metrics.jsonl, TensorBoard, progress bar), then the plot;
 8. the result written as a model `corral run` and the server load (``corral.posttrain.output``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corral.errors import ConfigError, ModelNotFoundError, TemplateMismatchError
from corral.posttrain.config import FinetuneConfig, LoraConfig, TrainableConfig
from corral.posttrain.data import Dataset, chat_batches, load_dataset, pair_batches
from corral.posttrain.metrics import EvalLog, plot_metrics
from corral.train.run import Run


@dataclass
class Base:
    """The model a run starts from, and how to talk to it."""

    model: nn.Module
    tokenizer: Any
    chat_format: Any
    kind: str
    """"gguf", "hf", "meta" (a checkpoint file or directory) or "run" (a `corral pretrain` checkpoint)."""
    path: Path
    metadata: dict


@dataclass
class FinetuneResult:
    steps: int
    final_train_loss: float | None
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    metrics_path: Path
    plot_path: Path | None
    model_dir: Path | None
    checkpoint: Path | None
    seconds: float


# --- 1. the base model ----------------------------------------------------------------------


def resolve_source(source: str) -> Path:
    """A path that exists, else the name of a stored model."""
    if not source:
        raise ConfigError("model.source is empty: name a checkpoint path or a stored model")
    path = Path(source).expanduser()
    if path.exists():
        return path
    from corral.store.load import ensure_default, is_default
    from corral.store.store import Store

    try:
        store = Store()
        if is_default(source):
            ensure_default(store)  # the embedded SmolLM2, registered the first time it is named
        return store.model_path(source)
    except Exception as exc:  # noqa: BLE001 - the store's own error (bad name, missing manifest) becomes ours
        raise ModelNotFoundError(f"model.source {source!r} is neither a path nor a stored model ({exc})") from None


def _is_training_run(path: Path) -> bool:
    return path.is_dir() and ((path / "meta.json").exists() or (path / "checkpoints").is_dir())


TURN_ENDS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
"""Special tokens that end a turn in the chat formats people use (Llama 3, ChatML, Phi, Gemma)."""


def template_format(template: str, tokenizer):
    """A Jinja chat format that stops at end of text and at whichever turn-end tokens the vocabulary has."""
    from corral.tokenizer.template import template_chat_format

    stops = {tokenizer.special_tokens[t] for t in TURN_ENDS if t in tokenizer.special_tokens}
    if tokenizer.eos_id is not None:
        stops.add(tokenizer.eos_id)
    return template_chat_format(template, tokenizer, stop_ids=stops)


def load_base(source: str, chat_template: str, device: torch.device) -> Base:
    """The starting weights as a float32 Transformer on ``device``, its tokenizer and its chat format."""
    from corral.checkpoint.base import Checkpoint
    from corral.checkpoint.load import load_checkpoint
    from corral.llm import build_model, chat_format_for, load_tokenizer_for

    path = resolve_source(source)
    if _is_training_run(path):
        from corral.train.state import load_model_weights, resolve_checkpoint

        config, state_dict = load_model_weights(resolve_checkpoint(path))
        ckpt, kind = Checkpoint(config, state_dict, "meta", path), "run"  # Meta names, Meta's Llama 3 tokenizer
    else:
        ckpt = load_checkpoint(path, dtype=torch.float32)
        kind = ckpt.format
    tokenizer, _ = load_tokenizer_for(ckpt)
    chat_format = chat_format_for(ckpt, tokenizer)
    if chat_template:
        chat_format = template_format(Path(chat_template).read_text(encoding="utf-8"), tokenizer)
    if chat_format is None:
        raise TemplateMismatchError(f"{path} carries no chat template; give one in model.chat_template")
    model = build_model(ckpt.config, {k: v.float() for k, v in ckpt.state_dict.items()}).to(device).train()
    return Base(model, tokenizer, chat_format, kind, path, ckpt.metadata)


# --- 4. what trains -------------------------------------------------------------------------


def apply_trainable(model: nn.Module, trainable: TrainableConfig) -> None:
    """Freeze all but the last ``layers`` blocks (+ final norm), and the embedding/output unless asked."""
    blocks = list(model.blocks())
    keep = len(blocks) if trainable.layers < 0 else min(trainable.layers, len(blocks))
    for p in model.parameters():
        p.requires_grad_(False)
    for block in blocks[len(blocks) - keep:]:
        block.requires_grad_(True)
    model.norm.requires_grad_(keep > 0)
    if trainable.embeddings:
        model.tok_embeddings.requires_grad_(True)
        if model.output is not None:
            model.output.requires_grad_(True)


def apply_finetune_lora(model: nn.Module, lora: LoraConfig) -> None:
    """The LoRA seam: adapters on lora.targets, everything else frozen (corral.model.lora)."""
    try:
        from corral.model.lora import apply_lora
    except ImportError:
        raise ConfigError("lora.enabled needs corral.model.lora, which this build does not have yet; "
                          "set lora.enabled = false for full fine-tuning") from None
    apply_lora(model, targets=list(lora.targets), rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
               layers=lora.layers or None)


# --- 3 and 6. objectives --------------------------------------------------------------------


@dataclass
class Objective:
    """What differs between objectives: the data kind, the module trained, the loss and its evaluation."""

    pairs: bool
    wrap: Callable[[nn.Module], nn.Module]
    build: Callable[[Run, Dataset, FinetuneConfig], tuple[Callable, Callable[[], dict[str, float]]]] | None
    """(run, dataset, config) -> (loss_fn, evaluate() -> held-out metrics)."""
    sample: Callable[[Run, Base, FinetuneConfig], tuple[Any, Callable, Callable[[], dict[str, float]]]] | None = None
    """RL objectives (ppo, rs) instead of build: no dataset, (run, base, config) -> (a batch source that
    samples with the engine, loss_fn, evaluate) (corral.posttrain.rl_run)."""


def _sft(run: Run, data: Dataset, config: FinetuneConfig):
    from corral.posttrain.sft import sft_eval_loss, sft_objective

    val = [b for _, b in zip(range(config.train.val_batches),
                             chat_batches(data.val, config.data.batch_size, 0))] if data.val else []
    return sft_objective(run.device), lambda: {"val_loss": sft_eval_loss(run.model, val, run.device)} if val else {}


def _rm(run: Run, data: Dataset, config: FinetuneConfig):
    from corral.posttrain.reward import FeatureCache, reward_evaluate, reward_objective

    center = config.preference.center_rewards
    cache = FeatureCache()  # used only while the trunk has nothing to train

    def evaluate() -> dict[str, float]:
        if not data.val:
            return {}
        return reward_evaluate(run.model, data.val, config.data.batch_size, center, run.device, cache)

    return reward_objective(center, run.device, cache), evaluate


def _dpo(run: Run, data: Dataset, config: FinetuneConfig):
    from corral.posttrain.preference import Reference, dpo_evaluate, dpo_objective
    from corral.train.loop import autocast

    pref = config.preference
    reference = Reference(run.model, pref.reference)
    if pref.reference == "precompute":
        with autocast(run):  # the same precision as the policy's forward in the loop
            reference.precompute(run.model, data.train, config.data.batch_size, run.device, key=0)
            reference.precompute(run.model, data.val, config.data.batch_size, run.device, key=1)

    def evaluate() -> dict[str, float]:
        if not data.val:
            return {}
        with autocast(run):
            return dpo_evaluate(run.model, reference, data.val, config.data.batch_size, pref.beta, pref.loss,
                                pref.label_smoothing, run.device)

    return dpo_objective(reference, pref.beta, pref.loss, pref.label_smoothing, run.device), evaluate


def _reward_model(model: nn.Module) -> nn.Module:
    from corral.posttrain.reward import RewardModel

    return RewardModel(model)


def _same(model: nn.Module) -> nn.Module:
    return model


def _actor_critic(model: nn.Module) -> nn.Module:
    from corral.posttrain.ppo import ActorCritic

    return ActorCritic(model)


def _ppo(run: Run, base: Base, config: FinetuneConfig):
    from corral.posttrain.rl_run import ppo_objective

    return ppo_objective(run, base, config)


def _rs(run: Run, base: Base, config: FinetuneConfig):
    from corral.posttrain.rl_run import rs_objective

    return rs_objective(run, base, config)


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(pairs=False, wrap=_same, build=_sft),
    "rm": Objective(pairs=True, wrap=_reward_model, build=_rm),
    "dpo": Objective(pairs=True, wrap=_same, build=_dpo),
    "ppo": Objective(pairs=False, wrap=_actor_critic, build=None, sample=_ppo),
    "rs": Objective(pairs=False, wrap=_same, build=None, sample=_rs),
}
"""objective name -> Objective."""


# --- the run --------------------------------------------------------------------------------


def _batches(objective: Objective, data: Dataset, config: FinetuneConfig, pad_id: int):
    if objective.pairs:
        return lambda: pair_batches(data.train, config.data.batch_size, config.data.seed, pad_id)
    return lambda: chat_batches(data.train, config.data.batch_size, config.data.seed, pack=config.data.pack,
                                seq_len=config.data.max_len, pad_id=pad_id)


def setup_finetune(config: FinetuneConfig) -> tuple[Run, Base, Dataset, Objective]:
    """Phases 1-5: processes, base model, dataset, the objective's module, freezing or LoRA, transforms, optimizer."""
    from corral.train.run import seed_everything
    from corral.train.setup import build_optim, parallelize_model, start_processes

    if config.objective not in OBJECTIVES:
        raise ConfigError(f"objective = {config.objective!r} is not available in this build; "
                          f"choose one of {', '.join(OBJECTIVES)}")
    objective = OBJECTIVES[config.objective]
    procs = start_processes(config)
    seed_everything(config.train.seed)
    base = load_base(config.model.source, config.model.chat_template, procs.device)
    # RL objectives read prompts, not a chat dataset (corral.posttrain.rl_run)
    data = Dataset([], []) if objective.sample else load_dataset(config.data, base.chat_format, pairs=objective.pairs)
    if config.lora.enabled:
        apply_finetune_lora(base.model, config.lora)
    else:
        apply_trainable(base.model, config.trainable)
    module = objective.wrap(base.model)
    module, _, _ = parallelize_model(module, config, procs.mesh)
    if not any(p.requires_grad for p in module.parameters()):
        raise ConfigError("nothing to train: trainable.layers = 0 and trainable.embeddings = false")
    optimizer, scheduler = build_optim(module, config, procs.mesh)
    run = Run(config=config, model=module, optimizer=optimizer, scheduler=scheduler, device=procs.device,
              rank=procs.rank, world=procs.world, dp_size=procs.dp_size,
              n_params=sum(p.numel() for p in module.parameters() if p.requires_grad))
    return run, base, data, objective


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune as the config says (resuming if asked), write the model, return the numbers."""
    from corral.posttrain.output import save_result
    from corral.train.loop import IterableSource, train_loop

    started = time.perf_counter()
    run, base, data, objective = setup_finetune(config)
    if objective.sample is not None:
        source, loss_fn, evaluate = objective.sample(run, base, config)
    else:
        loss_fn, evaluate = objective.build(run, data, config)
        source = IterableSource(_batches(objective, data, config, base.tokenizer.eos_id or 0))
    eval_log = EvalLog(Path(config.out_dir), enabled=run.rank == 0, tensorboard=config.train.tensorboard)
    before = evaluate()
    eval_log.write(int(run.scheduler.last_epoch), before)

    def evaluate_and_log() -> float | None:
        metrics = evaluate()
        eval_log.write(int(run.scheduler.last_epoch), metrics)
        return metrics.get("val_loss")

    result = train_loop(run, source, loss_fn, evaluate=evaluate_and_log, name=f"finetune:{config.objective}")
    eval_log.close()
    after = eval_log.last
    plot = plot_metrics(result.metrics_path, Path(config.out_dir) / "metrics.png") if run.rank == 0 else None
    model_dir = save_result(run, base, config)
    return FinetuneResult(steps=result.state.step, final_train_loss=result.state.last_loss, eval_before=before,
                          eval_after=after, metrics_path=result.metrics_path, plot_path=plot, model_dir=model_dir,
                          checkpoint=result.checkpoint, seconds=time.perf_counter() - started)
