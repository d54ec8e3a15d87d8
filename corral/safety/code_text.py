"""Code as the scanner sees it: which language, where the code blocks are, and two masked views.

A rule must not fire on `eval(` inside a comment or a string, yet some rules need a string's content
(an `http://` URL, a `"SELECT ..."`). So each snippet gets two views of the same length and line
layout, made in one linear pass of a tokenizer regex:

    text: comments blanked (spaces, newlines kept)
    code: comments blanked and string contents blanked (quotes kept, so `f("...")` still shows a
          literal argument; a JS template's `${expr}` stays visible, since it is code)

Both views keep every offset, so a match's offset gives its line in the original.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Fence tags and file extensions -> the language names the rule files use.
LANGUAGE_NAMES: dict[str, str] = {
    "python": "python", "py": "python", "python3": "python", "py3": "python",
    "c": "c", "h": "c",
    "cpp": "cpp", "c++": "cpp", "cc": "cpp", "cxx": "cpp", "hpp": "cpp", "hh": "cpp", "hxx": "cpp",
    "java": "java",
    "javascript": "javascript", "js": "javascript", "jsx": "javascript", "mjs": "javascript", "cjs": "javascript",
    "node": "javascript", "typescript": "javascript", "ts": "javascript", "tsx": "javascript",
    "php": "php",
    "rust": "rust", "rs": "rust",
    "csharp": "csharp", "cs": "csharp", "c#": "csharp",
}
LANGUAGES = ("c", "cpp", "csharp", "java", "javascript", "php", "python", "rust")

# Pieces of each language's tokenizer, alternated in order. Every string pattern is an unrolled loop
# (`[^"\\\n]*(?:\\.[^"\\\n]*)*`), which never backtracks, and an unterminated comment or string runs
# to the end of its line (or of the text for /* ... */), so the pass is linear in the input.
_LINE = {"slash": r"//[^\n]*", "hash": r"#[^\n]*"}
_BLOCK = r"/\*(?:[^*]*\*+(?:[^/*][^*]*\*+)*/|[\s\S]*)"
_DQ = r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"?'
_SQ = r"'[^'\\\n]*(?:\\.[^'\\\n]*)*'?"
_CHAR = r"'(?:\\.|[^'\\\n])'"  # C, C#, Rust char literals; a Rust lifetime 'a stays code
_BACKTICK = r"`[^`\\]*(?:\\[\s\S][^`\\]*)*`?"
_PY_STRING = (r"(?i:[rbuf]{0,2})(?:'''[^'\\]*(?:(?:\\[\s\S]|'(?!''))[^'\\]*)*(?:'''|\Z)"
              r'|"""[^"\\]*(?:(?:\\[\s\S]|"(?!""))[^"\\]*)*(?:"""|\Z)|' + _DQ + "|" + _SQ + ")")
_C_RAW = r'R"\((?:[^)]|\)(?!"))*\)"'  # C++ raw string R"(...)" (no custom delimiter)
_CS_VERBATIM = r'@"[^"]*(?:""[^"]*)*"?'

_TOKENIZERS: dict[str, list[tuple[str, str]]] = {
    "python": [("comment", _LINE["hash"]), ("string", _PY_STRING)],
    "c": [("comment", _LINE["slash"]), ("comment", _BLOCK), ("string", _DQ), ("string", _CHAR)],
    "cpp": [("comment", _LINE["slash"]), ("comment", _BLOCK), ("string", _C_RAW), ("string", _DQ),
            ("string", _CHAR)],
    "java": [("comment", _LINE["slash"]), ("comment", _BLOCK), ("string", _DQ), ("string", _CHAR)],
    "csharp": [("comment", _LINE["slash"]), ("comment", _BLOCK), ("string", _CS_VERBATIM), ("string", _DQ),
               ("string", _CHAR)],
    "rust": [("comment", _LINE["slash"]), ("comment", _BLOCK), ("string", _DQ), ("string", _CHAR)],
    "javascript": [("comment", _LINE["slash"]), ("comment", _BLOCK), ("string", _DQ), ("string", _SQ),
                   ("template", _BACKTICK)],
    "php": [("comment", _LINE["slash"]), ("comment", _LINE["hash"]), ("comment", _BLOCK), ("interp", _DQ),
            ("string", _SQ), ("interp", _BACKTICK)],
}
_COMPILED = {lang: re.compile("|".join(f"(?P<{kind}{i}>{p})" for i, (kind, p) in enumerate(parts)))
             for lang, parts in _TOKENIZERS.items()}
# What stays visible inside a string in the code view, because it is code: JS `${expr}`, PHP "$var".
_INTERPOLATION = {"template": re.compile(r"\$\{[^}`]{0,200}\}"),
                  "interp": re.compile(r"\{?\$[A-Za-z_]\w{0,63}(?:\[[^\]\n]{0,64}\]|->\w{1,64}){0,4}\}?")}
_NOT_NEWLINE = re.compile(r"[^\n]")


@dataclass(frozen=True)
class Views:
    """The same snippet three ways, all of one length: as written, comments blanked, strings blanked too."""

    source: str
    text: str
    code: str


def _blank(s: str) -> str:
    return _NOT_NEWLINE.sub(" ", s)


def _blank_string(s: str, kind: str) -> str:
    """Keep the delimiters (a leading prefix like f or @ too) and, in a template, its ${...} parts."""
    quote = min((i for i in (s.find('"'), s.find("'"), s.find("`")) if i >= 0), default=0)
    width = 3 if s[quote:quote + 3] in ('"""', "'''") else 1
    head, body = s[:quote + width], s[quote + width:]
    tail = body[-width:] if len(body) >= width and body[-width:] == s[quote:quote + width] else ""
    body = body[:len(body) - len(tail)]
    if kind in _INTERPOLATION:
        kept, last = [], 0
        for m in _INTERPOLATION[kind].finditer(body):
            kept += [_blank(body[last:m.start()]), m.group()]
            last = m.end()
        body = "".join(kept) + _blank(body[last:])
    else:
        body = _blank(body)
    return head + body + tail


def views(source: str, language: str) -> Views:
    """Comments and strings masked for `language` (one of LANGUAGES), offsets unchanged."""
    text, code, last = [], [], 0
    for m in _COMPILED[language].finditer(source):
        kind = m.lastgroup.rstrip("0123456789")
        text.append(source[last:m.start()])
        code.append(source[last:m.start()])
        piece = m.group()
        if kind == "comment":
            text.append(_blank(piece))
            code.append(_blank(piece))
        else:
            text.append(piece)
            code.append(_blank_string(piece, kind))
        last = m.end()
    text.append(source[last:])
    code.append(source[last:])
    return Views(source, "".join(text), "".join(code))


# -- code blocks in model output -------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """One piece of code in a reply: its language (None: not known), text, and first line in the reply."""

    language: str | None
    code: str
    line: int


_FENCE = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})[ \t]*([^\s`]{0,32})[^\n]*\n", re.M)


def fenced_blocks(reply: str) -> list[Block]:
    """Markdown fenced blocks (``` or ~~~, info string -> language); an unclosed fence runs to the end."""
    blocks, pos = [], 0
    while (m := _FENCE.search(reply, pos)) is not None:
        fence, tag = m.group(1), m.group(2).lower()
        close = re.compile(r"^[ \t]{0,3}" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$", re.M)
        end = close.search(reply, m.end())
        body = reply[m.end():end.start() if end else len(reply)]
        language = LANGUAGE_NAMES.get(tag) or (guess_language(body) if tag in ("", "code", "text") else None)
        if tag not in ("text", "txt", "output", "console", "markdown", "md") or language:
            blocks.append(Block(language, body, reply.count("\n", 0, m.end()) + 1))
        pos = end.end() if end else len(reply)
    return blocks


# Cheap signs of a language, for blocks without a tag and files without a known extension: the first
# language whose pattern matches wins, so the more specific ones come first.
_SIGNS: list[tuple[str, re.Pattern]] = [
    ("php", re.compile(r"<\?php|\$_(?:GET|POST|REQUEST|COOKIE|SERVER)\b")),
    ("cpp", re.compile(r"#include\s*<(?:iostream|string|vector|memory|map)>|\bstd::|\bcout\s*<<")),
    ("c", re.compile(r"#include\s*[<\"]|\bint\s+main\s*\(|\bmalloc\s*\(|\bprintf\s*\(")),
    ("csharp", re.compile(r"\busing\s+System\b|\bConsole\.Write|\bnamespace\s+\w+\s*\{|\bpublic\s+async\s+Task")),
    ("java", re.compile(r"\bpublic\s+(?:static\s+)?(?:final\s+)?class\b|\bSystem\.out\.|\bimport\s+java\.")),
    ("rust", re.compile(r"\bfn\s+\w+\s*\(|\blet\s+mut\b|\buse\s+std::|\bimpl\b")),
    ("python", re.compile(r"^[ \t]*(?:def[ \t]+\w+[ \t]*\(|import[ \t]+\w+|from[ \t]+[\w.]+[ \t]+import\b"
                          r"|class[ \t]+\w{1,64}[^\n]{0,200}:[ \t]*$)", re.M)),
    ("javascript", re.compile(r"\brequire\s*\(|\bconst\s+\w+\s*=|\bfunction\s*\w*\s*\(|=>|\bdocument\."
                              r"|\bconsole\.log")),
]


def guess_language(code: str) -> str | None:
    head = code[:20_000]  # signs sit near the top; a bounded look keeps a 10 MB paste cheap
    return next((lang for lang, sign in _SIGNS if sign.search(head)), None)
