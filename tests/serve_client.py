"""Helpers of the `unip serve` tests: a server running in a thread of the test process, and an HTTP client of the
standard library (multipart forms built by hand, so that tests can also send what no browser would)."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import uuid
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from unip.serve.server import Server, ServeOptions

FileField = Tuple[str, str, bytes]  # (field, file name, content)


@contextlib.contextmanager
def running(options: ServeOptions) -> Iterator[Server]:
    """``options`` served on a free loopback port by a thread of this process until the block ends."""
    server = Server(options)
    thread = threading.Thread(target=server.run, name="serve-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.uvicorn.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.stop()
        thread.join(30)
        server.close()


def multipart(fields: Dict[str, Union[str, Sequence[str]]] = None, files: Iterable[FileField] = ()
              ) -> Tuple[bytes, str]:
    """``(body, content type)`` of a multipart form with these text ``fields`` and ``files``."""
    boundary = uuid.uuid4().hex
    parts: List[bytes] = []
    for name, values in (fields or {}).items():
        for value in [values] if isinstance(values, str) else values:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, content in files:
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode("utf-8") + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Client:
    """Requests to one server; each answer as ``(status, JSON or bytes, headers)``."""

    def __init__(self, url: str, timeout: float = 120) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout

    def request(self, method: str, path: str, body: Union[bytes, Iterable[bytes], None] = None,
                headers: Optional[Dict[str, str]] = None, chunked: bool = False):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        kind = response.getheader("content-type", "")
        return response.status, (json.loads(data) if kind.startswith("application/json") else data), response.headers

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, fields: Dict[str, Union[str, Sequence[str]]] = None, files: Iterable[FileField] = (),
             headers: Optional[Dict[str, str]] = None):
        body, kind = multipart(fields, files)
        return self.request("POST", path, body, {"Content-Type": kind, **(headers or {})})

    def predict(self, name: str, content: bytes, **fields: str):
        return self.post("/api/predict", fields, [("file", name, content)])

    def wait(self, job: str, timeout: float = 120) -> dict:
        """The state of ``job`` once it has finished."""
        deadline = time.monotonic() + timeout
        while True:
            status, state, _ = self.get(f"/api/jobs/{job}")
            assert status == 200, state
            if state["status"] in ("done", "failed", "cancelled"):
                return state
            assert time.monotonic() < deadline, f"job {job} still {state['status']}"
            time.sleep(0.05)
