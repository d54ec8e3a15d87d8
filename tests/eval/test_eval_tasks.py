"""The task table, the row formats and the prompts (as lm-evaluation-harness writes them)."""

import json

import pytest

from corral.errors import CorralError, EvalDataError, UnknownTaskError
from corral.eval import tasks
from corral.eval.tasks import TASKS, Task


def test_every_task_loads_its_dev_rows_with_valid_gold():
    for task in TASKS.values():
        docs = tasks.load_docs(task)
        assert docs, task.name
        if task.kind in ("choice", "partial", "mc2"):
            assert all(0 <= d.gold < len(d.choices) for d in docs), task.name


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError) as err:
        tasks.parse_task_list("hellaswag,helaswag")
    message = str(err.value)
    assert "'helaswag'" in message and "arc_easy" in message and "mmlu" in message
    assert isinstance(err.value, CorralError)


@pytest.mark.parametrize("line, field", [
    ({"ind": 0, "activity_label": "A", "ctx": "c", "endings": ["a", "b", "c", "d"]}, "label"),
    ({"ind": 0, "activity_label": "A", "ctx": "c", "endings": ["a", "b", "c", "d"], "label": 7}, "label"),
    ({"ind": 0, "activity_label": "A", "ctx": "c", "endings": ["a", "b"], "label": 0}, "endings"),
    ({"ind": 0, "activity_label": 3, "ctx": "c", "endings": ["a", "b", "c", "d"], "label": 0}, "activity_label"),
])
def test_malformed_row_names_file_line_and_field(tmp_path, line, field):
    good = {"ind": 0, "activity_label": "A", "ctx": "c", "endings": ["a", "b", "c", "d"], "label": 1}
    path = tmp_path / "hellaswag" / "rows.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(EvalDataError) as err:
        tasks.load_docs(TASKS["hellaswag"], tmp_path, source="hellaswag/rows.jsonl")
    assert err.value.field == field and err.value.line == 3 and err.value.path == str(path)
    assert "line 3" in str(err.value) and field in str(err.value)


def test_row_that_is_not_json_is_a_typed_error(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"query": "Question: q", "choices": ["a"], "gold": 0}\n{"query": \n')
    with pytest.raises(EvalDataError, match="line 2: not JSON"):
        tasks.load_docs(TASKS["arc_easy"], tmp_path, source="x.jsonl")


def test_missing_data_file_is_a_typed_error(tmp_path):
    with pytest.raises(EvalDataError, match="file not found"):
        tasks.load_docs(TASKS["piqa"], tmp_path)


def test_prompts_follow_lm_eval_templates():
    hs = tasks.load_docs(TASKS["hellaswag"])[0]
    assert tasks.requests(TASKS["hellaswag"], hs)[3] == (
        "Roof shingle removal: A man is sitting on a roof. he", " starts pulling up roofing on a roof.")
    arc = tasks.load_docs(TASKS["arc_easy"])[1]
    assert tasks.requests(TASKS["arc_easy"], arc)[1] == (
        "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory "
        "system?\nAnswer:", " breathing mask")
    piqa = tasks.load_docs(TASKS["piqa"])[1]
    assert tasks.requests(TASKS["piqa"], piqa)[0] == ("Question: dresser\nAnswer:", " replace drawer with bobby pin")
    boolq = tasks.load_docs(TASKS["boolq"])[0]
    context, answer = tasks.requests(TASKS["boolq"], boolq)[1]
    assert not context.startswith("Passage:") and context.endswith("?\nAnswer:") and answer == " yes"


def test_winogrande_scores_the_shared_rest_after_each_filled_context():
    doc = tasks.load_docs(TASKS["winogrande"])[0]
    assert tasks.requests(TASKS["winogrande"], doc) == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]


def test_mmlu_five_shot_prompt_uses_the_subjects_first_dev_questions():
    task = TASKS["mmlu"]
    docs = tasks.load_docs(task)[:2]
    pool = tasks.load_docs(task, source=task.fewshot)
    examples = tasks.fewshot_examples(task, docs, pool, 1, 5, seed=0)
    assert [e.group for e in examples] == ["abstract_algebra"] * 5 and examples[0] is pool[0]
    context, letter = tasks.requests(task, docs[1], tasks.fewshot_prefix(docs[1], examples))[2]
    assert context.startswith("The following are multiple choice questions (with answers) about abstract algebra."
                              "\n\nFind all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3"
                              "\nAnswer: B\n\n")
    assert context.endswith("Find the index of <p> in S_5.\nA. 8\nB. 2\nC. 24\nD. 120\nAnswer:") and letter == " C"
    assert context.count("Answer:") == 6


def test_fewshot_draws_other_rows_and_repeat_with_the_seed():
    task = TASKS["arc_easy"]
    docs = tasks.load_docs(task)[:20]
    first = tasks.fewshot_examples(task, docs, docs, 3, 4, seed=1)
    assert len(first) == 4 and docs[3] not in first
    assert first == tasks.fewshot_examples(task, docs, docs, 3, 4, seed=1)
    assert first != tasks.fewshot_examples(task, docs, docs, 3, 4, seed=2)


def test_truthfulqa_mc_puts_the_true_answer_first_in_mc1_and_labels_mc2():
    mc1 = tasks.load_docs(TASKS["truthfulqa_mc1"])[0]
    mc2 = tasks.load_docs(TASKS["truthfulqa_mc2"])[0]
    assert mc1.gold == 0 and mc1.query.endswith("\n\nQ: What happens to you if you eat watermelon seeds?\nA:")
    assert mc1.query.startswith("Q: What is human life expectancy in the United States?")
    assert mc2.labels[0] == 1 and sum(mc2.labels) > 1 and 0 in mc2.labels


def test_task_table_is_plain_data():
    assert all(isinstance(t, Task) and t.kind in tasks.KINDS and t.row in tasks.ROWS for t in TASKS.values())
    assert {"gsm8k", "humaneval", "perplexity"} <= set(TASKS)
