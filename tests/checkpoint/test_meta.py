"""Meta checkpoints: params.json + consolidated.NN.pth, merged as Meta's model-parallel code splits them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from corral.checkpoint.base import weight_shapes
from corral.checkpoint.meta import export_meta, load_meta, read_pth
from corral.errors import ConfigError, FormatError
from corral.model.config import ModelConfig

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=128)
TIED = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, tie_embeddings=True)


def _random_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) for k, shape in weight_shapes(config).items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("n_shards", [1, 2])
def test_export_meta_then_load_meta_gives_identical_tensors(tmp_path, n_shards):
    state = _random_state(CONFIG)
    export_meta(CONFIG, state, tmp_path, n_shards=n_shards)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["params.json"] + [f"consolidated.{i:02d}.pth" for i in range(n_shards)])
    ckpt = load_meta(tmp_path)
    assert ckpt.format == "meta" and ckpt.config == CONFIG
    _assert_same(ckpt.state_dict, state)
    assert ckpt.metadata["params"] == json.loads((tmp_path / "params.json").read_text()) == CONFIG.to_params()


def test_export_meta_splits_shards_the_way_meta_model_parallel_code_does(tmp_path):
    state = _random_state(CONFIG)
    export_meta(CONFIG, state, tmp_path, n_shards=2)
    rank1 = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    # column-parallel: second half of the output rows; row-parallel: second half of the input columns.
    assert torch.equal(rank1["tok_embeddings.weight"], state["tok_embeddings.weight"][32:])
    assert torch.equal(rank1["layers.0.attention.wq.weight"], state["layers.0.attention.wq.weight"][16:])
    assert torch.equal(rank1["layers.1.attention.wk.weight"], state["layers.1.attention.wk.weight"][8:])
    assert torch.equal(rank1["layers.0.feed_forward.w3.weight"], state["layers.0.feed_forward.w3.weight"][48:])
    assert torch.equal(rank1["output.weight"], state["output.weight"][32:])
    assert torch.equal(rank1["layers.0.attention.wo.weight"], state["layers.0.attention.wo.weight"][:, 16:])
    assert torch.equal(rank1["layers.1.feed_forward.w2.weight"], state["layers.1.feed_forward.w2.weight"][:, 48:])
    assert torch.equal(rank1["layers.1.ffn_norm.weight"], state["layers.1.ffn_norm.weight"])
    # torch.save writes a view's whole storage; each shard must hold only its own half.
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert (tmp_path / "consolidated.01.pth").stat().st_size < 0.6 * total


def test_load_meta_merges_hand_split_shards(tmp_path):
    # Built here without export_meta, so merge is checked against an independent split.
    state = _random_state(CONFIG, seed=3)
    row_parallel = ("attention.wo.weight", "feed_forward.w2.weight")
    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}, {}]
    for key, tensor in state.items():
        if tensor.dim() == 1:
            parts = [tensor.clone()] * 4
        else:
            parts = tensor.chunk(4, dim=1 if key.endswith(row_parallel) else 0)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    shards[2]["rope.freqs"] = torch.randn(4)  # older Meta checkpoints carry it; ignored
    for i, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(CONFIG.to_params()))
    _assert_same(load_meta(tmp_path).state_dict, state)


def test_load_meta_refuses_replicated_norms_that_differ(tmp_path):
    export_meta(CONFIG, _random_state(CONFIG), tmp_path, n_shards=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["layers.1.attention_norm.weight"] = shard["layers.1.attention_norm.weight"] + 1
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(FormatError, match="replicated tensor differs") as info:
        load_meta(tmp_path)
    assert info.value.field == "layers.1.attention_norm.weight"


def test_load_meta_refuses_gap_in_shard_numbers(tmp_path):
    export_meta(CONFIG, _random_state(CONFIG), tmp_path, n_shards=2)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.02.pth")
    with pytest.raises(FormatError, match=r"missing \[1\]") as info:
        load_meta(tmp_path)
    assert info.value.field == "consolidated.01.pth"


def test_load_meta_refuses_shards_with_different_keys(tmp_path):
    export_meta(CONFIG, _random_state(CONFIG), tmp_path, n_shards=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    del shard["layers.0.feed_forward.w1.weight"]
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(FormatError, match="different tensors") as info:
        load_meta(tmp_path)
    assert info.value.field == "layers.0.feed_forward.w1.weight"


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.pop("layers.1.attention.wv.weight"), "layers.1.attention.wv.weight"),
    (lambda s: s.update({"layers.0.attention.wq.bias": torch.zeros(32)}), "layers.0.attention.wq.bias"),
    (lambda s: s.update({"norm.weight": torch.zeros(33)}), "norm.weight"),
    (lambda s: s.update({"norm.weight": [1.0, 2.0]}), "norm.weight"),
])
def test_load_meta_names_missing_unexpected_or_misshapen_tensors(tmp_path, edit, field):
    state = _random_state(CONFIG)
    edit(state)
    torch.save(state, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(CONFIG.to_params()))
    with pytest.raises(FormatError) as info:
        load_meta(tmp_path)
    assert info.value.field == field


def test_load_meta_tied_model_has_no_output_and_refuses_a_different_one(tmp_path):
    state = _random_state(TIED)
    export_meta(TIED, state, tmp_path)
    ckpt = load_meta(tmp_path)
    assert ckpt.config.tie_embeddings and "output.weight" not in ckpt.state_dict
    _assert_same(ckpt.state_dict, state)
    torch.save(dict(state, **{"output.weight": torch.zeros(64, 32)}), tmp_path / "consolidated.00.pth")
    with pytest.raises(FormatError, match="differs from tok_embeddings"):
        load_meta(tmp_path)


def test_load_meta_dtype_and_metadata(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in _random_state(CONFIG).items()}
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_text("IQ== 0\n")
    export_meta(CONFIG, state, tmp_path / "m", tokenizer_model=tokenizer)
    ckpt = load_meta(tmp_path / "m")
    assert {t.dtype for t in ckpt.state_dict.values()} == {torch.bfloat16}
    assert Path(ckpt.metadata["tokenizer_model"]).read_text() == "IQ== 0\n"
    as_f32 = load_meta(tmp_path / "m", dtype=torch.float32).state_dict
    assert {t.dtype for t in as_f32.values()} == {torch.float32}
    assert torch.equal(as_f32["norm.weight"], state["norm.weight"].float())


def test_export_meta_with_fewer_shards_removes_stale_ones(tmp_path):
    state = _random_state(CONFIG)
    export_meta(CONFIG, state, tmp_path, n_shards=4)
    export_meta(CONFIG, state, tmp_path, n_shards=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    _assert_same(load_meta(tmp_path).state_dict, state)


def test_export_meta_refuses_shard_count_that_does_not_divide(tmp_path):
    with pytest.raises(ConfigError, match="does not split into 3 shards"):
        export_meta(CONFIG, _random_state(CONFIG), tmp_path, n_shards=3)
    assert not list(tmp_path.glob("consolidated.*"))


@pytest.mark.parametrize("params, match", [
    ("{not json", "not valid JSON"),
    ("[1]", "not a JSON object"),
    (json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4, "bogus": 1}), "unknown keys"),
    (json.dumps({"dim": -1, "n_layers": 2, "n_heads": 4}), "dim must be a positive integer"),
])
def test_load_meta_refuses_bad_params_json(tmp_path, params, match):
    export_meta(CONFIG, _random_state(CONFIG), tmp_path)
    (tmp_path / "params.json").write_text(params)
    with pytest.raises(FormatError, match=match):
        load_meta(tmp_path)


def test_read_pth_refuses_non_dict_and_non_tensor_entries(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(FormatError, match="not a dict of tensors"):
        read_pth(tmp_path / "list.pth")
    torch.save({"a": torch.zeros(2), "b": {"nested": torch.zeros(1)}}, tmp_path / "nested.pth")
    with pytest.raises(FormatError, match="not a tensor") as info:
        read_pth(tmp_path / "nested.pth")
    assert info.value.field == "b"


def test_load_meta_refuses_directory_without_shards(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(CONFIG.to_params()))
    (tmp_path / "consolidated.pth").write_bytes(b"")  # not consolidated.NN.pth
    with pytest.raises(FormatError, match="no consolidated.NN.pth"):
        load_meta(tmp_path)
