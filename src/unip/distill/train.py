"""NMI-HAD pre-training: the entry point ``train(config)`` behind ``unip pretrain``.

One optimiser step: the frozen teacher gives its distilled block's attention logits, the student gives its
last block's logits (all earlier blocks run fused SDPA, the last block computes only q·kᵀ), and the
student is updated on ``attention_distill_loss``. Everything else (process group, AdamW groups, warm-up
+ half-cosine lr, AMP, accumulation, checkpoints and exact resume, logs, progress) comes from
``unip.engine``.

Effective batch = ``optim.batch_size`` (per process) × ``optim.accum_iter`` × world size; with
``optim.effective_batch`` set, ``accum_iter`` is derived from it. Peak lr = ``optim.blr`` × effective
batch / 256 unless ``optim.lr`` is given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from unip.checkpoint import MAX_DEPTH, MAX_WIDTH
from unip.data.transforms import normalize_batch
from unip.distill.data import build_transform, crop_transform, describe_skipped, open_pretrain_images, take
from unip.distill.loss import LOSS_KINDS, attention_distill_loss
from unip.distill.teacher import Teacher, fit_to_grid
from unip.engine import checkpointing
from unip.engine.config import Config, Rule, build_config, dump_config, flag, integer, number, numbers, text
from unip.engine.data import batches_per_epoch, build_loader, set_loader_epoch
from unip.engine.distributed import DistInfo, barrier, cleanup, init_distributed
from unip.engine.logging import MetricLogger
from unip.engine.loop import PRECISIONS, Precision, resolve_precision, train_step
from unip.engine.optim import build_adamw
from unip.engine.progress import postfix, progress_bar
from unip.engine.seeding import seed_everything, step_seed
from unip.engine.schedule import set_lr, warmup_cosine
from unip.errors import ConfigError
from unip.models import create_model, list_models, preset_config
from unip.models.vit import VisionTransformer

#: Every setting of a pre-training run; presets and ``--set`` may only change these keys.
DEFAULTS: Config = {
    "teacher": {"source": None, "layer": "auto", "auto_images": 256},
    # depth / embed_dim / num_heads: null keeps the preset's (set them for toy-sized students)
    "student": {"model": "unip_vit_small_patch16", "drop_path": 0.1, "depth": None, "embed_dim": None,
                "num_heads": None},
    "data": {"path": None, "input_size": 224, "scale": [0.2, 1.0], "mean": 0.3801, "std": 0.1871,
             "augment": True, "num_workers": 8},
    "optim": {"epochs": 100, "warmup_epochs": 5.0, "blr": 1.5e-4, "lr": None, "min_lr": 0.0,
              "batch_size": 256, "accum_iter": 1, "effective_batch": None, "weight_decay": 0.05,
              "betas": [0.9, 0.95], "clip_grad": None},
    "loss": {"kind": "kl", "temperature": 1.0},
    "run": {"output": "runs/pretrain", "seed": 0, "device": "auto", "precision": "auto", "compile": False,
            "save_every_epochs": 10, "save_every_steps": 0, "keep_checkpoints": 2, "log_every": 20,
            "resume": None, "progress": True},
    "debug": {"nan_at_step": None, "step_delay": 0.0},
}

#: What each setting may hold; ``make_config`` checks the resolved settings against it.
RULES: Dict[str, Rule] = {
    "teacher.source": text(null=True), "teacher.layer": integer(1, MAX_DEPTH, words=("auto",)),
    "teacher.auto_images": integer(1, 100_000), "student.model": text(*list_models()),
    "student.drop_path": number(ge=0, lt=1), "student.depth": integer(1, MAX_DEPTH, null=True),
    "student.embed_dim": integer(1, MAX_WIDTH, null=True), "student.num_heads": integer(1, MAX_WIDTH, null=True),
    "data.path": text(null=True), "data.input_size": integer(16, 4096),
    "data.scale": numbers(2, gt=0, le=1, ascending=True), "data.mean": number(ge=0, le=1),
    "data.std": number(gt=0, le=1), "data.augment": flag(), "data.num_workers": integer(0, 256),
    "optim.epochs": integer(1, 100_000), "optim.warmup_epochs": number(ge=0, le=100_000),
    "optim.blr": number(gt=0, le=1), "optim.lr": number(gt=0, le=1, null=True), "optim.min_lr": number(ge=0, lt=1),
    "optim.batch_size": integer(1, 65_536), "optim.accum_iter": integer(1, 65_536),
    "optim.effective_batch": integer(1, 2**24, null=True), "optim.weight_decay": number(ge=0, le=1),
    "optim.betas": numbers(2, ge=0, lt=1), "optim.clip_grad": number(gt=0, null=True),
    "loss.kind": text(*LOSS_KINDS), "loss.temperature": number(gt=0, le=100),
    "run.output": text(), "run.seed": integer(0, 2**63 - 1), "run.device": text(), "run.precision": text(*PRECISIONS),
    "run.compile": flag(), "run.save_every_epochs": integer(1, 100_000), "run.save_every_steps": integer(0),
    "run.keep_checkpoints": integer(1, 10_000), "run.log_every": integer(1), "run.resume": text(null=True),
    "run.progress": flag(), "debug.nan_at_step": integer(1, null=True), "debug.step_delay": number(ge=0, le=3600),
}

STUDENT_FILE = "student.safetensors"
CHECKPOINT_DIR = "checkpoints"


def make_config(preset: Optional[str] = None, overrides: Tuple[str, ...] = (),
                values: Optional[Dict[str, Any]] = None, origins: Optional[Dict[str, str]] = None) -> Config:
    """``DEFAULTS`` ← preset (name under ``configs/pretrain/`` or a YAML path) ← ``values`` ← ``overrides``,
    checked against ``RULES``; ``origins`` names where ``values`` came from (e.g. ``--epochs``)."""
    return build_config(DEFAULTS, preset, overrides, kind="pretrain", values=values, rules=RULES, origins=origins)


@dataclass
class TrainResult:
    """Where the distilled student was written, how many optimiser steps the run has, its last loss."""

    student: Path
    steps: int
    last_loss: float


class StudentLogits(nn.Module):
    """``forward(images)`` → the student's last-block logits ``[B, heads, N, N]`` (what DDP wraps)."""

    def __init__(self, student: VisionTransformer) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor) -> Tensor:
        return self.student.attention_logits(images, self.student.depth)


def freeze_unused(student: VisionTransformer) -> None:
    """Freeze what the loss never reaches: the last block's value path (proj, MLP, norm2, layer scales)
    and the final norm. DDP then needs no unused-parameter search. (The value rows of the fused qkv
    projection stay trainable; their gradient is zero.)"""
    last = student.blocks[-1]
    for module in (last.attn.proj, last.ls1, last.norm2, last.mlp, last.ls2, student.norm):
        module.requires_grad_(False)


def mask_key_bias_grads(student: VisionTransformer) -> None:
    """Zero the gradient of every block's key bias (the middle third of ``qkv.bias``).

    Adding a bias to every key shifts each attention row by a constant, which softmax ignores: its true
    gradient is 0, and what backward computes is rounding noise. Adam would normalise that noise into
    lr-sized random steps that differ between runs (e.g. 1 vs 2 processes); masking keeps runs
    reproducible and changes nothing else."""
    for block in student.blocks:
        bias = block.attn.qkv.bias
        if bias is None:
            continue
        dim = bias.shape[0] // 3
        mask = torch.ones_like(bias)
        mask[dim:2 * dim] = 0
        bias.register_hook(lambda grad, mask=mask: grad * mask)


# -------------------------------------------------------------------------------------------- set-up
def batch_plan(optim: Config, world_size: int) -> Tuple[int, int, float]:
    """``(accum_iter, effective_batch, peak_lr)`` from the optimiser settings and the world size."""
    batch = int(optim["batch_size"])
    accum = int(optim["accum_iter"])
    if optim["effective_batch"]:
        per_step = batch * world_size
        if optim["effective_batch"] % per_step:
            raise ConfigError(f"optim.effective_batch={optim['effective_batch']} is not a multiple of "
                              f"batch_size × processes = {batch} × {world_size}; change optim.batch_size")
        derived = optim["effective_batch"] // per_step
        if accum not in (1, derived):
            raise ConfigError(f"optim.accum_iter={accum} contradicts optim.effective_batch="
                              f"{optim['effective_batch']} (which gives {derived} on {world_size} process(es)); "
                              "drop one of them (--set optim.effective_batch=null)")
        accum = derived
    if batch < 1 or accum < 1:
        raise ConfigError(f"optim.batch_size ({batch}) and optim.accum_iter ({accum}) must be at least 1")
    effective = batch * accum * world_size
    lr = optim["lr"] if optim["lr"] is not None else optim["blr"] * effective / 256
    return accum, effective, float(lr)


def build_teacher(config: Config, patch: int, dataset_path: str, dist: DistInfo,
                  precision: Precision) -> Tuple[Teacher, str]:
    """Load the teacher, choose its layer (``auto``: NMI profile of the training images), cut it there.

    Returns the teacher and a line describing the choice."""
    from unip.checkpoint import load_model

    teach = config["teacher"]
    if not teach["source"]:
        raise ConfigError("no teacher: pass --teacher SOURCE (a checkpoint file or timm:<name>)")
    model = fit_to_grid(load_model(teach["source"]), int(config["data"]["input_size"]), patch).to(dist.device)
    layer = teach["layer"]
    if layer == "auto":
        layer, why = auto_layer(model, config, dataset_path, precision,
                                progress=dist.is_main and bool(config["run"]["progress"]))
    elif isinstance(layer, int) and not isinstance(layer, bool):
        why = f"teacher layer {layer} (given)"
    else:
        raise ConfigError(f"teacher.layer must be a layer number or 'auto', got {layer!r}")
    return Teacher(model, layer, patch).to(dist.device), why


def auto_layer(model: VisionTransformer, config: Config, dataset_path: str, precision: Precision,
               progress: bool) -> Tuple[int, str]:
    """The analysis module's NMI-guided choice over ``teacher.auto_images`` training images (on the
    model's device, under the run's autocast)."""
    from unip.analysis.patterns import explain_distill_layer
    from unip.analysis.profile import profile_model

    data = config["data"]
    size = model.config["img_size"][0]
    dataset = open_pretrain_images(dataset_path, build_transform(size, data["mean"], data["std"], augment=False))
    images = take(dataset, int(config["teacher"]["auto_images"]), seed=int(config["run"]["seed"]))
    profile = profile_model(model, images, batch_size=16, autocast_dtype=precision.dtype, progress=progress,
                            source="teacher")
    choice = explain_distill_layer(profile)
    return choice.layer, f"teacher {choice}, chosen by NMI over {len(images)} images"


def build_student(config: Config, heads: int, device: torch.device) -> VisionTransformer:
    """The student preset with ``last_heads`` = the teacher block's heads, built for the input size."""
    size = int(config["data"]["input_size"])
    spec = config["student"]
    shape = {key: spec[key] for key in ("depth", "embed_dim", "num_heads") if spec[key] is not None}
    student = create_model(spec["model"], last_heads=heads, img_size=size,
                           drop_path_rate=float(spec["drop_path"]), **shape)
    if size % student.patch_size:
        raise ConfigError(f"data.input_size={size} is not a multiple of the student's patch {student.patch_size}")
    freeze_unused(student)
    student = student.to(device)
    mask_key_bias_grads(student)
    return student


# -------------------------------------------------------------------------------------------- the run
class Run:
    """State of one pre-training run: models, optimiser, data, position. ``fit()`` runs it to the end."""

    def __init__(self, config: Config, dist: DistInfo) -> None:
        self.config, self.dist = config, dist
        run, optim = config["run"], config["optim"]
        self.output = Path(run["output"])
        self.ckpt_dir = self.output / CHECKPOINT_DIR
        seed_everything(int(run["seed"]) + dist.rank)
        if config["loss"]["kind"] not in LOSS_KINDS:
            raise ConfigError(f"loss.kind={config['loss']['kind']!r}: choose one of {', '.join(LOSS_KINDS)}")
        self.precision: Precision = resolve_precision(run["precision"], dist.device)
        if dist.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        self.accum, self.effective_batch, self.peak_lr = batch_plan(optim, dist.world_size)

        data = config["data"]
        patch = int(preset_config(config["student"]["model"])["patch_size"])
        self.teacher, self.teacher_why = build_teacher(config, patch, data["path"], dist, self.precision)
        if self.precision.dtype is torch.bfloat16:
            self.teacher.to(torch.bfloat16)  # frozen: no per-step weight casts, half the memory
        self.student = build_student(config, self.teacher.num_heads, dist.device)
        self.model: nn.Module = StudentLogits(self.student)
        if dist.distributed:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.forward_student = self.model
        self.forward_teacher: nn.Module = self.teacher
        if run["compile"]:
            self.forward_student = torch.compile(self.model)
            self.forward_teacher = torch.compile(self.teacher)
        self.optimizer = build_adamw(self.student, self.peak_lr, float(optim["weight_decay"]),
                                     tuple(optim["betas"]))
        self.scaler = self.precision.grad_scaler()

        transform = crop_transform(int(data["input_size"]), bool(data["augment"]), data["scale"])
        dataset = open_pretrain_images(data["path"], transform)  # uint8 crops, normalised on the device
        skipped = describe_skipped(dataset)
        if skipped and dist.is_main:
            print(skipped, flush=True)
        self.loader = build_loader(dataset, int(optim["batch_size"]), rank=dist.rank, world_size=dist.world_size,
                                   seed=int(run["seed"]), num_workers=int(data["num_workers"]),
                                   pin_memory=dist.device.type == "cuda")
        batches = batches_per_epoch(len(dataset), int(optim["batch_size"]), dist.world_size)
        self.steps_per_epoch = batches // self.accum
        if self.steps_per_epoch < 1:
            raise ConfigError(f"{data['path']}: {len(dataset)} images are fewer than one step of "
                              f"{self.effective_batch} (batch × accumulation × processes); lower optim.batch_size "
                              "or optim.accum_iter")
        self.total_steps = int(optim["epochs"]) * self.steps_per_epoch
        self.warmup_steps = int(round(float(optim["warmup_epochs"]) * self.steps_per_epoch))
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.last_loss = float("nan")
        self.log = MetricLogger(self.output, enabled=dist.is_main)  # only once the set-up has succeeded
        self.log.log(0, {"teacher_layer": self.teacher.layer, "teacher_layer_reason": self.teacher_why},
                     prefix="setup")

    # ------------------------------------------------------------------------------------ pieces
    def loss_fn(self, images: Tensor) -> Tensor:
        data = self.config["data"]
        images = normalize_batch(images.to(self.dist.device, non_blocking=True), data["mean"], data["std"])
        target = self.forward_teacher(images)
        logits = self.forward_student(images)
        loss = attention_distill_loss(logits, target, self.config["loss"]["kind"],
                                      float(self.config["loss"]["temperature"]))
        if self.config["debug"]["nan_at_step"] == self.step + 1:  # test hook: a loss that blows up
            loss = loss * float("nan")
        return loss

    def resume(self) -> None:
        path = checkpointing.resolve_resume(self.config["run"]["resume"], self.ckpt_dir)
        if path is None:
            return
        state = checkpointing.load_state(path, self.student, self.optimizer, self.scaler)
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self._print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, step {self.step_in_epoch})")

    def save(self, epoch: int, step_in_epoch: int) -> None:
        if self.dist.is_main:
            checkpointing.save_state(self.ckpt_dir, self.step, self.student, self.optimizer, self.scaler,
                                     epoch=epoch, step_in_epoch=step_in_epoch,
                                     extra={"config": self.config, "loss": self.last_loss},
                                     keep=int(self.config["run"]["keep_checkpoints"]))
        barrier()

    def micro_batches(self, batches: Iterator[Tensor]) -> List[Tensor]:
        return [next(batches) for _ in range(self.accum)]

    def _print(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        run, optim = self.config["run"], self.config["optim"]
        self.resume()
        if self.dist.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "config.yaml").write_text(dump_config(self.config), encoding="utf-8")
        self._print(f"{self.teacher_why}; student {self.config['student']['model']} (last block "
                    f"{self.teacher.num_heads} heads); effective batch {self.effective_batch} = "
                    f"{optim['batch_size']} × {self.accum} × {self.dist.world_size}; peak lr {self.peak_lr:.3g}; "
                    f"{self.total_steps} steps; {self.precision.name} on {self.dist.device}")
        bar = progress_bar(self.total_steps, self.step, "pretrain", enabled=self.dist.is_main and run["progress"])
        self.model.train()
        try:
            self._epochs(bar)
        finally:
            bar.close()
            self.log.close()
        path = self.save_student()
        return TrainResult(path, self.step, self.last_loss)

    def _epochs(self, bar) -> None:
        run, optim = self.config["run"], self.config["optim"]
        log_every, every_steps = max(1, int(run["log_every"])), int(run["save_every_steps"])
        window_start, window_steps = time.perf_counter(), 0
        while self.epoch < int(optim["epochs"]):
            set_loader_epoch(self.loader, self.epoch, self.step_in_epoch * self.accum)
            batches = iter(self.loader)
            while self.step_in_epoch < self.steps_per_epoch:
                lr = warmup_cosine(self.step, self.total_steps, self.warmup_steps, self.peak_lr,
                                   float(optim["min_lr"]))
                set_lr(self.optimizer, lr)
                torch.manual_seed(step_seed(int(run["seed"]), self.dist.rank, self.step))
                result = train_step(self.model, self.loss_fn, self.micro_batches(batches), self.optimizer,
                                    self.scaler, self.precision, optim["clip_grad"],
                                    where=f"at step {self.step + 1} (epoch {self.epoch})")
                self.step += 1
                self.step_in_epoch += 1
                self.last_loss = result.loss
                window_steps += 1
                bar.update(1)
                if self.step % log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                    elapsed = time.perf_counter() - window_start
                    metrics = {"loss": result.loss, "lr": lr, "grad_norm": float(result.grad_norm),
                               "images_per_s": window_steps * self.effective_batch / max(elapsed, 1e-9),
                               "epoch": self.epoch}
                    self.log.log(self.step, metrics)
                    bar.set_postfix_str(postfix({k: metrics[k] for k in ("loss", "lr", "images_per_s")}))
                    window_start, window_steps = time.perf_counter(), 0
                if every_steps and self.step % every_steps == 0 and self.step_in_epoch < self.steps_per_epoch:
                    self.save(self.epoch, self.step_in_epoch)
                if self.config["debug"]["step_delay"]:
                    time.sleep(float(self.config["debug"]["step_delay"]))
            self.epoch += 1
            self.step_in_epoch = 0
            if self.epoch % max(1, int(run["save_every_epochs"])) == 0 or self.epoch == int(optim["epochs"]):
                self.save(self.epoch, 0)

    def save_student(self) -> Path:
        """The distilled student as a self-describing safetensors file (``unip finetune --pretrained``)."""
        path = self.output / STUDENT_FILE
        if self.dist.is_main:
            from unip.checkpoint import save_checkpoint

            data = self.config["data"]
            meta = {"preset": self.config["student"]["model"], "teacher": str(self.config["teacher"]["source"]),
                    "teacher_layer": self.teacher.layer, "teacher_heads": self.teacher.num_heads,
                    "normalization": {"mean": [data["mean"]] * 3, "std": [data["std"]] * 3},
                    "pretrain": {"steps": self.step, "epochs": self.epoch, "loss": self.last_loss,
                                 "effective_batch": self.effective_batch}}
            save_checkpoint(self.student, path, meta)
            self._print(f"saved the student to {path}")
        barrier()
        return path


def train(config: Config) -> TrainResult:
    """Run NMI-HAD pre-training as configured (see ``DEFAULTS``); under torchrun, on every rank.

    Returns a ``TrainResult``; raises ``ConfigError``/``DataError``/``CheckpointError`` on bad input and
    ``unip.engine.loop.NonFiniteLossError`` when the loss diverges (the last checkpoint is kept)."""
    dist = init_distributed(config["run"]["device"])
    try:
        return Run(config, dist).fit()
    finally:
        cleanup()
