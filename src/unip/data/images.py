"""Safe image reading: decode fully, map 16-bit thermal frames to 8 bits, convert to grayscale.

Every failure raises :class:`ImageReadError` (a :class:`unip.errors.DataError`) naming the file and carrying
a short machine-readable ``reason`` so that scanners can skip the file and list it in a report.

16-bit rule (robust percentile stretch): raw radiometric frames (PNG/TIFF with 16-bit or 32-bit pixels)
are mapped to 0..255 linearly between their own 1st and 99th percentiles, clipping outside. This is what
the thermal camera's AGC does for display and it is insensitive to a few dead or saturated pixels. A
frame whose 1st and 99th percentiles coincide is stretched between its minimum and maximum instead, and a
constant frame becomes all zeros.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from typing import AbstractSet, Callable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from unip.data.layouts import IMAGE_SUFFIXES
from unip.errors import DataError
from unip.text import printable

log = logging.getLogger(__name__)

#: Decoders we accept (PIL format names); anything else is skipped as unsupported.
ACCEPTED_FORMATS: Tuple[str, ...] = ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP")

#: Percentiles of the 16-bit stretch.
STRETCH_PERCENTILES: Tuple[float, float] = (1.0, 99.0)

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageReadError(DataError):
    """An image file cannot be used; ``reason`` is one short code (``empty``, ``truncated``, ...)."""

    def __init__(self, path: str, reason: Optional[str] = None, detail: Optional[str] = None,
                 fix: str = "fix or remove the file") -> None:
        # one argument: the finished message (how torch re-raises an error from a DataLoader worker)
        super().__init__(path if reason is None else f"{path}: {detail} ({reason}); {fix}")
        self.path = path
        self.reason = reason or "unreadable"
        self.detail = detail or path


def check_suffix(path: str) -> None:
    """Raise :class:`ImageReadError` (``unsupported-type``) unless ``path`` has an image suffix."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(path, "unsupported-type",
                             f"file type '{suffix or '(none)'}' is not one of {', '.join(IMAGE_SUFFIXES)}")


def decode(data: bytes, path: str) -> Image.Image:
    """Decode every pixel of the encoded image ``data`` (read from ``path``).

    Returns a loaded PIL image in its native mode; raises :class:`ImageReadError` if the bytes are empty,
    not an image, of an unsupported format, truncated or otherwise undecodable.
    """
    if not data:
        raise ImageReadError(path, "empty", "zero-byte file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageReadError(path, "not-an-image", "content is not a recognised image format") from None
    except Image.DecompressionBombError as err:  # raised by open() beyond twice the pixel limit
        raise ImageReadError(path, "too-large", str(err)) from None
    except Exception as err:  # PIL raises many types on malformed headers
        raise ImageReadError(path, "decode-error", f"cannot read the header: {err}") from None
    if img.format not in ACCEPTED_FORMATS:
        raise ImageReadError(path, "unsupported-format", f"format {img.format} is not supported")
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, "too-large", str(err)) from None
    except Exception as err:
        reason = "truncated" if "truncat" in str(err).lower() else "decode-error"
        raise ImageReadError(path, reason, f"cannot decode: {err}") from None
    return img


def read_bytes(path: str) -> bytes:
    """Return the raw bytes of ``path``; raises :class:`ImageReadError` (``io-error``) on OS errors and
    (``not-a-file``) for what is not a regular file: a FIFO, device or socket is never opened (reading a FIFO
    would wait for a writer)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageReadError(path, "not-a-file", "not a regular file (a FIFO, device or socket); not read")
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as err:
        raise ImageReadError(path, "io-error", f"cannot read: {err.strerror or err}") from None


def stretch_to_uint8(pixels: np.ndarray,
                     percentiles: Tuple[float, float] = STRETCH_PERCENTILES) -> np.ndarray:
    """Map a high-bit-depth frame to uint8 by the percentile stretch described in the module docstring.

    Returns an array of the same shape, dtype uint8. The percentiles are taken over the finite values
    (a float frame's NaN pixels, e.g. dead pixels, become 0, ±inf 255 / 0); raises :class:`DataError` when no
    value is finite.
    """
    values = pixels.astype(np.float64, copy=False)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise DataError("no finite pixel value (every pixel NaN or infinite)")
    lo, hi = np.percentile(finite, percentiles)
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.nan_to_num((values - lo) * (255.0 / (hi - lo)), nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_gray(img: Image.Image) -> np.ndarray:
    """Return the grayscale pixels of a decoded image as a uint8 array ``[H, W]``.

    8-bit colour images use PIL's ITU-R 601 luma (as ``convert("L")`` in the release); 16/32-bit and
    float frames use :func:`stretch_to_uint8`.
    """
    if img.mode == "L":
        return np.array(img, dtype=np.uint8)
    if img.mode in _HIGH_DEPTH_MODES:
        return stretch_to_uint8(np.asarray(img))
    return np.array(img.convert("L"), dtype=np.uint8)


def read_gray(path: str) -> np.ndarray:
    """Read, fully decode and convert ``path`` to grayscale; returns uint8 ``[H, W]``."""
    check_suffix(path)
    return _pixels(to_gray, path)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Return a decoded image as uint8 ``[H, W, 3]``.

    Grayscale frames are repeated to three channels (16/32-bit and float ones stretched first, as in
    :func:`to_gray`); colour images keep their colours (alpha dropped, palettes expanded).
    """
    if img.mode in ("L",) + _HIGH_DEPTH_MODES:
        return np.repeat(to_gray(img)[:, :, None], 3, axis=2)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def read_rgb(path: str) -> np.ndarray:
    """Read and fully decode ``path``; returns uint8 ``[H, W, 3]`` (see :func:`to_rgb`)."""
    check_suffix(path)
    return _pixels(to_rgb, path)


def _pixels(convert: Callable[[Image.Image], np.ndarray], path: str) -> np.ndarray:
    """``convert`` of the decoded ``path``; a frame without a finite value is an ``ImageReadError`` naming it."""
    return convert_checked(convert, decode(read_bytes(path), path), path)


def convert_checked(convert: Callable[[Image.Image], np.ndarray], image: Image.Image, path: str) -> np.ndarray:
    """``convert(image)``; a frame without a finite value is an ``ImageReadError`` (``no-finite-pixels``)."""
    try:
        return convert(image)
    except ImageReadError:
        raise
    except DataError as err:
        raise ImageReadError(path, "no-finite-pixels", str(err)) from None


def to_label(img: Image.Image, path: str, max_id: int = 255) -> np.ndarray:
    """Return the class ids of a decoded label image: uint8 ``[H, W]`` (uint16 when ``max_id`` > 255).

    Accepted: 8-bit gray (``L``) or palette (``P``, the ids are the palette indices) images, 16/32-bit
    ones whose values are integers in 0..``max_id``, and RGB(A) images whose three colour channels are equal.
    A colour mask raises :class:`ImageReadError` (``not-ids``): labels must hold class ids, not colours.
    Training labels keep the default ``max_id`` 255; ``unip predict``'s label maps of more than 256 classes
    (16-bit PNGs) read back with ``max_id=65535``.
    """
    if not 0 < max_id <= 65535:
        raise ValueError(f"max_id {max_id}: label ids are read as uint8 (up to 255) or uint16 (up to 65535)")
    dtype = np.uint8 if max_id <= 255 else np.uint16
    if img.mode in ("L", "P", "1"):
        return _at_most(np.array(img, dtype=dtype), max_id, path)
    if img.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(img)
        if values.min() < 0 or values.max() > max_id or not np.array_equal(values, np.round(values)):
            fix = ("save class ids as an 8-bit PNG (label maps of more than 256 classes: "
                   "read_label(path, max_id=65535))") if max_id == 255 else f"ids must be integers up to {max_id}"
            raise ImageReadError(path, "not-ids", f"label values {values.min()}..{values.max()} are not "
                                 f"ids in 0..{max_id}; {fix}")
        return values.astype(dtype)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img)[:, :, :3]
        if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 1], rgb[:, :, 2]):
            return _at_most(np.ascontiguousarray(rgb[:, :, 0], dtype=dtype), max_id, path)
    raise ImageReadError(path, "not-ids", f"a {img.mode} label image holds colours, not class ids; save "
                         "one id per pixel as an 8-bit gray or palette PNG")


def _at_most(ids: np.ndarray, max_id: int, path: str) -> np.ndarray:
    """``ids`` when none is above ``max_id`` (8-bit images hold up to 255 by themselves), else ``ImageReadError``."""
    if max_id < 255 and ids.size and int(ids.max()) > max_id:
        raise ImageReadError(path, "not-ids", f"label values up to {int(ids.max())} are not ids in 0..{max_id}")
    return ids


def read_label(path: str, max_id: int = 255) -> np.ndarray:
    """Read and fully decode the label image ``path``; returns its class ids, uint8 ``[H, W]`` (uint16 when
    ``max_id`` > 255: ``max_id=65535`` reads any label map ``unip predict`` writes, 8- or 16-bit).
    Ids above ``max_id`` raise :class:`ImageReadError` (``not-ids``)."""
    check_suffix(path)
    return to_label(decode(read_bytes(path), path), path, max_id)


def resized_shape(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """Return ``(height, width)`` scaled so the short side is at most ``short_side`` (aspect kept)."""
    short = min(height, width)
    if short <= short_side:
        return height, width
    scale = short_side / short
    if height <= width:
        return short_side, max(short_side, round(width * scale))
    return max(short_side, round(height * scale)), short_side


def resize_short_side(gray: np.ndarray, short_side: int) -> np.ndarray:
    """Downscale a uint8 ``[H, W]`` image (PIL bicubic, antialiased) so its short side is ``short_side``.

    Images whose short side is already at most ``short_side`` are returned unchanged (never upscaled).
    Returns uint8 ``[H', W']``.
    """
    height, width = gray.shape
    new_h, new_w = resized_shape(height, width, short_side)
    if (new_h, new_w) == (height, width):
        return gray
    resized = Image.fromarray(gray).resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.array(resized, dtype=np.uint8)


def walk_once(folder: str, skip: AbstractSet[str] = frozenset()) -> Iterator[Tuple[str, List[str], List[str]]]:
    """``os.walk(folder)`` that follows linked subfolders and walks each real folder once (one reached again
    through a link, or a link loop, is not entered), with subfolders and files sorted; files are the regular
    files only (``regular_files``). Subfolders whose real path is in ``skip`` are not entered; the caller may add
    to ``skip`` while walking, or prune the yielded subfolders."""
    walked: Set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:
            dirs.clear()
            continue
        walked.add(real)
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) not in skip)
        yield root, dirs, regular_files(root, sorted(files))


def regular_files(folder: str, names: Sequence[str]) -> List[str]:
    """The ``names`` in ``folder`` that are regular files (or links to one), checked with ``os.stat`` without
    opening anything: FIFOs, devices, sockets and broken links are left out (logged)."""
    kept = [name for name in names if os.path.isfile(os.path.join(folder, name))]
    if len(kept) < len(names):
        regular = set(kept)
        left = [name for name in names if name not in regular]
        log.info("%s: left out %d entr%s that %s not regular files (FIFOs, devices, sockets, broken links): %s",
                 printable(folder), len(left), "y" if len(left) == 1 else "ies", "is" if len(left) == 1 else "are",
                 ", ".join(printable(name) for name in left[:3]) + (", ..." if len(left) > 3 else ""))
    return kept
