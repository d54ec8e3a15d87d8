"""A Llama 3 tokenizer as GGUF ``tokenizer.*`` metadata, the keys llama.cpp's converter writes.

From an HF directory (``tokenizer.json``, ``tokenizer_config.json``, ``config.json``) we follow
``convert_hf_to_gguf.py``'s byte-level BPE path (``_set_vocab_gpt2`` and gguf-py's ``SpecialVocab``):

- ``tokenizer.ggml.model`` / ``pre``: ``gpt2`` / ``llama-bpe``; only Llama 3's split regex is accepted.
- ``tokens`` and ``token_type``: vocab and added tokens by id, padded to the model's vocab size with
  ``[PAD{i}]`` (5 UNUSED); added tokens marked special or shaped ``<|...|>`` are 3 CONTROL, other added
  tokens 4 USER_DEFINED, the rest 1 NORMAL.
- ``merges``: ``model.merges``; a pair given as a list is joined by a space, a space inside it
  written as U+0120 (the byte-level alphabet's space).
- ``{bos,eos,unk,sep,pad,cls,mask}_token_id``: ``tokenizer_config.json``'s ``*_token`` text looked up in
  ``added_tokens``, then integer ``*_token_id`` in ``config.json`` (a list there is skipped).
- ``add_{bos,eos,sep}_token``: the post-processor first (ByteLevel: false; TemplateProcessing: whether
  ``single`` starts / ends with BOS / EOS, and a SEP/EOS between A and B in ``pair``), then
  ``tokenizer_config.json``.
- ``tokenizer.chat_template``: ``tokenizer_config.json``, else ``chat_template.jinja``.

From Meta's ``tokenizer.model`` (tiktoken ranks) the vocabulary is the ranks in GPT-2's byte-level
alphabet, merges are every split of a token into two tokens ordered by the merged token's rank (how
HF turned Meta's file into the released ``tokenizer.json``, whose 280,147 merges this reproduces),
then Meta's 256 special tokens as CONTROL; BOS ``<|begin_of_text|>``, EOS ``<|end_of_text|>``,
add_bos true, and the Llama 3 chat template below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from corral.errors import TokenizerError
from corral.tokenizer.bpe import byte_to_unicode
from corral.tokenizer.llama3 import SPLIT_PATTERN, llama3_special_token_names, read_tiktoken_ranks

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
_SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

# Meta's Llama 3 chat format as the Jinja template HF ships for the base models' instruct layout:
# BOS, then each message as a header, its stripped content and <|eot_id|>; an open assistant header.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path.name}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path.name} must hold a JSON object")
    return data


def _split_regexes(node: Any) -> list[str]:
    """Every Split regex in a tokenizer.json pre_tokenizer, in order."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Split":
        pattern = node.get("pattern") or {}
        return [pattern["Regex"]] if isinstance(pattern, dict) and "Regex" in pattern else []
    return [r for child in node.get("pretokenizers") or [] for r in _split_regexes(child)]


def _merge_text(pair: Any) -> str:
    if isinstance(pair, str):
        return pair
    if isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair):
        return " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in pair)
    raise TokenizerError(f"merge {pair!r:.40} is neither 'a b' nor ['a', 'b']", field="model.merges")


def _looks_special(text: str) -> bool:
    return text.startswith("<|") and text.endswith("|>")


def _hf_tokens(data: dict, vocab_size: int) -> tuple[list[str], list[int], dict[str, int]]:
    vocab = data["model"].get("vocab")
    if not isinstance(vocab, dict):
        raise TokenizerError("expected an object of token -> id", field="model.vocab")
    added = {t["content"]: t for t in data.get("added_tokens") or [] if isinstance(t, dict) and "content" in t}
    by_id = {i: t for t, i in vocab.items()} | {t["id"]: c for c, t in added.items()}
    if by_id and max(by_id) >= vocab_size:
        raise TokenizerError(f"token id {max(by_id)} is past the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(text)
        if text in added:
            types.append(TOKEN_CONTROL if added[text].get("special") or _looks_special(text) else TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL)
    return tokens, types, {c: t["id"] for c, t in added.items()}


def _add_special_flags(data: dict, cfg: dict) -> dict[str, bool]:
    """add_bos/add_eos as gguf-py's SpecialVocab reads them: the post-processor first, then tokenizer_config."""
    flags: dict[str, bool] = {}
    post = data.get("post_processor") or {}
    bos, eos = (_token_text(cfg.get(k)) for k in ("bos_token", "eos_token"))
    for proc in post.get("processors", [post]) if isinstance(post, dict) else []:
        if proc.get("type") == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            first = last = None
            if len(single) > 1:
                first = single[0].get("SpecialToken", {}).get("id")
                last = single[-1].get("SpecialToken", {}).get("id")
                if first:
                    flags["bos"] = first == bos
                if last:
                    flags["eos"] = last == eos
            _pair_sep_flag(proc.get("pair") or [], first, last, (_token_text(cfg.get("sep_token")), eos), flags)
    for kind in _SPECIAL_KINDS:
        value = cfg.get(f"add_{kind}_token")
        if isinstance(value, bool):
            flags.setdefault(kind, value)
    return flags


def _pair_sep_flag(pair: list, first: str | None, last: str | None, seps: tuple, flags: dict[str, bool]) -> None:
    """add_sep: a pair template ``A <special> ... B`` (after the leading BOS / trailing EOS) sets it, true when
    a special between the sequences is the SEP or EOS token."""
    def special(entry: dict) -> str | None:
        return entry.get("SpecialToken", {}).get("id")

    start = 1 if first and pair and special(pair[0]) == first else 0
    stop = -1 if last and pair and special(pair[-1]) == last else None
    pair = pair[start:stop]
    if len(pair) > 2 and pair[0].get("Sequence", {}).get("id") == "A" and pair[-1].get("Sequence", {}).get("id") == "B":
        flags["sep"] = any(special(e) in seps for e in pair[1:3] if special(e))


def _token_text(entry: Any) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def gguf_vocab_from_hf(directory: str | Path, vocab_size: int) -> dict[str, Any]:
    """``tokenizer.*`` metadata for an HF Llama 3 directory; `vocab_size` is the model's (embedding rows)."""
    directory = Path(directory)
    data = _read_json(directory / "tokenizer.json")
    if not isinstance(data.get("model"), dict) or data["model"].get("type", "BPE") != "BPE":
        raise TokenizerError("tokenizer.json has no BPE model", field="model")
    if _split_regexes(data.get("pre_tokenizer")) != [SPLIT_PATTERN]:
        raise TokenizerError("only Llama 3's pre-tokenizer (llama-bpe) can be written to GGUF", field="pre_tokenizer")
    cfg = _read_json(directory / "tokenizer_config.json")
    tokens, types, added = _hf_tokens(data, vocab_size)
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [_merge_text(m) for m in data["model"].get("merges") or []],
    }
    ids: dict[str, int] = {}
    for kind in _SPECIAL_KINDS:
        text = _token_text(cfg.get(f"{kind}_token"))
        if text in added and added[text] < vocab_size:
            ids[kind] = added[text]
    model_cfg = _read_json(directory / "config.json")
    for kind in _SPECIAL_KINDS:
        value = model_cfg.get(f"{kind}_token_id")
        if kind not in ids and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size:
            ids[kind] = value
    meta.update({f"tokenizer.ggml.{kind}_token_id": i for kind, i in ids.items()})
    meta.update({f"tokenizer.ggml.add_{kind}_token": v for kind, v in _add_special_flags(data, cfg).items()})
    template = cfg.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = template
    return meta


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) with left, right and left + right all ranked, by the merged token's rank, then by
    the ranks of left and right: the merge list HF derives from a tiktoken file."""
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((rank, left, right) for left, right in splits)
    merges.sort(key=lambda m: m[0])
    return [(left, right) for _, left, right in merges]


def gguf_vocab_from_tiktoken(path: str | Path, vocab_size: int) -> dict[str, Any]:
    """``tokenizer.*`` metadata for Meta's ``tokenizer.model`` plus its 256 special tokens."""
    ranks = read_tiktoken_ranks(path)
    alphabet = byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    by_rank = sorted(ranks, key=ranks.__getitem__)
    specials = llama3_special_token_names()
    tokens = [text(b) for b in by_rank] + specials
    types = [TOKEN_NORMAL] * len(by_rank) + [TOKEN_CONTROL] * len(specials)
    if len(tokens) > vocab_size:
        raise TokenizerError(f"{len(tokens)} tokens do not fit the model's vocab_size {vocab_size}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [TOKEN_UNUSED] * (vocab_size - len(types))
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{text(a)} {text(b)}" for a, b in tiktoken_merges(ranks)],
        "tokenizer.ggml.bos_token_id": len(by_rank),
        "tokenizer.ggml.eos_token_id": len(by_rank) + 1,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": LLAMA3_CHAT_TEMPLATE,
    }
