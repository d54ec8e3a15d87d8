"""Typed errors for bad user input.

Every error a user can cause with a file, a name or a request is one of these, so the CLI
can print one clear line and the server can answer 4xx. ``assert`` stays for internal
invariants only.
"""


class CorralError(Exception):
    """Base of every error caused by user input."""


class FormatError(CorralError, ValueError):
    """A model, tokenizer or checkpoint file is malformed.

    ``field`` names the header field, key or tensor that is wrong, so the message can say
    exactly where the file broke.
    """

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        self.path = path
        self.field = field
        where = f"{field}: " if field else ""
        super().__init__(f"{where}{message}")


class UnknownFormatError(FormatError):
    """The content matches no format Corral reads."""


class TokenizerError(FormatError):
    """A tokenizer file (tokenizer.model, tokenizer.json, GGUF vocabulary) is malformed."""


class ChatFormatError(CorralError, ValueError):
    """A dialog cannot be rendered: bad role, missing content, template failure."""


class ConfigError(CorralError, ValueError):
    """A model or run configuration has a missing, unknown or ill-typed field."""


class ModelNotFoundError(CorralError, FileNotFoundError):
    """The model path or name does not exist."""


class NoSpaceError(CorralError, OSError):
    """The disk filled up during a write; the partial file was removed and the old state kept."""


class DatasetError(CorralError, ValueError):
    """A fine-tuning dataset is empty, unreadable, or has a malformed record.

    ``path``, ``row`` (1-based line of a JSONL file, or index of a JSON array) and ``field`` say where.
    """

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None, field: str | None = None):
        self.path, self.row, self.field = path, row, field
        where = ":".join(str(p) for p in (path, row) if p is not None)
        key = f" field {field!r}" if field else ""
        super().__init__(f"{where}{key}: {message}" if where or key else message)


class TemplateMismatchError(ChatFormatError):
    """A chat template and the tokenizer disagree (its turn markers are not the tokenizer's special tokens)."""


class EvalDataError(FormatError):
    """An evaluation data row is malformed; the message names the file, the line and the field."""

    def __init__(self, message: str, *, path: str, line: int, field: str | None = None):
        self.line = line
        super().__init__(f"line {line}: {message}", path=path, field=field)


class UnknownTaskError(CorralError, KeyError):
    """An evaluation task name is not in the task table; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class EvalServerError(CorralError, ConnectionError):
    """An evaluation server did not answer (after retries) or answered without what scoring needs."""


class RuleFileError(CorralError, ValueError):
    """A Code Shield rule file is malformed: bad TOML, a missing field, or a regex refused at load."""


class CodeScanError(CorralError, ValueError):
    """Code Shield cannot scan this input: an unknown language, or bytes that are not text."""

class GuardVerdictError(CorralError, ValueError):
    """A guard model answered outside the grammar `safe` | `unsafe` [newline S<n>,...] (corral.safety)."""

    def __init__(self, message: str, *, text: str = ""):
        super().__init__(message)
        self.text = text


class GuardInputError(CorralError, ValueError):
    """A conversation or file the guard cannot assess: no message, unknown role, bad JSON line."""
