"""What a cell costs, estimated before it runs (``unip sweep run --dry-run``): training images × model FLOPs.

Training images = ``optim.iterations`` × the total batch (``optim.effective_batch``, or per-GPU batch ×
accumulation). FLOPs per training image, counted by ``unip.seg.flops`` at the cell's crop size on the
architecture of the backbone's size (``unip.models.presets.SIZE_PRESETS``: a MAE-L file costs what ViT-L does):

* fine-tuning: forward + backward ≈ 3 × the training forward (backbone, LL-FPN, UperNet, FCN auxiliary head);
* linear probing: the frozen backbone's forward up to the deepest probed block (no backward through it) +
  3 × the linear head's forward.

Evaluations (sliding windows over the val split every ``run.eval_every`` steps, and the test split at the end)
are not counted: they depend on the image sizes and counts of the data set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

from unip.data.datasets import DATASETS, resolve_layout
from unip.engine.config import Config
from unip.errors import UnipError
from unip.models.presets import preset_config
from unip.seg.build import segmentor_config
from unip.seg.flops import segmentor_cost
from unip.sweep.spec import Cell

#: Classes assumed for a data set whose class list cannot be read (the head's share of the FLOPs is small).
DEFAULT_CLASSES = 21


@dataclass(frozen=True)
class CellCost:
    """Optimiser steps, training images seen and estimated GFLOPs per training image of one cell."""

    iterations: int
    images: int
    gflops_per_image: float

    @property
    def pflops(self) -> float:
        """Estimated training compute in PFLOPs (10^15)."""
        return self.images * self.gflops_per_image / 1e6


class CostModel:
    """Estimates ``CellCost``; FLOP counts are cached per architecture, head and crop size."""

    def __init__(self) -> None:
        self._counts: Dict[Tuple[Any, ...], Dict[str, Dict[str, float]]] = {}

    def cell(self, cell: Cell, config: Config) -> CellCost:
        optim, model = config["optim"], config["model"]
        iterations = int(optim["iterations"] or 0)
        total_batch = int(optim["effective_batch"] or int(optim["batch_size"]) * int(optim["accum_iter"]))
        crop = int(config["data"]["crop_size"])
        classes = dataset_classes(cell.dataset.root, cell.dataset.layout)
        cost = self._count(cell.backbone.architecture, classes, crop, model)
        if cell.probe:
            depth = self._depth(cell.backbone.architecture)
            deepest = cell.layer or depth
            per_image = cost["gflops"]["backbone"] * deepest / depth + 3 * cost["gflops"]["decode_head"]
        else:
            per_image = 3 * cost["gflops"]["total"]
        return CellCost(iterations, iterations * total_batch, per_image)

    def _count(self, architecture: str, classes: int, crop: int, model: Mapping[str, Any]
               ) -> Dict[str, Dict[str, float]]:
        key = (architecture, classes, crop, model["head"], model["neck"], model["channels"],
               bool(model["auxiliary_head"]))
        if key not in self._counts:
            config = segmentor_config(classes, preset_config(architecture), neck=model["neck"], head=model["head"],
                                      img_size=crop, drop_path_rate=0.0, auxiliary_head=bool(model["auxiliary_head"]),
                                      channels=model["channels"])
            self._counts[key] = segmentor_cost(config, crop, training=not config["frozen_backbone"])
        return self._counts[key]

    @staticmethod
    def _depth(architecture: str) -> int:
        return int(preset_config(architecture)["depth"])


def dataset_classes(root: str, layout: str) -> int:
    """The number of classes of the data set at ``root`` (its layout's list, or its ``classes.yaml``);
    ``DEFAULT_CLASSES`` when it cannot be read (a dry run before the data is there)."""
    if layout in DATASETS and DATASETS[layout].classes is not None:
        return len(DATASETS[layout].classes)
    try:
        return len(resolve_layout(root, layout)[1].classes)
    except (UnipError, OSError):
        return DEFAULT_CLASSES


__all__ = ["CellCost", "CostModel", "DEFAULT_CLASSES", "dataset_classes"]
