"""A thermal frame as the sensor recorded it, and its mapping to the 8-bit picture a model reads.

Mapping (:func:`to_uint8`), one rule for every frame:

* default: the per-frame percentile stretch of the counts, linear between their 1st and 99th percentiles
  (``unip.data.images.STRETCH_PERCENTILES``), clipped outside; what a camera's automatic gain does, insensitive to a
  few dead or saturated pixels, and exactly what unip does to any 16-bit image (``stretch_to_uint8``);
* a fixed temperature window ``(low, high)`` in °C: linear from ``low`` (0) to ``high`` (255), clipped outside, the
  same for every frame (no flicker in a video); needs temperatures;
* an 8-bit source (a picture already mapped by its camera) is used as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np

from unip.data.images import STRETCH_PERCENTILES
from unip.errors import ConfigError, DataError

#: What ``ThermalFrame.issues`` may name, and what each means.
ISSUES: Dict[str, str] = {
    "byte-swapped": "a 16-bit raster stored with its bytes swapped (as `exiftool -b -RawThermalImage` writes FLIR's "
                    "PNG rasters): read with its bytes swapped back",
    "palette": "a colour picture that looks like a thermal palette (iron, rainbow, ...), not the sensor's values: "
               "its luma does not follow temperature",
    "no-raster": "a FLIR JPEG whose FLIR data holds no raster: only its picture is read",
}

#: What ``preview_source`` may hold: the picture, a function that decodes it on first use, or None.
PreviewSource = Union[None, np.ndarray, Callable[[], Optional[np.ndarray]]]


@dataclass
class ThermalFrame:
    """One frame of a thermal file.

    ``counts``: uint16 H x W, the raw sensor counts exactly as stored (byte order fixed); for an 8-bit image its
    values. ``celsius``: float32 H x W object temperatures, or None where the file carries no calibration (NaN where
    the camera's curve has no answer). ``calibration``: the values the temperatures were computed with (see
    :mod:`unip.data.thermal.planck`; ``{"tlinear": K}`` for a linear 16-bit image). ``camera``: the model the
    file names. ``path``, ``index`` (frame number, from 0), ``format`` (``FLIR JPEG``, ``FFF``, ``SEQ``, ``CSQ``,
    ``16-bit TIFF``, ``16-bit PNG``, ``8-bit image``), ``encoding`` (how the raster is stored), ``timestamp`` (where
    the file has one), ``bit_depth`` (16, or 8 for 8-bit images). ``preview``: the picture the file shows (an R-JPEG's
    palette or gray image, an FFF's embedded image, an 8-bit colour image's colours) as uint8 H x W x 3, or None;
    decoded on first use. ``issues``: what the reader found the file to be instead of a sensor's raster (names in
    :data:`ISSUES`): ``byte-swapped`` (a 16-bit image stored with its bytes swapped: ``counts`` are swapped back),
    ``palette`` (an 8-bit colour picture that looks like a thermal palette), ``no-raster`` (a FLIR JPEG whose FLIR
    data holds no raster: read as its picture).
    """

    counts: np.ndarray
    celsius: Optional[np.ndarray]
    camera: Optional[str]
    calibration: Dict[str, float]
    path: str = ""
    index: int = 0
    format: str = ""
    encoding: str = ""
    timestamp: Optional[datetime] = None
    bit_depth: int = 16
    preview_source: PreviewSource = field(default=None, repr=False, compare=False)
    issues: Tuple[str, ...] = ()

    @property
    def preview(self) -> Optional[np.ndarray]:
        if callable(self.preview_source):
            self.preview_source = self.preview_source()
        return self.preview_source

    @property
    def height(self) -> int:
        return int(self.counts.shape[0])

    @property
    def width(self) -> int:
        return int(self.counts.shape[1])


def to_uint8(frame: ThermalFrame, range: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """The frame as model input: uint8 H x W, by the module's rule (``range``: a fixed (low, high) window in °C)."""
    if range is not None:
        low, high = _window(range)
        if frame.celsius is None:
            raise DataError(f"{frame.path}: holds no temperatures ({frame.format or 'no calibration'}), so a fixed "
                            f"°C window cannot map it; leave the window out to stretch each frame's counts")
        with np.errstate(invalid="ignore"):
            scaled = (frame.celsius - np.float32(low)) * np.float32(255.0 / (high - low))
        return np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, 255).astype(np.uint8)
    if frame.bit_depth <= 8:
        return frame.counts.astype(np.uint8)
    return stretch_counts(frame.counts)


def _window(window: Tuple[float, float]) -> Tuple[float, float]:
    try:
        low, high = (float(value) for value in window)
    except (TypeError, ValueError):
        raise ConfigError(f"temperature window {window!r}: give two numbers (low, high) in °C") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"temperature window {low:g}:{high:g} °C: low must be below high, both finite")
    return low, high


def stretch_counts(counts: np.ndarray, percentiles: Tuple[float, float] = STRETCH_PERCENTILES) -> np.ndarray:
    """The percentile stretch of uint16 ``counts`` to uint8: the same numbers as
    ``unip.data.images.stretch_to_uint8`` (NumPy's linear percentiles), from a histogram and a lookup table."""
    if counts.size == 0:
        return np.zeros(counts.shape, dtype=np.uint8)
    flat = counts.ravel()
    histogram = np.bincount(flat, minlength=1)
    cumulative = np.cumsum(histogram)
    smallest, largest = int(np.argmax(histogram > 0)), len(histogram) - 1
    low, high = (_percentile(cumulative, flat.size, p) for p in percentiles)
    if high <= low:
        low, high = float(smallest), float(largest)
    if high <= low:
        return np.zeros(counts.shape, dtype=np.uint8)
    values = np.arange(smallest, largest + 1, dtype=np.float64)
    table = np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    return table[counts - np.uint16(smallest)] if smallest else table[counts]


def _percentile(cumulative: np.ndarray, size: int, percent: float) -> float:
    """NumPy's ``percentile(values, percent)`` (linear method) from the cumulative histogram of the values."""
    position = np.true_divide(percent, 100) * (size - 1)
    below = math.floor(position)
    gamma = position - below
    a = float(np.searchsorted(cumulative, below, side="right"))
    b = float(np.searchsorted(cumulative, min(below + 1, size - 1), side="right"))
    return b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma
