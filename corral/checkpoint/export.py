"""Write a model back out in any format Corral loads (and llama.cpp and transformers load).

Each exporter takes Meta-named weights and applies its own format's key map and q/k permute.
"""

from __future__ import annotations

from pathlib import Path

import torch

from corral.errors import CorralError
from corral.model.config import ModelConfig

FORMATS = ("hf", "meta", "gguf")
GGUF_QTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q6_K", "Q5_K_M", "Q4_K_M")  # gguf_quant.MIXES


def export_checkpoint(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    dest: str | Path,
    fmt: str,
    *,
    qtype: str = "F32",
    metadata: dict | None = None,
) -> Path:
    """Write `state_dict` as `fmt` ("hf" directory, "meta" directory or "gguf" file with `qtype`) at `dest`."""
    dest = Path(dest)
    if fmt == "hf":
        from corral.checkpoint.hf import export_hf

        export_hf(config, state_dict, dest)
    elif fmt == "meta":
        from corral.checkpoint.meta import export_meta

        export_meta(config, state_dict, dest)
    elif fmt == "gguf":
        if qtype not in GGUF_QTYPES:
            raise CorralError(f"GGUF export supports {', '.join(GGUF_QTYPES)}, not {qtype!r}")
        from corral.checkpoint.gguf_write import export_gguf

        export_gguf(config, state_dict, dest, qtype=qtype, metadata=metadata)
    else:
        raise CorralError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return dest
