"""``unip evaluate``: a segmentor checkpoint on a split of a data set, with its report.

``evaluate_checkpoint`` reads our ``.safetensors`` segmentors and the release's fine-tuned mmseg checkpoints
(``unip.seg.load_segmentor``), opens the split with the test transform the checkpoint records (resize scale,
normalisation; the recipe's by default), evaluates it (``unip.seg.evaluation.evaluate_split``: every rank
its share under torchrun, one all-reduce) and, on rank 0, writes into ``out``:

* ``metrics.json`` (``unip.seg.results``: mIoU / mAcc / aAcc, per-class IoU / Acc with class names, the
  confusion matrix, what was evaluated and how);
* ``confusion.png``: the confusion matrix normalised per row;
* ``overlays/NNNNN_<name>.png``: prediction and ground truth over the first images of the split, with a legend
  (the folder is replaced as a whole: it holds this evaluation's figures only).

``out`` may be new or an earlier evaluation's output; a training run's folder is refused (``check_outputs``).

The class names are the data set's (its layout's list, or ``classes.yaml``): the ids in its label files are
what the metrics count. A checkpoint whose class count differs from the data set's is refused.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from unip.atomic import replace_folder, temporary_path
from unip.data.seg_check import check_segmentation
from unip.data.datasets import open_segmentation_dataset
from unip.data.segmentation import SegmentationDataset, check_seg_command
from unip.engine.distributed import DistInfo, all_reduce_sum, cleanup, init_distributed
from unip.engine.logging import LOG_FILE
from unip.engine.loop import Precision, resolve_precision
from unip.errors import CheckpointError, ConfigError, DataError
from unip.outputs import claim, claim_folder, foreign_names, is_our_png, out_folder
from unip.run_lock import NO_LOCK, take
from unip.seg.checkpoint import load_segmentor
from unip.seg.evaluation import EvalResult, EvalSettings, evaluate_split, predict_labels
from unip.seg.pipeline import InferencePipeline
from unip.seg.results import (METRICS_FILE, describe_model, metrics_document, metrics_table, metrics_writer,
                              write_metrics)

logger = logging.getLogger(__name__)

CONFUSION_FILE = "confusion.png"
OVERLAY_DIR = "overlays"
_OVERLAY_NAME = re.compile(r"^\d{5}_[A-Za-z0-9._-]*\.png$")
_STALE_OVERLAYS = re.compile(rf"^\.{OVERLAY_DIR}\.(tmp|old)-\d+$")


@dataclass
class EvaluationReport:
    """The ``metrics.json`` document of an evaluation, its table, and the files written (rank 0 only)."""

    document: Dict[str, Any]
    table: str
    files: List[Path] = field(default_factory=list)
    is_main: bool = True


# ------------------------------------------------------------------------------------------------ pieces
def check_classes(segmentor: nn.Module, dataset: SegmentationDataset, checkpoint: str) -> None:
    """``CheckpointError`` when the segmentor predicts another number of classes than the data set has; a
    warning when the checkpoint names its classes differently (the data set's names are used)."""
    count = int(segmentor.num_classes)  # type: ignore[arg-type]
    if count != dataset.num_classes:
        raise CheckpointError(f"{checkpoint}: the segmentor predicts {count} classes, but {dataset.root} "
                              f"({dataset.layout} layout) has {dataset.num_classes}; evaluate it on the data set it "
                              "was trained for (or choose --dataset)")
    names = getattr(segmentor, "meta", {}).get("class_names")
    if names and list(names) != list(dataset.classes):
        logger.warning("%s names its classes %s; the data set's names %s are used", checkpoint,
                       _first_names(names), _first_names(dataset.classes))


def _first_names(names: Sequence[str], shown: int = 4) -> str:
    """``"a, b, c"``, or ``"a, b, c, d, ... (9)"`` for a longer list."""
    text = ", ".join(str(name) for name in names[:shown])
    return f"{text}, ... ({len(names)})" if len(names) > shown else text


def check_data_once(root: str, dataset: str, splits: Sequence[str], dist: DistInfo, workers: Optional[int] = None,
                    progress: bool = True) -> None:
    """Decode every image and label of ``splits`` (``unip.data.check_segmentation``) on rank 0, log every problem
    found (one line each) and raise ``DataError`` with their count on every rank (the count is shared by an
    all-reduce, so no rank runs on alone)."""
    problems = 0
    if dist.is_main:
        report = check_segmentation(root, dataset, list(splits), workers=workers, progress=progress)
        for line in report.problem_lines():
            logger.error(line)
        problems = len(report.problems)
        if not problems:
            logger.info("data check: %s (%s layout) is clean: %s", report.root, report.layout,
                        ", ".join(f"{s.split} {s.images} images" for s in report.splits))
    problems = int(all_reduce_sum(torch.tensor([problems], device=dist.device)).item())
    if problems:
        raise DataError(f"{root}: {problems} data problem(s), listed above ({check_seg_command(root, dataset)} lists "
                        "them too); fix them and run again")


def split_context(dataset: SegmentationDataset, settings: EvalSettings, precision: Precision) -> Dict[str, Any]:
    """The keys of ``metrics.json`` that say what was evaluated and how."""
    return {"split": dataset.split, "split_file": dataset.split_file, "dataset": dataset.layout,
            "data_root": dataset.root, "test": {**settings.record(), "precision": precision.name}}


def _overlay_name(index: int, name: str) -> str:
    return f"{index:05d}_{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:80]}.png"


def write_overlays(segmentor: nn.Module, dataset: SegmentationDataset, count: int, folder: Path,
                   settings: EvalSettings, device: torch.device, precision: Optional[Precision] = None
                   ) -> List[Path]:
    """Prediction and ground truth over the first ``count`` images of ``dataset`` as
    ``folder/NNNNN_<name>.png`` (``unip.seg.figures.save_overlay``); returns the paths written."""
    from unip.seg.figures import save_overlay

    paths = []
    for index in range(min(count, len(dataset))):
        raw = dataset.load(index)  # decoded once: the overlay shows it, the transform feeds the model
        item = dataset.transform(dict(raw)) if dataset.transform is not None else raw
        with torch.no_grad():
            pred = predict_labels(segmentor, item["image"][None].to(device), item["label"].shape, settings, precision)
        path = folder / _overlay_name(index, str(item["name"]))
        folder.mkdir(parents=True, exist_ok=True)
        save_overlay(raw["image"].permute(1, 2, 0).numpy(), pred[0].cpu().numpy(), raw["label"].numpy(),
                     dataset.classes, dataset.palette, str(path), title=f"{dataset.layout} {dataset.split}: "
                     f"{item['name']}")
        paths.append(path)
    return paths


def check_outputs(out: str) -> None:
    """``ConfigError`` before any work when ``out`` cannot take the report: a file, a training run's folder
    (a ``unip finetune`` metrics.json, or a run's log), or files of the report's names that an earlier
    ``unip evaluate`` did not write."""
    out_folder(out, "--out")
    metrics, log, inside = os.path.join(out, METRICS_FILE), os.path.join(out, LOG_FILE), os.path.join(out, "eval")
    if metrics_writer(metrics) == "finetune":
        raise ConfigError(f"{metrics}: holds the test metrics of a unip finetune run, which evaluate would replace; "
                          f"choose another --out, e.g. {inside}")
    if os.path.lexists(log):
        raise ConfigError(f"--out {out}: is a training run's folder ({log}); evaluate would mix its report with the "
                          f"run's files: choose another --out, e.g. {inside}")
    claim([metrics], lambda path: metrics_writer(path) == "evaluate", "--out")
    claim([os.path.join(out, CONFUSION_FILE)], is_our_png, "--out")
    claim_folder(os.path.join(out, OVERLAY_DIR), _OVERLAY_NAME, "--out")


def write_report(out: Path, document: Dict[str, Any], result: EvalResult, segmentor: nn.Module,
                 dataset: SegmentationDataset, settings: EvalSettings, device: torch.device,
                 precision: Precision, overlays: int) -> List[Path]:
    """``metrics.json``, ``confusion.png`` and the overlays into ``out`` (rank 0); returns the paths.

    The overlays are written into a folder beside ``overlays/`` that then replaces it as a whole
    (``unip.atomic.replace_folder``): ``overlays/`` shows this evaluation's images only, and none with
    ``overlays=0``."""
    from unip.seg.figures import save_confusion

    out.mkdir(parents=True, exist_ok=True)
    files = [write_metrics(out / METRICS_FILE, document)]
    title = f"{dataset.layout} {dataset.split} ({result.images} images): mIoU {result.metrics['mIoU']:.2f}"
    files.append(Path(save_confusion(result.confusion, dataset.classes, str(out / CONFUSION_FILE), title)))
    _remove_stale_overlay_folders(out)
    staging = temporary_path(out / OVERLAY_DIR)
    try:
        written = write_overlays(segmentor, dataset, overlays, staging, settings, device, precision)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if written:
        replace_folder(staging, out / OVERLAY_DIR)
    elif (out / OVERLAY_DIR).is_dir():  # checked by ``check_outputs``: only an earlier evaluation's overlays
        shutil.rmtree(out / OVERLAY_DIR)
    return files + [out / OVERLAY_DIR / path.name for path in written]


def _remove_stale_overlay_folders(out: Path) -> None:
    """Delete overlay folders that a killed evaluation left beside ``overlays/`` (``.overlays.tmp-<pid>``,
    ``.overlays.old-<pid>``) when they hold nothing but overlay figures."""
    for entry in out.iterdir():
        if _STALE_OVERLAYS.match(entry.name) and entry.is_dir() and not entry.is_symlink() \
                and not foreign_names(str(entry), _OVERLAY_NAME):
            shutil.rmtree(entry, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the verb
def evaluate_checkpoint(checkpoint: str, data: str, dataset: str = "auto", split: str = "test", *,
                        out: Optional[str] = None, flip: bool = False, scales: Sequence[float] = (1.0,),
                        batch_windows: bool = True, batch_size: int = 1, workers: int = 2, device: str = "auto",
                        precision: str = "auto", overlays: int = 4, check_data: bool = False,
                        progress: bool = True) -> EvaluationReport:
    """Evaluate ``checkpoint`` on ``split`` of the data set at ``data`` (module docstring); under torchrun on
    every rank. Returns an ``EvaluationReport`` (the same document on every rank; files only on rank 0).
    Raises ``CheckpointError`` / ``DataError`` / ``ConfigError`` on bad input, before any work where it can."""
    if out is not None:
        check_outputs(out)
    dist = init_distributed(device)
    lock = NO_LOCK
    try:
        lock = take(out, "unip evaluate", enabled=dist.is_main and out is not None)  # until the last file is written
        segmentor = load_segmentor(checkpoint)
        pipeline = InferencePipeline.of(segmentor).with_augmentation(flip, scales)
        data_set = open_segmentation_dataset(data, dataset, split, pipeline.transform())
        check_classes(segmentor, data_set, checkpoint)
        if check_data:
            check_data_once(data, data_set.layout, [split], dist, progress=progress)
        settings = EvalSettings(pipeline, batch_windows=batch_windows, batch_size=batch_size, num_workers=workers)
        run_precision = resolve_precision(precision, dist.device)
        segmentor = segmentor.to(dist.device).eval()
        if dist.is_main:
            logger.info("evaluating %s on %s (%s, %d images, %d classes) with %s windows %d/%d on %s (%s)%s",
                        checkpoint, data_set.split_file, data_set.layout, len(data_set), data_set.num_classes,
                        "batched" if batch_windows else "one-at-a-time", pipeline.crop, pipeline.stride,
                        dist.device, run_precision.name, f" over {dist.world_size} processes"
                        if dist.world_size > 1 else "")
        result = evaluate_split(segmentor, data_set, settings, dist.device, run_precision,
                                progress=dist.is_main and progress, desc=f"evaluate {split}")
        document = metrics_document(result, data_set.classes, **split_context(data_set, settings, run_precision),
                                    checkpoint=str(checkpoint), step=segmentor.meta.get("step"),
                                    model=describe_model(segmentor))
        files = []
        if dist.is_main and out is not None:
            files = write_report(Path(out), document, result, segmentor, data_set, settings, dist.device,
                                 run_precision, overlays)
        return EvaluationReport(document, metrics_table(document), files, dist.is_main)
    finally:
        lock.release()
        cleanup()


__all__ = ["EvaluationReport", "check_classes", "check_data_once", "evaluate_checkpoint", "split_context",
           "write_overlays", "write_report"]
