"""Chat data for fine-tuning: records rendered with the model's own chat format, labels, packing, batches.

 1. ``read_records`` (corral.posttrain.records) turns rows of any supported form into chats and pairs;
 2. ``render_chat`` / ``render_pair`` tokenize them with the model's chat format (Llama 3 header tokens or
    the file's Jinja template) and label only assistant tokens: each assistant turn's tokens are what
    ``encode_dialog(turns[:i+1])`` adds to ``encode_dialog(turns[:i], add_generation_prompt=True)``, so any
    template works, and a template whose turns do not end in one of the tokenizer's stop tokens (its
    markers are plain text to this tokenizer) is a TemplateMismatchError;
 3. ``chat_batches`` pads or packs samples into ``TokenBatch``es, ``pair_batches`` stacks pairs
    (chosen rows first, then rejected, as TRL does); both cycle with a seeded permutation per epoch.

Packing puts several samples in one row; attention stays inside each sample through a block-diagonal
causal mask (``packed_mask``) and positions that restart at 0 for each sample, so a packed sample's
logits equal its unpacked ones (tests/posttrain/test_pt_data.py checks this).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from corral.errors import DatasetError, TemplateMismatchError
from corral.posttrain.records import ChatRecord, Dialog, PreferenceRecord, read_records, substitute

IGNORE_INDEX = -100
"""Targets equal to this add nothing to the loss (corral.train.loss.IGNORE_INDEX; data may not import train)."""


@dataclass
class Sample:
    """A rendered sequence: token ids and, per id, itself where it is trained on or IGNORE_INDEX."""

    ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class PairSample:
    chosen: Sample
    rejected: Sample


@dataclass
class TokenBatch:
    """Rows of token ids and what each position should predict.

    tokens (B, T) inputs; targets (B, T) the next token where trained, else IGNORE_INDEX (the last
    position of every sample too); lengths (B,) real tokens per row (padding follows). Packed rows also
    carry positions (B, T), restarting at 0 per sample, and segments (B, T): 1, 2, ... per sample, 0 for padding.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    index: torch.Tensor | None = None
    """Pair batches: (B,) the dataset index of each pair (what a precomputed reference is looked up by)."""

    def to(self, device: torch.device) -> TokenBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return TokenBatch(self.tokens.to(device), self.targets.to(device), self.lengths.to(device),
                          move(self.positions), move(self.segments), self.index)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


# --- rendering ------------------------------------------------------------------------------


def _is_prefix(prefix: Sequence[int], ids: Sequence[int]) -> bool:
    return len(prefix) <= len(ids) and list(ids[: len(prefix)]) == list(prefix)


def _continuation(chat_format, head: Dialog, tail: Dialog, where: str) -> tuple[list[int], int]:
    """(ids of head + tail, where tail starts): what tail adds to head's open assistant header."""
    before = chat_format.encode_dialog(head, add_generation_prompt=True)
    upto = chat_format.encode_dialog(head + tail, add_generation_prompt=False)
    if not _is_prefix(before, upto):
        raise TemplateMismatchError(f"{where}: the chat template renders the dialog before assistant turn "
                                    f"{len(head)} differently once the turn is added; its tokens cannot be labelled")
    if not set(upto[len(before):]) & set(chat_format.stop_ids):
        raise TemplateMismatchError(f"{where}: assistant turn {len(head)} does not end with a stop token of the "
                                    f"tokenizer (ids {sorted(chat_format.stop_ids)}); the chat template's turn markers "
                                    "are not this tokenizer's special tokens, so the model could never learn to stop")
    return upto, len(before)


def render_chat(record: ChatRecord, chat_format, max_len: int) -> Sample:
    """Tokens of the whole conversation; labels on every assistant turn (its text and its turn end)."""
    ids = chat_format.encode_dialog(record.messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(record.messages):
        if message["role"] != "assistant":
            continue
        upto, start = _continuation(chat_format, record.messages[:i], record.messages[i:i + 1], record.where)
        end = len(upto)
        if not _is_prefix(upto, ids):
            raise TemplateMismatchError(f"{record.where}: the chat template renders earlier turns differently when "
                                        "later ones follow (it rewrites history); its tokens cannot be labelled")
        labels[start:end] = ids[start:end]
    return Sample(ids[:max_len], labels[:max_len])


def render_pair(record: PreferenceRecord, chat_format, max_len: int) -> PairSample:
    """Both continuations after the same prompt; labels on the continuation only.

    Over max_len, each continuation keeps at most max_len / 2 tokens and the prompt loses its oldest tokens.
    """
    sides = []
    for side in (record.chosen, record.rejected):
        ids, start = _continuation(chat_format, record.prompt, side, record.where)
        sides.append((ids[:start], ids[start:]))
    prompt = sides[0][0]
    completions = [c if len(prompt) + len(c) <= max_len else c[: max(max_len // 2, max_len - len(prompt))]
                   for _, c in sides]
    keep = max_len - max(len(c) for c in completions)
    prompt = prompt[len(prompt) - keep:] if keep < len(prompt) else prompt
    samples = [Sample(prompt + c, [IGNORE_INDEX] * len(prompt) + c) for c in completions]
    return PairSample(*samples)


# --- batches --------------------------------------------------------------------------------


def _shifted(sample: Sample) -> list[int]:
    """targets[t] = labels[t + 1]; the last position predicts nothing."""
    return sample.labels[1:] + [IGNORE_INDEX]


def pad_batch(samples: Sequence[Sample], pad_id: int = 0) -> TokenBatch:
    """One sample per row, right-padded to the longest (plain causal attention needs no mask)."""
    T = max(len(s.ids) for s in samples)
    tokens = torch.full((len(samples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        tokens[b, : len(s.ids)] = torch.tensor(s.ids)
        targets[b, : len(s.ids)] = torch.tensor(_shifted(s))
    return TokenBatch(tokens, targets, torch.tensor([len(s.ids) for s in samples]))


def pack_batch(rows: Sequence[Sequence[Sample]], seq_len: int, pad_id: int = 0) -> TokenBatch:
    """Several samples per row of seq_len tokens, each with its own positions and segment."""
    B = len(rows)
    tokens = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, seq_len), dtype=torch.long)
    segments = torch.zeros((B, seq_len), dtype=torch.long)
    lengths = torch.zeros(B, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for k, s in enumerate(row, start=1):
            n = len(s.ids)
            tokens[b, at:at + n] = torch.tensor(s.ids)
            targets[b, at:at + n] = torch.tensor(_shifted(s))
            positions[b, at:at + n] = torch.arange(n)
            segments[b, at:at + n] = k
            at += n
        lengths[b] = at
    return TokenBatch(tokens, targets, lengths, positions, segments)


def packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T): query i sees key j when both are in the same sample and j <= i.

    Padding (segment 0) attends to padding, so no row of the mask is empty (an all-False row makes
    scaled_dot_product_attention return NaN); its targets are ignored anyway.
    """
    T = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)


def pack_rows(samples: Sequence[Sample], seq_len: int) -> list[list[Sample]]:
    """Greedy packing in the given order: a sample goes into the current row while it fits."""
    rows: list[list[Sample]] = [[]]
    used = 0
    for s in samples:
        if used + len(s.ids) > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += len(s.ids)
    return rows if rows[-1] else rows[:-1]


def _epochs(n: int, seed: int) -> Iterator[int]:
    """Indices 0..n-1 in a new seeded order every epoch, forever."""
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        yield from order
        epoch += 1


def chat_batches(samples: Sequence[Sample], batch_size: int, seed: int, *, pack: bool = False,
                 seq_len: int = 0, pad_id: int = 0) -> Iterator[TokenBatch]:
    """Endless padded batches of batch_size samples, or packed batches of batch_size rows of seq_len."""
    order = _epochs(len(samples), seed)
    while True:
        if not pack:
            yield pad_batch([samples[next(order)] for _ in range(batch_size)], pad_id)
            continue
        rows: list[list[Sample]] = []
        current: list[Sample] = []
        while len(rows) < batch_size:
            s = samples[next(order)]
            if current and sum(len(x.ids) for x in current) + len(s.ids) > seq_len:
                rows.append(current)
                current = []
            current.append(s)
        yield pack_batch(rows, seq_len, pad_id)


def pair_batches(pairs: Sequence[PairSample], batch_size: int, seed: int, pad_id: int = 0,
                 cycle: bool = True) -> Iterator[TokenBatch]:
    """Batches of 2 x batch_size rows: the chosen sides of batch_size pairs, then their rejected sides.

    cycle=False visits each pair once in order (evaluation, reference log-probs)."""
    order = _epochs(len(pairs), seed) if cycle else iter(range(len(pairs)))
    while True:
        index = [i for _, i in zip(range(batch_size), order)]
        if not index:
            return
        batch = pad_batch([pairs[i].chosen for i in index] + [pairs[i].rejected for i in index], pad_id)
        batch.index = torch.tensor(index)
        yield batch


# --- datasets -------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Rendered training and validation samples of one kind (chats or pairs)."""

    train: list
    val: list
    skipped: int = 0
    """Samples dropped because truncation left nothing to train on."""
    bad_rows: list[DatasetError] = field(default_factory=list)
    """Malformed rows left out (data.skip_bad_rows)."""


def load_dataset(config, chat_format, *, pairs: bool) -> Dataset:
    """Read, check, render and split ``config`` (a FinetuneDataConfig); pairs for rm/dpo, chats for sft."""
    data = config
    if not data.train:
        raise DatasetError("data.train is empty: name at least one JSON or JSONL file")
    bad: list[DatasetError] = []
    records = read_records(data.train, data.format, skip_bad=data.skip_bad_rows, skipped=bad)
    if data.limit:
        records = records[: data.limit]
    val_records = read_records(data.val, data.format, skip_bad=data.skip_bad_rows, skipped=bad) if data.val else []
    if not val_records and data.val_fraction:
        random.Random(data.seed).shuffle(records)
        n_val = max(1, int(len(records) * data.val_fraction))
        records, val_records = records[n_val:], records[:n_val]
    train, skipped = _render_all(records, data, chat_format, pairs)
    val, _ = _render_all(val_records, data, chat_format, pairs)
    if not train:
        why = f" ({skipped} had nothing left to train on after truncation to data.max_len)" if skipped else ""
        raise DatasetError(f"no training samples in {', '.join(data.train)}{why}")
    return Dataset(train, val, skipped, bad)


def _render_all(records: list, data, chat_format, pairs: bool) -> tuple[list, int]:
    kind = PreferenceRecord if pairs else ChatRecord
    out, skipped = [], 0
    for r in substitute(records, data.placeholders, data.system):
        if not isinstance(r, kind):
            wanted = "preference pairs (chosen/rejected)" if pairs else "conversations (no chosen/rejected)"
            raise DatasetError(f"this objective trains on {wanted}; this row is the other kind", path=r.where)
        if pairs:
            sample = render_pair(r, chat_format, data.max_len)
            ok = sample.chosen.trained and sample.rejected.trained
        else:
            sample = render_chat(r, chat_format, data.max_len)
            ok = sample.trained > 0
        if ok:
            out.append(sample)
        else:
            skipped += 1
    return out, skipped
