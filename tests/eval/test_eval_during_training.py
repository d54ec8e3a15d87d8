"""`corral pretrain ... --eval-tasks`: benchmark tasks each time pretraining validates."""

import json
from pathlib import Path

from corral.cli import main

REPO = Path(__file__).parents[2]


def test_pretrain_with_eval_tasks_logs_metrics_at_each_validation(one_thread, tmp_path):
    text = (REPO / "data" / "corpus" / "tinyshakespeare.txt").read_text()[:8000]
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "val.txt").write_text(text[-2000:])
    run = tmp_path / "run"
    code = main(["pretrain", str(REPO / "configs" / "pretrain" / "debug.toml"), f"--out_dir={json.dumps(str(run))}",
                 f"--data.train=[{json.dumps(str(tmp_path / 'train.txt'))}]",
                 f"--data.val=[{json.dumps(str(tmp_path / 'val.txt'))}]", "--model.dim=32", "--model.n_layers=2",
                 "--data.seq_len=32", "--data.batch_size=2", "--train.steps=2", "--train.val_every=1",
                 "--train.val_batches=1", "--checkpoint.every=0", "--train.progress=false",
                 "--eval-tasks", "arc_easy,winogrande", "--eval-limit=2"])
    assert code == 0
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["task"], r["metric"]) for r in rows] == [
        (step, task, metric) for step in (1, 2)
        for task, metric in (("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("winogrande", "acc"))]
    assert all(r["n"] == 2 and 0 <= r["value"] <= 1 for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert "eval/arc_easy/acc_norm" in events.Tags()["scalars"]
