"""``corral pretrain`` and ``corral export``: argparse wiring only; the work happens in the handlers.

Only argparse and the standard library are imported at module level, so ``corral --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_pretrain(args: argparse.Namespace, on_evaluate=None) -> int:
    """Pretrain a Llama 3 model as a TOML config says; --section.key=value overrides any field."""
    from corral.train.config import load_config
    from corral.train.pretrain import run_pretrain

    overrides, resume = _split_resume(list(args.overrides), args.resume)
    if resume is not None:
        overrides.append(f"--checkpoint.resume={json.dumps(resume)}")
    result = run_pretrain(load_config(args.config, overrides), on_evaluate=on_evaluate)
    print(json.dumps({"steps": result.steps, "final_train_loss": result.final_train_loss,
                      "final_val_loss": result.final_val_loss, "tokens_seen": result.tokens_seen,
                      "n_params": result.n_params, "seconds": round(result.seconds, 2),
                      "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                      "metrics": str(result.metrics_path)}))
    return 0


def _split_resume(words: list[str], resume: str | None) -> tuple[list[str], str | None]:
    """``--resume`` may also come after the config's overrides (argparse leaves it among them)."""
    from corral.errors import ConfigError

    rest = []
    it = iter(words)
    for word in it:
        if word == "--resume":
            resume = next(it, None)
            if resume is None:
                raise ConfigError("--resume needs a value: auto or a checkpoint path")
        elif word.startswith("--resume="):
            resume = word.split("=", 1)[1]
        else:
            rest.append(word)
    return rest, resume


def export_trained(checkpoint: str | Path, out: str | Path, fmt: str, qtype: str = "F32") -> Path:
    """Export a pretraining checkpoint (a step directory or a run directory) with the Llama 3 tokenizer."""
    from corral.checkpoint.export import export_with_llama3_tokenizer
    from corral.train.state import load_model_weights, resolve_checkpoint

    config, state_dict = load_model_weights(resolve_checkpoint(checkpoint))
    return export_with_llama3_tokenizer(config, state_dict, out, fmt, qtype=qtype)


def export_merged(source: str, out: str | Path, fmt: str, qtype: str = "F32",
                  adapters: list[str] = ()) -> list[str]:
    """Merge LoRA adapters into a model and write it: `source` is a model path, or a stored name whose own
    ADAPTER layers come first; `adapters` (PEFT directories, GGUF LoRA files) follow. Returns notes."""
    from corral.errors import ConfigError
    from corral.store import Store
    from corral.store.convert import convert_checkpoint

    path, stacked = Path(source), []
    if not path.exists():
        store = Store()
        path, stacked = store.model_path(source), list(store.info(source).adapters)
    if not stacked and not adapters:
        raise ConfigError(f"--merge: {source} has no ADAPTER layers and no --adapter was given")
    return convert_checkpoint(path, Path(out), fmt, qtype, adapters=[*stacked, *map(Path, adapters)])


def cmd_export(args: argparse.Namespace) -> int:
    """Write a trained checkpoint as an HF directory, a Meta directory or a GGUF file that Corral serves."""
    if args.merge or args.adapter:
        for note in export_merged(args.checkpoint, args.out, args.format, args.qtype, args.adapter):
            print(f"note: {note}", file=sys.stderr)
        print(f"exported {args.checkpoint} with its adapters merged -> {args.out} ({args.format})", file=sys.stderr)
        return 0
    out = export_trained(args.checkpoint, args.out, args.format, args.qtype)
    print(f"exported {args.checkpoint} -> {out} ({args.format})", file=sys.stderr)
    return 0


def pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Any config field can be overridden: --optim.lr=3e-4 --train.steps=100. "
                "For several processes: torchrun --nproc_per_node=N -m corral.train.pretrain CONFIG ...")
    p.add_argument("config", help="TOML config, e.g. configs/pretrain/debug.toml")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest committed checkpoint (auto) or from PATH")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("With --merge (or --adapter), CHECKPOINT is a model (GGUF file, HF or Meta directory, or a stored "
                "name) and its LoRA adapters are folded into the weights: a stored model's ADAPTER layers, then each "
                "--adapter. The tokenizer travels as `corral convert` carries it.")
    p.add_argument("checkpoint", help="a step directory (checkpoints/step_00000100) or a run directory; with "
                                      "--merge a model path or stored name")
    p.add_argument("out", help="output directory (hf, meta) or file (gguf)")
    p.add_argument("--format", choices=["hf", "meta", "gguf"], default="hf", help="output format (default: hf)")
    p.add_argument("--qtype", choices=["F32", "F16", "Q8_0"], default="F32", help="GGUF weight type (default: F32)")
    p.add_argument("--merge", action="store_true",
                   help="merge the model's LoRA adapters (stored ADAPTER layers and --adapter) into its weights")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH",
                   help="a PEFT adapter directory or GGUF LoRA file to merge (repeatable; implies --merge)")
