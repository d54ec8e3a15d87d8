"""Text sources -> token shards: each document as ``bos + ids + eos``, cached by the source's digest."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from corral.data.readers import expand_sources, iter_documents
from corral.data.shards import is_shard, write_shard


def tokenize_documents(documents: Iterable[str], tokenizer) -> np.ndarray:
    """Concatenate ``bos + ids + eos`` of every document into one uint32 array."""
    parts = [np.asarray(tokenizer.encode(doc, bos=True, eos=True), dtype=np.uint32) for doc in documents]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def prepare_shards(sources: Iterable[str | Path], shard_dir: str | Path, tokenizer=None) -> list[Path]:
    """Shards for every source: a shard is used as is, a text/JSONL file is tokenized once and cached.

    The cache name carries the source's sha256, so an edited source is tokenized again. ``tokenizer``
    defaults to Meta's Llama 3 tokenizer (loaded only if some source needs tokenizing).
    """
    shards = []
    for source in expand_sources(sources):
        if is_shard(source):
            shards.append(source)
            continue
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        target = Path(shard_dir) / f"{source.stem}-{digest}.bin"
        if not target.exists():
            if tokenizer is None:
                from corral.tokenizer import load_llama3_tokenizer

                tokenizer = load_llama3_tokenizer()
            write_shard(target, tokenize_documents(iter_documents(source), tokenizer))
        shards.append(target)
    return shards
