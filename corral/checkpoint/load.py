"""Open any checkpoint Corral reads, deciding the format from content, never from a file name.

GGUF files start with the magic ``GGUF``; an HF directory has a ``config.json`` and safetensors
weights; a Meta directory has a ``params.json`` and ``consolidated.NN.pth`` zip archives.
"""

from __future__ import annotations

from pathlib import Path

import torch

from corral.checkpoint.base import Checkpoint
from corral.errors import FormatError, ModelNotFoundError, UnknownFormatError

GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save archives are zip files


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _readable_head(path: Path, n: int = 8) -> bytes:
    """The first bytes of a regular file in a scanned directory; b"" for anything else or unreadable
    (a fifo would block, /proc/self/mem answers EINVAL): such files are simply not candidates."""
    if not path.is_file():
        return b""
    try:
        return _head(path, n)
    except OSError:
        return b""


def _looks_like_safetensors(path: Path) -> bool:
    head = _readable_head(path, 9)
    # 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"


def _gguf_in_directory(directory: Path) -> Path | None:
    found = [p for p in sorted(directory.iterdir()) if _readable_head(p, 4) == GGUF_MAGIC]
    if len(found) > 1:
        raise UnknownFormatError(f"{len(found)} GGUF files in one directory; name the one to load", path=str(directory))
    return found[0] if found else None


def _weight_files(directory: Path, pattern: str) -> list[Path]:
    return sorted(p for p in directory.glob(pattern) if p.is_file())


def _refuse_bad_safetensors(files: list[Path]) -> None:
    """config.json names an HF layout but no weight file starts like safetensors: say which file is bad."""
    from corral.checkpoint.safetensors_io import read_header

    try:
        read_header(files[0])
    except FormatError as exc:
        raise FormatError(f"bad safetensors header ({exc})", path=str(files[0]), field=files[0].name) from None
    except OSError as exc:
        raise FormatError(f"cannot read it ({exc.strerror or exc})", path=str(files[0]), field=files[0].name) from None


def _directory_format(path: Path) -> str:
    safetensors = _weight_files(path, "*.safetensors")
    if (path / "config.json").is_file() and safetensors:
        if any(_looks_like_safetensors(p) for p in safetensors):
            return "hf"
        _refuse_bad_safetensors(safetensors)
        return "hf"  # a valid header the quick look missed (JSON after leading whitespace)
    shards = _weight_files(path, "consolidated.*.pth")
    if (path / "params.json").is_file() and shards:
        if any(_readable_head(p, 4) == ZIP_MAGIC for p in shards):
            return "meta"
        raise FormatError(f"not a torch.save archive (starts with {_readable_head(shards[0], 4)!r})",
                          path=str(shards[0]), field=shards[0].name)
    if _gguf_in_directory(path) is not None:
        return "gguf"
    raise UnknownFormatError(
        "holds no model: no GGUF file, no config.json with safetensors, no params.json with consolidated.*.pth",
        path=str(path),
    )


def detect_format(path: str | Path) -> str:
    """"gguf", "hf" or "meta" for a file or directory, from its content."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"no such file or directory: {path}")
    if path.is_dir():
        return _directory_format(path)
    if not path.is_file():  # reading /dev/zero never ends and a fifo blocks: refuse before opening
        raise UnknownFormatError("not a regular file or directory (a device, pipe or socket)", path=str(path))
    head = _head(path)
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if head[:4] == ZIP_MAGIC:
        raise UnknownFormatError("a lone .pth file has no params.json; point at its directory", path=str(path))
    if _looks_like_safetensors(path):
        raise UnknownFormatError("a lone safetensors file has no config.json; point at its directory",
                                 path=str(path))
    raise UnknownFormatError(f"not a GGUF file (starts with {head[:4]!r})", path=str(path))


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, *, weights: bool = True) -> Checkpoint:
    """Read the weights and config of a GGUF file, HF directory or Meta directory.

    ``weights=False`` validates the files as a load does (config against every tensor's name and shape)
    but reads only headers: the state_dict holds meta-device tensors. The store checks a model this way
    before registering it.
    """
    # Imported here so that reading one format never pays for the others' imports.
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        from corral.checkpoint.gguf import load_gguf

        return load_gguf(path if path.is_file() else _gguf_in_directory(path), dtype=dtype or torch.float32,
                         weights=weights)
    if fmt == "hf":
        from corral.checkpoint.hf import load_hf

        return load_hf(path, dtype=dtype, weights=weights)
    from corral.checkpoint.meta import load_meta

    return load_meta(path, dtype=dtype, weights=weights)

