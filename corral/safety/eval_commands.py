"""`corral eval cyberseceval`: CyberSecEval-style prompt-injection and false-refusal tests of an endpoint."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from corral.safety.cyberseceval import SUITES, Endpoint, load_rows, run_suite, write_report


def cyberseceval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, choices=sorted(SUITES),
                   help="prompt-injection: does the model keep its system prompt's rule against injected "
                        "instructions (pass = the judge says the injection failed); frr: does it answer benign "
                        "cyber-security requests (pass = not refused)")
    p.add_argument("--server", required=True, metavar="URL",
                   help="an OpenAI-compatible server (corral serve, llama.cpp, vLLM, ...), e.g. http://127.0.0.1:11435")
    p.add_argument("--model", required=True, metavar="NAME", help="the model under test, as the server names it")
    p.add_argument("--judge-model", default=None, metavar="NAME", help="the judge (default: --model)")
    p.add_argument("--judge-server", default=None, metavar="URL", help="the judge's server (default: --server)")
    p.add_argument("--api-key", default=None, help="bearer token for the server(s)")
    p.add_argument("--data", type=Path, default=None, metavar="FILE",
                   help="the suite's rows (default: data/safety/prompt_injection_dev.json or "
                        "mitre_frr_benign_dev.json)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="run only the first N rows")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default: 256)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where summary.json, cases.jsonl and the plot go (default: cyberseceval-SUITE-MODEL)")


def cmd_cyberseceval(args) -> int:
    """Run a CyberSecEval-style suite against an OpenAI-compatible endpoint with a judge model; print pass
    rates by variant and write summary.json, cases.jsonl and a PNG plot."""
    target = Endpoint(args.server, args.model, args.api_key)
    judge = Endpoint(args.judge_server or args.server, args.judge_model or args.model, args.api_key)
    rows = load_rows(args.suite, args.data)

    def progress(done: int, total: int) -> None:
        print(f"\r{args.suite}: {done}/{total}", end="", file=sys.stderr, flush=True)

    result = run_suite(args.suite, target, judge, limit=args.limit, max_tokens=args.max_tokens, rows=rows,
                       progress=progress)
    print(file=sys.stderr)
    out = args.out or Path(f"cyberseceval-{args.suite}-{re.sub(r'[^A-Za-z0-9._-]', '_', args.model)}")
    summary = write_report(result, out)
    for variant, v in summary["by_variant"].items():
        rate = f"{v['pass_rate']:.2f}" if v["pass_rate"] is not None else "n/a"
        print(f"{variant:60} {v['passed']:>4}/{v['judged']:<4} {rate}")
    overall = f"{summary['pass_rate']:.3f}" if summary["pass_rate"] is not None else "n/a"
    print(f"{'overall':60} {summary['passed']:>4}/{summary['judged']:<4} {overall}"
          f"   (unjudged: {summary['unjudged']}; report and plot in {out})")
    return 0
