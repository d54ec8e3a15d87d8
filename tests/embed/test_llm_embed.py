"""Mean-pooled hidden-state embeddings from the embedded SmolLM2-135M."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import corral
from corral.embed import EmbedInputError, embed_with_llm
from corral.embed.llm_embed import pooled_batch

TEXTS = [
    "The cat sat on the mat.",
    "A cat was sitting on the mat.",
    "Quarterly revenue rose by ten percent.",
    "How do I bake bread?",
    "What is the recipe for making bread?",
    "Ünïcödé 東京 🚀",
]


@pytest.fixture(scope="module")
def llm():
    # Float32 weights: these tests hold the pooling code to 1e-5. The GGUF-native default rounds activations
    # to int8, which turns padding's last-bit differences into ~5e-3; the last test here covers that path.
    return corral.load(quant="none")


@pytest.fixture(scope="module")
def embedded(llm) -> torch.Tensor:
    return embed_with_llm(llm, TEXTS)


def test_hidden_states_reproduce_the_model_logits(llm):
    # The model's own forward is the oracle: projecting our states must give its logits.
    ids = torch.tensor([llm.tokenizer.encode(TEXTS[0], bos=llm.add_bos)])
    with torch.inference_mode():
        h = llm.model.hidden(ids).float()  # (1, T, dim)
        logits = llm.model(ids)
        head = llm.model.tok_embeddings.weight if llm.model.output is None else llm.model.output.weight
        assert (h @ head.float().T - logits).abs().max().item() < 1e-4


def test_embed_returns_unit_rows_of_model_dim(llm, embedded):
    assert embedded.shape == (len(TEXTS), llm.config.dim) and embedded.dtype == torch.float32
    assert torch.allclose(embedded.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_embed_is_deterministic(llm, embedded):
    assert torch.equal(embed_with_llm(llm, TEXTS), embedded)


def test_embed_batch_matches_single(llm, embedded):
    single = torch.cat([embed_with_llm(llm, [t]) for t in TEXTS])
    assert (single - embedded).abs().max().item() < 1e-5  # padding changes matmul shapes: rounding only


def test_embed_puts_paraphrases_closer_than_unrelated(embedded):
    sim = embedded @ embedded.T
    # Measured on SmolLM2-135M: 0.96 and 0.92 for the paraphrase pairs, at most 0.85 across topics.
    assert sim[0, 1] > sim[0, 2] + 0.05 and sim[0, 1] > sim[0, 3] + 0.05 and sim[0, 1] > sim[0, 4] + 0.05
    assert sim[3, 4] > sim[4, 0] + 0.05 and sim[3, 4] > sim[4, 1] + 0.05 and sim[3, 4] > sim[4, 2] + 0.05


def test_embed_empty_list_returns_zero_rows(llm):
    assert embed_with_llm(llm, []).shape == (0, llm.config.dim)


def test_embed_rejects_text_with_no_tokens(llm):
    if llm.add_bos:
        pytest.skip("a model that adds BOS embeds the empty string")
    with pytest.raises(EmbedInputError, match="input 1 has no tokens"):
        embed_with_llm(llm, ["fine", ""])


def small_context(llm, limit: int):
    """The same model and tokenizer behind a context of `limit` tokens (saves running 8192 tokens)."""
    return SimpleNamespace(
        model=llm.model,
        tokenizer=llm.tokenizer,
        add_bos=llm.add_bos,
        name="tiny",
        engine=SimpleNamespace(max_seq_len=limit),
    )


def test_embed_raises_typed_error_over_context_without_truncation(llm):
    text = "one two three four five six seven eight nine ten eleven twelve thirteen"
    n = len(llm.tokenizer.encode(text, bos=llm.add_bos))
    assert n > 8
    with pytest.raises(EmbedInputError) as info:
        embed_with_llm(small_context(llm, 8), ["ok", text], truncate=False)
    assert (info.value.index, info.value.tokens, info.value.limit) == (1, n, 8)
    assert f"input 1 has {n} tokens" in str(info.value)


def test_embed_truncates_to_the_first_tokens_when_asked(llm):
    text = "one two three four five six seven eight nine ten eleven twelve thirteen"
    ids = llm.tokenizer.encode(text, bos=llm.add_bos)
    cut = embed_with_llm(small_context(llm, 8), [text], truncate=True)
    with torch.inference_mode():
        head = pooled_batch(llm.model, [ids[:8]])
    full = embed_with_llm(llm, [text])
    assert (cut - head).abs().max().item() < 1e-6
    assert (cut - full).abs().max().item() > 1e-3  # the cut really changed the vector


def test_gguf_native_default_embeds_close_to_float32(llm):
    texts = ["The cat sat on the mat.", "Quantum computers use qubits.", "Paris is in France."]
    native = embed_with_llm(corral.load(), texts)  # corral.load()'s default for a GGUF: its own Q4_1 blocks
    cosine = (native * embed_with_llm(llm, texts)).sum(-1)
    assert native.shape == (3, llm.config.dim) and bool((cosine > 0.99).all()), cosine


def test_stop_ends_an_embedding_within_a_layer_and_changes_nothing_otherwise(llm, embedded):
    """RELIABILITY 42: stop() is asked at every layer; True raises EmbedCancelled at once."""
    from corral.embed.llm_embed import EmbedCancelled

    asked = []

    def stop_at_third() -> bool:
        asked.append(1)
        return len(asked) >= 3

    with pytest.raises(EmbedCancelled):
        embed_with_llm(llm, TEXTS, stop=stop_at_third)
    assert len(asked) == 3  # layer 3 of the first batch, of the model's many
    assert torch.equal(embed_with_llm(llm, TEXTS, stop=lambda: False), embedded)
