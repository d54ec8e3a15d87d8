"""Model names and blob digests: the two strings from users and files that become paths.

A name is ``[host/][namespace/]model[:tag]`` (Ollama's grammar); a digest is exactly
``sha256:`` + 64 lowercase hex characters. Both are checked in full before they touch the
file system, so ``..``, ``/``, NUL and absurd lengths never reach a path (RELIABILITY.md 11;
CVE-2024-37032 was a path traversal through an unchecked digest).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from corral.errors import CorralError

DEFAULT_HOST = "corral.local"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_NAME_CHARS = 350

# Each part starts with a letter or digit (so never "." or ".."), then a bounded run of safe characters.
_HOST = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}(:[0-9]{1,5})?")
_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9_-]{0,79}")
_MODEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
_TAG = re.compile(r"[a-z0-9_][a-z0-9._-]{0,79}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class InvalidNameError(CorralError, ValueError):
    """A model name or digest that is not allowed."""


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        """The short form users type: host and namespace only when they are not the defaults."""
        prefix = ""
        if self.host != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        return f"{prefix}{self.model}:{self.tag}"

    @property
    def parts(self) -> tuple[str, str, str, str]:
        """Path components under ``manifests/`` (each already validated, never ``..``)."""
        return self.host, self.namespace, self.model, self.tag


def parse_name(text: str) -> ModelName:
    """``llama3`` -> corral.local/library/llama3:latest. Names are case-insensitive (stored lower case)."""
    if not isinstance(text, str) or not text:
        raise InvalidNameError("a model name must be a non-empty string")
    if len(text) > MAX_NAME_CHARS:
        raise InvalidNameError(f"model name is {len(text)} characters; the limit is {MAX_NAME_CHARS}")
    shown = text if text.isprintable() else repr(text)
    lowered = text.lower()
    tag = DEFAULT_TAG
    last_slash = lowered.rfind("/")
    colon = lowered.rfind(":")
    if colon > last_slash:
        lowered, tag = lowered[:colon], lowered[colon + 1:]
    parts = lowered.split("/")
    if len(parts) > 3:
        raise InvalidNameError(f"invalid model name {shown!r}: at most host/namespace/model:tag")
    host = parts[0] if len(parts) == 3 else DEFAULT_HOST
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    checks = [(_HOST, host, "host"), (_NAMESPACE, namespace, "namespace"), (_MODEL, parts[-1], "model"),
              (_TAG, tag, "tag")]
    for pattern, value, what in checks:
        if not pattern.fullmatch(value):
            raise InvalidNameError(
                f"invalid model name {shown!r}: the {what} must be letters, digits, '_', '-' or '.', "
                "start with a letter or digit, and be at most 80 characters")
    return ModelName(host, namespace, parts[-1], tag)


def check_digest(digest: object) -> str:
    """The digest itself if it is exactly sha256:<64 lowercase hex>, else InvalidNameError."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        shown = digest[:80] if isinstance(digest, str) else type(digest).__name__
        raise InvalidNameError(f"invalid digest {shown!r}: expected 'sha256:' and 64 lowercase hex characters")
    return digest


def blob_file_name(digest: str) -> str:
    """``sha256:ab..`` -> ``sha256-ab..`` (Ollama's on-disk name; ':' is not allowed in Windows file names)."""
    return check_digest(digest).replace(":", "-", 1)


def digest_from_file_name(name: str) -> str | None:
    """The digest a blob file name stands for, or None for anything that is not a blob name."""
    if not name.startswith("sha256-"):
        return None
    digest = "sha256:" + name[len("sha256-"):]
    return digest if _DIGEST.fullmatch(digest) else None
