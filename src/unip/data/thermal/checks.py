"""Signs that an image is not the sensor's raster: a 16-bit raster stored byte-swapped, a colour-palette picture.

**Byte-swapped 16-bit rasters** (what ``exiftool -b -RawThermalImage`` writes for FLIR's PNG rasters: the samples
keep FLIR's little-endian order in PNG's big-endian slots). A thermal scene is smooth at the scale of its counts:
neighbouring pixels differ by a few counts, so the high byte of every sample changes slowly and the low byte carries
the noise. Swapped, the noisy low byte becomes the high byte and the raster turns rough. :func:`looks_byte_swapped`
compares the roughness (1 − the correlation of horizontally and vertically neighbouring samples) of the raster as
stored with that of the raster with its bytes swapped: a raster that is at least 4 times as rough as its swapped
self, which itself is smooth (correlation at least 0.9), is swapped. Measured: the two real radiometric rasters of
the tests (FLIR One, Zenmuse XT-R) are 160 and 15 times *smoother* stored the right way than swapped, generated
scenes (a Lepton-like 160x120 of 14-bit counts, 640x512 frames, a linear kelvin x 100 raster) 8 to 145 times;
stored swapped, each is that much rougher. A raster whose high byte is constant (a scene
spanning under 256 counts) reads the same either way (both orders equally smooth): it is left as it is, and the
percentile stretch maps both orders to the same 8-bit picture. Noise without structure is never called swapped.

**Palette pictures** (an R-JPEG's preview without its raster, a camera's iron or rainbow video): a thermal palette
is a curve through colour space, one colour per temperature, so every hue of such a picture comes with one
saturation; the camera's brightness changes (MSX edges, the palette's ramps) leave the saturation of HSV alone. In
a photograph, one hue comes in many saturations (a pale and a deep blue sky). :func:`looks_like_palette` bins the
colourful pixels by hue (48 bins) and calls the picture a palette when at least 90 % of them lie within 0.1 of
their hue's median saturation, at least 20 % of the pixels are colourful (chroma above 0.12) and they span at
least 5 hues. Measured: the real FLIR One iron preview (with its MSX edges) 0.96 (99 % colourful); 12 matplotlib
colour maps (inferno, jet, rainbow, turbo, hot, magma, plasma, viridis, ...) on a real raster and on a generated
scene, JPEG-compressed, 0.91-1.00 (the diverging coolwarm, through white, 0.68 on one of them); photographs
0.66-0.75; smooth random colour fields 0.48. Flat-colour
graphics (a logo) can pass; gray pictures (R = G = B, the usual thermal data set) are never palettes.
"""

from __future__ import annotations

import numpy as np

#: Pixels a check looks at, at most (a regular subsample of larger images).
SAMPLE_PIXELS = 1 << 14


def roughness(values: np.ndarray) -> float:
    """1 − the mean correlation of horizontally and vertically neighbouring values of ``values`` [H, W]: 0 for a
    smooth (or constant) image, about 1 for noise."""
    step = max(1, values.size // SAMPLE_PIXELS)  # every step-th row and the row below it: neighbours both ways
    rows, below = values[:-1:step].astype(np.float64), values[1::step].astype(np.float64)
    below = below[:len(rows)]
    correlations = [_correlation(rows[:, :-1], rows[:, 1:]), _correlation(rows, below)]
    return 1.0 - float(np.mean([c for c in correlations if c is not None] or [1.0]))


def looks_byte_swapped(counts: np.ndarray) -> bool:
    """Whether the uint16 raster ``counts`` [H, W] reads as stored with its bytes swapped (module docstring)."""
    if counts.ndim != 2 or min(counts.shape) < 2:
        return False
    as_stored, swapped = roughness(counts), roughness(counts.byteswap())
    return swapped <= 0.1 and as_stored >= 4 * swapped and as_stored > swapped


def looks_like_palette(rgb: np.ndarray) -> bool:
    """Whether the colour picture ``rgb`` (uint8 [H, W, 3]) looks like a thermal palette's (module docstring)."""
    pixels = rgb.reshape(-1, 3)
    pixels = pixels[::max(1, len(pixels) // SAMPLE_PIXELS)].astype(np.float64) / 255.0
    largest, smallest = pixels.max(axis=1), pixels.min(axis=1)
    chroma = largest - smallest
    colourful = chroma > 0.12
    if colourful.sum() < max(16, 0.2 * len(pixels)):
        return False
    pixels, largest, chroma = pixels[colourful], largest[colourful], chroma[colourful]
    saturation = chroma / largest
    hue_bin = np.minimum((_hue(pixels, largest, chroma) * 48).astype(np.int64), 47)
    order = np.argsort(hue_bin, kind="stable")
    hue_bin, saturation = hue_bin[order], saturation[order]
    starts = np.flatnonzero(np.r_[True, hue_bin[1:] != hue_bin[:-1]])
    near = 0
    hues = 0
    for group in np.split(saturation, starts[1:]):
        near += int((np.abs(group - np.median(group)) < 0.1).sum())
        hues += len(group) >= max(2, 1e-3 * len(saturation))
    return hues >= 5 and near >= 0.9 * len(saturation)


def _hue(pixels: np.ndarray, largest: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """HSV hue in [0, 1) of RGB ``pixels`` in [0, 1] whose chroma is positive."""
    red, green, blue = pixels.T
    hue = np.where(largest == red, ((green - blue) / chroma) % 6,
                   np.where(largest == green, (blue - red) / chroma + 2, (red - green) / chroma + 4))
    return hue / 6.0


def _correlation(a: np.ndarray, b: np.ndarray):
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    scale = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / scale if scale > 0 else None
