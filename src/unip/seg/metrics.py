"""Segmentation metrics from a confusion matrix accumulated over a whole split (mmsegmentation's semantics).

``confusion[t, p]`` counts pixels of ground-truth class ``t`` predicted as ``p`` (ignored pixels left out).
Per class: IoU = TP / (TP + FP + FN), Acc = TP / (TP + FN). A class with no pixel in the labels nor the
predictions has IoU NaN; a class with no pixel in the labels has Acc NaN; NaNs are left out of the means
(mmseg's ``nanmean``; torchmetrics would count such classes differently). Values are in percent.
"""

from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import Tensor

from unip.errors import DataError


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix ``[C, C]`` (int64, rows = ground truth, columns = prediction) of integer label
    maps ``pred`` and ``target`` of the same shape; pixels where ``target == ignore_index`` are skipped.
    Raises ``DataError`` for a target or prediction value outside ``0..C-1`` (other than the ignore value)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    target, pred = target[valid].long(), pred[valid].long()
    for name, values in (("label", target), ("prediction", pred)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            bad = values[(values < 0) | (values >= num_classes)][0].item()
            raise DataError(f"{name} value {bad} is neither a class id (0..{num_classes - 1}) nor the ignore "
                            f"index {ignore_index}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: Tensor) -> Dict[str, Any]:
    """``{"mIoU", "mAcc", "aAcc"}`` (floats, percent) and per-class ``"IoU"``, ``"Acc"`` (lists, percent,
    NaN for classes absent as described in the module docstring) of a confusion matrix ``[C, C]``."""
    confusion = confusion.double().cpu()
    true_positive = confusion.diagonal()
    label_area = confusion.sum(dim=1)
    union = label_area + confusion.sum(dim=0) - true_positive
    iou = true_positive / union * 100  # 0/0 = NaN: absent from labels and predictions
    acc = true_positive / label_area * 100  # 0/0 = NaN: absent from labels
    total = float(label_area.sum())
    return {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": float(true_positive.sum()) / total * 100 if total else math.nan,
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


def _nanmean(values: Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else math.nan
