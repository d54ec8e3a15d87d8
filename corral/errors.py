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


class GuardVerdictError(CorralError, ValueError):
    """A guard model answered outside the grammar `safe` | `unsafe` [newline S<n>,...] (corral.safety)."""

    def __init__(self, message: str, *, text: str = ""):
        super().__init__(message)
        self.text = text


class GuardInputError(CorralError, ValueError):
    """A conversation or file the guard cannot assess: no message, unknown role, bad JSON line."""
