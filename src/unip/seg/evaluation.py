"""Evaluating a segmentor on a split: sliding-window prediction, a confusion matrix reduced over ranks, metrics.

``evaluate_split`` is what fine-tuning runs every ``run.eval_every`` steps (on the val split) and at the end
(on the test split), and what ``unip evaluate`` runs. Under torchrun each rank reads its share of the split
(``unip.engine.data.build_eval_loader``: every image exactly once over all ranks), accumulates a confusion
matrix and the ranks sum it once; every rank then holds the same metrics.

Each image goes through the segmentor's test pipeline (``unip.seg.pipeline``, the release's test mode,
docs/recipe.md#test-pipeline): the data set's test transform resizes it to fit (2048, 512) and normalises it,
windows of ``crop`` with ``stride`` cover it (the windows of an image, and of the images of a batch that share its
size, run as one forward unless ``batch_windows`` is off), the logits are resized to the label's original size and
soft-maxed (averaged over flips and scales when asked), and the arg-max is compared with the label (255 ignored).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from unip.engine.data import build_eval_loader
from unip.engine.distributed import all_reduce_sum
from unip.engine.loop import Precision
from unip.engine.progress import shown
from unip.errors import ConfigError
from unip.seg.inference import predict_probabilities
from unip.seg.metrics import confusion_matrix, segmentation_metrics
from unip.seg.pipeline import InferencePipeline

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """How a split is evaluated: the segmentor's test ``pipeline`` (sliding window, test-time augmentation), and
    how the work is laid out: ``batch_windows``: the windows of a batch in one forward (``False``: one at a time,
    as the release); ``batch_size``: images per loader batch (images of the same size share a forward);
    ``num_workers``: loader workers per rank."""

    pipeline: InferencePipeline = field(default_factory=InferencePipeline)
    batch_windows: bool = True
    batch_size: int = 1
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError(f"evaluation batch size {self.batch_size} / workers {self.num_workers}: need a batch "
                              "of at least 1 and no negative worker count")

    def record(self) -> Dict[str, Any]:
        """The settings as written into ``metrics.json`` (``test``)."""
        return {**self.pipeline.record(), "batch_windows": self.batch_windows}


@dataclass
class EvalResult:
    """The confusion matrix ``[C, C]`` (int64, rows = ground truth) summed over the split and every rank,
    the metrics computed from it (``segmentation_metrics``), and how many images were evaluated."""

    confusion: Tensor
    metrics: Dict[str, Any] = field(default_factory=dict)
    images: int = 0

    def scalars_and_lists(self) -> Dict[str, Any]:
        """``mIoU``, ``mAcc``, ``aAcc`` (floats) and per-class ``IoU``, ``Acc`` (lists): what a training
        evaluation returns to the trainer."""
        return {key: self.metrics[key] for key in ("mIoU", "mAcc", "aAcc", "IoU", "Acc")}


def _same_size_groups(batch: Dict[str, List[Any]]) -> Iterator[Tuple[Tensor, List[Tensor]]]:
    """``(images [B, 3, h, w], labels)`` for each group of a list-collated batch whose images and labels share
    their sizes (so that they can go through one forward and be resized to one output size)."""
    groups: Dict[Tuple[Tuple[int, ...], Tuple[int, ...]], List[int]] = {}
    for index, (image, label) in enumerate(zip(batch["image"], batch["label"])):
        groups.setdefault((tuple(image.shape), tuple(label.shape)), []).append(index)
    for indices in groups.values():
        yield torch.stack([batch["image"][i] for i in indices]), [batch["label"][i] for i in indices]


def predict_labels(segmentor: nn.Module, images: Tensor, output_size: Sequence[int], settings: EvalSettings,
                   precision: Optional[Precision] = None) -> Tensor:
    """Predicted class ids ``[B, H, W]`` (int64, at ``output_size``) of normalised ``images [B, 3, h, w]`` on
    the segmentor's device, by sliding windows and the test-time augmentation of ``settings``."""
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        pipeline = settings.pipeline
        probabilities = predict_probabilities(segmentor, images, mode="slide", crop=pipeline.crop,
                                              stride=pipeline.stride, flip=pipeline.flip, scales=pipeline.scales,
                                              output_size=tuple(output_size), batch_windows=settings.batch_windows)
    return probabilities.argmax(dim=1)


def evaluate_split(segmentor: nn.Module, dataset: Dataset, settings: EvalSettings, device: torch.device,
                   precision: Optional[Precision] = None, rank: Optional[int] = None,
                   world_size: Optional[int] = None, progress: bool = False, desc: str = "eval") -> EvalResult:
    """Evaluate ``segmentor`` (on ``device``) on ``dataset`` (a ``SegmentationDataset`` with the test
    transform: items with a normalised ``image [3, h, w]`` and the ``label [H, W]`` at its original size).

    This rank reads its share (``rank`` of ``world_size``, default: the process group's); the confusion
    matrix and the image count are summed over the ranks once, so every rank returns the same
    ``EvalResult``. Call it on every rank. Raises ``DataError`` for a label value that is not a class id."""
    num_classes = int(segmentor.num_classes)  # type: ignore[arg-type]
    loader = build_eval_loader(dataset, settings.batch_size, rank=rank, world_size=world_size,
                               num_workers=settings.num_workers, pin_memory=device.type == "cuda")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    images = 0
    was_training = segmentor.training
    segmentor.eval()
    try:
        with torch.no_grad(), tqdm(total=len(loader), desc=desc, unit="batch", leave=False,
                                   disable=shown(progress), dynamic_ncols=True) as bar:
            for batch in loader:
                for inputs, labels in _same_size_groups(batch):
                    preds = predict_labels(segmentor, inputs.to(device, non_blocking=True), labels[0].shape,
                                           settings, precision)
                    for pred, label in zip(preds, labels):
                        confusion += confusion_matrix(pred, label.to(device), num_classes)
                    images += len(labels)
                bar.update(1)
    finally:
        segmentor.train(was_training)
    confusion = all_reduce_sum(confusion).cpu()
    images = int(all_reduce_sum(torch.tensor([images], device=device)).item())
    return EvalResult(confusion, segmentation_metrics(confusion), images)


__all__ = ["EvalResult", "EvalSettings", "evaluate_split", "predict_labels"]
