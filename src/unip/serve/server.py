"""``unip serve`` as a library call: bind the address, load the models once, run the web app under uvicorn until
Ctrl-C (or SIGTERM), then stop the worker and remove the upload folder.

The socket is bound before anything is loaded, so a port in use or an address of another machine fails at once;
``port`` 0 takes any free port (``Server.url`` says which).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import signal
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import uvicorn

from unip.errors import ConfigError
from unip.seg.predict_run import PredictOptions
from unip.serve.app import ServeState, allowed_hosts, build_app
from unip.serve.jobs import JobQueue
from unip.serve.models import load_models
from unip.serve.uploads import UploadFolder
from unip.text import printable

log = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


@dataclass
class ServeOptions:
    """Options of :func:`serve` (the ``unip serve`` command line); ``predict``: ``unip predict``'s model and video
    options (``dataset``, ``device``, ``precision``, ``batch_size``, ``alpha``, ``every``, ``workers``)."""

    checkpoints: Sequence[str] = ()
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_upload_mb: int = 512
    queue_size: int = 32
    keep_results: int = 100
    predict: PredictOptions = field(default_factory=PredictOptions)

    def check(self) -> None:
        """Raise ``ConfigError`` naming the option out of range."""
        for name, value, low, high in (("--port", self.port, 0, 65535), ("--max-upload-mb", self.max_upload_mb, 1,
                                                                            1 << 20),
                                       ("--queue-size", self.queue_size, 1, 100_000),
                                       ("--keep-results", self.keep_results, 1, 1_000_000)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} {value!r}: give a whole number from {low} to {high}")
        self.predict.check()


def open_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port``; ``ConfigError`` saying what to change when it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"--host {printable(host)}: not an address or name this machine resolves ({err}); give "
                          "an address of this machine, e.g. 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop; never shared
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise ConfigError(_bind_problem(host, port, err)) from None
    return sock


def _bind_problem(host: str, port: int, err: OSError) -> str:
    where = f"{printable(host)}:{port}"
    if err.errno == errno.EADDRINUSE:
        return (f"--port {port}: {where} is in use (another unip serve?); pick another --port, or --port 0 for a free "
                "one")
    if err.errno == errno.EACCES:
        return f"--port {port}: listening on {where} needs privileges; use a port from 1024 up"
    if err.errno == errno.EADDRNOTAVAIL:
        return f"--host {printable(host)}: not an address of this machine; give one of its addresses, e.g. 127.0.0.1"
    return f"cannot listen on {where}: {err.strerror or err}"


def warn_if_open(host: str, port: int) -> None:
    """A warning when ``host`` lets other machines reach the server."""
    if allowed_hosts(host) is None:
        log.warning("--host %s: the page and its API answer every machine that reaches this one on port %d, without "
                    "a password: anyone there can upload files and use the models; leave --host out to serve this "
                    "machine only", printable(host), port)


class Server:
    """A server ready to run: the socket bound, the models loaded once, the private upload folder made, the worker
    started. ``run`` serves until ``stop`` (or a signal in the main thread); ``close`` (or leaving the ``with``
    block) stops the worker, removes the upload folder and closes the socket."""

    def __init__(self, options: ServeOptions) -> None:
        options.check()
        self.options = options
        self.socket = open_socket(options.host, options.port)
        self.address = self.socket.getsockname()
        warn_if_open(options.host, self.address[1])
        self.uploads: Optional[UploadFolder] = None
        self.jobs: Optional[JobQueue] = None
        try:
            self.models = load_models(options.checkpoints, options.predict)
            self.uploads = UploadFolder()
            atexit.register(self.uploads.remove)
            self.jobs = JobQueue(options.queue_size, options.keep_results)
            state = ServeState({model.name: model for model in self.models}, self.jobs, self.uploads,
                               options.max_upload_mb << 20, options.predict, allowed_hosts(options.host))
            config = uvicorn.Config(build_app(state), loop="asyncio", http="h11", ws="none", lifespan="off",
                                    log_config=None, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=5)
            self.uvicorn = _Uvicorn(config, self.jobs.cancel_all)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """The page's address (a wildcard address shown as this machine's loopback one)."""
        host, port = self.address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def run(self) -> None:
        self.uvicorn.run(sockets=[self.socket])

    def stop(self) -> None:
        """Stop serving (what Ctrl-C does): the jobs are cancelled, so answers waiting for them end at once."""
        self.jobs.cancel_all()  # type: ignore[union-attr]
        self.uvicorn.should_exit = True

    def close(self) -> None:
        if self.jobs is not None:
            self.jobs.close()
        if self.uploads is not None:
            self.uploads.remove()
            atexit.unregister(self.uploads.remove)
        self.socket.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server that cancels every job as soon as it is asked to stop, before it waits for the answers under
    way (an answer waiting for a long video would hold the stop for uvicorn's whole grace period)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: object) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


def serve(options: ServeOptions, on_ready: Callable[[Server], None] = lambda server: None) -> None:
    """Run ``unip serve`` until Ctrl-C or SIGTERM (a clean stop: returns); ``on_ready`` is called once the server
    can answer (the CLI prints its URL). Raises ``UnipError`` before serving for bad options or models."""
    with _terminate_as_interrupt():
        try:
            with Server(options) as server:
                on_ready(server)
                server.run()
        except KeyboardInterrupt:
            pass
    log.info("stopped; the uploads and results are removed")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the server as Ctrl-C does (uvicorn shuts down, then raises the signal again: here, an
    interrupt, so the upload folder is removed instead of the process ending on the spot)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
