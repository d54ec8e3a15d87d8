"""`corral codeshield FILE|-`: scan code for insecure patterns; exit 1 when any is found, 0 when clean,
2 when the input cannot be scanned (so scripts and CI can use it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from corral.errors import CodeScanError, CorralError
from corral.safety.code_scan import MAX_CHARS, Finding, ScanResult, normalize_language, scan, scan_reply
from corral.safety.code_text import LANGUAGE_NAMES, LANGUAGES

EXIT_CLEAN, EXIT_INSECURE, EXIT_ERROR = 0, 1, 2


def codeshield_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE|-", help="code files to scan; - reads standard input")
    p.add_argument("--language", default=None, metavar="LANG",
                   help=f"the code's language ({', '.join(LANGUAGES)}; also py, js, ts, rs, cs, c++...). Default: "
                        "from the file extension, else guessed from the code, else every language's rules")
    p.add_argument("--markdown", action="store_true",
                   help="the input is a model reply: scan its fenced ``` code blocks (default for .md files)")
    p.add_argument("--json", action="store_true", help="print each finding as a JSON line")
    p.epilog = "Exit status: 0 clean, 1 insecure code found, 2 error (unreadable, binary or unknown language)."


def _read(name: str) -> str:
    """At most MAX_CHARS + 1 characters: the scanner never looks further, so a huge file costs no more."""
    try:
        raw = sys.stdin.buffer.read(4 * MAX_CHARS + 4) if name == "-" else _read_head(Path(name))
    except OSError as exc:
        raise CodeScanError(f"{name}: cannot read: {exc.strerror or exc}") from None
    return raw.decode("utf-8", errors="replace")


def _read_head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4 * MAX_CHARS + 4)  # a UTF-8 character is at most 4 bytes


def _language(name: str, args) -> str | None:
    if args.language:
        return normalize_language(args.language)
    suffix = Path(name).suffix.lower().lstrip(".") if name != "-" else ""
    return LANGUAGE_NAMES.get(suffix)


def _scan_one(name: str, args) -> list[Finding]:
    code = _read(name)
    markdown = args.markdown or (name != "-" and Path(name).suffix.lower() in (".md", ".markdown"))
    if markdown:
        results = [b.result for b in scan_reply(code)]
    else:
        results = [scan(code, _language(name, args))]
    for result in results:
        _check(name, result)
    return [f for r in results for f in r.findings]


def _check(name: str, result: ScanResult) -> None:
    if result.skipped:
        raise CodeScanError(f"{name}: not scanned: {result.skipped}")
    if result.truncated:
        print(f"corral codeshield: {name}: only the first {MAX_CHARS} characters were scanned", file=sys.stderr)


def _print(name: str, findings: list[Finding], as_json: bool) -> None:
    for f in findings:
        if as_json:
            print(json.dumps({"file": name, **f.to_dict()}))
        else:
            print(f"{name}:{f.line}: {f.severity}: {f.rule} ({f.cwe}) {f.message}")


def cmd_codeshield(args) -> int:
    """Scan code (or the code blocks of a model reply) for insecure patterns with Code Shield's rules:
    prints each finding (line, rule, CWE, severity); exits 1 when insecure code is found, 0 when clean."""
    status = EXIT_CLEAN
    for name in args.files:
        try:
            findings = _scan_one(name, args)
        except CorralError as exc:  # exit 2, not the CLI's usual 1: 1 means "insecure" here
            print(f"corral codeshield: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        _print(name, findings, args.json)
        if findings:
            status = EXIT_INSECURE
    return status
