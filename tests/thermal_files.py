"""A small writer of FLIR files for the tests: FFF frames, R-JPEGs, SEQ and CSQ files built from arrays.

Written from ExifTool's documentation of the FLIR records, independently of ``unip.data.thermal`` (its own field
offsets), so that reading back what this writes checks the reader against the documented layout. ExifTool itself
reads what this writes (``tests/test_thermal.py`` checks that where exiftool is installed).
"""

from __future__ import annotations

import io
import struct
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

#: A calibration in the reader's units (°C, humidity as a fraction) with every term of the model away from its
#: neutral value, so that each one changes the temperatures.
CALIBRATION: Dict[str, float] = {
    "emissivity": 0.9, "object_distance": 12.0, "reflected_temperature": 15.0, "atmospheric_temperature": 28.0,
    "ir_window_temperature": 18.0, "ir_window_transmission": 0.85, "relative_humidity": 0.6,
    "planck_r1": 17096.453125, "planck_r2": 0.0480847954750061, "planck_b": 1428.0, "planck_f": 1.0,
    "planck_o": -370.0, "atmospheric_trans_alpha1": 0.006569, "atmospheric_trans_alpha2": 0.01262,
    "atmospheric_trans_beta1": -0.002276, "atmospheric_trans_beta2": -0.00667, "atmospheric_trans_x": 1.9,
}

# CameraInfo: byte offset of each float (kelvin for temperatures) as ExifTool documents them.
_FLOATS = {"emissivity": 0x20, "object_distance": 0x24, "reflected_temperature": 0x28,
           "atmospheric_temperature": 0x2C, "ir_window_temperature": 0x30, "ir_window_transmission": 0x34,
           "relative_humidity": 0x3C, "planck_r1": 0x58, "planck_b": 0x5C, "planck_f": 0x60,
           "atmospheric_trans_alpha1": 0x70, "atmospheric_trans_alpha2": 0x74, "atmospheric_trans_beta1": 0x78,
           "atmospheric_trans_beta2": 0x7C, "atmospheric_trans_x": 0x80, "planck_r2": 0x30C}
_TEMPERATURES = ("reflected_temperature", "atmospheric_temperature", "ir_window_temperature")


def as_stored(calibration: Dict[str, float]) -> Dict[str, float]:
    """``calibration`` as a reader gets it back: floats rounded to float32, Planck O to an integer."""
    stored = {}
    for key, value in calibration.items():
        if key == "planck_o":
            stored[key] = float(int(value))
        elif key in _TEMPERATURES:
            stored[key] = float(np.float32(value + 273.15)) - 273.15
        else:
            stored[key] = float(np.float32(value))
    return stored


def camera_info(calibration: Dict[str, float], width: int, height: int, order: str = "<",
                model: str = "TestCam 640", time: Optional[Tuple[int, int, int]] = None, size: int = 0x400) -> bytes:
    """A CameraInfo record; ``time`` = (Unix seconds, milliseconds, minutes west of UTC)."""
    data = bytearray(size)
    struct.pack_into(order + "HHH", data, 0, 2, width, height)
    for key, offset in _FLOATS.items():
        if offset + 4 <= size:
            value = calibration[key] + (273.15 if key in _TEMPERATURES else 0.0)
            struct.pack_into(order + "f", data, offset, value)
    if 0x30C <= size:
        struct.pack_into(order + "i", data, 0x308, int(calibration["planck_o"]))
    if 0xD4 + 32 <= size:
        data[0xD4:0xD4 + len(model)] = model.encode("ascii")
    if time is not None and 0x384 + 10 <= size:
        struct.pack_into(order + "IIh", data, 0x384, time[0], time[1], time[2])
    return bytes(data)


def raw_data(counts: np.ndarray, order: str = "<", raster: str = "raw") -> bytes:
    """A RawData record: ``raster`` ``raw`` (16-bit samples in ``order``), ``png`` (FLIR's byte-swapped PNG),
    ``png-native`` (a PNG in its own byte order, as a few cameras write it) or ``jpegls`` (as in .csq files)."""
    height, width = counts.shape
    head = struct.pack(order + "HHH", 2, width, height).ljust(0x20, b"\0")
    if raster == "raw":
        body = counts.astype(order + "u2").tobytes()
    elif raster == "png":
        body = png16(counts.astype(np.uint16).byteswap())
    elif raster == "png-native":
        body = png16(counts.astype(np.uint16))
    elif raster == "jpegls":
        import imagecodecs

        body = bytes(imagecodecs.jpegls_encode(counts.astype(np.uint16)))
    else:
        raise ValueError(raster)
    return head + body


def png16(values: np.ndarray) -> bytes:
    """A 16-bit gray PNG of ``values``."""
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def embedded_image(picture: bytes, width: int, height: int, order: str = "<") -> bytes:
    """An EmbeddedImage record holding an encoded picture."""
    return struct.pack(order + "HHH", 3, width, height).ljust(0x20, b"\0") + picture


def fff(records: Sequence[Tuple[int, bytes]], order: str = "<", version: int = 101,
        creator: bytes = b"CAMCTRL", empty_entries: int = 0) -> bytes:
    """An FFF frame: header, directory (``empty_entries`` free ones first), then the records in order."""
    count = len(records) + empty_entries
    header = bytearray(0x40)
    header[0:4] = b"FFF\0"
    header[4:4 + len(creator)] = creator
    struct.pack_into(order + "IIII", header, 0x14, version, 0x40, count, count + 1)
    directory = bytearray(count * 0x20)
    offset = 0x40 + len(directory)
    body = b""
    for index, (kind, record) in enumerate(records, start=empty_entries):
        subtype = (2 if order == "<" else 1) if kind == 0x01 else 1
        struct.pack_into(order + "HHIIII", directory, index * 0x20, kind, subtype, 0x64, index + 1, offset,
                         len(record))
        body += record
        offset += len(record)
    return bytes(header) + bytes(directory) + body


def frame(counts: np.ndarray, calibration: Optional[Dict[str, float]] = None, header_order: str = "<",
          record_order: str = "<", raster: str = "raw", preview: Optional[bytes] = None, **info) -> bytes:
    """One complete FFF frame: raw data, camera info (``calibration``, default :data:`CALIBRATION`), and an
    embedded picture when ``preview`` is given."""
    height, width = counts.shape
    records: List[Tuple[int, bytes]] = [
        (0x01, raw_data(counts, record_order, raster)),
        (0x20, camera_info(calibration or CALIBRATION, width, height, record_order, **info)),
    ]
    if preview is not None:
        records.append((0x0E, embedded_image(preview, width, height, record_order)))
    return fff(records, header_order)


def flir_jpeg(fff_data: bytes, picture: np.ndarray, chunk: int = 65000, order: Optional[Sequence[int]] = None,
              exif_model: Optional[str] = None) -> bytes:
    """An R-JPEG: the JPEG of ``picture`` with ``fff_data`` in APP1 ``FLIR`` segments of ``chunk`` bytes (written
    in ``order`` of their numbers; default ascending) and an EXIF block naming ``exif_model``."""
    pieces = [fff_data[i:i + chunk] for i in range(0, len(fff_data), chunk)]
    assert len(pieces) <= 256
    segments = []
    for number in (order if order is not None else range(len(pieces))):
        body = b"FLIR\0\x01" + bytes([number, len(pieces) - 1]) + pieces[number]
        segments.append(b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body)
    if exif_model is not None:
        segments.insert(0, exif_segment(exif_model))
    encoded = jpeg(picture)
    return encoded[:2] + b"".join(segments) + encoded[2:]


def exif_segment(model: str, make: Optional[str] = None) -> bytes:
    """An APP1 EXIF segment whose first directory holds the text tags Make (when given) and Model."""
    tags = ([(0x010F, make)] if make is not None else []) + [(0x0110, model)]
    offset = 8 + 2 + 12 * len(tags) + 4  # longer texts follow the directory; up to 4 bytes sit in the entry
    entries = data = b""
    for tag, value in tags:
        text = value.encode("ascii") + b"\0"
        if len(text) <= 4:
            entries += struct.pack("<HHI", tag, 2, len(text)) + text.ljust(4, b"\0")
        else:
            entries += struct.pack("<HHII", tag, 2, len(text), offset + len(data))
            data += text
    tiff = b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)
    body = b"Exif\0\0" + tiff + data
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def dji_jpeg(counts: np.ndarray, picture: np.ndarray, make: str = "DJI", model: str = "ZH20T",
             chunk: int = 65530) -> bytes:
    """A DJI R-JPEG as ExifTool documents it: the JPEG of ``picture``, an EXIF block naming ``make`` and ``model``,
    and the raw ``counts`` (16-bit little-endian, row by row) in APP3 segments of ``chunk`` bytes."""
    raw = counts.astype("<u2").tobytes()
    segments = [exif_segment(model, make)]
    for start in range(0, len(raw), chunk):
        piece = raw[start:start + chunk]
        segments.append(b"\xff\xe3" + struct.pack(">H", len(piece) + 2) + piece)
    encoded = jpeg(picture)
    return encoded[:2] + b"".join(segments) + encoded[2:]


def scene(height: int, width: int, seed: int = 0, low: int = 3000, high: int = 9000, noise: float = 40.0
          ) -> np.ndarray:
    """uint16 counts: a gradient, a warm disc and Gaussian noise (standard deviation ``noise`` counts), spanning
    about ``low``..``high``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    disc = ((y - height * 0.4) ** 2 + (x - width * 0.6) ** 2) < (min(height, width) * 0.25) ** 2
    values = low + (high - low) * (0.3 * x / max(width - 1, 1) + 0.5 * disc) + rng.normal(0, noise, (height, width))
    return np.clip(values, 0, 65535).astype(np.uint16)


def raw2temp(raw: np.ndarray, c: Dict[str, float]) -> np.ndarray:
    """Tattersall's Thermimage ``raw2temp``, term by term as it writes it, in float64 (°C)."""
    e, od, rtemp, atemp = c["emissivity"], c["object_distance"], c["reflected_temperature"], \
        c["atmospheric_temperature"]
    irwtemp, irt, rh = c["ir_window_temperature"], c["ir_window_transmission"], c["relative_humidity"] * 100
    pr1, pb, pf, po, pr2 = c["planck_r1"], c["planck_b"], c["planck_f"], c["planck_o"], c["planck_r2"]
    ata1, ata2, atb1, atb2, atx = (c["atmospheric_trans_alpha1"], c["atmospheric_trans_alpha2"],
                                   c["atmospheric_trans_beta1"], c["atmospheric_trans_beta2"],
                                   c["atmospheric_trans_x"])
    emiss_wind = 1 - irt
    refl_wind = 0
    h2o = (rh / 100) * np.exp(1.5587 + 0.06939 * atemp - 0.00027816 * atemp ** 2 + 0.00000068455 * atemp ** 3)
    tau1 = atx * np.exp(-np.sqrt(od / 2) * (ata1 + atb1 * np.sqrt(h2o))) + (1 - atx) * np.exp(
        -np.sqrt(od / 2) * (ata2 + atb2 * np.sqrt(h2o)))
    tau2 = tau1
    raw_refl1 = pr1 / (pr2 * (np.exp(pb / (rtemp + 273.15)) - pf)) - po
    raw_refl1_attn = (1 - e) / e * raw_refl1
    raw_atm1 = pr1 / (pr2 * (np.exp(pb / (atemp + 273.15)) - pf)) - po
    raw_atm1_attn = (1 - tau1) / e / tau1 * raw_atm1
    raw_wind = pr1 / (pr2 * (np.exp(pb / (irwtemp + 273.15)) - pf)) - po
    raw_wind_attn = emiss_wind / e / tau1 / irt * raw_wind
    raw_refl2 = pr1 / (pr2 * (np.exp(pb / (rtemp + 273.15)) - pf)) - po
    raw_refl2_attn = refl_wind / e / tau1 / irt / tau2 * raw_refl2
    raw_atm2 = pr1 / (pr2 * (np.exp(pb / (atemp + 273.15)) - pf)) - po
    raw_atm2_attn = (1 - tau2) / e / tau1 / irt / tau2 * raw_atm2
    raw_obj = (raw.astype(np.float64) / e / tau1 / irt / tau2 - raw_atm1_attn - raw_atm2_attn - raw_wind_attn
               - raw_refl1_attn - raw_refl2_attn)
    with np.errstate(invalid="ignore", divide="ignore"):  # counts off the curve: NaN
        return pb / np.log(pr1 / (pr2 * (raw_obj + po)) + pf) - 273.15
