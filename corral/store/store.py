"""The local model store under ``$CORRAL_HOME`` (default ``~/.corral``), Ollama's layout:

    models/manifests/<host>/<namespace>/<model>/<tag>   Docker v2 JSON (manifest.py)
    models/blobs/sha256-<64 hex>                          content-addressed bytes (blobs.py)
    models/views/<manifest hex>/<file>                    symlinks that give an HF or Meta model its
                                                          file names back (derived, rebuilt on demand)

Writers take an exclusive lock on ``models/.lock`` so that garbage collection never deletes a
blob a concurrent create has written but not yet referenced. Every file appears atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from corral.checkpoint.atomic import fsync_directory, write_atomic
from corral.errors import FormatError, ModelNotFoundError
from corral.store import manifest as mt
from corral.store.blobs import BlobStore, Progress
from corral.store.manifest import Manifest, parse_config, parse_manifest
from corral.store.names import ModelName, parse_name
from corral.store.scratch import collect_scratch, stale_scratch, tree_size

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a single writer at a time is the user's job there
    fcntl = None

MAX_SMALL_BLOB = 16 << 20  # template, system, params, messages, license and config blobs are text


def default_home() -> Path:
    return Path(os.environ.get("CORRAL_HOME") or Path.home() / ".corral")


@dataclass
class ModelEntry:
    name: ModelName
    digest: str
    """sha256 of the manifest bytes (what `list` shows as ID)."""
    size: int
    modified: float


@dataclass
class ModelInfo:
    name: ModelName
    manifest: Manifest
    config: dict
    parameters: dict = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    licenses: list[str] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    adapters: list[Path] = field(default_factory=list)


class Store:
    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home is not None else default_home()
        self.models = self.home / "models"
        self.manifests = self.models / "manifests"
        self.views = self.models / "views"
        self.blobs = BlobStore(self.models / "blobs")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.models.mkdir(parents=True, exist_ok=True)
        with open(self.models / ".lock", "a") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield

    # -- manifests --------------------------------------------------------------------------------
    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests.joinpath(*name.parts)

    def read_manifest(self, name: str | ModelName) -> Manifest:
        name = parse_name(name) if isinstance(name, str) else name
        path = self.manifest_path(name)
        if not path.is_file():
            raise ModelNotFoundError(f"model {str(name)!r} not found; `corral list` shows the stored models")
        with open(path, "rb") as f:
            data = f.read(mt.MAX_MANIFEST_BYTES + 1)
        return parse_manifest(data, path=str(name))

    def write_manifest(self, name: ModelName, manifest: Manifest) -> None:
        """Point `name` at `manifest`; every blob it names must already be present with its size."""
        for d in (manifest.config, *manifest.layers):
            if not self.blobs.has(d.digest, d.size):
                raise FormatError(f"blob {d.digest} is missing or not {d.size} bytes", field=d.media_type)
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = manifest.to_bytes()
        write_atomic(path, lambda tmp: tmp.write_bytes(data))

    def entries(self) -> list[ModelEntry]:
        """Every stored model whose manifest path is a valid name (temp files and strays are skipped)."""
        out = []
        if not self.manifests.is_dir():
            return out
        for path in sorted(self.manifests.glob("*/*/*/*")):
            try:
                name = parse_name("/".join(path.relative_to(self.manifests).parts[:3]) + ":" + path.name)
                manifest = self.read_manifest(name)
                data, mtime = path.read_bytes(), path.stat().st_mtime
            except (FormatError, ValueError, ModelNotFoundError):
                continue
            except FileNotFoundError:  # removed by a concurrent delete after the listing: it is gone, not an error
                continue
            out.append(ModelEntry(name, "sha256:" + hashlib.sha256(data).hexdigest(), manifest.total_size(), mtime))
        return out

    # -- reading a model --------------------------------------------------------------------------
    def read_small_blob(self, digest: str) -> bytes:
        path = self.blobs.path(digest)
        if not path.is_file():
            raise FormatError(f"blob {digest} is missing; run `corral verify`")
        with open(path, "rb") as f:
            data = f.read(MAX_SMALL_BLOB + 1)
        if len(data) > MAX_SMALL_BLOB:
            raise FormatError(f"blob {digest} is over {MAX_SMALL_BLOB} bytes for a text layer")
        return data

    def _text(self, manifest: Manifest, media_type: str) -> str | None:
        layers = manifest.layers_of(media_type)
        return self.read_small_blob(layers[0].digest).decode("utf-8", "replace") if layers else None

    def info(self, name: str | ModelName) -> ModelInfo:
        name = parse_name(name) if isinstance(name, str) else name
        manifest = self.read_manifest(name)
        config = parse_config(self.read_small_blob(manifest.config.digest))
        params = json.loads(self._text(manifest, mt.PARAMS) or "{}")
        messages = json.loads(self._text(manifest, mt.MESSAGES) or "[]")
        if not isinstance(params, dict) or not isinstance(messages, list):
            raise FormatError("params must be a JSON object and messages a JSON list", path=str(name))
        licenses = [self.read_small_blob(d.digest).decode("utf-8", "replace") for d in manifest.layers_of(mt.LICENSE)]
        return ModelInfo(name, manifest, config, params, self._text(manifest, mt.TEMPLATE),
                         self._text(manifest, mt.SYSTEM), licenses, messages,
                         [self.blobs.path(d.digest) for d in manifest.layers_of(mt.ADAPTER)])

    def model_path(self, name: str | ModelName) -> Path:
        """What `corral.load` opens: the GGUF blob itself, or a view directory for an HF or Meta model."""
        manifest = self.read_manifest(name)
        model = manifest.layers_of(mt.MODEL)
        if model:
            return self.blobs.path(model[0].digest)
        return self._view(manifest)

    def _view(self, manifest: Manifest) -> Path:
        key = hashlib.sha256(manifest.to_bytes()).hexdigest()
        final = self.views / key
        if final.is_dir():
            return final
        self.views.mkdir(parents=True, exist_ok=True)
        tmp = self.views / f".{key}.{secrets.token_hex(8)}.tmp"
        tmp.mkdir()
        try:
            for layer in manifest.layers_of(mt.MODEL_FILE):
                # Relative links keep the store movable; the title was validated as one plain file name.
                os.symlink(Path("..", "..", "blobs", self.blobs.path(layer.digest).name), tmp / layer.title)
            os.replace(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():
                raise
        fsync_directory(self.views)
        return final

    # -- copy, remove, collect --------------------------------------------------------------------
    def copy(self, source: str, dest: str) -> ModelName:
        src, dst = parse_name(source), parse_name(dest)
        with self.locked():
            self.write_manifest(dst, self.read_manifest(src))
        return dst

    def remove(self, name: str) -> tuple[ModelName, int]:
        """Delete a model's manifest, then every blob no other model uses; (name, bytes freed)."""
        parsed = parse_name(name)
        with self.locked():
            path = self.manifest_path(parsed)
            if not path.is_file():
                raise ModelNotFoundError(f"model {str(parsed)!r} not found")
            path.unlink()
            fsync_directory(path.parent)
            for parent in list(path.parents)[: len(parsed.parts) - 1]:  # prune empty tag/model/ns/host dirs
                with contextlib.suppress(OSError):
                    parent.rmdir()
            return parsed, self._collect()

    def collect_garbage(self) -> int:
        with self.locked():
            return self._collect()

    def _collect(self) -> int:
        """Remove unreferenced blobs and views (caller holds the lock). Any unreadable manifest stops it:
        a blob it might name is never deleted on a guess."""
        referenced: set[str] = set()
        views: set[str] = set()
        paths = sorted(p for p in self.manifests.glob("*/*/*/*") if not p.name.startswith(".")) \
            if self.manifests.is_dir() else []
        for path in paths:
            manifest = parse_manifest(path.read_bytes(), path=str(path.relative_to(self.manifests)))
            referenced |= manifest.digests()
            views.add(hashlib.sha256(manifest.to_bytes()).hexdigest())
        freed = sum(self.blobs.remove(d) for d in self.blobs.digests() if d not in referenced)
        if self.views.is_dir():
            for view in self.views.iterdir():
                if view.name not in views and (not view.name.startswith(".") or _older_than(view, 3600)):
                    shutil.rmtree(view, ignore_errors=True)
        self.blobs.remove_stale_temp_files()
        return freed + collect_scratch(self.models)

    def leftovers(self) -> list[tuple[Path, int]]:
        """(path, bytes) of what killed commands left and garbage collection will remove: scratch folders
        no live process owns, and blob temp files over an hour old."""
        found = [(p, tree_size(p)) for p in stale_scratch(self.models)]
        return found + [(p, p.stat().st_size) for p in self.blobs.stale_temp_files()]

    def verify(self, progress: Progress = None) -> list[str]:
        """Re-hash every blob and check every manifest; the list of problems (empty when all is well)."""
        problems = []
        for digest in self.blobs.digests():
            if (err := self.blobs.check(digest, progress)) is not None:
                problems.append(f"blob {digest}: {err}")
        for path in sorted(self.manifests.glob("*/*/*/*")) if self.manifests.is_dir() else []:
            rel = "/".join(path.relative_to(self.manifests).parts)
            if path.name.startswith("."):
                continue  # a temp file of an interrupted manifest write; the manifest itself is intact
            try:
                manifest = parse_manifest(path.read_bytes(), path=rel)
            except FormatError as exc:
                problems.append(f"manifest {rel}: {exc}")
                continue
            for d in (manifest.config, *manifest.layers):
                if not self.blobs.has(d.digest, d.size):
                    problems.append(f"manifest {rel}: blob {d.digest} is missing or not {d.size} bytes")
        return problems


def _older_than(path: Path, seconds: float) -> bool:
    return time.time() - path.stat().st_mtime > seconds
