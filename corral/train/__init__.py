"""Training: a resumable token loader, the shared loop, pretraining, checkpoints and parallel transforms.

Importing this package loads no model, no torch and starts no process group; the names below are
imported on first use (so ``python -m corral.train.pretrain`` does not import itself twice).
"""

from typing import Any

__all__ = ["PretrainConfig", "PretrainResult", "load_config", "run_pretrain"]


def __getattr__(name: str) -> Any:
    if name in ("PretrainConfig", "load_config"):
        from corral.train import config

        return getattr(config, name)
    if name in ("PretrainResult", "run_pretrain"):
        from corral.train import pretrain

        return getattr(pretrain, name)
    raise AttributeError(f"module 'corral.train' has no attribute {name!r}")
