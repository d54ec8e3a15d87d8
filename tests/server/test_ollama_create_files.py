"""Issue 14 item 3 (RELIABILITY.md 40, 8): /api/create validates the files uploaded through /api/blobs before
it registers them. A billion-layer config, an unparsable safetensors header or a pickle that would run code
is a 400 at create, and no model appears (before, each was registered and later answered 500)."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "store"))
from store_fixtures import tiny_hf, tiny_meta  # noqa: E402


class WritesMarker:
    """Unpickling this runs ``exec``, which creates the marker file (RELIABILITY.md 8)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("create-files")
    return {"hf": tiny_hf(root / "hf"), "meta": tiny_meta(root / "meta")}


def _upload(http, files: dict[str, bytes]) -> dict[str, str]:
    digests = {}
    for name, data in files.items():
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
        digests[name] = digest
    return digests


def _create(server, name: str, files: dict[str, bytes]):
    with server.http() as http:
        r = http.post("/api/create", json={"model": name, "files": _upload(http, files), "stream": False})
        tags = [m["name"] for m in http.get("/api/tags").json()["models"]]
        assert http.get("/health").status_code == 200
    return r, tags


def _files(directory: Path, **replace: bytes) -> dict[str, bytes]:
    out = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    return out | replace


def test_create_registers_valid_hf_files(make_server, tiny):
    """Item 3: the control: the same upload with good files is created."""
    server = make_server()
    r, tags = _create(server, "tiny-hf-ok", _files(tiny["hf"]))
    assert r.status_code == 200, r.text
    assert "tiny-hf-ok:latest" in tags


def test_create_refuses_a_billion_layer_config(make_server, tiny):
    """Item 3: config.json with num_hidden_layers 10^9 -> 400 naming the field; nothing registered."""
    server = make_server()
    config = json.loads((tiny["hf"] / "config.json").read_text()) | {"num_hidden_layers": 10**9}
    r, tags = _create(server, "deep", _files(tiny["hf"], **{"config.json": json.dumps(config).encode()}))
    assert r.status_code == 400 and "num_hidden_layers" in r.json()["error"]
    assert "deep:latest" not in tags


@pytest.mark.parametrize("header", [b"{not json", b"", b"[1, 2]"], ids=["broken", "empty", "array"])
def test_create_refuses_an_unparsable_safetensors_file(make_server, tiny, header):
    """Item 3: a safetensors file whose header is not valid JSON (or is empty) -> 400; nothing registered."""
    server = make_server()
    bad = struct.pack("<Q", len(header)) + header + b"\0" * 64
    r, tags = _create(server, "broken", _files(tiny["hf"], **{"model.safetensors": bad}))
    assert r.status_code == 400, r.text
    assert "model.safetensors" in r.json()["error"]
    assert "broken:latest" not in tags


def test_create_refuses_a_pickle_that_would_run_code(make_server, tiny, tmp_path):
    """Item 3 / RELIABILITY 8: consolidated.00.pth whose unpickling runs exec -> 400; the marker never appears."""
    server = make_server()
    marker = tmp_path / "marker"
    evil = tmp_path / "consolidated.00.pth"
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": WritesMarker(marker)}, evil)
    r, tags = _create(server, "evil", _files(tiny["meta"], **{"consolidated.00.pth": evil.read_bytes()}))
    assert r.status_code == 400 and "pickle" in r.json()["error"]
    assert "evil:latest" not in tags and not marker.exists()
