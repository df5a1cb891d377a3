"""The pre-training augmentation of UNIP (paper §4 recipe), on 1-channel uint8 tensors.

RandomResizedCrop(224, scale=(0.2, 1.0), bicubic) → horizontal flip → float in [0, 1] → normalise with
the InfMix constants → repeat to 3 channels. The repeat comes last so that cropping and resizing touch one
channel instead of three; the result equals the release's RGB→L→RGB pipeline up to resampling rounding.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Tuple

import torch
from torchvision.transforms import v2

#: Grayscale mean/std of InfMix in [0, 1] (the release's constants, repeated over 3 channels).
INFMIX_MEAN = 0.3801
INFMIX_STD = 0.1871

Transform = Callable[[torch.Tensor], torch.Tensor]


def repeat_channels(x: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Return ``x`` ``[1, H, W]`` repeated to ``[channels, H, W]`` (a view, no copy)."""
    return x.expand(channels, -1, -1)


def pretrain_transform(size: int = 224, scale: Tuple[float, float] = (0.2, 1.0),
                       mean: float = INFMIX_MEAN, std: float = INFMIX_STD,
                       channels: int = 3) -> Transform:
    """Return the pre-training augmentation: uint8 ``[1, H, W]`` → float32 ``[channels, size, size]``."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([mean], [std]),
        partial(repeat_channels, channels=channels),  # a partial, not a lambda: spawn workers pickle it
    ])
