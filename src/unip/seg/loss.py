"""The segmentation loss of the recipe: cross-entropy of each named output, weighted (decode 1.0, aux 0.4).

As mmsegmentation 0.x (the release): logits are resized bilinearly (``align_corners=False``) to the label
size, pixels labelled ``ignore_index`` contribute 0, and the mean runs over **all** pixels of the batch
(mmseg < 0.23 has no ``avg_non_ignore``); ``average="valid"`` divides by the non-ignored pixels instead.
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch.nn.functional as F
from torch import Tensor

from unip.models.heads import resize_bilinear


def segmentation_losses(outputs: Mapping[str, Tensor], target: Tensor, loss_weights: Mapping[str, float],
                        ignore_index: int = 255, average: str = "all") -> Dict[str, Tensor]:
    """Weighted cross-entropy of each output ``[B, classes, h, w]`` against ``target [B, H, W]`` (int64):
    ``{name: loss_weights[name] * CE}`` (scalars; their sum is the training loss). ``outputs`` and
    ``loss_weights`` are ``Segmentor``'s training outputs and ``loss_weights``."""
    if average not in ("all", "valid"):
        raise ValueError(f"average must be 'all' (mmseg 0.x) or 'valid', not {average!r}")
    losses = {}
    for name, logits in outputs.items():
        # fp32 before the resize, as mmseg's force_fp32 loss: half-precision logits are not interpolated in half
        logits = resize_bilinear(logits.float(), target.shape[-2:])
        per_pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
        if average == "all":
            loss = per_pixel.mean()
        else:
            loss = per_pixel.sum() / (target != ignore_index).sum().clamp_min(1)
        losses[name] = float(loss_weights[name]) * loss
    return losses
