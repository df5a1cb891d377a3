"""A folder of images as normalised model inputs for the analysis.

Each image is read through the input mapping every verb shares (``unip.data.inputs``: full decode, a
radiometric raster's percentile stretch, colour to luma; a SEQ/CSQ gives its first frame),
resized to the model's input size (bicubic, aspect not kept: the analysis looks at the full frame),
scaled to [0, 1], normalised and repeated to 3 channels, as in pre-training.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from unip.data.images import ImageReadError, walk_once
from unip.data.inputs import INPUT_SUFFIXES, InputMapping, read_model_gray
from unip.data.transforms import INFMIX_MEAN, INFMIX_STD
from unip.errors import ConfigError, DataError


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean``/``std`` (3 values each) applied to the [0, 1] grayscale image repeated ×3."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


#: ``--norm`` presets. ``infmix``: UNIP pre-training (grayscale InfMix statistics); ``imagenet``: the RGB
#: statistics most teachers were trained with; ``none``: pixels in [0, 1].
NORMALIZATIONS = {
    "infmix": Normalization((INFMIX_MEAN,) * 3, (INFMIX_STD,) * 3),
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": Normalization((0.0,) * 3, (1.0,) * 3),
}


def parse_normalization(text: str) -> Normalization:
    """A preset name (``infmix``, ``imagenet``, ``none``) or ``MEAN,STD`` (one value for all channels)."""
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--norm {text!r}: use one of {', '.join(NORMALIZATIONS)} or MEAN,STD "
                          "(e.g. 0.38,0.19)") from None
    if std <= 0:
        raise ConfigError(f"--norm {text!r}: the standard deviation must be positive")
    return Normalization((mean,) * 3, (std,) * 3)


def list_images(folder: str, limit: Optional[int] = None, exclude: Optional[str] = None) -> List[str]:
    """Image files under ``folder`` (recursively, following linked folders, sorted by path), at most ``limit``;
    nothing from the folder ``exclude`` when it lies below ``folder`` (the analysis' own ``--out``, whose figures
    are PNGs).

    Raises ``DataError`` when the folder does not exist or holds no image file."""
    if limit is not None and limit < 0:
        raise ConfigError(f"--num-images {limit}: use a positive number, or 0 for all images")
    if os.path.isfile(folder):
        raise DataError(f"{folder}: is a file, not a folder of images; pass the folder that holds it "
                        f"(--images {os.path.dirname(folder) or '.'})")
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: image folder does not exist; pass --images DIR with jpg/png/bmp/tiff files")
    found: List[str] = []
    for top, _, files in walk_once(folder, {os.path.realpath(exclude)} if exclude else set()):
        found += [os.path.join(top, f) for f in files if os.path.splitext(f)[1].lower() in INPUT_SUFFIXES]
    if not found:
        raise DataError(f"{folder}: no images found (looked for {', '.join(INPUT_SUFFIXES)})")
    return found[:limit] if limit else found


def load_image(path: str, size: Tuple[int, int], norm: Normalization = NORMALIZATIONS["infmix"],
               mapping: Optional[InputMapping] = None) -> Tensor:
    """Read ``path`` through the input mapping ``mapping`` (``unip.data.inputs``; default the per-frame stretch)
    and return the normalised model input, float32 ``[3, height, width]`` for ``size = (height, width)``. Raises
    ``ImageReadError`` (a ``DataError``) when the file is unusable, ``NoTemperaturesError`` for a fixed °C window
    on a file without temperatures."""
    return frame_input(read_model_gray(path, mapping=mapping), size, norm)


def frame_input(gray: np.ndarray, size: Tuple[int, int], norm: Normalization = NORMALIZATIONS["infmix"]) -> Tensor:
    """A uint8 grayscale frame ``[H, W]`` as the normalised model input, float32 ``[3, height, width]``: the
    whole frame resized to ``size = (height, width)`` (PIL bicubic, aspect not kept), scaled to [0, 1],
    normalised, repeated to 3 channels."""
    if gray.shape != tuple(size):
        gray = np.asarray(Image.fromarray(gray).resize((size[1], size[0]), Image.Resampling.BICUBIC))
    pixels = torch.from_numpy(np.asarray(gray, dtype=np.float32)).div_(255.0)  # a new, writable array
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)
    return (pixels.expand(3, -1, -1) - mean) / std


def to_display(x: Tensor, norm: Normalization = NORMALIZATIONS["infmix"]) -> np.ndarray:
    """Undo the normalisation of one input ``[3, H, W]``: float ``[H, W]`` grayscale in [0, 1] for plots."""
    gray = x[0].float().cpu() * norm.std[0] + norm.mean[0]
    return gray.clamp(0, 1).numpy()


class ImageFolder:
    """Iterable of normalised inputs ``[3, H, W]`` read lazily from ``paths``.

    Unreadable files are skipped with a warning and listed in ``skipped``; ``len`` is the number of files."""

    def __init__(self, paths: Sequence[str], size: Tuple[int, int],
                 norm: Normalization = NORMALIZATIONS["infmix"], mapping: Optional[InputMapping] = None) -> None:
        self.paths = list(paths)
        self.size = (int(size[0]), int(size[1]))
        self.norm = norm
        self.mapping = mapping
        self.skipped: List[ImageReadError] = []

    @classmethod
    def from_folder(cls, folder: str, size: Tuple[int, int], limit: Optional[int] = None,
                    norm: Normalization = NORMALIZATIONS["infmix"]) -> "ImageFolder":
        return cls(list_images(folder, limit), size, norm)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Tensor]:
        self.skipped = []
        for path in self.paths:
            try:
                yield load_image(path, self.size, self.norm, self.mapping)
            except ImageReadError as err:
                self.skipped.append(err)
                warnings.warn(f"skipping {err}", stacklevel=2)

    def first(self) -> Tuple[str, Tensor]:
        """The first readable image: ``(path, input [3, H, W])``; raises ``DataError`` if none is."""
        for path in self.paths:
            try:
                return path, load_image(path, self.size, self.norm, self.mapping)
            except ImageReadError:
                continue
        raise DataError(f"none of the {len(self.paths)} image files could be read "
                        f"(first: {self.paths[0] if self.paths else '-'}); fix or replace them")


def parse_size(text: str) -> Tuple[int, int]:
    """``"H"`` or ``"H,W"`` (pixels) → ``(height, width)``; raises ``ConfigError`` otherwise."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise ConfigError(f"--size {text!r}: expected SIZE or HEIGHT,WIDTH in pixels (multiples of the patch)")
    return (values[0], values[-1])
