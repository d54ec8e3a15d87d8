"""Benchmark tasks during pretraining: a callback for corral.train.pretrain.run_pretrain(on_evaluate=...).

It scores the model being trained (rank 0, a whole single-process model) on a task list each time the run
validates and logs every metric to TensorBoard (`eval/<task>/<metric>`) and to <out_dir>/eval.jsonl.
Pretraining's text is Llama 3 tokens, so the prompts are encoded with Meta's Llama 3 tokenizer (with BOS).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

from corral.eval.loglik import LocalModel
from corral.eval.runner import EvalSettings, evaluate
from corral.eval.tasks import Task


def task_callback(task_list: list[Task], limit: int | None) -> Callable:
    """on_evaluate(run): score run.model on task_list (first `limit` examples each) and log the metrics."""
    state: dict = {}

    def on_evaluate(run) -> None:
        if run.rank != 0 or run.world > 1 or run.pipe is not None:
            if "warned" not in state and run.rank == 0:
                warnings.warn("eval tasks during pretraining run only for a single-process model; skipped",
                              stacklevel=2)
            state["warned"] = True
            return
        if "tokenizer" not in state:
            from corral.tokenizer import load_llama3_tokenizer

            state["tokenizer"] = load_llama3_tokenizer()
        model = getattr(run.model, "_orig_mod", run.model)  # a compiled model's own module
        step = run.scheduler.last_epoch  # the scheduler steps once per optimizer step
        scorer = LocalModel(model, state["tokenizer"], add_bos=True, name="pretraining")
        was_training = model.training
        model.eval()
        try:
            report = evaluate(scorer, task_list, EvalSettings(limit=limit))
        finally:
            model.train(was_training)
        log_report(Path(run.config.out_dir), step, report.results, run.config.train.tensorboard)

    return on_evaluate


def log_report(out_dir: Path, step: int, rows, tensorboard: bool) -> None:
    with open(out_dir / "eval.jsonl", "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"step": step, "task": row.task, "metric": row.metric, "value": row.value,
                                "stderr": row.stderr, "n": row.n}) + "\n")
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out_dir / "tensorboard")) as writer:
            for row in rows:
                writer.add_scalar(f"eval/{row.task}/{row.metric}", row.value, step)
