"""The one input mapping of every verb (``unip.data.inputs``), the checks behind its warnings (byte-swapped 16-bit
rasters, palette pictures: ``unip.data.thermal.checks``) and temperatures per class (``class_temperatures``).

Real files: the FLIR JPEGs in ``shared/data/thermal/`` beside the repository (skipped where absent)."""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

import thermal_files as tf
from unip.data.images import ImageReadError, stretch_to_uint8
from unip.data.inputs import (InputMapping, InputNotes, NoTemperaturesError, iter_inputs, parse_thermal_range,
                              read_input, read_model_gray)
from unip.data.thermal import ThermalFileError, class_temperatures, describe_thermal, read_thermal
from unip.data.thermal.checks import looks_byte_swapped, looks_like_palette
from unip.errors import ConfigError

REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thermal"
needs_real = pytest.mark.skipif(not (REAL_DIR / "README.md").is_file(),
                                reason="the real FLIR files (shared/data/thermal/ beside the repository) are not here")


def _png16(path: Path, values: np.ndarray) -> str:
    Image.fromarray(values.astype(np.uint16)).save(path)
    return str(path)


def _jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> str:
    Image.fromarray(rgb).save(path, quality=quality)
    return str(path)


def _palette_picture(counts: np.ndarray, name: str = "inferno") -> np.ndarray:
    unit = (counts - counts.min()) / max(float(np.ptp(counts)), 1.0)
    return (matplotlib.colormaps[name](unit)[..., :3] * 255).astype(np.uint8)


# ============================================================================================ the rule
def test_each_kind_of_input_maps_by_the_rule(tmp_path):
    """FLIR rasters and 16-bit images: the percentile stretch of their counts at the raster's size; 8-bit gray: as
    it is; colour: ITU-R 601 luma (PIL's L); float: the stretch over its values."""
    counts = tf.scene(24, 32, seed=1)
    flir = tmp_path / "flir.jpg"
    flir.write_bytes(tf.flir_jpeg(tf.frame(counts, raster="png", header_order=">"), np.zeros((48, 64, 3), np.uint8)))
    seq = tmp_path / "clip.seq"
    scenes = [tf.scene(24, 32, seed=s) for s in range(3)]
    seq.write_bytes(b"".join(tf.frame(s) for s in scenes))
    gray = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    colour = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(colour).save(tmp_path / "colour.png")
    floats = np.linspace(-5.0, 40.0, 600, dtype=np.float32).reshape(20, 30)
    Image.fromarray(floats).save(tmp_path / "float.tif")

    read = read_input(str(flir))
    assert read.image.shape == (24, 32) and read.index is None  # the raster's size, not the 48x64 picture's
    assert np.array_equal(read.image, stretch_to_uint8(counts)) and read.celsius is not None
    assert np.array_equal(read_input(_png16(tmp_path / "raw.png", counts)).image, stretch_to_uint8(counts))
    frames = list(iter_inputs(str(seq)))
    assert [f.index for f in frames] == [0, 1, 2]
    assert all(np.array_equal(f.image, stretch_to_uint8(s)) for f, s in zip(frames, scenes))
    third = read_input(str(seq), frame=2)
    assert np.array_equal(third.image, frames[2].image) and third.index == 2
    assert np.array_equal(read_input(str(tmp_path / "gray.png")).image, gray)
    luma = np.asarray(Image.fromarray(colour).convert("L"))
    assert np.array_equal(read_input(str(tmp_path / "colour.png")).image, luma)
    assert np.array_equal(read_input(str(tmp_path / "colour.png")).rgb, np.repeat(luma[..., None], 3, axis=2))
    floated = read_input(str(tmp_path / "float.tif"))
    assert floated.frame is None and np.array_equal(floated.image, stretch_to_uint8(floats))
    assert np.array_equal(read_model_gray(str(seq), 1), frames[1].image)


def test_a_fixed_window_maps_every_frame_the_same_and_needs_temperatures(tmp_path):
    scenes = [tf.scene(16, 20, seed=s, low=4000 + 1500 * s, high=9000) for s in range(2)]
    seq = tmp_path / "clip.seq"
    seq.write_bytes(b"".join(tf.frame(s) for s in scenes))
    window = InputMapping(thermal_range=(0.0, 80.0))
    for item, counts in zip(iter_inputs(str(seq), window), scenes):
        celsius = tf.raw2temp(counts, tf.as_stored(tf.CALIBRATION))
        expected = np.clip(np.rint(np.nan_to_num((celsius - 0.0) * 255 / 80.0)), 0, 255)
        assert np.abs(item.image.astype(int) - expected).max() <= 1  # float32 against float64 at the .5 edges
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "gray.png")
    _png16(tmp_path / "raw.png", scenes[0])
    for name in ("gray.png", "raw.png"):
        with pytest.raises(NoTemperaturesError, match=rf"{name}: holds no temperatures .*--thermal-range"):
            read_input(str(tmp_path / name), window)
    kelvin = read_input(str(tmp_path / "raw.png"), InputMapping((0.0, 80.0), tlinear=0.01))  # counts = K x 100
    assert np.allclose(kelvin.celsius, scenes[0] * 0.01 - 273.15, atol=1e-3)


def test_a_dji_rjpeg_maps_its_counts_and_needs_tlinear_for_a_window(tmp_path):
    counts = tf.scene(64, 80, seed=8, low=16600, high=18300)
    palette = np.stack([np.interp(counts, (16600, 18300), (0, 255)).astype(np.uint8)] * 3, axis=2)
    palette[..., 2] //= 3  # coloured, so its luma is not the counts' stretch
    path = str(tmp_path / "DJI_0002_T.JPG")
    Path(path).write_bytes(tf.dji_jpeg(counts, palette))
    item = read_input(path)
    assert np.array_equal(item.image, stretch_to_uint8(counts)) and item.celsius is None and item.issues == ()
    with pytest.raises(NoTemperaturesError, match="a DJI R-JPEG: DJI's calibration needs DJI's SDK; --tlinear"):
        read_input(path, InputMapping(thermal_range=(0.0, 40.0)))
    linear = read_input(path, InputMapping(thermal_range=(-10.0, 30.0), tlinear=1 / 64))
    assert np.allclose(linear.celsius, counts / 64 - 273.15, atol=1e-3)


@pytest.mark.parametrize("text, message", [("40:20", "LOW must be below HIGH"), ("20", "LOW:HIGH"),
                                           ("a:b", "LOW:HIGH"), ("nan:5", "LOW:HIGH"), ("-300:0", "absolute zero"),
                                           ("1:2:3", "LOW:HIGH"), ("20:20", "below")])
def test_bad_thermal_ranges_are_refused(text, message):
    with pytest.raises(ConfigError, match=f"--thermal-range .*{message}"):
        parse_thermal_range(text)
    assert parse_thermal_range("-10.5:35") == (-10.5, 35.0)
    with pytest.raises(ConfigError, match="emissivity"):
        InputMapping(emissivity=1.5)


def test_unreadable_inputs_raise_image_read_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    for name, reason in (("notes.txt", "unsupported-type"), ("missing.png", "io-error"), ("junk.jpg", None)):
        with pytest.raises(ImageReadError) as caught:
            read_input(str(tmp_path / name))
        assert reason is None or caught.value.reason == reason


# ============================================================================================ what is not a raster
@needs_real
def test_a_byte_swapped_raster_is_read_swapped_back(tmp_path):
    """What ``exiftool -b -RawThermalImage`` writes for a FLIR PNG raster: FLIR's little-endian samples in PNG's
    big-endian slots. Read back, the counts equal the reference; the frame says what was done."""
    counts = np.load(REAL_DIR / "flir_example.jpg.counts.npy")
    swapped = _png16(tmp_path / "raw_thermal.png", counts.byteswap())
    frame = read_thermal(swapped)
    assert np.array_equal(frame.counts, counts) and frame.issues == ("byte-swapped",)
    assert "swapped back" in frame.encoding
    right = read_thermal(_png16(tmp_path / "right.png", counts))
    assert np.array_equal(right.counts, counts) and right.issues == ()
    zenmuse = np.load(REAL_DIR / "zenmuse_xtr.jpg.counts.npy")
    assert looks_byte_swapped(zenmuse.byteswap()) and not looks_byte_swapped(zenmuse)


@pytest.mark.parametrize("case", ["scene", "lepton", "kelvin x 100", "narrow", "noise", "constant"])
def test_byte_swap_check_on_generated_rasters(case):
    raster = {"scene": tf.scene(120, 160, seed=1), "lepton": tf.scene(120, 160, seed=2, low=7800, high=8600, noise=8),
              "kelvin x 100": tf.scene(120, 160, seed=3, low=29000, high=31500, noise=5),
              "narrow": tf.scene(120, 160, seed=4, low=7000, high=7200, noise=5),  # one high byte: either order
              "noise": np.random.default_rng(5).integers(0, 65536, (120, 160)).astype(np.uint16),
              "constant": np.full((120, 160), 3000, np.uint16)}[case]
    assert not looks_byte_swapped(raster)
    assert looks_byte_swapped(raster.byteswap()) == (case in ("scene", "lepton", "kelvin x 100"))


@needs_real
def test_palette_pictures_are_marked_and_photos_are_not(tmp_path):
    preview = np.asarray(Image.open(REAL_DIR / "flir_example.jpg").convert("RGB"))
    plain = read_input(_jpeg(tmp_path / "preview.jpg", preview))  # the iron preview alone, no FLIR data
    assert plain.issues == ("palette",) and plain.celsius is None
    assert np.array_equal(plain.image, np.asarray(Image.open(tmp_path / "preview.jpg").convert("L")))
    assert read_input(str(REAL_DIR / "flir_example.jpg")).issues == ()  # with its raster: read as the sensor's
    assert read_input(str(REAL_DIR / "zenmuse_xtr.jpg")).issues == ()
    counts = np.load(REAL_DIR / "flir_example.jpg.counts.npy")
    for name in ("inferno", "jet", "rainbow", "turbo", "hot"):
        assert looks_like_palette(np.asarray(Image.open(io.BytesIO(_jpeg_bytes(_palette_picture(counts, name))))))


def _jpeg_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_palette_check_on_generated_pictures():
    counts = tf.scene(96, 128, seed=7)
    assert looks_like_palette(_palette_picture(counts, "inferno"))
    assert not looks_like_palette(np.repeat(stretch_to_uint8(counts)[..., None], 3, axis=2))  # gray
    rng = np.random.default_rng(0)
    field = np.stack([np.kron(rng.random((12, 16)), np.ones((8, 8))) for _ in range(3)], -1)  # colours of a photo
    assert not looks_like_palette((field * 255).astype(np.uint8))
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if photo.is_file():
        assert not looks_like_palette(np.asarray(Image.open(photo).convert("RGB")))


def test_a_flir_jpeg_without_a_raster_is_read_as_its_picture(tmp_path):
    picture = _palette_picture(tf.scene(48, 64, seed=2))
    data = tf.fff([(0x20, tf.camera_info(tf.CALIBRATION, 64, 48))])  # camera info only
    path = tmp_path / "no_raster.jpg"
    path.write_bytes(tf.flir_jpeg(data, picture))
    read = read_input(str(path))
    assert read.issues == ("palette", "no-raster") and read.celsius is None and read.image.shape == (48, 64)
    assert "without a raster" in read.frame.encoding
    summary = describe_thermal(str(path))
    assert "note:" in summary and "no-raster: a FLIR JPEG whose FLIR data holds no raster" in summary


def test_each_issue_is_warned_about_once_per_run(tmp_path, caplog):
    counts = tf.scene(32, 40, seed=3)
    paths = [_png16(tmp_path / f"swapped{i}.png", counts.byteswap()) for i in range(3)]
    paths += [_jpeg(tmp_path / f"palette{i}.jpg", _palette_picture(counts)) for i in range(2)]
    notes = InputNotes()
    with caplog.at_level(logging.WARNING, logger="unip"):
        for path in paths + paths[:1]:
            read = read_input(path)
            notes.note(path, read.issues)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "swapped0.png" in warnings[0] and "palette0.jpg" in warnings[1]
    assert {k: len(v) for k, v in notes.files.items()} == {"byte-swapped": 3, "palette": 2}
    assert notes.summary()[0].startswith("3 file(s) byte-swapped (")


# ============================================================================================ sequences
def test_a_damaged_frame_in_the_middle_of_a_sequence(tmp_path):
    """Frame 1's raster is short, frame 3's directory claims 2**31 records: with ``keep_going`` every other frame
    comes, and each damaged one as its error (``frame`` its number); without, reading stops at the first."""
    scenes = [tf.scene(12, 16, seed=s) for s in range(5)]
    frames = [tf.frame(s) for s in scenes]
    frames[1] = tf.fff([(0x01, struct.pack("<HHH", 2, 16, 12).ljust(32, b"\0") + bytes(100)),
                        (0x20, tf.camera_info(tf.CALIBRATION, 16, 12))])  # 100 bytes where 384 are needed
    frames[3] = bytearray(frames[3])
    struct.pack_into("<I", frames[3], 0x1C, 2 ** 31)
    path = tmp_path / "damaged.seq"
    path.write_bytes(b"".join(bytes(f) for f in frames))
    items = list(iter_inputs(str(path), keep_going=True))
    kinds = [(type(i).__name__, i.frame if isinstance(i, ThermalFileError) else i.index) for i in items]
    assert kinds == [("ModelInput", 0), ("ThermalFileError", 1), ("ModelInput", 2), ("ThermalFileError", 3),
                     ("ModelInput", 4)]
    assert "8-bit samples" not in str(items[1]) and "100 bytes" in str(items[1]) and "2147483648" in str(items[3])
    for item, counts in zip([items[0], items[2], items[4]], [scenes[0], scenes[2], scenes[4]]):
        assert np.array_equal(item.frame.counts, counts)
    assert np.array_equal(read_input(str(path), frame=4).frame.counts, scenes[4])  # straight to it, past the damage
    with pytest.raises(ThermalFileError, match="damaged.seq: raw thermal image holds 100 bytes"):
        list(iter_inputs(str(path)))


# ============================================================================================ temperatures per class
def test_class_temperatures_against_masks():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (30, 40)).astype(np.uint8)
    labels[labels == 2] = 255  # class 2 absent, 255 ignored
    celsius = rng.normal(30, 5, (30, 40)).astype(np.float32)
    celsius[0, :10] = np.nan  # off the camera's curve
    stats = class_temperatures(labels, celsius, 5)
    for class_id in range(5):
        values = celsius[(labels == class_id) & np.isfinite(celsius)].astype(np.float64)
        got = [stats.mean[class_id], stats.median[class_id], stats.min[class_id], stats.max[class_id]]
        if values.size:
            assert np.allclose(got, [values.mean(), np.median(values), values.min(), values.max()], rtol=0, atol=1e-9)
        else:
            assert np.isnan(got).all()
    columns = stats.columns()
    assert columns["celsius_mean"][2] is None and columns["celsius_max"][4] is None
    assert columns["celsius_min"][0] == round(float(np.nanmin(np.where(labels == 0, celsius, np.nan))), 4)
    assert all(v is None for v in class_temperatures(labels, None, 5).columns()["celsius_median"])
    with pytest.raises(ValueError, match="differ in size"):
        class_temperatures(labels, celsius[:, :10], 5)
