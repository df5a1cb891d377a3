"""One input through a segmentor, as ``unip predict`` does it for every image and frame (and ``unip serve`` for
what it is given): the input mapped to the model's image (``unip.data.inputs``), the label map at that image's
size (a radiometric file's raster, not its preview), the ``areas.json`` entry (pixels and percent per class, and
°C per class where the input has temperatures) and the overlay (the model's image blended with the class colours,
a legend, and a °C bar where the input has temperatures).

:func:`predict_input` does all of it for one file; ``unip predict`` reads and batches many, then calls
:func:`area_record` and :func:`render_overlay` on each, so both give the same entry for the same file and model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from unip.data.inputs import InputMapping, InputNotes, ModelInput, read_input
from unip.data.thermal import class_temperatures
from unip.seg.predict import Predictor
from unip.seg.render import ClassInfo, class_areas, overlay

#: Gray levels the temperature bar of an overlay labels.
SCALE_LEVELS = (0, 64, 128, 191, 255)
#: Calibration values an areas.json entry records (what the temperatures depend on most).
RECORDED_CALIBRATION = ("emissivity", "object_distance", "reflected_temperature", "tlinear")


@dataclass
class Prediction:
    """What one input gave: ``item`` (the mapped input), ``labels`` (class ids ``[H, W]`` at ``item.image``'s
    size), ``record`` (its ``areas.json`` entry, without ``files``)."""

    item: ModelInput
    labels: np.ndarray
    record: Dict[str, Any]
    classes: ClassInfo

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """The overlay (RGB uint8 ``[H, W, 3]``): :func:`render_overlay`."""
        return render_overlay(self.item, self.labels, self.classes, alpha, self.record)


def predict_input(predictor: Predictor, path: str, classes: ClassInfo, mapping: Optional[InputMapping] = None,
                  frame: int = 0, name: Optional[str] = None, notes: Optional[InputNotes] = None) -> Prediction:
    """Frame ``frame`` of the file ``path`` through ``predictor``: what ``unip predict`` writes for it (module
    docstring). ``name`` goes into the record (default: the file's stem); ``notes`` collects what the file was
    found to be instead of a sensor's raster (one warning per kind). Raises ``ImageReadError`` for a file that
    cannot be read, ``NoTemperaturesError`` for a fixed window on a file without temperatures."""
    item = read_input(path, mapping, frame)
    if notes is not None:
        notes.note(path, item.issues)
    labels = predictor.predict([item.rgb])[0]
    name = name if name is not None else os.path.splitext(os.path.basename(path))[0]
    return Prediction(item, labels, area_record(item, labels, classes, name), classes)


def area_record(item: ModelInput, labels: np.ndarray, classes: ClassInfo, name: str,
                time_s: Optional[float] = None) -> Dict[str, Any]:
    """The ``areas.json`` entry of one input and its label map: ``input``, ``frame``, ``time_s``, ``name``,
    ``height``, ``width``, ``pixels`` and ``percent`` per class, ``celsius_mean`` / ``_median`` / ``_min`` / ``_max``
    per class (None where the class is absent or the input has no temperatures), ``issues`` (what the input was
    found to be instead of a sensor's raster) and ``thermal`` (format, camera and the calibration values the
    temperatures depend on most, or None for an input without temperatures)."""
    pixels = class_areas(labels, classes.num_classes)
    total = max(int(labels.size), 1)
    record: Dict[str, Any] = {
        "input": item.path, "frame": item.index, "time_s": None if time_s is None else round(time_s, 4),
        "name": name, "height": int(labels.shape[0]), "width": int(labels.shape[1]),
        "pixels": [int(p) for p in pixels], "percent": [round(100.0 * int(p) / total, 4) for p in pixels]}
    record.update(class_temperatures(labels, item.celsius, classes.num_classes).columns())
    record["issues"] = list(item.issues)
    record["thermal"] = _thermal(item)
    return record


def _thermal(item: ModelInput) -> Optional[Dict[str, Any]]:
    if item.celsius is None or item.frame is None:
        return None
    frame = item.frame
    calibration = {key: float(f"{frame.calibration[key]:.6g}") for key in RECORDED_CALIBRATION
                   if key in frame.calibration}  # float32 in the file: 0.95, not 0.949999988
    return {"format": frame.format, "camera": frame.camera, "calibration": calibration,
            "window": None if item.window is None else list(item.window)}


def render_overlay(item: ModelInput, labels: np.ndarray, classes: ClassInfo, alpha: float = 0.5,
                   record: Optional[Dict[str, Any]] = None) -> np.ndarray:
    """The model's image of ``item`` blended with the colours of ``labels``, a legend (share and, with
    temperatures, mean °C per class; from ``record`` when given) and, with temperatures, a °C bar labelling the
    gray levels of the image. RGB uint8 ``[H, W, 3]``, the image's size."""
    if item.celsius is None:
        return overlay(item.rgb, labels, classes, alpha)
    means = (record or {}).get("celsius_mean")
    if means is None:
        means = class_temperatures(labels, item.celsius, classes.num_classes).columns()["celsius_mean"]
    class_celsius = [np.nan if value is None else float(value) for value in means]
    scale = list(zip(SCALE_LEVELS, item.celsius_at(SCALE_LEVELS).tolist()))
    return overlay(item.rgb, labels, classes, alpha, class_celsius=class_celsius, scale=scale)
