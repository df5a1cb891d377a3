"""The web app: the page, its two files of script and style (served from the package, nothing from elsewhere), and
the HTTP API the page uses (docs/serve.md lists it).

Every request that uploads gets a folder of its own in the private upload folder; model work goes to the job queue
(``unip.serve.jobs``), so requests are answered while a model runs. Errors are JSON ``{"error": "..."}`` with an HTTP
status: 400 a bad request, 404 an unknown job or file, 413 an upload past the limit, 415 a file of another kind,
422 a file that cannot be read, 503 a full queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Callable, Dict, Optional, Set

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from unip import __version__
from unip.seg.predict_run import PredictOptions
from unip.serve.attention import ANALYZE_KINDS, analyze_uploads, attention_map
from unip.serve.jobs import CANCELLED, DONE, Job, JobQueue, QueueFull
from unip.serve.models import ServedModel
from unip.serve.predicting import LABEL_KINDS, PREDICT_KINDS, predict_upload
from unip.serve.uploads import Form, UploadError, UploadFolder, classify, read_form
from unip.text import one_line, printable

log = logging.getLogger(__name__)

#: The page's files in the package (``unip/serve/static``) and their media types.
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
#: Headers of every answer: the page may load only what this server serves (no CDN, no other site).
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                                 b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
#: Media types of the files jobs write.
MEDIA = {".png": "image/png", ".csv": "text/csv; charset=utf-8", ".json": "application/json", ".mp4": "video/mp4"}
#: Most frames one analysis request may hold (each is one image of the profile).
MAX_ANALYZE_FILES = 32
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ServeState:
    """What the app serves with: the ``models`` (by name, the first is the default), the job queue, the upload
    folder, the upload limit in bytes, ``predict``: the options of every prediction (``every``: videos' default),
    ``hosts``: the Host header names accepted (None: any)."""

    models: Dict[str, ServedModel]
    jobs: JobQueue
    uploads: UploadFolder
    max_upload: int
    predict: PredictOptions = field(default_factory=PredictOptions)
    hosts: Optional[Set[str]] = None

    def model(self, name: Optional[str]) -> ServedModel:
        if not name:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise UploadError(400, f"checkpoint {printable(name)[:80]!r} is not served here; choose one of "
                                   f"{', '.join(self.models)}")
        return self.models[name]


def build_app(state: ServeState) -> Starlette:
    """The Starlette app of ``state``."""
    api = Api(state)
    routes = [Route("/", api.page), Route("/static/{name}", api.static), Route("/healthz", api.healthz),
              Route("/api/models", api.models), Route("/api/predict", api.predict, methods=["POST"]),
              Route("/api/analyze", api.analyze, methods=["POST"]), Route("/api/jobs/{job}", api.job),
              Route("/api/jobs/{job}/cancel", api.cancel, methods=["POST"]),
              Route("/api/jobs/{job}/files/{key:path}", api.file), Route("/api/jobs/{job}/attention", api.attention)]
    handlers = {HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]
    return Guard(app, state.hosts)  # type: ignore[return-value]


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


async def _http_error(request: Request, err: HTTPException) -> Response:
    return _error(err.status_code, f"{request.method} {printable(request.url.path)[:200]}: {err.detail}")


async def _internal_error(request: Request, err: Exception) -> Response:
    log.error("%s %s: internal error: %s: %s", request.method, printable(request.url.path)[:200], type(err).__name__,
              one_line(err)[:300])
    return _error(500, f"internal error: {type(err).__name__}: {one_line(err)[:300]}")


class Guard:
    """ASGI middleware: refuses a Host header this server does not answer to (a page of another site reaching a
    loopback server through its own name: DNS rebinding) and adds :data:`SECURITY_HEADERS` to every answer."""

    def __init__(self, app: Callable, hosts: Optional[Set[str]]) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.hosts is not None:
            host = host_name(Headers(scope=scope).get("host", ""))
            if host not in self.hosts:
                await _error(400, f"Host {printable(host)[:80]!r} is not an address of this server; open "
                                  "http://127.0.0.1:PORT/")(scope, receive, send)
                return

        async def send_secured(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        await self.app(scope, receive, send_secured)


def host_name(header: str) -> str:
    """The name of a Host header without its port: ``127.0.0.1:7860`` → ``127.0.0.1``, ``[::1]:7860`` → ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts(host: str) -> Optional[Set[str]]:
    """The Host names a server bound to ``host`` answers to: the loopback names for a loopback address, any (None)
    otherwise (a server others reach by a name of their network)."""
    return set(LOOPBACK_NAMES) if host in LOOPBACK_NAMES or host.startswith("127.") else None


class Api:
    """The routes' handlers over one :class:`ServeState`."""

    def __init__(self, state: ServeState) -> None:
        self.state = state
        self.static_files = {name: resources.files("unip.serve").joinpath("static", name).read_bytes()
                             for name in STATIC}

    # ------------------------------------------------------------------------------ the page
    async def page(self, request: Request) -> Response:
        return self._static("index.html")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC or name == "index.html":
            return _error(404, f"no static file {printable(name)[:80]!r}")
        return self._static(name)

    def _static(self, name: str) -> Response:
        return Response(self.static_files[name], media_type=STATIC[name], headers={"cache-control": "no-cache"})

    async def healthz(self, request: Request) -> Response:
        jobs = self.state.jobs
        return JSONResponse({"status": "ok", "version": __version__, "models": list(self.state.models),
                             "queue": {"waiting": jobs.waiting, "size": jobs.size, "jobs": jobs.counts()}})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"models": [model.describe() for model in self.state.models.values()],
                             "max_upload_bytes": self.state.max_upload, "every": self.state.predict.every,
                             "predict_kinds": PREDICT_KINDS, "analyze_kinds": ANALYZE_KINDS})

    # ------------------------------------------------------------------------------ uploads
    async def _form(self, request: Request, folder: str) -> Form:
        return await read_form(request.headers.get("content-type", ""), request.headers.get("content-length"),
                               request.stream(), folder, self.state.max_upload)

    async def _submit(self, request: Request, make: Callable[[Form, str], Job]) -> Response:
        """Read the upload into a new folder, make the job (``make`` raises ``UploadError`` for a bad request) and
        queue it; the answer as the form's ``wait`` asks (default: the result)."""
        folder = self.state.uploads.new_folder()
        try:
            form = await self._form(request, folder)
            job = make(form, folder)
            wait = _flag(form.value("wait"), "wait", True)
            self.state.jobs.submit(job)
        except UploadError as err:
            shutil.rmtree(folder, ignore_errors=True)
            return _error(err.status, err.message)
        except QueueFull:
            shutil.rmtree(folder, ignore_errors=True)
            return _error(503, f"busy: {self.state.jobs.size} jobs are waiting; try again in a moment",
                          **{"retry_after_s": 2})
        if not wait:
            return JSONResponse({"job": job.id, "status": job.status, "status_url": f"/api/jobs/{job.id}"},
                                status_code=202)
        await asyncio.wrap_future(job.future)
        return _finished(job)

    async def predict(self, request: Request) -> Response:
        def make(form: Form, folder: str) -> Job:
            model = self.state.model(form.value("checkpoint"))
            upload = _one(form, "file", PREDICT_KINDS)
            labels = form.uploads("label")
            label = _one(form, "label", LABEL_KINDS) if labels else None
            every = _number(form.value("every"), "every", self.state.predict.every, 1, 1_000_000)
            options = replace(self.state.predict, every=every)
            return Job("predict", lambda job: predict_upload(model, upload, label, options, job), folder,
                       {"input": upload.name, "checkpoint": model.name})

        return await self._submit(request, make)

    async def analyze(self, request: Request) -> Response:
        def make(form: Form, folder: str) -> Job:
            model = self.state.model(form.value("checkpoint"))
            uploads = form.uploads("file")
            if not uploads or len(uploads) > MAX_ANALYZE_FILES:
                raise UploadError(400, f"send 1 to {MAX_ANALYZE_FILES} frames in the field file "
                                       f"({len(uploads)} sent)")
            for upload in uploads:
                classify(upload, ANALYZE_KINDS)
            names = [upload.name for upload in uploads]
            return Job("analyze", lambda job: analyze_uploads(model, uploads, job, self.state.predict.mapping), folder,
                       {"input": ", ".join(names)[:300], "checkpoint": model.name})

        return await self._submit(request, make)

    # ------------------------------------------------------------------------------ jobs
    def _job(self, request: Request) -> Job:
        job = self.state.jobs.find(request.path_params["job"])
        if job is None:
            raise HTTPException(404, "no such job (finished jobs are kept for a while, then removed)")
        return job

    async def job(self, request: Request) -> Response:
        return JSONResponse(self._job(request).state())

    async def cancel(self, request: Request) -> Response:
        job = self._job(request)
        job.cancel()
        return JSONResponse(job.state())

    async def file(self, request: Request) -> Response:
        job = self._job(request)
        path = job.files.get(request.path_params["key"])  # names this server made; nothing from the client is a path
        if path is None or not os.path.isfile(path):
            return _error(404, f"job {job.id} has no file {printable(request.path_params['key'])[:80]!r}")
        return FileResponse(path, media_type=MEDIA.get(os.path.splitext(path)[1], "application/octet-stream"),
                            headers={"cache-control": "no-cache"})

    async def attention(self, request: Request) -> Response:
        job = self._job(request)
        if job.kind != "analyze" or job.status != DONE:
            return _error(409, f"job {job.id} is not a finished analysis ({job.kind}, {job.status})")
        model = self.state.model(job.info["checkpoint"])
        query = request.query_params
        try:
            paths = job.kept["paths"]
            frame = _number(query.get("frame"), "frame", 0, 0, len(paths) - 1)
            layer = _number(query.get("layer"), "layer", None, 1, model.backbone.depth)
            heads = model.backbone.heads_per_block[layer - 1]
            head_text = query.get("head", "mean")
            head = None if head_text == "mean" else _number(head_text, "head", None, 0, heads - 1)
            height, width = model.input_size
            x = _number(query.get("x"), "x", None, 0, width - 1)
            y = _number(query.get("y"), "y", None, 0, height - 1)
        except UploadError as err:
            return _error(err.status, err.message)
        mapping = self.state.predict.mapping
        work = Job("attention", lambda _: attention_map(model, paths[frame], layer, head, x, y, mapping))
        try:
            self.state.jobs.submit(work, listed=False)
        except QueueFull:
            return _error(503, "busy: try again in a moment", retry_after_s=2)
        await asyncio.wrap_future(work.future)
        return _finished(work)


def _finished(job: Job) -> Response:
    if job.status == DONE:
        return JSONResponse(job.result)
    if job.status == CANCELLED:
        return _error(409, "cancelled", job=job.id, result=job.result)
    return _error(422, job.error or "failed", job=job.id)


def _one(form: Form, name: str, kinds: Dict[str, str]):
    uploads = form.uploads(name)
    if len(uploads) != 1:
        raise UploadError(400, f"send one file in the form field {name} ({len(uploads)} sent)")
    classify(uploads[0], kinds)
    return uploads[0]


def _number(text: Optional[str], name: str, default: Optional[int], low: int, high: int) -> int:
    if text is None or text == "":
        if default is None:
            raise UploadError(400, f"{name} is missing: give a whole number from {low} to {high}")
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise UploadError(400, f"{name}={printable(text)[:40]}: give a whole number from {low} to {high}")
    return value


def _flag(text: Optional[str], name: str, default: bool) -> bool:
    if text is None or text == "":
        return default
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise UploadError(400, f"{name}={printable(text)[:40]}: give true or false")

