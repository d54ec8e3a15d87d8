"""The ``corral`` command. COMMANDS at the bottom is the whole registry: every subcommand, its handler,
the function that adds its arguments, and its one-line help, each from the module that owns the work.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from corral import repl
from corral.bench import harness as bench
from corral.data import commands as data
from corral.errors import CorralError, FormatError
from corral.eval import commands as evaluation
from corral.posttrain import commands as posttrain
from corral.safety import code_commands as codeshield
from corral.safety import commands as safety
from corral.safety import eval_commands as safety_eval
from corral.server import commands as server
from corral.store import commands as store
from corral.train import commands as train
from corral.train import scaling_commands as scaling


def _add_model_and_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default: 0.6, Meta's reference)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per answer (default: 256)")
    p.add_argument("--seed", type=int, default=None, help="fix the sampler's seed for reproducible output")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default: 0, off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens under min_p x the top probability")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already seen (default: 1.0, off; 1.1 is common)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weight dtype after loading (default: float32)")
    p.add_argument("--quant", choices=["gguf", "none", "int8", "int4"], default=None,
                   help="weights: gguf (run a GGUF's own 4/8-bit blocks: the default for GGUF files), none "
                        "(widen to float32), int8 or int4 (weight-only quantized)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster tokens after a compile of a few minutes")
    p.add_argument("--speculate", default=None, metavar="lookup|DRAFT",
                   help="speculative greedy decoding: 'lookup' (prompt n-grams) or a draft model path")


def minilm_embed(texts: list[str]):
    """all-MiniLM-L6-v2 sentence vectors (N, 384) as numpy, for semantic_dedup; the encoder loads once per
    process. Module-level, so executors pickle it by reference to their workers."""
    return _minilm().encode(texts).numpy()


@functools.cache
def _minilm():
    from corral.embed.minilm import SentenceEncoder

    return SentenceEncoder.load()


def cmd_curate(args) -> int:
    """corral curate with the embedding model wired in (corral.data may not import corral.embed)."""
    return data.cmd_curate(args, embed=minilm_embed)


def _load(args):
    import torch

    import corral

    dtype = getattr(torch, args.dtype) if args.dtype else None
    started = time.perf_counter()
    llm = corral.load(args.model, dtype=dtype, quant=args.quant, compile=args.compile, speculate=args.speculate)
    if args.verbose:
        print(f"[loaded {llm.name} in {time.perf_counter() - started:.2f} s]", file=sys.stderr)
    return llm


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                repetition_penalty=args.repeat_penalty, max_new_tokens=args.max_tokens, seed=args.seed)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args) -> int:
    """Continue a prompt as plain text (no chat template), or answer it as a chat turn with --chat."""
    llm = _load(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        result = llm.chat(messages + [{"role": "user", "content": args.prompt}], on_text=_write, **_sampling(args))
    else:
        _write(args.prompt)
        result = llm.generate(args.prompt, on_text=_write, stop=args.stop, **_sampling(args))
    _write("\n")
    if args.verbose:
        secs = result.timings["seconds"]
        print(f"[{len(result.token_ids)} tokens in {secs:.2f} s, {len(result.token_ids) / max(secs, 1e-9):.1f} tok/s,"
              f" finish_reason={result.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """Chat with a model file in the terminal (the `corral run` loop: /? for help, /bye or Ctrl+D quits)."""
    from corral.llm import default_model_path
    from corral.store import Store

    llm = _load(args)
    options = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
               "repeat_penalty": args.repeat_penalty, "num_predict": args.max_tokens, "seed": args.seed}
    session = repl.Session(llm.name, llm, {k: v for k, v in options.items() if v is not None}, args.system,
                           from_=str(args.model or default_model_path()))
    return repl.repl(Store(), session)


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_or_prompt", nargs="+", metavar="[MODEL] PROMPT",
                   help="optional model path, then the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="print load time and tokens/s to stderr")
    _add_model_and_sampling(p)


def chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model path (default: embedded SmolLM2)")
    p.add_argument("--system", default=None, help="system message for the whole conversation")
    p.add_argument("-v", "--verbose", action="store_true", help="print load time to stderr")
    _add_model_and_sampling(p)


@dataclass(frozen=True)
class Command:
    handler: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None
    help: str
    aliases: tuple[str, ...] = ()


# name -> Command(handler, adds its arguments, help). "group step" names a step of a group in GROUPS.
COMMANDS: dict[str, Command] = {
    "generate": Command(cmd_generate, generate_arguments, "continue or answer one prompt and exit"),
    "chat": Command(cmd_chat, chat_arguments, "interactive chat in the terminal"),
    "run": Command(repl.cmd_run, repl.run_arguments, "chat with a stored model, or answer one prompt"),
    "create": Command(store.cmd_create, store.create_arguments, "create a stored model from a Modelfile"),
    "import": Command(store.cmd_import, store.import_arguments,
                      "store a GGUF file, HF/Meta directory or .tar archive"),
    "list": Command(store.cmd_list, store.list_arguments, "list stored models", aliases=("ls",)),
    "show": Command(store.cmd_show, store.show_arguments, "show a stored model's details"),
    "cp": Command(store.cmd_cp, store.cp_arguments, "copy a model to a new name (no blob is copied)"),
    "rm": Command(store.cmd_rm, store.rm_arguments, "remove models; blobs no other model uses are deleted"),
    "verify": Command(store.cmd_verify, None, "re-hash every blob and check every manifest"),
    "ps": Command(store.cmd_ps, None, f"models a running server holds (CORRAL_HOST, default {store.DEFAULT_HOST})"),
    "pull": Command(store.cmd_pull, store.pull_arguments,
                    "copy a model in from a store directory, a .tar or a Corral server"),
    "push": Command(store.cmd_push, store.push_arguments,
                    "copy a model out to a store directory, a .tar or a Corral server"),
    "convert": Command(store.cmd_convert, store.convert_arguments, "write a model in another checkpoint format"),
    "quantize": Command(store.cmd_quantize, store.quantize_arguments,
                        "quantize a model: GGUF Q4_K_M/Q5_K_M/Q6_K/Q8_0/Q4_0, or runtime int8/int4"),
    "pretrain": Command(evaluation.cmd_pretrain, evaluation.pretrain_arguments,
                        "pretrain a Llama 3 model from a TOML config (--eval-tasks: benchmarks as it trains)"),
    "finetune": Command(posttrain.cmd_finetune, posttrain.finetune_arguments,
                        "fine-tune a model (SFT, reward model, DPO) from a TOML config"),
    "export": Command(train.cmd_export, train.export_arguments, "export a trained checkpoint as hf, meta or gguf"),
    "scaling sweep": Command(scaling.cmd_sweep, scaling.sweep_arguments, "train the grid of small models"),
    "scaling fit": Command(scaling.cmd_fit, scaling.fit_arguments, "fit the law, draw it, predict the target"),
    "scaling check": Command(scaling.cmd_check, scaling.check_arguments,
                             "train the held-out target and report the prediction error"),
    "bench": Command(bench.cmd_bench, bench.add_arguments, "benchmark Corral against llama.cpp and transformers"),
    "curate": Command(cmd_curate, data.curate_arguments,
                      "filter, dedup and clean text shards as a TOML pipeline says (local or Ray)"),
    "mix": Command(data.cmd_mix, data.mix_arguments, "weight curated sources into pretraining token shards"),
    "serve": Command(server.cmd_serve, server.serve_arguments, "run the OpenAI/Ollama-compatible HTTP server"),
    "eval run": Command(evaluation.cmd_eval, evaluation.eval_arguments,
                        "score a model on benchmark tasks (also `corral eval MODEL --tasks ...`)"),
    "eval compare": Command(evaluation.cmd_compare, evaluation.compare_arguments,
                            "compare results JSON files: a table and a bar plot"),
    "eval contamination": Command(evaluation.cmd_contamination, evaluation.contamination_arguments,
                                  "13-gram overlap between training data and each task's data"),
    "codeshield": Command(codeshield.cmd_codeshield, codeshield.codeshield_arguments,
                          "scan code for insecure patterns (exit 1 when found, 0 clean, 2 error)"),
    "eval cyberseceval": Command(safety_eval.cmd_cyberseceval, safety_eval.cyberseceval_arguments,
                            "CyberSecEval-style prompt-injection / false-refusal tests of an OpenAI-compatible server"),

    "guard": Command(safety.cmd_guard, safety.guard_arguments, "assess text or conversations with a safety guard"),
}
# group -> (help, description) for the group's own `corral GROUP --help`.
GROUPS = {
    "scaling": ("scaling laws: sweep small models, fit L(N, D), check a larger run", scaling.__doc__.splitlines()[0]),
    "eval": ("evaluate models: benchmark tasks, comparisons, contamination",
             evaluation.__doc__.splitlines()[0] + " `corral eval MODEL ...` is `corral eval run MODEL ...`."),
}
# group -> the step `corral GROUP ...` runs when the next word names none of its steps.
DEFAULT_STEPS = {"eval": "run"}


def _add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    steps: dict[str, argparse._SubParsersAction] = {}
    for name, command in COMMANDS.items():
        group, _, step = name.rpartition(" ")
        where = sub
        if group:
            if group not in steps:
                help, description = GROUPS[group]
                parser = sub.add_parser(group, help=help, description=description)
                metavar = "{" + ",".join(n.split(" ")[1] for n in COMMANDS if n.startswith(group + " ")) + "}"
                steps[group] = parser.add_subparsers(dest=f"{group}_command", required=True, metavar=metavar)
            where = steps[group]
        p = where.add_parser(step, help=command.help, description=command.handler.__doc__ or command.help,
                             parents=[common], aliases=list(command.aliases))
        if command.arguments is not None:
            command.arguments(p)
        p.set_defaults(handler=command.handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Corral: run, serve and train Llama-family models on your own machine.",
        epilog="MODEL is a GGUF file, an HF directory (config.json + safetensors) or a Meta directory "
        "(params.json + consolidated.*.pth). Without MODEL, the embedded SmolLM2-135M-Instruct is used. "
        "Stored models live under $CORRAL_HOME (default ~/.corral); see `corral run`, `corral list`.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # --debug is also accepted after the command name; SUPPRESS keeps it from resetting the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_commands(sub, common)
    return parser


def _one_line(exc: BaseException) -> str:
    """The error for a terminal: a FormatError's message leaves out its file (so a server never leaks a
    path), the CLI puts it back in front."""
    path = getattr(exc, "path", None) if isinstance(exc, FormatError) else None
    text = f"{path}: {exc}" if path else str(exc)
    return " ".join(text.split())  # one line, whatever the message held


def _with_default_step(argv: list[str]) -> list[str]:
    """`corral eval MODEL --tasks x` -> `corral eval run MODEL --tasks x` (DEFAULT_STEPS)."""
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), None)
    if at is None or argv[at] not in DEFAULT_STEPS:
        return argv
    steps = {name.split(" ")[1] for name in COMMANDS if name.startswith(argv[at] + " ")}
    following = argv[at + 1] if at + 1 < len(argv) else None
    if following in steps or following in ("-h", "--help"):
        return argv
    return argv[:at + 1] + [DEFAULT_STEPS[argv[at]]] + argv[at + 1:]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_with_default_step(list(sys.argv[1:] if argv is None else argv)))
    if args.command == "generate":
        words = args.model_or_prompt
        if len(words) > 2:
            parser.error("generate takes [MODEL] PROMPT; quote the prompt")
        args.model, args.prompt = (words[0], words[1]) if len(words) == 2 else (None, words[0])
    try:
        return args.handler(args)
    except (CorralError, OSError) as exc:
        # OSError: a missing Modelfile, a full disk, a permission: the user's to fix, so one line too.
        if args.debug:
            raise
        print(f"corral: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
