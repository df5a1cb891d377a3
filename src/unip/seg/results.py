"""The evaluation record: ``metrics.json`` (what sweep runners, the demo and people read) and its table.

``metrics.json`` (format ``unip-segmentation-metrics``, version 1) is written by ``unip finetune`` (the
best model on the test split) and by ``unip evaluate``. Metrics are in percent; a per-class value that is
undefined (the class is absent from the labels, or from labels and predictions) is ``null``::

    {"format": "unip-segmentation-metrics", "version": 1,
     "mIoU": 63.2, "mAcc": 72.5, "aAcc": 90.1,
     "classes": ["background", "person", ...],        # names, id = position
     "IoU": [88.1, 70.2, ...], "Acc": [...],            # per class, aligned with "classes" (null: undefined)
     "per_class": [{"id": 0, "name": "background", "IoU": 88.1, "Acc": 93.0,
                    "label_pixels": 123456, "predicted_pixels": 120000}, ...],
     "confusion_matrix": [[...], ...],                  # [C][C] pixel counts, rows = ground truth
     "images": 1280, "split": "test", "split_file": ".../test_infrared.txt",
     "dataset": "soda", "data_root": "...",
     "checkpoint": ".../best.safetensors", "step": 12000,   # step: training iterations of the model (or null)
     "model": {"mode": "fine-tuning" | "linear probe" | "layer-wise probe", "neck": "llfpn", "head": "upernet",
               "feature_layers": [12], "num_classes": 21, "backbone": {"embed_dim": 384, "depth": 12,
               "heads_per_block": [...], "pretrained": "runs/unip-s/student.safetensors" | null,
               "random_init": false}},
     "test": {"mode": "slide", "crop": 512, "stride": 341, "flip": false, "scales": [1.0],
              "batch_windows": true, "precision": "fp16"},
     "best": {"metric": "mIoU", "value": 63.0, "step": 12000, "split": "val"},   # unip finetune only
     "unip_version": "0.1.0"}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from torch import nn

from unip import __version__
from unip.atomic import atomic_write_text
from unip.models.heads import head_kind
from unip.seg.evaluation import EvalResult

METRICS_FORMAT = "unip-segmentation-metrics"
METRICS_VERSION = 1
METRICS_FILE = "metrics.json"


def _number(value: Any) -> Optional[float]:
    """A JSON-safe number: NaN/inf (undefined metrics) → ``None``."""
    value = float(value)
    return value if math.isfinite(value) else None


def describe_model(segmentor: nn.Module) -> Dict[str, Any]:
    """What ``metrics.json`` says about the model: mode (fine-tuning / linear probe / layer-wise probe), neck,
    head, feature layers, classes, and the backbone (shape, pre-trained source, whether randomly initialised)."""
    config: Mapping[str, Any] = segmentor.config  # type: ignore[assignment]
    meta: Mapping[str, Any] = getattr(segmentor, "meta", {})
    head = config["decode_head"]["type"]
    layers = list(config["feature_layers"])
    kind = head_kind(head)
    mode = "layer-wise probe" if kind.probe and len(layers) == 1 else kind.mode
    backbone = segmentor.backbone  # type: ignore[union-attr]
    pretrained = meta.get("pretrained")
    return {"mode": mode, "neck": config.get("neck"), "head": head, "feature_layers": layers,
            "num_classes": int(config["num_classes"]),
            "backbone": {"embed_dim": int(backbone.embed_dim), "depth": int(backbone.depth),
                         "heads_per_block": list(backbone.heads_per_block), "pretrained": pretrained,
                         "random_init": pretrained is None, "preset": meta.get("backbone_preset")}}


def metrics_document(result: EvalResult, class_names: Sequence[str], **context: Any) -> Dict[str, Any]:
    """The ``metrics.json`` document (module docstring) of ``result``; ``context`` adds the other keys
    (``split``, ``split_file``, ``dataset``, ``data_root``, ``checkpoint``, ``step``, ``model``, ``test``,
    ``best``, ...)."""
    metrics, confusion = result.metrics, result.confusion
    label_pixels, predicted_pixels = confusion.sum(dim=1).tolist(), confusion.sum(dim=0).tolist()
    per_class = [{"id": i, "name": str(name), "IoU": _number(metrics["IoU"][i]), "Acc": _number(metrics["Acc"][i]),
                  "label_pixels": int(label_pixels[i]), "predicted_pixels": int(predicted_pixels[i])}
                 for i, name in enumerate(class_names)]
    document: Dict[str, Any] = {
        "format": METRICS_FORMAT, "version": METRICS_VERSION,
        "mIoU": _number(metrics["mIoU"]), "mAcc": _number(metrics["mAcc"]), "aAcc": _number(metrics["aAcc"]),
        "classes": [str(name) for name in class_names],
        "IoU": [entry["IoU"] for entry in per_class], "Acc": [entry["Acc"] for entry in per_class],
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "images": int(result.images),
    }
    document.update(context)
    document["unip_version"] = __version__
    return document


def write_metrics(path: Union[str, Path], document: Mapping[str, Any]) -> Path:
    """Write ``document`` as strict JSON (no NaN), atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(document, indent=1, allow_nan=False) + "\n")
    return path


def read_metrics(path: Union[str, Path]) -> Dict[str, Any]:
    """A ``metrics.json`` document (as ``write_metrics`` wrote it)."""
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def metrics_writer(path: Union[str, Path]) -> Optional[str]:
    """Which verb wrote the ``metrics.json`` at ``path``: ``"finetune"`` (its document has ``best``, ``null``
    when no evaluation chose a best model), ``"evaluate"``, or ``None`` for a file of another format or an
    unreadable one."""
    try:
        document = read_metrics(path)
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("format") != METRICS_FORMAT:
        return None
    return "finetune" if "best" in document else "evaluate"


def _cell(value: Optional[float]) -> str:
    return f"{value:7.2f}" if value is not None else "      -"


def metrics_table(document: Mapping[str, Any]) -> str:
    """A per-class table (IoU, Acc, labelled pixels) followed by mIoU / mAcc / aAcc, from a ``metrics.json``
    document; ``-`` marks an undefined value (class absent)."""
    names: List[str] = list(document["classes"])
    width = max([5] + [len(name) for name in names])
    lines = [f"{'id':>3}  {'class':<{width}}  {'IoU':>7}  {'Acc':>7}  {'pixels':>12}"]
    for entry in document["per_class"]:
        lines.append(f"{entry['id']:>3}  {entry['name']:<{width}}  {_cell(entry['IoU'])}  {_cell(entry['Acc'])}  "
                     f"{entry['label_pixels']:>12,}")
    where = f"{document.get('split', '?')} split of {document.get('dataset', '?')}, {document.get('images', 0)} images"
    lines.append(f"mIoU {_cell(document['mIoU']).strip()}  mAcc {_cell(document['mAcc']).strip()}  "
                 f"aAcc {_cell(document['aAcc']).strip()}  ({where})")
    return "\n".join(lines)


__all__ = ["METRICS_FILE", "METRICS_FORMAT", "METRICS_VERSION", "describe_model", "metrics_document",
           "metrics_table", "metrics_writer", "read_metrics", "write_metrics"]
