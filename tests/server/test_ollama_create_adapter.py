"""/api/create with `adapters` (Ollama's field: uploaded GGUF LoRA blobs): checked against the base's shapes,
stacked on it at load, so /api/generate answers with the adapter; one made for another base is a 400."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "store"))
from store_fixtures import tiny_meta  # noqa: E402

from corral.checkpoint.adapter import adapter_of  # noqa: E402
from corral.checkpoint.gguf_lora import export_gguf_adapter  # noqa: E402
from corral.checkpoint.load import load_checkpoint  # noqa: E402
from corral.llm import build_model  # noqa: E402
from corral.model.lora import LoRALinear, apply_lora  # noqa: E402

GREEDY = {"temperature": 0, "num_predict": 8, "seed": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny Meta model's files, a GGUF LoRA for it (B random, so it changes the answers) and one for a
    wider base."""
    root = tmp_path_factory.mktemp("adapter-create")
    meta = tiny_meta(root / "meta")
    ckpt = load_checkpoint(meta)
    model = apply_lora(build_model(ckpt.config, ckpt.state_dict), rank=4, alpha=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    adapter = adapter_of(model)
    good = export_gguf_adapter(adapter, root / "good.gguf").read_bytes()
    adapter.tensors["layers.0.feed_forward.w1.lora_a.weight"] = torch.zeros(4, 128)
    wide = export_gguf_adapter(adapter, root / "wide.gguf").read_bytes()
    return {"model": {p.name: p.read_bytes() for p in meta.iterdir() if p.is_file()}, "good": good, "wide": wide}


def _upload(http, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
    return digest


def test_create_with_an_adapter_blob_changes_the_answers_and_a_wrong_one_is_refused(make_server, files):
    server = make_server()
    with server.http(timeout=600) as http:
        model = {name: _upload(http, data) for name, data in files["model"].items()}
        assert http.post("/api/create", json={"model": "base", "files": model, "stream": False}).status_code == 200
        r = http.post("/api/create", json={"model": "tuned", "from": "base", "stream": False,
                                           "adapters": {"lora.gguf": _upload(http, files["good"])}})
        assert r.status_code == 200, r.text
        bad = http.post("/api/create", json={"model": "bad", "from": "base", "stream": False,
                                             "adapters": {"lora.gguf": _upload(http, files["wide"])}})
        assert bad.status_code == 400 and "blk.0.ffn_gate.weight.lora_a" in bad.text, bad.text
        tags = [m["name"] for m in http.get("/api/tags").json()["models"]]
        assert "tuned:latest" in tags and "bad:latest" not in tags
        answers = {name: http.post("/api/generate", json={"model": name, "prompt": "The sky is", "stream": False,
                                                          "raw": True, "options": GREEDY}).json()["response"]
                   for name in ("base", "tuned")}
    assert answers["base"] != answers["tuned"], answers
