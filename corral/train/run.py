"""What a training run holds once it is set up (``Run``), and the one way to seed every generator.

Below both the setup phases (corral.train.setup) and the loop (corral.train.loop), so neither imports
the other's module to share them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass
class Run:
    """The objects one run trains with, built by the setup phases (corral.train.setup).

    ``config`` is any config with the sections the loop reads: ``out_dir``, ``train`` (TrainConfig),
    ``optim`` (OptimConfig), ``checkpoint``, ``failure`` and ``fault``; PretrainConfig is one.
    """

    config: Any
    model: Any  # the module being optimized: the whole Transformer, or this rank's pipeline stage
    optimizer: Any
    scheduler: Any
    loader: Any = None
    """Pretraining's TokenLoader (the batch source run_pretrain gives the loop)."""
    val_loader: Any = None
    device: Any = None
    rank: int = 0
    world: int = 1
    dp_size: int = 1
    pipe: Any = None
    pp_mesh: Any = None
    loss_fn: Any = None
    """Pretraining's loss(inputs, targets) -> mean next-token loss (corral.train.loss); unused by a pipeline."""
    n_params: int = 0
    flops_per_token: float = 0.0
    """Training FLOPs per token (forward + backward), for MFU; 0 leaves MFU out."""
    peak_flops: float | None = None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (weights, dropout-free init, data order)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
