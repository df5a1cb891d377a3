"""The pictures the page shows under a mask: an input with temperatures as a colour map with its °C scale, any other
input as the 8-bit image ``unip predict`` fed the model."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, Optional

import numpy as np

from unip.data.inputs import InputMapping, read_input
from unip.outputs import save_png

#: Colour map of temperatures (matplotlib's), and the °C range it spans: these percentiles of the frame's values.
COLORMAP = "inferno"
RANGE_PERCENTILES = (1.0, 99.0)
#: Colours the page draws the °C scale with (evenly spaced over the range).
SCALE_STOPS = 16


@dataclass
class View:
    """A picture (RGB uint8 ``[H, W, 3]``) and, for temperatures, its scale: ``{"low", "high"}`` (°C at the ends of
    the colour map), ``"min"``, ``"max"`` (the frame's extremes), ``"colors"`` (``SCALE_STOPS`` hex colours)."""

    pixels: np.ndarray
    scale: Optional[Dict[str, Any]] = None

    def save(self, path: str) -> str:
        return save_png(self.pixels, path, compress_level=1)  # shown once: fast to write beats small


def input_view(path: str, mapping: Optional[InputMapping] = None) -> View:
    """The view of the image file ``path`` as ``unip predict`` reads it through ``mapping`` (``unip.data.inputs``):
    its temperatures coloured when it has any, else the model's 8-bit image (a colour picture's luma). Raises
    ``ImageReadError`` when the file cannot be read."""
    item = read_input(path, mapping)
    if item.celsius is None or not np.isfinite(item.celsius).any():
        return View(item.rgb)
    return temperature_view(item.celsius)


def temperature_view(celsius: np.ndarray) -> View:
    """``celsius`` (float ``[H, W]``, NaN where unknown: black) through :data:`COLORMAP` between the percentiles
    :data:`RANGE_PERCENTILES` of its values, with the scale."""
    finite = celsius[np.isfinite(celsius)]
    low, high = (float(v) for v in np.percentile(finite, RANGE_PERCENTILES))
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + 1.0
    table = colormap()
    with np.errstate(invalid="ignore"):
        index = np.clip(np.rint((celsius - low) * (255.0 / (high - low))), 0, 255)
    pixels = table[np.nan_to_num(index, nan=0.0).astype(np.int64)]
    pixels[~np.isfinite(celsius)] = 0
    stops = table[np.linspace(0, 255, SCALE_STOPS).round().astype(int)]
    scale = {"low": round(low, 2), "high": round(high, 2), "min": round(float(finite.min()), 2),
             "max": round(float(finite.max()), 2), "unit": "°C", "colormap": COLORMAP,
             "colors": ["#%02x%02x%02x" % tuple(int(v) for v in colour) for colour in stops]}
    return View(pixels, scale)


@lru_cache(maxsize=1)
def colormap() -> np.ndarray:
    """:data:`COLORMAP` as a lookup table, uint8 ``[256, 3]``."""
    from matplotlib import colormaps

    return (colormaps[COLORMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
