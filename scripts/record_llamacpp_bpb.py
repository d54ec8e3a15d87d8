"""Record llama.cpp's log-likelihood of held-out text, window by window, on the embedded SmolLM2 GGUF.

tests/eval/test_evalgen_bpb.py compares Corral's bits per byte against this golden file (so CI needs
no llama-cpp-python), and against live llama.cpp where it is installed. Both sides score the same
token ids in the same rolling windows (corral.eval.loglik.rolling_windows): each window is run
through llama.cpp with logits for every position, and log p(token | everything before) is summed.
This is what llama.cpp's `llama-perplexity` computes, without its fixed half-window stride.

    python scripts/record_llamacpp_bpb.py          (from the repository root, llama-cpp-python installed)
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXT_FILE = "data/corpus/gutenberg/alice_in_wonderland.txt"  # the pretraining configs' held-out file
CHARS = 4000
MAX_LENGTH = 256
GOLDEN = ROOT / "tests" / "golden" / "evalgen_smollm2_llamacpp_bpb.json"


def held_out_text() -> str:
    return (ROOT / TEXT_FILE).read_text(encoding="utf-8")[:CHARS]


def token_digest(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def llamacpp_window_logprobs(llm, windows: list[tuple[list[int], list[int]]]) -> list[float]:
    """Sum of log p(predicted tokens) per (context, predicted) window, from a llama_cpp.Llama(logits_all=True)."""
    out = []
    for ctx, pred in windows:
        tokens = ctx + pred
        llm.reset()
        llm.eval(tokens[:-1])
        scores = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)  # (T-1, vocab)
        rows = scores[len(ctx) - 1:]  # the positions that predict each of `pred`
        top = rows.max(-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(rows - top).sum(-1))  # log-sum-exp per row
        out.append(float((rows[np.arange(len(pred)), pred] - logz).sum()))
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT))
    import llama_cpp

    from corral.bench.harness import load_gguf_tokenizer
    from corral.eval.loglik import rolling_windows
    from corral.llm import default_model_path

    gguf = default_model_path()
    tokenizer, _ = load_gguf_tokenizer(gguf)
    text = held_out_text()
    ids = tokenizer.encode(text, bos=False)
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    windows = rolling_windows(ids, prefix, MAX_LENGTH)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=MAX_LENGTH + 8, n_batch=MAX_LENGTH + 8, n_threads=2,
                          logits_all=True, verbose=False)
    same_tokens = llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    per_window = llamacpp_window_logprobs(llm, windows)
    nbytes = len(text.encode("utf-8"))
    out = {"source": f"llama-cpp-python {llama_cpp.__version__}, {gguf.name}, n_threads=2",
           "text_file": TEXT_FILE, "chars": CHARS, "bytes": nbytes, "max_length": MAX_LENGTH,
           "prefix_id": prefix, "tokens": len(ids), "token_digest": token_digest(ids),
           "llamacpp_tokenizes_the_same": same_tokens, "window_logprobs": per_window,
           "bits_per_byte": -sum(per_window) / nbytes / math.log(2)}
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {len(windows)} windows, bits per byte {out['bits_per_byte']:.4f}")


if __name__ == "__main__":
    main()
