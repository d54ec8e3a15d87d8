"""RELIABILITY.md 11-16 for the model store: bad names, digests, blobs, manifests, archives, kill -9, rm."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from store_fixtures import snapshot

from corral.errors import CorralError, FormatError
from corral.store import Modelfile, Store, create_model
from corral.store.blobs import BlobMismatchError, sha256_digest
from corral.store.transfer import copy_between, export_archive, import_archive

ROOT = Path(__file__).parents[2]


def _create(store, name, path, **kw):
    return create_model(store, name, Modelfile(from_=str(path), **kw))


# -- 11: names and digests -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../evil", "/abs", "a/../../b", "x\x00y", "n" * 10_000, "../../../../tmp/x:y"])
def test_traversal_names_leave_store_and_outside_untouched(tmp_path, store, models, bad):
    _create(store, "good", models["gguf"])
    before, outside = snapshot(store.home), snapshot(tmp_path)
    for action in (lambda: _create(store, bad, models["gguf"]), lambda: store.copy("good", bad),
                   lambda: store.remove(bad), lambda: store.info(bad), lambda: store.model_path(bad)):
        with pytest.raises(CorralError):
            action()
    assert snapshot(store.home) == before
    assert snapshot(tmp_path) == outside


@pytest.mark.parametrize("bad", ["sha256:../../x", "sha256:" + "a" * 63, "sha256:" + "a" * 65, "sha256:" + "A" * 64,
                                 "sha1:" + "a" * 40])
def test_traversal_digests_never_become_paths(tmp_path, store, bad):
    before = snapshot(tmp_path)
    for action in (lambda: store.blobs.path(bad), lambda: store.blobs.ingest(io.BytesIO(b"x"), bad, 1),
                   lambda: store.blobs.check(bad), lambda: store.blobs.remove(bad)):
        with pytest.raises(CorralError):
            action()
    assert snapshot(tmp_path) == before


# -- 12: corrupt blobs -----------------------------------------------------------------------------
@pytest.mark.parametrize("data,size", [(b"not the bytes", 13), (b"hello", 4), (b"hello!", 6), (b"hello" * 1000, 5)])
def test_blob_that_does_not_match_its_digest_is_refused_and_its_temp_file_deleted(store, data, size):
    digest = sha256_digest(b"hello")
    with pytest.raises(BlobMismatchError):
        store.blobs.ingest(io.BytesIO(data), digest, size)
    assert not store.blobs.path(digest).exists()
    assert list(store.blobs.root.iterdir()) == []


def test_verify_reports_a_blob_corrupted_on_disk(store, models):
    manifest = _create(store, "m", models["gguf"])
    assert store.verify() == []
    path = store.blobs.path(manifest.layers[0].digest)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = store.verify()
    assert len(problems) == 1 and manifest.layers[0].digest in problems[0]


def test_pull_of_a_corrupt_source_blob_is_refused_and_leaves_no_blob(tmp_path, store, models):
    source = Store(tmp_path / "src")
    manifest = _create(source, "m", models["gguf"])
    path = source.blobs.path(manifest.layers[0].digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BlobMismatchError):
        copy_between(source, "m", store)
    assert not store.blobs.path(manifest.layers[0].digest).exists()
    assert store.entries() == [] and store.blobs.stray_files() == []


# -- 13: bad manifests in a source store -------------------------------------------------------------
def _source_with_manifest(tmp_path, models, edit):
    source = Store(tmp_path / "src")
    manifest = _create(source, "m", models["gguf"])
    body = json.loads(manifest.to_bytes())
    edit(body)
    source.manifest_path(source.info("m").name).write_text(json.dumps(body))
    return source


@pytest.mark.parametrize("edit", [
    lambda b: b["layers"][0].update(digest="sha256:../../../../etc/passwd"),
    lambda b: b.update(layers=[]),
    lambda b: b.update(layers=b["layers"] * 100_000),  # 15 MB of JSON; refused by size first
    lambda b: b["layers"][0].update(size=b["layers"][0]["size"] + 1),
    lambda b: b["config"].update(digest="sha256:" + "0" * 64),
])
def test_bad_manifest_is_refused_before_any_write(tmp_path, models, edit):
    source = _source_with_manifest(tmp_path, models, edit)
    dest = Store(tmp_path / "dest")
    with pytest.raises(CorralError):
        copy_between(source, "m", dest)
    assert not dest.home.exists()


# -- 14: archives ----------------------------------------------------------------------------------
def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "fifo", "stray"])
def test_archive_with_traversal_or_links_is_refused(tmp_path, store, kind):
    digest_name = "sha256-" + "ab" * 32
    member = tarfile.TarInfo({"dotdot": "models/blobs/../../../evil", "absolute": "/tmp/evil",
                              "stray": "models/evil.sh"}.get(kind, f"models/blobs/{digest_name}"))
    if kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        member.type, member.linkname = tarfile.LNKTYPE, "/etc/passwd"
    elif kind == "fifo":
        member.type = tarfile.FIFOTYPE
    else:
        member.size = 3
    archive = _tar_with(tmp_path / "bad.tar", member, b"bad")
    before = snapshot(tmp_path)
    with pytest.raises(FormatError):
        import_archive(store, archive)
    assert snapshot(tmp_path) == before and not (tmp_path / "evil").exists()


def test_archive_round_trip_restores_the_model(tmp_path, store, models):
    _create(store, "m:1", models["hf"], system="hi")
    export_archive(store, "m:1", tmp_path / "m.tar")
    with tarfile.open(tmp_path / "m.tar") as tar:
        assert all(m.uname == "" and m.isfile() for m in tar.getmembers())
    other = Store(tmp_path / "other")
    assert [str(n) for n in import_archive(other, tmp_path / "m.tar", "copy:2")] == ["copy:2"]
    assert other.info("copy:2").system == "hi" and other.verify() == []
    assert other.read_manifest("copy:2") == store.read_manifest("m:1")


# -- 15: kill -9 during writes ---------------------------------------------------------------------
def _child(script: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(home)], env=env,
                            stdout=subprocess.PIPE, text=True)


def test_kill_during_blob_write_leaves_no_partial_blob(tmp_path, store):
    child = _child("""
        import sys, time
        from corral.store import Store
        class Slow:
            def __init__(self): self.n = 0
            def read(self, k):
                self.n += 1
                if self.n == 2: print("writing", flush=True)
                time.sleep(0.05)
                return b"x" * 1024 if self.n < 10_000 else b""
        Store(sys.argv[1]).blobs.ingest(Slow(), "sha256:" + "ab" * 32, 1024 * 9999)
    """, store.home)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert store.blobs.digests() == []  # only a temp file, never a final name
    assert store.verify() == []
    assert all(p.name.endswith(".tmp") for p in store.blobs.stray_files())
    for p in store.blobs.stray_files():
        os.utime(p, (0, 0))  # an old leftover: the next garbage collection clears it
    store.collect_garbage()
    assert store.blobs.stray_files() == []


def test_kill_during_manifest_writes_leaves_old_or_new_manifest(tmp_path, store, models):
    _create(store, "m", models["gguf"], system="A")
    _create(store, "other", models["gguf"], system="B")
    versions = {store.read_manifest("m"), store.read_manifest("other")}
    child = _child("""
        import sys
        from corral.store import Store
        from corral.store.names import parse_name
        s = Store(sys.argv[1])
        a, b = s.read_manifest("m"), s.read_manifest("other")
        print("looping", flush=True)
        for i in range(100_000):
            s.write_manifest(parse_name("m"), a if i % 2 else b)
    """, store.home)
    assert child.stdout.readline().strip() == "looping"
    time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert store.read_manifest("m") in versions
    assert store.verify() == []


# -- 16: shared blobs and removal during generation -----------------------------------------------
def test_shared_blob_survives_removing_one_model(store, models):
    from corral.checkpoint.load import load_checkpoint

    a = _create(store, "a", models["gguf"], system="A")
    _create(store, "b", models["gguf"], system="B")
    store.copy("a", "c")
    _, freed = store.remove("a")
    assert freed == 0  # "c" still names every blob of "a"
    _, freed = store.remove("c")
    assert freed > 0 and store.blobs.has(a.layers[0].digest)  # the model blob "b" shares stays
    assert load_checkpoint(store.model_path("b")).config.dim == 64
    assert store.verify() == []
    store.remove("b")
    assert store.blobs.digests() == [] and store.entries() == []


@pytest.mark.slow
def test_model_removed_while_generating_finishes_and_a_sharing_model_still_loads(store, models):
    import corral

    _create(store, "gen", models["meta"])
    _create(store, "twin", models["meta"], system="same weights")
    llm = corral.load(store.model_path("gen"))
    removed = threading.Event()

    def on_text(_):
        if not removed.is_set():
            store.remove("gen")
            removed.set()

    result = llm.generate("Hello", temperature=0, max_new_tokens=8, on_text=on_text)
    assert removed.is_set() and len(result.token_ids) == 8 and result.finish_reason == "length"
    assert "gen:latest" not in [str(e.name) for e in store.entries()]
    assert corral.load(store.model_path("twin")).config.dim == 64
    assert store.verify() == []


def test_listing_skips_a_manifest_deleted_while_it_is_read(tmp_path, monkeypatch):
    """A soak found /api/tags answering 500: a concurrent delete removed a manifest between the listing's
    glob and its stat. A model that vanishes mid-listing is simply not listed."""
    from pathlib import Path

    from corral.store import Store

    store = Store(tmp_path)
    real_stat = Path.stat
    # one manifest path that a concurrent delete removes at the moment the listing reads it
    path = store.manifests / "corral.local" / "library" / "gone" / "latest"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"{}")

    class Manifest:
        def total_size(self):
            return 0

    monkeypatch.setattr(store, "read_manifest", lambda name: Manifest())

    def stat(self, *args, **kwargs):
        if self == path:
            self.unlink(missing_ok=True)
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    assert store.entries() == []
