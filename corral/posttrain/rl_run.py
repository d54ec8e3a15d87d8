"""The RL objectives of ``corral finetune``: ``objective = "ppo"`` and ``"rs"`` (rejection sampling).

Their data are prompts, not answers, and their batches come from a source that samples (corral.posttrain.
rollout, .rejection) rather than from a dataset, so each builds (batch source, loss_fn, evaluate) from the
run and its base model (corral.posttrain.finetune, which loads the base, freezes or adds LoRA, and then
runs the one training loop). Prompt files are JSONL rows {"prompt": text, "split": "train" | "held"};
every row of a ``data.val`` file is held out. ``evaluate`` scores the held prompts (before training, every
``train.val_every`` steps and at the end) and its figures go to the run's eval log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.errors import ConfigError, DatasetError


def _prompt_rows(path: Path) -> list[tuple[str, str]]:
    """(prompt, split) of every row; a bad row is a DatasetError naming the file, line and field."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError("prompt file not found", path=str(path)) from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"not JSON ({exc.msg})", path=str(path), row=number) from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError("needs a non-empty string", path=str(path), row=number, field="prompt")
        split = row.get("split", "train")
        if split not in ("train", "held"):
            raise DatasetError(f'must be "train" or "held"; got {split!r}', path=str(path), row=number, field="split")
        rows.append((prompt, split))
    return rows


def read_prompts(train_files: list[str], val_files: list[str] = ()) -> tuple[list[str], list[str]]:
    """(train, held) prompts: rows by their split, and every row of the val files held."""
    if not train_files:
        raise DatasetError("data.train is empty: name at least one JSONL file of {\"prompt\": ...} rows")
    train, held = [], []
    for name in train_files:
        for prompt, split in _prompt_rows(Path(name)):
            (held if split == "held" else train).append(prompt)
    for name in val_files:
        held += [prompt for prompt, _ in _prompt_rows(Path(name))]
    if not train:
        raise DatasetError(f"no training prompts in {', '.join(train_files)} (every row is split \"held\")")
    return train, held


def render_prompts(chat_format, texts: list[str]) -> list[list[int]]:
    """Each text as one user turn, ending with the open assistant header the reply continues."""
    return [chat_format.encode_dialog([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]


def _stop_ids(base) -> frozenset[int]:
    """The ids that end a reply: the chat format's turn ends and the tokenizer's end of text (as corral.load)."""
    stops = set(base.chat_format.stop_ids)
    if base.tokenizer.eos_id is not None:
        stops.add(base.tokenizer.eos_id)
    return frozenset(stops)


def _scorer(config, base):
    from corral.posttrain.rl_config import build_scorer

    return build_scorer(config.reward, base.chat_format)


def _check_one_process(run) -> None:
    if run.world > 1:
        raise ConfigError("objective = \"ppo\" / \"rs\" sample with the engine in one process; run without torchrun")


def ppo_objective(run, base, config) -> tuple[Any, Callable, Callable[[], dict[str, float]]]:
    """(RolloutSource, ppo_loss, evaluate: reward and KL on held prompts); run.model is the ActorCritic."""
    from corral.posttrain.ppo import ppo_loss
    from corral.posttrain.rollout import build_rollout_source, evaluate_policy
    from corral.train.loop import autocast

    _check_one_process(run)
    c = config.ppo
    train, held = read_prompts(config.data.train, config.data.val)
    held_ids = render_prompts(base.chat_format, held)
    source = build_rollout_source(run.model, base.tokenizer, _stop_ids(base), render_prompts(base.chat_format, train),
                                  train, _scorer(config, base), c, config.train.seed, precision=lambda: autocast(run),
                                  max_prompt_len=max(map(len, held_ids), default=0))

    def loss_fn(model, batch):
        return ppo_loss(model, batch, c)

    def evaluate() -> dict[str, float]:
        if not held:
            return {}
        return evaluate_policy(source, held_ids, held, samples=c.eval_samples, seed=config.train.seed + 12345)

    return source, loss_fn, evaluate


def rs_objective(run, base, config) -> tuple[Any, Callable, Callable[[], dict[str, float]]]:
    """(RejectionSource, SFT loss on the kept responses, evaluate: the greedy score on held prompts)."""
    from corral.posttrain.rejection import build_rejection_source, greedy_score, rs_sft_loss

    _check_one_process(run)
    c = config.rs
    train, held = read_prompts(config.data.train, config.data.val)
    scorer = _scorer(config, base)
    held_ids = render_prompts(base.chat_format, held)
    source = build_rejection_source(run.model, base.tokenizer, _stop_ids(base),
                                    render_prompts(base.chat_format, train), train, scorer, c, config.train.seed,
                                    max_prompt_len=max(map(len, held_ids), default=0))

    def loss_fn(model, batch):
        return rs_sft_loss(model, batch)

    def evaluate() -> dict[str, float]:
        if not held:
            return {}
        return {"greedy_score": greedy_score(source.engine, held_ids, held, scorer, c.max_new_tokens),
                "round": float(source.round)}

    return source, loss_fn, evaluate
