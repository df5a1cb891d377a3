"""What ``unip info FILE`` prints for a thermal file: format, camera, raster, frames, counts, temperatures and
calibration."""

from __future__ import annotations

import math
from typing import List, Mapping, Tuple

import numpy as np

from unip.data.thermal import planck
from unip.data.thermal.formats import Overrides, count_fff_frames, read_frames, sniff
from unip.data.thermal.frame import ISSUES, ThermalFrame


def describe_thermal(path: str) -> str:
    """A summary of the thermal file ``path`` (its first frame's ranges where it holds several); raises
    ``ThermalFileError`` when the file cannot be read."""
    frame = next(read_frames(path, Overrides(), count=1))
    frames = count_fff_frames(path) if sniff(path) == "fff" else 1
    rows: List[Tuple[str, str]] = [
        ("source", path),
        ("format", frame.format),
        ("camera", frame.camera or "not named in the file"),
        ("raster", f"{frame.width} x {frame.height} (width x height), {frame.encoding}"),
        ("frames", f"{frames} (the ranges below are frame 0's)" if frames > 1 else "1"),
        ("counts", f"{int(frame.counts.min())} .. {int(frame.counts.max())}"),
        ("temperature", _temperature_range(frame)),
    ]
    if frame.timestamp is not None:
        rows.append(("time", frame.timestamp.isoformat(sep=" ", timespec="milliseconds")))
    preview = frame.preview
    if preview is not None:
        rows.append(("preview", f"{preview.shape[1]} x {preview.shape[0]} picture"))
    rows += [("calibration", line) if index == 0 else ("", line)
             for index, line in enumerate(calibration_lines(frame.calibration))]
    rows += [("note", f"{issue}: {ISSUES[issue]}") for issue in frame.issues]
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label + ':' if label else '':<{width}}{value}".rstrip() for label, value in rows)


def _temperature_range(frame: ThermalFrame) -> str:
    if frame.celsius is None:
        if frame.bit_depth <= 8:
            return "none (an 8-bit picture: its camera already mapped the temperatures to gray levels)"
        if frame.format.startswith("16-bit"):
            return ("none (a plain 16-bit image carries no calibration; read_thermal(path, tlinear=K) applies a "
                    "linear scale of K kelvin per count)")
        if frame.format == "DJI JPEG":
            return ("none (DJI's calibration needs DJI's own SDK; read_thermal(path, tlinear=K) applies a linear "
                    "scale of K kelvin per count)")
        return "none (the file's calibration is incomplete or invalid)"
    finite = frame.celsius[np.isfinite(frame.celsius)]
    if finite.size == 0:
        return "none (no count lies on the camera's Planck curve)"
    unknown = frame.celsius.size - finite.size
    note = f" ({unknown} pixels off the camera's curve)" if unknown else ""
    return f"{float(finite.min()):.2f} .. {float(finite.max()):.2f} °C{note}"


def calibration_lines(calibration: Mapping[str, float]) -> List[str]:
    """The calibration as a few readable lines (empty when there is none)."""
    c = calibration
    if "tlinear" in c:
        return [f"linear: {c['tlinear']:g} K per count (celsius = counts x {c['tlinear']:g} - 273.15)"]
    if not c:
        return ["none"]

    def value(key: str, form: str = "{:g}") -> str:
        number = c.get(key)
        return "?" if number is None or not math.isfinite(number) else form.format(number)

    return [
        f"emissivity {value('emissivity', '{:.3g}')}, object distance {value('object_distance')} m, "
        f"relative humidity {value('relative_humidity', '{:.0%}')}",
        f"reflected {value('reflected_temperature', '{:.2f}')} °C, atmosphere "
        f"{value('atmospheric_temperature', '{:.2f}')} °C, IR window {value('ir_window_temperature', '{:.2f}')} °C "
        f"(transmission {value('ir_window_transmission')})",
        f"Planck R1 {value('planck_r1', '{:.8g}')}, R2 {value('planck_r2', '{:.8g}')}, "
        f"B {value('planck_b', '{:.8g}')}, F {value('planck_f', '{:.8g}')}, O {value('planck_o', '{:.8g}')}",
        f"atmosphere alpha1 {value('atmospheric_trans_alpha1', '{:.6g}')}, alpha2 "
        f"{value('atmospheric_trans_alpha2', '{:.6g}')}, beta1 {value('atmospheric_trans_beta1', '{:.6g}')}, beta2 "
        f"{value('atmospheric_trans_beta2', '{:.6g}')}, X {value('atmospheric_trans_x', '{:.6g}')}"
        + _transmission(c),
    ]


def _transmission(calibration: Mapping[str, float]) -> str:
    if planck.problem(calibration) is not None:
        return ""
    return f" (transmission over half the distance {planck.atmospheric_transmission(calibration):.4f})"
