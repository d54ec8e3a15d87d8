"""Bits per byte of SmolLM2 on held-out text: Corral against llama.cpp on the same tokens and windows.

The golden file (scripts/record_llamacpp_bpb.py) holds llama.cpp's log-likelihood of each rolling window,
so the comparison runs without llama-cpp-python; where it is installed, llama.cpp is also run live.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import corral
from corral.eval.loglik import LocalModel, rolling_windows
from corral.eval.metrics import perplexities

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from record_llamacpp_bpb import GOLDEN, MAX_LENGTH, held_out_text, llamacpp_window_logprobs, token_digest  # noqa: E402

pytestmark = pytest.mark.slow
TOLERANCE = 0.01  # the bar: within 1%


@pytest.fixture(scope="module")
def ours() -> dict:
    llm = corral.load()  # the GGUF run by Corral's own 4-bit kernels, as llama.cpp runs it
    scorer = LocalModel.from_llm(llm, max_length=MAX_LENGTH)
    text = held_out_text()
    ids = llm.tokenizer.encode(text, bos=False)
    windows = rolling_windows(ids, scorer.prefix_id, MAX_LENGTH)
    per_window = [lp for lp, _ in scorer.loglikelihood_tokens(windows)]
    (rolling,) = scorer.loglikelihood_rolling([text])
    return {"text": text, "ids": ids, "windows": windows, "per_window": per_window, "rolling": rolling,
            "bpb": perplexities([sum(per_window)], [text])["bits_per_byte"], "gguf": llm.name}


def test_rolling_log_likelihood_is_the_sum_of_its_windows(ours):
    assert ours["rolling"] == pytest.approx(sum(ours["per_window"]), rel=1e-9)
    assert sum(len(pred) for _, pred in ours["windows"]) == len(ours["ids"])  # every token scored once


def test_bits_per_byte_within_one_percent_of_llamacpp_golden(ours):
    golden = json.loads(GOLDEN.read_text())
    assert token_digest(ours["ids"]) == golden["token_digest"], "other tokens: rerun scripts/record_llamacpp_bpb.py"
    assert golden["llamacpp_tokenizes_the_same"]
    assert abs(ours["bpb"] - golden["bits_per_byte"]) <= TOLERANCE * golden["bits_per_byte"]
    for mine, theirs in zip(ours["per_window"], golden["window_logprobs"], strict=True):
        assert abs(mine - theirs) <= TOLERANCE * abs(theirs)


def test_bits_per_byte_within_one_percent_of_live_llamacpp(ours):
    llama_cpp = pytest.importorskip("llama_cpp")
    from corral.llm import default_model_path

    llm = llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=MAX_LENGTH + 8, n_batch=MAX_LENGTH + 8,
                          n_threads=2, logits_all=True, verbose=False)
    assert llm.tokenize(ours["text"].encode(), add_bos=False, special=False) == ours["ids"]
    theirs = perplexities([sum(llamacpp_window_logprobs(llm, ours["windows"]))], [ours["text"]])["bits_per_byte"]
    assert abs(ours["bpb"] - theirs) <= TOLERANCE * theirs
