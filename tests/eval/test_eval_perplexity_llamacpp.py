"""Bits per byte of the embedded SmolLM2 on held-out corpus text against llama.cpp on the same tokens."""

import math
from pathlib import Path

import numpy as np
import pytest

from corral.eval.loglik import LocalModel
from corral.eval.metrics import perplexities

TEXT = Path(__file__).parents[2] / "data" / "corpus" / "gutenberg" / "alice_in_wonderland.txt"


def test_bits_per_byte_matches_llamacpp_on_the_same_tokens_within_one_percent(one_thread):
    llama_cpp = pytest.importorskip("llama_cpp")
    import corral
    from corral.llm import default_model_path

    text = TEXT.read_text()[2000:4000]
    llm = corral.load()  # the GGUF's own Q4_1 blocks, as llama.cpp runs them
    ids = llm.tokenizer.encode(text)
    peer = llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=1024, n_batch=512, logits_all=True,
                           n_threads=1, verbose=False)
    assert peer.tokenize(text.encode(), add_bos=False, special=False) == ids  # same tokens
    prefix = llm.tokenizer.bos_id
    peer.eval([prefix] + ids)
    logits = np.asarray(peer.scores[: len(ids)], dtype=np.float64)  # row t predicts ids[t]
    peak = logits.max(axis=1, keepdims=True)
    logp = logits - peak - np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))
    theirs = perplexities([float(logp[np.arange(len(ids)), ids].sum())], [text])["bits_per_byte"]
    ours = perplexities(LocalModel.from_llm(llm).loglikelihood_rolling([text]), [text])["bits_per_byte"]
    assert math.isfinite(ours) and abs(ours - theirs) / theirs < 0.01, (ours, theirs)
