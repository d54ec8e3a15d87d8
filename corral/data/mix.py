"""Mixing curated sources with weights into token shards that ``corral pretrain`` reads directly.

    out_dir = "runs/mix/web-heavy"
    val_fraction = 0.05

    [[sources]]
    name = "web"
    paths = ["runs/curate/web/shards"]
    weight = 2.0          # every document twice (upsampled)

    [[sources]]
    name = "books"
    paths = ["data/corpus/gutenberg"]
    weight = 0.5          # each document kept with probability 0.5 (downsampled)

A weight w repeats a document floor(w) times, plus once more with probability w - floor(w) (Llama 3
chose its mix by such up/down-sampling of sources, section 3.1.2). Before weighting, ``val_fraction``
of each source's documents (chosen by a hash of the document id, so the split is stable) is held out
as val/<name>.bin, which is how validation loss is compared per source. Train tokens go to
train/shard-NNNNN.bin in corral.data.shards' format; manifest.json says what came from where.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from corral.config import load_toml_config
from corral.data.documents import Document
from corral.data.inputs import Reader
from corral.data.readers import expand_sources
from corral.data.shards import write_shard
from corral.data.tokenize import tokenize_documents
from corral.errors import ConfigError


@dataclass
class MixSource:
    name: str = ""
    """Names the source in manifest.json and its validation shard val/<name>.bin."""
    paths: list[str] = field(default_factory=list)
    """Curated shards (JSONL), text files, or directories of them."""
    weight: float = 1.0
    """Repeats per document: 2.0 doubles the source, 0.5 keeps half of it, 0 leaves it out of training."""
    chunk_chars: int = 0
    """Cut longer documents at paragraph breaks into pieces of about this many characters (a book becomes
    many documents, so weighting and the validation split work inside it); 0 keeps documents whole."""


@dataclass
class MixConfig:
    out_dir: str = ""
    sources: list[MixSource] = field(default_factory=list)
    val_fraction: float = 0.0
    """Share of each source's documents held out for validation (before weighting)."""
    shard_tokens: int = 4_000_000
    """Train tokens per shard file."""
    seed: int = 0


def load_mix_config(path: str | Path | None, overrides: list[str] = ()) -> MixConfig:
    config = load_toml_config(MixConfig, path, overrides, what="mix config")
    if not config.out_dir or not config.sources:
        raise ConfigError("a mix config needs out_dir and at least one [[sources]] table")
    names = [s.name for s in config.sources]
    if "" in names or len(set(names)) != len(names):
        raise ConfigError(f"sources need distinct non-empty names; got {names}")
    for s in config.sources:
        if s.weight < 0 or not s.paths:
            raise ConfigError(f"sources.{s.name}: weight must be >= 0 and paths non-empty")
    if not 0 <= config.val_fraction < 1:
        raise ConfigError("val_fraction must be in [0, 1)")
    return config


def _unit(seed: int, *parts: str) -> float:
    """A stable number in [0, 1) from the seed and the given strings (same on every machine and run)."""
    digest = hashlib.sha256("\x00".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def repeats(weight: float, u: float) -> int:
    return math.floor(weight) + (1 if u < weight - math.floor(weight) else 0)


def chunks(docs: Iterable[Document], size: int) -> Iterator[Document]:
    """Documents cut at blank lines into pieces of at least ``size`` characters (the last may be shorter)."""
    for doc in docs:
        if size <= 0 or len(doc.text) <= size:
            yield doc
            continue
        piece: list[str] = []
        k = 0
        for paragraph in doc.text.split("\n\n"):
            piece.append(paragraph)
            if sum(map(len, piece)) >= size:
                yield Document("\n\n".join(piece), f"{doc.id}#{k}", doc.metadata)
                piece, k = [], k + 1
        if piece:
            yield Document("\n\n".join(piece), f"{doc.id}#{k}", doc.metadata)


def write_mix(config: MixConfig, tokenizer=None) -> dict:
    """Tokenize and weight every source; write train shards, per-source val shards and manifest.json."""
    if tokenizer is None:
        from corral.tokenizer import load_llama3_tokenizer

        tokenizer = load_llama3_tokenizer()
    out = Path(config.out_dir)
    buffer: list[np.ndarray] = []
    buffered = 0
    shards: list[str] = []
    manifest: dict = {"sources": {}, "train_shards": shards}

    def flush() -> None:
        nonlocal buffer, buffered
        if buffered:
            path = write_shard(out / "train" / f"shard-{len(shards):05d}.bin", np.concatenate(buffer))
            shards.append(str(path.relative_to(out)))
        buffer, buffered = [], 0

    for source in config.sources:
        reader, val, stats = Reader(), [], {"documents": 0, "train_copies": 0, "train_tokens": 0, "val_tokens": 0}
        for file in expand_sources(source.paths):
            for doc in chunks(reader.read(file), source.chunk_chars):
                stats["documents"] += 1
                if _unit(config.seed, "val", source.name, doc.id) < config.val_fraction:
                    val.append(doc.text)
                    continue
                n = repeats(source.weight, _unit(config.seed, "repeat", source.name, doc.id))
                if not n:
                    continue
                ids = tokenize_documents([doc.text], tokenizer)
                for _ in range(n):
                    buffer.append(ids)
                    buffered += len(ids)
                stats["train_copies"] += n
                stats["train_tokens"] += n * len(ids)
                if buffered >= config.shard_tokens:
                    flush()
        if val:
            ids = tokenize_documents(val, tokenizer)
            write_shard(out / "val" / f"{source.name}.bin", ids)
            stats["val_tokens"] = len(ids)
        stats["reader_dropped"] = dict(reader.stats.dropped)
        manifest["sources"][source.name] = {"weight": source.weight, **stats}
    flush()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
