"""The ``corral`` command. COMMANDS at the bottom is the whole registry."""

from __future__ import annotations

import argparse
import inspect
import sys
import time

from corral.errors import CorralError, FormatError


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
    """A simple chat REPL: type a message, get a streamed answer; /clear forgets, /bye (or Ctrl+D) quits."""
    llm = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("Chatting with", llm.name, "- /clear to forget, /bye to quit.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if line.strip() in ("/bye", "/exit", "/quit"):
            return 0
        if line.strip() == "/clear":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            result = llm.chat(system + history, on_text=_write, **_sampling(args))
        except KeyboardInterrupt:
            history.pop()
            print("\n[stopped]", file=sys.stderr)
            continue
        _write("\n")
        history.append({"role": "assistant", "content": result.text})


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
}
# Modules that add their own subcommands (``add_parsers(sub)``); a module not written yet is skipped.
SUBCOMMAND_MODULES = (
    "corral.repl",
    "corral.store.commands",
    "corral.train.commands",
    "corral.train.scaling_commands",
    "corral.benchmark",
    "corral.server.commands",
)


def _add_module_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    import importlib
    import importlib.util

    for module_name in SUBCOMMAND_MODULES:
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ModuleNotFoundError:
            continue
        module = importlib.import_module(module_name)
        params = inspect.signature(module.add_parsers).parameters
        module.add_parsers(sub, [common]) if "parents" in params else module.add_parsers(sub)


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

    gen = sub.add_parser("generate", help="continue or answer one prompt and exit", description=cmd_generate.__doc__,
                         parents=[common])
    gen.add_argument("model_or_prompt", nargs="+", metavar="[MODEL] PROMPT",
                     help="optional model path, then the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("-v", "--verbose", action="store_true", help="print load time and tokens/s to stderr")
    _add_model_and_sampling(gen)
    gen.set_defaults(handler=COMMANDS["generate"])

    chat = sub.add_parser("chat", help="interactive chat in the terminal", description=cmd_chat.__doc__,
                          parents=[common])
    chat.add_argument("model", nargs="?", default=None, help="model path (default: embedded SmolLM2)")
    chat.add_argument("--system", default=None, help="system message for the whole conversation")
    chat.add_argument("-v", "--verbose", action="store_true", help="print load time to stderr")
    _add_model_and_sampling(chat)
    chat.set_defaults(handler=COMMANDS["chat"])
    _add_module_parsers(sub, common)
    return parser


def _one_line(exc: BaseException) -> str:
    """The error for a terminal: a FormatError's message leaves out its file (so a server never leaks a
    path), the CLI puts it back in front."""
    path = getattr(exc, "path", None) if isinstance(exc, FormatError) else None
    text = f"{path}: {exc}" if path else str(exc)
    return " ".join(text.split())  # one line, whatever the message held


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
