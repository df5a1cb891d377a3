"""Thermal-camera files read as the sensor recorded them: raw counts, temperatures, calibration, preview.

``read_thermal(path, frame=0)`` → :class:`ThermalFrame`; ``iter_thermal(path)`` yields every frame of a SEQ/CSQ
(one for a single image); ``to_uint8(frame, range=None)`` is the mapping to model input; ``describe_thermal(path)``
is what ``unip info FILE`` prints. Formats, temperatures and their limits: docs/thermal.md.

Modules: :mod:`~unip.data.thermal.fff` (FFF records), :mod:`~unip.data.thermal.planck` (temperatures),
:mod:`~unip.data.thermal.formats` (which format a file holds, reading its frames), :mod:`~unip.data.thermal.frame`
(the frame, the mapping), :mod:`~unip.data.thermal.describe` (the summary), :mod:`~unip.data.thermal.checks`
(byte-swapped rasters, palette pictures), :mod:`~unip.data.thermal.regions` (temperatures per class of a label map).
The mapping every verb uses, with the rule for colour images, is :mod:`unip.data.inputs`.
"""

from __future__ import annotations

from typing import Iterator, Optional

from unip.data.thermal.describe import describe_thermal
from unip.data.thermal.errors import ThermalFileError
from unip.data.thermal.formats import Overrides, count_fff_frames, read_frames, sniff
from unip.data.thermal.frame import ThermalFrame, stretch_counts, to_uint8
from unip.data.thermal.regions import ClassTemperatures, class_temperatures
from unip.errors import ConfigError

__all__ = ["ClassTemperatures", "ThermalFileError", "ThermalFrame", "class_temperatures", "describe_thermal",
           "frame_count", "is_thermal_file", "iter_thermal", "read_thermal", "stretch_counts", "to_uint8"]


def read_thermal(path: str, frame: int = 0, *, emissivity: Optional[float] = None, distance: Optional[float] = None,
                 reflected: Optional[float] = None, tlinear: Optional[float] = None) -> ThermalFrame:
    """Frame ``frame`` (from 0) of the thermal file or image ``path``.

    ``emissivity`` (0..1], ``distance`` (object distance, m) and ``reflected`` (reflected apparent temperature, °C)
    replace the file's values in the temperature model of FLIR files. ``tlinear`` (kelvin per count) gives a 16-bit
    TIFF/PNG temperatures: ``celsius = counts * tlinear - 273.15``. A damaged or unsupported file raises
    :class:`ThermalFileError` (a ``unip.errors.DataError``) naming it; a bad option, ``ConfigError``.
    """
    overrides = Overrides(emissivity, distance, reflected, tlinear)
    return next(read_frames(path, overrides, first=_frame_number(frame), count=1))


def iter_thermal(path: str, *, emissivity: Optional[float] = None, distance: Optional[float] = None,
                 reflected: Optional[float] = None, tlinear: Optional[float] = None, keep_going: bool = False
                 ) -> Iterator[ThermalFrame]:
    """Every frame of ``path`` in order (one for anything but a SEQ/CSQ); the options as in :func:`read_thermal`.
    Frames are read one at a time: a damaged frame raises when it is reached, after the frames before it. With
    ``keep_going=True`` a damaged frame of a sequence is *yielded* as its :class:`ThermalFileError` (``frame``: its
    number) and the frames after it follow, where the file lets them be found (the next valid FFF header after
    the damage); a file that cannot be opened at all still raises."""
    return read_frames(path, Overrides(emissivity, distance, reflected, tlinear), keep_going=keep_going)


def frame_count(path: str) -> int:
    """How many frames ``iter_thermal(path, keep_going=True)`` tries: the FFF frames of a .fff / .seq / .csq file
    (headers only are read; damaged frames count one each), 1 for any other file."""
    return count_fff_frames(path, keep_going=True) if sniff(path) == "fff" else 1


def is_thermal_file(path: str) -> bool:
    """Whether ``path`` holds, by its first bytes, a file :func:`read_thermal` reads (a FLIR file or an image)."""
    return sniff(path) is not None


def _frame_number(frame: int) -> int:
    if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
        raise ConfigError(f"frame={frame!r}: give a frame number, 0 or more")
    return frame
