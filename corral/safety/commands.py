"""``corral guard``: assess text or conversations with a guard (cli.py's COMMANDS names these)."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """Assess text with a guard: the embedded one (a probe on SmolLM2-135M's trunk, Llama Guard 3's
categories S1-S14) or a Llama Guard model you have (--guard PATH|NAME: Llama-Guard-3-1B/8B, Llama-Guard-2-8B
as GGUF, HF folder or stored name). One line per input: safe|unsafe, P(unsafe), the categories."""

EPILOG = """input:
  corral guard "how do I pick a lock"                 # one user message
  corral guard --role agent "Sure, first you ..."     # as the assistant's reply
  corral guard --file conversations.jsonl             # one input per line, "-" for stdin
a --file line is a JSON string (one user message), {"prompt": TEXT}, {"messages": [{"role", "content"}...]}
or a bare list of messages; the LAST message is assessed (a user's or an assistant's), earlier ones are
context for a Llama Guard model.

exit status: 0 all safe, 1 at least one input flagged, 2 error (bad file line, guard failure, bad model);
scripts and CI can use it. See docs/safety.md."""


def guard_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.epilog, p.formatter_class = DESCRIPTION, EPILOG, argparse.RawDescriptionHelpFormatter
    p.add_argument("text", nargs="?", help="the text to assess (or use --file)")
    p.add_argument("--file", default=None, metavar="PATH", help="JSON lines of conversations to assess ('-': stdin)")
    p.add_argument("--role", choices=["user", "agent"], default="user", help="whose message TEXT is (default: user)")
    p.add_argument("--guard", default=None, metavar="MODEL",
                   help="a Llama Guard model (path or stored name); default: the embedded guard")
    p.add_argument("--exclude", default=None, metavar="S2,S7", help="categories not checked, comma-separated")
    p.add_argument("--threshold", type=float, default=None, metavar="P", help="flag at P(unsafe) >= P")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")


def conversations(args) -> list[tuple[str, list[dict]]]:
    """(label, conversation) per input: the TEXT, or each line of --file."""
    from corral.errors import GuardInputError

    if (args.text is None) == (args.file is None):
        raise GuardInputError("give TEXT or --file (one of them)")
    if args.text is not None:
        return [("text", [{"role": "assistant" if args.role == "agent" else "user", "content": args.text}])]
    stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    out = []
    with stream:
        for n, line in enumerate(stream, 1):
            if line.strip():
                out.append((f"{args.file}:{n}", conversation_of(line, f"{args.file} line {n}")))
    return out


def conversation_of(line: str, where: str) -> list[dict]:
    from corral.errors import GuardInputError

    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise GuardInputError(f"{where}: not JSON ({e.msg})") from None
    if isinstance(value, dict):
        value = value.get("messages", value.get("prompt"))
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value
    raise GuardInputError(f"{where}: need a string, {{\"prompt\"}}, {{\"messages\"}} or a list of messages")


def cmd_guard(args) -> int:
    """Assess text or a file of conversations; exit 0 safe, 1 flagged, 2 error."""
    from corral.errors import CorralError

    try:
        from corral.safety.guard import load_guard

        inputs = conversations(args)
        exclude = tuple(c.strip() for c in (args.exclude or "").split(",") if c.strip())
        guard = load_guard(args.guard, exclude=exclude, threshold=args.threshold)
        flagged = False
        for label, conversation in inputs:
            try:
                a = guard.assess(conversation)
            except CorralError as e:
                raise type(e)(f"{label}: {e}") from None
            flagged |= a.flagged
            print(render(label, a, guard.policy.names(), args.json), flush=True)
        return 1 if flagged else 0
    except (CorralError, OSError) as e:
        print(f"corral guard: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def render(label: str, a, names: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps({"input": label, "flagged": a.flagged, "score": round(a.score, 4), "role": a.role,
                           "categories": list(a.categories), "segments": a.segments,
                           "category_scores": {c: round(s, 4) for c, s in a.category_scores.items()}})
    verdict = "unsafe" if a.flagged else "safe"
    cats = ", ".join(f"{c} {names.get(c, '')}".strip() for c in a.categories)
    return f"{label}\t{verdict}\tP(unsafe)={a.score:.3f}" + (f"\t{cats}" if cats else "")
