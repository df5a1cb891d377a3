"""``unip predict`` on thermal-camera inputs (issue #23): a real radiometric JPEG, FFF frames, SEQ sequences (one
with a damaged frame), live cameras through a generated Y16 source; °C per class against references computed
another way; and the one input mapping across verbs (predict, analyze, pack, the segmentation readers).

Real files: the FLIR JPEGs in ``shared/data/thermal/`` beside the repository (skipped where absent)."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
from PIL import Image

import thermal_files as tf
from unip.cli import main
from unip.data.inputs import InputMapping, read_input
from unip.seg import load_segmentor, save_segmentor
from unip.seg.predict import Predictor
from unip.seg.prediction import predict_input
from unip.seg.render import ClassInfo

from test_predict import CLASSES, tiny_segmentor

cv2 = pytest.importorskip("cv2")

REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thermal"
needs_real = pytest.mark.skipif(not (REAL_DIR / "README.md").is_file(),
                                reason="the real FLIR files (shared/data/thermal/ beside the repository) are not here")
STORED = tf.as_stored(tf.CALIBRATION)
CELSIUS = ("celsius_mean", "celsius_median", "celsius_min", "celsius_max")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "seg.safetensors"
    return str(save_segmentor(tiny_segmentor(meta={"class_names": CLASSES}), path))


def predict(capsys, *argv):
    code = main(["predict", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def csv_rows(out: Path) -> List[dict]:
    with open(out / "areas.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def reference(labels: np.ndarray, celsius: np.ndarray, class_id: int) -> Optional[List[float]]:
    """mean, median, min, max °C of one class, computed from the label map and a temperature array."""
    values = celsius[(labels == class_id) & np.isfinite(celsius)].astype(np.float64)
    return None if values.size == 0 else [values.mean(), float(np.median(values)), values.min(), values.max()]


def assert_celsius_columns(rows: List[dict], labels: np.ndarray, celsius: np.ndarray) -> None:
    assert len(rows) == len(CLASSES)
    for row in rows:
        expected = reference(labels, celsius, int(row["class_id"]))
        if expected is None:
            assert [row[c] for c in CELSIUS] == ["", "", "", ""] and row["pixels"] == "0"
        else:
            assert np.allclose([float(row[c]) for c in CELSIUS], expected, atol=1e-3), (row, expected)


# ============================================================================================ files
@needs_real
def test_a_real_radiometric_jpeg(checkpoint, tmp_path, capsys):
    """Labels at the raster's 240 x 320, not the preview's 480 x 640; °C per class equal to the reference
    temperatures of the file over the written label map; the overlay has the raster's size too."""
    out = tmp_path / "pred"
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, str(REAL_DIR / "flir_example.jpg"), "--out",
                                str(out), "--no-progress")
    assert code == 0 and err == "", err
    labels = np.asarray(Image.open(out / "label" / "flir_example.png"))
    assert labels.shape == (320, 240) and Image.open(out / "overlay" / "flir_example.png").size == (240, 320)
    celsius = np.load(REAL_DIR / "flir_example.jpg.celsius.npy")
    rows = csv_rows(out)
    assert {(r["width"], r["height"]) for r in rows} == {("240", "320")}
    assert_celsius_columns(rows, labels, celsius)
    record = json.load(open(out / "areas.json"))["images"][0]
    assert record["thermal"]["format"] == "FLIR JPEG" and record["thermal"]["calibration"]["emissivity"] == 0.95
    assert record["issues"] == [] and sum(record["pixels"]) == 320 * 240


@needs_real
def test_predict_input_gives_the_areas_json_entry(checkpoint, tmp_path, capsys):
    """What a web server calls for one file gives the entry ``unip predict`` writes, labels and overlay alike."""
    out = tmp_path / "pred"
    path = str(REAL_DIR / "zenmuse_xtr.jpg")
    assert predict(capsys, "--checkpoint", checkpoint, path, "--out", str(out), "--no-progress",
                   "--emissivity", "0.9")[0] == 0
    segmentor = load_segmentor(checkpoint)
    one = predict_input(Predictor(segmentor, "cpu"), path, ClassInfo.resolve(3, None, segmentor.meta),
                        InputMapping(emissivity=0.9))
    written = json.load(open(out / "areas.json"))["images"][0]
    written.pop("files")
    assert one.record == written and one.labels.shape == (512, 640)
    assert np.array_equal(one.labels, np.asarray(Image.open(out / "label" / "zenmuse_xtr.png")))
    assert np.array_equal(one.overlay(), np.asarray(Image.open(out / "overlay" / "zenmuse_xtr.png")))


def test_an_fff_frame_and_a_seq(checkpoint, tmp_path, capsys):
    """An FFF frame: labels at its raster's size, °C per class = Thermimage's raw2temp over the label map. A SEQ:
    one row per frame (every 2nd), the frames' times from their timestamps, an annotated video."""
    frame_counts = tf.scene(60, 80, seed=1)
    (tmp_path / "one.fff").write_bytes(tf.frame(frame_counts))
    scenes = [tf.scene(48, 64, seed=10 + s, low=3000 + 300 * s) for s in range(5)]
    times = [(1_600_000_000, 250 * s, 0) for s in range(5)]  # 4 frames per second
    (tmp_path / "clip.seq").write_bytes(b"".join(tf.frame(c, time=t) for c, t in zip(scenes, times)))
    out = tmp_path / "pred"
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, str(tmp_path / "one.fff"),
                                str(tmp_path / "clip.seq"), "--every", "2", "--out", str(out), "--no-progress")
    assert code == 0 and err == "", err
    assert "1 image(s) and 3 frame(s)" in stdout
    rows = csv_rows(out)
    labels = np.asarray(Image.open(out / "label" / "one.png"))
    assert labels.shape == (60, 80)
    assert_celsius_columns([r for r in rows if r["input"].endswith("one.fff")], labels,
                           tf.raw2temp(frame_counts, STORED))
    for index in (0, 2, 4):
        frame_rows = [r for r in rows if r["input"].endswith("clip.seq") and r["frame"] == str(index)]
        assert {r["time_s"] for r in frame_rows} == {str(0.25 * index)}
        labels = np.asarray(Image.open(out / "label" / "clip" / f"frame_{index:06d}.png"))
        assert labels.shape == (48, 64)
        assert_celsius_columns(frame_rows, labels, tf.raw2temp(scenes[index], STORED))
    video = cv2.VideoCapture(str(out / "video" / "clip.mp4"))
    assert video.get(cv2.CAP_PROP_FRAME_COUNT) == 3 and video.get(cv2.CAP_PROP_FPS) == pytest.approx(2.0)
    video.release()


def test_a_fixed_window_maps_every_frame_alike(checkpoint, tmp_path, capsys, monkeypatch):
    scenes = [tf.scene(32, 40, seed=s, low=3000 + 2000 * s, high=9000) for s in range(2)]
    (tmp_path / "clip.seq").write_bytes(b"".join(tf.frame(c) for c in scenes))
    seen: List[np.ndarray] = []
    real = Predictor.predict

    def spy(self, images):
        seen.extend(images)
        return real(self, images)

    monkeypatch.setattr(Predictor, "predict", spy)
    assert predict(capsys, "--checkpoint", checkpoint, str(tmp_path / "clip.seq"), "--out", str(tmp_path / "o"),
                   "--thermal-range", "0:100", "--no-progress", "--format", "label")[0] == 0
    for image, counts in zip(seen, scenes):
        celsius = tf.raw2temp(counts, STORED)
        expected = np.clip(np.rint(celsius * 2.55), 0, 255)
        assert np.abs(image[..., 0].astype(int) - expected).max() <= 1
    assert json.load(open(tmp_path / "o" / "areas.json"))["input_mapping"]["thermal_range"] == [0.0, 100.0]


def test_a_damaged_frame_in_the_middle_of_a_seq(checkpoint, tmp_path, capsys):
    """Frame 2 of 5 has a raster shorter than declared: the other four are done, the bad one listed (exit 1)."""
    import struct

    frames = [tf.frame(tf.scene(24, 32, seed=s)) for s in range(5)]
    frames[2] = tf.fff([(0x01, struct.pack("<HHH", 2, 32, 24).ljust(32, b"\0") + bytes(50)),
                        (0x20, tf.camera_info(tf.CALIBRATION, 32, 24))])
    (tmp_path / "bad.seq").write_bytes(b"".join(frames))
    out = tmp_path / "pred"
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, str(tmp_path / "bad.seq"), "--out", str(out),
                                "--no-progress")
    assert code == 1 and "could not be read" in err and len(err.strip().splitlines()) == 1
    assert "failed" in stdout and "(frame 2)" in stdout and "raw thermal image holds 50 bytes" in stdout
    document = json.load(open(out / "areas.json"))
    assert [r["frame"] for r in document["images"]] == [0, 1, 3, 4] and document["complete"] is True
    assert document["failed"][0]["frame"] == 2


def test_palette_pictures_are_named_once(checkpoint, tmp_path, capsys):
    import matplotlib

    for index in range(3):
        unit = tf.scene(40, 48, seed=index).astype(float)
        unit = (unit - unit.min()) / np.ptp(unit)
        rgb = (matplotlib.colormaps["inferno"](unit)[..., :3] * 255).astype(np.uint8)
        Image.fromarray(rgb).save(tmp_path / f"iron{index}.jpg", quality=90)
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, str(tmp_path), "--out", str(tmp_path / "o"),
                                "--no-progress")
    assert code == 0 and len(err.strip().splitlines()) == 1 and "looks like a thermal palette" in err, err
    assert "3 file(s) palette" in stdout
    document = json.load(open(tmp_path / "o" / "areas.json"))
    assert len(document["issues"]["palette"]) == 3 and document["images"][0]["issues"] == ["palette"]


# ============================================================================================ cameras
class FakeCapture:
    """What ``cv2.VideoCapture(N)`` of a UVC thermal core gives: 16-bit Y16 frames of a moving warm disc once asked
    for raw frames (``CAP_PROP_CONVERT_RGB`` 0), BGR frames otherwise; without ``y16`` only BGR. ``interrupt``:
    after that many frames the process gets SIGINT (Ctrl-C)."""

    def __init__(self, frames: int = 100, y16: bool = True, interrupt: Optional[int] = None) -> None:
        self.left, self.y16, self.interrupt = frames, y16, interrupt
        self.convert = 1.0
        self.fourcc = 0.0
        self.read_count = 0
        self.released = False

    def isOpened(self) -> bool:
        return True

    def set(self, prop, value) -> bool:
        if prop == cv2.CAP_PROP_CONVERT_RGB:
            self.convert = float(value)
        elif prop == cv2.CAP_PROP_FOURCC and self.y16:
            self.fourcc = float(value)
        return True

    def get(self, prop) -> float:
        return {cv2.CAP_PROP_FPS: 8.7, cv2.CAP_PROP_FOURCC: self.fourcc}.get(prop, 0.0)

    def counts(self, index: int) -> np.ndarray:
        return tf.scene(120, 160, seed=index, low=29000, high=31500, noise=5)  # TLinear: kelvin x 100

    def read(self):
        if self.left <= 0:
            return False, None
        if self.interrupt is not None and self.read_count == self.interrupt:
            os.kill(os.getpid(), signal.SIGINT)
        self.left -= 1
        counts = self.counts(self.read_count)
        self.read_count += 1
        if self.y16 and self.convert == 0:
            return True, counts
        gray = ((counts - 29000) // 10).clip(0, 255).astype(np.uint8)
        return True, np.stack([gray, gray, gray], axis=2)

    def release(self) -> None:
        self.released = True


def test_a_y16_camera_through_the_same_path(checkpoint, tmp_path, capsys, monkeypatch):
    """16-bit frames (a radiometric Lepton's TLinear counts): --tlinear gives °C per class, --max-frames ends the
    run with complete outputs and an annotated video; the frame rate is printed."""
    fake = FakeCapture()
    monkeypatch.setattr("unip.data.camera.video_capture", lambda index: fake)
    out = tmp_path / "cam"
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, "--camera", "0", "--max-frames", "3",
                                "--tlinear", "0.01", "--out", str(out), "--no-progress")
    assert code == 0 and err == "", err
    assert "16-bit (Y16)" in stdout and "frames/s" in stdout and "3 frame(s)" in stdout
    rows = csv_rows(out)
    assert sorted({r["frame"] for r in rows}) == ["0", "1", "2"]
    for index in range(3):
        labels = np.asarray(Image.open(out / "label" / "camera0" / f"frame_{index:06d}.png"))
        celsius = (fake.counts(index) * 0.01 - 273.15).astype(np.float32)
        assert_celsius_columns([r for r in rows if r["frame"] == str(index)], labels, celsius)
    video = cv2.VideoCapture(str(out / "video" / "camera0.mp4"))
    assert video.get(cv2.CAP_PROP_FRAME_COUNT) == 3
    video.release()
    assert fake.released and json.load(open(out / "areas.json"))["complete"] is True


def test_ctrl_c_ends_a_camera_run_with_complete_outputs(checkpoint, tmp_path, capsys, monkeypatch):
    fake = FakeCapture(interrupt=4)
    monkeypatch.setattr("unip.data.camera.video_capture", lambda index: fake)
    out = tmp_path / "cam"
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, "--camera", "0", "--out", str(out),
                                "--no-progress", "--format", "label,video")
    assert code == 0 and "Ctrl-C" in err, err
    document = json.load(open(out / "areas.json"))
    frames = [r["frame"] for r in document["images"]]
    assert document["complete"] is True and frames == list(range(len(frames))) and 4 <= len(frames) <= 5
    assert len(os.listdir(out / "label" / "camera0")) == len(frames)
    video = cv2.VideoCapture(str(out / "video" / "camera0.mp4"))
    assert video.get(cv2.CAP_PROP_FRAME_COUNT) == len(frames)
    video.release()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual handler is back


def test_an_8_bit_camera_and_cameras_that_cannot_be_read(checkpoint, tmp_path, capsys, monkeypatch):
    fake = FakeCapture(y16=False)
    monkeypatch.setattr("unip.data.camera.video_capture", lambda index: fake)
    code, stdout, _ = predict(capsys, "--checkpoint", checkpoint, "--camera", "1", "--max-frames", "2", "--out",
                              str(tmp_path / "a"), "--no-progress", "--format", "label")
    assert code == 0 and "8-bit frames" in stdout and fake.convert == 1  # conversion switched back on
    code, _, err = predict(capsys, "--checkpoint", checkpoint, "--camera", "1", "--thermal-range", "20:40",
                           "--out", str(tmp_path / "b"), "--no-progress")
    assert code == 2 and "camera 1: holds no temperatures" in err and len(err.strip().splitlines()) == 1
    closed = FakeCapture()
    closed.isOpened = lambda: False
    monkeypatch.setattr("unip.data.camera.video_capture", lambda index: closed)
    code, _, err = predict(capsys, "--checkpoint", checkpoint, "--camera", "3", "--out", str(tmp_path / "c"))
    assert code == 2 and "camera 3: OpenCV cannot open it" in err
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if os.sys.platform.startswith("linux"):
        code, _, err = predict(capsys, "--checkpoint", checkpoint, "--camera", "0", "--show", "--out",
                               str(tmp_path / "d"))
        assert code == 2 and "--show: no display" in err


# ============================================================================================ one mapping
def test_the_same_file_gives_the_same_image_in_every_verb(checkpoint, tmp_path, capsys, monkeypatch):
    """predict (what its segmentor is fed), analyze (its image reader), pack (the stored pixels) and the
    segmentation readers read one 8-bit image of each file: an R-JPEG's raster, a colour picture's luma, a
    16-bit PNG's stretch, a SEQ's frames."""
    from unip.analysis.images import NORMALIZATIONS, load_image, to_display
    from unip.data.infmix import build_manifest
    from unip.data.packed import PackedImages, pack_manifest
    from unip.data.segmentation import Sample, load_sample

    folder = tmp_path / "mixed"
    folder.mkdir()
    counts = tf.scene(40, 56, seed=3)
    (folder / "flir.jpg").write_bytes(tf.flir_jpeg(tf.frame(counts, raster="png", header_order=">"),
                                                   np.full((80, 112, 3), 90, np.uint8)))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(folder / "c.png")
    Image.fromarray(tf.scene(36, 50, seed=4)).save(folder / "raw16.png")
    (folder / "clip.seq").write_bytes(b"".join(tf.frame(tf.scene(28, 36, seed=s)) for s in range(2)))
    expected = {(str(folder / name), None): read_input(str(folder / name)).image
                for name in ("flir.jpg", "c.png", "raw16.png")}
    expected.update({(str(folder / "clip.seq"), k): read_input(str(folder / "clip.seq"), frame=k).image
                     for k in range(2)})
    assert expected[(str(folder / "flir.jpg"), None)].shape == (40, 56)  # the raster, not the 80 x 112 picture

    fed: List[np.ndarray] = []
    real = Predictor.predict
    monkeypatch.setattr(Predictor, "predict", lambda self, images: fed.extend(images) or real(self, images))
    assert predict(capsys, "--checkpoint", checkpoint, str(folder), "--out", str(tmp_path / "p"), "--no-progress",
                   "--format", "label")[0] == 0
    order = [(str(folder / "c.png"), None)] + [(str(folder / "clip.seq"), k) for k in range(2)] + \
        [(str(folder / n), None) for n in ("flir.jpg", "raw16.png")]  # the folder's files in sorted order
    assert len(fed) == len(order)
    for key, image in zip(order, fed):
        assert np.array_equal(image, np.repeat(expected[key][..., None], 3, axis=2)), key

    for (path, frame), gray in expected.items():
        if frame is None:
            shown = to_display(load_image(path, gray.shape, NORMALIZATIONS["none"]), NORMALIZATIONS["none"])
            assert np.array_equal(np.rint(shown * 255).astype(np.uint8), gray), path
            label = tmp_path / f"{os.path.basename(path)}.label.png"
            Image.fromarray(np.zeros(gray.shape, np.uint8)).save(label)
            image, _ = load_sample(Sample(os.path.basename(path), path, str(label)), len(CLASSES))
            assert np.array_equal(image, np.repeat(gray[..., None], 3, axis=2)), path

    manifest = str(tmp_path / "m.jsonl")
    result = build_manifest(manifest, extra=[str(folder)], workers=1)
    assert len(result.records) == 5 and {r.get("frame") for r in result.records} == {None, 0, 1}
    pack_manifest(manifest, str(tmp_path / "pack"), short_side=512, workers=1)
    pack = PackedImages(str(tmp_path / "pack"), transform=None)
    for index, name in enumerate(pack.paths()):
        path, _, frame = name.partition("#frame=")
        assert np.array_equal(pack.read(index), expected[(path, int(frame) if frame else None)]), name


def test_analyze_reads_through_the_fixed_window_it_is_given(checkpoint, tmp_path, capsys, monkeypatch):
    """``unip analyze --thermal-range`` feeds its model the frames mapped through that °C window (what predict
    feeds for the same option), not each frame's stretch."""
    import unip.analysis.images as analysis_images
    from unip.data.inputs import InputMapping

    folder = tmp_path / "frames"
    folder.mkdir()
    for seed in range(2):
        (folder / f"f{seed}.fff").write_bytes(tf.frame(tf.scene(32, 48, seed=seed, low=3000 + 2000 * seed)))
    fed: List[np.ndarray] = []
    real = analysis_images.frame_input
    monkeypatch.setattr(analysis_images, "frame_input", lambda gray, *a, **k: fed.append(gray) or real(gray, *a, **k))
    code = main(["analyze", "--model", checkpoint, "--images", str(folder), "--out", str(tmp_path / "a"),
                 "--no-progress", "--thermal-range", "10:60"])
    capsys.readouterr()
    assert code == 0
    window = InputMapping(thermal_range=(10.0, 60.0))
    for seed in range(2):
        path = str(folder / f"f{seed}.fff")
        expected = read_input(path, window).image
        assert any(np.array_equal(image, expected) for image in fed), path
        assert not np.array_equal(expected, read_input(path).image)  # the window is not the stretch
