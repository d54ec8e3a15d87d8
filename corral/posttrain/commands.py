"""``corral finetune``: argparse wiring only; the work happens in corral.posttrain.finetune.

Only argparse and the standard library are imported at module level, so ``corral --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json

_EPILOG = """\
The config is TOML (see configs/finetune/*.toml and docs/posttrain.md): objective = "sft" | "rm" | "dpo" |
"ppo" | "rs", [model] source = a checkpoint path or a stored model name, [data] train = ["file.jsonl"]
(for ppo and rs: prompts, {"prompt": ..., "split": "train"|"held"} rows, scored by [reward]; their
settings are [ppo] and [rs]), and the pretraining sections [optim] [train] [checkpoint]. Any field
can be overridden after the config: --train.steps=50 --data.batch_size=2 --preference.beta=0.2. The run
directory (out_dir) gets metrics.jsonl, tensorboard/, metrics.png, checkpoints/ and the fine-tuned model (model/).
For several processes: torchrun --nproc_per_node=N -m corral finetune CONFIG ..."""


def finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("config", help='TOML config, e.g. configs/finetune/sft.toml ("-" for the defaults)')
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest committed checkpoint of out_dir (auto) or from PATH")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a model as a TOML config says; --section.key=value overrides any field."""
    from corral.posttrain.config import load_finetune_config
    from corral.posttrain.finetune import run_finetune
    from corral.train.commands import _split_resume

    overrides, resume = _split_resume(list(args.overrides), args.resume)
    if resume is not None:
        overrides.append(f"--checkpoint.resume={json.dumps(resume)}")
    config = load_finetune_config(None if args.config == "-" else args.config, overrides)
    result = run_finetune(config)
    print(json.dumps({"objective": config.objective, "steps": result.steps,
                      "final_train_loss": result.final_train_loss, "eval_before": result.eval_before,
                      "eval_after": result.eval_after, "seconds": round(result.seconds, 2),
                      "model": str(result.model_dir) if result.model_dir else None,
                      "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                      "metrics": str(result.metrics_path),
                      "plot": str(result.plot_path) if result.plot_path else None}))
    return 0
