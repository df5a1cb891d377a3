"""Test-time inference: whole-image and sliding-window logits, flip / multi-scale averaging, test resize.

The sliding window follows mmsegmentation 0.x (the release's test mode; docs/recipe.md#sliding-window):
per side ``grids = max(size - crop + stride - 1, 0) // stride + 1`` windows at ``start = i * stride``,
``end = min(start + crop, size)``, ``start = max(end - crop, 0)``; each window's whole-image logits are
added into a zero canvas and a count map; the result is canvas / count. Unlike the release, all windows
of a batch run as one forward by default (``batch_windows``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unip.data.seg_transforms import SEG_CROP, SEG_SCALE, rescale_size
from unip.models.heads import resize_bilinear

Size = Union[int, Tuple[int, int]]

#: The recipe's sliding window: the training crop (512).
RECIPE_CROP = SEG_CROP[0]


def window_stride(crop: int) -> int:
    """The recipe's sliding-window stride for a window of ``crop``: two thirds of it (512 → 341)."""
    return crop * 2 // 3


RECIPE_STRIDE = window_stride(RECIPE_CROP)


def _pair(value: Size) -> Tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; the previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def fit_size(height: int, width: int, scale: Tuple[int, int] = SEG_SCALE) -> Tuple[int, int]:
    """Size ``(h, w)`` of an image resized to fit ``scale`` keeping its aspect ratio (the test resize,
    :func:`unip.data.seg_transforms.rescale_size`: the long side ≤ max(scale), the short side ≤ min(scale),
    rounded half up). A 640×480 thermal frame → 512×683."""
    return rescale_size(height, width, scale)


def scaled_size(height: int, width: int, factor: float) -> Tuple[int, int]:
    """``(h, w)`` of an image scaled by ``factor`` for test-time augmentation: sides rounded half up (mmcv's
    ``rescale``), at least 1 px (a small factor on a thin image would otherwise leave nothing; the window
    then pads it to the model's minimum input)."""
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def window_spans(size: int, crop: int, stride: int) -> List[Tuple[int, int]]:
    """``(start, end)`` of the windows along one side of ``size`` pixels (mmseg's placement rule)."""
    if crop < 1 or stride < 1 or stride > crop:
        raise ValueError(f"crop and stride must be positive and the stride at most the crop (else the windows "
                         f"leave gaps), got crop={crop}, stride={stride}")
    grids = max(size - crop + stride - 1, 0) // stride + 1
    spans = []
    for index in range(grids):
        end = min(index * stride + crop, size)
        spans.append((max(end - crop, 0), end))
    return spans


def whole_inference(segmentor: nn.Module, x: Tensor) -> Tensor:
    """Logits of the whole image: the segmentor's logits resized (bilinear) to the input, ``[B, classes, H, W]``.

    An input whose sides are not multiples of the patch size, or shorter than two patches (the LL-FPN's
    stride-32 max-pool needs two), is padded with zeros (the normalised mean) at the bottom/right for the
    forward and the padding cropped off the resized logits: a 12 × 2048 input (a 3 × 500 image after the test
    resize) runs on 32 × 2048."""
    height, width = x.shape[-2:]
    patch = getattr(getattr(segmentor, "backbone", None), "patch_size", 1)
    pad_h, pad_w = max(-height % patch, 2 * patch - height), max(-width % patch, 2 * patch - width)
    with _evaluating(segmentor):
        padded = F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        logits = resize_bilinear(segmentor(padded), padded.shape[-2:])
    return logits[..., :height, :width]


def slide_inference(segmentor: nn.Module, x: Tensor, crop: Size = RECIPE_CROP, stride: Size = RECIPE_STRIDE,
                    batch_windows: bool = True, max_batch: Optional[int] = None) -> Tensor:
    """Sliding-window logits ``[B, classes, H, W]`` of ``x [B, C, H, W]``, averaged over the windows.

    ``batch_windows``: every window of every image in one forward (at most ``max_batch`` windows per
    forward); ``False`` runs them one at a time, as the release does (for benchmarks)."""
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop), _pair(stride)
    batch, _, height, width = x.shape
    windows = [(y, xs) for y in window_spans(height, crop_h, stride_h) for xs in window_spans(width, crop_w, stride_w)]
    step = len(windows) if batch_windows else 1
    if max_batch:
        step = max(1, min(step, max_batch // batch))
    canvas: Optional[Tensor] = None
    count = x.new_zeros((1, 1, height, width), dtype=torch.float32)
    for first in range(0, len(windows), step):
        chunk = windows[first:first + step]
        crops = torch.cat([x[:, :, y0:y1, x0:x1] for (y0, y1), (x0, x1) in chunk])
        logits = whole_inference(segmentor, crops)
        if canvas is None:
            canvas = logits.new_zeros((batch, logits.shape[1], height, width), dtype=torch.float32)
        for ((y0, y1), (x0, x1)), window_logits in zip(chunk, logits.split(batch)):
            canvas[:, :, y0:y1, x0:x1] += window_logits
            count[:, :, y0:y1, x0:x1] += 1
    return canvas / count


def predict_probabilities(segmentor: nn.Module, x: Tensor, mode: str = "slide", crop: Size = RECIPE_CROP,
                          stride: Size = RECIPE_STRIDE, flip: bool = False, scales: Sequence[float] = (1.0,),
                          output_size: Optional[Tuple[int, int]] = None, batch_windows: bool = True) -> Tensor:
    """Class probabilities ``[B, classes, h, w]`` at ``output_size`` (default: the input's), averaged over
    test-time augmentations as mmseg's ``aug_test``: for each scale (the input resized by that factor,
    bilinear) and, with ``flip``, its horizontal mirror, the logits (``mode`` "slide" or "whole") are resized
    to ``output_size`` and softmaxed; the probabilities are averaged. Without augmentation this is the
    softmax of the resized logits (the release's single-scale test)."""
    if mode not in ("slide", "whole"):
        raise ValueError(f"mode must be 'slide' or 'whole', not {mode!r}")
    size = tuple(output_size) if output_size is not None else tuple(x.shape[-2:])
    total: Optional[Tensor] = None
    runs = 0
    for scale in scales:
        scaled = x if scale == 1.0 else resize_bilinear(x, scaled_size(x.shape[-2], x.shape[-1], scale))
        for mirrored in ((False, True) if flip else (False,)):
            image = scaled.flip(-1) if mirrored else scaled
            if mode == "slide":
                logits = slide_inference(segmentor, image, crop, stride, batch_windows)
            else:
                logits = whole_inference(segmentor, image)
            logits = logits.flip(-1) if mirrored else logits
            probabilities = resize_bilinear(logits, size).softmax(dim=1)
            total = probabilities if total is None else total + probabilities
            runs += 1
    return total / runs
