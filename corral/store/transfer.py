"""Move models between stores: another store directory (any ``$CORRAL_HOME``) or a .tar of one
(another Corral server: corral/store/remote.py, over the same ``copy_in``).

Pull and push share one path: read and check the source manifest, check that the source holds
every blob it names at its declared size, and only then stream each blob in (hashed on the way,
so a corrupt source blob is refused) and write the manifest last. Archives are read member by
member without extracting: a member that is a link, a device, an absolute path, a ``..``
component or anything outside ``models/manifests`` and ``models/blobs`` refuses the whole
archive before any byte is written (RELIABILITY.md 14).
"""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from corral.checkpoint.atomic import atomic_output
from corral.errors import CorralError, FormatError
from corral.store.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest
from corral.store.names import ModelName, digest_from_file_name, parse_name
from corral.store.store import Store

ProgressFactory = Callable[[str, int], Callable[[int], None] | None]


def copy_in(dest: Store, models: list[tuple[ModelName, Manifest]], has: Callable[[str, int], bool],
            open_blob: Callable[[str], contextlib.AbstractContextManager[BinaryIO]],
            progress: ProgressFactory | None) -> None:
    """Check everything, then copy blobs (verified) and write manifests last."""
    for name, manifest in models:
        for d in (manifest.config, *manifest.layers):
            if not has(d.digest, d.size):
                raise FormatError(f"the source has no blob {d.digest} of {d.size} bytes", path=str(name))
    with dest.locked():
        for _, manifest in models:
            for d in (manifest.config, *manifest.layers):
                if dest.blobs.has(d.digest, d.size):
                    continue
                with open_blob(d.digest) as f:
                    dest.blobs.ingest(f, d.digest, d.size, progress(d.digest[7:19], d.size) if progress else None)
        for name, manifest in models:
            dest.write_manifest(name, manifest)


def copy_between(source: Store, name: str, dest: Store, new_name: str | None = None,
                 progress: ProgressFactory | None = None) -> ModelName:
    """pull (source = a directory store) or push (dest = a directory store) of one model."""
    src_name = parse_name(name)
    dst_name = parse_name(new_name) if new_name else src_name
    manifest = source.read_manifest(src_name)
    copy_in(dest, [(dst_name, manifest)], source.blobs.has, lambda d: open(source.blobs.path(d), "rb"), progress)
    return dst_name


# -- archives ---------------------------------------------------------------------------------------
def _member_kind(member: tarfile.TarInfo) -> tuple[str, object] | None:
    """("manifest", ModelName) or ("blob", digest) for a member, None for a directory; FormatError otherwise."""
    raw = member.name
    parts = PurePosixPath(raw).parts
    if raw.startswith("/") or "\\" in raw or "\x00" in raw or any(p in ("..", "") for p in parts):
        raise FormatError(f"archive member {raw[:100]!r} has an absolute or parent path")
    if not (member.isfile() or member.isdir()):
        raise FormatError(f"archive member {raw[:100]!r} is a link or special file; only files are allowed")
    parts = tuple(p for p in parts if p != ".")
    if member.isdir():
        if parts[:1] != ("models",) or (len(parts) > 1 and parts[1] not in ("manifests", "blobs")):
            raise FormatError(f"archive member {raw[:100]!r} is outside models/manifests and models/blobs")
        return None
    if len(parts) == 3 and parts[:2] == ("models", "blobs") and (digest := digest_from_file_name(parts[2])):
        return "blob", digest
    if len(parts) == 6 and parts[:2] == ("models", "manifests"):  # models/manifests/host/namespace/model/tag
        return "manifest", parse_name("/".join(parts[2:5]) + ":" + parts[5])
    raise FormatError(f"archive member {raw[:100]!r} is not a manifest or a blob of a Corral store")


def import_archive(store: Store, archive: Path, new_name: str | None = None,
                   progress: ProgressFactory | None = None) -> list[ModelName]:
    """Import every model in a .tar written by `push` (optionally renaming its one model)."""
    target = parse_name(new_name) if new_name else None
    with tarfile.open(archive, "r:") as tar:
        manifests: dict[ModelName, tarfile.TarInfo] = {}
        blobs: dict[str, tarfile.TarInfo] = {}
        for member in tar.getmembers():
            kind = _member_kind(member)
            if kind and kind[0] == "manifest":
                manifests[kind[1]] = member
            elif kind:
                blobs[kind[1]] = member
        if not manifests:
            raise FormatError("the archive holds no model manifest", path=str(archive))
        if target is not None and len(manifests) != 1:
            raise CorralError(f"the archive holds {len(manifests)} models; import it without a new name")
        models = []
        for name, member in manifests.items():
            if member.size > MAX_MANIFEST_BYTES:
                raise FormatError(f"manifest of {name} is over {MAX_MANIFEST_BYTES} bytes", path=str(archive))
            models.append((target or name, parse_manifest(tar.extractfile(member).read(), path=str(name))))

        def has(digest: str, size: int) -> bool:
            return digest in blobs and blobs[digest].size == size

        copy_in(store, models, has, lambda d: contextlib.closing(tar.extractfile(blobs[d])), progress)
    return [name for name, _ in models]


def _archive_members(store: Store, name: ModelName, manifest: Manifest) -> Iterator[tuple[str, Path]]:
    yield "models/manifests/" + "/".join(name.parts), store.manifest_path(name)
    for d in sorted(manifest.digests()):
        path = store.blobs.path(d)
        yield f"models/blobs/{path.name}", path


def export_archive(store: Store, name: str, dest: Path, progress: ProgressFactory | None = None) -> Path:
    """Write one model as a .tar of store paths (what `import` reads back); the file appears atomically."""
    parsed = parse_name(name)
    manifest = store.read_manifest(parsed)
    with atomic_output(dest) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for arcname, path in _archive_members(store, parsed, manifest):
            info = tar.gettarinfo(path, arcname)
            info.uid = info.gid = 0
            info.uname = info.gname = ""  # no user names in a file meant to be shared
            with open(path, "rb") as f:
                tar.addfile(info, f)
            if progress and (bar := progress(Path(arcname).name[:19], info.size)):
                bar(info.size)
    return dest
