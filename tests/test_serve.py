"""``unip serve``'s HTTP API on a server running in this process (two tiny random-weight segmentors): every endpoint;
answers equal to what ``unip predict`` and ``unip analyze`` write for the same files; bad uploads (empty, too large,
of another kind, damaged, path-like names); concurrent uploads never mixed; a full queue refused; the private upload
folder removed at the end. The load test and the stop by Ctrl-C run a real ``unip serve`` process
(tests/test_serve_load.py), the page in a real browser tests/test_serve_browser.py."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

from unip.analysis.images import load_image  # noqa: E402
from unip.analysis.queries import query_attention  # noqa: E402
from unip.cli import main  # noqa: E402
from unip.seg import save_segmentor  # noqa: E402
from unip.seg.metrics import confusion_matrix, segmentation_metrics  # noqa: E402
from unip.seg.predict_run import PredictOptions  # noqa: E402
from unip.serve.jobs import Job, JobQueue, QueueFull  # noqa: E402
from unip.serve.models import load_models  # noqa: E402
from unip.serve.server import ServeOptions  # noqa: E402

from serve_client import Client, running  # noqa: E402
from test_predict import scene, tiny_segmentor, write_video  # noqa: E402

CLASSES = ["background", "person", "car"]
THERMAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thermal"
FLIR = sorted(THERMAL.glob("*.jpg")) if THERMAL.is_dir() else []


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two checkpoints (other weights, same classes)."""
    root = tmp_path_factory.mktemp("serve_models")
    return [str(save_segmentor(tiny_segmentor(seed=seed, meta={"class_names": CLASSES}), root / f"{name}.safetensors"))
            for seed, name in ((0, "alpha"), (1, "beta"))]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """An 8-bit PNG, a 16-bit PNG, a colour JPEG and a video, as files."""
    root = tmp_path_factory.mktemp("serve_frames")
    Image.fromarray(scene(96, 128, 1)).save(root / "gray.png")
    Image.fromarray(scene(80, 112, 2).astype(np.uint16) * 50 + 9000).save(root / "raw16.png")
    Image.fromarray(np.stack([scene(72, 96, 3)] * 3, axis=2)).save(root / "colour.jpg", quality=92)
    write_video(root / "clip.mp4", frames=6)
    return root


@pytest.fixture(scope="module")
def server(models):
    options = ServeOptions(models, port=0, max_upload_mb=1, queue_size=12, predict=PredictOptions(batch_size=2))
    with running(options) as running_server:
        yield running_server


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url)


def unip_predict(tmp_path, checkpoint, *inputs, extra=()):
    out = tmp_path / f"predicted_{len(os.listdir(tmp_path))}"
    assert main(["predict", "--no-progress", "--checkpoint", checkpoint, *map(str, inputs), "--out", str(out),
                 *extra]) == 0
    return out, json.loads((out / "areas.json").read_text())


# ============================================================================================ the page
def test_health_models_page_and_its_files(client, models):
    status, health, headers = client.get("/healthz")
    assert status == 200 and health["status"] == "ok" and health["models"] == ["alpha", "beta"]
    assert "default-src 'self'" in headers["content-security-policy"]
    status, listed, _ = client.get("/api/models")
    assert status == 200 and [m["name"] for m in listed["models"]] == ["alpha", "beta"]
    assert listed["models"][0]["classes"] == CLASSES and listed["models"][0]["depth"] == 2
    assert listed["max_upload_bytes"] == 1 << 20
    status, page, headers = client.get("/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    html = page.decode()
    assert set(re.findall(r'(?:src|href)="([^"]+)"', html)) == {"/static/style.css", "/static/app.js", "data:,"}
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, text, headers = client.get(f"/static/{name}")
        assert status == 200 and headers["content-type"].startswith(kind)
        text = text.replace(b'"http://www.w3.org/2000/svg"', b"")  # a name space, not an address
        assert not re.search(rb"https?://|//cdn|@import|url\(", text), f"{name} refers to another site"
    assert client.get("/static/index.html")[0] == 404 and client.get("/static/..%2fapp.py")[0] == 404
    status, body, _ = client.get("/api/nothing")
    assert status == 404 and "error" in body


def test_another_host_name_is_refused(client):
    status, body, _ = client.request("GET", "/healthz", headers={"Host": "attacker.example:7860"})
    assert status == 400 and "not an address of this server" in body["error"]
    assert client.request("GET", "/healthz", headers={"Host": "localhost:1"})[0] == 200


# ============================================================================================ predictions
@pytest.mark.parametrize("name", ["gray.png", "raw16.png", "colour.jpg"] + [f.name for f in FLIR])
def test_a_prediction_is_what_unip_predict_writes(name, client, models, frames, tmp_path):
    path = frames / name if (frames / name).exists() else THERMAL / name
    status, result, _ = client.predict(name, path.read_bytes())
    assert status == 200, result
    out, report = unip_predict(tmp_path, models[0], path)
    record = report["images"][0]
    assert result["classes"] == report["classes"] and result["palette"] == report["palette"]
    assert result["pixels"] == record["pixels"] and result["percent"] == record["percent"]
    assert {k: v for k, v in result.items() if k.startswith("celsius_")} == \
        {k: v for k, v in record.items() if k.startswith("celsius_")}
    assert (result["width"], result["height"], result["input"]) == (record["width"], record["height"], name)
    status, label, _ = client.get(result["label_url"])
    assert status == 200 and np.array_equal(np.array(Image.open(io.BytesIO(label))),
                                            np.array(Image.open(out / record["files"]["label"])))
    for key in ("overlay_url", "color_url", "view_url"):
        status, picture, headers = client.get(result[key])
        assert status == 200 and headers["content-type"] == "image/png"
    status, areas, _ = client.get(result["downloads"]["areas.json"])
    assert status == 200 and areas["images"][0]["input"] == name and areas["images"][0]["pixels"] == record["pixels"]
    status, table, _ = client.get(result["downloads"]["areas.csv"])
    assert status == 200 and table.decode().splitlines()[1].startswith(f"{name},")
    if name in [f.name for f in FLIR]:  # temperatures: a colour map with its °C range
        from unip.data.thermal import read_thermal

        frame = read_thermal(str(path))
        scale = result["thermal"]
        assert scale["unit"] == "°C" and scale["min"] <= scale["low"] < scale["high"] <= scale["max"]
        assert scale["min"] == pytest.approx(float(np.nanmin(frame.celsius)), abs=0.01)
        view = Image.open(io.BytesIO(client.get(result["view_url"])[1]))
        assert view.size == (frame.width, frame.height)
    else:
        assert result["thermal"] is None


@pytest.mark.parametrize("name", ["one.fff", "clip.seq", "clip.csq", "sequence.bin"])
def test_flir_frames_and_sequences_are_what_unip_predict_writes(name, client, models, tmp_path):
    """A FLIR FFF frame (an image) and SEQ / CSQ sequences (one entry per frame, like a video), recognised by their
    bytes whatever their name: the °C columns are unip predict's for the same file."""
    import thermal_files as tf

    scenes = [tf.scene(48, 64, seed=20 + s, low=3000 + 400 * s) for s in range(3)]
    raster = "jpegls" if name.endswith(".csq") else "raw"
    frames = scenes[:1] if name.endswith(".fff") else scenes
    content = b"".join(tf.frame(counts, raster=raster) for counts in frames)
    path = tmp_path / (name if not name.endswith(".bin") else "clip.seq")
    path.write_bytes(content)
    status, result, _ = client.predict(name, content)
    assert status == 200, result
    assert result["kind"] == "thermal"
    _, report = unip_predict(tmp_path, models[0], path)
    columns = ("pixels", "percent", "celsius_mean", "celsius_median", "celsius_min", "celsius_max")
    if name.endswith(".fff"):
        record = report["images"][0]
        assert (result["width"], result["height"]) == (64, 48)
        assert {k: result[k] for k in columns} == {k: record[k] for k in columns}
        assert result["celsius_mean"] != [None] * 3 and result["thermal"]["unit"] == "°C"
    else:
        assert [f["frame"] for f in result["frames"]] == [r["frame"] for r in report["images"]] == [0, 1, 2]
        for frame, record in zip(result["frames"], report["images"]):
            assert {k: frame[k] for k in columns} == {k: record[k] for k in columns}
        assert result["downloads"]["video.mp4"]


def test_the_second_checkpoint_by_name(client, models, frames, tmp_path):
    status, result, _ = client.predict("gray.png", (frames / "gray.png").read_bytes(), checkpoint="beta")
    assert status == 200 and result["checkpoint"] == "beta"
    _, report = unip_predict(tmp_path, models[1], frames / "gray.png")
    assert result["pixels"] == report["images"][0]["pixels"]
    status, first, _ = client.predict("gray.png", (frames / "gray.png").read_bytes(), checkpoint="alpha")
    assert first["pixels"] != result["pixels"]  # other weights, other masks
    status, body, _ = client.predict("gray.png", (frames / "gray.png").read_bytes(), checkpoint="gamma")
    assert status == 400 and "alpha, beta" in body["error"]


def test_a_video_gives_every_frame_as_unip_predict_does(client, models, frames, tmp_path):
    video = (frames / "clip.mp4").read_bytes()
    status, result, _ = client.predict("clip.mp4", video)
    assert status == 200 and result["kind"] == "video", result
    _, report = unip_predict(tmp_path, models[0], frames / "clip.mp4")
    assert [f["frame"] for f in result["frames"]] == [r["frame"] for r in report["images"]] == list(range(6))
    for frame, record in zip(result["frames"], report["images"]):
        assert frame["pixels"] == record["pixels"] and frame["time_s"] == record["time_s"]
    status, mp4, headers = client.get(result["downloads"]["video.mp4"])
    assert status == 200 and headers["content-type"] == "video/mp4" and mp4[4:8] == b"ftyp"
    assert client.get(result["frames"][5]["overlay_url"])[0] == 200
    status, result, _ = client.predict("clip.mp4", video, every="2")
    assert [f["frame"] for f in result["frames"]] == [0, 2, 4]


def test_a_video_follows_its_progress_and_can_be_cancelled(client, server, tmp_path):
    clip = write_video(tmp_path / "long.mp4", frames=150)
    blocker = threading.Event()
    server.jobs.submit(Job("test", lambda job: blocker.wait(30) and {}), listed=False)  # holds the worker
    status, queued, _ = client.predict("first.mp4", Path(clip).read_bytes(), wait="false")
    assert status == 202 and queued["status"] == "queued"
    status, waiting, _ = client.predict("second.mp4", Path(clip).read_bytes(), wait="false")
    client.request("POST", f"/api/jobs/{waiting['job']}/cancel")  # cancelled while it waits: never runs
    blocker.set()
    while True:
        state = client.get(f"/api/jobs/{queued['job']}")[1]
        if state["status"] == "running" and state["progress"]["done"] >= 8:
            break
        assert state["status"] in ("queued", "running"), state
    assert state["progress"]["total"] == 150
    status, state, _ = client.request("POST", f"/api/jobs/{queued['job']}/cancel")
    assert status == 200
    state = client.wait(queued["job"])
    assert state["status"] == "cancelled" and state["result"]["complete"] is False
    assert 8 <= len(state["result"]["frames"]) < 150
    state = client.wait(waiting["job"])
    assert state["status"] == "cancelled" and "result" not in state
    assert client.get("/api/jobs/0123")[0] == 404


def test_per_class_iou_against_a_dropped_label_map(client, frames):
    image = (frames / "gray.png").read_bytes()
    _, first, _ = client.predict("gray.png", image, checkpoint="alpha")
    label = client.get(first["label_url"])[1]
    status, same, _ = client.post("/api/predict", {"checkpoint": "alpha"}, [("file", "gray.png", image),
                                                                          ("label", "gray_label.png", label)])
    assert status == 200 and same["label"] == "gray_label.png"
    present = [i for i, pixels in enumerate(first["pixels"]) if pixels]
    assert [same["iou"][i] for i in present] == [100.0] * len(present) and same["mIoU"] == 100.0
    status, other, _ = client.post("/api/predict", {"checkpoint": "beta"}, [("file", "gray.png", image),
                                                                         ("label", "gray_label.png", label)])
    truth = torch.from_numpy(np.array(Image.open(io.BytesIO(label))).astype(np.int64))
    predicted = torch.from_numpy(np.array(Image.open(io.BytesIO(client.get(other["label_url"])[1]))).astype(np.int64))
    expected = segmentation_metrics(confusion_matrix(predicted, truth, 3))
    assert other["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-3)
    assert other["iou"] == [None if np.isnan(v) else pytest.approx(v, abs=1e-3) for v in expected["IoU"]]
    small = png(np.zeros((8, 8), np.uint8))
    status, mismatch, _ = client.post("/api/predict", {}, [("file", "gray.png", image), ("label", "small.png", small)])
    assert status == 200 and "small.png: it is 8x8 pixels, the prediction 128x96" in mismatch["label_error"]


# ============================================================================================ attention
def test_analysis_is_what_unip_analyze_gives_and_maps_are_the_queries(client, server, models, frames, tmp_path):
    names = ["gray.png", "raw16.png", "colour.jpg"]
    files = [("file", name, (frames / name).read_bytes()) for name in names]
    status, result, _ = client.post("/api/analyze", {"checkpoint": "alpha"}, files)
    assert status == 200, result
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes((frames / name).read_bytes())
    assert main(["analyze", "--model", models[0], "--images", str(folder), "--out", str(tmp_path / "analysis"),
                 "--no-progress"]) == 0
    profile = json.loads((tmp_path / "analysis" / "profile.json").read_text())["models"][0]
    assert result["selected_layer"] == profile["selected_layer"] and result["num_images"] == profile["num_images"] == 3
    assert result["input_size"] == profile["input_size"] and result["uniform_distance"] == profile["uniform_distance"]
    for served, written in zip(result["layers"], profile["layers"]):
        assert served["pattern"] == written["pattern"]
        for metric in ("nmi", "distance", "entropy"):
            assert served[metric] == pytest.approx(written[metric], rel=1e-5, abs=1e-7)
    assert [f["name"] for f in result["frames"]] == names and result["skipped"] == []
    assert Image.open(io.BytesIO(client.get(result["frames"][1]["image_url"])[1])).size == (128, 128)

    backbone = server.models[0].backbone
    image = load_image(str(frames / "raw16.png"), (128, 128))
    for head in ("mean", "1"):
        status, answer, _ = client.get(f"{result['attention_url']}?frame=1&layer=2&head={head}&x=40&y=70")
        assert status == 200, answer
        expected = query_attention(backbone, image, [(40, 70)], [2], head=None if head == "mean" else 1)[0, 0]
        assert (answer["rows"], answer["cols"], answer["row"], answer["col"]) == (8, 8, 4, 2)
        assert np.allclose(np.array(answer["values"]).reshape(8, 8), expected.numpy(), atol=1e-6)
        assert sum(answer["values"]) == pytest.approx(1.0, abs=1e-5)
    for query, wrong in (("layer=3&x=1&y=1", "layer=3"), ("layer=1&head=2&x=1&y=1", "head=2"),
                         ("layer=1&x=128&y=1", "x=128"), ("layer=1&x=1&y=1&frame=3", "frame=3"), ("x=1&y=1", "layer")):
        status, body, _ = client.get(f"{result['attention_url']}?{query}")
        assert status == 400 and wrong in body["error"], body
    _, prediction, _ = client.predict("gray.png", (frames / "gray.png").read_bytes())
    assert client.get(f"/api/jobs/{prediction['job']}/attention?layer=1&x=1&y=1")[0] == 409


# ============================================================================================ bad uploads
def test_bad_uploads_get_a_message_and_the_server_goes_on(client, server, frames):
    image = (frames / "gray.png").read_bytes()
    cases = [  # (files, fields, status, words of the message)
        ([("file", "empty.png", b"")], {}, 400, "empty.png: the file is empty"),
        ([("file", "notes.png", b"just some text, named like an image")], {}, 415, "notes.png: its content is none"),
        ([("file", "truncated.png", image[:200])], {}, 422, "truncated.png"),
        ([("file", "garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(300))], {}, 422, "garbage.jpg"),
        ([("file", "broken.mp4", b"\x00\x00\x00\x18ftypisom" + bytes(500))], {}, 422, "broken.mp4"),
        ([], {}, 400, "send one file in the form field file (0 sent)"),
        ([("file", "a.png", image), ("file", "b.png", image)], {}, 400, "(2 sent)"),
        ([("file", "a.png", image)], {"every": "0"}, 400, "every=0"),
        ([("file", "a.png", image)], {"wait": "perhaps"}, 400, "wait=perhaps"),
        ([("file", "a.png", image)], {"note": "x" * 5000}, 400, "longer than 4096 bytes"),
        ([("picture", "a.png", image)], {}, 400, "field file"),
    ]
    for files, fields, status, words in cases:
        got, body, _ = client.post("/api/predict", fields, files)
        assert (got, words in body.get("error", "")) == (status, True), (words, got, body)
        assert server.uploads.path not in body["error"]  # the message names the upload, not where it was stored
    status, body, _ = client.post("/api/analyze", {}, [("file", "clip.mp4", (frames / "clip.mp4").read_bytes())])
    assert status == 415 and "clip.mp4: its content is a video" in body["error"]
    status, body, _ = client.request("POST", "/api/predict", b"file=a.png",
                                     {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "multipart/form-data" in body["error"]
    assert client.request("POST", "/api/predict", b"--x\r\nnot a form",
                          {"Content-Type": "multipart/form-data; boundary=x"})[0] == 400
    assert client.get("/healthz")[1]["status"] == "ok"


def test_uploads_past_the_limit_are_refused_as_they_stream_in(client, server):
    before = _stored(server)
    status, body, _ = client.predict("big.png", b"\x89PNG\r\n\x1a\n" + bytes(2 << 20))  # announced: Content-Length
    assert status == 413 and "--max-upload-mb" in body["error"] and "1 MiB" in body["error"]

    def chunks():  # not announced: refused once 1 MiB and the form's allowance have streamed in
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n\r\n\x89PNG\r\n\x1a\n"
        for _ in range(24):
            yield bytes(64 << 10)
    status, body, _ = client.request("POST", "/api/predict", chunks(),
                                     {"Content-Type": "multipart/form-data; boundary=b"}, chunked=True)
    assert status == 413 and "over" in body["error"]
    assert _stored(server) == before  # nothing of either upload is left


def _stored(server):
    return sorted(p.name for p in Path(server.uploads.path).rglob("*") if p.is_file() and ".upload" in p.name)


@pytest.mark.parametrize("name", ["../../../../tmp/escape.png", "..\\..\\windows\\escape.png", "/etc/passwd",
                                  "a/b/../../c.png", "new\nline.png", "..", ""])
def test_a_client_file_name_is_only_shown_never_a_path(name, client, server, frames):
    status, result, _ = client.predict(name, (frames / "gray.png").read_bytes())
    assert status == 200, result
    shown = result["input"]
    assert "/" not in shown and "\n" not in shown
    assert shown == {"..": "upload", "": "upload", "new\nline.png": "new\\nline.png"}.get(name, os.path.basename(
        name.replace("\\", "/")))
    assert not os.path.exists("/tmp/escape.png")
    stored = [p for p in Path(server.uploads.path).rglob("*") if p.is_file()]
    assert all(re.fullmatch(r"[0-9a-f]{32}\.\w+|[\w.-]+", p.name) for p in stored)


# ============================================================================================ load and the queue
def test_concurrent_uploads_never_mix(client, frames):
    images = {f"frame{i}.png": png(scene(64, 80, seed=10 + i)) for i in range(10)}
    alone = {name: client.predict(name, data)[1]["pixels"] for name, data in images.items()}
    assert len({tuple(p) for p in alone.values()}) > 3  # different frames, different answers

    def send(name):
        status, result, _ = client.predict(name, images[name])
        return name, status, result
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(send, list(images) * 2))
    for name, status, result in answers:
        assert status == 200 and result["input"] == name and result["pixels"] == alone[name]
    assert len({result["job"] for _, _, result in answers}) == 20


def test_a_full_queue_refuses_the_next_job_and_finished_jobs_are_pruned(client, server, frames):
    release = threading.Event()
    queue = JobQueue(size=1, keep=2)
    try:
        queue.submit(Job("hold", lambda job: release.wait(10) and {}))
        while queue.waiting:  # the worker took it
            pass
        waiting = queue.submit(Job("next", lambda job: {}))
        with pytest.raises(QueueFull):
            queue.submit(Job("more", lambda job: {}))
        release.set()
        waiting.future.result(10)
        jobs = []
        for _ in range(3):  # one at a time: the queue holds one
            jobs.append(queue.submit(Job("quick", lambda job: {"n": 1})))
            jobs[-1].future.result(10)
        assert queue.find(jobs[-1].id) is not None and sum(queue.counts().values()) == 2  # the newest kept
    finally:
        release.set()
        queue.close()
    blocker = threading.Event()
    server.jobs.submit(Job("hold", lambda job: blocker.wait(30) and {}), listed=False)
    try:
        sent = []
        for _ in range(server.jobs.size + 1):
            sent.append(client.predict("gray.png", (frames / "gray.png").read_bytes(), wait="false"))
        assert [status for status, _, _ in sent[:-1]] == [202] * server.jobs.size
        status, body, _ = sent[-1]
        assert status == 503 and "busy" in body["error"]
    finally:
        blocker.set()
    for _, queued, _ in sent[:-1]:
        assert client.wait(queued["job"])["status"] == "done"


# ============================================================================================ the server itself
def test_the_upload_folder_is_private_and_removed_at_the_end(models, frames):
    with running(ServeOptions(models[:1], port=0, predict=PredictOptions())) as server:
        folder = server.uploads.path
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        status, _, _ = Client(server.url).predict("gray.png", (frames / "gray.png").read_bytes())
        assert status == 200 and os.listdir(folder)
    assert not os.path.exists(folder)


def test_without_a_checkpoint_the_demo_model_is_served(models, tmp_path, monkeypatch):
    from unip.demo.cache import METRICS_FILE, RECORD_FILE, RECORD_FORMAT, TEACHER_FILE, entry_folder
    from unip.demo.settings import FAST

    monkeypatch.setenv("UNIP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Exception, match="no --checkpoint given and no demo model cached .* unip demo --fast"):
        load_models([], PredictOptions())
    key = FAST.teacher.key(FAST.image_size)
    entry = entry_folder(tmp_path / "cache", key)
    entry.mkdir(parents=True)
    (entry / TEACHER_FILE).write_bytes(Path(models[0]).read_bytes())
    (entry / METRICS_FILE).write_text('{"mIoU": 50.0}')
    (entry / RECORD_FILE).write_text(json.dumps({"format": RECORD_FORMAT, "key": key}))
    served = load_models([], PredictOptions())
    assert [m.checkpoint for m in served] == [str(entry / TEACHER_FILE)] and served[0].name == "teacher"
