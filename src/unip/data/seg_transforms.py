"""Joint image + label transforms of the fine-tuning recipe, with mmsegmentation 0.x semantics
(docs/recipe.md#training-pipeline, docs/recipe.md#test-pipeline).

Train: :class:`KeepRatioResize` to scale (2048, 512) × ratio in [0.5, 2.0] → :class:`CatMaxRatioCrop` 512
(retried until no label covers 75 %) → horizontal flip p = 0.5 → :class:`PhotoMetricDistortion` →
normalise (mean 96.9255, std 47.8976 on 0..255) → :class:`PadToSize` 512 (image 0, label 255).
Test: :class:`KeepRatioResize` to fit (2048, 512) → normalise; the label is left at its original size
(metrics compare logits resized back to it, as mmseg does).

Images are torchvision ``tv_tensors.Image`` (uint8 ``[3, H, W]`` until normalised) and labels
``tv_tensors.Mask`` (``[H, W]``), so torchvision's v2 functionals resize images bilinearly and labels by
nearest neighbour (never inventing a label value), and flip, crop and pad both alike. Our own code covers
what torchvision lacks: the mmcv scale rule, the class-ratio crop, the uint8 photometric distortion of
mmseg (additive brightness, truncation to uint8 after each step, OpenCV's 8-bit HSV) and pad-to-size.

All randomness is drawn from torch's global generator, so a sample is reproducible from a seed (the
trainer seeds each sample by (seed, epoch, index) with ``unip.engine.data.SeededDataset``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from unip.data.layouts import IGNORE_INDEX

#: The release's normalisation, on 0..255 pixel values, the same for all three channels.
SEG_MEAN = 96.9255
SEG_STD = 47.8976
#: mmseg ``img_scale``: (long side, short side) bounds.
SEG_SCALE: Tuple[int, int] = (2048, 512)
SEG_RATIO_RANGE: Tuple[float, float] = (0.5, 2.0)
SEG_CROP: Tuple[int, int] = (512, 512)

Size = Union[int, Tuple[int, int]]


def _pair(size: Size) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _find(inputs: Sequence[Any], kind: type) -> Optional[torch.Tensor]:
    return next((x for x in inputs if isinstance(x, kind)), None)


def rescale_size(height: int, width: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """Return ``(new_height, new_width)`` of mmcv's ``imrescale`` to ``scale`` (aspect kept).

    The factor is ``min(max(scale) / long side, min(scale) / short side)``: the largest that keeps the
    long side within ``max(scale)`` and the short side within ``min(scale)``; sides round half up. A side
    that would round to 0 (a very thin image, e.g. 1 × 500 px shrunk by 0.4) is kept at 1 px, where mmcv
    would fail.
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


class KeepRatioResize(v2.Transform):
    """mmseg ``Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)``.

    With a ``ratio_range`` a ratio r is drawn uniformly and the target scale is
    ``(int(scale[0] * r), int(scale[1] * r))``; the image is then rescaled by :func:`rescale_size`.
    Images are resized bilinearly without antialiasing (as OpenCV's ``INTER_LINEAR`` in mmcv), labels by
    nearest neighbour.
    """

    def __init__(self, scale: Tuple[int, int] = SEG_SCALE,
                 ratio_range: Optional[Tuple[float, float]] = None) -> None:
        super().__init__()
        self.scale, self.ratio_range = (int(scale[0]), int(scale[1])), ratio_range

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        height, width = F.get_size(flat_inputs[0])
        ratio = 1.0
        scale = self.scale
        if self.ratio_range is not None:
            low, high = self.ratio_range
            ratio = float(torch.rand(())) * (high - low) + low
            scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return {"ratio": ratio, "scale": scale, "size": rescale_size(height, width, scale)}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return F.resize(inpt, list(params["size"]), interpolation=v2.InterpolationMode.BILINEAR, antialias=False)


def crop_is_acceptable(label: torch.Tensor, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """mmseg's test on a label crop: more than one label value (``ignore_index`` aside) and the most
    frequent one covering less than ``cat_max_ratio`` of the non-ignored pixels."""
    counts = torch.bincount(label.reshape(-1).to(torch.int64), minlength=256)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


class CatMaxRatioCrop(v2.Transform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``: a random ``size`` window (clipped to the image).

    The window is redrawn up to ``max_tries`` times while the label inside it fails
    :func:`crop_is_acceptable`; after ``max_tries`` failures the next draw is used unchecked (as mmseg).
    """

    def __init__(self, size: Size = SEG_CROP, cat_max_ratio: float = 0.75, max_tries: int = 10,
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size, self.cat_max_ratio = _pair(size), cat_max_ratio
        self.max_tries, self.ignore_index = max_tries, ignore_index

    def random_box(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """Return ``(top, left, crop_height, crop_width)`` drawn uniformly over the valid offsets."""
        top = int(torch.randint(0, max(height - self.size[0], 0) + 1, ()))
        left = int(torch.randint(0, max(width - self.size[1], 0) + 1, ()))
        return top, left, min(self.size[0], height), min(self.size[1], width)

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        height, width = F.get_size(flat_inputs[0])
        box = self.random_box(height, width)
        label = _find(flat_inputs, tv_tensors.Mask)
        if label is not None and self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                top, left, h, w = box
                if crop_is_acceptable(label[..., top:top + h, left:left + w], self.cat_max_ratio, self.ignore_index):
                    break
                box = self.random_box(height, width)
        return {"box": box}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return F.crop(inpt, *params["box"])


# ------------------------------------------------------------------------------------- photometric
def rgb_to_hsv_u8(rgb: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit RGB→HSV: uint8 ``[3, H, W]`` → uint8 ``[3, H, W]`` with H in 0..179 (degrees / 2),
    S and V in 0..255."""
    x = rgb.to(torch.float32)
    r, g, b = x[0], x[1], x[2]
    v, _ = x.max(dim=0)
    diff = v - x.min(dim=0).values
    safe = torch.where(diff > 0, diff, torch.ones_like(diff))
    h = torch.where(v == r, 60 * (g - b) / safe,
                    torch.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    h = torch.where(diff > 0, h, torch.zeros_like(h))
    h = torch.where(h < 0, h + 360, h)
    s = torch.where(v > 0, diff * 255 / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    hsv = torch.stack([torch.round(h / 2) % 180, torch.round(s), v])
    return hsv.to(torch.uint8)


def hsv_to_rgb_u8(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit HSV→RGB, the inverse of :func:`rgb_to_hsv_u8`: uint8 ``[3, H, W]`` → uint8 RGB."""
    x = hsv.to(torch.float32)
    h = (x[0] / 30.0) % 6.0  # sector units: H is degrees / 2
    s, v = x[1] / 255.0, x[2] / 255.0
    sector = torch.floor(h)
    f = h - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.to(torch.int64)
    choose = [  # (r, g, b) per sector 0..5
        (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros((3,) + h.shape, dtype=torch.float32)
    for k, (cr, cg, cb) in enumerate(choose):
        mask = sector == k
        out[0] = torch.where(mask, cr, out[0])
        out[1] = torch.where(mask, cg, out[1])
        out[2] = torch.where(mask, cb, out[2])
    return torch.round(out * 255).clamp_(0, 255).to(torch.uint8)


def _affine_u8(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """mmseg's ``convert``: ``x * alpha + beta`` clipped to 0..255 and truncated to uint8."""
    return (x.to(torch.float32) * alpha + beta).clamp_(0, 255).to(torch.uint8)


def _coin() -> bool:
    return bool(torch.randint(0, 2, ()))


def _uniform(low: float, high: float) -> float:
    return float(torch.rand(())) * (high - low) + low


class PhotoMetricDistortion(v2.Transform):
    """mmseg ``PhotoMetricDistortion`` on uint8 RGB images, in its order, each step with probability 0.5.

    Brightness: add U(-delta, delta); contrast: multiply by U(range), before or after the colour steps
    (one coin decides); saturation: scale HSV S by U(range); hue: add an integer in [-hue_delta,
    hue_delta) to HSV H (0..179, wrapping). Every step clips to 0..255 and truncates to uint8. On gray
    images (three equal channels) saturation and hue change nothing and are skipped (their random
    numbers are still drawn, so the draws do not depend on the image).
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, brightness_delta: float = 32, contrast_range: Tuple[float, float] = (0.5, 1.5),
                 saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        super().__init__()
        self.brightness_delta, self.contrast_range = brightness_delta, contrast_range
        self.saturation_range, self.hue_delta = saturation_range, hue_delta

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        """Draw the steps in mmseg's order; a step not applied is None."""
        brightness = _uniform(-self.brightness_delta, self.brightness_delta) if _coin() else None
        contrast_first = bool(torch.randint(0, 2, ()))  # mmseg's "mode == 1"
        contrast = _uniform(*self.contrast_range) if contrast_first and _coin() else None
        saturation = _uniform(*self.saturation_range) if _coin() else None
        hue = (int(torch.randint(-self.hue_delta, self.hue_delta, ())) if self.hue_delta > 0 else 0) \
            if _coin() else None
        if not contrast_first and _coin():
            contrast = _uniform(*self.contrast_range)
        return {"brightness": brightness, "contrast": contrast, "contrast_first": contrast_first,
                "saturation": saturation, "hue": hue}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        x = inpt.as_subclass(torch.Tensor)
        if x.dtype != torch.uint8 or x.shape[-3] != 3:
            raise ValueError(f"PhotoMetricDistortion expects uint8 [3, H, W] images, got {x.dtype} {tuple(x.shape)}")
        if params["brightness"] is not None:
            x = _affine_u8(x, beta=params["brightness"])
        if params["contrast_first"] and params["contrast"] is not None:
            x = _affine_u8(x, alpha=params["contrast"])
        gray = bool((x[0] == x[1]).all() and (x[1] == x[2]).all())
        if params["saturation"] is not None and not gray:
            hsv = rgb_to_hsv_u8(x)
            hsv[1] = _affine_u8(hsv[1], alpha=params["saturation"])
            x = hsv_to_rgb_u8(hsv)
        if params["hue"] is not None and not gray:
            hsv = rgb_to_hsv_u8(x)
            hsv[0] = ((hsv[0].to(torch.int64) + params["hue"]) % 180).to(torch.uint8)
            x = hsv_to_rgb_u8(hsv)
        if not params["contrast_first"] and params["contrast"] is not None:
            x = _affine_u8(x, alpha=params["contrast"])
        return tv_tensors.wrap(x, like=inpt)


# ------------------------------------------------------------------------------------- normalise, pad
def normalize_steps(mean: Union[float, Sequence[float]] = SEG_MEAN,
                    std: Union[float, Sequence[float]] = SEG_STD) -> List[v2.Transform]:
    """``(x - mean) / std`` on 0..255 values (uint8 image → float32; labels untouched), as v2 transforms."""
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(m) for m in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
    return [v2.ToDtype(torch.float32, scale=False), v2.Normalize(mean, std)]


class PadToSize(v2.Transform):
    """mmseg ``Pad(size, pad_val, seg_pad_val)``: pad bottom and right up to ``size`` (never crops)."""

    def __init__(self, size: Size = SEG_CROP, fill: float = 0.0, label_fill: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size, self.fill, self.label_fill = _pair(size), fill, label_fill

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        height, width = F.get_size(flat_inputs[0])
        return {"padding": [0, 0, max(self.size[1] - width, 0), max(self.size[0] - height, 0)]}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.label_fill if isinstance(inpt, tv_tensors.Mask) else self.fill
        return F.pad(inpt, params["padding"], fill=fill)


# ------------------------------------------------------------------------------------- pipelines
class SegmentationTransform:
    """Runs ``steps`` (v2 transforms) on a sample dict of :class:`unip.data.segmentation.SegmentationDataset`.

    Input: ``image`` uint8 ``[3, H, W]``, ``label`` ``[H, W]`` (tensors); every other key is passed on.
    Output: ``image`` float32 ``[3, H', W']`` and ``label`` int64 (``[H', W']`` when ``with_label``,
    else the input label unchanged, e.g. the original size for evaluation), plain tensors.
    """

    def __init__(self, steps: Sequence[v2.Transform], with_label: bool = True) -> None:
        self.steps = list(steps)
        self.with_label = with_label
        self.pipeline = v2.Compose(self.steps)

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        out = dict(sample)
        inputs: Dict[str, Any] = {"image": tv_tensors.Image(torch.as_tensor(sample["image"]))}
        if self.with_label:
            inputs["label"] = tv_tensors.Mask(torch.as_tensor(sample["label"]))
        result = self.pipeline(inputs)
        out["image"] = result["image"].as_subclass(torch.Tensor).to(torch.float32)
        label = result["label"] if self.with_label else sample["label"]
        out["label"] = torch.as_tensor(label).as_subclass(torch.Tensor).to(torch.int64)
        return out

    def __repr__(self) -> str:
        return f"SegmentationTransform({self.steps}, with_label={self.with_label})"


def seg_train_transform(scale: Tuple[int, int] = SEG_SCALE,
                        ratio_range: Optional[Tuple[float, float]] = SEG_RATIO_RANGE,
                        crop_size: Size = SEG_CROP, cat_max_ratio: float = 0.75, crop_tries: int = 10,
                        flip_p: float = 0.5, photometric: bool = True,
                        mean: Union[float, Sequence[float]] = SEG_MEAN, std: Union[float, Sequence[float]] = SEG_STD,
                        ignore_index: int = IGNORE_INDEX) -> SegmentationTransform:
    """The release's training pipeline (module docstring); every default is the recipe's.

    Returns a :class:`SegmentationTransform`: sample → ``image`` float32 ``[3, crop_h, crop_w]``,
    ``label`` int64 ``[crop_h, crop_w]`` (255 on padding).
    """
    steps: List[v2.Transform] = [KeepRatioResize(scale, ratio_range),
                                 CatMaxRatioCrop(crop_size, cat_max_ratio, crop_tries, ignore_index)]
    if flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(flip_p))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += normalize_steps(mean, std) + [PadToSize(crop_size, 0.0, ignore_index)]
    return SegmentationTransform(steps)


def seg_test_transform(scale: Tuple[int, int] = SEG_SCALE, mean: Union[float, Sequence[float]] = SEG_MEAN,
                       std: Union[float, Sequence[float]] = SEG_STD) -> SegmentationTransform:
    """The release's test pipeline: resize to fit ``scale`` keeping aspect, normalise.

    Returns a :class:`SegmentationTransform`: sample → ``image`` float32 ``[3, h, w]`` (h, w from
    :func:`rescale_size`), ``label`` int64 at the original ``[H, W]``.
    """
    return SegmentationTransform([KeepRatioResize(scale)] + normalize_steps(mean, std), with_label=False)
