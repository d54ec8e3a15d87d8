"""/v1/embeddings: MiniLM by name, the generative model otherwise; float and base64; inputs named on error."""

import base64

import numpy as np
import openai
import pytest

MODEL = "smollm2:135m"


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_minilm_embeddings_rank_similar_sentences_higher(live):
    r = live.client().embeddings.create(model="all-minilm", input=[
        "A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly tax filing deadlines."])
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and len(vecs[0]) == 384
    assert np.linalg.norm(vecs[0]) == pytest.approx(1.0, abs=1e-4)
    assert cosine(vecs[0], vecs[1]) > cosine(vecs[0], vecs[2])
    assert r.usage.prompt_tokens > 0


def test_llm_embeddings_accept_a_string_and_token_ids(live):
    client = live.client()
    llm = live.model().llm
    text = client.embeddings.create(model=MODEL, input="hello world")
    ids = llm.tokenizer.encode("hello world", bos=llm.add_bos)
    tokens = client.embeddings.create(model=MODEL, input=ids)
    assert len(text.data[0].embedding) == llm.config.dim
    assert np.allclose(text.data[0].embedding, tokens.data[0].embedding, atol=1e-5)
    assert text.usage.prompt_tokens == len(ids)


def test_embeddings_base64_decodes_to_the_float_vector(live):
    with live.http() as h:
        f = h.post("/v1/embeddings", json={"model": "all-minilm", "input": "hi"}).json()
        b = h.post("/v1/embeddings", json={"model": "all-minilm", "input": "hi", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, f["data"][0]["embedding"], atol=1e-6)


def test_embeddings_dimensions_truncate_and_renormalise(live):
    r = live.client().embeddings.create(model="all-minilm", input="hi", dimensions=64)
    assert len(r.data[0].embedding) == 64
    assert np.linalg.norm(r.data[0].embedding) == pytest.approx(1.0, abs=1e-4)


def test_embeddings_bad_input_is_a_400_naming_it(live):
    with pytest.raises(openai.BadRequestError) as info:
        live.client().embeddings.create(model="all-minilm", input=[1.5])
    assert info.value.body["param"] == "input"


def test_embeddings_over_the_limit_is_a_400_naming_the_input(live):
    with pytest.raises(openai.BadRequestError) as info:
        live.client().embeddings.create(model="all-minilm", input=["short", "word " * 1000])
    assert "input 1" in info.value.body["message"]
