"""Temperatures of labelled regions: per class mean, median, minimum and maximum °C of a label map."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

#: The statistics, in the order of ``areas.csv``'s columns.
STATISTICS = ("mean", "median", "min", "max")


@dataclass(frozen=True)
class ClassTemperatures:
    """Per class id, float64 ``[num_classes]`` arrays in °C: ``mean``, ``median``, ``min``, ``max`` of the pixels
    of that class whose temperature is known (NaN pixels, off the camera's curve, left out); NaN where the class
    has no such pixel or the input has no temperatures."""

    mean: np.ndarray
    median: np.ndarray
    min: np.ndarray
    max: np.ndarray

    def columns(self, digits: int = 4) -> Dict[str, List[Optional[float]]]:
        """``{"celsius_mean": [...], "celsius_median": ..., "celsius_min": ..., "celsius_max": ...}``: one value
        per class, rounded to ``digits`` decimals, None where NaN (what areas.json holds)."""
        return {f"celsius_{name}": [None if np.isnan(v) else round(float(v), digits) for v in getattr(self, name)]
                for name in STATISTICS}


def class_temperatures(labels: np.ndarray, celsius: Optional[np.ndarray], num_classes: int) -> ClassTemperatures:
    """The temperatures of each class of the label map ``labels`` (integer ids ``[H, W]``) over ``celsius``
    (float ``[H, W]``, or None: every value NaN). Ids at or above ``num_classes`` (255 = ignore) are left out; the
    median is NumPy's (the mean of the two middle values of an even count). Raises ``ValueError`` when the shapes
    differ."""
    result = {name: np.full(num_classes, np.nan) for name in STATISTICS}
    if celsius is None:
        return ClassTemperatures(**result)
    if celsius.shape != labels.shape:
        raise ValueError(f"labels {labels.shape} and temperatures {celsius.shape} differ in size")
    ids = labels.ravel().astype(np.int64)
    values = celsius.ravel()
    keep = np.isfinite(values) & (ids < num_classes)
    ids, values = ids[keep], values[keep].astype(np.float64)
    order = np.argsort(ids, kind="stable")
    ids, values = ids[order], values[order]
    counts = np.bincount(ids, minlength=num_classes)[:num_classes]
    ends = np.cumsum(counts)
    for class_id in np.flatnonzero(counts):
        region = values[ends[class_id] - counts[class_id]:ends[class_id]]
        result["mean"][class_id] = region.mean()
        result["median"][class_id] = np.median(region)
        result["min"][class_id] = region.min()
        result["max"][class_id] = region.max()
    return ClassTemperatures(**result)
