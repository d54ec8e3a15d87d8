"""The benchmark harness: prompts, medians, ratios, the table, the child-process protocol, and one tiny
end-to-end run on a random-weight GGUF with the corral runtime only (no llama.cpp or transformers)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import pytest
import torch

from corral.bench import harness as bench
from corral.bench import runtimes
from corral.bench.runtimes import BenchSpec, ChildResult
from corral.checkpoint.base import weight_shapes
from corral.checkpoint.gguf_write import export_gguf
from corral.model.config import ModelConfig
from corral.tokenizer.bpe import byte_to_unicode

TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=260, multiple_of=16, max_seq_len=256)


def tiny_tokenizer_meta() -> dict:
    """256 byte-level tokens, two merges, BOS/EOS: a vocabulary both Corral and llama.cpp load."""
    chars = [byte_to_unicode()[b] for b in range(256)]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": [*chars, "th", "the", "<s>", "</s>"],
        "tokenizer.ggml.merges": ["t h", "th e"],
        "tokenizer.ggml.token_type": [1] * 258 + [3, 3],  # byte-level tokens are NORMAL, as in GPT-2 vocabularies
        "tokenizer.ggml.bos_token_id": 258,
        "tokenizer.ggml.eos_token_id": 259,
    }


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=gen) * 0.1 for name, shape in weight_shapes(TINY).items()}
    for name in state:
        if name.endswith("norm.weight"):
            state[name] = torch.ones_like(state[name])
    path = tmp_path_factory.mktemp("bench") / "tiny.gguf"
    return export_gguf(TINY, state, path, metadata=tiny_tokenizer_meta())


def result(runtime="corral", variant="none", **kw) -> ChildResult:
    base = dict(import_s=1.0, load_s=2.0, peak_rss_mib=400.0, prefill_tok_s=[100.0], decode_tok_s=[10.0],
                batch_tok_s=[40.0])
    return ChildResult(runtime=runtime, variant=variant, **(base | kw))


# ---- prompts --------------------------------------------------------------------------------------


def test_make_prompts_gives_exact_prompt_length_and_distinct_short_prompts(tiny_gguf):
    tokenizer, add_bos = bench.load_gguf_tokenizer(tiny_gguf)
    prompt, shorts = bench.make_prompts(tokenizer, add_bos, prompt_tokens=512, batch=8, batch_len=32)
    assert len(prompt) == 512
    assert len(shorts) == 8
    assert len({tuple(s) for s in shorts}) == 8
    assert sorted(len(s) for s in shorts) == list(range(29, 37))
    assert all(0 <= i < TINY.vocab_size for s in [prompt, *shorts] for i in s)
    assert bytes(tokenizer.decode_bytes(prompt)).startswith(bench.PROMPT_TEXT[:100].encode())


def test_make_prompts_is_deterministic(tiny_gguf):
    tokenizer, add_bos = bench.load_gguf_tokenizer(tiny_gguf)
    assert bench.make_prompts(tokenizer, add_bos) == bench.make_prompts(tokenizer, add_bos)


# ---- medians, ratios, table -----------------------------------------------------------------------


def test_summarize_takes_medians_of_runs():
    row = bench.summarize(result(prefill_tok_s=[10.0, 30.0, 20.0], decode_tok_s=[5.0, 1.0, 3.0, 100.0],
                                 batch_tok_s=[7.0]))
    assert row["prefill_tok_s"] == 20.0
    assert row["decode_tok_s"] == 4.0
    assert row["batch_tok_s"] == 7.0
    assert row["name"] == "corral (none)"
    assert row["runs"] == 4


def test_add_ratios_divides_by_llamacpp_and_gives_batch_over_decode():
    rows = bench.add_ratios([bench.summarize(result("llamacpp", "", decode_tok_s=[100.0], prefill_tok_s=[250.0])),
                             bench.summarize(result("corral", "int8", decode_tok_s=[150.0], prefill_tok_s=[500.0],
                                                    batch_tok_s=[600.0], peak_rss_mib=200.0))])
    ours = rows[1]
    assert ours["ratio"]["decode_tok_s"] == pytest.approx(1.5)
    assert ours["ratio"]["prefill_tok_s"] == pytest.approx(2.0)
    assert ours["ratio"]["peak_rss_mib"] == pytest.approx(0.5)
    assert ours["batch_over_decode"] == pytest.approx(4.0)
    assert rows[0]["ratio"]["decode_tok_s"] == pytest.approx(1.0)


def test_add_ratios_without_baseline_leaves_ratios_empty():
    rows = bench.add_ratios([bench.summarize(result())])
    assert set(rows[0]["ratio"].values()) == {None}
    assert rows[0]["batch_over_decode"] == pytest.approx(4.0)


def test_format_table_shows_figures_ratios_and_errors():
    rows = bench.add_ratios([bench.summarize(result("llamacpp", "")),
                             bench.summarize(result("corral", "none", decode_tok_s=[20.0], notes=["reference path"])),
                             bench.summarize(ChildResult(runtime="transformers", error="ImportError: no"))])
    text = bench.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["runtime", "import", "s"]
    assert "20.0 (2.00x)" in lines[2]
    assert "10.0 (1.00x)" in lines[1]
    assert "error: ImportError: no" in lines[3]
    assert lines[1].index("10.0 (1.00x)") == lines[0].index("decode tok/s")  # columns line up
    assert "corral (none): reference path" in text


# ---- child protocol -------------------------------------------------------------------------------


def test_parse_child_output_takes_last_tagged_line_among_library_noise():
    good = ChildResult(runtime="llamacpp", load_s=0.2)
    stdout = "\n".join(["llama_model_loader: noise", bench.RESULT_TAG + json.dumps({"runtime": "old"}),
                        "more noise", bench.RESULT_TAG + json.dumps(asdict(good)), ""])
    assert bench.parse_child_output(stdout) == asdict(good)
    assert bench.parse_child_output("nothing here\n") is None


def test_launch_child_missing_model_gives_error_row_not_exception(tmp_path):
    spec = BenchSpec(runtime="corral", variant="none", model_path=str(tmp_path / "nope.gguf"), prompt=[1, 2],
                     batch_prompts=[[1]], new_tokens=2, runs=1)
    out = bench.launch_child(spec, timeout=120)
    assert out.error is not None and "nope.gguf" in out.error
    assert out.peak_rss_mib > 0


def test_unknown_quant_and_runtime_are_refused_by_the_parser():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--runtimes", "corral,llamacpp", "--corral-quant", "int8,int4,int8"])
    assert args.runtimes == ["corral", "llamacpp"]
    assert args.corral_quant == ["int8", "int4"]
    for bad in (["--runtimes", "vllm"], ["--corral-quant", "fp8"], ["--runs", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_cli_registers_bench_with_its_handler():
    from corral.cli import build_parser

    args = build_parser().parse_args(["bench", "model.gguf", "--runs", "1", "--json", "--debug"])
    assert args.handler is bench.cmd_bench
    assert (args.model, args.runs, args.json, args.debug) == ("model.gguf", 1, True, True)
    assert args.runtimes == ["corral", "llamacpp", "transformers"] and args.corral_quant == ["gguf"]


# ---- a tiny run end to end ------------------------------------------------------------------------


def test_tiny_run_on_corral_reports_positive_figures(tiny_gguf, capsys):
    code = bench.main([str(tiny_gguf), "--runtimes", "corral", "--runs", "2", "--prompt-tokens", "24",
                       "--new-tokens", "4", "--batch", "3", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    [row] = report["rows"]
    assert row["error"] is None, row["error"]
    assert row["runs"] == 2
    assert row["load_s"] > 0 and row["peak_rss_mib"] > 50
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["batch_tok_s"] > 0
    assert row["ratio"]["decode_tok_s"] is None  # llama.cpp did not run
    assert report["settings"]["prompt_tokens"] == 24


def test_cli_bench_missing_model_is_a_clean_error(tmp_path, capsys):
    assert bench.main([str(tmp_path / "absent.gguf"), "--runtimes", "corral"]) == 1
    assert "absent.gguf" in capsys.readouterr().err


def test_llamacpp_batched_path_matches_one_sequence_at_a_time(tiny_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(tiny_gguf), n_threads=1, n_threads_batch=1, n_ctx=256, n_batch=128, verbose=False)
    prompts = [[258, 10, 11, 12], [258, 40, 41], [258, 70, 71, 72, 73, 74]]
    single = [runtimes.llamacpp_single(llm, p, 6)[0] for p in prompts]
    ctx = runtimes.llamacpp_context(llm, len(prompts), 1)
    batched = runtimes.llamacpp_batched(llm, ctx, prompts, 6)
    assert batched == single
    assert runtimes.llamacpp_batched(llm, ctx, prompts, 6) == single  # the context is cleared between calls
    assert all(len(out) == 6 for out in batched)
    assert len({tuple(out) for out in batched}) > 1  # different prompts, different continuations


@pytest.mark.slow
def test_tiny_run_on_all_three_runtimes_has_no_error_rows_and_ratios(tiny_gguf, capsys):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("transformers")
    code = bench.main([str(tiny_gguf), "--runs", "1", "--prompt-tokens", "24", "--new-tokens", "3", "--batch", "2",
                       "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["runtime"] for r in rows] == ["llamacpp", "corral", "transformers"]
    assert [r["error"] for r in rows] == [None, None, None]
    assert all(r["ratio"]["decode_tok_s"] > 0 for r in rows)
    assert rows[0]["ratio"]["load_s"] == pytest.approx(1.0)
