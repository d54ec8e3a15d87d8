"""Pull from and push to another Corral server, over the registry routes it serves (Docker distribution v2):

    GET  /v2/<namespace>/<model>/manifests/<tag>          the manifest JSON
    HEAD /v2/<namespace>/<model>/blobs/<digest>           200 if the server holds the blob
    GET  /v2/<namespace>/<model>/blobs/<digest>           its bytes
    POST /v2/<namespace>/<model>/blobs/uploads/?digest=   a whole blob in one request (push)
    PUT  /v2/<namespace>/<model>/manifests/<tag>          the manifest, once every blob is there (push)

A server is named by a URL (``http://host:port/[namespace/]model[:tag]``) or, as in Ollama, by the
host part of a model name (``host:port/namespace/model:tag``; https unless ``insecure``). Every blob
is hashed on the way into the receiving store (``BlobStore.ingest``) and the manifest is written
last, so a bad or interrupted transfer leaves no model behind (RELIABILITY 12, 13, 15). Only the
standard library is used, so the CLI needs no HTTP package.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from corral.errors import CorralError, ModelNotFoundError
from corral.store.manifest import MANIFEST_TYPE, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from corral.store.names import DEFAULT_HOST, ModelName, parse_name
from corral.store.store import Store
from corral.store.transfer import ProgressFactory, copy_in

_HOST_PORT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*:[0-9]{1,5}")


class RemoteError(CorralError):
    """The other server cannot be reached or refused a request."""


def server_url(text: str) -> str | None:
    """'http(s)://host:port[/...]' or 'host:port' -> 'scheme://host:port'; None when text is neither."""
    if text.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(text)
        if not parts.netloc:
            raise RemoteError(f"{text!r} names no server")
        return f"{parts.scheme}://{parts.netloc}"
    if "://" in text:
        raise RemoteError(f"{text[:80]!r}: only http:// and https:// servers are supported")
    return f"http://{text}" if _HOST_PORT.fullmatch(text) else None


def split_reference(ref: str, insecure: bool = False) -> tuple[str, ModelName, ModelName]:
    """(server URL, the name on that server, the name here) for a pull or push reference."""
    if "://" in ref:
        base = server_url(ref)
        path = urllib.parse.urlsplit(ref).path.strip("/")
        name = parse_name(path)
        return base, name, name
    name = parse_name(ref)
    if name.host == DEFAULT_HOST:
        raise RemoteError(f"{ref!r} names no server: use host:port/namespace/model:tag or "
                          "http://host:port/model:tag (Corral has no default registry)")
    base = f"{'http' if insecure else 'https'}://{name.host}"
    return base, ModelName(DEFAULT_HOST, name.namespace, name.model, name.tag), name


@dataclass
class Remote:
    base: str
    """'http://127.0.0.1:11435'"""
    api_key: str | None = None
    timeout: float = 60.0

    def _path(self, name: ModelName, *rest: str) -> str:
        return "/".join([self.base, "v2", name.namespace, name.model, *rest])

    def _request(self, method: str, url: str, data=None, headers: dict | None = None):
        headers = dict(headers or {})
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310 - http(s) only (server_url)
        except urllib.error.HTTPError as exc:
            raise _answer_error(exc, url) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(f"no Corral server answers at {self.base} ({reason})") from None

    def manifest(self, name: ModelName) -> Manifest:
        url = self._path(name, "manifests", name.tag)
        with self._request("GET", url, headers={"Accept": MANIFEST_TYPE}) as response:
            data = response.read(MAX_MANIFEST_BYTES + 1)
        return parse_manifest(data, path=f"{self.base} {name}")

    def has_blob(self, name: ModelName, digest: str, size: int | None = None) -> bool:
        try:
            with self._request("HEAD", self._path(name, "blobs", digest)) as response:
                length = response.headers.get("Content-Length")
        except ModelNotFoundError:
            return False
        return size is None or length is None or int(length) == size

    @contextlib.contextmanager
    def open_blob(self, name: ModelName, digest: str) -> Iterator[BinaryIO]:
        with self._request("GET", self._path(name, "blobs", digest)) as response:
            yield response

    def upload_blob(self, name: ModelName, digest: str, path: Path, size: int,
                    progress: Callable[[int], None] | None = None) -> None:
        url = self._path(name, "blobs", "uploads/") + "?" + urllib.parse.urlencode({"digest": digest})
        with open(path, "rb") as f:
            body = _Counting(f, progress) if progress else f
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            with self._request("POST", url, data=body, headers=headers):
                pass

    def put_manifest(self, name: ModelName, manifest: Manifest) -> None:
        headers = {"Content-Type": MANIFEST_TYPE}
        with self._request("PUT", self._path(name, "manifests", name.tag), data=manifest.to_bytes(), headers=headers):
            pass


class _Counting:
    """A file whose reads report their size (upload progress)."""

    def __init__(self, f: BinaryIO, progress: Callable[[int], None]):
        self.f, self.progress = f, progress

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.progress(len(data))
        return data


def _answer_error(exc: urllib.error.HTTPError, url: str) -> CorralError:
    try:
        message = json.loads(exc.read(1 << 16)).get("error")
    except (ValueError, AttributeError, OSError):
        message = None
    message = message if isinstance(message, str) else exc.reason
    where = urllib.parse.urlsplit(url)
    text = f"{where.scheme}://{where.netloc} answered {exc.code}: {message}"
    return ModelNotFoundError(text) if exc.code == 404 else RemoteError(text)


def pull(store: Store, ref: str, *, insecure: bool = False, local_name: str | None = None,
         api_key: str | None = None, progress: ProgressFactory | None = None,
         status: Callable[[str], None] | None = None) -> ModelName:
    """Copy a model from another Corral server into `store`; the name it is stored under.

    progress(digest, total bytes) -> a per-chunk callback; status(text) for the steps between blobs.
    """
    base, remote_name, here = split_reference(ref, insecure)
    here = parse_name(local_name) if local_name else here
    remote = Remote(base, api_key)
    if status:
        status("pulling manifest")
    manifest = remote.manifest(remote_name)
    digests = {d.digest[7:19]: d.digest for d in (manifest.config, *manifest.layers)}
    by_digest = (lambda label, total: progress(digests.get(label, label), total)) if progress else None
    copy_in(store, [(here, manifest)], lambda d, size: remote.has_blob(remote_name, d, size),
            lambda d: remote.open_blob(remote_name, d), by_digest)
    return here


def push(store: Store, name: str, ref: str | None = None, *, insecure: bool = False, api_key: str | None = None,
         progress: ProgressFactory | None = None, status: Callable[[str], None] | None = None) -> ModelName:
    """Copy a stored model to another Corral server. ref: a server URL or host:port (the model keeps its
    name there), or None when `name` itself carries the server (host:port/namespace/model:tag)."""
    local = parse_name(name)
    if ref is None:
        base, remote_name, _ = split_reference(name, insecure)
    else:
        base = server_url(ref) or f"{'http' if insecure else 'https'}://{ref}"
        remote_name = ModelName(DEFAULT_HOST, local.namespace, local.model, local.tag)
    if status:
        status("retrieving manifest")
    manifest = store.read_manifest(local)
    remote = Remote(base, api_key)
    for d in (manifest.config, *manifest.layers):
        if remote.has_blob(remote_name, d.digest, d.size):
            continue
        path = store.blobs.path(d.digest)
        remote.upload_blob(remote_name, d.digest, path, d.size, progress(d.digest, d.size) if progress else None)
    if status:
        status("pushing manifest")
    remote.put_manifest(remote_name, manifest)
    return remote_name
