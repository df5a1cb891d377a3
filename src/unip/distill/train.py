"""NMI-HAD pre-training: the entry point ``train(config)`` behind ``unip pretrain``.

One optimiser step: the frozen teacher gives its distilled block's attention logits, the student gives its
last block's logits (all earlier blocks run fused SDPA, the last block computes only q·kᵀ), and the
student is updated on ``attention_distill_loss``. ``NmiHadTask`` says only that (model, loss, data, the
saved student); the loop itself (process group, AdamW groups, warm-up + half-cosine lr, AMP,
accumulation, checkpoints and exact resume, logs, progress) is ``unip.engine.trainer.Trainer``.

Effective batch = ``optim.batch_size`` (per process) × ``optim.accum_iter`` × world size; with
``optim.effective_batch`` set, ``accum_iter`` is derived from it (one given as well must agree). Peak lr =
``optim.blr`` × effective batch / 256 unless ``optim.lr`` is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from unip.analysis.patterns import explain_distill_layer
from unip.analysis.profile import profile_model
from unip.checkpoint import MAX_DEPTH, MAX_WIDTH, is_our_checkpoint, load_weights, open_model, save_checkpoint
from unip.checkpoint.backbone import checkpoint_header
from unip.data.transforms import INFMIX_MEAN, INFMIX_STD, normalize_batch
from unip.distill.data import (crop_transform, describe_skipped, frame_transform, image_files, open_pretrain_images,
                              take)
from unip.distill.loss import LOSS_KINDS, attention_distill_loss
from unip.distill.teacher import TEACHER_GELUS, TEACHER_PRECISIONS, Teacher, load_teacher_model
from unip.engine.checkpointing import resolve_resume
from unip.engine.config import Config, Rule, build_config, flag, integer, number, numbers, text
from unip.engine.distributed import DistInfo, all_reduce_sum
from unip.engine.logging import LOG_FILE, last_logged
from unip.engine.loop import Precision
from unip.engine.run_folder import CHECKPOINT_DIR, check_run_folder
from unip.engine.settings import training_defaults, training_rules
from unip.engine.trainer import Task, TrainContext, batch_plan, settle_accumulation, train_task
from unip.errors import CheckpointError, ConfigError
from unip.fingerprint import listing_fingerprint
from unip.models import create_model, list_models, preset_config
from unip.models.cpu_linear import decide, linear_kernel, requested_choice, use_onednn_linears
from unip.models.quantize import fp8_unavailable_reason
from unip.models.vit import DROP_PATH_SCHEDULES, VisionTransformer

logger = logging.getLogger(__name__)

#: Every setting of a pre-training run; presets and ``--set`` may only change these keys. The engine's run and
#: optim sections (``unip.engine.settings``) with the recipe's values (docs/recipe.md#pre-training); an epoch-based
#: cosine schedule without evaluation.
DEFAULTS: Config = training_defaults(
    {
        "teacher": {"source": None, "layer": "auto", "auto_images": 256},
        # depth / embed_dim / num_heads: null keeps the preset's (set them for toy-sized students)
        # init: a checkpoint of the same architecture to start from (null: random weights drawn from run.seed)
        # drop_path_schedule: uniform (the release: the rate in every block) or linear (0 in the first block)
        "student": {"model": "unip_vit_small_patch16", "drop_path": 0.1, "drop_path_schedule": "uniform",
                    "depth": None, "embed_dim": None, "num_heads": None, "init": None},
        "data": {"path": None, "input_size": 224, "scale": [0.2, 1.0], "mean": INFMIX_MEAN, "std": INFMIX_STD,
                 "augment": True, "num_workers": 8},
        "loss": {"kind": "kl", "temperature": 1.0},
        # teacher_precision: auto = bf16 weights under bf16 autocast, else fp32; fp8 = torchao on Ada/Hopper
        # teacher_gelu: exact (the model's) or tanh (the approximation; a bf16 teacher on CUDA fuses it into fc1)
        "run": {"teacher_precision": "auto", "teacher_gelu": "exact"},
    },
    optim={"epochs": 100, "warmup_epochs": 5.0, "blr": 1.5e-4, "batch_size": 256, "betas": [0.9, 0.95]},
    run={"output": "runs/pretrain", "save_every_epochs": 10},
    leave_out=("optim.iterations", "optim.warmup_iterations", "optim.schedule", "optim.power",
               "optim.warmup_start_factor", "run.eval_every", "run.best_metric", "run.best_mode"))

#: What each setting may hold; ``make_config`` checks the resolved settings against it.
RULES: Dict[str, Rule] = training_rules(DEFAULTS, {
    "teacher.source": text(null=True), "teacher.layer": integer(1, MAX_DEPTH, words=("auto",)),
    "teacher.auto_images": integer(1, 100_000), "student.model": text(*list_models()),
    "student.drop_path": number(ge=0, lt=1), "student.drop_path_schedule": text(*DROP_PATH_SCHEDULES),
    "student.depth": integer(1, MAX_DEPTH, null=True),
    "student.embed_dim": integer(1, MAX_WIDTH, null=True), "student.num_heads": integer(1, MAX_WIDTH, null=True),
    "student.init": text(null=True),
    "data.path": text(null=True), "data.input_size": integer(16, 4096),
    "data.scale": numbers(2, gt=0, le=1, ascending=True), "data.mean": number(ge=0, le=1),
    "data.std": number(gt=0, le=1), "data.augment": flag(), "data.num_workers": integer(0, 256),
    "loss.kind": text(*LOSS_KINDS), "loss.temperature": number(gt=0, le=100),
    "run.teacher_precision": text("auto", *TEACHER_PRECISIONS), "run.teacher_gelu": text(*TEACHER_GELUS),
    "optim.epochs": integer(1, 100_000), "optim.blr": number(gt=0, le=1),  # an epoch-based run, lr from blr
})

STUDENT_FILE = "student.safetensors"


def make_config(preset: Optional[str] = None, overrides: Tuple[str, ...] = (),
                values: Optional[Dict[str, Any]] = None, origins: Optional[Dict[str, str]] = None,
                sources: Optional[Dict[str, str]] = None) -> Config:
    """``DEFAULTS`` ← preset (name under ``configs/pretrain/`` or a YAML path) ← ``values`` ← ``overrides``,
    checked against ``RULES``; ``origins`` names where ``values`` came from (e.g. ``--epochs``); ``sources`` is
    filled with where each setting came from (``unip.engine.config.build_config``)."""
    return settle_accumulation(build_config(DEFAULTS, preset, overrides, kind="pretrain", values=values, rules=RULES,
                                            origins=origins, sources=sources))


@dataclass
class TrainResult:
    """Where the distilled student was written, how many optimiser steps the run has, its last loss."""

    student: Path
    steps: int
    last_loss: float
    is_main: bool = True  #: rank 0, the process that reports


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
def teacher_precision(name: str, precision: Precision) -> str:
    """The teacher's weight precision for ``run.teacher_precision``: ``auto`` → bf16 under bf16 autocast,
    else fp32; ``fp8`` needs a bf16 run on an Ada/Hopper GPU with torchao (its activations are quantised
    from bf16); ``bf16`` needs a mixed-precision run. ``ConfigError`` otherwise."""
    if name == "auto":
        return "bf16" if precision.dtype is torch.bfloat16 else "fp32"
    if name not in TEACHER_PRECISIONS:
        raise ConfigError(f"run.teacher_precision={name!r}: choose auto or one of {', '.join(TEACHER_PRECISIONS)}")
    if name == "fp8":
        reason = fp8_unavailable_reason(torch.device(precision.device_type))
        if reason:
            raise ConfigError(f"--teacher-precision fp8: {reason}")
        if precision.dtype is not torch.bfloat16:
            raise ConfigError(f"--teacher-precision fp8 needs a bf16 run; this run is {precision.name} "
                              "(use --precision bf16)")
    if name == "bf16" and precision.dtype is None:
        raise ConfigError(f"--teacher-precision bf16 needs a mixed-precision run; this run is fp32 on "
                          f"{precision.device_type} (use --precision bf16, or --teacher-precision fp32 or auto)")
    return name


def build_teacher(config: Config, patch: int, dataset_path: str, dist: DistInfo, precision: Precision,
                  weights: str = "fp32") -> Tuple[Teacher, str]:
    """Load the teacher, choose its layer (``auto``: NMI profile of the training images, or on a resume the layer
    the run distils: ``resumed_layer``), cut it there and store its weights as ``weights``
    (``Teacher.set_precision``; fp32 on a CPU with the linear kernel of ``teacher_linear_kernel``).

    Returns the teacher and a line describing the choice."""
    teach = config["teacher"]
    if not teach["source"]:
        raise ConfigError("no teacher: pass --teacher SOURCE (a checkpoint file or timm:<name>)")
    model, digest = load_teacher_model(teach["source"], int(config["data"]["input_size"]), patch)
    if isinstance(teach["layer"], int) and not 1 <= teach["layer"] <= model.depth:  # e.g. a preset's 18, a ViT-B
        raise ConfigError(f"--teacher-layer {teach['layer']} is out of range: the teacher {teach['source']} has "
                          f"layers 1..{model.depth}; pass --teacher-layer 1..{model.depth}, or auto")
    model = model.to(dist.device)
    kernel = teacher_linear_kernel(model, config, dist, precision)
    layer = teach["layer"]
    resumed = resumed_layer(config) if layer == "auto" else None
    if resumed is not None:
        layer, why = resumed, (f"teacher layer {resumed}, the layer this run distils ({LOG_FILE} of "
                               f"{config['run']['output']}; not profiled again)")
    elif layer == "auto":
        layer, why = auto_layer(model, config, dataset_path, precision,
                                progress=dist.is_main and bool(config["run"]["progress"]), cpu_linear=kernel)
    elif isinstance(layer, int) and not isinstance(layer, bool):
        why = f"teacher layer {layer} (given)"
    else:
        raise ConfigError(f"teacher.layer must be a layer number or 'auto', got {layer!r}")
    teacher = Teacher(model, layer, patch, digest).to(dist.device).set_precision(weights, cpu_linear=kernel)
    return teacher.set_gelu(config["run"]["teacher_gelu"]), why


def resumed_layer(config: Config) -> Optional[int]:
    """On a resume (``run.resume`` finds a training state), the teacher layer the run distils: the last
    ``teacher_layer`` its ``log.jsonl`` records (as for the linear kernel), so that ``--teacher-layer auto`` does not
    profile the teacher again and cannot choose another layer; ``None`` for a new run or a log without one."""
    output = Path(config["run"]["output"])
    if not config["run"]["resume"] or resolve_resume(config["run"]["resume"], output / CHECKPOINT_DIR) is None:
        return None
    layer = last_logged(output, "teacher_layer")
    return layer if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 1 else None


def teacher_linear_kernel(model: VisionTransformer, config: Config, dist: DistInfo, precision: Precision) -> str:
    """``onednn`` or ``default``: the kernel of the teacher's fp32 CPU linear layers (``unip.models.cpu_linear``),
    the same on every rank and across a resume. ``UNIP_CPU_LINEAR`` when set; on a resume the kernel the run's
    log names (so that the resumed process computes the same targets); else timed, by rank 0 alone when several
    processes share the run."""
    if precision.dtype is not None:
        return "default"  # autocast: the fp32 kernels do not run
    requested = requested_choice()  # checked on every rank before any collective
    if requested == "auto" and config["run"]["resume"]:
        logged = last_logged(config["run"]["output"], "teacher_linear_kernel")
        requested = logged if logged in ("onednn", "default") else "auto"
    if requested != "auto" or dist.world_size == 1 or dist.device.type != "cpu":
        return decide(model, requested)
    mine = float(dist.is_main and decide(model, "auto") == "onednn")
    return "onednn" if all_reduce_sum(torch.tensor(mine)).item() > 0 else "default"


def auto_layer(model: VisionTransformer, config: Config, dataset_path: str, precision: Precision,
               progress: bool, cpu_linear: Optional[str] = None) -> Tuple[int, str]:
    """The analysis module's NMI-guided choice over ``teacher.auto_images`` training images (on the
    model's device, under the run's autocast; ``cpu_linear``: ``profile_model``'s)."""
    data = config["data"]
    size = model.config["img_size"][0]
    dataset = open_pretrain_images(dataset_path, frame_transform(size, data["mean"], data["std"]))
    images = take(dataset, int(config["teacher"]["auto_images"]), seed=int(config["run"]["seed"]))
    profile = profile_model(model, images, batch_size=16, autocast_dtype=precision.dtype, progress=progress,
                            source="teacher", cpu_linear=cpu_linear)
    choice = explain_distill_layer(profile)
    return choice.layer, f"teacher {choice}, chosen by NMI over {len(images)} images"


def build_student(config: Config, heads: int, device: torch.device) -> VisionTransformer:
    """The student preset with ``last_heads`` = the teacher block's heads, built for the input size."""
    size = int(config["data"]["input_size"])
    spec = config["student"]
    shape = {key: spec[key] for key in ("depth", "embed_dim", "num_heads") if spec[key] is not None}
    student = create_model(spec["model"], last_heads=heads, img_size=size, **shape)
    student.set_drop_path(float(spec["drop_path"]), spec["drop_path_schedule"])
    if size % student.patch_size:
        raise ConfigError(f"data.input_size={size} is not a multiple of the student's patch {student.patch_size}")
    if spec["init"]:
        try:
            start_from(student, str(spec["init"]))
        except CheckpointError as err:  # the file's own message does not say which setting named it
            raise CheckpointError(f"student.init: {err}; set it to a model file of the student's architecture "
                                  "(--set student.init=FILE) or drop it to start from random weights") from err
    freeze_unused(student)
    student = student.to(device)
    mask_key_bias_grads(student)
    return student


def start_from(student: VisionTransformer, path: str) -> None:
    """Load ``student.init``'s weights into ``student`` (e.g. the random student a baseline is fine-tuned from,
    so that distilled and baseline start alike). ``ConfigError`` when the file's width, depth or heads per block
    differ from the student's; ``CheckpointError`` when it lacks a weight."""
    init = open_model(path).model
    ours = (student.embed_dim, student.depth, list(student.heads_per_block))
    theirs = (init.embed_dim, init.depth, list(init.heads_per_block))
    if ours != theirs:
        raise ConfigError(f"student.init={path}: width {theirs[0]}, depth {theirs[1]}, heads per block {theirs[2]}, "
                          f"but the student is width {ours[0]}, depth {ours[1]}, heads per block {ours[2]} "
                          "(the last block takes the teacher block's heads); save a matching model or drop "
                          "student.init")
    load_weights(student, init.state_dict(), name=path)


# -------------------------------------------------------------------------------------------- the task
class NmiHadTask(Task):
    """NMI-HAD on ``unip.engine.trainer``: the student (saved in training states) is trained through
    ``StudentLogits`` on the KL between its last-block logits and the frozen teacher's."""

    name = "pretrain"
    model_file = STUDENT_FILE

    def __init__(self, config: Config) -> None:
        if config["loss"]["kind"] not in LOSS_KINDS:
            raise ConfigError(f"loss.kind={config['loss']['kind']!r}: choose one of {', '.join(LOSS_KINDS)}")
        self.config = config

    def setup(self, ctx: TrainContext) -> None:
        weights = teacher_precision(self.config["run"]["teacher_precision"], ctx.precision)  # refuse early
        patch = int(preset_config(self.config["student"]["model"])["patch_size"])
        self.teacher, self.teacher_why = build_teacher(self.config, patch, self.config["data"]["path"], ctx.dist,
                                                       ctx.precision, weights)  # bf16: half the memory
        self.distill_loss = attention_distill_loss

    def compile(self, module: nn.Module, model: nn.Module, options: Dict[str, Any]) -> nn.Module:
        """Regional compilation: the student's and the teacher's blocks (one graph per distinct block) and the
        loss. An FP8 teacher stays eager (dynamo fails on torchao's FP8 tensors with torch 2.11 / ao 0.18)."""
        model.compile_blocks(**options)  # type: ignore[operator]
        if self.teacher.precision != "fp8":
            use_onednn_linears(self.teacher.model, "default")  # compiled graphs pick their own kernels
            self.teacher.model.compile_blocks(**options)
        self.distill_loss = torch.compile(attention_distill_loss, **options)
        return module

    def build_model(self, ctx: TrainContext) -> VisionTransformer:
        student = build_student(self.config, self.teacher.num_heads, ctx.device)
        self.student_shape = {"width": student.embed_dim, "depth": student.depth,
                              "heads per block": list(student.heads_per_block)}
        return student

    def training_module(self, model: nn.Module) -> nn.Module:
        return StudentLogits(model)  # type: ignore[arg-type]

    def train_dataset(self, ctx: TrainContext) -> Dataset:
        data = self.config["data"]
        transform = crop_transform(int(data["input_size"]), bool(data["augment"]), data["scale"])
        dataset = open_pretrain_images(data["path"], transform)  # uint8 crops, normalised on the device
        skipped = describe_skipped(dataset)
        if skipped and ctx.dist.is_main:
            logger.info(skipped)
        self.images_fingerprint = f"{len(dataset)} images, {listing_fingerprint(image_files(dataset))}"
        return dataset

    def data_source(self, ctx: TrainContext) -> str:
        return str(self.config["data"]["path"])

    def loss(self, module: nn.Module, images: Tensor, ctx: TrainContext) -> Tensor:
        data = self.config["data"]
        images = normalize_batch(images.to(ctx.device, non_blocking=True), data["mean"], data["std"])
        target = self.teacher(images)
        logits = module(images)
        return self.distill_loss(logits, target, self.config["loss"]["kind"],
                                      float(self.config["loss"]["temperature"]))

    def describe(self, ctx: TrainContext) -> str:
        return (f"{self.teacher_why}; student {self.config['student']['model']} (last block "
                f"{self.teacher.num_heads} heads)")

    def setup_record(self, ctx: TrainContext) -> Dict[str, Any]:
        return {"teacher_layer": self.teacher.layer, "teacher_layer_reason": self.teacher_why,
                "teacher_precision": self.teacher.precision, "teacher_gelu": self.teacher.gelu,
                "teacher_linear_kernel": linear_kernel(self.teacher)}

    def resume_record(self, ctx: TrainContext) -> Dict[str, Any]:
        """What the saved student's metadata describes: teacher, distilled layer and heads, loss, student, data.
        Teacher and data by content (``unip.fingerprint``), so a run resumes after its files moved."""
        loss, data = self.config["loss"], self.config["data"]
        return {"teacher weights (digest)": self.teacher.weights_fingerprint, "teacher layer": self.teacher.layer,
                "teacher heads": self.teacher.num_heads, "loss.kind": loss["kind"],
                "loss.temperature": float(loss["temperature"]), "student.model": self.config["student"]["model"],
                "student shape": self.student_shape, "training images (file list digest)": self.images_fingerprint,
                "data.input_size": int(data["input_size"])}

    def student_meta(self, ctx: TrainContext) -> Dict[str, Any]:
        """What the student file records besides its architecture: preset, teacher, layer and heads,
        normalisation, the run's progress."""
        data, plan = self.config["data"], ctx.plan
        return {"preset": self.config["student"]["model"], "teacher": str(self.config["teacher"]["source"]),
                "teacher_layer": self.teacher.layer, "teacher_heads": self.teacher.num_heads,
                "normalization": {"mean": [data["mean"]] * 3, "std": [data["std"]] * 3},
                "pretrain": {"steps": ctx.step, "epochs": ctx.epoch, "loss": ctx.last_loss,
                             "effective_batch": plan.effective_batch if plan else None}}

    def model_header(self, model: nn.Module, ctx: TrainContext) -> Optional[str]:
        return checkpoint_header(model, self.student_meta(ctx))  # type: ignore[arg-type]

    def legacy_resume_record(self, ctx: TrainContext) -> Dict[str, Any]:
        """What states written before the content digests recorded: the teacher's and the data's paths."""
        return {"teacher.source": str(self.config["teacher"]["source"]), "data.path": str(self.config["data"]["path"])}

    def save_model(self, model: nn.Module, path: Path, ctx: TrainContext) -> None:
        """The distilled student as a self-describing safetensors file (``unip finetune --pretrained``)."""
        save_checkpoint(model, path, self.student_meta(ctx))  # type: ignore[arg-type]


def train(config: Config) -> TrainResult:
    """Run NMI-HAD pre-training as configured (see ``DEFAULTS``); under torchrun, on every rank.

    Returns a ``TrainResult``; raises ``ConfigError``/``DataError``/``CheckpointError`` on bad input and
    ``unip.engine.loop.NonFiniteLossError`` / ``unip.engine.checkpointing.NonFiniteStateError`` when the run
    diverges (the last finite checkpoint is kept)."""
    run = config["run"]
    check_run_folder(run["output"], list(DEFAULTS), {STUDENT_FILE: is_our_checkpoint}, run["resume"])
    result = train_task(NmiHadTask(config), config)
    return TrainResult(result.model_path, result.steps, result.last_loss, result.is_main)


__all__ = ["DEFAULTS", "NmiHadTask", "TrainResult", "batch_plan", "build_student", "make_config", "train"]
