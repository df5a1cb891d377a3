"""Thermal-camera files: FLIR R-JPEG, FFF, SEQ, CSQ, 16-bit and 8-bit images (``unip.data.thermal``).

Real files: the FLIR JPEGs in ``shared/data/thermal/`` beside the repository (skipped where absent), against their
reference arrays and, where exiftool is installed, against ExifTool. Written files: ``tests/thermal_files.py``
builds FFF / SEQ / CSQ / R-JPEG files from arrays; temperatures are checked against Thermimage's ``raw2temp``
written out term by term there.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import thermal_files as tf
from unip.cli import main
from unip.data.images import stretch_to_uint8, to_gray
from unip.data.thermal import (ThermalFileError, ThermalFrame, describe_thermal, iter_thermal, read_thermal,
                               to_uint8)
from unip.errors import ConfigError, DataError, UnipError

_CANDIDATES = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thermal",
               Path("/work/shared/data/thermal"))
REAL_DIR = next((folder for folder in _CANDIDATES if (folder / "README.md").is_file()), None)
needs_real = pytest.mark.skipif(REAL_DIR is None, reason="the real FLIR files (shared/data/thermal/ beside the "
                                                         "repository) are not here")
needs_exiftool = pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool is not installed")
HAVE_IMAGECODECS = importlib.util.find_spec("imagecodecs") is not None
needs_imagecodecs = pytest.mark.skipif(not HAVE_IMAGECODECS, reason="imagecodecs (pip install 'unip[thermal]') is "
                                                                    "not installed: no JPEG-LS rasters")
#: Raster encodings of FFF records the tests write (JPEG-LS only where imagecodecs is installed).
RASTERS = ["raw", "png"] + (["jpegls"] if HAVE_IMAGECODECS else [])

#: What shared/data/thermal/README.md says of each file.
REAL_FILES = {
    "flir_example.jpg": dict(camera="*", shape=(320, 240), preview=(640, 480, 3), counts=(12501, 20042),
                             celsius=(25.948, 62.320), encoding="PNG, byte-swapped 16-bit"),
    "zenmuse_xtr.jpg": dict(camera="FLIR", shape=(512, 640), preview=(512, 640, 3), counts=(3051, 4630),
                            celsius=(15.929, 59.734), encoding="raw 16-bit little-endian"),
}
STORED = tf.as_stored(tf.CALIBRATION)


def _write(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


# ============================================================================================ real files
@needs_real
@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_flir_jpeg_counts_and_temperatures(name):
    expected = REAL_FILES[name]
    frame = read_thermal(str(REAL_DIR / name))
    counts = np.load(REAL_DIR / f"{name}.counts.npy")
    celsius = np.load(REAL_DIR / f"{name}.celsius.npy")
    assert frame.counts.dtype == np.uint16 and frame.counts.shape == expected["shape"]
    assert np.array_equal(frame.counts, counts)
    assert frame.celsius.dtype == np.float32 and frame.celsius.shape == expected["shape"]
    assert float(np.max(np.abs(frame.celsius - celsius))) < 0.05
    assert (int(counts.min()), int(counts.max())) == expected["counts"]
    assert np.allclose([frame.celsius.min(), frame.celsius.max()], expected["celsius"], atol=0.001)
    assert frame.camera == expected["camera"] and frame.format == "FLIR JPEG"
    assert frame.encoding == expected["encoding"] and frame.preview.shape == expected["preview"]
    assert frame.timestamp is not None and frame.timestamp.year in (2017, 2018)
    assert [f.index for f in iter_thermal(str(REAL_DIR / name))] == [0]
    assert np.array_equal(to_uint8(frame), stretch_to_uint8(frame.counts))


@needs_real
@needs_exiftool
@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_flir_jpeg_against_exiftool(name):
    path = str(REAL_DIR / name)
    frame = read_thermal(path)
    tags = _exiftool_tags(path)
    _assert_same_as_exiftool(frame, tags, _exiftool_raster(path, tags))


def _exiftool_tags(path: str) -> dict:
    return json.loads(subprocess.run(["exiftool", "-j", "-n", path], capture_output=True, check=True).stdout)[0]


def _exiftool_raster(path: str, tags: dict) -> np.ndarray:
    data = subprocess.run(["exiftool", "-b", "-RawThermalImage", path], capture_output=True, check=True).stdout
    values = np.asarray(Image.open(io.BytesIO(data))).astype(np.uint16)
    return values.byteswap() if tags["RawThermalImageType"] == "PNG" else values


def _assert_same_as_exiftool(frame: ThermalFrame, tags: dict, raster: np.ndarray) -> None:
    assert np.array_equal(frame.counts, raster)
    names = {"emissivity": "Emissivity", "object_distance": "ObjectDistance",
             "reflected_temperature": "ReflectedApparentTemperature",
             "atmospheric_temperature": "AtmosphericTemperature", "ir_window_temperature": "IRWindowTemperature",
             "ir_window_transmission": "IRWindowTransmission", "relative_humidity": "RelativeHumidity",
             "planck_r1": "PlanckR1", "planck_r2": "PlanckR2", "planck_b": "PlanckB", "planck_f": "PlanckF",
             "planck_o": "PlanckO", "atmospheric_trans_alpha1": "AtmosphericTransAlpha1",
             "atmospheric_trans_alpha2": "AtmosphericTransAlpha2", "atmospheric_trans_beta1": "AtmosphericTransBeta1",
             "atmospheric_trans_beta2": "AtmosphericTransBeta2", "atmospheric_trans_x": "AtmosphericTransX"}
    for key, tag in names.items():
        assert frame.calibration[key] == pytest.approx(float(tags[tag]), rel=1e-6, abs=1e-5), key
    assert (frame.width, frame.height) == (tags["RawThermalImageWidth"], tags["RawThermalImageHeight"])
    assert frame.camera == (tags.get("CameraModel") or tags.get("Model"))


@needs_exiftool
@pytest.mark.parametrize("raster, header_order", [("raw", "<"), ("png", ">")])
def test_written_files_read_the_same_in_exiftool(tmp_path, raster, header_order):
    """ExifTool reads what the tests' writer writes as unip does: the writer follows the documented layout."""
    counts = tf.scene(24, 32)
    data = tf.frame(counts, header_order=header_order, raster=raster)
    for path in (_write(tmp_path, "a.fff", data),
                 _write(tmp_path, "a.jpg", tf.flir_jpeg(data, np.zeros((32, 24, 3), np.uint8), chunk=700))):
        tags = _exiftool_tags(path)
        if raster == "raw":  # ExifTool wraps a raw raster in a TIFF header
            tags["RawThermalImageType"] = "TIFF"
        _assert_same_as_exiftool(read_thermal(path), tags, _exiftool_raster(path, tags))


# ============================================================================================ written files
@pytest.mark.parametrize("raster", ["raw", "png", "png-native", pytest.param("jpegls", marks=needs_imagecodecs)])
@pytest.mark.parametrize("header_order, record_order", [("<", "<"), (">", "<"), ("<", ">"), (">", ">")])
def test_fff_frame_reads_back_exactly(tmp_path, raster, header_order, record_order):
    counts = tf.scene(30, 40, low=1000, high=30000)
    counts[0, :3] = [0, 1, 65535]  # the extremes of the range, byte patterns a swap would change
    data = tf.frame(counts, header_order=header_order, record_order=record_order, raster=raster,
                    time=(1500000000, 123, -120))
    frame = read_thermal(_write(tmp_path, "frame.fff", data))
    assert frame.counts.dtype == np.uint16 and np.array_equal(frame.counts, counts)
    reference = tf.raw2temp(counts, STORED)
    valid = np.isfinite(reference)
    assert np.array_equal(np.isfinite(frame.celsius), valid) and not valid[0, 0]  # count 0 is off the curve
    assert np.max(np.abs(frame.celsius[valid] - reference[valid])) < 1e-3
    assert frame.calibration == pytest.approx(STORED)
    assert frame.camera == "TestCam 640" and frame.format == ("CSQ" if raster == "jpegls" else "FFF")
    assert frame.timestamp.isoformat() == "2017-07-14T04:40:00.123000+02:00"
    assert frame.preview is None


@pytest.mark.parametrize("raster, encoding", [("png", "PNG, byte-swapped 16-bit"),
                                              ("png-native", "PNG, 16-bit in PNG's byte order")])
def test_a_png_raster_in_either_byte_order_reads_the_same_counts(tmp_path, raster, encoding):
    """Most FLIR cameras write their PNG rasters byte-swapped (ExifTool's notes), a few in PNG's own order: the
    order in which the raster is smooth wins (a Lepton-like 14-bit scene and a 640x512 one)."""
    for counts in (tf.scene(120, 160, low=7000, high=9000), tf.scene(512, 640, seed=3)):
        frame = read_thermal(_write(tmp_path, "r.jpg", tf.flir_jpeg(tf.frame(counts, raster=raster),
                                                                    np.zeros((8, 8, 3), np.uint8))))
        assert np.array_equal(frame.counts, counts) and frame.encoding == encoding


def test_flir_jpeg_reassembles_segments_by_number(tmp_path):
    counts = tf.scene(40, 30)
    picture = np.zeros((80, 60, 3), np.uint8)
    picture[:, :, 0] = np.arange(60, dtype=np.uint8) * 4
    data = tf.frame(counts, header_order=">", raster="png", model="")
    order = list(np.random.default_rng(0).permutation(len(range(0, len(data), 300))))
    assert order != sorted(order)
    path = _write(tmp_path, "r.jpg", tf.flir_jpeg(data, picture, chunk=300, order=order, exif_model="Exif Cam"))
    frame = read_thermal(path)
    assert np.array_equal(frame.counts, counts)
    assert frame.camera == "Exif Cam"  # the FFF data names no model: the JPEG's EXIF does
    assert frame.preview.shape == (80, 60, 3)
    assert np.array_equal(frame.preview, np.asarray(Image.open(path).convert("RGB")))


def test_seq_yields_every_frame(tmp_path):
    scenes = [tf.scene(12, 16, seed=index) for index in range(4)]
    frames = [tf.frame(scene, header_order=order, record_order=order) for scene, order in zip(scenes, "<><>")]
    frames[2] = tf.fff([(0x01, tf.raw_data(scenes[2])),
                        (0x20, tf.camera_info(tf.CALIBRATION, 16, 12))], empty_entries=2)  # free entries first
    padded = frames[0] + frames[1] + b"\0" * 100 + frames[2] + b"FFF\0" + b"\x01" * 60 + frames[3]
    path = _write(tmp_path, "clip.seq", padded)  # padding, and a false "FFF\0" before the last frame
    read = list(iter_thermal(path))
    assert [frame.index for frame in read] == [0, 1, 2, 3] and {frame.format for frame in read} == {"SEQ"}
    for frame, scene in zip(read, scenes):
        assert np.array_equal(frame.counts, scene)
        assert np.max(np.abs(frame.celsius - tf.raw2temp(scene, STORED))) < 1e-3
    assert np.array_equal(read_thermal(path, frame=3).counts, scenes[3])
    with pytest.raises(ThermalFileError, match=r"clip.seq: holds 4 frames, so no frame 4 .*ask for 0..3"):
        read_thermal(path, frame=4)
    assert "frames:      4 (the ranges below are frame 0's)" in describe_thermal(path)


@needs_imagecodecs
def test_csq_yields_jpeg_ls_frames(tmp_path):
    scenes = [tf.scene(20, 24, seed=index, low=100, high=16000) for index in range(3)]
    path = _write(tmp_path, "clip.csq", b"".join(tf.frame(scene, raster="jpegls", record_order=order)
                                                 for scene, order in zip(scenes, "<><")))
    read = list(iter_thermal(path))
    assert len(read) == 3 and {(frame.format, frame.encoding) for frame in read} == {("CSQ", "JPEG-LS")}
    for frame, scene in zip(read, scenes):
        assert np.array_equal(frame.counts, scene)


def test_fff_embedded_image_is_the_preview(tmp_path):
    picture = np.full((12, 16, 3), (200, 30, 30), np.uint8)
    path = _write(tmp_path, "e.fff", tf.frame(tf.scene(12, 16), preview=tf.jpeg(picture, quality=100)))
    preview = read_thermal(path).preview
    assert preview.shape == (12, 16, 3) and np.abs(preview.astype(int) - picture).max() <= 3


def test_user_overrides_change_the_temperatures(tmp_path):
    counts = tf.scene(10, 12)
    path = _write(tmp_path, "o.fff", tf.frame(counts))
    frame = read_thermal(path, emissivity=0.5, distance=3.0, reflected=40.0)
    changed = dict(STORED, emissivity=0.5, object_distance=3.0, reflected_temperature=40.0)
    assert frame.calibration == pytest.approx(changed)
    assert np.max(np.abs(frame.celsius - tf.raw2temp(counts, changed))) < 1e-3
    assert np.max(np.abs(frame.celsius - read_thermal(path).celsius)) > 5  # emissivity 0.9 → 0.5 matters
    for bad in (dict(emissivity=0), dict(emissivity=1.5), dict(distance=-1), dict(reflected=float("nan")),
                dict(tlinear=0), dict(emissivity="0.9")):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            read_thermal(path, **bad)
    with pytest.raises(ConfigError, match="frame"):
        read_thermal(path, frame=-1)


def test_bad_calibration_in_the_file_gives_no_temperatures(tmp_path, caplog):
    path = _write(tmp_path, "e0.fff", tf.frame(tf.scene(8, 8), calibration=dict(tf.CALIBRATION, emissivity=0.0)))
    with caplog.at_level(logging.WARNING, logger="unip"):
        frame = read_thermal(path)
    assert frame.celsius is None and "emissivity 0 is not in (0, 1]" in caplog.text
    assert read_thermal(path, emissivity=0.95).celsius is not None  # the user's value makes it usable
    short = tf.fff([(0x01, tf.raw_data(tf.scene(8, 8))), (0x20, tf.camera_info(tf.CALIBRATION, 8, 8, size=0x100))])
    frame = read_thermal(_write(tmp_path, "short.fff", short))
    assert frame.celsius is None and "planck_r1" in frame.calibration and "planck_o" not in frame.calibration


# ============================================================================================ plain images
@pytest.mark.parametrize("suffix, mode", [(".tif", "I;16"), (".tif", "I;16B"), (".png", "I;16")])
def test_sixteen_bit_image_counts_and_linear_scale(tmp_path, suffix, mode):
    counts = tf.scene(20, 30, low=7000, high=8000)
    path = str(tmp_path / f"boson{suffix}")
    Image.frombytes(mode, (30, 20), counts.astype(">u2" if mode.endswith("B") else "<u2").tobytes()).save(path)
    frame = read_thermal(path)
    assert np.array_equal(frame.counts, counts) and frame.celsius is None and frame.bit_depth == 16
    assert frame.format == ("16-bit TIFF" if suffix == ".tif" else "16-bit PNG")
    linear = read_thermal(path, tlinear=0.04)
    assert np.allclose(linear.celsius, counts * 0.04 - 273.15, atol=1e-4) and linear.calibration == {"tlinear": 0.04}
    assert np.array_equal(to_uint8(frame), stretch_to_uint8(counts))
    assert "tlinear" in describe_thermal(path)


def test_eight_bit_images_keep_their_values(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (16, 20), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    frame = read_thermal(str(tmp_path / "g.png"))
    assert frame.counts.dtype == np.uint16 and np.array_equal(frame.counts, gray) and frame.bit_depth == 8
    assert frame.celsius is None and frame.preview is None and np.array_equal(to_uint8(frame), gray)
    colour = np.zeros((16, 20, 3), np.uint8)
    colour[..., 0] = 250
    Image.fromarray(colour).save(tmp_path / "c.jpg", quality=100)
    frame = read_thermal(str(tmp_path / "c.jpg"))
    assert frame.preview.shape == (16, 20, 3)
    assert np.array_equal(frame.counts, to_gray(Image.open(tmp_path / "c.jpg")))
    assert frame.format == "8-bit image" and "colour" in frame.encoding
    with pytest.raises(DataError, match="no temperatures"):
        to_uint8(frame, (20, 30))


# ============================================================================================ the mapping
@pytest.mark.parametrize("case", ["random", "constant", "two values", "one outlier", "one pixel", "full range"])
def test_stretch_equals_the_image_readers_stretch(case):
    rng = np.random.default_rng(1)
    counts = {"random": rng.integers(2000, 9000, (64, 80)), "constant": np.full((8, 8), 1234),
              "two values": np.array([[5, 5, 5, 9]] * 4), "one outlier": np.r_[np.full(999, 300), [60000]][None],
              "one pixel": np.array([[7]]), "full range": rng.integers(0, 65536, (50, 50))}[case].astype(np.uint16)
    frame = ThermalFrame(counts=counts, celsius=None, camera=None, calibration={})
    assert np.array_equal(to_uint8(frame), stretch_to_uint8(counts))


def test_fixed_window_maps_temperatures_the_same_for_every_frame():
    celsius = np.array([[10.0, 20.0, 25.0], [30.0, 40.0, np.nan]], np.float32)
    frame = ThermalFrame(counts=np.zeros((2, 3), np.uint16), celsius=celsius, camera=None, calibration={})
    assert to_uint8(frame, (20, 30)).tolist() == [[0, 0, 128], [255, 255, 0]]
    for bad in ((30, 20), (1, float("inf")), ("a", 2), (1,)):
        with pytest.raises(ConfigError, match="window"):
            to_uint8(frame, bad)


# ============================================================================================ damage
def _damaged(tmp_path):
    """(name, bytes, what the error must say) for one damage of each kind."""
    counts = tf.scene(8, 10)
    good = tf.frame(counts)
    big_endian = tf.frame(counts, header_order=">")
    raw8 = tf.fff([(0x01, struct.pack("<HHH", 2, 10, 8).ljust(32, b"\0") + bytes(80))])
    png8 = tf.fff([(0x01, struct.pack("<HHH", 2, 10, 8).ljust(32, b"\0") + _png8(counts))])
    huge = tf.fff([(0x01, struct.pack("<HHH", 2, 60000, 60000).ljust(32, b"\0") + bytes(64))])
    outside = bytearray(good)
    struct.pack_into("<I", outside, 0x40 + 0x0C, 10 ** 9)  # record 0 at byte 1e9
    directory = bytearray(big_endian)
    struct.pack_into(">I", directory, 0x18, 2 ** 31)  # directory past the end
    many = bytearray(good)
    struct.pack_into("<I", many, 0x1C, 2 ** 31)  # 2**31 directory entries
    picture = np.zeros((8, 8, 3), np.uint8)
    jpeg = tf.flir_jpeg(good, picture, chunk=200)
    segments = jpeg.split(b"\xff\xe1")
    missing = b"\xff\xe1".join(segments[:2] + segments[3:])  # segment 1 of the FLIR data removed
    return [
        ("truncated.fff", good[: len(good) - 50], r"truncated.fff: FFF record 1 \(type 0x20.* lies outside the file's"),
        ("header.fff", good[:40], "FFF header .* lies outside"),
        ("outside.fff", bytes(outside), "record 0 .*bytes 1000000000"),
        ("directory.fff", bytes(directory), "record directory .* lies outside"),
        ("many.fff", bytes(many), "claims 2147483648 records"),
        ("raw8.fff", raw8, "8-bit samples, not 16-bit"),
        ("png8.fff", png8, "PNG raster is 8-bit gray, not 16-bit"),
        ("huge.fff", huge, "60000 x 60000 pixels"),
        ("version.fff", b"FFF\0" + bytes(60), "unknown version"),
        ("aff.seq", b"AFF\0" + bytes(60), "AFF sequence"),
        ("noraw.fff", tf.fff([(0x20, tf.camera_info(tf.CALIBRATION, 10, 8))]), "no raw thermal data record"),
        ("lsbad.csq", tf.fff([(0x01, struct.pack("<HHH", 2, 10, 8).ljust(32, b"\0") + b"\xff\xd8\xff\xf7\0\x0b"
                                      + bytes(30))]), "JPEG-LS raster is 0 x 0"),
        ("missing.jpg", missing, r"missing.jpg: has 6 of its 7 FLIR segments \(missing number 1\)"),
        ("tail.seq", good + good[:100], "lies outside"),
        ("cut.seq", good + good[:40], "cut.seq: the FFF header .* lies outside"),
    ]


def _png8(counts: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((counts % 256).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_damaged_files_raise_one_error_naming_the_file(tmp_path):
    for name, data, message in _damaged(tmp_path):
        path = _write(tmp_path, name, data)
        with pytest.raises(ThermalFileError, match=message):
            list(iter_thermal(path))
        with pytest.raises(ThermalFileError, match=name):
            describe_thermal(path)


def test_truncated_and_corrupted_files_never_crash(tmp_path, caplog):
    """Every prefix of a two-frame SEQ and of an R-JPEG, and random byte changes: frames or one unip error."""
    counts = tf.scene(6, 8)
    rng = np.random.default_rng(0)
    samples = []
    for raster in RASTERS:
        frame = tf.frame(counts, raster=raster, header_order=">", preview=tf.jpeg(np.zeros((6, 8, 3), np.uint8)))
        sequence = frame + frame
        jpeg = tf.flir_jpeg(frame, np.zeros((8, 8, 3), np.uint8), chunk=150)
        samples += [("t.seq", sequence[:n]) for n in rng.choice(len(sequence), 40, replace=False)]
        samples += [("t.jpg", jpeg[:n]) for n in rng.choice(len(jpeg), 20, replace=False)]
        for data, name in ((sequence, "c.seq"), (jpeg, "c.jpg")):
            for _ in range(30):
                damaged = bytearray(data)
                for position in rng.integers(0, len(data), 4):
                    damaged[position] = int(rng.integers(0, 256))
                samples.append((name, bytes(damaged)))
    outcomes = set()
    with caplog.at_level(logging.ERROR):
        for name, data in samples:
            path = _write(tmp_path, name, data)
            try:
                for frame in iter_thermal(path):
                    assert frame.counts.dtype == np.uint16 and frame.counts.ndim == 2
                    assert frame.preview is None or frame.preview.ndim == 3
                outcomes.add("read")
            except UnipError as err:
                outcomes.add(type(err).__name__)
    assert {"read", "ThermalFileError"} <= outcomes


@needs_imagecodecs
def test_csq_without_imagecodecs_names_the_extra(tmp_path, monkeypatch):
    path = _write(tmp_path, "clip.csq", tf.frame(tf.scene(6, 8), raster="jpegls"))
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"clip.csq: reading its JPEG-LS raster .*imagecodecs.*unip\[thermal\]"):
        read_thermal(path)


# ============================================================================================ unip info
def test_unip_info_prints_a_thermal_summary(tmp_path, capsys):
    path = _write(tmp_path, "clip.seq", tf.frame(tf.scene(12, 16, seed=1)) + tf.frame(tf.scene(12, 16, seed=2)))
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    frame = read_thermal(path)
    for line in ("format:      SEQ", "camera:      TestCam 640", "raster:      16 x 12 (width x height), raw 16-bit",
                 "frames:      2", f"counts:      {frame.counts.min()} .. {frame.counts.max()}",
                 f"temperature: {np.nanmin(frame.celsius):.2f} .. {np.nanmax(frame.celsius):.2f} °C",
                 "emissivity 0.9, object distance 12 m, relative humidity 60%", "Planck R1 17096.453, R2 0.048084795"):
        assert line in out, line


@needs_real
def test_unip_info_on_a_real_flir_jpeg(capsys):
    assert main(["info", str(REAL_DIR / "flir_example.jpg")]) == 0
    out = capsys.readouterr().out
    assert "raster:      240 x 320 (width x height), PNG, byte-swapped 16-bit" in out
    assert "temperature: 25.95 .. 62.32 °C" in out and "counts:      12501 .. 20042" in out


# ============================================================================================ DJI R-JPEGs
def _palette(counts: np.ndarray) -> np.ndarray:
    import matplotlib

    unit = (counts - counts.min()) / max(1, np.ptp(counts))
    return (matplotlib.colormaps["inferno"](unit)[..., :3] * 255).astype(np.uint8)


def test_a_dji_rjpeg_reads_its_app3_counts(tmp_path):
    """A DJI R-JPEG (ExifTool's DJI ThermalData): the counts of its APP3 segments, not its palette picture; no
    temperatures (DJI's calibration needs DJI's SDK) unless a linear scale is stated."""
    counts = tf.scene(512, 640, seed=5, low=16600, high=18300)
    path = _write(tmp_path, "DJI_0001_T.JPG", tf.dji_jpeg(counts, _palette(counts)))
    frame = read_thermal(path)
    assert np.array_equal(frame.counts, counts) and frame.celsius is None and frame.issues == ()
    assert (frame.format, frame.camera, frame.encoding) == ("DJI JPEG", "ZH20T", "raw 16-bit little-endian (APP3)")
    assert frame.preview.shape == (512, 640, 3)
    assert np.array_equal(to_uint8(frame), stretch_to_uint8(counts))  # the counts' stretch, not the palette's luma
    linear = read_thermal(path, tlinear=1 / 64)
    np.testing.assert_allclose(linear.celsius, counts / 64 - 273.15, atol=1e-3)
    assert "DJI's calibration needs DJI's own SDK" in describe_thermal(path)


def test_dji_jpegs_that_are_not_one_sample_per_pixel_are_read_as_pictures(tmp_path):
    counts = tf.scene(48, 64, seed=6)
    short = _write(tmp_path, "short.jpg", tf.dji_jpeg(counts[:-1], _palette(counts)))  # a row missing
    other = _write(tmp_path, "other.jpg", tf.dji_jpeg(counts, _palette(counts), make="Acme"))
    for path in (short, other):
        frame = read_thermal(path)
        assert frame.format == "8-bit image" and frame.issues == ("palette",), path


@needs_exiftool
def test_the_dji_writer_agrees_with_exiftool(tmp_path):
    counts = tf.scene(120, 160, seed=7)
    path = _write(tmp_path, "d.jpg", tf.dji_jpeg(counts, _palette(counts), chunk=9000))
    assert _exiftool_tags(path)["Make"] == "DJI"
    data = subprocess.run(["exiftool", "-b", "-ThermalData", path], capture_output=True, check=True).stdout
    assert data == counts.astype("<u2").tobytes()
    assert np.array_equal(read_thermal(path).counts, counts)
