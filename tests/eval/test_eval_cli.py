"""`corral eval`, `corral eval compare`, `corral eval contamination` through corral.cli.main."""

import json
import math

import pytest
import torch

from corral.cli import _with_default_step, main
from corral.eval import results, tasks


def test_eval_without_a_step_runs_the_default_step():
    assert _with_default_step(["eval", "m.gguf", "--tasks", "piqa"]) == ["eval", "run", "m.gguf", "--tasks", "piqa"]
    assert _with_default_step(["--debug", "eval", "--tasks", "piqa"]) == ["--debug", "eval", "run", "--tasks", "piqa"]
    for argv in (["eval", "compare", "a.json"], ["eval", "--help"], ["eval", "contamination", "--train", "x"],
                 ["run", "eval"]):
        assert _with_default_step(argv) == argv


def test_eval_writes_results_json_and_prints_the_table(one_thread, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--tasks", "arc_easy,winogrande", "--limit", "2", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report) == {"model", "config", "seed", "duration", "results"} and report["seed"] == 1234
    assert [(r["task"], r["metric"], r["n"]) for r in report["results"]] == [
        ("arc_easy", "acc", 2), ("arc_easy", "acc_norm", 2), ("winogrande", "acc", 2)]
    assert all(0 <= r["value"] <= 1 and r["stderr"] >= 0 for r in report["results"])
    assert report["config"]["tasks"] == ["arc_easy", "winogrande"] and report["duration"] > 0
    assert "| arc_easy | acc_norm |" in printed and report["model"] in printed


def test_unknown_task_is_one_line_naming_the_known_ones(capsys):
    assert main(["eval", "no_such_model.gguf", "--tasks", "hellaswag,nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope'" in err and "hellaswag, arc_easy" in err


def test_malformed_row_is_one_line_naming_file_and_line(one_thread, tmp_path, capsys):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "piqa_dev.jsonl").write_text('{"query": "Question: q\\n", "choices": ["a", "b"]}\n')
    assert main(["eval", "--tasks", "piqa", "--data-dir", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "piqa_dev.jsonl: gold: line 1: missing field 'gold'" in err and "Traceback" not in err


def _report(model: str, value: float) -> dict:
    rows = [{"task": "arc_easy", "metric": "acc", "value": value, "stderr": 0.02, "n": 100},
            {"task": "piqa", "metric": "acc", "value": value / 2, "stderr": 0.01, "n": 100}]
    return {"model": model, "config": {}, "seed": 1, "duration": 1.0, "results": rows}


def test_compare_prints_a_column_per_run_and_draws_the_plot(tmp_path, capsys):
    a = results.write_report(_report("base", 0.5), tmp_path / "a.json")
    b = results.write_report({**_report("tuned", 0.6), "results": _report("tuned", 0.6)["results"][:1]},
                             tmp_path / "b.json")
    plot = tmp_path / "cmp.png"
    assert main(["eval", "compare", str(a), str(b), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert "| arc_easy | acc | 0.5000 ± 0.0200 | 0.6000 ± 0.0200 |" in table
    assert "| piqa | acc | 0.2500 ± 0.0100 | – |" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_a_file_that_is_not_a_results_json(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"rows": []}')
    assert main(["eval", "compare", str(bad), "--plot", str(tmp_path / "p.png")]) == 1
    assert "not a results JSON" in capsys.readouterr().err


def test_contamination_flags_examples_copied_into_text_and_shards(tmp_path, capsys):
    from corral.data.shards import write_shard
    from corral.data.tokenize import tokenize_documents
    from corral.tokenizer import load_llama3_tokenizer

    arc, piqa = tasks.load_docs(tasks.TASKS["arc_easy"]), tasks.load_docs(tasks.TASKS["piqa"])
    (tmp_path / "train.txt").write_text("Some unrelated text. " + arc[5].query + " " + arc[5].choices[0] + " More.")
    shard = write_shard(tmp_path / "train.bin", tokenize_documents(["intro " + piqa[0].choices[0]],
                                                                   load_llama3_tokenizer()))
    out = tmp_path / "report.json"
    assert main(["eval", "contamination", "--train", str(tmp_path / "train.txt"), str(shard),
                 "--tasks", "arc_easy,piqa,boolq", "--output", str(out)]) == 0
    report = {row["task"]: row for row in json.loads(out.read_text())["tasks"]}
    assert report["arc_easy"]["examples_hit"] == [5]
    assert 0 in report["piqa"]["examples_hit"] and report["boolq"]["contaminated"] == 0
    assert "| arc_easy | 476 | 1 |" in capsys.readouterr().out


def test_perplexity_of_a_text_file_is_bits_per_byte_of_its_tokens(smollm2_fp32, tmp_path):
    from corral.eval.loglik import LocalModel
    from corral.eval.runner import EvalSettings, evaluate

    text = "Alice was beginning to get very tired of sitting by her sister on the bank.\n"
    path = tmp_path / "t.txt"
    path.write_text(text)
    report = evaluate(LocalModel.from_llm(smollm2_fp32), [tasks.TASKS["perplexity"]], EvalSettings(text=str(path)))
    values = {r.metric: r.value for r in report.results}
    ids = smollm2_fp32.tokenizer.encode(text)
    with torch.no_grad():
        logp = smollm2_fp32.model(torch.tensor([[smollm2_fp32.tokenizer.bos_id] + ids]))[0].log_softmax(-1)
    total = logp[:-1].gather(1, torch.tensor(ids)[:, None]).sum().item()
    nbytes = len(text.encode())
    assert values["bits_per_byte"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-4)
    assert values["byte_perplexity"] == pytest.approx(2 ** values["bits_per_byte"], rel=1e-6)
    assert values["word_perplexity"] == pytest.approx(math.exp(-total / 16), rel=1e-4)  # 15 words + the empty tail


def test_eval_opens_a_stored_model_by_name(one_thread, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    assert main(["eval", "smollm2:135m", "--tasks", "piqa", "--limit", "1", "--no-progress"]) == 0
    assert "model: smollm2:135m" in capsys.readouterr().out


def test_eval_of_a_missing_model_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    assert main(["eval", "no-such-model:1b", "--tasks", "piqa", "--limit", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("corral: error:") and err.count("\n") == 1
