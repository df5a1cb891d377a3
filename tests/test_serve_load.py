"""A real ``unip serve`` process on loopback: 50 concurrent predictions of 640x512 frames with a tiny model, none lost
or mixed (each answer equals that frame's answer alone), the page's health answered during the burst, p50 / p95
latency reported, the server's memory flat after the burst; then Ctrl-C, while a long video runs and a client waits
for it, stops it cleanly and at once (the job cancelled, the client answered, exit 0, the private upload folder
removed). Bounded: 57 uploads in all, each with a timeout, the process killed if it outlives the test."""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def read_url(process: subprocess.Popen, timeout: float = 120) -> str:
    """The address ``unip serve`` prints once it serves."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            seen.append(line)
            if line.startswith("open http://"):
                return line.split()[1]
        assert process.poll() is None, f"unip serve ended: {''.join(seen)} {process.stderr.read()}"
    raise AssertionError(f"no address printed in {timeout} s: {''.join(seen)}")


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
        client = Client(read_url(process), timeout=300)  # a burst on a busy 2-core machine can take a minute
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
            stdout, stderr = process.communicate(timeout=30)
            stop_seconds = time.perf_counter() - stopped
            status, body, _ = waiting.result(30)
        assert status == 409 and body["error"] == "cancelled" and body["result"]["complete"] is False
        print(f"stopped by Ctrl-C in {stop_seconds:.1f} s with a video running")
        assert stop_seconds < 5
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr and "stopped" in stdout
        assert list(temporary.iterdir()) == []  # the private upload folder is gone
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
