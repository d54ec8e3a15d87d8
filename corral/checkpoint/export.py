"""Write a model back out in any format Corral loads (and llama.cpp and transformers load).

Each exporter takes Meta-named weights and applies its own format's key map and q/k permute.
``export_with_llama3_tokenizer`` also writes Meta's Llama 3 tokenizer beside the weights (what a model
pretrained here needs to be served): tokenizer.model (meta), tokenizer.json (hf) or GGUF tokenizer.* metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from corral.errors import CorralError
from corral.model.config import ModelConfig

FORMATS = ("hf", "meta", "gguf")
GGUF_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q6_K", "Q5_K_M", "Q4_K_M")  # gguf_quant.MIXES


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


LLAMA3_VOCAB_SIZE = 128256


def export_with_llama3_tokenizer(config: ModelConfig, state_dict: dict[str, torch.Tensor], dest: str | Path,
                                 fmt: str, *, qtype: str = "F32") -> Path:
    """export_checkpoint, plus the Llama 3 tokenizer files that let Corral (and others) load the result."""
    from corral.tokenizer.gguf_vocab import gguf_vocab_from_tiktoken
    from corral.tokenizer.llama3 import llama3_tokenizer_file

    dest = Path(dest)
    metadata = None
    if fmt == "gguf" and config.vocab_size == LLAMA3_VOCAB_SIZE:  # the tokenizer.* keys llama.cpp's converter writes
        metadata = gguf_vocab_from_tiktoken(llama3_tokenizer_file("tokenizer.model"), config.vocab_size)
        metadata["general.name"] = "corral-pretrain"
    export_checkpoint(config, state_dict, dest, fmt, qtype=qtype, metadata=metadata)
    if fmt == "meta":
        shutil.copyfile(llama3_tokenizer_file("tokenizer.model"), dest / "tokenizer.model")
    elif fmt == "hf":
        shutil.copyfile(llama3_tokenizer_file("tokenizer.json"), dest / "tokenizer.json")
        config_json = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True,
                       "model_max_length": config.max_seq_len, "tokenizer_class": "PreTrainedTokenizerFast"}
        (dest / "tokenizer_config.json").write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
    return dest
