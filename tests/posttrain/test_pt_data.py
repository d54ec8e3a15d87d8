"""Chat datasets: the row forms people have, labels on assistant tokens only, packing, typed errors."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import torch

from corral.errors import DatasetError, TemplateMismatchError
from corral.model.config import PRESETS
from corral.posttrain.config import FinetuneDataConfig
from corral.posttrain.data import (
    IGNORE_INDEX,
    Sample,
    chat_batches,
    load_dataset,
    pack_batch,
    pad_batch,
    render_chat,
    render_pair,
)
from corral.posttrain.finetune import template_format
from corral.posttrain.records import ChatRecord, read_records
from corral.posttrain.sft import hidden_states, sft_loss
from corral.tokenizer import load_llama3_tokenizer
from corral.tokenizer.chat_format import Llama3ChatFormat
from corral.train.loss import IGNORE_INDEX as TRAIN_IGNORE_INDEX
from corral.train.setup import fresh_model

REPO = Path(__file__).resolve().parents[2]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_llama3_tokenizer()


@pytest.fixture(scope="module")
def llama3(tokenizer):
    return Llama3ChatFormat(tokenizer, version="3.0")


def write(path: Path, rows, jsonl: bool = True, gz: bool = False) -> Path:
    text = "\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def labelled_text(tokenizer, sample: Sample) -> str:
    return tokenizer.decode([t for t, label in zip(sample.ids, sample.labels) if label != IGNORE_INDEX])


# --- row forms ------------------------------------------------------------------------------


def test_every_row_form_reads_as_the_same_conversation(tmp_path):
    want = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    files = [
        write(tmp_path / "alpaca.json", [{"system": "Be brief.", "instruction": "Hi", "input": "", "output": "Hello!"}],
              jsonl=False),
        write(tmp_path / "sharegpt.jsonl", [{"system": "Be brief.", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]),
        write(tmp_path / "messages.jsonl.gz", [{"messages": want}], gz=True),  # gzip decided from the bytes
    ]
    for path in files:
        (record,) = read_records([str(path)])
        assert record.messages == want, path.name


def test_preference_rows_in_four_forms_share_their_prompt(tmp_path):
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Joke?\n\nAssistant: Sure: puns.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Joke?\n\nAssistant: No."}
    rows = [hh,
            {"prompt": "Joke?", "chosen": "Sure: puns.", "rejected": "No."},
            {"conversations": [{"from": "human", "value": "Joke?"}], "chosen": {"from": "gpt", "value": "Sure: puns."},
             "rejected": {"from": "gpt", "value": "No."}},
            {"chosen": [{"role": "user", "content": "Joke?"}, {"role": "assistant", "content": "Sure: puns."}],
             "rejected": [{"role": "user", "content": "Joke?"}, {"role": "assistant", "content": "No."}]}]
    records = read_records([str(write(tmp_path / "pairs.jsonl", rows))])
    assert [m["content"] for m in records[0].prompt] == ["Hi", "Hey", "Joke?"]
    for r in records:
        assert r.prompt[-1] == {"role": "user", "content": "Joke?"}
        assert r.chosen == [{"role": "assistant", "content": "Sure: puns."}]
        assert r.rejected == [{"role": "assistant", "content": "No."}]


# --- rendering and labels -------------------------------------------------------------------


def test_labels_cover_only_assistant_turns_and_their_turn_ends(tokenizer, llama3):
    record = ChatRecord([{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                         {"role": "assistant", "content": "A2"}], "x:1")
    sample = render_chat(record, llama3, 512)
    assert sample.ids == llama3.encode_dialog(record.messages, add_generation_prompt=False)
    assert labelled_text(tokenizer, sample) == "A1<|eot_id|>A2<|eot_id|>"
    assert IGNORE_INDEX == TRAIN_IGNORE_INDEX


def test_jinja_template_labels_equal_the_native_llama3_format(tokenizer, llama3):
    """The same Llama 3 layout written as a Jinja template (as an HF tokenizer_config carries it)."""
    jinja = template_format(LLAMA3_TEMPLATE, tokenizer)
    record = ChatRecord([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}], "x:1")
    native, templated = render_chat(record, llama3, 512), render_chat(record, jinja, 512)
    assert native == templated


def test_pair_shares_the_prompt_and_labels_only_the_completions(tokenizer, llama3):
    (record,) = read_records([str(REPO / "tests" / "posttrain" / "pairs.jsonl")])[:1]
    pair = render_pair(record, llama3, 512)
    n_prompt = len(llama3.encode_dialog(record.prompt, add_generation_prompt=True))
    assert pair.chosen.ids[:n_prompt] == pair.rejected.ids[:n_prompt]
    assert labelled_text(tokenizer, pair.chosen) == record.chosen[0]["content"].strip() + "<|eot_id|>"
    assert labelled_text(tokenizer, pair.rejected) == record.rejected[0]["content"].strip() + "<|eot_id|>"
    cut = render_pair(record, llama3, 24)  # over the limit: the completion keeps half, the prompt its newest tokens
    assert len(cut.chosen.ids) <= 24 and cut.chosen.trained == min(pair.chosen.trained, 12)


# --- packing --------------------------------------------------------------------------------


def tiny_model():
    config = dataclasses.replace(PRESETS["debug"], dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                                 multiple_of=16)
    return fresh_model(config, torch.device("cpu"), 0)


def test_packed_samples_give_their_unpacked_logits_and_loss():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    samples = [Sample(ids, [IGNORE_INDEX] * 2 + ids[2:])
               for n in (5, 9, 3, 7, 6) for ids in [torch.randint(0, 300, (n,), generator=g).tolist()]]
    packed = pack_batch([samples[:2], samples[2:]], 20)
    with torch.no_grad():
        h = hidden_states(model, packed)  # (2, 20, dim)
        at = {0: 0, 1: 0}
        for row, s in [(0, samples[0]), (0, samples[1]), (1, samples[2]), (1, samples[3]), (1, samples[4])]:
            alone = model.hidden(torch.tensor([s.ids]))[0]
            assert torch.allclose(h[row, at[row]:at[row] + len(s.ids)], alone, atol=1e-5)
            at[row] += len(s.ids)
        packed_loss, _ = sft_loss(model, packed)
        padded_loss, _ = sft_loss(model, pad_batch(samples))
    assert abs(float(packed_loss) - float(padded_loss)) < 1e-5  # same tokens, same targets, same mean


def test_chat_batches_pack_rows_within_the_length():
    samples = [Sample(list(range(n)), list(range(n))) for n in (4, 6, 3, 8, 5, 2, 7)]
    batch = next(chat_batches(samples, 3, seed=0, pack=True, seq_len=12))
    assert batch.tokens.shape == (3, 12) and int(batch.lengths.max()) <= 12
    assert batch.positions is not None and all(int(p) == 0 for p in batch.positions[:, 0])


# --- bad input: typed errors naming the row and the field -----------------------------------


@pytest.mark.parametrize(("row", "field"), [
    ({"instruction": "Hi", "output": 3}, "output"),
    ({"instruction": "", "output": "x"}, "instruction"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]}, "conversations[1].from"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "messages"),
    ({"prompt": "Hi", "chosen": "A"}, "rejected"),
    ({"text": "free text"}, None),
])
def test_malformed_row_is_a_dataset_error_naming_row_and_field(tmp_path, row, field):
    good = {"instruction": "Hi", "output": "Hello"}
    path = write(tmp_path / "d.jsonl", [good, good, row])
    with pytest.raises(DatasetError) as info:
        read_records([str(path)])
    assert info.value.row == 3 and info.value.field == field and str(path) in str(info.value)


def test_bad_rows_can_be_skipped_and_counted(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello"}, {"instruction": "Hi"}])
    skipped: list = []
    assert len(read_records([str(path)], skip_bad=True, skipped=skipped)) == 1 and skipped[0].row == 2


def test_not_json_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Hi", "output": "x"}\n{"instruction": \n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: not valid JSON"):
        read_records([str(path)])


def test_empty_dataset_is_a_dataset_error(tmp_path, llama3):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="no training samples"):
        load_dataset(FinetuneDataConfig(train=[str(empty)]), llama3, pairs=False)
    with pytest.raises(DatasetError, match="data.train is empty"):
        load_dataset(FinetuneDataConfig(train=[]), llama3, pairs=False)


def test_chat_rows_for_a_preference_objective_are_refused(tmp_path, llama3):
    path = write(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    with pytest.raises(DatasetError, match="preference pairs"):
        load_dataset(FinetuneDataConfig(train=[str(path)]), llama3, pairs=True)


def test_chatml_template_on_a_llama3_tokenizer_is_a_template_mismatch(tokenizer):
    """<|im_end|> is plain text to Meta's tokenizer: the model could never learn to stop, so refuse."""
    chatml = template_format(CHATML_TEMPLATE, tokenizer)
    record = ChatRecord([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "d.jsonl:7")
    with pytest.raises(TemplateMismatchError, match=r"d\.jsonl:7: assistant turn 1 does not end with a stop token"):
        render_chat(record, chatml, 512)
