"""Our MiniLM encoder against sentence-transformers (an independent implementation of the same release)."""

from __future__ import annotations

import pytest
import torch

from corral.embed import EmbedInputError, SentenceEncoder
from corral.embed.minilm import BertConfig, model_dir
from corral.errors import ConfigError, CorralError, FormatError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "",
    "Ünïcödé: naïve café, Straße, 東京タワー, Москва, emoji 🚀🦙 and a tab\there.",
    "A man is playing a guitar on stage.",
    "def add(a, b):\n    return a + b",
    "word " * 300,  # 302 word pieces: sentence-transformers cuts it at 256, as truncate=True must
]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder.load()


@pytest.fixture(scope="module")
def reference():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(model_dir()), device="cpu")


def test_encode_matches_sentence_transformers_on_mixed_text(encoder, reference):
    ours = encoder.encode(SENTENCES)
    theirs = torch.from_numpy(reference.encode(SENTENCES, batch_size=32, normalize_embeddings=False))
    assert ours.shape == theirs.shape == (len(SENTENCES), 384)
    assert (ours - theirs).abs().max().item() < 1e-5  # measured 1.6e-7; a tanh GELU gives 2e-4
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cosine.min().item() >= 0.9999


def test_count_tokens_matches_reference_tokenizer_with_specials(encoder, reference):
    theirs = [len(reference.tokenizer(s, add_special_tokens=True)["input_ids"]) for s in SENTENCES]
    assert encoder.count_tokens(SENTENCES) == theirs
    assert encoder.count_tokens([""]) == [2]  # [CLS] [SEP]: the file's fixed padding to 128 is off


def test_encode_returns_unit_float32_rows(encoder):
    out = encoder.encode(SENTENCES)
    assert out.dtype == torch.float32 and out.shape == (len(SENTENCES), encoder.dim)
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    assert encoder.name == "all-minilm" and encoder.dim == 384


def test_encode_empty_list_returns_zero_rows(encoder):
    out = encoder.encode([])
    assert out.shape == (0, 384) and out.dtype == torch.float32


def test_encode_batch_matches_single(encoder):
    batched = encoder.encode(SENTENCES, batch_size=32)
    single = torch.cat([encoder.encode([s]) for s in SENTENCES])
    pairs = encoder.encode(SENTENCES, batch_size=2)
    # Padding changes matmul shapes, so equal up to float rounding, not bit for bit.
    assert (batched - single).abs().max().item() < 1e-6
    assert (pairs - single).abs().max().item() < 1e-6


def test_encode_puts_paraphrases_closer_than_unrelated(encoder):
    a, b, c, d = encoder.encode(
        [
            "How do I bake sourdough bread at home?",
            "What is the recipe for homemade sourdough?",
            "The central bank raised interest rates again.",
            "Interest rates were increased by the central bank once more.",
        ]
    )
    assert a @ b > a @ c + 0.3 and a @ b > a @ d + 0.3
    assert c @ d > c @ a + 0.3 and c @ d > c @ b + 0.3


def test_encode_accepts_exactly_the_limit_without_truncation(encoder):
    text = "word " * 254  # 254 pieces + [CLS] + [SEP] = 256
    assert encoder.count_tokens([text]) == [encoder.max_tokens] == [256]
    assert encoder.encode([text], truncate=False).shape == (1, 384)


def test_encode_raises_typed_error_when_too_long_and_not_truncating(encoder):
    texts = ["short", "word " * 255]  # the second has 257 tokens
    with pytest.raises(EmbedInputError) as info:
        encoder.encode(texts, truncate=False)
    err = info.value
    assert isinstance(err, CorralError) and isinstance(err, ValueError)
    assert (err.index, err.tokens, err.limit) == (1, 257, 256)
    assert "input 1 has 257 tokens" in str(err) and "256" in str(err)


def test_encode_truncates_to_the_head_when_asked(encoder):
    head = "alpha beta gamma " * 84  # 252 pieces
    cut, full_head = encoder.encode([head + "delta epsilon zeta eta theta", head + "delta epsilon"])
    # Only the first 254 pieces survive, so both inputs keep exactly head + "delta epsilon".
    assert (cut - full_head).abs().max().item() < 1e-6
    assert encoder.count_tokens([head + "delta epsilon"]) == [256]


def test_bert_config_rejects_missing_field_and_unknown_activation():
    good = {
        "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "max_position_embeddings": 32, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu",
    }  # fmt: skip
    assert BertConfig.from_json(good).hidden_size == 8
    with pytest.raises(FormatError, match="num_attention_heads"):
        BertConfig.from_json({k: v for k, v in good.items() if k != "num_attention_heads"})
    with pytest.raises(ConfigError, match="swish"):
        BertConfig.from_json({**good, "hidden_act": "swish"})
    with pytest.raises(ConfigError, match="relative_key"):
        BertConfig.from_json({**good, "position_embedding_type": "relative_key"})
