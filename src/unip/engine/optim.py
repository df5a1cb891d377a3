"""Optimiser parameter groups: weight decay only on weight matrices, with an optional per-parameter lr scale.

No decay on biases, on 1-D parameters (norm weights, layer scales) and on the names the model lists in
``no_weight_decay()`` (position table, CLS and register tokens). ``lr_scale_fn(name)`` lets a caller scale
the lr per parameter (layer-wise lr decay in fine-tuning); groups record it as ``lr_scale``, which
``unip.engine.schedule.set_lr`` applies.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from unip.errors import ConfigError

LrScaleFn = Callable[[str], float]


def skips_decay(name: str, param: torch.Tensor, no_decay_names: Iterable[str] = ()) -> bool:
    """True for biases, 1-D parameters and parameters named (or under a module named) in ``no_decay_names``."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    return any(name == skip or name.startswith(skip + ".") for skip in no_decay_names)


def param_groups(model: nn.Module, weight_decay: float,
                 lr_scale_fn: Optional[LrScaleFn] = None) -> List[Dict[str, Any]]:
    """Trainable parameters of ``model`` grouped by (weight decay, lr scale).

    Returns a list of dicts with ``params``, ``weight_decay``, ``lr_scale`` and ``names`` (for logs),
    ready for ``torch.optim.AdamW``; frozen parameters are left out."""
    no_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if skips_decay(name, param, no_decay) else weight_decay
        scale = float(lr_scale_fn(name)) if lr_scale_fn else 1.0
        group = groups.setdefault((decay, scale), {"params": [], "names": [], "weight_decay": decay,
                                                   "lr_scale": scale})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: Tuple[float, float] = (0.9, 0.999),
                lr_scale_fn: Optional[LrScaleFn] = None, fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, weight_decay, lr_scale_fn)``; fused kernels on CUDA by default."""
    return adamw(param_groups(model, weight_decay, lr_scale_fn), lr, betas, fused)


def adamw(groups: List[Dict[str, Any]], lr: float, betas: Tuple[float, float] = (0.9, 0.999),
          fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW over parameter groups (as ``param_groups`` returns them; ``names`` entries are dropped);
    fused kernels when every parameter is on CUDA, unless ``fused`` says otherwise."""
    groups = [{key: value for key, value in group.items() if key != "names"} for group in groups]
    if not any(group["params"] for group in groups):
        raise ConfigError("the model has no trainable parameters; nothing to optimise")
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    # floats: a YAML setting such as [0, 0.95] gives ints, which torch refuses next to floats
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), fused=fused or None)
