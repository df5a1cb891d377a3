"""The work queue of the web page: every use of a model is a job, run one at a time by one worker thread, so the
models are used by one thread only, the server's event loop stays free for requests, and a burst of uploads waits
in a bounded queue (a full queue refuses the next job: HTTP 503) instead of growing without end.

A job holds its own folder (its upload and results), its status and progress, and a cancel flag its work checks.
Finished jobs are kept for their downloads, the newest ``keep`` of them; an older one is dropped with its folder.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional

from unip.errors import UnipError
from unip.text import one_line

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class JobCancelled(Exception):
    """Raised by a job's work when its cancel flag is set; ``partial``: what it had done (a result, or None)."""

    def __init__(self, partial: Optional[Dict[str, Any]] = None) -> None:
        super().__init__("cancelled")
        self.partial = partial


class QueueFull(Exception):
    """The queue holds as many jobs as it may."""


class Job:
    """One piece of model work: ``work(job)`` returns the result (a JSON-able dict). ``folder``: the job's own folder
    (removed with the job), ``files``: the names its results are downloaded by → their paths, ``info``: what the
    status shows besides the result (the input's name, the model), ``kept``: what the work keeps for later requests
    (never shown)."""

    def __init__(self, kind: str, work: Callable[["Job"], Dict[str, Any]], folder: Optional[str] = None,
                 info: Optional[Dict[str, Any]] = None) -> None:
        self.id = uuid.uuid4().hex
        self.kind = kind
        self.work = work
        self.folder = folder
        self.info = dict(info or {})
        self.status = QUEUED
        self.done = 0
        self.total = 0
        self.result: Optional[Dict[str, Any]] = None
        self.error: Optional[str] = None
        self.files: Dict[str, str] = {}
        self.kept: Dict[str, Any] = {}
        self.created = time.time()
        self.seconds: Optional[float] = None
        self.cancel_flag = threading.Event()
        self.future: Future = Future()

    def progress(self, done: int, total: int) -> None:
        """Record progress; raises :class:`JobCancelled` once the job is cancelled (the work stops there)."""
        self.done, self.total = done, total
        if self.cancel_flag.is_set():
            raise JobCancelled()

    def cancel(self) -> None:
        self.cancel_flag.set()

    def run(self) -> None:
        if self.cancel_flag.is_set():
            self._finish(CANCELLED)
            return
        self.status = RUNNING
        started = time.perf_counter()
        try:
            self.result = self.work(self)
            status = DONE
        except JobCancelled as err:
            self.result = err.partial
            status = CANCELLED
        except UnipError as err:
            self.error = one_line(err)
            status = FAILED
        except Exception as err:  # a bug: the page says so, the server goes on
            log.error("%s job %s failed: %s: %s", self.kind, self.id, type(err).__name__, one_line(err)[:300],
                      exc_info=log.isEnabledFor(logging.DEBUG))
            self.error = f"internal error: {type(err).__name__}: {one_line(err)[:300]}"
            status = FAILED
        self.seconds = time.perf_counter() - started
        self._finish(status)

    def _finish(self, status: str) -> None:
        self.status = status
        if not self.future.done():
            self.future.set_result(self)

    def state(self) -> Dict[str, Any]:
        """What ``GET /api/jobs/<id>`` answers."""
        state = {"job": self.id, "kind": self.kind, "status": self.status, **self.info,
                 "progress": {"done": self.done, "total": self.total}}
        if self.error is not None:
            state["error"] = self.error
        if self.result is not None:
            state["result"] = self.result
        if self.seconds is not None:
            state["seconds"] = round(self.seconds, 4)
        return state

    def remove_files(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


class JobQueue:
    """At most ``size`` jobs waiting, run in order by one worker thread; the newest ``keep`` finished jobs are kept
    (``find``) and older ones removed with their folders."""

    def __init__(self, size: int, keep: int) -> None:
        self.size, self.keep = size, keep
        self._waiting: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=size)
        self._jobs: "OrderedDict[str, Job]" = OrderedDict()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="unip-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job, listed: bool = True) -> Job:
        """Queue ``job``; ``listed``: findable by its id (results to download), else a one-off (an attention map).
        Raises :class:`QueueFull`."""
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            job.remove_files()
            raise QueueFull() from None
        if listed:
            with self._lock:
                self._jobs[job.id] = job
        return job

    def find(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def counts(self) -> Dict[str, int]:
        with self._lock:
            jobs = list(self._jobs.values())
        return {status: sum(job.status == status for job in jobs) for status in (QUEUED, RUNNING) + FINISHED}

    def _loop(self) -> None:
        while True:
            job = self._waiting.get()
            if job is None:
                return
            job.run()
            self._prune()

    def _prune(self) -> None:
        with self._lock:
            finished = [job for job in self._jobs.values() if job.status in FINISHED]
            dropped: List[Job] = finished[:max(0, len(finished) - self.keep)]
            for job in dropped:
                del self._jobs[job.id]
        for job in dropped:
            job.remove_files()

    def cancel_all(self) -> None:
        """Cancel every job: waiting ones never start, the running one stops at its next progress report."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every job and stop the worker, waiting at most ``timeout`` seconds for it."""
        self.cancel_all()
        while True:
            try:
                pending = self._waiting.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending.cancel()
                pending.run()
        try:
            self._waiting.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
