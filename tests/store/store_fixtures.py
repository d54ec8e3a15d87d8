"""Tiny random Llama models in each format, and a snapshot of a directory tree, for store tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from corral.checkpoint.export import export_checkpoint
from corral.model.config import ModelConfig
from corral.model.llama import Transformer, init_weights_

TINY = dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=4096)


def tiny_model(vocab_size: int = 256, seed: int = 0):
    config = ModelConfig(vocab_size=vocab_size, **TINY)
    torch.manual_seed(seed)
    return config, init_weights_(Transformer(config)).eval()


def tiny_gguf(dest: Path, seed: int = 0) -> Path:
    config, model = tiny_model(seed=seed)
    return export_checkpoint(config, model.state_dict(), dest, "gguf")


def tiny_hf(dest: Path, seed: int = 0) -> Path:
    config, model = tiny_model(seed=seed)
    return export_checkpoint(config, model.state_dict(), dest, "hf")


def tiny_meta(dest: Path, seed: int = 0) -> Path:
    """A Meta directory with Meta's real Llama 3 tokenizer.model, so corral.load can chat with it."""
    from corral.checkpoint.meta import export_meta
    from corral.tokenizer.llama3 import default_tokenizer_model_path

    config, model = tiny_model(vocab_size=128256, seed=seed)
    export_meta(config, model.state_dict(), dest, tokenizer_model=default_tokenizer_model_path())
    return dest


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of content (or 'dir' / 'link') for everything under root."""
    out = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
