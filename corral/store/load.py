"""Open a stored model: the one path `corral run`, `corral chat` and the server share.

    name -> manifest (store.info) -> model blob or view directory (store.model_path)
         -> corral.load(path, quant=the stored quant or the caller's) -> a stored TEMPLATE as the chat format

The stored PARAMETERs, SYSTEM and MESSAGEs come back in the ModelInfo for the caller to apply:
the REPL makes them its session, the server its request defaults.
"""

from __future__ import annotations

import sys
from typing import Any

from corral.store.create import create_model
from corral.store.modelfile import Modelfile
from corral.store.names import parse_name
from corral.store.store import ModelInfo, Store

DEFAULT_NAME = "smollm2:135m"
"""The embedded SmolLM2-135M-Instruct GGUF, registered under this name the first time it is asked for."""


def ensure_default(store: Store) -> None:
    """Register the embedded SmolLM2 GGUF as smollm2:135m unless it is stored already."""
    from corral.llm import default_model_path  # torch loads only when a model does

    if not store.manifest_path(parse_name(DEFAULT_NAME)).is_file():
        print(f"registering the embedded model as {DEFAULT_NAME} ...", file=sys.stderr)
        create_model(store, DEFAULT_NAME, Modelfile(from_=str(default_model_path())))


def is_default(name: str) -> bool:
    return parse_name(name) == parse_name(DEFAULT_NAME)


def load_stored(store: Store, name: str, *, quant: str | None = None, **load_kwargs: Any) -> tuple[Any, ModelInfo]:
    """The LLM for a stored model, and its ModelInfo.

    `quant` applies to models stored without a quant of their own; `load_kwargs` go to corral.load
    (dtype, max_batch_size, max_seq_len, ...).
    """
    from corral.llm import load
    from corral.tokenizer.template import template_chat_format

    info = store.info(name)
    # ADAPTER layers (GGUF LoRA blobs) are stacked at load: merged into float weights, LoRA layers over blocks.
    llm = load(store.model_path(name), quant=info.config.get("quant") or quant, adapters=info.adapters,
               **load_kwargs)
    llm.name = str(info.name)
    if info.template:  # a stored TEMPLATE (Jinja) replaces the model's own chat format
        llm.chat_format = template_chat_format(info.template, llm.tokenizer, stop_ids=llm.stop_ids)
    return llm, info
