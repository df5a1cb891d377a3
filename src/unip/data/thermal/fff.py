"""FLIR FFF records: the container of every FLIR radiometric format (R-JPEG, .fff, .seq, .csq).

Layout (ExifTool's documentation of the FLIR tags):

* header, 0x40 bytes: ``FFF\\0``, creator (16 bytes), format version (uint32 at 0x14, 100..199: it also tells
  the byte order of the header and directory), directory offset (0x18) and entry count (0x1c);
* directory entries, 0x20 bytes each: record type (uint16), subtype, version, index id, then the record's offset
  (0x0c, from the header's first byte) and length (0x10);
* records, each in its own byte order, which its first uint16 tells (a small number, 2 or 3, read the right way):
  RawData (type 0x01: width, height at bytes 2 and 4, the raster from byte 0x20: raw 16-bit samples in the record's
  byte order, a PNG holding byte-swapped samples, or JPEG-LS in .csq files), EmbeddedImage (0x0e: the visible or
  palette picture from byte 0x20), CameraInfo (0x20: calibration floats, model, time; offsets in ``_CAMERA_INFO``).

A .seq or .csq file is FFF frames one after another: the next header follows the previous frame's last record
(or, where a writer pads, the next ``FFF\\0`` with a valid header after it).

Every offset and length is checked against the bytes present, and raster sizes against ``MAX_SIDE`` /
``MAX_PIXELS``, before anything is read or allocated: a damaged file is a ``ThermalFileError`` naming the file.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import BinaryIO, Dict, Optional, Tuple, Union

import numpy as np

from unip.data.thermal.checks import roughness
from unip.data.thermal.errors import ThermalFileError
from unip.optional import require

log = logging.getLogger(__name__)

MAGIC = b"FFF\0"
HEADER_SIZE = 0x40
ENTRY_SIZE = 0x20
RAW_DATA, EMBEDDED_IMAGE, CAMERA_INFO = 0x01, 0x0E, 0x20
#: Largest raster side and pixel count read (the largest thermal sensors are 1280 x 1024).
MAX_SIDE = 8192
MAX_PIXELS = 1 << 25
#: Most directory entries one frame may have (real files hold about ten).
MAX_RECORDS = 4096

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"

#: CameraInfo fields: calibration key → (byte offset, struct format, conversion). Temperatures are stored in kelvin.
_KELVIN = 273.15
_CAMERA_INFO = {
    "emissivity": (0x20, "f", None),
    "object_distance": (0x24, "f", None),
    "reflected_temperature": (0x28, "f", -_KELVIN),
    "atmospheric_temperature": (0x2C, "f", -_KELVIN),
    "ir_window_temperature": (0x30, "f", -_KELVIN),
    "ir_window_transmission": (0x34, "f", None),
    "relative_humidity": (0x3C, "f", None),
    "planck_r1": (0x58, "f", None),
    "planck_b": (0x5C, "f", None),
    "planck_f": (0x60, "f", None),
    "atmospheric_trans_alpha1": (0x70, "f", None),
    "atmospheric_trans_alpha2": (0x74, "f", None),
    "atmospheric_trans_beta1": (0x78, "f", None),
    "atmospheric_trans_beta2": (0x7C, "f", None),
    "atmospheric_trans_x": (0x80, "f", None),
    "planck_o": (0x308, "i", None),
    "planck_r2": (0x30C, "f", None),
}
_MODEL = (0xD4, 32)
_TIME = 0x384  # uint32 Unix time, uint32 (low 16 bits: milliseconds), int16 minutes west of UTC


class Source:
    """Bytes to read frames from: a bytes object (an R-JPEG's reassembled FFF data) or an open file."""

    def __init__(self, path: str, data: Union[bytes, BinaryIO]) -> None:
        self.path = path
        if isinstance(data, (bytes, bytearray, memoryview)):
            self._handle: BinaryIO = io.BytesIO(data)
            self.size = len(data)
            self.extent = f"the {self.size} bytes of FLIR data in its JPEG segments"
        else:
            self._handle = data
            self.size = data.seek(0, io.SEEK_END)
            self.extent = f"the file's {self.size} bytes"

    def read(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at ``offset``; a range outside the data is a ``ThermalFileError`` naming ``what``."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ThermalFileError(self.path, "truncated", f"{what} (bytes {offset}..{offset + length}) lies outside "
                                   f"{self.extent}")
        self._handle.seek(offset)
        return self._handle.read(length)

    def find(self, needle: bytes, start: int) -> int:
        """Offset of the next ``needle`` at or after ``start``, or -1."""
        chunk = 1 << 20
        position = start
        while position < self.size:
            self._handle.seek(position)
            block = self._handle.read(chunk + len(needle) - 1)
            found = block.find(needle)
            if found >= 0:
                return position + found
            position += chunk
        return -1


@dataclass
class Record:
    kind: int
    offset: int  # from the start of the source
    length: int


@dataclass
class Frame:
    """One FFF frame's header and directory: where its records are."""

    start: int
    end: int  # one past its last byte (header, directory or record)
    records: Dict[int, Record]  # the first record of each type

    def record(self, kind: int) -> Optional[Record]:
        return self.records.get(kind)


def read_frame(source: Source, start: int) -> Frame:
    """The FFF header and directory at ``start``; every record must lie inside ``source``."""
    header = source.read(start, HEADER_SIZE, "the FFF header")
    if header[:4] != MAGIC:
        kind = "an AFF sequence (not supported)" if header[:4] == b"AFF\0" else "no FFF header"
        raise ThermalFileError(source.path, "not-fff", f"{kind} at byte {start}")
    order = _header_order(header)
    if order is None:
        raise ThermalFileError(source.path, "not-fff", f"FFF header at byte {start} has an unknown version "
                               f"({struct.unpack_from('<I', header, 0x14)[0]}); only versions 100-199 are known")
    directory_offset, count = struct.unpack_from(order + "II", header, 0x18)
    if count > MAX_RECORDS:
        raise ThermalFileError(source.path, "bad-record", f"FFF directory at byte {start} claims {count} records "
                               f"(at most {MAX_RECORDS} are read)")
    directory = source.read(start + directory_offset, count * ENTRY_SIZE, "the FFF record directory")
    records: Dict[int, Record] = {}
    end = start + directory_offset + count * ENTRY_SIZE
    for index in range(count):
        kind, = struct.unpack_from(order + "H", directory, index * ENTRY_SIZE)
        offset, length = struct.unpack_from(order + "II", directory, index * ENTRY_SIZE + 0x0C)
        if kind == 0:  # a free entry
            continue
        if start + offset + length > source.size:
            raise ThermalFileError(source.path, "truncated", f"FFF record {index} (type 0x{kind:02x}, bytes "
                                   f"{start + offset}..{start + offset + length}) lies outside {source.extent}")
        records.setdefault(kind, Record(kind, start + offset, length))
        end = max(end, start + offset + length)
    return Frame(start, max(end, start + HEADER_SIZE), records)


def _header_order(header: bytes) -> Optional[str]:
    """The byte order in which the header's version reads as 100..199 (big-endian in R-JPEGs, little in files)."""
    for order in (">", "<"):
        if 100 <= struct.unpack_from(order + "I", header, 0x14)[0] < 200:
            return order
    return None


def next_frame_start(source: Source, frame: Frame) -> Optional[int]:
    """Where the frame after ``frame`` starts, or None at the end of the data."""
    position = frame.end
    left = source.size - position
    if left >= 4 and source.read(position, 4, "the next FFF header") == MAGIC:  # the usual case
        if left < HEADER_SIZE or _header_order(source.read(position, HEADER_SIZE, "an FFF header")) is not None:
            return position  # (read_frame reports a header cut short)
    return next_valid_header(source, position)


def next_valid_header(source: Source, position: int) -> Optional[int]:
    """The offset of the first ``FFF\0`` at or after ``position`` that starts a header of a known version, or None."""
    while position < source.size:
        found = source.find(MAGIC, position)
        if found < 0 or found + HEADER_SIZE > source.size:
            return None
        if _header_order(source.read(found, HEADER_SIZE, "an FFF header")) is not None:
            return found
        position = found + 1  # "FFF\0" inside other data
    return None


def _record_order(data: bytes) -> str:
    """A record's byte order: its first uint16 is a small number (2 for RawData and CameraInfo) read the right way."""
    return "<" if struct.unpack_from("<H", data, 0)[0] < 0x100 else ">"


# ------------------------------------------------------------------------------------------ raster
def read_raster(source: Source, record: Record) -> Tuple[np.ndarray, str]:
    """The RawData record's counts (uint16 H x W, native byte order) and how they were stored."""
    if record.length < 0x20:
        raise ThermalFileError(source.path, "bad-record", f"raw data record of {record.length} bytes is shorter "
                               "than its 32-byte header")
    head = source.read(record.offset, 0x20, "the raw data record")
    order = _record_order(head)
    width, height = struct.unpack_from(order + "HH", head, 2)
    _check_size(source.path, width, height, "raw thermal image")
    start, length = record.offset + 0x20, record.length - 0x20
    lead = source.read(start, min(length, 8), "the raw thermal image")
    if lead.startswith(PNG_MAGIC):
        return _png_counts(source.read(start, length, "the PNG raster"), width, height, source.path)
    if lead.startswith(JPEG_MAGIC):
        return _jpegls_counts(source.read(start, length, "the JPEG-LS raster"), width, height, source.path), "JPEG-LS"
    needed = width * height * 2
    if length < needed:
        what = ("holds 8-bit samples, not 16-bit" if length == width * height
                else f"holds {length} bytes where {width} x {height} 16-bit samples need {needed}")
        raise ThermalFileError(source.path, "bad-raster", f"raw thermal image {what}")
    samples = np.frombuffer(source.read(start, needed, "the raw thermal image"), dtype=order + "u2")
    endian = "little" if order == "<" else "big"
    return samples.astype(np.uint16).reshape(height, width), f"raw 16-bit {endian}-endian"


def _check_size(path: str, width: int, height: int, what: str) -> None:
    if width == 0 or height == 0 or width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise ThermalFileError(path, "bad-size", f"{what} declares {width} x {height} pixels (at most {MAX_SIDE} a "
                               f"side and {MAX_PIXELS} in all are read)")


def _png_counts(data: bytes, width: int, height: int, path: str) -> Tuple[np.ndarray, str]:
    """A PNG raster: 16-bit gray, as most FLIR cameras write it with their little-endian samples in PNG's big-endian
    slots (swapped back here). ExifTool's notes say *most*: a raster at least 4 times smoother as stored than
    swapped back (``unip.data.thermal.checks.roughness``) is kept in PNG's own order."""
    from PIL import Image

    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ThermalFileError(path, "bad-raster", "PNG raster has no image header")
    png_width, png_height = struct.unpack_from(">II", data, 16)
    depth, colour = data[24], data[25]
    if depth != 16 or colour != 0:
        raise ThermalFileError(path, "bad-raster", f"PNG raster is {depth}-bit {_PNG_COLOURS.get(colour, 'unknown')}"
                               ", not 16-bit gray")
    if (png_width, png_height) != (width, height):
        raise ThermalFileError(path, "bad-raster", f"PNG raster is {png_width} x {png_height}, its record declares "
                               f"{width} x {height}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        pixels = np.asarray(image)
    except Exception as err:  # PIL raises many kinds on damaged data
        raise ThermalFileError(path, "bad-raster", f"PNG raster cannot be decoded ({err})") from None
    stored = pixels.astype(np.uint16)
    swapped_back = stored.byteswap()
    # One of the two orders is the sensor's: FLIR's swap unless the raster is far smoother as stored.
    as_stored = roughness(stored)
    if as_stored < 0.5 and roughness(swapped_back) >= 4 * as_stored:
        return stored, "PNG, 16-bit in PNG's byte order"
    return swapped_back, "PNG, byte-swapped 16-bit"


_PNG_COLOURS = {0: "gray", 2: "RGB", 3: "palette", 4: "gray + alpha", 6: "RGBA"}


def _jpegls_counts(data: bytes, width: int, height: int, path: str) -> np.ndarray:
    """A JPEG-LS raster (.csq): its frame header is checked before ``imagecodecs`` decodes it."""
    precision, lines, samples, components = _jpeg_frame_header(data, path)
    if (samples, lines) != (width, height):
        raise ThermalFileError(path, "bad-raster", f"JPEG-LS raster is {samples} x {lines}, its record declares "
                               f"{width} x {height}")
    if components != 1 or not 8 < precision <= 16:
        raise ThermalFileError(path, "bad-raster", f"JPEG-LS raster has {components} component(s) of {precision} "
                               "bits, not one of 9-16 bits")
    codecs = require("imagecodecs", f"{path}: reading its JPEG-LS raster (FLIR .csq)")
    try:
        pixels = codecs.jpegls_decode(data)
    except Exception as err:
        raise ThermalFileError(path, "bad-raster", f"JPEG-LS raster cannot be decoded ({err})") from None
    if pixels.shape != (height, width):
        raise ThermalFileError(path, "bad-raster", f"JPEG-LS raster decoded to {pixels.shape}, not {height} x {width}")
    return pixels.astype(np.uint16, copy=False)


def _jpeg_frame_header(data: bytes, path: str) -> Tuple[int, int, int, int]:
    """(precision, lines, samples per line, components) of a JPEG-LS stream's SOF55 header."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        length, = struct.unpack_from(">H", data, position + 2)
        if marker == 0xF7 and length >= 8 and position + 10 <= len(data):
            precision, lines, samples, components = struct.unpack_from(">BHHB", data, position + 4)
            return precision, lines, samples, components
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            raise ThermalFileError(path, "bad-raster", "raster is a JPEG of another kind than JPEG-LS")
        position += 2 + length
    raise ThermalFileError(path, "bad-raster", "JPEG-LS raster has no frame header")


# ------------------------------------------------------------------------------------------ camera info
@dataclass
class CameraInfo:
    calibration: Dict[str, float]
    model: Optional[str]
    timestamp: Optional[datetime]


def read_camera_info(source: Source, record: Record) -> CameraInfo:
    """Calibration, camera model and time of a CameraInfo record (fields past a short record are left out)."""
    data = source.read(record.offset, record.length, "the camera info record")
    if len(data) < 2:
        return CameraInfo({}, None, None)
    order = _record_order(data)
    calibration: Dict[str, float] = {}
    for key, (offset, kind, shift) in _CAMERA_INFO.items():
        if offset + 4 <= len(data):
            value = float(struct.unpack_from(order + kind, data, offset)[0])
            calibration[key] = value + shift if shift else value
    if calibration.get("relative_humidity", 0.0) > 2.0:  # some files store percent
        calibration["relative_humidity"] /= 100.0
    offset, size = _MODEL
    model = _text(data[offset:offset + size]) if offset + size <= len(data) else None
    return CameraInfo(calibration, model, _timestamp(data, order))


def _text(raw: bytes) -> Optional[str]:
    text = raw.split(b"\0", 1)[0].decode("latin-1").strip()
    return text if text and text.isprintable() else None


def _timestamp(data: bytes, order: str) -> Optional[datetime]:
    if _TIME + 10 > len(data):
        return None
    seconds, sub = struct.unpack_from(order + "II", data, _TIME)
    minutes_west, = struct.unpack_from(order + "h", data, _TIME + 8)
    if seconds == 0 or abs(minutes_west) > 24 * 60:
        return None
    try:
        return datetime.fromtimestamp(seconds + (sub & 0xFFFF) / 1000.0, tz=timezone(timedelta(minutes=-minutes_west)))
    except (OverflowError, OSError, ValueError):  # a time this platform cannot represent
        return None


def read_embedded_image(source: Source, record: Record) -> Optional[bytes]:
    """The encoded picture (PNG or JPEG) of an EmbeddedImage record, or None when it holds other data."""
    if record.length <= 0x20:
        return None
    data = source.read(record.offset + 0x20, record.length - 0x20, "the embedded image")
    return data if data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC) else None
