"""Run Meta's codeshield (the test-only peer) over a JSONL file of snippets and print one JSON line each.

Runs under the peer's own interpreter, never Corral's (codeshield pins semgrep 1.100.0, whose
dependencies clash with Corral's):

    .venv/peers/codeshield/bin/python scripts/codeshield_peer.py FIXTURES.jsonl [--limit N]

Input rows: {"id", "language", "snippet"}. Output rows: {"id", "insecure", "treatment", "seconds",
"issues": [{"rule", "cwe", "severity", "line"}]}. `seconds` is the wall time of one `scan_code`
call (semgrep runs as a subprocess per snippet, so this is what a server using codeshield pays).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixtures", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="scan only the first N rows")
    parser.add_argument("--no-language", action="store_true",
                        help="scan without the row's language (codeshield then runs every language's rules)")
    args = parser.parse_args()
    # semgrep is a console script of the peer venv: put its bin first so codeshield's subprocess finds it.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    logging.disable(logging.CRITICAL)
    from codeshield.cs import CodeShield
    from codeshield.insecure_code_detector.languages import Language

    rows = [json.loads(line) for line in args.fixtures.read_text().splitlines() if line.strip()]
    for row in rows[: args.limit]:
        started = time.perf_counter()
        result = asyncio.run(CodeShield.scan_code(row["snippet"], None if args.no_language
                                                       else Language(row["language"])))
        seconds = time.perf_counter() - started
        issues = [{"rule": i.pattern_id or i.rule, "cwe": i.cwe_id, "severity": str(i.severity), "line": i.line}
                  for i in result.issues_found or []]
        print(json.dumps({"id": row["id"], "insecure": result.is_insecure,
                          "treatment": result.recommended_treatment.value, "seconds": round(seconds, 4),
                          "issues": issues}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
