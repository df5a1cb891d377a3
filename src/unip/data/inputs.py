"""One input mapping for every verb: how a file (or one frame of it) becomes the 8-bit image a model reads.

``unip predict``, ``analyze``, ``data infmix/stats/pack/check-seg``, the segmentation readers (``finetune``,
``evaluate``) and ``export``'s documented pre-processing all read their inputs through :func:`read_input` (one
frame) or :func:`iter_inputs` (every frame of a sequence), so the same file gives the same 8-bit image
everywhere. The rule (docs/thermal.md, "The mapping to model input"):

===============================================  ==================================================================
input                                            model image (uint8 H x W; models read it repeated to 3 channels)
===============================================  ==================================================================
radiometric raster (FLIR R-JPEG, FFF, SEQ, CSQ;  the per-frame percentile stretch of the counts (1st-99th
16-bit TIFF/PNG; a 16-bit camera frame)          percentile → 0-255); or, with a fixed window ``thermal_range``
                                                 (LOW, HIGH) in °C, LOW → 0 and HIGH → 255 for every frame (needs
                                                 temperatures: :class:`NoTemperaturesError` otherwise)
8-bit gray image                                 as it is
8-bit colour image                               its ITU-R 601 luma (``0.299 R + 0.587 G + 0.114 B``, PIL's ``L``):
                                                 the backbones were pre-trained on gray images, and the thermal data
                                                 sets are gray
float or 32-bit image                            the percentile stretch over its finite values
===============================================  ==================================================================

The image has the raster's size (an R-JPEG's 320 x 240 raster, not its 640 x 480 preview). What the reader found a
file to be instead of a sensor's raster (a palette picture, a byte-swapped 16-bit raster: ``ThermalFrame.issues``)
travels with the image (:attr:`ModelInput.issues`); :class:`InputNotes` warns about each kind once per run.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from unip.data.images import ImageReadError, convert_checked, decode, read_bytes, to_gray
from unip.data.layouts import IMAGE_SUFFIXES, SEQUENCE_SUFFIXES, THERMAL_SUFFIXES
from unip.data.thermal import ThermalFileError, ThermalFrame, iter_thermal, read_thermal, to_uint8
from unip.data.thermal.formats import Overrides
from unip.data.thermal.checks import looks_like_palette
from unip.data.thermal.frame import ISSUES
from unip.data.thermal.planck import linear_calibration
from unip.errors import ConfigError, DataError
from unip.text import printable

log = logging.getLogger(__name__)

#: File suffixes every verb reads as inputs (images, and FLIR files: ``.fff`` one frame, ``.seq`` / ``.csq`` many).
INPUT_SUFFIXES: Tuple[str, ...] = IMAGE_SUFFIXES + THERMAL_SUFFIXES


class NoTemperaturesError(DataError):
    """A fixed °C window was asked for an input that holds no temperatures."""


@dataclass(frozen=True)
class InputMapping:
    """How inputs are mapped (module docstring), checked when made (``ConfigError``).

    ``thermal_range``: ``(low, high)`` °C of a fixed window, or None for the per-frame percentile stretch;
    ``emissivity``, ``distance`` (m), ``reflected`` (°C): replace a FLIR file's values in its temperatures;
    ``tlinear`` (kelvin per count): temperatures of 16-bit images and camera frames (``celsius = counts ×
    tlinear − 273.15``)."""

    thermal_range: Optional[Tuple[float, float]] = None
    emissivity: Optional[float] = None
    distance: Optional[float] = None
    reflected: Optional[float] = None
    tlinear: Optional[float] = None

    def __post_init__(self) -> None:
        if self.thermal_range is not None:
            object.__setattr__(self, "thermal_range", _checked_window(self.thermal_range))
        Overrides(self.emissivity, self.distance, self.reflected, self.tlinear)

    @property
    def overrides(self) -> Dict[str, Optional[float]]:
        """The keyword arguments of ``read_thermal`` / ``iter_thermal``."""
        return {"emissivity": self.emissivity, "distance": self.distance, "reflected": self.reflected,
                "tlinear": self.tlinear}

    def record(self) -> Dict[str, Any]:
        """The mapping as reports record it (``areas.json``'s ``input_mapping``)."""
        rule = "fixed window" if self.thermal_range is not None else "percentile stretch"
        return {"rule": rule, "thermal_range": None if self.thermal_range is None else list(self.thermal_range),
                **self.overrides}

    def describe(self) -> str:
        """One line saying what the mapping does to a radiometric frame."""
        if self.thermal_range is None:
            return "each frame's counts stretched between their 1st and 99th percentiles to 0-255"
        low, high = self.thermal_range
        return f"a fixed window {low:g} °C → 0, {high:g} °C → 255, the same for every frame"


def parse_thermal_range(text: str) -> Tuple[float, float]:
    """``"LOW:HIGH"`` in °C (e.g. ``20:40``, ``-10.5:35``) → ``(low, high)``; ``ConfigError`` naming
    ``--thermal-range`` otherwise."""
    parts = str(text).split(":")
    try:
        low, high = (float(part) for part in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"--thermal-range {text!r}: give LOW:HIGH in °C, e.g. 20:40")
    return _checked_window((low, high), f"--thermal-range {text}")


def _checked_window(window: Tuple[float, float], name: Optional[str] = None) -> Tuple[float, float]:
    try:
        low, high = (float(value) for value in window)
    except (TypeError, ValueError):
        raise ConfigError(f"thermal range {window!r}: give two numbers (low, high) in °C") from None
    name = name or f"thermal range {low:g}:{high:g}"
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{name}: both ends must be finite temperatures in °C")
    if low >= high:
        raise ConfigError(f"{name}: LOW must be below HIGH (°C), e.g. 20:40")
    if low <= -273.15:
        raise ConfigError(f"{name}: LOW must be above absolute zero (-273.15 °C)")
    return low, high


@dataclass
class ModelInput:
    """One frame as a model reads it: ``image`` (uint8 ``[H, W]``, the mapping's), ``path``, ``index`` (the
    frame's number in a sequence; None for a single image), ``frame`` (the :class:`ThermalFrame` it was mapped
    from: counts, temperatures, camera, calibration, preview; None for a float or 32-bit image), ``window`` (the
    fixed °C window it was mapped with, or None for the percentile stretch)."""

    path: str
    image: np.ndarray
    frame: Optional[ThermalFrame] = None
    index: Optional[int] = None
    window: Optional[Tuple[float, float]] = None

    @property
    def celsius(self) -> Optional[np.ndarray]:
        """float32 ``[H, W]`` object temperatures, or None."""
        return None if self.frame is None else self.frame.celsius

    @property
    def issues(self) -> Tuple[str, ...]:
        return () if self.frame is None else self.frame.issues

    @property
    def rgb(self) -> np.ndarray:
        """The image repeated to three channels: uint8 ``[H, W, 3]`` (what segmentors and overlays take)."""
        return gray_to_rgb(self.image)

    def celsius_at(self, levels: Sequence[float]) -> np.ndarray:
        """The temperature (°C) each gray level in ``levels`` (0..255) of ``image`` stands for: float64, NaN
        without temperatures. With a fixed window it is exact; with the percentile stretch, the mean temperature
        of the pixels at each level, interpolated between the levels present (the ends, where the stretch clips,
        take the nearest level inside)."""
        levels = np.asarray(levels, dtype=np.float64)
        celsius = self.celsius
        if celsius is None:
            return np.full(levels.shape, np.nan)
        window = self.window
        if window is not None:
            return window[0] + levels / 255.0 * (window[1] - window[0])
        known = np.isfinite(celsius)
        gray = self.image[known].astype(np.int64)
        count = np.bincount(gray, minlength=256)
        total = np.bincount(gray, weights=celsius[known].astype(np.float64), minlength=256)
        inside = np.flatnonzero(count[1:255]) + 1
        present = inside if inside.size else np.flatnonzero(count)
        if present.size == 0:
            return np.full(levels.shape, np.nan)
        return np.interp(levels, present, total[present] / count[present])


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]`` → ``[H, W, 3]``, the gray repeated."""
    return np.repeat(gray[:, :, None], 3, axis=2)


def map_frame(frame: ThermalFrame, mapping: Optional[InputMapping] = None) -> np.ndarray:
    """The 8-bit model image of ``frame`` (uint8 ``[H, W]``) by ``mapping``'s rule; a fixed window on a frame
    without temperatures raises :class:`NoTemperaturesError` naming the file and what to do."""
    window = mapping.thermal_range if mapping is not None else None
    if window is not None and frame.celsius is None:
        raise NoTemperaturesError(_no_temperatures(frame.path, _why_none(frame)))
    return to_uint8(frame, window)


def check_input_suffix(path: str) -> None:
    """``ImageReadError`` (``unsupported-type``) unless ``path`` has a suffix of :data:`INPUT_SUFFIXES`."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in INPUT_SUFFIXES:
        raise ImageReadError(path, "unsupported-type",
                             f"file type '{suffix or '(none)'}' is not one of {', '.join(INPUT_SUFFIXES)}")


def read_input(path: str, mapping: Optional[InputMapping] = None, frame: int = 0) -> ModelInput:
    """Frame ``frame`` of ``path`` (an image, or a FLIR file of any kind, told by its content) as model input.

    Raises ``ImageReadError`` (``ThermalFileError`` for a damaged FLIR file), with a ``reason``, for a file that
    cannot be read, is not a regular file (a FIFO is never opened) or has a suffix outside
    :data:`INPUT_SUFFIXES`; :class:`NoTemperaturesError` for a fixed window on a file without temperatures."""
    mapping = mapping or InputMapping()
    _check_readable(path)
    try:
        thermal = read_thermal(path, frame, **mapping.overrides)
    except ThermalFileError as err:
        if err.reason != "not-counts":
            raise
        return _float_image(path, mapping)
    return ModelInput(path, map_frame(thermal, mapping), thermal, frame if _is_sequence(path) else None,
                      mapping.thermal_range)


def iter_inputs(path: str, mapping: Optional[InputMapping] = None, keep_going: bool = False
                ) -> Iterator[Union[ModelInput, ThermalFileError]]:
    """Every frame of ``path`` as model input, one at a time (one for anything but a SEQ/CSQ). A damaged frame
    raises when it is reached, after the frames before it; with ``keep_going`` it is yielded as its
    ``ThermalFileError`` (``frame``: its number) and the frames after it follow. A file that cannot be opened at
    all, or a fixed window on a file without temperatures, raises."""
    mapping = mapping or InputMapping()
    _check_readable(path)
    sequence = _is_sequence(path)
    try:
        for item in iter_thermal(path, keep_going=keep_going, **mapping.overrides):
            if isinstance(item, ThermalFileError):
                yield item
            else:
                yield ModelInput(path, map_frame(item, mapping), item, item.index if sequence else None,
                                 mapping.thermal_range)
    except ThermalFileError as err:
        if err.reason != "not-counts":
            raise
        yield _float_image(path, mapping)


def picture_input(picture: np.ndarray, source: str, mapping: Optional[InputMapping] = None,
                  index: Optional[int] = None) -> ModelInput:
    """A decoded picture (a video's or a camera's frame, from ``source``) as model input by the same rule:
    uint16 ``[H, W]`` (a 16-bit camera's counts: stretched, or with ``mapping.tlinear`` also temperatures), uint8
    gray ``[H, W]`` as it is, uint8 RGB ``[H, W, 3]`` its luma (a palette-like picture is marked ``palette``).
    Raises ``DataError`` for other arrays, :class:`NoTemperaturesError` for a fixed window without temperatures."""
    mapping = mapping or InputMapping()
    if picture.ndim == 3 and picture.shape[2] == 1:
        picture = picture[:, :, 0]
    if picture.dtype == np.uint16 and picture.ndim == 2:
        calibration, celsius = linear_calibration(picture, mapping.tlinear)
        frame = ThermalFrame(counts=picture, celsius=celsius, camera=None, calibration=calibration, path=source,
                             index=index or 0, format="16-bit frame", encoding="16-bit", bit_depth=16)
    elif picture.dtype == np.uint8 and picture.ndim == 2:
        frame = ThermalFrame(counts=picture.astype(np.uint16), celsius=None, camera=None, calibration={},
                             path=source, index=index or 0, format="8-bit frame", encoding="8-bit gray", bit_depth=8)
    elif picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3:
        from PIL import Image

        issues = ("palette",) if looks_like_palette(picture) else ()
        frame = ThermalFrame(counts=to_gray(Image.fromarray(picture)).astype(np.uint16), celsius=None, camera=None,
                             calibration={}, path=source, index=index or 0, format="8-bit frame",
                             encoding="8-bit colour", bit_depth=8, preview_source=picture, issues=issues)
    else:
        raise DataError(f"{printable(source)}: a frame of {picture.dtype} {tuple(picture.shape)}, not 8-bit gray or "
                        "colour nor 16-bit gray")
    return ModelInput(source, map_frame(frame, mapping), frame, index, mapping.thermal_range)


def read_model_gray(path: str, frame: Optional[int] = None, mapping: Optional[InputMapping] = None) -> np.ndarray:
    """The model image of ``path`` (frame ``frame`` of a sequence) through ``mapping`` (default: the per-frame
    stretch): uint8 ``[H, W]``. What the pre-training data tools (``unip data``, ``unip pretrain``) and
    ``unip analyze`` read."""
    return read_input(path, mapping, frame or 0).image


def _check_readable(path: str) -> None:
    check_input_suffix(path)
    try:
        status = os.stat(path)
    except OSError as err:
        raise ImageReadError(path, "io-error", f"cannot read: {err.strerror or err}") from None
    if not stat.S_ISREG(status.st_mode):
        raise ImageReadError(path, "not-a-file", "not a regular file (a FIFO, device or socket); not read")
    if status.st_size == 0:
        raise ImageReadError(path, "empty", "zero-byte file")


def _is_sequence(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in SEQUENCE_SUFFIXES


def _float_image(path: str, mapping: InputMapping) -> ModelInput:
    """A float or 32-bit image: the percentile stretch over its finite values (no counts, no temperatures)."""
    if mapping.thermal_range is not None:
        raise NoTemperaturesError(_no_temperatures(path, "a float or 32-bit image: values, not a calibrated raster"))
    gray = convert_checked(to_gray, decode(read_bytes(path), path), path)
    return ModelInput(path, gray)


def _why_none(frame: ThermalFrame) -> str:
    if frame.bit_depth <= 8:
        return "an 8-bit picture"
    if frame.format.startswith("16-bit"):
        return "a 16-bit image without a stated linear scale (--tlinear)"
    if frame.format == "DJI JPEG":
        return "a DJI R-JPEG: DJI's calibration needs DJI's SDK; --tlinear states a linear scale"
    return "its calibration is incomplete or invalid"


def _no_temperatures(path: str, why: str) -> str:
    return (f"{printable(path)}: holds no temperatures ({why}), so a fixed °C window (--thermal-range) cannot map "
            "it; leave --thermal-range out (each frame is stretched), or give radiometric files (FLIR R-JPEG, FFF, "
            "SEQ, CSQ; a 16-bit linear image with --tlinear)")


class InputNotes:
    """What a run found its inputs to be instead of a sensor's raster (``ThermalFrame.issues``): each kind is
    warned about once, naming the first file that has it; ``files`` lists every file of each kind (thread-safe)."""

    def __init__(self) -> None:
        self.files: Dict[str, List[str]] = {}
        self._seen: Dict[str, set] = {}
        self._lock = threading.Lock()

    def note(self, path: str, issues: Tuple[str, ...]) -> None:
        """Record ``issues`` of ``path`` (a file is counted once per issue, however many of its frames have it)."""
        for issue in issues:
            with self._lock:
                seen = self._seen.setdefault(issue, set())
                if path in seen:
                    continue
                seen.add(path)
                self.files.setdefault(issue, []).append(path)
                first = len(seen) == 1
            if first:
                log.warning("%s: %s; other such files are counted, not named (the run's report lists them)",
                            printable(path), ISSUES.get(issue, issue))

    def summary(self, shown: int = 3) -> List[str]:
        """One line per kind: how many files, the first ``shown`` of them, what it means."""
        return issue_lines(self.files, shown)


def issue_lines(files: Dict[str, List[str]], shown: int = 3) -> List[str]:
    """One line per kind of issue in ``files`` (issue → paths): how many files, the first ``shown``, what it
    means."""
    lines = []
    for issue, paths in files.items():
        named = ", ".join(printable(p) for p in paths[:shown]) + (", ..." if len(paths) > shown else "")
        lines.append(f"{len(paths)} file(s) {issue} ({named}): {ISSUES.get(issue, issue)}")
    return lines
