"""Which thermal format a file holds (by its content, not its name), and reading its frames.

* FLIR radiometric JPEG: the FFF data spread over APP1 segments ``FLIR\\0`` (byte 6: the segment's number, byte 7:
  the last number), reassembled in number order; the JPEG's own picture is the preview.
* ``.fff`` (one FFF frame), ``.seq`` and ``.csq`` (FFF frames one after another; .csq rasters are JPEG-LS).
* 16-bit TIFF / PNG: counts = the values (a raster stored byte-swapped is swapped back: ``checks``); temperatures
  only from a linear scale the caller states (``tlinear`` kelvin per count: celsius = counts * tlinear - 273.15, as
  radiometric Boson, Tau 2 or Duo Pro R TIFFs are).
* 8-bit images (JPEG, PNG, BMP, TIFF, WebP): counts = the 8-bit values (colour images: their ITU-R 601 luma),
  no temperatures, the colours as preview; a colour picture that looks like a thermal palette is marked
  (``issues``), and so is a FLIR JPEG whose FLIR data holds no raster (read as its picture).
* Float and 32-bit images are refused (reason ``not-counts``): their values are not sensor counts.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from unip.data.images import decode, to_gray
from unip.data.thermal import fff, planck
from unip.data.thermal.checks import looks_byte_swapped, looks_like_palette
from unip.data.thermal.errors import ThermalFileError
from unip.data.thermal.frame import ThermalFrame
from unip.errors import ConfigError

log = logging.getLogger(__name__)

#: Largest JPEG or image file read whole (R-JPEGs are a few MB: their FFF data is at most 256 segments of 64 kB).
MAX_IMAGE_BYTES = 256 << 20
#: The first bytes of each kind of file read here.
_MAGICS = (("fff", (fff.MAGIC, b"AFF\0")), ("jpeg", (fff.JPEG_MAGIC,)), ("png", (fff.PNG_MAGIC,)),
           ("tiff", (b"II*\0", b"MM\0*")), ("bmp", (b"BM",)), ("webp", (b"RIFF",)))
_SUFFIX_FORMATS = {".seq": "SEQ", ".csq": "CSQ"}
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def sniff(path: str) -> Optional[str]:
    """The kind of file at ``path`` by its first bytes (``fff``, ``jpeg``, ``png``, ``tiff``, ``bmp``, ``webp``), or
    None for anything else, a folder or a file that cannot be opened."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError:
        return None
    for kind, magics in _MAGICS:
        if any(head.startswith(magic) for magic in magics):
            return None if kind == "webp" and head[8:12] != b"WEBP" else kind
    return None


class Overrides:
    """The caller's changes to a file's calibration, checked once: ``emissivity`` (0..1], ``distance`` (m, >= 0),
    ``reflected`` (reflected apparent temperature, °C), and ``tlinear`` (K per count of a linear 16-bit image)."""

    def __init__(self, emissivity: Optional[float] = None, distance: Optional[float] = None,
                 reflected: Optional[float] = None, tlinear: Optional[float] = None) -> None:
        _check("emissivity", emissivity, lambda v: 0 < v <= 1, "a number in (0, 1]")
        _check("distance", distance, lambda v: v >= 0, "a distance in metres, 0 or more")
        _check("reflected", reflected, lambda v: v > -planck.KELVIN, "a temperature in °C above -273.15")
        _check("tlinear", tlinear, lambda v: v > 0, "kelvin per count, above 0 (e.g. 0.04 or 0.01)")
        self.planck = {"emissivity": emissivity, "object_distance": distance, "reflected_temperature": reflected}
        self.tlinear = tlinear


def _check(name: str, value: Optional[float], valid: Callable[[float], bool], what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not valid(value):
        raise ConfigError(f"{name}={value!r}: give {what}")


def read_frames(path: str, overrides: Overrides, first: int = 0, count: Optional[int] = None,
                keep_going: bool = False) -> Iterator[Any]:
    """Frames ``first``, ``first + 1``, ... (``count`` of them, or to the end) of ``path``; ``keep_going``: a
    damaged frame of a SEQ/CSQ is yielded as its ``ThermalFileError`` and the frames after it follow."""
    kind = sniff(path)
    if kind == "fff":
        yield from _fff_file_frames(path, overrides, first, count, keep_going)
        return
    if kind is None:
        if os.path.isdir(path):
            raise ThermalFileError(path, "not-a-file", "is a folder", "give a thermal file")
        if not os.path.exists(path):
            raise ThermalFileError(path, "missing", "no such file", "check the path")
        raise ThermalFileError(path, "not-an-image", "is neither a FLIR file (FFF, SEQ, CSQ, R-JPEG) nor an image")
    data = _read_whole(path)
    if kind == "jpeg":
        flir = _flir_segments(data, path)
        if flir is not None and _holds_raster(fff.Source(path, flir)):
            frames = _fff_frames(fff.Source(path, flir), path, overrides, "FLIR JPEG",
                                 preview=lambda: _picture(data, path), camera=_exif_model(data))
            yield from _slice(frames, path, first, count)
            return
        dji = _dji_frame(data, path, overrides) if flir is None else None
        if dji is not None:
            yield from _slice(iter([dji]), path, first, count)
            return
        if flir is not None:
            frame = _image_frame(data, path, overrides)
            frame.issues += ("no-raster",)
            frame.encoding += " (FLIR data without a raster)"
            yield from _slice(iter([frame]), path, first, count)
            return
    yield from _slice(iter([_image_frame(data, path, overrides)]), path, first, count)


def _holds_raster(source: fff.Source) -> bool:
    """Whether the first FFF frame of an R-JPEG's FLIR data has a RawData record (damage is reported when the
    frames are read)."""
    try:
        return fff.read_frame(source, 0).record(fff.RAW_DATA) is not None
    except ThermalFileError:
        return True


def _slice(frames: Iterator[Any], path: str, first: int, count: Optional[int],
           held: Callable[[], int] = lambda: 1) -> Iterator[Any]:
    """Frames ``first`` on (``count`` of them); none at all is an error saying how many the file ``held``."""
    seen = 0
    for frame in frames:
        if (frame.frame if isinstance(frame, ThermalFileError) else frame.index) >= first:
            yield frame
            seen += 1
            if count is not None and seen >= count:
                return
    if seen == 0:
        frames_held = held()
        raise ThermalFileError(path, "no-frame", f"holds {frames_held} frame{'s' if frames_held != 1 else ''}, "
                               f"so no frame {first} (frames count from 0)", f"ask for 0..{frames_held - 1}")


def _read_whole(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_IMAGE_BYTES:
                raise ThermalFileError(path, "too-large", f"is {size} bytes (images up to {MAX_IMAGE_BYTES} are read)")
            return handle.read()
    except OSError as err:
        raise ThermalFileError(path, "io-error", f"cannot read: {err.strerror or err}") from None


# ------------------------------------------------------------------------------------------ FFF frames
@contextmanager
def _opened(path: str) -> Iterator[Any]:
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise ThermalFileError(path, "io-error", f"cannot read: {err.strerror or err}") from None
    with handle:
        yield handle


def _fff_file_frames(path: str, overrides: Overrides, first: int, count: Optional[int], keep_going: bool = False
                     ) -> Iterator[Any]:
    name = _SUFFIX_FORMATS.get(os.path.splitext(path)[1].lower(), "FFF")
    with _opened(path) as handle:
        source = fff.Source(path, handle)
        start = 0
        if first > 0:  # straight to the frame: reading frame k of a long sequence must not walk k frames each time
            starts = _frame_starts(source, handle)
            if first < len(starts):
                start = starts[first]
        frames = _fff_frames(source, path, overrides, name, first=first, keep_going=keep_going,
                             start=start, index=first if start else 0)
        yield from _slice(frames, path, first, count, held=lambda: count_fff_frames(path, keep_going))


#: Where the frames of recently read sequence files start: (real path, size, mtime) → offsets.
_STARTS: "OrderedDict[Tuple[str, int, int], Tuple[int, ...]]" = OrderedDict()
_STARTS_LOCK = threading.Lock()


def _frame_starts(source: fff.Source, handle: Any) -> Tuple[int, ...]:
    """The offset of every frame of an open sequence file (damaged ones included), cached for the 32 files read
    last."""
    status = os.fstat(handle.fileno())
    key = (os.path.realpath(source.path), status.st_size, status.st_mtime_ns)
    with _STARTS_LOCK:
        if key in _STARTS:
            _STARTS.move_to_end(key)
            return _STARTS[key]
    starts = tuple(start for start, _, _ in _located_frames(source, keep_going=True))
    with _STARTS_LOCK:
        _STARTS[key] = starts
        while len(_STARTS) > 32:
            _STARTS.popitem(last=False)
    return starts


def _fff_frames(source: fff.Source, path: str, overrides: Overrides, name: str, first: int = 0,
                preview: Optional[Callable[[], Optional[np.ndarray]]] = None, camera: Optional[str] = None,
                keep_going: bool = False, start: int = 0, index: int = 0) -> Iterator[Any]:
    """Every frame of ``source`` from byte ``start`` on, that one being frame ``index`` (those before ``first``
    located, not decoded). ``preview`` decodes the picture a
    JPEG shows (None: each frame's embedded image); ``camera`` names the camera where the FFF data names none.
    ``keep_going``: a damaged frame is yielded as its ``ThermalFileError`` (``frame`` set) and reading goes on at
    the next frame that can be found (the next valid FFF header after the damage)."""
    if overrides.tlinear is not None:
        log.warning("%s: tlinear ignored: a FLIR file carries its own calibration", path)
    warned = False
    for _, located, damage in _located_frames(source, keep_going, start):
        if index >= first:
            try:
                if damage is not None:
                    raise damage
                frame, problem = _decode_fff(source, located, path, overrides, name, index, preview)
            except ThermalFileError as err:
                if not keep_going:
                    raise
                err.frame = index
                yield err
            else:
                if problem and not warned:  # once per file, not once per frame of a sequence
                    log.warning("%s: no temperatures (frame %d): %s", path, index, problem)
                    warned = True
                frame.camera = frame.camera or camera
                yield frame
        index += 1


def _located_frames(source: fff.Source, keep_going: bool, first_start: int = 0
                    ) -> Iterator[Tuple[int, Any, Optional[ThermalFileError]]]:
    """``(start, frame, None)`` for each FFF frame of ``source`` from byte ``first_start`` on; with ``keep_going`` a
    frame whose header or directory is damaged comes as ``(start, None, error)`` and the search goes on after it."""
    start: Optional[int] = first_start
    while start is not None:
        try:
            located = fff.read_frame(source, start)
        except ThermalFileError as err:
            if not keep_going:
                raise
            yield start, None, err
            start = fff.next_valid_header(source, start + 1)
            continue
        yield start, located, None
        start = fff.next_frame_start(source, located)


def count_fff_frames(path: str, keep_going: bool = False) -> int:
    """How many FFF frames a .fff / .seq / .csq file holds (headers only are read); ``keep_going``: damaged frames
    count as one each and the count goes on after them."""
    with _opened(path) as handle:
        return sum(1 for _ in _located_frames(fff.Source(path, handle), keep_going))


def _decode_fff(source: fff.Source, located: fff.Frame, path: str, overrides: Overrides, name: str, index: int,
                preview: Optional[Callable[[], Optional[np.ndarray]]]) -> Tuple[ThermalFrame, Optional[str]]:
    """One frame, and why it has no temperatures (None when it has)."""
    raw = located.record(fff.RAW_DATA)
    if raw is None:
        raise ThermalFileError(path, "bad-record", f"FFF frame {index} has no raw thermal data record")
    counts, encoding = fff.read_raster(source, raw)
    info_record = located.record(fff.CAMERA_INFO)
    info = fff.read_camera_info(source, info_record) if info_record else fff.CameraInfo({}, None, None)
    calibration = planck.with_overrides(info.calibration, overrides.planck)
    celsius = None
    problem = planck.problem(calibration)
    if problem is None:
        celsius = planck.counts_to_celsius(counts, calibration)
    if name == "FFF" and encoding == "JPEG-LS":
        name = "CSQ"
    if preview is None:
        embedded = located.record(fff.EMBEDDED_IMAGE)
        encoded = fff.read_embedded_image(source, embedded) if embedded else None
        preview = (lambda: _picture(encoded, path)) if encoded else None
    frame = ThermalFrame(counts=counts, celsius=celsius, camera=info.model, calibration=calibration, path=path,
                         index=index, format=name, encoding=encoding, timestamp=info.timestamp, bit_depth=16,
                         preview_source=preview)
    return frame, problem


# ------------------------------------------------------------------------------------------ R-JPEG
def _flir_segments(data: bytes, path: str) -> Optional[bytes]:
    """The FFF data of an R-JPEG (its ``FLIR`` APP1 segments in number order), or None for a JPEG without them."""
    chunks: Dict[int, bytes] = {}
    total: Optional[int] = None
    for marker, body in _jpeg_segments(data):
        if marker == 0xE1 and body.startswith(b"FLIR\0") and len(body) >= 8:
            number, last = body[6], body[7]
            if total is not None and last + 1 != total:
                raise ThermalFileError(path, "bad-record", f"FLIR segments disagree on their count ({total} and "
                                       f"{last + 1})")
            if number in chunks:
                raise ThermalFileError(path, "bad-record", f"FLIR segment {number} appears twice")
            total = last + 1
            chunks[number] = body[8:]
    if total is None:
        return None
    missing = [number for number in range(total) if number not in chunks]
    if missing:
        listed = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise ThermalFileError(path, "truncated", f"has {total - len(missing)} of its {total} FLIR segments "
                               f"(missing number {listed})")
    if len(chunks) != total:
        raise ThermalFileError(path, "bad-record", f"has FLIR segments numbered beyond their count ({total})")
    return b"".join(chunks[number] for number in range(total))


def _jpeg_segments(data: bytes) -> Iterator[Tuple[int, bytes]]:
    """(marker, body) of each segment before the image data; stops at the scan, at the end or at damage (the
    picture's decoder reports a damaged picture; a damaged FLIR part shows as missing segments)."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xDA, 0xD9):
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            position += 2
            continue
        length, = struct.unpack_from(">H", data, position + 2)
        if length < 2 or position + 2 + length > len(data):
            return
        yield marker, data[position + 4:position + 2 + length]
        position += 2 + length


def _exif_model(data: bytes, tag: int = 0x0110) -> Optional[str]:
    """The Model tag (0x0110; ``tag``: another text tag, 0x010F Make) of a JPEG's EXIF block, or None."""
    exif = next((body for marker, body in _jpeg_segments(data) if marker == 0xE1 and body.startswith(b"Exif\0\0")),
                None)
    return _tiff_model(exif[6:], tag) if exif else None


def _tiff_model(tiff: bytes, wanted: int = 0x0110) -> Optional[str]:
    """The Model tag (0x0110; ``wanted``: another text tag) of a TIFF block's first directory, or None."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        directory, = struct.unpack_from(order + "I", tiff, 4)
        entries, = struct.unpack_from(order + "H", tiff, directory)
        for index in range(min(entries, 512)):
            tag, kind, count, value = struct.unpack_from(order + "HHII", tiff, directory + 2 + index * 12)
            if tag == wanted and kind == 2:
                raw = tiff[directory + 10 + index * 12:][:count] if count <= 4 else tiff[value:value + count]
                return fff._text(raw)
    except (KeyError, struct.error):
        return None
    return None


def _picture(data: bytes, path: str) -> Optional[np.ndarray]:
    """An embedded or JPEG picture as uint8 H x W x 3; None (logged) when it cannot be decoded."""
    try:
        image = decode(data, path)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # the counts are what matter; a broken picture beside them is only reported
        log.warning("%s: its preview picture cannot be decoded (%s)", path, err)
        return None


# ------------------------------------------------------------------------------------------ DJI R-JPEGs
#: The raster of DJI's thermal cameras when the picture's own size does not give it.
DJI_RASTER = (512, 640)


def _dji_frame(data: bytes, path: str, overrides: Overrides) -> Optional[ThermalFrame]:
    """A DJI R-JPEG (Zenmuse H20T / H30T, Mavic 2 Enterprise Advanced, M30T, Mavic 3T): a JPEG whose EXIF Make is
    DJI and whose APP3 segments, in file order, hold the raw counts (ExifTool's DJI ThermalData: 16-bit
    little-endian samples, row by row) — one per pixel of the picture, or of a 640 x 512 raster. DJI's calibration
    needs DJI's own SDK and is not read: temperatures only with ``--tlinear``. None for any other JPEG, or when the
    APP3 data is not one sample per pixel (the file is then read as its picture, and a palette one is named)."""
    if _exif_model(data, 0x010F) != "DJI":
        return None
    raw = b"".join(body for marker, body in _jpeg_segments(data) if marker == 0xE3)
    if not raw:
        return None
    shape = next((size for size in (_jpeg_size(data), DJI_RASTER) if size and 2 * size[0] * size[1] == len(raw)),
                 None)
    if shape is None:
        log.info("%s: DJI APP3 data of %d bytes is not one 16-bit sample per pixel; read as its picture", path,
                 len(raw))
        return None
    counts = np.frombuffer(raw, dtype="<u2").reshape(shape).astype(np.uint16)
    calibration, celsius = planck.linear_calibration(counts, overrides.tlinear)
    _ignored(path, overrides, planck_too=True, tlinear=False)
    return ThermalFrame(counts=counts, celsius=celsius, camera=_exif_model(data), calibration=calibration, path=path,
                        format="DJI JPEG", encoding="raw 16-bit little-endian (APP3)", bit_depth=16,
                        preview_source=lambda: _picture(data, path))


def _jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(height, width) from a JPEG's frame header, or None."""
    for marker, body in _jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(body) >= 5:
            height, width = struct.unpack_from(">HH", body, 1)
            return height, width
    return None


# ------------------------------------------------------------------------------------------ plain images
def _image_frame(data: bytes, path: str, overrides: Overrides) -> ThermalFrame:
    image = _decode_checked(data, path)
    kind = image.format or "image"
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image)
        if values.dtype != np.uint16 and (values.min() < 0 or values.max() > 65535):
            raise ThermalFileError(path, "not-counts", f"holds 32-bit values {values.min()}..{values.max()}, not "
                                   "16-bit counts")
        counts = values.astype(np.uint16)
        issues: Tuple[str, ...] = ()
        encoding = f"{kind}, 16-bit"
        if looks_byte_swapped(counts):
            counts, issues = counts.byteswap(), ("byte-swapped",)
            encoding += ", byte-swapped (swapped back)"
        calibration, celsius = planck.linear_calibration(counts, overrides.tlinear)
        _ignored(path, overrides, planck_too=True, tlinear=False)
        return ThermalFrame(counts=counts, celsius=celsius, camera=None, calibration=calibration, path=path,
                            format=f"16-bit {kind}", encoding=encoding, bit_depth=16, issues=issues)
    if image.mode == "F":
        raise ThermalFileError(path, "not-counts", "holds floating-point values, not sensor counts")
    _ignored(path, overrides, planck_too=True, tlinear=True)
    gray = to_gray(image)
    colour = image.mode not in ("L", "1", "LA") and not (image.mode == "P" and _gray_palette(image))
    preview = np.asarray(image.convert("RGB"), dtype=np.uint8) if colour else None
    issues = ("palette",) if preview is not None and looks_like_palette(preview) else ()
    return ThermalFrame(counts=gray.astype(np.uint16), celsius=None, camera=None, calibration={}, path=path,
                        format="8-bit image", encoding=f"{kind}, 8-bit {'colour' if colour else 'gray'}",
                        bit_depth=8, preview_source=preview, issues=issues)


def _decode_checked(data: bytes, path: str) -> Any:
    """The decoded image; its size is checked against the raster limits before any pixel is decoded."""
    import io
    import warnings

    from PIL import Image

    limits = f"at most {fff.MAX_SIDE} a side and {fff.MAX_PIXELS} in all are read"
    try:
        with warnings.catch_warnings():  # PIL's own limit warns above 89 M pixels; ours is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as peek:
                width, height = peek.size
    except Image.DecompressionBombError:
        raise ThermalFileError(path, "too-large", f"declares over {2 * Image.MAX_IMAGE_PIXELS} pixels ({limits})"
                               ) from None
    except Exception:
        width = height = 1  # decode() reports what is wrong with it
    if width > fff.MAX_SIDE or height > fff.MAX_SIDE or width * height > fff.MAX_PIXELS:
        raise ThermalFileError(path, "too-large", f"is {width} x {height} pixels ({limits})")
    return decode(data, path)


def _gray_palette(image: Any) -> bool:
    palette = np.asarray(image.getpalette() or [], dtype=np.int32).reshape(-1, 3)
    return bool(palette.size) and bool(np.all(palette == palette[:, :1]))


def _ignored(path: str, overrides: Overrides, planck_too: bool, tlinear: bool) -> None:
    given: List[str] = []
    if planck_too:
        given += [key for key, value in overrides.planck.items() if value is not None]
    if tlinear and overrides.tlinear is not None:
        given.append("tlinear")
    if given:
        log.warning("%s: %s ignored: the file has no calibration they apply to", path, ", ".join(given))
