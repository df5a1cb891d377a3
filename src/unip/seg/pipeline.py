"""The test-time pipeline of a segmentor: one object, recorded in the segmentor's header, that evaluation,
prediction, export (and the web page) all read.

The recipe (docs/recipe.md#test-pipeline, the release's ``test_pipeline`` and ``slide`` test mode): an RGB uint8
image (gray repeated, 16-bit frames stretched: :func:`unip.data.images.read_rgb`) is resized to fit (2048, 512)
keeping its aspect ratio (bilinear, mmcv's rule: a 640×512 frame → 640×512, 320×256 → 640×512), normalised with
the segmentor's mean / std (96.9255 / 47.8976 on 0–255 for the release's models), covered by sliding windows of
the training crop (512) with a stride of two thirds of it (341), no flip; the logits are resized bilinearly back
to the image's own size and the arg-max is the label map. Flips and extra scales are test-time augmentation that
``unip evaluate`` may add.

A segmentor file stores the pipeline in its meta (``InferencePipeline.to_meta``: ``test_scale``,
``normalization`` on the 0–1 scale like pre-training checkpoints, ``crop_size``, ``stride``);
``InferencePipeline.of(segmentor)`` reads it back, the recipe's values where the meta has none.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from unip.data.seg_transforms import (SEG_MEAN, SEG_SCALE, SEG_STD, KeepRatioResize, SegmentationTransform,
                                      normalize_steps, rescale_size, seg_test_transform)
from unip.checkpoint.architecture import MAX_IMAGE_SIDE
from unip.engine.config import Rule, integer, numbers
from unip.errors import CheckpointError, ConfigError
from unip.seg.inference import RECIPE_CROP, window_spans, window_stride
from unip.text import one_line

#: Bounds of the test settings a segmentor file records: windows and the test resize no larger than a checkpoint
#: may describe an image (``MAX_IMAGE_SIDE``) and than fine-tuning's ``data.scale`` allows.
TEST_RULES: Dict[str, Rule] = {
    "crop_size": integer(1, MAX_IMAGE_SIDE), "test_scale": numbers(2, ge=1, le=16384),
    "normalization.mean": numbers(3, ge=0, le=1), "normalization.std": numbers(3, gt=0, le=1)}

@dataclass(frozen=True)
class InferencePipeline:
    """What the test pipeline does to an image: fit into ``scale`` (long, short side bounds), normalise with
    ``mean`` / ``std`` on 0–255 values (one per channel), sliding windows of ``crop`` with ``stride`` (``None``:
    ``window_stride(crop)``), averaged over horizontal ``flip``s and the resize ``scales`` when asked."""

    scale: Tuple[int, int] = SEG_SCALE
    mean: Tuple[float, float, float] = (SEG_MEAN,) * 3
    std: Tuple[float, float, float] = (SEG_STD,) * 3
    crop: int = RECIPE_CROP
    stride: Optional[int] = None  # type: ignore[assignment]  # always an int once built
    flip: bool = False
    scales: Tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.stride is None:
            object.__setattr__(self, "stride", window_stride(self.crop))
        if self.crop < 1 or self.stride < 1 or self.stride > self.crop:
            raise ConfigError(f"sliding window crop {self.crop}, stride {self.stride}: both must be positive and "
                              "the stride at most the crop (windows must cover the image)")
        if not self.scales or any(not 0 < s <= 8 for s in self.scales):
            raise ConfigError(f"test scales {list(self.scales)}: each must be in (0, 8]")

    # ------------------------------------------------------------------------------------------ the header
    @classmethod
    def of(cls, segmentor: nn.Module) -> "InferencePipeline":
        """The pipeline a segmentor was trained for (``from_meta`` of its ``meta``)."""
        return cls.from_meta(getattr(segmentor, "meta", {}))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], source: Optional[str] = None) -> "InferencePipeline":
        """The pipeline a segmentor file's ``meta`` records, the recipe's values where it has none. A header whose
        pipeline cannot run, or runs beyond ``TEST_RULES`` (windows or images larger than any checkpoint may
        describe), raises ``CheckpointError`` naming ``source`` (the file) before anything is allocated."""
        where = source or "the segmentor's meta"
        crop, stride = meta.get("crop_size", RECIPE_CROP), meta.get("stride")
        window = stride if stride is not None else window_stride(crop) if _whole(crop) else None
        if not (_whole(crop) and _whole(window) and TEST_RULES["crop_size"].accepts(crop) and 1 <= window <= crop):
            raise CheckpointError(f"{where}: the header's sliding window (crop_size {crop!r}, stride {stride!r}) must "
                                  f"be whole numbers, the crop {TEST_RULES['crop_size'].describe()} and the stride "
                                  "from 1 to the crop")
        norm = meta.get("normalization") or {}
        values = {"test_scale": meta.get("test_scale", list(SEG_SCALE)),
                  "normalization.mean": norm.get("mean", [SEG_MEAN / 255] * 3) if isinstance(norm, dict) else norm,
                  "normalization.std": norm.get("std", [SEG_STD / 255] * 3) if isinstance(norm, dict) else norm}
        for key, value in values.items():
            rule = TEST_RULES[key]
            if not rule.accepts(value) or (key == "test_scale" and not all(float(v).is_integer() for v in value)):
                raise CheckpointError(f"{where}: the header's {key} {_shown(value)} must be {rule.describe()}"
                                      f"{' (whole numbers)' if key == 'test_scale' else ''}; the file was written "
                                      "wrongly or edited")
        return cls(tuple(int(v) for v in values["test_scale"]),  # type: ignore[arg-type]
                   tuple(255.0 * float(v) for v in values["normalization.mean"]),  # type: ignore[arg-type]
                   tuple(255.0 * float(v) for v in values["normalization.std"]), crop, window)  # type: ignore

    def to_meta(self) -> Dict[str, Any]:
        """What a segmentor file records of the pipeline (``from_meta`` reads it back)."""
        return {"normalization": {"mean": [m / 255 for m in self.mean], "std": [s / 255 for s in self.std]},
                "test_scale": list(self.scale), "crop_size": self.crop, "stride": self.stride}

    def record(self) -> Dict[str, Any]:
        """The pipeline as ``metrics.json`` records it (``test``)."""
        return {"mode": "slide", "crop": self.crop, "stride": self.stride, "flip": self.flip,
                "scales": list(self.scales)}

    def with_augmentation(self, flip: bool = False, scales: Sequence[float] = (1.0,)) -> "InferencePipeline":
        """This pipeline with test-time flips and resize scales (``unip evaluate --flip --scales``)."""
        return dataclasses.replace(self, flip=bool(flip), scales=tuple(float(s) for s in scales))

    # ------------------------------------------------------------------------------------------ images
    def transform(self) -> SegmentationTransform:
        """The data set transform of the test split: resize to fit ``scale``, normalise (labels kept as read)."""
        return seg_test_transform(scale=self.scale, mean=list(self.mean), std=list(self.std))

    def preprocess(self, image: np.ndarray) -> Tensor:
        """RGB uint8 ``[H, W, 3]`` → the normalised model input ``float32 [3, h, w]`` (the same v2 transforms as
        ``transform``)."""
        steps = v2.Compose([KeepRatioResize(self.scale)] + normalize_steps(list(self.mean), list(self.std)))
        pixels = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        return steps(pixels).as_subclass(torch.Tensor)

    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        """Size ``(h, w)`` the model sees for an image of ``height`` × ``width``."""
        return rescale_size(height, width, self.scale)

    def windows(self, height: int, width: int) -> int:
        """Sliding windows over an image of that size (after the test resize)."""
        h, w = self.input_size(height, width)
        return len(window_spans(h, self.crop, self.stride)) * len(window_spans(w, self.crop, self.stride))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any, limit: int = 60) -> str:
    text = one_line(json.dumps(value, default=str)) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


#: The recipe's pipeline as a segmentor header records it.
RECIPE_META: Dict[str, Any] = InferencePipeline().to_meta()

__all__ = ["RECIPE_CROP", "RECIPE_META", "TEST_RULES", "InferencePipeline", "window_stride"]
