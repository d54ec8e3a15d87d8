"""Pull, push, blobs and create between two live Corral servers with their own stores (tiny models that are
only moved, never run), through the official `ollama` client, raw httpx and `corral pull/push/ps`."""

import hashlib
import importlib.util
import sys
from pathlib import Path

import httpx
import ollama
import pytest

from corral.store import Modelfile, Store, create_model

sys.path.insert(0, str(Path(__file__).parents[1] / "store"))
from store_fixtures import snapshot, tiny_gguf, tiny_hf  # noqa: E402


def _start_server():
    """The server-core helper's start_server (tests/server/conftest.py), loaded by path: another
    directory's conftest may own the module name `conftest`."""
    module = sys.modules.get("corral_server_conftest")
    if module is None:
        spec = importlib.util.spec_from_file_location("corral_server_conftest", Path(__file__).parent / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return module.start_server


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {"gguf": tiny_gguf(root / "tiny.gguf"), "hf": tiny_hf(root / "hf")}


@pytest.fixture
def servers(tmp_path, tiny):
    """(a, b): a holds `tiny` (a GGUF with system and parameters), b is empty."""
    start = _start_server()
    create_model(Store(tmp_path / "a"), "tiny", Modelfile(str(tiny["gguf"]), {"temperature": 0.5}, system="Be brief."))
    started = []
    try:
        for home in ("a", "b"):
            started.append(start(tmp_path / home))
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


def port(server) -> str:
    return server.url.rsplit(":", 1)[1]


def manifest_bytes(home: Path, name: str) -> bytes:
    return Store(home).read_manifest(name).to_bytes()


def test_pull_from_another_server_by_name_and_by_url(servers, tmp_path):
    a, b = servers
    c = ollama.Client(host=b.url)
    name = f"127.0.0.1:{port(a)}/library/tiny:latest"
    lines = list(c.pull(name, insecure=True, stream=True))
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    blobs = [x for x in lines if x.digest]
    assert blobs and all(x.total >= x.completed >= 0 for x in blobs)
    finished = {x.digest for x in blobs if x.completed == x.total}
    assert finished == Store(tmp_path / "a").read_manifest("tiny").digests()
    assert manifest_bytes(tmp_path / "b", name) == manifest_bytes(tmp_path / "a", "tiny")
    assert c.pull(f"{a.url}/tiny", stream=False).status == "success"
    # the embedded model is listed on a fresh store too (issue 14 item 15)
    assert {m.model for m in c.list().models} == {name, "tiny:latest", "smollm2:135m"}
    assert Store(tmp_path / "b").verify() == []


def test_push_to_another_server_by_url_and_by_name(servers, tmp_path):
    a, b = servers
    c = ollama.Client(host=b.url)
    c.pull(f"{a.url}/tiny")
    c.create(model="tiny-b", from_="tiny", system="Different.")
    assert c.push(f"{a.url}/tiny-b").status == "success"
    assert manifest_bytes(tmp_path / "a", "tiny-b") == manifest_bytes(tmp_path / "b", "tiny-b")
    target = f"127.0.0.1:{port(a)}/library/tiny-c:latest"
    c.copy("tiny-b", target)
    lines = list(c.push(target, insecure=True, stream=True))
    statuses = [x.status for x in lines]
    assert statuses[0] == "retrieving manifest" and statuses[-2:] == ["pushing manifest", "success"]
    assert manifest_bytes(tmp_path / "a", "tiny-c") == manifest_bytes(tmp_path / "b", "tiny-b")
    assert Store(tmp_path / "a").verify() == []
    assert "SYSTEM Different." in ollama.Client(host=a.url).show("tiny-c").modelfile


def test_failed_pulls_are_errors_and_store_nothing(servers, tmp_path):
    a, b = servers
    c = ollama.Client(host=b.url)
    with pytest.raises(ollama.ResponseError) as e:
        c.pull(f"{a.url}/nope")
    assert e.value.status_code == 404 and "nope" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        list(c.pull(f"{a.url}/nope", stream=True))  # the stream's last line is the error
    assert "404" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.pull("http://127.0.0.1:9/tiny")
    assert "no Corral server answers" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.pull("tiny")
    assert e.value.status_code == 400 and "names no server" in e.value.error
    # only the embedded model, listed from its package file without storing it (issue 14 item 15)
    assert [m.model for m in c.list().models] == ["smollm2:135m"]
    assert not (tmp_path / "b" / "models" / "blobs").exists()


def test_registry_refuses_bad_digests_and_blobs_that_do_not_match(servers, tmp_path):
    a, _ = servers
    before = snapshot(tmp_path / "a")
    data = b"not what the digest says"
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    with httpx.Client(base_url=a.url) as h:
        r = h.post(f"/v2/library/x/blobs/uploads/?digest={wrong}", content=data)
        assert r.status_code == 400 and "hashes to" in r.json()["error"]
        assert h.post("/v2/library/x/blobs/uploads/?digest=sha256:" + "G" * 64, content=data).status_code == 400
        assert h.get("/v2/library/tiny/blobs/sha256:" + "0" * 63).status_code == 400
        assert h.get("/v2/library/tiny/blobs/sha256:" + "0" * 64).status_code == 404
        assert h.get("/v2/library/nope/manifests/latest").status_code == 404
        manifest = Store(tmp_path / "a").read_manifest("tiny")
        body = manifest.to_bytes().replace(manifest.config.digest.encode(), wrong.encode())
        r = h.put("/v2/library/forged/manifests/latest", content=body)
        assert r.status_code == 400 and "missing" in r.json()["error"]
        right = "sha256:" + hashlib.sha256(data).hexdigest()
        assert h.head(f"/api/blobs/{right}").status_code == 404
    assert snapshot(tmp_path / "a") == before


def test_create_from_uploaded_gguf_and_hf_files(servers, tmp_path, tiny):
    _, b = servers
    c = ollama.Client(host=b.url)
    digest = c.create_blob(tiny["gguf"])
    with httpx.Client(base_url=b.url) as h:
        assert h.head(f"/api/blobs/{digest}").status_code == 200
    assert c.create(model="from-gguf", files={"tiny.gguf": digest}, parameters={"num_ctx": 64}).status == "success"
    store = Store(tmp_path / "b")
    assert store.model_path("from-gguf") == store.blobs.path(digest)
    files = {p.name: c.create_blob(p) for p in sorted(tiny["hf"].iterdir()) if p.is_file()}
    assert c.create(model="from-hf", files=files).status == "success"
    titles = {d.title for d in store.read_manifest("from-hf").layers if d.title}
    assert titles == set(files) - {"README.md"}
    assert not [p for p in store.models.iterdir() if p.name.startswith(".create-")]
    with pytest.raises(ollama.ResponseError) as e:
        c.create(model="bad", files={"../x.gguf": digest})
    assert e.value.status_code == 400


def test_create_quantizes_and_reads_the_older_modelfile_shape(servers, tmp_path):
    from corral.checkpoint.gguf_reader import read_gguf

    a, _ = servers
    c = ollama.Client(host=a.url)
    store = Store(tmp_path / "a")
    assert c.create(model="tiny-int8", from_="tiny", quantize="int8").status == "success"
    assert store.info("tiny-int8").config["quant"] == "int8"
    assert store.model_path("tiny-int8") == store.model_path("tiny")  # runtime quant: no new weights
    assert c.create(model="tiny-q8", from_="tiny", quantize="q8_0").status == "success"
    with read_gguf(store.model_path("tiny-q8")) as g:
        assert g.tensors["blk.0.attn_q.weight"].type_name == "Q8_0"
    assert store.info("tiny-q8").system == "Be brief."  # the base's SYSTEM carried over
    assert c.create(model="tiny-q4km", from_="tiny", quantize="q4_K_M").status == "success"  # Ollama's spelling
    with read_gguf(store.model_path("tiny-q4km")) as g:
        assert g.metadata["general.file_type"] == 15  # llama.cpp's MOSTLY_Q4_K_M
    with pytest.raises(ollama.ResponseError) as e:
        c.create(model="tiny-x", from_="tiny", quantize="q3_K_S")
    assert e.value.status_code == 400 and "quantize" in e.value.error
    with httpx.Client(base_url=a.url) as h:
        r = h.post("/api/create", json={"model": "old", "modelfile": "FROM tiny\nSYSTEM Old style.", "stream": False})
    assert r.json() == {"status": "success"} and store.info("old").system == "Old style."
    assert not [p for p in store.models.iterdir() if p.name.startswith(".quantize-")]


def test_cli_pull_push_against_a_server(servers, tmp_path, monkeypatch, capsys):
    from corral.cli import main

    a, _ = servers
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "c"))
    assert main(["pull", "tiny", "--from", a.url, "--as", "t3"]) == 0
    assert manifest_bytes(tmp_path / "c", "t3") == manifest_bytes(tmp_path / "a", "tiny")
    assert main(["push", "t3", "--to", f"127.0.0.1:{port(a)}"]) == 0
    assert manifest_bytes(tmp_path / "a", "t3") == manifest_bytes(tmp_path / "a", "tiny")
    assert main(["pull", "nope", "--from", a.url]) == 1
    assert "answered 404" in capsys.readouterr().err


def test_cli_ps_prints_ollama_columns(live, monkeypatch, capsys):
    from corral.cli import main

    monkeypatch.setenv("CORRAL_HOST", live.url)
    assert main(["ps"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "UNTIL"]
    [row] = [r for r in rows if r.startswith("smollm2:135m")]
    digest = live.model().digest.removeprefix("sha256:")
    assert digest[:12] in row and "100% CPU" in row and row.endswith("Forever")
