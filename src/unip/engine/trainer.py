"""The training loop every task shares: a task supplies its model, loss, data and evaluation; ``Trainer``
does the rest.

What the trainer does, in order: seed the process (``run.seed`` + rank), choose the precision (bf16/fp16
autocast on CUDA with a grad scaler for fp16; fp32 on CPU unless bf16 is asked for), plan the steps (batch ×
accumulation × processes, epoch- or iteration-based length, warm-up), let the task build its model, turn BatchNorm into
SyncBatchNorm under multi-GPU DDP, wrap for DDP (and ``torch.compile``), build AdamW over the task's
parameter groups (weight decay and per-parameter lr scale, e.g. layer decay), load the task's training
set through a seeded, resumable loader, and then loop: lr from the schedule every step, accumulation,
clipping, a stop on a non-finite loss, logs (``log.jsonl`` + TensorBoard, named loss components), a
progress bar with ETA, evaluation every ``run.eval_every`` steps and at the end with the best model
kept by ``run.best_metric``, atomic training states with exact resume, and the final model file.

A task (subclass ``Task``; every method gets the run's ``TrainContext``)::

    class Regression(Task):
        name = "toy"                                        # progress bar and log label

        def build_model(self, ctx):                         # the module whose weights are trained and saved
            return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).to(ctx.device)

        def train_dataset(self, ctx):                       # items batched by the default collate
            return TensorDataset(torch.randn(64, 4), torch.randn(64, 1))

        def loss(self, module, batch, ctx):                 # module: the DDP/compiled wrapper; call it
            x, y = (t.to(ctx.device) for t in batch)
            out = module(x)
            mse, l1 = ((out - y) ** 2).mean(), (out - y).abs().mean()
            return mse + 0.4 * l1, {"mse": mse, "l1": l1}  # logged as loss, loss_mse, loss_l1

        def evaluate(self, model, ctx):                     # model: unwrapped, eval mode, no_grad
            loader = build_eval_loader(self.val_set)        # this rank's share; sum, then all-reduce once
            ...
            return {"mIoU": 42.0, "IoU": [40.0, 44.0]}      # logged as an "eval" record

    config = {"run": {**RUN_DEFAULTS, "output": "runs/toy", "eval_every": 100, "best_metric": "mIoU"},
              "optim": {**OPTIM_DEFAULTS, "iterations": 1000, "warmup_iterations": 100, "schedule": "poly",
                        "lr": 1e-3, "batch_size": 8}}
    result = train_task(Regression(), config)               # FitResult(model_path, steps, last_loss, best)

Settings read from ``config["run"]``, ``config["optim"]``, ``config["data"]["num_workers"]`` and
``config["debug"]``: see ``RUN_DEFAULTS`` / ``OPTIM_DEFAULTS`` / ``DEBUG_DEFAULTS``; a key a task's
config leaves out takes the value there (a task lists in its own DEFAULTS the keys users may ``--set``).

Run folder: ``config.yaml``, ``log.jsonl``, ``tb/``, ``checkpoints/step-*.pt`` (the newest
``run.keep_checkpoints``), ``checkpoints/best.safetensors`` + ``best.json``, and ``<task.model_file>``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from unip.atomic import atomic_path, atomic_write_text, remove_temporaries
from unip.engine import checkpointing
from unip.engine.config import Config, dump_config
from unip.engine.data import batches_per_epoch, build_loader, set_loader_epoch
from unip.engine.distributed import (DistInfo, barrier, cleanup, init_distributed, sync_batchnorm,
                                     unwrap_model)
from unip.engine.logging import MetricLogger
from unip.engine.loop import (LossGate, LossOutput, NonFiniteLossError, Precision, StepResult, resolve_precision,
                              split_loss, train_step)
from unip.engine.optim import adamw, param_groups
from unip.engine.progress import postfix, progress_bar, progress_line
from unip.engine.run_folder import CHECKPOINT_DIR, CONFIG_FILE, refuse_other_run
from unip.engine.schedule import SCHEDULES, LrSchedule, set_lr
from unip.engine.settings import COMPILE_MODES, DEBUG_DEFAULTS, OPTIM_DEFAULTS, RUN_DEFAULTS
from unip.engine.seeding import preserved_rng, seed_everything, step_seed
from unip.errors import ConfigError
from unip.run_lock import hold

logger = logging.getLogger(__name__)


def run_settings(config: Config) -> Tuple[Config, Config, Config]:
    """``(run, optim, debug)`` sections of ``config`` completed with the trainer's defaults."""
    return ({**RUN_DEFAULTS, **config.get("run", {})}, {**OPTIM_DEFAULTS, **config.get("optim", {})},
            {**DEBUG_DEFAULTS, **config.get("debug", {})})


def compile_options(run: Config) -> Dict[str, Any]:
    """``torch.compile`` keyword arguments for ``run.compile_mode`` (none for ``default``)."""
    mode = run["compile_mode"]  # run_settings fills it in from RUN_DEFAULTS
    if mode not in COMPILE_MODES:
        raise ConfigError(f"run.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return {} if mode == "default" else {"mode": mode}


def use_compile(setting: Any, device: torch.device) -> bool:
    """``run.compile``: true / false, or ``auto`` = compile on CUDA (where it pays for its start-up)."""
    if setting == "auto":
        return device.type == "cuda"
    if not isinstance(setting, bool):
        raise ConfigError(f"run.compile must be true, false or auto, got {setting!r}")
    return setting


def batch_plan(optim: Config, world_size: int) -> Tuple[int, int, float]:
    """``(accum_iter, effective_batch, peak_lr)`` from the optimiser settings and the world size.

    With ``effective_batch`` set, the accumulation is derived from it; an ``accum_iter`` set as well must give
    the same number (a ``ConfigError`` otherwise: one of the two would be ignored), except 1, which is what
    configs written before ``accum_iter`` defaulted to null state: it is ignored with a warning. Without it,
    ``accum_iter`` (``null``: 1) is used as given."""
    batch = int(optim["batch_size"])
    given = optim.get("accum_iter")
    accum = int(given) if given is not None else 1
    wanted = optim.get("effective_batch")
    if wanted:
        per_step = batch * world_size
        if wanted % per_step:
            raise ConfigError(f"optim.effective_batch={wanted} is not a multiple of "
                              f"batch_size × processes = {batch} × {world_size}; change optim.batch_size")
        derived = wanted // per_step
        if given is not None and accum == 1 and derived != 1:  # what every config.yaml before null stated
            logger.warning("optim.accum_iter=1 is not used: optim.effective_batch=%s gives %s micro-batch(es) of %s "
                           "on %s process(es) (set optim.effective_batch=null to use accum_iter)", wanted, derived,
                           batch, world_size)
        elif given is not None and accum != derived:
            raise ConfigError(f"optim.accum_iter={accum} contradicts optim.effective_batch={wanted}, which gives "
                              f"{derived} micro-batch(es) of {batch} on {world_size} process(es); drop "
                              "optim.accum_iter (--set optim.accum_iter=null), or set optim.effective_batch=null to "
                              "use it")
        accum = derived
    if batch < 1 or accum < 1:
        raise ConfigError(f"optim.batch_size ({batch}) and optim.accum_iter ({accum}) must be at least 1")
    effective = batch * accum * world_size
    if optim.get("lr") is not None:
        lr = optim["lr"]
    elif optim.get("blr") is not None:
        lr = optim["blr"] * effective / 256
    else:
        raise ConfigError("no learning rate: set optim.lr (or optim.blr, scaled by effective batch / 256)")
    return accum, effective, float(lr)


def settle_accumulation(config: Config) -> Config:
    """Give ``optim.accum_iter`` its value 1 where nothing else decides it (``optim.effective_batch`` and
    ``optim.accum_iter`` both null), so that a resolved config states the accumulation it runs with; with
    ``effective_batch`` set, a null ``accum_iter`` stays null (derived per process count by ``batch_plan``).
    Returns ``config`` (changed in place)."""
    optim = config.get("optim", {})
    if optim.get("effective_batch") is None and "accum_iter" in optim and optim["accum_iter"] is None:
        optim["accum_iter"] = 1
    return config


def _too_few_samples_fix(samples: int, optim: Config, world_size: int) -> str:
    """The settings that make one optimiser step fit into ``samples`` training samples (for an error message)."""
    per_step = int(optim["batch_size"]) * world_size
    if not optim.get("effective_batch"):
        return "lower optim.batch_size or optim.accum_iter"
    if samples >= per_step:  # the derived accumulation is what is too large
        return (f"lower optim.effective_batch to at most {samples // per_step * per_step} (a multiple of "
                f"batch_size × processes = {per_step}), or set it to null to use optim.batch_size × "
                "optim.accum_iter")
    return (f"lower optim.batch_size to at most {max(samples // world_size, 1)} and optim.effective_batch with "
            "it (or set optim.effective_batch=null)")


@dataclass(frozen=True)
class StepPlan:
    """How a run's steps are laid out: micro-batches per step, samples per step over all processes, peak
    lr, optimiser steps per epoch (full batches only), total and warm-up steps."""

    accum: int
    effective_batch: int
    peak_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


@dataclass(frozen=True)
class DoneStep:
    """A queued optimiser step: its number (1-based), epoch and step within the epoch (after it), its lr and
    what ``train_step`` returned (the loss not read yet)."""

    step: int
    epoch: int
    step_in_epoch: int
    lr: float
    result: StepResult


@dataclass(frozen=True)
class Duties:
    """What the trainer does after a step: log it, end the epoch, evaluate, save the training state."""

    log: bool
    epoch_end: bool
    evaluate: bool
    save: bool


@dataclass
class TrainContext:
    """What a task can read: the settings, where the process sits (``dist``), the precision, the run
    folder, the step plan (set once the training set is known) and the position, which the trainer keeps
    up to date: ``step`` = optimiser steps done, ``epoch`` (0-based), ``step_in_epoch``, the last loss
    and the last evaluation's metrics."""

    config: Config
    dist: DistInfo
    precision: Precision
    output: Path
    plan: Optional[StepPlan] = None
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    last_loss: float = math.nan
    last_eval: Optional[Dict[str, Any]] = None

    @property
    def device(self) -> torch.device:
        return self.dist.device


class Task:
    """What a training task supplies. Override ``build_model``, ``train_dataset`` and ``loss``; the rest
    has defaults. The trainer calls, in this order: ``setup``, ``build_model``, ``training_module``,
    ``param_groups`` (via ``lr_scale``), ``train_dataset``; then per step ``loss``, at evaluation points
    ``evaluate``, and ``save_model`` for the best and the final model."""

    #: Progress-bar label.
    name: str = "train"
    #: File name of the final model in the run folder.
    model_file: str = "model.safetensors"
    #: Passed to DDP: set True only when some trainable parameters get no gradient in some steps.
    find_unused_parameters: bool = False

    def setup(self, ctx: TrainContext) -> None:
        """Build what the model needs first (e.g. a frozen teacher). Default: nothing."""

    def build_model(self, ctx: TrainContext) -> nn.Module:
        """The module whose weights are trained, saved in training states and passed to ``evaluate`` and
        ``save_model``, on ``ctx.device``. Freeze parameters here (``requires_grad_(False)``) to leave
        them out of the optimiser (e.g. a linear probe's backbone)."""
        raise NotImplementedError

    def training_module(self, model: nn.Module) -> nn.Module:
        """What DDP wraps and ``loss`` calls (default: the model itself); e.g. a wrapper whose
        ``forward`` returns exactly what the loss needs. It must hold ``model``'s parameters."""
        return model

    def lr_scale(self, name: str) -> float:
        """lr multiplier of the parameter ``name`` of the model (layer-wise lr decay). Default 1."""
        return 1.0

    def param_groups(self, model: nn.Module, weight_decay: float, ctx: TrainContext) -> List[Dict[str, Any]]:
        """AdamW groups: dicts with ``params``, ``weight_decay`` and ``lr_scale``. Default:
        ``unip.engine.optim.param_groups`` (no decay on biases, 1-D parameters and the model's
        ``no_weight_decay()`` names) with ``lr_scale`` per parameter."""
        return param_groups(model, weight_decay, self.lr_scale)

    def compile(self, module: nn.Module, model: nn.Module, options: Dict[str, Any]) -> nn.Module:
        """With ``run.compile``: the (DDP-wrapped) training ``module`` to call in ``loss``, compiled with
        ``torch.compile`` keyword ``options`` (``run.compile_mode``). Default: ``torch.compile(module, **options)``;
        a task may compile parts of ``model`` in place instead and return ``module``."""
        return torch.compile(module, **options)

    def train_dataset(self, ctx: TrainContext) -> Dataset:
        """The training set; its items go through ``train_collate()``. Random augmentations are seeded per
        (seed, epoch, index) by the trainer's loader."""
        raise NotImplementedError

    def train_collate(self) -> Optional[Callable[[list], Any]]:
        """``collate_fn`` of the training loader: a module-level function (worker processes pickle it), or
        ``None`` for PyTorch's default, which stacks items of equal shapes."""
        return None

    def data_source(self, ctx: TrainContext) -> str:
        """Names the training data in error messages (e.g. its path)."""
        return "the training data"

    def loss(self, module: nn.Module, batch: Any, ctx: TrainContext) -> LossOutput:
        """The loss of one micro-batch, computed by calling ``module`` (the DDP/compiled training module,
        under the run's autocast): a 0-d tensor, or ``(total, {name: component})`` to log components as
        ``loss_<name>``. Move the batch to ``ctx.device`` here."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, ctx: TrainContext) -> Optional[Dict[str, Any]]:
        """Metrics of ``model`` (unwrapped, in eval mode, under ``torch.no_grad``; RNG draws here do not
        touch training), called on every rank: read this rank's share with
        ``unip.engine.data.build_eval_loader`` and reduce once with ``all_reduce_sum``, so that every rank
        returns the same numbers. Scalars and lists are logged; ``run.best_metric`` must name a scalar.
        Use ``ctx.precision.autocast()`` for mixed precision. Default: no evaluation."""
        return None

    def describe(self, ctx: TrainContext) -> str:
        """The start of the line logged when the run starts (what is trained)."""
        return self.name

    def setup_record(self, ctx: TrainContext) -> Dict[str, Any]:
        """Values logged once as a ``setup`` record of ``log.jsonl`` (e.g. a chosen layer); a resumed run logs
        them in its ``resume`` record."""
        return {}

    def resume_record(self, ctx: TrainContext) -> Dict[str, Any]:
        """What the task trains and on what (setting name → plain value: teacher, model shape, data set, ...),
        stored in training states and compared on resume like the step plan: a change is refused unless
        ``run.allow_changed_config``. Called after ``build_model`` and ``train_dataset``. Default: nothing."""
        return {}

    def legacy_resume_record(self, ctx: TrainContext) -> Dict[str, Any]:
        """Entries older versions stored in place of today's (e.g. paths where content digests are now), compared
        only against states that hold them, so such a state is checked as it was when written. Default: none."""
        return {}

    def model_header(self, model: nn.Module, ctx: TrainContext) -> Optional[str]:
        """The JSON header (``unip.config``) of the model file ``save_model`` would write now, stored in every
        training state so that ``unip.checkpoint`` reads a state like that file (``unip info``, ``analyze``, a
        teacher, a backbone to fine-tune). Default ``None``: states are then not readable as models."""
        return None

    def save_model(self, model: nn.Module, path: Path, ctx: TrainContext) -> None:
        """Write ``model``'s weights to ``path`` (the final model, ``checkpoints/best.safetensors``); called
        on rank 0 only. Default: a plain safetensors file, written atomically."""
        from safetensors.torch import save_model as save_safetensors

        with atomic_path(path) as tmp:
            save_safetensors(model, str(tmp), metadata={"step": str(ctx.step)}, force_contiguous=True)


@dataclass
class FitResult:
    """Where the final model was written, the optimiser steps of the run, the last loss, the best
    evaluation (``best.json``'s record: metric, mode, value, step, file) or ``None``, and whether this process is
    rank 0 (the one that reports)."""

    model_path: Path
    steps: int
    last_loss: float
    best: Optional[Dict[str, Any]] = None
    is_main: bool = True


class Trainer:
    """One training run of ``task`` as ``config`` says, in this process (``dist``). ``fit()`` runs it."""

    def __init__(self, task: Task, config: Config, dist: DistInfo) -> None:
        self.task, self.config = task, config
        self.run, self.optim, self.debug = run_settings(config)
        self._text_progress: Optional[Tuple[float, int]] = None  # (start time, start step) when lines replace the bar
        self.output = Path(self.run["output"])
        self.ckpt_dir = self.output / CHECKPOINT_DIR
        seed_everything(int(self.run["seed"]) + dist.rank)
        precision = resolve_precision(self.run["precision"], dist.device)
        if dist.device.type == "cuda" and precision.dtype is not None:
            # the few fp32 matmuls of a mixed-precision run may use TF32; ``--precision fp32`` stays true fp32
            torch.set_float32_matmul_precision("high")
        self.ctx = ctx = TrainContext(config, dist, precision, self.output)
        self._check_settings()
        accum, effective, peak_lr = batch_plan(self.optim, dist.world_size)

        task.setup(ctx)
        self.model = sync_batchnorm(task.build_model(ctx), dist)
        self.wrapped = task.training_module(self.model)
        if dist.distributed:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.wrapped, device_ids=ids, find_unused_parameters=task.find_unused_parameters)
        compiled = use_compile(self.run["compile"], dist.device)
        self.forward = task.compile(self.wrapped, self.model, compile_options(self.run)) if compiled else self.wrapped
        if not compiled and self.run["compile_mode"] != "default":
            self._warn(f"run.compile_mode={self.run['compile_mode']} has no effect: this run is not compiled "
                       f"(run.compile={self.run['compile']} on {dist.device.type}); add --set run.compile=true")
        groups = task.param_groups(self.model, float(self.optim["weight_decay"]), ctx)
        self.optimizer = adamw(groups, peak_lr, tuple(self.optim["betas"]), self.optim["fused"])
        self.scaler = precision.grad_scaler()
        self.gate = LossGate.for_optimizer(self.optimizer)

        dataset = task.train_dataset(ctx)
        workers = int(config.get("data", {}).get("num_workers", 0))
        self.loader = build_loader(dataset, int(self.optim["batch_size"]), rank=dist.rank,
                                   world_size=dist.world_size, seed=int(self.run["seed"]), num_workers=workers,
                                   pin_memory=dist.device.type == "cuda", collate_fn=task.train_collate())
        ctx.plan = plan = self._plan(len(dataset), accum, effective, peak_lr)  # type: ignore[arg-type]
        self.schedule = LrSchedule(self.optim["schedule"], plan.total_steps, plan.warmup_steps, peak_lr,
                                   float(self.optim["min_lr"]), float(self.optim["power"]),
                                   float(self.optim["warmup_start_factor"]))
        self.evaluates = type(task).evaluate is not Task.evaluate
        self.best: Optional[Dict[str, Any]] = None
        self.log = MetricLogger(self.output, enabled=False)  # opened by ``_start`` once resuming is settled

    # ------------------------------------------------------------------------------------ set-up
    def _check_settings(self) -> None:
        """What can be wrong with the trainer's settings before anything is built: ``ConfigError``."""
        optim, run = self.optim, self.run
        if (optim["epochs"] is None) == (optim["iterations"] is None):
            raise ConfigError("set exactly one of optim.epochs (epoch-based run) and optim.iterations "
                              f"(iteration-based run), the other to null; got epochs={optim['epochs']}, "
                              f"iterations={optim['iterations']}")
        if optim["schedule"] not in SCHEDULES:
            raise ConfigError(f"optim.schedule={optim['schedule']!r}: choose one of {', '.join(SCHEDULES)}")
        if run["best_mode"] not in ("max", "min"):
            raise ConfigError(f"run.best_mode={run['best_mode']!r}: choose max or min")

    def _plan(self, samples: int, accum: int, effective: int, peak_lr: float) -> StepPlan:
        optim, world = self.optim, self.ctx.dist.world_size
        steps_per_epoch = batches_per_epoch(samples, int(optim["batch_size"]), world) // accum
        if steps_per_epoch < 1:
            raise ConfigError(f"{self.task.data_source(self.ctx)}: {samples} samples are fewer than one step of "
                              f"{effective} (batch {optim['batch_size']} × accumulation {accum} × processes "
                              f"{world}); {_too_few_samples_fix(samples, optim, world)}")
        epochs, iterations = optim["epochs"], optim["iterations"]
        if epochs is not None:
            total, warmup = int(epochs) * steps_per_epoch, round(float(optim["warmup_epochs"]) * steps_per_epoch)
            length, warmup_key = f"optim.epochs={epochs}", "warmup_epochs"
        else:
            total, warmup, length = int(iterations), int(optim["warmup_iterations"]), f"optim.iterations={iterations}"
            warmup_key = "warmup_iterations"
        if total < 1 or warmup < 0:
            raise ConfigError(f"{length} gives {total} steps and {warmup} warm-up steps; the run needs at least "
                              "one step and no negative warm-up")
        if warmup >= total:  # the lr never reaches optim.lr (e.g. --iterations 1000 under the recipe's 1500)
            self._warn(f"the warm-up (optim.{warmup_key}={optim[warmup_key]}: {warmup} steps) lasts the whole run "
                       f"({length}: {total} steps), so the learning rate never leaves it; shorten it with --set "
                       f"optim.{warmup_key}=N (N below {epochs if epochs is not None else iterations})")
        return StepPlan(accum, effective, peak_lr, steps_per_epoch, total, int(warmup))

    def plan_record(self) -> Dict[str, Any]:
        """The settings that shape the step schedule and what the task trains on (``Task.resume_record``), as
        stored in training states and compared on resume."""
        plan, optim = self.ctx.plan, self.optim
        assert plan is not None
        return {"run.seed": int(self.run["seed"]), "optim.batch_size": int(optim["batch_size"]),
                "accumulation steps": plan.accum, "processes": self.ctx.dist.world_size,
                "optim.epochs": optim["epochs"], "optim.iterations": optim["iterations"],
                "warm-up steps": plan.warmup_steps, "optim.schedule": optim["schedule"],
                "steps per epoch (data set size / batch)": plan.steps_per_epoch,
                **self.task.resume_record(self.ctx)}

    # ------------------------------------------------------------------------------------ run
    def fit(self) -> FitResult:
        """Run (or continue) training to the last step; returns a ``FitResult``."""
        ctx = self.ctx
        plan = ctx.plan
        assert plan is not None
        try:
            self._start()
            self._info(f"{self.task.describe(ctx)}; effective batch {plan.effective_batch} = "
                       f"{self.optim['batch_size']} × {plan.accum} × {ctx.dist.world_size}; peak lr "
                       f"{plan.peak_lr:.3g}; {plan.total_steps} steps; {ctx.precision.name} on {ctx.device}")
            wanted = ctx.dist.is_main and bool(self.run["progress"])
            bar = progress_bar(plan.total_steps, ctx.step, self.task.name, enabled=wanted)
            self._text_progress = (time.perf_counter(), ctx.step) if wanted and bar.disable else None
            try:
                self.wrapped.train()
                self._train(bar)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(f"{err}, then {self._how_to_go_on()}") from None
            finally:
                bar.close()
                del self.loader  # its workers (persistent over epochs) exit with it
        finally:
            self.log.close()
        return FitResult(self._save_model(), ctx.step, ctx.last_loss, self.best, ctx.dist.is_main)

    def _how_to_go_on(self) -> str:
        """After a non-finite loss: where the run can go on from (its newest training state, or the start)."""
        latest = checkpointing.find_latest(self.ckpt_dir)
        if latest is None:
            return "run it again: no training state was saved before this step, so it starts over"
        return f"resume with --resume auto from the last good checkpoint, {latest}, which is kept"

    def _start(self) -> None:
        """Remove what killed saves left, resume (or refuse to start over another run's states), write
        ``config.yaml``, open the logs and write the ``setup`` (or ``resume``) record."""
        ctx = self.ctx
        if ctx.dist.is_main:
            removed = checkpointing.remove_stale_temporaries(self.ckpt_dir)
            removed += remove_temporaries(self.output, lambda name: name in (self.task.model_file, CONFIG_FILE))
            if removed:
                self._info(f"removed {len(removed)} temporary file(s) left by an interrupted save: "
                           f"{checkpointing.describe_names([str(p) for p in removed])}")
        barrier()
        resumed = self._resume()
        explicit = resumed is not None and self.run["resume"] != "auto"
        if explicit and self.best is not None and int(self.best["step"]) > ctx.step:
            self.best = None  # chosen on the abandoned trajectory; every rank forgets it
        if ctx.dist.is_main:
            if explicit:
                self._drop_later_states()
            self.output.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output / CONFIG_FILE, dump_config(self.config))
            self.log = MetricLogger(self.output, purge_step=ctx.step + 1 if resumed is not None else None)
            record = self.task.setup_record(ctx)
            if resumed is not None:
                self.log.log(ctx.step, {"from": str(resumed), **record}, prefix="resume")
            elif record:
                self.log.log(0, record, prefix="setup")
        barrier()

    def _drop_later_states(self) -> None:
        """After resuming from an explicit state at step S: delete this run's states past S and a best model
        chosen after S (the run goes on from S on another trajectory; they must not outrank it)."""
        removed = checkpointing.remove_after(self.ckpt_dir, self.ctx.step)
        if removed:
            self._info(f"resuming from step {self.ctx.step}: removed what the run wrote after it: "
                       f"{checkpointing.describe_names([p.name for p in removed], limit=6)}")

    def _resume(self) -> Optional[Path]:
        """Load the state ``run.resume`` names (``None`` for a new run); returns its path."""
        if not self.run["resume"]:
            # pretrain and finetune checked before any work (check_run_folder); any other task is checked here
            refuse_other_run(self.output, self.task.model_file)
            return None
        found = checkpointing.find_resume_state(self.run["resume"], self.ckpt_dir)
        if found is None:  # only with auto: an explicit file or folder without a state is an error
            self._info(f"--resume auto: no training state in {self.ckpt_dir}; starting a new run")
            return None
        path, state = found
        self._check_same_command(path, state.get("extra", {}).get("config"))
        self._check_unchanged(path, state.get("extra", {}).get("plan"))
        position = checkpointing.apply_state(state, path, self.model, self.optimizer, self.scaler)
        ctx = self.ctx
        ctx.step, ctx.epoch, ctx.step_in_epoch = position["step"], position["epoch"], position["step_in_epoch"]
        ctx.last_loss = float(position["extra"].get("loss", math.nan))
        if ctx.step_in_epoch >= ctx.plan.steps_per_epoch:  # type: ignore[union-attr]  # epochs got shorter
            ctx.epoch, ctx.step_in_epoch = ctx.epoch + 1, 0
        if self.run["best_metric"]:
            self.best = self._read_best()
        self._info(f"resumed from {path} at step {ctx.step} (epoch {ctx.epoch}, step {ctx.step_in_epoch})")
        return path

    def _check_same_command(self, path: Path, saved: Optional[Dict[str, Any]]) -> None:
        """``ConfigError`` when the state was written by another kind of run (``unip pretrain``'s state given to
        ``unip finetune``): its settings have sections this run lacks and lack some this run has."""
        if not isinstance(saved, dict):
            return
        theirs, ours = set(saved) - set(self.config), set(self.config) - set(saved)
        if theirs and ours:
            raise ConfigError(f"{path}: a training state of another unip command than {self.task.name} (its settings "
                              f"hold {', '.join(sorted(theirs))} instead of {', '.join(sorted(ours))}); --resume "
                              "continues only the run that wrote it (a pre-trained backbone to fine-tune is given "
                              "with --pretrained)")

    def _check_unchanged(self, path: Path, saved: Optional[Dict[str, Any]]) -> None:
        """``ConfigError`` when the state was written with settings that shape the schedule differently
        (unless ``run.allow_changed_config``)."""
        if not saved:
            return
        current = self.plan_record()
        current.update({key: value for key, value in self.task.legacy_resume_record(self.ctx).items()
                        if key in saved and key not in current})
        changed = [f"{key} {saved.get(key)} → {current.get(key)}" for key in current
                   if key in saved and saved[key] != current[key]]
        if not changed:
            return
        if not self.run["allow_changed_config"]:
            raise ConfigError(f"{path} was written with other settings: {'; '.join(changed)}. Resume with the "
                              "settings that wrote it, or pass --set run.allow_changed_config=true to go on with "
                              "the new ones (the schedule then differs from an uninterrupted run)")
        self._warn(f"resuming {path} with changed settings ({'; '.join(changed)}): allowed by "
                   "run.allow_changed_config")

    def _read_best(self) -> Optional[Dict[str, Any]]:
        record = checkpointing.read_best(self.ckpt_dir)
        if record and (record["metric"] != self.run["best_metric"] or record.get("mode") != self.run["best_mode"]):
            self._warn(f"{self.ckpt_dir / checkpointing.BEST_JSON} ranks by {record['metric']} "
                       f"({record.get('mode')}); the next evaluation by {self.run['best_metric']} replaces it")
            return None
        return record

    def _train(self, bar: tqdm) -> None:
        """Steps to the end. With a ``LossGate`` each step's loss is read after the next step is queued, so the
        device never waits for the host between steps; a step after which the trainer saves, evaluates or ends
        an epoch is settled before anything goes on (those need the weights of exactly that step)."""
        ctx, plan = self.ctx, self.ctx.plan
        assert plan is not None
        self._window = (time.perf_counter(), 0)
        while ctx.step < plan.total_steps:
            set_loader_epoch(self.loader, ctx.epoch, ctx.step_in_epoch * plan.accum)
            batches = iter(self.loader)
            epoch = ctx.epoch
            pending: Optional[DoneStep] = None
            while ctx.epoch == epoch and ctx.step < plan.total_steps:
                done = self._step(batches)
                bar.update(1)
                if pending is not None:
                    self._after_step(pending, bar)
                pending = done
                if self.gate is None or self._settles(done):
                    self._after_step(done, bar)
                    pending = None
            assert pending is None  # an epoch's last step settles

    def _step(self, batches: Iterator[Any]) -> DoneStep:
        ctx, plan = self.ctx, self.ctx.plan
        lr = self.schedule(ctx.step)
        set_lr(self.optimizer, lr)
        torch.manual_seed(step_seed(int(self.run["seed"]), ctx.dist.rank, ctx.step))
        micro_batches = [next(batches) for _ in range(plan.accum)]  # type: ignore[union-attr]
        result = train_step(self.wrapped, self._loss, micro_batches, self.optimizer, self.scaler, ctx.precision,
                            self.optim["clip_grad"], where=f"at step {ctx.step + 1} (epoch {ctx.epoch})",
                            gate=self.gate)
        ctx.step += 1
        ctx.step_in_epoch += 1
        return DoneStep(ctx.step, ctx.epoch, ctx.step_in_epoch, lr, result)

    def _loss(self, batch: Any) -> LossOutput:
        total, components = split_loss(self.task.loss(self.forward, batch, self.ctx))
        if self.debug["nan_at_step"] == self.ctx.step + 1:  # test hook: a loss that blows up
            total = total * float("nan")
        return (total, components) if components else total

    def _duties(self, done: DoneStep) -> Duties:
        """What the trainer does after ``done``."""
        plan, run = self.ctx.plan, self.run
        assert plan is not None
        final = done.step == plan.total_steps
        epoch_end = done.step_in_epoch == plan.steps_per_epoch
        every_eval, every_steps, every_epochs = (int(run["eval_every"]), int(run["save_every_steps"]),
                                                 int(run["save_every_epochs"]))
        return Duties(log=done.step % max(1, int(run["log_every"])) == 0 or epoch_end or final,
                      epoch_end=epoch_end,
                      evaluate=self.evaluates and (final or (every_eval > 0 and done.step % every_eval == 0)),
                      save=final or (every_steps > 0 and done.step % every_steps == 0) or (
                          epoch_end and every_epochs > 0 and (done.epoch + 1) % every_epochs == 0))

    def _settles(self, done: DoneStep) -> bool:
        """True when the run must not go on before ``done``'s loss is read (all but logging need its weights)."""
        duties = self._duties(done)
        return duties.epoch_end or duties.evaluate or duties.save or bool(self.debug["step_delay"])

    def _after_step(self, done: DoneStep, bar: tqdm) -> None:
        """Read the step's loss (``NonFiniteLossError`` when it is not finite), then log, roll the epoch,
        evaluate and save as the settings say."""
        ctx = self.ctx
        ctx.last_loss = done.result.loss
        duties = self._duties(done)
        start, steps = self._window
        self._window = (start, steps + 1)
        if duties.log:
            self._log_train(done, bar)
        if duties.epoch_end:
            ctx.epoch, ctx.step_in_epoch = ctx.epoch + 1, 0
        if duties.evaluate and duties.save:  # a diverged model is neither evaluated nor logged
            self._check_finite("before saving the training state")
        if duties.evaluate:
            self._evaluate()
        if duties.save:
            self._save_state()
        if self.debug["step_delay"]:
            time.sleep(float(self.debug["step_delay"]))

    def _log_train(self, done: DoneStep, bar: tqdm) -> None:
        start, steps = self._window
        elapsed = time.perf_counter() - start
        result = done.result
        metrics = {"loss": result.loss, **{f"loss_{k}": v for k, v in result.components.items()},
                   "lr": done.lr, "grad_norm": float(result.grad_norm),  # type: ignore[arg-type]
                   "images_per_s": steps * self.ctx.plan.effective_batch / max(elapsed, 1e-9),  # type: ignore
                   "epoch": done.epoch}
        self.log.log(done.step, metrics)
        shown = {k: metrics[k] for k in ("loss", "lr", "images_per_s")}
        bar.set_postfix_str(postfix(shown))
        if self._text_progress:  # no bar (not a terminal): a line per logged step instead
            began, first_step = self._text_progress
            self._info(progress_line(done.step, self.ctx.plan.total_steps,  # type: ignore[union-attr]
                                     done.step - first_step, time.perf_counter() - began, shown))
        self._window = (time.perf_counter(), 0)

    # ------------------------------------------------------------------------------------ evaluation
    def _evaluate(self) -> None:
        """Evaluate on every rank, log, and keep the best model by ``run.best_metric``."""
        ctx = self.ctx
        self.model.eval()
        try:
            with preserved_rng(ctx.device), torch.no_grad():
                metrics = self.task.evaluate(self.model, ctx)
        finally:
            self.wrapped.train()
        self._window = (time.perf_counter(), 0)  # evaluation time is not training throughput
        if metrics is None:
            return
        ctx.last_eval = dict(metrics)
        self.log.log(ctx.step, metrics, prefix="eval")
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._info(f"step {ctx.step}: {postfix(scalars)}")
        metric = self.run["best_metric"]
        if not metric:
            return
        if metric not in scalars:
            raise ConfigError(f"run.best_metric={metric!r} is not a number the evaluation returns "
                              f"({', '.join(scalars) or 'none'}); choose one of those")
        value = scalars[metric]
        if math.isfinite(value) and self._improves(value):
            self._save_best(metric, value)

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.run["best_mode"] == "max":
            return value > float(self.best["value"])
        return value < float(self.best["value"])

    def _save_best(self, metric: str, value: float) -> None:
        ctx = self.ctx
        self._check_finite("before saving the best model")
        path = self.ckpt_dir / checkpointing.BEST_WEIGHTS
        self.best = {"metric": metric, "mode": self.run["best_mode"], "value": value, "step": ctx.step,
                     "epoch": ctx.epoch, "file": path.name}
        if ctx.dist.is_main:
            self.task.save_model(unwrap_model(self.model), path, ctx)
            checkpointing.write_best(self.ckpt_dir, self.best)
            self._info(f"new best {metric} {value:.4g} at step {ctx.step}: {path}")
        barrier()

    # ------------------------------------------------------------------------------------ saving
    def _check_finite(self, when: str) -> None:
        """``NonFiniteStateError`` on every rank when a weight or optimiser tensor is NaN/inf (nothing saved)."""
        bad = checkpointing.non_finite_tensors({"model": self.model.state_dict(),
                                                "optimizer": self.optimizer.state_dict()})
        if bad:
            latest = checkpointing.find_latest(self.ckpt_dir)
            raise checkpointing.NonFiniteStateError(
                f"the weights became non-finite by step {self.ctx.step} ({checkpointing.describe_names(bad)}) "
                f"{when}: the run stopped without saving them; the newest finite state is "
                f"{latest or 'none (no state was saved yet)'}. Lower the lr (or add --set optim.clip_grad=1.0, or "
                "use fp32/bf16 instead of fp16) and resume with --resume auto, or from an earlier step-*.pt "
                "if that one has diverged already")

    def _save_state(self) -> None:
        ctx = self.ctx
        self._check_finite("before saving the training state")
        if ctx.dist.is_main:
            extra = {"config": self.config, "loss": ctx.last_loss, "plan": self.plan_record()}
            header = self.task.model_header(unwrap_model(self.model), ctx)
            if header is not None:
                extra[checkpointing.MODEL_HEADER_KEY] = header
            checkpointing.save_state(self.ckpt_dir, ctx.step, self.model, self.optimizer, self.scaler,
                                     epoch=ctx.epoch, step_in_epoch=ctx.step_in_epoch, extra=extra,
                                     keep=int(self.run["keep_checkpoints"]))
        barrier()

    def _save_model(self) -> Path:
        path = self.output / self.task.model_file
        self._check_finite("before saving the final model")
        if self.ctx.dist.is_main:
            self.task.save_model(unwrap_model(self.model), path, self.ctx)
            self._info(f"saved the model to {path}")
        barrier()
        return path

    def _info(self, text: str) -> None:
        if self.ctx.dist.is_main:
            logger.info(text)

    def _warn(self, text: str) -> None:
        if self.ctx.dist.is_main:
            logger.warning(text)


def hold_run_folder(config: Config, dist: DistInfo, command: str):
    """The lock of the run folder (``unip.run_lock``), held by rank 0 for the whole run: a second run into the
    same folder stops before it builds anything, naming this one (``command``). A context manager."""
    return hold(str(run_settings(config)[0]["output"]), command, enabled=dist.is_main)


def train_task(task: Task, config: Config) -> FitResult:
    """Join the process group (torchrun's environment; one process otherwise), run ``Trainer(task,
    config).fit()`` holding the run folder's lock (``hold_run_folder``) and leave the group. Returns a
    ``FitResult``; raises ``unip.errors`` on bad input (``ConfigError`` when another run holds the folder),
    ``NonFiniteLossError`` / ``NonFiniteStateError`` when the run diverges (the last finite state is kept)."""
    dist = init_distributed(run_settings(config)[0]["device"])
    try:
        with hold_run_folder(config, dist, f"unip {task.name}"):
            return Trainer(task, config, dist).fit()
    finally:
        cleanup()


__all__ = ["DEBUG_DEFAULTS", "FitResult", "OPTIM_DEFAULTS", "RUN_DEFAULTS", "StepPlan", "Task", "TrainContext",
           "Trainer", "batch_plan", "hold_run_folder", "run_settings", "settle_accumulation", "train_task"]
