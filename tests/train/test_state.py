"""Checkpoints: commit markers, corruption, shape changes and full disks (RELIABILITY.md 29, 31-33)."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from train_fixtures import tiny_config, write_tiny_data

from corral.errors import ConfigError, FormatError
from corral.train import state as st
from corral.train.setup import setup


@pytest.fixture
def run(tmp_path):
    write_tiny_data(tmp_path)
    return setup(tiny_config(tmp_path / "run", tmp_path))


def _step(run):
    inputs, targets = run.loader.next_batch()
    loss = torch.nn.functional.cross_entropy(run.model(inputs).flatten(0, 1), targets.flatten())
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad()
    run.scheduler.step()


def _save(run, root, step):
    return st.save_checkpoint(root, step, run.model, run.optimizer, run.scheduler, run.loader, {"tokens_seen": step},
                              keep=2)


def test_save_then_load_restores_everything_exactly(run, tmp_path):
    _step(run)
    path = _save(run, tmp_path / "ck", 1)
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    moments = run.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    rng, position = torch.get_rng_state(), run.loader.state_dict()
    _step(run)
    torch.rand(3)
    meta = st.load_checkpoint(path, run.model, run.optimizer, run.scheduler, run.loader)
    assert meta["step"] == 1 and meta["extra"] == {"tokens_seen": 1}
    assert all(torch.equal(weights[k], v) for k, v in run.model.state_dict().items())
    assert torch.equal(run.optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert torch.equal(torch.get_rng_state(), rng)
    assert run.loader.state_dict() == position
    assert run.scheduler.last_epoch == 1


def test_checkpoint_without_commit_marker_is_ignored(run, tmp_path):
    root = tmp_path / "ck"
    good = _save(run, root, 1)
    partial = _save(run, root, 2)
    (partial / st.COMMIT).unlink()  # what a kill between writing and committing leaves
    assert st.latest_checkpoint(root) == good
    with pytest.raises(FormatError, match="COMMIT"):
        st.verify_checkpoint(partial)


@pytest.mark.parametrize("victim", ["__0_0.distcp", "meta.json", "rank0.pt"])
def test_corrupted_checkpoint_file_is_error_naming_it(run, tmp_path, victim):
    path = _save(run, tmp_path / "ck", 1)
    data = bytearray((path / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / victim).write_bytes(bytes(data))
    with pytest.raises(FormatError, match=victim) as info:
        st.load_checkpoint(path, run.model, run.optimizer, run.scheduler, run.loader)
    assert info.value.path.endswith(victim)


def test_truncated_checkpoint_file_is_error_naming_it(run, tmp_path):
    path = _save(run, tmp_path / "ck", 1)
    blob = path / "__0_0.distcp"
    blob.write_bytes(blob.read_bytes()[:100])
    with pytest.raises(FormatError, match="__0_0.distcp"):
        st.load_checkpoint(path, run.model, run.optimizer, run.scheduler, run.loader)


def test_resume_with_another_model_shape_is_explicit_error(run, tmp_path):
    path = _save(run, tmp_path / "ck", 1)
    wider = setup(tiny_config(tmp_path / "run2", tmp_path, **{"model.dim": 64}))
    with pytest.raises(ConfigError, match=r"another model shape.*dim: checkpoint 32 vs run 64"):
        st.load_checkpoint(path, wider.model, wider.optimizer, wider.scheduler, wider.loader)


def test_disk_full_during_save_keeps_last_good_checkpoint(run, tmp_path, monkeypatch):
    root = tmp_path / "ck"
    good = _save(run, root, 1)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    _step(run)

    def full_disk(state, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "_write_tensors", full_disk)
    with pytest.raises(OSError) as info:
        _save(run, root, 2)
    assert info.value.errno == errno.ENOSPC
    assert st.latest_checkpoint(root) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert not st.step_dir(root, 2).exists()
    st.verify_checkpoint(good)


def test_keep_prunes_only_after_commit(run, tmp_path):
    root = tmp_path / "ck"
    for step in (1, 2, 3):
        _save(run, root, step)
    assert [p.name for _, p, ok in st.list_checkpoints(root) if ok] == ["step_00000002", "step_00000003"]
    commit = json.loads((root / "step_00000003" / st.COMMIT).read_text())
    assert set(commit["files"]) == {"__0_0.distcp", ".metadata", "meta.json", "rank0.pt"}


def test_load_model_weights_gives_plain_meta_names(run, tmp_path):
    path = _save(run, tmp_path / "ck", 1)
    config, weights = st.load_model_weights(path)
    assert config.dim == 32
    assert set(weights) == set(run.model.state_dict())
    assert torch.equal(weights["layers.0.attention.wq.weight"], run.model.layers[0].attention.wq.weight)
