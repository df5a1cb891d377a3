"""The one error of thermal-file reading."""

from __future__ import annotations

from typing import Optional

from unip.data.images import ImageReadError


class ThermalFileError(ImageReadError):
    """A thermal file cannot be read: damaged, truncated, or not what its content claims. An ``ImageReadError``
    (so a ``DataError``), with a short ``reason`` (``truncated``, ``bad-record``, ``bad-raster``, ``bad-size``,
    ``not-fff``, ...) so that scanners can skip the file and list it. ``frame``: the frame of a sequence that is
    damaged, where the error is about one frame (``iter_thermal(path, keep_going=True)``), else None."""

    frame: Optional[int] = None
