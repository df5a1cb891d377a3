"""Segmentation fine-tuning and linear probing: the entry point ``finetune(config)`` behind ``unip finetune``.

``SegmentationTask`` says only what is specific to segmentation — the segmentor (``build_segmentor`` on the
pre-trained backbone), the mmseg 0.x loss (decode CE + 0.4 × auxiliary CE, 255 ignored), the data (the
recipe's joint transforms), layer-wise lr decay, and the evaluation (sliding windows on the val split, the
confusion matrix reduced over ranks). The loop — process group, AdamW groups, poly schedule with linear
warm-up, fp16 AMP with a grad scaler, accumulation, SyncBN under multi-GPU DDP, evaluation every
``run.eval_every`` steps keeping ``checkpoints/best.safetensors`` by mIoU, atomic states and exact resume,
JSONL + TensorBoard logs, progress bar — is ``unip.engine.trainer.Trainer``.

At the end ``finetune`` evaluates the best model on the test split and writes ``<out>/metrics.json``
(``unip.seg.results``) next to the final ``<out>/segmentor.safetensors``.

Every number of ``DEFAULTS`` is the release's recipe for UNIP-S on SODA (docs/recipe.md#fine-tuning); the presets
under ``configs/finetune/`` and ``configs/linprobe/`` state it for each data set and model size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from unip.checkpoint import MAX_DEPTH, MAX_WIDTH, is_our_checkpoint
from unip.data.datasets import DATASETS, detect_dataset, open_segmentation_dataset
from unip.data.segmentation import SegmentationDataset
from unip.data.seg_transforms import seg_train_transform
from unip.engine import checkpointing
from unip.engine.config import Config, Rule, build_config, flag, integer, number, numbers, one_of, text
from unip.engine.distributed import DistInfo, cleanup, init_distributed, unwrap_model
from unip.engine.run_folder import check_run_folder
from unip.engine.settings import training_defaults, training_rules
from unip.engine.trainer import Task, TrainContext, Trainer, hold_run_folder, run_settings, settle_accumulation
from unip.errors import ConfigError, DataError
from unip.fingerprint import listing_fingerprint, weights_fingerprint
from unip.models import list_models
from unip.models.heads import HEADS, probe_heads
from unip.models.necks import NECKS
from unip.models.presets import PRESETS
from unip.models.segmentor import Segmentor
from unip.outputs import is_our_json
from unip.seg.build import build_segmentor
from unip.seg.checkpoint import load_segmentor, save_segmentor, segmentor_header
from unip.seg.evaluation import EvalSettings, evaluate_split
from unip.seg.layer_decay import layer_decay_lr_scale
from unip.seg.loss import segmentation_losses
from unip.seg.inference import RECIPE_CROP, window_stride
from unip.seg.pipeline import InferencePipeline
from unip.seg.report import check_data_once, split_context
from unip.seg.results import (METRICS_FILE, describe_model, metrics_document, metrics_table, metrics_writer,
                               write_metrics)

logger = logging.getLogger(__name__)

SEGMENTOR_FILE = "segmentor.safetensors"
#: ``model.pretrained`` value that asks for a randomly initialised ``model.backbone``.
RANDOM_INIT = "none"

#: Every setting of a fine-tuning or probing run; presets and ``--set`` may only change these keys. The values are
#: the release's recipe for UNIP-S on SODA (docs/recipe.md#fine-tuning): the engine's run and optim sections
#: (``unip.engine.settings``) made iteration-based with a poly schedule, evaluated by mIoU.
DEFAULTS: Config = training_defaults(
    {
        "model": {
            "pretrained": None,             # backbone source: our pretrain output, a release .pth, MAE/DINO/iBOT/DeiT
                                            # file, timm:NAME[@FILE]; "none": random init of model.backbone
            "backbone": "unip_vit_small_patch16",  # architecture for --pretrained none (and what presets are for)
            "head": "upernet",              # upernet (fine-tuning) or linear (probing: frozen backbone)
            "neck": "llfpn",                # llfpn (the paper's: last block → strides 4..32) or fpn (blocks 4/6/8/12)
            "probe_layer": None,            # linear head on one block only (layer-wise probing, 1-based)
            "last_block_heads": "pretrained",  # pretrained (keep the distilled count), default (the release), or N
            "drop_path": None,              # null: 0.1 (T/S/B), 0.2 (ViT-L)
            "layer_decay": 0.85,            # layer-wise lr decay (1.0: none)
            "channels": None,               # UperNet width; null: the backbone's width
            "auxiliary_head": True,         # FCN on the stride-16 map, loss weight 0.4
        },
        "data": {
            "path": None, "dataset": "auto",
            "crop_size": RECIPE_CROP,       # training crop (512), backbone input size, sliding window
            "scale": [2048, 512],           # resize scale (train: × ratio; test: fit keeping the aspect)
            "ratio_range": [0.5, 2.0],
            "cat_max_ratio": 0.75,          # crop retried until no class covers 75 % (up to 10 tries)
            "flip": 0.5, "photometric": True,
            "mean": 96.9255, "std": 47.8976,  # on 0-255, all three channels
            "num_workers": 4,
            "check": False,                 # decode every image and label of train/val/test first, list every problem
        },
        "eval": {"stride": None,            # sliding-window stride; null: 2/3 of the crop (512 → 341)
                 "batch_size": 1,           # images per evaluation batch (same-sized ones share one forward)
                 "batch_windows": True},    # a batch's windows in one forward (false: one at a time, as the release)
    },
    optim={"iterations": 14400, "warmup_iterations": 1500, "schedule": "poly", "lr": 1e-4, "batch_size": 4,
           "effective_batch": 8},
    run={"output": "runs/finetune", "precision": "fp16", "save_every_epochs": 0, "save_every_steps": 800,
         "log_every": 50, "eval_every": 800, "best_metric": "mIoU"},
    leave_out=("optim.blr",))

#: What each setting may hold; ``make_config`` checks the resolved settings against it.
RULES: Dict[str, Rule] = training_rules(DEFAULTS, {
    "model.pretrained": text(null=True), "model.backbone": one_of(PRESETS), "model.head": one_of(HEADS),
    "model.neck": one_of(NECKS), "model.probe_layer": integer(1, MAX_DEPTH, null=True),
    "model.last_block_heads": integer(1, MAX_WIDTH, words=("pretrained", "default")),
    "model.drop_path": number(ge=0, lt=1, null=True), "model.layer_decay": number(gt=0, le=1),
    "model.channels": integer(1, MAX_WIDTH, null=True), "model.auxiliary_head": flag(),
    "data.path": text(null=True), "data.dataset": one_of(DATASETS, "auto"), "data.crop_size": integer(32, 4096),
    "data.scale": numbers(2, ge=16, le=16384), "data.ratio_range": numbers(2, gt=0, le=16, ascending=True),
    "data.cat_max_ratio": number(gt=0, le=1), "data.flip": number(ge=0, le=1), "data.photometric": flag(),
    "data.mean": number(ge=0, le=255), "data.std": number(gt=0, le=255), "data.num_workers": integer(0, 256),
    "data.check": flag(),
    "eval.stride": integer(1, 4096, null=True), "eval.batch_size": integer(1, 1024), "eval.batch_windows": flag(),
    "optim.lr": number(gt=0, le=1), "run.best_metric": text("mIoU", "mAcc", "aAcc", null=True),
})


def make_config(preset: Optional[str] = None, overrides: Tuple[str, ...] = (),
                values: Optional[Dict[str, Any]] = None, origins: Optional[Dict[str, str]] = None,
                kind: str = "finetune", sources: Optional[Dict[str, str]] = None) -> Config:
    """``DEFAULTS`` ← preset (a name under ``configs/<kind>/``, ``kind`` = ``finetune`` or ``linprobe``, or a
    YAML path) ← ``values`` ← ``overrides``, checked against ``RULES`` and for consistency; ``sources`` is filled
    with where each setting came from (``unip.engine.config.build_config``)."""
    config = build_config(DEFAULTS, preset, overrides, kind=kind, values=values, rules=RULES, origins=origins,
                          sources=sources)
    check_consistency(config)
    settle_accumulation(config)
    return config


def check_consistency(config: Config) -> None:
    """``ConfigError`` for settings that are each valid but do not fit together."""
    model = config["model"]
    if model["probe_layer"] is not None and not HEADS[model["head"]].probe:
        raise ConfigError(f"model.probe_layer={model['probe_layer']} is a probe's setting; add --probe "
                          f"{probe_heads()[0]} (model.head={probe_heads()[0]}) or drop --probe-layer")
    stride = config["eval"]["stride"]
    if stride is not None and stride > config["data"]["crop_size"]:
        crop = config["data"]["crop_size"]
        raise ConfigError(f"eval.stride={stride} is larger than data.crop_size={crop}: the windows would leave gaps; "
                          f"add --set eval.stride=null (2/3 of the crop: {window_stride(crop)}) or a stride <= {crop}")


def training_mode(config: Config) -> str:
    """The head's mode (``fine-tuning``, ``linear probe``), or ``layer-wise probe (block N)`` for a probe of one
    block."""
    model = config["model"]
    kind = HEADS[model["head"]]
    return f"layer-wise probe (block {model['probe_layer']})" if kind.probe and model["probe_layer"] else kind.mode


def stack_crops(items: Sequence[Dict[str, Any]]) -> Tuple[Tensor, Tensor]:
    """Training collate: ``(images [B, 3, H, W] float32, labels [B, H, W] int64)`` of equal-sized crops."""
    return torch.stack([item["image"] for item in items]), torch.stack([item["label"] for item in items])


@dataclass
class FinetuneResult:
    """The final segmentor, ``metrics.json`` (best model on the test split) with its document and table, the
    optimiser steps of the run, the best evaluation (``best.json``'s record) and whether this is rank 0."""

    segmentor: Path
    metrics_file: Path
    metrics: Dict[str, Any]
    table: str
    steps: int
    best: Optional[Dict[str, Any]]
    is_main: bool = True


# -------------------------------------------------------------------------------------------- the task
class SegmentationTask(Task):
    """Fine-tuning (LL-FPN + UperNet + FCN auxiliary head) or linear probing on ``unip.engine.trainer``."""

    model_file = SEGMENTOR_FILE

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mode = training_mode(config)
        self.name = "linprobe" if HEADS[config["model"]["head"]].probe else "finetune"
        data = config["data"]
        if not data["path"]:
            raise ConfigError("no data: pass --data ROOT (a SODA, MFNet, SCUT-Seg or folder data set)")
        if not config["model"]["pretrained"]:
            raise ConfigError(f"no backbone: pass --pretrained SOURCE (our pretrain output, a release or MAE/DINO/"
                              f"iBOT/DeiT checkpoint, timm:NAME[@FILE]) or --pretrained {RANDOM_INIT} for a randomly "
                              f"initialised {config['model']['backbone']}")
        #: the test pipeline the segmentor files record; the evaluations here read it back from that record, the way
        #: ``unip evaluate`` does, so that both compute on identical inputs
        self.test_meta: Dict[str, Any] = InferencePipeline(
            scale=tuple(int(v) for v in data["scale"]), mean=(float(data["mean"]),) * 3,  # type: ignore[arg-type]
            std=(float(data["std"]),) * 3, crop=int(data["crop_size"]), stride=config["eval"]["stride"]).to_meta()
        self.eval_settings = EvalSettings(InferencePipeline.from_meta(self.test_meta),
                                          batch_size=int(config["eval"]["batch_size"]),
                                          batch_windows=bool(config["eval"]["batch_windows"]),
                                          num_workers=int(data["num_workers"]))
        self.lr_scale_fn = None

    # ---------------------------------------------------------------------------- data
    def open_split(self, split: str) -> SegmentationDataset:
        """Split ``split`` of the data set with the training (``train``) or test transform of the settings."""
        data = self.config["data"]
        scale = tuple(int(v) for v in data["scale"])
        if split == "train":
            transform = seg_train_transform(
                scale=scale, ratio_range=tuple(data["ratio_range"]), crop_size=int(data["crop_size"]),  # type: ignore
                cat_max_ratio=float(data["cat_max_ratio"]), flip_p=float(data["flip"]),
                photometric=bool(data["photometric"]), mean=float(data["mean"]), std=float(data["std"]))
        else:
            transform = self.eval_settings.pipeline.transform()
        return open_segmentation_dataset(data["path"], data["dataset"], split, transform)

    def check_layout(self) -> None:
        """``ConfigError`` when ``data.dataset`` (e.g. from a preset) names another layout than the one ``--data``
        has (a SODA preset on MFNet data), with the option that fixes it."""
        data = self.config["data"]
        wanted = str(data["dataset"]).lower()
        if wanted == "auto":
            return
        try:
            found = detect_dataset(os.path.abspath(os.path.expanduser(str(data["path"]))))
        except DataError:  # not recognisable: opening it reports what is missing
            return
        # reading another layout as "folder" is fine (its classes.yaml names the classes); the reverse is not: a
        # folder set opened as SODA/MFNet/SCUT would silently train on that data set's class list
        if found != wanted and wanted != "folder":
            fix = "" if found == "folder" else f", or use a {found}_* preset"
            raise ConfigError(f"{data['path']} looks like a {found} data set, but data.dataset={wanted} (the preset's "
                              f"or --dataset); pass --dataset {found} (or auto){fix}")

    def setup(self, ctx: TrainContext) -> None:
        """Open the train, val and test splits (every listed file must exist: a missing test file fails now,
        not after training)."""
        self.check_layout()
        self.train_set = self.open_split("train")
        self.val_set = self.open_split("val")
        self.test_set = self.open_split("test")

    def train_dataset(self, ctx: TrainContext) -> Dataset:
        return self.train_set

    def train_collate(self):
        return stack_crops

    def data_source(self, ctx: TrainContext) -> str:
        return f"{self.train_set.split_file} ({self.train_set.layout} training split)"

    # ---------------------------------------------------------------------------- model
    def backbone_source(self) -> str:
        """What ``build_segmentor`` reads: the pre-trained source, or the ``model.backbone`` preset for random init."""
        source = str(self.config["model"]["pretrained"])
        return self.config["model"]["backbone"] if source.lower() == RANDOM_INIT else source

    def random_init(self) -> bool:
        return self.backbone_source() in list_models() and not Path(self.backbone_source()).exists()

    def build_model(self, ctx: TrainContext) -> Segmentor:
        model, data = self.config["model"], self.config["data"]
        if self.random_init() and ctx.dist.is_main:
            logger.warning("backbone: RANDOM INITIALISATION of %s (--pretrained %s): no pre-trained weights are "
                           "loaded; the result measures the architecture alone", self.backbone_source(),
                           model["pretrained"])
        classes = self.train_set
        meta = {**self.test_meta, "class_names": list(classes.classes),
                "palette": [list(c) for c in classes.palette], "dataset": classes.layout,
                "training": {"mode": self.mode, "data_root": classes.root,
                             "iterations": self.config["optim"]["iterations"]}}
        probe = HEADS[model["head"]].probe
        try:
            segmentor = build_segmentor(
                classes.num_classes, self.backbone_source(), neck=model["neck"], head=model["head"],
                probe_layers=[int(model["probe_layer"])] if model["probe_layer"] else None,
                img_size=int(data["crop_size"]), drop_path_rate=model["drop_path"],
                last_block_heads=model["last_block_heads"], auxiliary_head=bool(model["auxiliary_head"]),
                channels=model["channels"], meta=meta)
        except ConfigError as err:
            where = f"model.probe_layer={model['probe_layer']} (--probe-layer) on " if model["probe_layer"] else ""
            raise ConfigError(f"{where}{self.backbone_source()}: {err}") from None
        patch, crop = segmentor.backbone.patch_size, int(data["crop_size"])
        if crop % patch:
            raise ConfigError(f"data.crop_size={crop} is not a multiple of the backbone's patch size {patch} "
                              f"({self.backbone_source()}); choose e.g. {max(crop // patch, 2) * patch}")
        if not probe and float(model["layer_decay"]) != 1.0:
            self.lr_scale_fn = layer_decay_lr_scale(segmentor.backbone.depth, float(model["layer_decay"]))
        self.loss_weights = segmentor.loss_weights
        # as loaded, before training; a random initialisation differs per rank (seed + rank) and is set by run.seed
        self.backbone_fingerprint = ("random initialisation" if self.random_init()
                                     else weights_fingerprint(segmentor.backbone.state_dict()))
        self.backbone_info = describe_model(segmentor)
        return segmentor.to(ctx.device)

    def lr_scale(self, name: str) -> float:
        """Layer-wise lr decay (fine-tuning): ``rate ** (depth + 1 - layer_id(name))``; 1 for probes
        (docs/recipe.md#layer-wise-lr-decay)."""
        return self.lr_scale_fn(name) if self.lr_scale_fn is not None else 1.0

    def compile(self, module: nn.Module, model: nn.Module, options: Dict[str, Any]) -> nn.Module:
        """Regional compilation of the backbone's blocks (one graph for all of them); neck and heads stay eager."""
        model.backbone.compile_blocks(**options)  # type: ignore[operator, union-attr]
        return module

    # ---------------------------------------------------------------------------- loss and evaluation
    def loss(self, module: nn.Module, batch: Tuple[Tensor, Tensor], ctx: TrainContext):
        images, labels = (t.to(ctx.device, non_blocking=True) for t in batch)
        losses = segmentation_losses(module(images), labels, self.loss_weights)
        return sum(losses.values()), losses

    def evaluate(self, model: nn.Module, ctx: TrainContext) -> Dict[str, Any]:
        """mIoU / mAcc / aAcc and per-class IoU / Acc of ``model`` on the val split (sliding windows)."""
        result = evaluate_split(model, self.val_set, self.eval_settings, ctx.device, ctx.precision,
                                progress=ctx.dist.is_main and bool(self.config["run"]["progress"]),
                                desc=f"eval {self.val_set.split}")
        return result.scalars_and_lists()

    def saved_record(self, ctx: TrainContext) -> Dict[str, Any]:
        """The step and the last validation metrics, recorded in the segmentor file's header."""
        record: Dict[str, Any] = {"step": ctx.step}
        if ctx.last_eval:
            record["val"] = {k: ctx.last_eval[k] for k in ("mIoU", "mAcc", "aAcc") if k in ctx.last_eval}
        return record

    def model_header(self, model: nn.Module, ctx: TrainContext) -> Optional[str]:
        return segmentor_header(model, self.saved_record(ctx))  # type: ignore[arg-type]

    def save_model(self, model: nn.Module, path: Path, ctx: TrainContext) -> None:
        """The segmentor with its config, classes, palette, normalisation and test window (``load_segmentor``)."""
        save_segmentor(model, path, self.saved_record(ctx))  # type: ignore[arg-type]

    def describe(self, ctx: TrainContext) -> str:
        source = self.backbone_source() + (" (RANDOM INIT)" if self.random_init() else "")
        return (f"{self.mode} of {source} on {self.train_set.root} ({self.train_set.layout}: "
                f"{len(self.train_set)} train / {len(self.val_set)} val / {len(self.test_set)} test images, "
                f"{self.train_set.num_classes} classes)")

    def resume_record(self, ctx: TrainContext) -> Dict[str, Any]:
        """What the segmentor file describes: backbone, data set, crop, classes, training mode, and the
        architecture choices that keep every weight's shape (the heads of each block, the neck); the backbone and
        the images by content (``unip.fingerprint``), so a run resumes after its files moved."""
        files = [path for sample in self.train_set.samples for path in (sample.image, sample.label) if path]
        return {"heads per block": self.backbone_info["backbone"]["heads_per_block"],
                "model.neck": self.backbone_info["neck"],
                "backbone weights (digest)": self.backbone_fingerprint,
                "training images (file list digest)": f"{len(self.train_set)} images, {listing_fingerprint(files)}",
                "data set layout": self.train_set.layout, "data.crop_size": int(self.config["data"]["crop_size"]),
                "classes": self.train_set.num_classes, "mode": self.mode}

    def legacy_resume_record(self, ctx: TrainContext) -> Dict[str, Any]:
        """What states written before the content digests recorded: the backbone's path and the data set root."""
        return {"model.pretrained": str(self.config["model"]["pretrained"]), "data set root": self.train_set.root}

    def setup_record(self, ctx: TrainContext) -> Dict[str, Any]:
        return {"mode": self.mode, "pretrained": self.config["model"]["pretrained"],
                "random_init": self.random_init(), "dataset": self.train_set.layout,
                "classes": list(self.train_set.classes), "train_images": len(self.train_set),
                "val_images": len(self.val_set), "heads_per_block": self.backbone_info["backbone"]["heads_per_block"]}


# -------------------------------------------------------------------------------------------- the run
def finetune(config: Config) -> FinetuneResult:
    """Run fine-tuning or linear probing as configured (see ``DEFAULTS``); under torchrun, on every rank.

    Trains with ``SegmentationTask`` on the trainer, then evaluates the best model (by val mIoU; the final
    model when nothing was evaluated) on the test split and writes ``<run.output>/metrics.json``. Returns a
    ``FinetuneResult``; raises ``ConfigError``/``DataError``/``CheckpointError`` on bad input (before
    training where it can) and the trainer's non-finite errors when the run diverges."""
    run = run_settings(config)[0]
    check_output(run)
    task = SegmentationTask(config)  # checks the settings before the process group starts
    dist = init_distributed(run["device"])
    try:
        with hold_run_folder(config, dist, "unip finetune"):  # until metrics.json is written
            return _finetune(task, config, dist)
    finally:
        cleanup()


def _finetune(task: SegmentationTask, config: Config, dist: DistInfo) -> FinetuneResult:
    run = run_settings(config)[0]
    if config["data"]["check"]:
        check_data_once(config["data"]["path"], config["data"]["dataset"], ["train", "val", "test"], dist,
                        workers=None, progress=dist.is_main and bool(run["progress"]))
    trainer = Trainer(task, config, dist)
    fit = trainer.fit()
    document = test_best_model(task, trainer, fit.best)
    metrics_path = trainer.output / METRICS_FILE
    if dist.is_main:
        write_metrics(metrics_path, document)
        logger.info("test split of the %s model (step %s): mIoU %.2f; wrote %s", "best" if fit.best else "final",
                    document["step"], document["mIoU"] if document["mIoU"] is not None else float("nan"),
                    metrics_path)
    return FinetuneResult(fit.model_path, metrics_path, document, metrics_table(document), fit.steps, fit.best,
                          dist.is_main)


def check_output(run: Config) -> None:
    """``ConfigError`` unless ``run.output`` may hold this run (``check_run_folder``), and its metrics.json, when
    there is one, is not ``unip evaluate``'s report, which the run would replace."""
    metrics = os.path.join(run["output"], METRICS_FILE)
    if metrics_writer(metrics) == "evaluate":
        raise ConfigError(f"{metrics}: holds the report of unip evaluate, which finetune would replace; choose "
                          "another --out")
    check_run_folder(run["output"], list(DEFAULTS), {SEGMENTOR_FILE: is_our_checkpoint,
                                                     METRICS_FILE: is_our_json(["format", "mIoU"])}, run["resume"])


def test_best_model(task: SegmentationTask, trainer: Trainer, best: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The ``metrics.json`` document of the best model (``checkpoints/best.safetensors``; the final model when
    no evaluation chose one) on the test split; every rank evaluates its share."""
    ctx = trainer.ctx
    if best is not None:
        path = trainer.ckpt_dir / checkpointing.BEST_WEIGHTS
        model: nn.Module = load_segmentor(path).to(ctx.device)
        step = int(best["step"])
    else:
        path, model, step = trainer.output / task.model_file, unwrap_model(trainer.model), ctx.step
    if ctx.dist.is_main:
        logger.info("evaluating %s (step %d) on the %s split", path, step, task.test_set.split)
    result = evaluate_split(model, task.test_set, task.eval_settings, ctx.device, ctx.precision,
                            progress=ctx.dist.is_main and bool(task.config["run"]["progress"]), desc="test")
    best_record = {**best, "split": task.val_set.split} if best else None
    return metrics_document(result, task.test_set.classes, **split_context(task.test_set, task.eval_settings,
                                                                             ctx.precision),
                            checkpoint=str(path), step=step, model=describe_model(model), best=best_record)


__all__ = ["DEFAULTS", "FinetuneResult", "RANDOM_INIT", "RULES", "SEGMENTOR_FILE", "SegmentationTask", "finetune",
           "make_config", "stack_crops", "test_best_model", "training_mode"]
