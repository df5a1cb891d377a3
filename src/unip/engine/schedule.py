"""Per-iteration learning-rate schedules (pure functions of the step) and applying them to an optimiser.

Being functions of the global step, they need no state of their own: resuming restores the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unip.errors import ConfigError

#: Schedule names of ``LrSchedule.kind`` (``optim.schedule`` in run settings).
SCHEDULES = ("cosine", "poly")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then half-cosine down to ``min_lr``
    at ``total_steps``. Step ``s`` uses the lr reached after ``s`` steps (MAE's per-iteration rule)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_poly(step: int, total_steps: int, warmup_steps: int, base_lr: float, power: float = 1.0,
                warmup_start_factor: float = 1e-6, min_lr: float = 0.0) -> float:
    """Polynomial decay (mmseg's ``poly``) with a linear warm-up from ``warmup_start_factor × lr``.

    During warm-up the decayed lr is multiplied by a factor rising linearly from ``warmup_start_factor``
    to 1 (mmseg's linear warm-up); afterwards ``(base_lr - min_lr)(1 - step/total)^power + min_lr``."""
    progress = min(1.0, step / max(1, total_steps))
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if step < warmup_steps:
        factor = warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
        lr *= factor
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr × group['lr_scale']`` (scale 1 when a group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclass(frozen=True)
class LrSchedule:
    """The lr of every step of a run: ``schedule(step)`` → lr before per-group scales.

    ``cosine``: ``warmup_cosine`` (warm-up from 0; pre-training). ``poly``: ``warmup_poly`` with
    ``power`` and a warm-up from ``warmup_start_factor × lr`` (mmseg; fine-tuning)."""

    kind: str
    total_steps: int
    warmup_steps: int
    base_lr: float
    min_lr: float = 0.0
    power: float = 1.0
    warmup_start_factor: float = 1e-6

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.kind!r}: choose one of {', '.join(SCHEDULES)}")

    def __call__(self, step: int) -> float:
        if self.kind == "cosine":
            return warmup_cosine(step, self.total_steps, self.warmup_steps, self.base_lr, self.min_lr)
        return warmup_poly(step, self.total_steps, self.warmup_steps, self.base_lr, self.power,
                           self.warmup_start_factor, self.min_lr)
