"""The pre-training augmentation of UNIP (docs/recipe.md#pre-training), on 1-channel uint8 tensors.

RandomResizedCrop(224, scale=(0.2, 1.0), bicubic, antialiased) → horizontal flip (p = 0.5) → float in
[0, 1] → normalise with the InfMix constants → repeat to 3 channels. The repeat comes last, as a view, so
that cropping and resizing touch one channel instead of three; the result equals the release's
RGB→L→RGB pipeline up to resampling rounding.

With ``normalize=False`` the augmentation stops after the flip and returns uint8 ``[1, 224, 224]``
crops; :func:`normalize_batch` then does the rest on a whole batch, typically on the GPU. DataLoader
workers then stack and ship 1 byte per pixel instead of 12 (3 float32 channels).
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torchvision.transforms import v2

#: Grayscale mean/std of InfMix in [0, 1] (the release's constants, repeated over 3 channels).
INFMIX_MEAN = 0.3801
INFMIX_STD = 0.1871

Transform = Callable[[torch.Tensor], torch.Tensor]


def repeat_channels(x: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Return ``x`` ``[..., 1, H, W]`` repeated to ``[..., channels, H, W]`` (a view, no copy)."""
    return x.expand(*x.shape[:-3], channels, -1, -1)


class PretrainAugment:
    """The pre-training augmentation: uint8 ``[1, H, W]`` → float32 ``[channels, size, size]``.

    It calls torchvision's v2 RandomResizedCrop directly and fuses the scaling and normalisation into
    one pass, which saves the per-call dispatch of a ``v2.Compose`` (about 10 % of the packed loader's time).
    Randomness comes from torch's global generator, as in torchvision.
    """

    def __init__(self, size: int = 224, scale: Tuple[float, float] = (0.2, 1.0),
                 mean: float = INFMIX_MEAN, std: float = INFMIX_STD, channels: int = 3,
                 flip_p: float = 0.5, normalize: bool = True) -> None:
        self.crop = v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC,
                                         antialias=True)
        self.mean, self.std = mean, std
        self.channels, self.flip_p, self.normalize = channels, flip_p, normalize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.crop.transform(x, self.crop.make_params([x]))
        if torch.rand(1).item() < self.flip_p:
            x = x.flip(-1)
        if not self.normalize:
            return x
        return normalize_batch(x, self.mean, self.std, self.channels)

    def __repr__(self) -> str:
        return (f"PretrainAugment(crop={self.crop}, flip_p={self.flip_p}, mean={self.mean}, std={self.std}, "
                f"channels={self.channels}, normalize={self.normalize})")


def normalize_batch(x: torch.Tensor, mean: float = INFMIX_MEAN, std: float = INFMIX_STD,
                    channels: int = 3) -> torch.Tensor:
    """Return uint8 ``[..., 1, H, W]`` (any device) as normalised float32 ``[..., channels, H, W]``.

    The channel repeat is a view; scaling to [0, 1] and normalising are fused into one pass.
    """
    x = x.to(torch.float32).sub_(mean * 255.0).mul_(1.0 / (std * 255.0))
    return repeat_channels(x, channels) if channels != 1 else x


def pretrain_transform(size: int = 224, scale: Tuple[float, float] = (0.2, 1.0),
                       mean: float = INFMIX_MEAN, std: float = INFMIX_STD,
                       channels: int = 3, normalize: bool = True) -> Transform:
    """Return the pre-training augmentation: uint8 ``[1, H, W]`` → float32 ``[channels, size, size]``.

    With ``normalize=False`` it returns the uint8 ``[1, size, size]`` crop; finish with
    :func:`normalize_batch`.
    """
    return PretrainAugment(size, scale, mean, std, channels, normalize=normalize)
