"""Corral's Code Shield against Meta's codeshield 1.0.1 on the dev fixtures: `python bench/codeshield.py`.

One run, both scanners, the same snippets (data/code/insecure_code_fixtures_dev.jsonl, 95 insecure
and 101 secure): recall on insecure, false positives on secure, and scan time per snippet (p50, p99)
and per KB, then Corral / codeshield ratios. codeshield runs in its own venv (semgrep 1.100.0 pins
clash with Corral's), found at .venv/peers/codeshield under the repo root or under sys.prefix; it is
driven by scripts/codeshield_peer.py in a subprocess, which times each `scan_code` call.

Options: --limit N (first N rows only), --repeats N (Corral timings: median of N scans per snippet),
--json (one JSON object instead of the table), --golden PATH (use recorded codeshield results when
its venv is absent; its timings are then the recorded ones).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "data" / "code" / "insecure_code_fixtures_dev.jsonl"
GOLDEN = ROOT / "tests" / "golden" / "codeshield_1.0.1_dev.jsonl"
PEER_SCRIPT = ROOT / "scripts" / "codeshield_peer.py"


def peer_python() -> Path | None:
    """The codeshield venv's interpreter (Makefile PEERS), or None when it is not built."""
    for base in (ROOT / ".venv", Path(sys.prefix)):
        python = base / "peers" / "codeshield" / "bin" / "python"
        if python.exists():
            return python
    return None


def run_peer(fixtures: Path, limit: int | None = None, timeout: float = 1800) -> list[dict]:
    """codeshield's result per row ({id, insecure, seconds, issues}) from the peer runner."""
    python = peer_python()
    if python is None:
        raise FileNotFoundError("codeshield's venv is not built (make setup builds .venv/peers/codeshield)")
    cmd = [str(python), str(PEER_SCRIPT), str(fixtures)] + (["--limit", str(limit)] if limit else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def load_rows(limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in FIXTURES.read_text().splitlines() if line.strip()]
    return rows[:limit]


def run_corral(rows: list[dict], repeats: int = 5) -> list[dict]:
    """Corral's result per row, timed as the median of `repeats` scans (rules loaded once beforehand)."""
    from corral.safety.code_scan import scan

    scan("x = 1", "python")  # load and compile the rule files outside the timings
    out = []
    for row in rows:
        times, result = [], None
        for _ in range(repeats):
            started = time.perf_counter()
            result = scan(row["snippet"], row["language"])
            times.append(time.perf_counter() - started)
        out.append({"id": row["id"], "insecure": result.insecure, "seconds": statistics.median(times),
                    "issues": [f.to_dict() for f in result.findings]})
    return out


def bulk_ms_per_kb(rows: list[dict], copies: int = 20) -> dict[str, float]:
    """Corral on one larger file per language (the language's snippets, `copies` times over): ms per KB,
    best of 3. Per-snippet figures include a fixed per-call cost; this is the scanning rate itself."""
    from corral.safety.code_scan import scan

    out = {}
    for language in sorted({r["language"] for r in rows}):
        text = "\n".join(r["snippet"] for r in rows if r["language"] == language) * copies
        best = min(_timed(lambda: scan(text, language)) for _ in range(3))
        out[language] = 1e3 * best / (len(text.encode()) / 1024)
    return out


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def score(rows: list[dict], results: list[dict]) -> dict:
    by_id = {r["id"]: r for r in results}
    label = {r["id"]: r["label"] for r in rows}
    flagged = [i for i in label if by_id[i]["insecure"]]
    seconds = sorted(by_id[i]["seconds"] for i in label)
    kb = sum(len(r["snippet"].encode()) for r in rows) / 1024
    return {
        "insecure": sum(v == "insecure" for v in label.values()),
        "secure": sum(v == "secure" for v in label.values()),
        "recall": sum(label[i] == "insecure" for i in flagged),
        "false_positives": sum(label[i] == "secure" for i in flagged),
        "p50_ms": 1e3 * seconds[len(seconds) // 2],
        "p99_ms": 1e3 * seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))],
        "ms_per_kb": 1e3 * sum(seconds) / kb,
    }


def table(corral: dict, peer: dict, peer_source: str) -> str:
    lines = [f"{'':26}{'corral':>12}{'codeshield':>12}{'ratio':>10}   (codeshield: {peer_source})"]
    for key, fmt in (("recall", "d"), ("false_positives", "d"), ("p50_ms", ".3f"), ("p99_ms", ".3f"),
                     ("ms_per_kb", ".3f")):
        a, b = corral[key], peer[key]
        ratio = f"{a / b:.4f}" if b else "-"
        label = f"{key} (of {corral['insecure'] if key == 'recall' else corral['secure']})" \
            if key in ("recall", "false_positives") else key
        lines.append(f"{label:26}{a:>12{fmt}}{b:>12{fmt}}{ratio:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--golden", type=Path, default=None, help="recorded codeshield results (when its venv is absent)")
    args = p.parse_args(argv)
    rows = load_rows(args.limit)
    corral = score(rows, run_corral(rows, args.repeats))
    if peer_python() is not None:
        peer_results, source = run_peer(FIXTURES, args.limit), "live, codeshield 1.0.1 + semgrep 1.100.0"
    elif args.golden is not None:
        wanted = {r["id"] for r in rows}
        peer_results = [json.loads(line) for line in args.golden.read_text().splitlines() if line.strip()]
        peer_results, source = [r for r in peer_results if r["id"] in wanted], f"recorded, {args.golden.name}"
    else:
        print("codeshield's venv is not built (make setup); pass --golden to compare with recorded results",
              file=sys.stderr)
        return 2
    peer = score(rows, peer_results)
    bulk = bulk_ms_per_kb(rows)
    if args.json:
        print(json.dumps({"corral": corral, "codeshield": peer, "codeshield_source": source,
                          "corral_bulk_ms_per_kb": bulk}))
    else:
        print(table(corral, peer, source))
        print("corral on one larger file per language, ms per KB: "
              + ", ".join(f"{lang} {ms:.3f}" for lang, ms in bulk.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
