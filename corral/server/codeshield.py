"""`corral serve --code-shield block|warn`: scan the fenced code blocks of every answer as it streams.

A stream filter (corral.server.generation): prose passes straight through; a code block is scanned
with corral.safety.code_scan when its closing fence arrives (or the answer ends inside it).

    block: the block is held back while it streams; one with an error-severity finding is replaced by
           a notice, one with only warnings is released with a warning appended after it
    warn:  code streams as it comes; a warning is appended after each block with findings

Either way each sample's findings go back in the response: `code_shield` in the OpenAI choice (the
last chunk's, when streaming) and on Ollama's final line (`report()` below; clients ignore the field).
"""

from __future__ import annotations

import re

from corral.safety.code_scan import scan
from corral.safety.code_text import LANGUAGE_NAMES, guess_language

MODES = ("block", "warn")
_OPEN = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})[ \t]*([^\s`]{0,32})[^\n`]{0,200}\n")
# what the start of a line can be while it may still turn out to be a fence: ``, ```py, ~~~
_FENCE_PREFIX = re.compile(r"[ \t]{0,3}(?:`{3,64}[^\n`]{0,232}|~{3,64}[^\n]{0,232}|`{0,2}|~{0,2})")


class CodeShieldFilter:
    """The server-wide filter: no input check, a CodeShieldOutput per sample."""

    def __init__(self, mode: str = "block"):
        if mode not in MODES:
            raise ValueError(f"code shield mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def check_input(self, prompt) -> None:
        return None

    def output(self) -> CodeShieldOutput:
        return CodeShieldOutput(self.mode)


def _notice(findings: list[dict], blocked: bool) -> str:
    """A markdown quote after (or instead of) the block; `findings` carry the reply's line numbers."""
    first = findings[0]
    more = f" and {len(findings) - 1} more" if len(findings) > 1 else ""
    what = "withheld a code block" if blocked else "warning: the code above may be insecure"
    where = f"{first['rule']} ({first['cwe']}, line {first['line']}: {first['message']})"
    return f"\n> Code Shield {what}: {where}{more}.\n"


class CodeShieldOutput:
    """One sample's text, line by line: a line that could still become a fence is held until it ends."""

    def __init__(self, mode: str):
        self.mode = mode
        self.pending = ""  # the current line, not yet passed on (it may open or close a fence)
        self.mid_line = False  # part of the current line already went out: it cannot be a fence
        self.fence: str | None = None  # the open block's fence (``` or ~~~ run), None outside blocks
        self.tag = ""
        self.held: list[str] = []  # block mode: the open block's lines, fence included
        self.code: list[str] = []  # the open block's code lines (both modes, for the scan)
        self.lines_seen = 0  # complete lines passed, so findings can carry the reply's line numbers
        self.block_line = 0
        self.findings: list[dict] = []
        self.blocked = 0

    # -- the OutputFilter protocol ---------------------------------------------------------------------
    def push(self, text: str) -> str:
        out: list[str] = []
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            out.append(self._line(line + "\n"))
        if self.pending and (self.mid_line or not _FENCE_PREFIX.fullmatch(self.pending)):
            out.append(self._partial(self.pending))
            self.pending, self.mid_line = "", True
        return "".join(out)

    def finish(self) -> str:
        tail, self.pending = self.pending, ""
        if self.fence is None:
            return tail
        return self._partial(tail) + self._close("")  # an answer that ends inside a block: the block ends there

    def report(self) -> dict:
        return {"code_shield": {"mode": self.mode, "blocked": self.blocked, "findings": self.findings}}

    # -- lines -----------------------------------------------------------------------------------------
    def _partial(self, text: str) -> str:
        if self.fence is None:
            return text
        self.code.append(text)
        if self.mode == "block":
            self.held.append(text)
            return ""
        return text

    def _line(self, line: str) -> str:
        starts_line, self.mid_line = not self.mid_line, False
        self.lines_seen += 1
        if self.fence is None:
            m = _OPEN.fullmatch(line) if starts_line else None
            if m is None:
                return line
            self.fence, self.tag = m.group(1), m.group(2).lower()
            self.code, self.held, self.block_line = [], [line], self.lines_seen + 1
            return "" if self.mode == "block" else line
        if starts_line and line.strip() == self.fence[0] * len(line.strip()) and len(line.strip()) >= len(self.fence):
            self.held.append(line)
            return self._close(line)
        return self._partial(line)

    def _close(self, closing: str) -> str:
        """The block is complete: scan it and say what goes out in its place."""
        code, held, tag = "".join(self.code), "".join(self.held), self.tag
        self.fence, self.code, self.held = None, [], []
        language = LANGUAGE_NAMES.get(tag) or (guess_language(code) if tag in ("", "code") else None)
        found = scan(code, language).findings if language else []
        findings = [{**f.to_dict(), "line": f.line + self.block_line - 1} for f in found]
        self.findings += findings
        blocking = self.mode == "block" and any(f["severity"] == "error" for f in findings)
        self.blocked += blocking
        if blocking:
            return _notice(findings, blocked=True)
        shown = held if self.mode == "block" else closing  # warn mode sent the rest as it came
        return shown + (_notice(findings, blocked=False) if findings else "")
