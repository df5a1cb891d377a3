"""A real ``unip serve`` process on loopback: 50 concurrent predictions of 640x512 frames with a tiny model, none lost
or mixed (each answer equals that frame's answer alone), the page's health answered during the burst, p50 / p95
latency reported, the server's memory flat after the burst; then Ctrl-C, while a long video runs and a client waits
for it, stops it cleanly and at once (the job cancelled, the client answered, exit 0, the private upload folder
removed). Bounded: 57 uploads in all, each with a timeout, the process killed if it outlives the test."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")

from unip.seg import save_segmentor  # noqa: E402

from serve_client import Client  # noqa: E402
from test_predict import scene, tiny_segmentor, write_video  # noqa: E402

BURST = 50
FRAMES = 5  # distinct frames, each sent BURST / FRAMES times


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


class Output:
    """The lines a pipe of ``process`` gives, read on a thread as they come (several lines can arrive in one read,
    so waiting on the pipe between lines would miss the buffered ones; an undrained pipe would block the server)."""

    def __init__(self, stream) -> None:
        self.lines: List[str] = []
        self._new = threading.Condition()
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream) -> None:
        for line in stream:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()

    def wait_for(self, prefix: str, process: subprocess.Popen, timeout: float) -> str:
        """The first line starting with ``prefix``; fails when the process ends or ``timeout`` s pass first."""
        deadline = time.monotonic() + timeout
        with self._new:
            while time.monotonic() < deadline:
                found = next((line for line in self.lines if line.startswith(prefix)), None)
                if found is not None:
                    return found
                assert process.poll() is None, f"unip serve ended: {''.join(self.lines)}"
                self._new.wait(0.5)
        raise AssertionError(f"no line {prefix!r} in {timeout} s: {''.join(self.lines)}")

    def text(self) -> str:
        self._thread.join(30)
        return "".join(self.lines)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_fifty_concurrent_predictions_then_ctrl_c(tmp_path):
    checkpoint = save_segmentor(tiny_segmentor(meta={"class_names": ["background", "person", "car"], "crop_size": 256,
                                                     "stride": 256}), tmp_path / "tiny.safetensors")
    frames = {}
    for i in range(FRAMES):
        buffer = io.BytesIO()
        Image.fromarray(scene(512, 640, seed=20 + i)).save(buffer, format="PNG")
        frames[f"frame{i}.png"] = buffer.getvalue()
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    source = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "TMPDIR": str(temporary), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(source), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "unip.cli", "serve", "--checkpoint", str(checkpoint),
                                "--port", "0", "--queue-size", "64", "--batch-size", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = Output(process.stdout), Output(process.stderr)
        url = stdout.wait_for("open http://", process, timeout=120).split()[1]
        client = Client(url, timeout=300)  # a burst on a busy 2-core machine can take a minute
        alone = {}
        for name, data in frames.items():  # each frame alone: the reference (and the warm-up)
            status, result, _ = client.predict(name, data)
            assert status == 200, result
            alone[name] = result["pixels"]
        assert len({tuple(p) for p in alone.values()}) == FRAMES
        before = rss_mib(process.pid)

        def send(i):
            name = f"frame{i % FRAMES}.png"
            started = time.perf_counter()
            status, result, _ = client.predict(name, frames[name])
            return name, status, result, time.perf_counter() - started

        with ThreadPoolExecutor(BURST) as pool:
            started = time.perf_counter()
            answers = pool.map(send, range(BURST))
            time.sleep(0.5)  # the burst is queued: the server still answers at once
            health_started = time.perf_counter()
            assert client.get("/healthz")[0] == 200
            health = time.perf_counter() - health_started
            answers = list(answers)
            wall = time.perf_counter() - started
        after = rss_mib(process.pid)
        for name, status, result, _ in answers:
            assert status == 200, result
            assert result["input"] == name and result["pixels"] == alone[name]
        assert len({result["job"] for _, _, result, _ in answers}) == BURST
        latencies = np.array([seconds for *_, seconds in answers])
        p50, p95 = np.percentile(latencies, [50, 95])
        print(f"\n{BURST} concurrent 640x512 predictions on loopback: p50 {p50:.2f} s, p95 {p95:.2f} s, "
              f"{BURST / wall:.1f} frames/s, /healthz during the burst {1000 * health:.0f} ms; "
              f"server memory {before:.0f} -> {after:.0f} MiB")
        assert health < 2.0
        assert after - before < 100, f"memory grew from {before:.0f} to {after:.0f} MiB over one burst"

        # Ctrl-C while a long video runs and a client waits for it: the job is cancelled, the client answered
        video = Path(write_video(tmp_path / "long.mp4", frames=600, size=(96, 128))).read_bytes()
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.predict, "long.mp4", video)
            while client.get("/healthz")[1]["queue"]["jobs"]["running"] == 0:
                time.sleep(0.05)
            stopped = time.perf_counter()
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
            stop_seconds = time.perf_counter() - stopped
            status, body, _ = waiting.result(30)
        assert status == 409 and body["error"] == "cancelled" and body["result"]["complete"] is False
        print(f"stopped by Ctrl-C in {stop_seconds:.1f} s with a video running")
        assert stop_seconds < 5
        assert process.returncode == 0, stderr.text()
        assert "Traceback" not in stderr.text() and "stopped" in stdout.text()
        assert list(temporary.iterdir()) == []  # the private upload folder is gone
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
