"""Open any checkpoint Corral reads, deciding the format from content, never from a file name.

GGUF files start with the magic ``GGUF``; an HF directory has a ``config.json`` and safetensors
weights; a Meta directory has a ``params.json`` and ``consolidated.NN.pth`` zip archives.
"""

from __future__ import annotations

from pathlib import Path

import torch

from corral.checkpoint.base import Checkpoint
from corral.errors import ModelNotFoundError, UnknownFormatError

GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save archives are zip files


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _looks_like_safetensors(path: Path) -> bool:
    head = _head(path, 9)
    # 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"


def _gguf_in_directory(directory: Path) -> Path | None:
    found = [p for p in sorted(directory.iterdir()) if p.is_file() and _head(p, 4) == GGUF_MAGIC]
    if len(found) > 1:
        raise UnknownFormatError(f"{len(found)} GGUF files in one directory; name the one to load", path=str(directory))
    return found[0] if found else None


def detect_format(path: str | Path) -> str:
    """"gguf", "hf" or "meta" for a file or directory, from its content."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"no such file or directory: {path}")
    if path.is_file():
        head = _head(path)
        if head[:4] == GGUF_MAGIC:
            return "gguf"
        if head[:4] == ZIP_MAGIC:
            raise UnknownFormatError("a lone .pth file has no params.json; point at its directory", path=str(path))
        if _looks_like_safetensors(path):
            raise UnknownFormatError("a lone safetensors file has no config.json; point at its directory",
                                     path=str(path))
        raise UnknownFormatError(f"not a GGUF file (starts with {head[:4]!r})", path=str(path))
    if (path / "config.json").is_file() and any(_looks_like_safetensors(p) for p in path.glob("*.safetensors")):
        return "hf"
    if (path / "params.json").is_file() and any(_head(p, 4) == ZIP_MAGIC for p in path.glob("consolidated.*.pth")):
        return "meta"
    if _gguf_in_directory(path) is not None:
        return "gguf"
    raise UnknownFormatError(
        "directory holds no GGUF file, no config.json with safetensors, no params.json with consolidated.*.pth",
        path=str(path),
    )


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """Read the weights and config of a GGUF file, HF directory or Meta directory."""
    # Imported here so that reading one format never pays for the others' imports.
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        from corral.checkpoint.gguf import load_gguf

        return load_gguf(path if path.is_file() else _gguf_in_directory(path), dtype=dtype or torch.float32)
    if fmt == "hf":
        from corral.checkpoint.hf import load_hf

        return load_hf(path, dtype=dtype)
    from corral.checkpoint.meta import load_meta

    return load_meta(path, dtype=dtype)

