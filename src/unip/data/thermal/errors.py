"""The one error of thermal-file reading."""

from __future__ import annotations

from unip.data.images import ImageReadError


class ThermalFileError(ImageReadError):
    """A thermal file cannot be read: damaged, truncated, or not what its content claims. An ``ImageReadError``
    (so a ``DataError``), with a short ``reason`` (``truncated``, ``bad-record``, ``bad-raster``, ``bad-size``,
    ``not-fff``, ...) so that scanners can skip the file and list it."""
