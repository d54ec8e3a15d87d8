"""The embedded SmolLM2-135M-Instruct GGUF, end to end, against llama.cpp's recorded predictions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import corral
from corral.llm import default_model_path

GOLDEN = Path(__file__).parents[1] / "golden" / "smollm2_llamacpp_top1.json"
CAPITAL = [{"role": "user", "content": "Name the capital of France."}]


@pytest.fixture(scope="module")
def llm():
    return corral.load()


def test_default_model_is_the_smollm2_gguf(llm):
    assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = llm.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.vocab_size) == (576, 30, 9, 3, 49152)
    assert cfg.tie_embeddings


def test_teacher_forced_top1_agrees_with_llamacpp(llm):
    golden = json.loads(GOLDEN.read_text())
    ids = golden["token_ids"][: len(golden["top1"])]
    # Our GGUF tokenizer reads the fixed chat exactly as llama.cpp did (template tokens as specials).
    assert llm.tokenizer.encode(golden["text"], allow_special=True)[: len(ids)] == ids
    with torch.no_grad():
        ours = llm.model(torch.tensor([ids]))[0].argmax(-1).tolist()
    agree = sum(a == b for a, b in zip(ours, golden["top1"]))
    # transformers, dequantizing this file, reaches 126/128; the issue asks >= 95%.
    assert agree >= 0.95 * len(ids), f"top-1 agreement {agree}/{len(ids)}"


def test_default_model_answers_capital_of_france_with_paris(llm):
    result = llm.chat(CAPITAL, temperature=0, max_new_tokens=24)
    assert "Paris" in result.text
    assert result.finish_reason == "stop"


def test_greedy_generation_is_reproducible_and_seeded_sampling_repeats(llm):
    a = llm.generate("The three primary colors are", temperature=0, max_new_tokens=12)
    b = llm.generate("The three primary colors are", temperature=0, max_new_tokens=12)
    assert a.token_ids == b.token_ids and a.finish_reason == "length" and len(a.token_ids) == 12
    s1 = llm.generate("Once upon a time", temperature=1.0, top_p=0.95, seed=7, max_new_tokens=16)
    s2 = llm.generate("Once upon a time", temperature=1.0, top_p=0.95, seed=7, max_new_tokens=16)
    assert s1.token_ids == s2.token_ids


def test_stop_string_cuts_text_exactly(llm):
    full = llm.generate("1, 2, 3, 4, 5,", temperature=0, max_new_tokens=16)
    assert " 7," in full.text, full.text
    cut = llm.generate("1, 2, 3, 4, 5,", temperature=0, max_new_tokens=16, stop=[" 7,"])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(" 7,")]
    assert llm.generate("1, 2, 3, 4, 5,", temperature=0, max_new_tokens=16, stop=" 7,").text == cut.text


def test_streamed_deltas_join_to_the_final_text(llm):
    deltas = []
    result = llm.chat(CAPITAL, temperature=0, max_new_tokens=24, on_text=deltas.append)
    assert "".join(deltas) == result.text and len(deltas) > 1


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "corral.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_generate_chat_answers_paris():
    proc = run_cli("generate", "--chat", "--temperature", "0", "--max-tokens", "24", "Name the capital of France.")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


@pytest.mark.slow
def test_cli_chat_repl_answers_from_stdin():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "corral.cli", "chat", "--temperature", "0"],
                          input="Name the capital of France.\n/bye\n", capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_cli_missing_model_is_one_clean_line(tmp_path):
    proc = run_cli("generate", str(tmp_path / "nope.gguf"), "hello")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("corral: error:")
    assert "Traceback" not in proc.stderr


def test_cli_not_a_model_file_is_one_clean_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a model at all")
    proc = run_cli("generate", str(bad), "hello")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "GGUF" in proc.stderr


def test_cli_help_explains_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for word in ("generate", "chat", "GGUF", "SmolLM2"):
        assert word in proc.stdout


@pytest.mark.slow
def test_bfloat16_load_keeps_llamacpp_agreement_and_answers():
    llm = corral.load(dtype=torch.bfloat16)
    assert llm.model.tok_embeddings.weight.dtype == torch.bfloat16
    golden = json.loads(GOLDEN.read_text())
    ids = golden["token_ids"][: len(golden["top1"])]
    with torch.no_grad():
        ours = llm.model(torch.tensor([ids]))[0].argmax(-1).tolist()
    assert sum(a == b for a, b in zip(ours, golden["top1"])) >= 0.95 * len(ids)
    assert "Paris" in llm.chat(CAPITAL, temperature=0, max_new_tokens=24).text


GREEDY_GOLDEN = Path(__file__).parents[1] / "golden" / "smollm2_llamacpp_greedy.json"


def test_default_path_follows_llamacpp_greedy_continuations_teacher_forced(llm):
    """corral.load() runs the GGUF's own Q4_1 blocks with int8 activations, as llama.cpp does. Fed
    llama.cpp's own greedy answers (recorded with llama-cpp-python 0.3.36), our top-1 at each answer
    position is llama.cpp's next token 174 times of 183 (measured). Free-running greedy text agrees for
    a while, then can part at a near-tie: int8 rounding of activations turns 1e-6 differences in
    summation order (a whole-prompt pass against one token at a time) into different bits."""
    agree = total = 0
    for case in json.loads(GREEDY_GOLDEN.read_text())["cases"]:
        ids, greedy = case["ids"], case["llamacpp_greedy"]
        assert llm.chat_format.encode_dialog([{"role": "user", "content": case["prompt"]}]) == ids
        with torch.no_grad():
            top = llm.model(torch.tensor([ids + greedy[:-1]]))[0].argmax(-1).tolist()[len(ids) - 1:]
        agree += sum(a == b for a, b in zip(top, greedy))
        total += len(greedy)
    assert agree >= 0.9 * total, f"{agree}/{total}"


def test_default_path_logits_do_not_depend_on_how_the_prompt_is_chunked(llm):
    """Our Q4/Q8 matmuls and the C attention compute each token's row with the same arithmetic whatever
    the batch, so prefill, prefix-cached prefill and speculative checks give the same bits as decoding one
    token at a time. With int8 activations any difference would be amplified into different answers."""
    from corral.engine.kv_cache import SlotCache

    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog because", bos=llm.add_bos)
    config = llm.model.config
    with torch.no_grad():
        whole_cache = SlotCache(config, 1, 64, dtype=torch.float32)
        whole_cache.reserve(1, len(ids))
        whole = llm.model(torch.tensor([ids]), start_pos=0, cache=whole_cache.view(slice(0, 1), len(ids)))[0]
        step_cache = SlotCache(config, 1, 64, dtype=torch.float32)
        step_cache.reserve(1, len(ids))
        split = 5
        first = llm.model(torch.tensor([ids[:split]]), start_pos=0, cache=step_cache.view(slice(0, 1), split))[0]
        rest = [llm.model(torch.tensor([[t]]), start_pos=i, cache=step_cache.view(slice(0, 1), i + 1))[0, -1]
                for i, t in enumerate(ids[split:], start=split)]
    assert torch.equal(whole, torch.cat([first, torch.stack(rest)]))
