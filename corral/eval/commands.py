"""`corral eval`: score a model on benchmark tasks; `corral eval compare`; `corral eval contamination`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from corral.errors import ConfigError
from corral.eval import results
from corral.eval.tasks import TASKS, parse_task_list

DEFAULT_TASKS = "hellaswag,arc_easy,arc_challenge,piqa,boolq,winogrande"


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="a GGUF file, HF or Meta directory, or stored model name (default: the embedded SmolLM2)")
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help=f"comma-separated task names (default: {DEFAULT_TASKS}); known: {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    p.add_argument("--shots", type=int, default=None,
                   help="few-shot examples per question (default: each task's own, MMLU 5, others 0)")
    p.add_argument("--chat", action="store_true",
                   help="generation tasks: ask through the chat template (log-likelihood tasks score plain text)")
    p.add_argument("--samples", type=int, default=1,
                   help="generation tasks: completions per prompt (1 = greedy pass@1; n > 1 samples at T=0.8 and "
                        "reports pass@k for k <= n)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="score through an OpenAI-compatible server (/v1/completions with echo + logprobs)")
    p.add_argument("--model", dest="server_model", default=None, metavar="NAME", help="the model name on --server")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per server request before a retry")
    p.add_argument("--quant", choices=["gguf", "none", "int8", "int4"], default=None,
                   help="weights: gguf (a GGUF's own blocks, the default for GGUF files) or none (float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=32, help="continuations scored per forward")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draws")
    p.add_argument("--data-dir", default=None, help="task data directory (default: $CORRAL_EVAL_DATA or data/eval)")
    p.add_argument("--text", default=None, help="the perplexity task's text file (default: a held-out corpus file)")
    p.add_argument("--output", default=None, metavar="results.json", help="write the results JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def open_backend(args: argparse.Namespace):
    """The scoring backend: an OpenAI-compatible server, a model path, or a stored model name."""
    from corral.eval.loglik import LocalModel

    if args.server:
        from corral.eval.server_backend import ServerModel

        if not args.server_model:
            raise ConfigError("--server needs --model NAME (the model's name on that server)")
        return ServerModel(args.server, args.server_model, timeout=args.timeout)
    return LocalModel.from_llm(open_model(args.model, args.quant), batch_size=args.batch_size)


def open_model(spec: str | None, quant: str | None = None):
    """corral.load for a path (or the embedded model), else the store's model of that name."""
    import corral

    if spec is None or Path(spec).exists():
        return corral.load(spec, quant=quant)
    from corral.store import Store
    from corral.store.load import ensure_default, is_default, load_stored

    store = Store()
    if is_default(spec):
        ensure_default(store)
    return load_stored(store, spec, quant=quant)[0]


def _progress_bar(enabled: bool):
    from tqdm import tqdm

    bars = []

    def progress_for(task, total: int):
        if bars:
            bars[-1].close()
        bars.append(tqdm(total=total, desc=task.name, unit="req", disable=not enabled, file=sys.stderr))
        return bars[-1].update

    return progress_for, bars


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a model on benchmark tasks; print a markdown table (and write a results JSON with --output).

    Multiple-choice tasks report acc and length-normalised acc_norm as lm-evaluation-harness defines them;
    perplexity reports word/byte perplexity and bits per byte. Prompts longer than the model's context keep
    their end (a warning says how many tokens were dropped).
    """
    from corral.eval.runner import EvalSettings, evaluate

    task_list = parse_task_list(args.tasks)  # an unknown name fails before any model loads
    if args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    backend = open_backend(args)
    settings = EvalSettings(limit=args.limit, shots=args.shots, seed=args.seed, data_dir=args.data_dir,
                            text=args.text, samples=args.samples, chat=args.chat)
    config = {"backend": "server" if args.server else "local", "server": args.server, "quant": args.quant,
              "chat": args.chat, "threads": args.threads, "batch_size": args.batch_size}
    progress_for, bars = _progress_bar(not args.no_progress)
    with warnings.catch_warnings():
        warnings.simplefilter("once")  # one truncation warning per place, not one per request
        report = evaluate(backend, task_list, settings, config=config, progress_for=progress_for).to_json()
    for bar in bars:
        bar.close()
    if args.output:
        results.write_report(report, args.output)
    print(results.markdown_table(report))
    return 0


def compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="results JSON files written by `corral eval --output`")
    p.add_argument("--plot", default="eval_compare.png", help="bar plot PNG to write (default: eval_compare.png)")


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare results JSON files: a markdown table (value ± stderr per run) and a grouped bar plot."""
    print(results.compare(args.results, args.plot))
    print(f"\nplot: {args.plot}", file=sys.stderr)
    return 0


def contamination_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", nargs="+", required=True,
                   help="training text: .txt/.jsonl files, or token shard files/directories (decoded)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="tasks whose data to check")
    p.add_argument("--n", type=int, default=13, help="n-gram length in words (default: 13, as GPT-3 and Llama)")
    p.add_argument("--data-dir", default=None, help="task data directory")
    p.add_argument("--output", default=None, help="write the report as JSON")


def cmd_contamination(args: argparse.Namespace) -> int:
    """How many examples of each task share an n-gram (13 words by default) with the training data."""
    from corral.eval.contamination import contamination_report, format_report

    report = contamination_report(args.train, parse_task_list(args.tasks), n=args.n, data_dir=args.data_dir)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    return 0


def pretrain_arguments(p: argparse.ArgumentParser) -> None:
    from corral.train.commands import pretrain_arguments as train_arguments

    train_arguments(p)
    p.add_argument("--eval-tasks", default=None, metavar="TASKS",
                   help="score these tasks each time the run validates; logged to TensorBoard as eval/TASK/METRIC")
    p.add_argument("--eval-limit", type=int, default=None, help="examples per task for --eval-tasks")


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pretrain a Llama 3 model as a TOML config says; --section.key=value overrides any field."""
    from corral.eval.during_training import task_callback
    from corral.train.commands import cmd_pretrain as train_pretrain

    picker = argparse.ArgumentParser(add_help=False)  # the options may also sit among the config overrides
    picker.add_argument("--eval-tasks", default=args.eval_tasks)
    picker.add_argument("--eval-limit", type=int, default=args.eval_limit)
    picked, args.overrides = picker.parse_known_args(args.overrides)
    hook = task_callback(parse_task_list(picked.eval_tasks), picked.eval_limit) if picked.eval_tasks else None
    return train_pretrain(args, on_evaluate=hook)
