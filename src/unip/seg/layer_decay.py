"""Layer-wise learning-rate decay for fine-tuning (the release's BEiT-style rule,
docs/recipe.md#layer-wise-lr-decay).

Each parameter of a ``Segmentor`` gets a layer id: ``backbone.cls_token``, ``backbone.pos_embed`` (and the
register tokens) and ``backbone.patch_embed.*`` → 0; ``backbone.blocks.{i}.*`` → i + 1; everything else
(final norm, neck, heads) → depth + 1. Its lr is scaled by ``rate ** (depth + 1 - id)``: 1 for the heads,
``rate ** depth`` for block 0, ``rate ** (depth + 1)`` for the embeddings.

Weight decay is not decided here: ``unip.engine.optim.param_groups`` skips it on biases, 1-D parameters and
the segmentor's ``no_weight_decay()`` names (its position table and CLS token; the release decays those by
a naming slip, which is not reproduced).
"""

from __future__ import annotations

import re

from unip.engine.optim import LrScaleFn

#: Prefixes that wrappers add to parameter names (DDP, ``torch.compile``); removed before matching.
WRAPPER_PREFIX = re.compile(r"^(module\.|_orig_mod\.)+")
EMBEDDING_NAMES = ("backbone.cls_token", "backbone.pos_embed", "backbone.reg_token")


def layer_id(name: str, depth: int) -> int:
    """Layer id of the parameter ``name`` (a ``Segmentor`` parameter name) in a backbone of ``depth`` blocks."""
    name = WRAPPER_PREFIX.sub("", name)
    if name in EMBEDDING_NAMES or name.startswith("backbone.patch_embed."):
        return 0
    match = re.match(r"backbone\.blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def layer_decay_lr_scale(depth: int, rate: float = 0.85) -> LrScaleFn:
    """``lr_scale_fn(name) = rate ** (depth + 1 - layer_id(name, depth))`` for
    ``unip.engine.optim.param_groups`` / ``build_adamw`` (``rate=1`` gives 1 everywhere)."""
    def lr_scale(name: str) -> float:
        return float(rate) ** (depth + 1 - layer_id(name, depth))

    return lr_scale
