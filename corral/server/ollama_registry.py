"""Pull and push between Corral servers: Ollama's /api/pull and /api/push, and the registry routes they use.

    POST /api/pull {model, insecure, stream}   model: "host:port/namespace/model:tag" (stored under that
                                               name, as Ollama does) or "http://host:port/model:tag"
    POST /api/push {model, insecure, stream}   model: a stored "host:port/namespace/model:tag", or
                                               "http://host:port/model:tag" for the stored "model:tag"

    GET|HEAD /v2/<name>/manifests/<tag>        a stored manifest (Docker distribution v2 JSON)
    GET|HEAD /v2/<name>/blobs/<digest>         a stored blob
    POST     /v2/<name>/blobs/uploads/?digest= one whole blob; hashed into the store on the way (400 on mismatch)
    PUT      /v2/<name>/manifests/<tag>        a manifest whose blobs are all present; written last, atomically

``<name>`` is ``namespace/model`` (or ``host/namespace/model``) of this server's store. The two
write routes are what `push` needs; like /api/create and /api/delete they sit behind the API key
when one is set. The client side is corral/store/remote.py, shared with `corral pull/push`.
"""

from __future__ import annotations

import asyncio
import io
import queue
import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from corral.server.errors import BadRequest
from corral.server.ollama_wire import Report, flag, name_field, progress_response, read_body
from corral.server.state import get_state
from corral.store.manifest import MANIFEST_TYPE, MAX_MANIFEST_BYTES, parse_manifest
from corral.store.names import ModelName, check_digest, parse_name

api_router = APIRouter()
registry_router = APIRouter()
REPORT_EVERY_S = 0.2  # progress lines per blob are at most this frequent (plus the first and the last)


# -- /api/pull, /api/push ------------------------------------------------------------------------------
def _progress(report: Report, verb: str) -> Callable[[str, int], Callable[[int], None]]:
    """A ProgressFactory whose callbacks send Ollama's {"status", "digest", "total", "completed"} lines."""

    def factory(digest: str, total: int) -> Callable[[int], None]:
        seen = {"done": 0, "sent": 0.0}

        def tick(n: int) -> None:
            seen["done"] += n
            now = time.monotonic()
            if seen["done"] >= total or now - seen["sent"] >= REPORT_EVERY_S:
                seen["sent"] = now
                report({"status": f"{verb} {digest[7:19]}", "digest": digest, "total": total,
                        "completed": seen["done"]})

        tick(0)
        return tick

    return factory


def _pull(store, ref: str, insecure: bool, report: Report) -> None:
    from corral.store import remote

    remote.pull(store, ref, insecure=insecure, progress=_progress(report, "pulling"),
                status=lambda s: report({"status": s}))
    report({"status": "verifying sha256 digest"})  # done blob by blob while they streamed in
    report({"status": "writing manifest"})


def _push(store, ref: str, insecure: bool, report: Report) -> None:
    from corral.store import remote

    if "://" in ref:  # http://host:port/model:tag pushes the stored model:tag there
        from urllib.parse import urlsplit

        remote.push(store, urlsplit(ref).path.strip("/"), remote.server_url(ref), insecure=insecure,
                    progress=_progress(report, "pushing"), status=lambda s: report({"status": s}))
    else:
        remote.push(store, ref, insecure=insecure, progress=_progress(report, "pushing"),
                    status=lambda s: report({"status": s}))


async def transfer(request: Request, move) -> Response:
    """/api/pull and /api/push: the same body (model or name, insecure, stream), a different direction."""
    body = await read_body(request)
    ref, insecure = name_field(body, "model", "name"), flag(body, "insecure", False)
    store = get_state(request).store
    return await progress_response(lambda report: move(store, ref, insecure, report), flag(body, "stream", True))


@api_router.post("/pull")
async def pull(request: Request) -> Response:
    return await transfer(request, _pull)


@api_router.post("/push")
async def push(request: Request) -> Response:
    return await transfer(request, _push)


# -- receiving a blob ------------------------------------------------------------------------------------
class _QueueReader(io.RawIOBase):
    """The request body, chunk by chunk from the event loop, as a blocking file for BlobStore.ingest."""

    def __init__(self, chunks: queue.Queue):
        self.chunks, self.buf, self.eof = chunks, bytearray(), False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while not self.eof and (n < 0 or len(self.buf) < n):
            chunk = self.chunks.get()
            if chunk is None:
                self.eof = True
            else:
                self.buf += chunk
        n = len(self.buf) if n < 0 else n
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


async def ingest_request_body(request: Request, store, digest: str) -> bool:
    """Stream the body into the store as blob `digest`, hashed on the way; False if it was already there."""
    check_digest(digest)
    length = request.headers.get("content-length")
    size = int(length) if length and length.isdigit() else None
    chunks: queue.Queue = queue.Queue(maxsize=64)  # at most ~64 network chunks wait for the disk
    worker = asyncio.ensure_future(asyncio.to_thread(store.blobs.ingest, _QueueReader(chunks), digest, size))
    try:
        async for chunk in request.stream():
            while not worker.done():
                try:
                    chunks.put_nowait(chunk)
                    break
                except queue.Full:
                    await asyncio.sleep(0.005)
            if worker.done():
                break  # ingest stopped early (over the declared size): its error is the answer
    finally:
        while not worker.done():  # end of body (or a dropped client): let the reader see EOF
            try:
                chunks.put_nowait(None)
                break
            except queue.Full:
                await asyncio.sleep(0.005)
    return await worker


# -- the registry routes ---------------------------------------------------------------------------------
def _name(path: str, tag: str) -> ModelName:
    return parse_name(f"{path}:{tag}")


@registry_router.get("/v2/")
async def registry_root() -> dict:
    return {}


@registry_router.post("/v2/{path:path}/blobs/uploads/")
async def upload_blob(request: Request, path: str, digest: str | None = None) -> Response:
    if digest is None:
        raise BadRequest([("digest", "only whole-blob uploads are served: POST .../blobs/uploads/?digest=sha256:...")])
    _name(path, "latest")  # the repository name must be valid even though blobs are shared
    await ingest_request_body(request, get_state(request).store, digest)
    return Response(status_code=201, headers={"Location": f"/v2/{path}/blobs/{digest}",
                                              "Docker-Content-Digest": digest})


@registry_router.api_route("/v2/{path:path}/blobs/{digest}", methods=["GET", "HEAD"])
async def get_blob(request: Request, path: str, digest: str) -> Response:
    from corral.server.pool import ModelNotFound

    _name(path, "latest")
    store = get_state(request).store
    blob = store.blobs.path(check_digest(digest))
    if not await asyncio.to_thread(blob.is_file):
        raise ModelNotFound(f"blob {digest} not found")
    return FileResponse(blob, media_type="application/octet-stream", headers={"Docker-Content-Digest": digest})


@registry_router.api_route("/v2/{path:path}/manifests/{tag}", methods=["GET", "HEAD"])
async def get_manifest(request: Request, path: str, tag: str) -> Response:
    from corral.store.blobs import sha256_digest

    store = get_state(request).store
    data = (await asyncio.to_thread(store.read_manifest, _name(path, tag))).to_bytes()
    return Response(data, media_type=MANIFEST_TYPE, headers={"Docker-Content-Digest": sha256_digest(data)})


@registry_router.put("/v2/{path:path}/manifests/{tag}")
async def put_manifest(request: Request, path: str, tag: str) -> Response:
    name = _name(path, tag)
    data = await request.body()
    if len(data) > MAX_MANIFEST_BYTES:
        raise BadRequest([("manifest", f"a manifest is at most {MAX_MANIFEST_BYTES} bytes")])
    manifest = parse_manifest(data, path=str(name))  # checked in full before anything is written
    store = get_state(request).store

    def write() -> None:
        with store.locked():
            store.write_manifest(name, manifest)  # refuses a manifest whose blobs are missing

    await asyncio.to_thread(write)
    return JSONResponse({}, status_code=201)
