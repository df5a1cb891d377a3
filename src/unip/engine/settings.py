"""The ``run``, ``optim`` and ``debug`` settings every training task has: their defaults and their rules.

The trainer reads these sections; a task (``unip.distill.train``, ``unip.seg.train``) states only its own sections
(model, data, ...), the engine values it changes (pre-training: 100 epochs, batch 256, ...) and the engine keys it
does not use (pre-training has no evaluation, so no ``run.eval_every``)::

    DEFAULTS = training_defaults({"model": {...}, "data": {...}},
                                 run={"output": "runs/mine"}, optim={"epochs": 10},
                                 leave_out=("run.best_metric", "run.best_mode", "run.eval_every"))
    RULES = training_rules(DEFAULTS, {"model.depth": integer(1, 64)})

A task's ``run`` section may add keys of its own (pre-training's ``run.teacher_precision``); they come after the
engine's, with rules from the task.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Optional, Sequence

from unip.engine.config import Config, Rule, flag, flatten, integer, number, numbers, text
from unip.engine.loop import PRECISIONS
from unip.engine.schedule import SCHEDULES
from unip.errors import ConfigError

#: ``run.compile_mode`` values: torch.compile's modes (``reduce-overhead`` replays CUDA graphs; on a CPU it is
#: the default mode).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: ``run`` settings the trainer reads, and their values when a task's config leaves them out.
RUN_DEFAULTS: Config = {
    "output": "runs/train",       # run folder
    "seed": 0,                    # process seed = seed + rank; data order and augmentations derive from it
    "device": "auto",             # auto, cpu, cuda, cuda:N
    "precision": "auto",          # auto (bf16, else fp16, on CUDA; fp32 on CPU), fp32, bf16 (also on CPU), fp16
    "compile": "auto",            # torch.compile (Task.compile): true, false, or auto = on CUDA only
    "compile_mode": "default",    # torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, ...
    "save_every_epochs": 1,       # training state at the end of every N-th epoch (0: never)
    "save_every_steps": 0,        # training state every N optimiser steps (0: never); always at the end
    "keep_checkpoints": 2,        # newest step-*.pt kept (best.* are never pruned)
    "log_every": 20,              # a train record every N steps (and at each epoch end)
    "resume": None,               # null, auto (newest finite state in <output>/checkpoints) or a file/folder
    "progress": True,             # progress bar with ETA on rank 0
    "allow_changed_config": False,  # resume even when the settings that shape the schedule changed
    "eval_every": 0,              # evaluate every N steps (0: only at the end), if the task evaluates
    "best_metric": None,          # keep best.safetensors by this evaluation metric (e.g. mIoU); null: none
    "best_mode": "max",           # max (mIoU, accuracy) or min (a loss)
}

#: ``optim`` settings the trainer reads. Exactly one of ``epochs`` / ``iterations`` is set.
OPTIM_DEFAULTS: Config = {
    "epochs": None,               # epoch-based run: total steps = epochs × steps per epoch
    "iterations": None,           # iteration-based run: total optimiser steps (mmseg's max_iters)
    "warmup_epochs": 0.0,         # warm-up of an epoch-based run, in epochs (may be fractional)
    "warmup_iterations": 0,       # warm-up of an iteration-based run, in steps
    "schedule": "cosine",         # cosine (warm-up from 0, half-cosine) or poly (warm-up from factor × lr)
    "power": 1.0,                 # poly exponent
    "warmup_start_factor": 1e-6,  # poly: lr at step 0 = factor × lr (mmseg's warmup_ratio)
    "min_lr": 0.0,
    "lr": None,                   # peak lr; when null: blr × effective batch / 256
    "blr": None,
    "batch_size": 8,              # per process and micro-batch
    "accum_iter": None,           # micro-batches per optimiser step; null: derived from effective_batch, else 1
    "effective_batch": None,      # when set: accum_iter = effective_batch / (batch_size × processes)
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "clip_grad": None,            # max gradient norm; null: no clipping
    "fused": None,                # AdamW's fused kernels (and each step's loss read after the next is queued,
                                  # LossGate); null: on CUDA
}

#: Test hooks: a NaN loss at a given step; a pause after every step (to kill a run mid-way).
DEBUG_DEFAULTS: Config = {"nan_at_step": None, "step_delay": 0.0}

ENGINE_DEFAULTS: Config = {"optim": OPTIM_DEFAULTS, "run": RUN_DEFAULTS, "debug": DEBUG_DEFAULTS}

#: What each engine setting may hold (``training_rules`` lets a task narrow one, e.g. a required ``optim.lr``).
ENGINE_RULES: Dict[str, Rule] = {
    "run.output": text(), "run.seed": integer(0, 2**63 - 1), "run.device": text(),
    "run.precision": text(*PRECISIONS), "run.compile": Rule("bool", words=("auto",)),
    "run.compile_mode": text(*COMPILE_MODES), "run.save_every_epochs": integer(0, 100_000),
    "run.save_every_steps": integer(0), "run.keep_checkpoints": integer(1, 10_000), "run.log_every": integer(1),
    "run.resume": text(null=True), "run.progress": flag(), "run.allow_changed_config": flag(),
    "run.eval_every": integer(0), "run.best_metric": text(null=True), "run.best_mode": text("max", "min"),
    "optim.epochs": integer(1, 100_000, null=True), "optim.warmup_epochs": number(ge=0, le=100_000),
    "optim.iterations": integer(1, 100_000_000, null=True), "optim.warmup_iterations": integer(0, 100_000_000),
    "optim.schedule": text(*SCHEDULES), "optim.power": number(gt=0, le=100),
    "optim.warmup_start_factor": number(ge=0, le=1), "optim.min_lr": number(ge=0, lt=1),
    "optim.lr": number(gt=0, le=1, null=True), "optim.blr": number(gt=0, le=1, null=True),
    "optim.batch_size": integer(1, 65_536), "optim.accum_iter": integer(1, 65_536, null=True),
    "optim.effective_batch": integer(1, 2**24, null=True), "optim.weight_decay": number(ge=0, le=1),
    "optim.betas": numbers(2, ge=0, lt=1), "optim.clip_grad": number(gt=0, null=True),
    "optim.fused": Rule("bool", null=True),
    "debug.nan_at_step": integer(1, null=True), "debug.step_delay": number(ge=0, le=3600),
}


def training_defaults(own: Config, *, run: Optional[Mapping[str, Any]] = None,
                      optim: Optional[Mapping[str, Any]] = None, leave_out: Sequence[str] = ()) -> Config:
    """Every setting of a training task: its ``own`` sections, then the engine's ``optim``, ``run`` and ``debug``
    sections with the task's values from ``run`` / ``optim`` (engine keys only), less the dotted keys in
    ``leave_out``; keys of ``own["run"]`` are the task's own run settings, after the engine's."""
    for section, values in (("run", run), ("optim", optim)):
        unknown = sorted(set(values or {}) - set(ENGINE_DEFAULTS[section]))
        if unknown:
            raise ConfigError(f"not engine {section} settings: {', '.join(unknown)} (add them to the task's own)")
    config = {name: copy.deepcopy(section) for name, section in own.items() if name not in ENGINE_DEFAULTS}
    for name, engine in ENGINE_DEFAULTS.items():
        values = {"run": run, "optim": optim}.get(name) or {}
        section = {key: copy.deepcopy(values.get(key, default)) for key, default in engine.items()
                   if f"{name}.{key}" not in leave_out}
        config[name] = {**section, **copy.deepcopy(own.get(name, {}))}
    return config


def training_rules(defaults: Config, own: Mapping[str, Rule]) -> Dict[str, Rule]:
    """The rules of a task whose settings are ``defaults`` (``training_defaults``): the engine's for the engine
    keys it has, then the task's ``own`` (its sections, its run keys, and engine keys it narrows)."""
    keys = flatten(defaults)
    return {**{key: rule for key, rule in ENGINE_RULES.items() if key in keys}, **own}


__all__ = ["COMPILE_MODES", "DEBUG_DEFAULTS", "ENGINE_DEFAULTS", "ENGINE_RULES", "OPTIM_DEFAULTS", "RUN_DEFAULTS",
           "training_defaults", "training_rules"]
