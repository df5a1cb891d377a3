"""Label maps from a fine-tuned segmentor with the recipe's test pipeline, batched.

The test pipeline (DESIGN.md §4, the release's ``test_pipeline`` and ``slide`` test mode): an RGB uint8
image (gray repeated, 16-bit frames stretched: :func:`unip.data.images.read_rgb`) is resized to fit
(2048, 512) keeping its aspect ratio (bilinear, mmcv's rule: a 640×512 frame → 640×512, 320×256 → 640×512),
normalised with the segmentor's mean / std (96.9255 / 47.8976 on 0–255 for the release's models), run
through sliding windows (crop / stride from the segmentor's meta: 512 / 341, every window of a batch in one
forward), and the logits are resized bilinearly back to the image's own size; the arg-max is the label map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from unip.data.seg_transforms import SEG_MEAN, SEG_SCALE, SEG_STD, KeepRatioResize, normalize_steps, rescale_size
from unip.engine.distributed import resolve_device
from unip.engine.loop import resolve_precision
from unip.errors import ConfigError
from unip.memory import available_bytes, require_memory
from unip.models.heads import resize_bilinear
from unip.models.segmentor import Segmentor
from unip.seg.inference import slide_inference, window_spans

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferencePipeline:
    """What the test pipeline does to an image: fit into ``scale`` (long, short side bounds), normalise with
    ``mean`` / ``std`` on 0–255 values (one per channel), sliding windows of ``crop`` with ``stride``."""

    scale: Tuple[int, int] = SEG_SCALE
    mean: Tuple[float, float, float] = (SEG_MEAN,) * 3
    std: Tuple[float, float, float] = (SEG_STD,) * 3
    crop: int = 512
    stride: int = 341

    @classmethod
    def of(cls, segmentor: Segmentor) -> "InferencePipeline":
        """The pipeline a segmentor was trained for (``from_meta`` of its ``meta``)."""
        return cls.from_meta(segmentor.meta)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "InferencePipeline":
        """The pipeline a segmentor file's ``meta`` records: test scale, normalisation (stored on the 0–1 scale,
        like pre-training checkpoints) and window; the recipe's values where the meta has none."""
        scale = tuple(int(v) for v in meta.get("test_scale", SEG_SCALE))
        norm = meta.get("normalization") or {}
        mean = tuple(255.0 * float(v) for v in norm.get("mean", [SEG_MEAN / 255] * 3))
        std = tuple(255.0 * float(v) for v in norm.get("std", [SEG_STD / 255] * 3))
        crop = int(meta.get("crop_size", 512))
        stride = int(meta.get("stride", crop * 2 // 3))
        return cls(scale, mean, std, crop, stride)  # type: ignore[arg-type]

    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        """Size ``(h, w)`` the model sees for an image of ``height`` × ``width``."""
        return rescale_size(height, width, self.scale)

    def windows(self, height: int, width: int) -> int:
        """Sliding windows over an image of that size (after the test resize)."""
        h, w = self.input_size(height, width)
        return len(window_spans(h, self.crop, self.stride)) * len(window_spans(w, self.crop, self.stride))


def preprocess(image: np.ndarray, pipeline: InferencePipeline) -> Tensor:
    """RGB uint8 ``[H, W, 3]`` → the normalised model input ``float32 [3, h, w]`` (resized to fit
    ``pipeline.scale``, the same v2 transforms as :func:`unip.data.seg_test_transform`)."""
    steps = v2.Compose([KeepRatioResize(pipeline.scale)] + normalize_steps(list(pipeline.mean), list(pipeline.std)))
    pixels = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    return steps(pixels).as_subclass(torch.Tensor)


class Predictor:
    """A segmentor on a device, ready to turn decoded images into label maps.

    ``precision``: ``fp32`` (default), ``bf16``, ``fp16`` or ``auto`` (``resolve_precision``: autocast on CUDA,
    auto → bf16 or fp16; on a CPU bf16 runs bf16 autocast, fp16 and auto fp32).
    ``batch_size``: images per forward (all their windows at once), for images of one size."""

    def __init__(self, segmentor: Segmentor, device: str = "auto", precision: str = "fp32", batch_size: int = 4,
                 pipeline: Optional[InferencePipeline] = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: use at least 1 image per batch")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.segmentor = segmentor.eval().to(self.device)
        self.pipeline = pipeline or InferencePipeline.of(segmentor)
        self.batch_size = batch_size
        self.num_classes = segmentor.num_classes
        self.max_windows: Optional[int] = None  # windows per forward; ``plan_memory`` sets it

    def plan_memory(self) -> None:
        """Check that a batch of the largest inputs the test resize makes (512 × 2048) and one window fit in
        memory (``ConfigError`` naming the checkpoint's test settings when one image does not, ``--batch-size``
        otherwise), and cap the windows per forward (``max_windows``) so that their activations take at most half
        of what is free."""
        height, width = self.pipeline.scale[::-1]
        image = 2 * 3 * height * width * 4
        inputs = self.batch_size * image
        crop = self.pipeline.crop
        window = forward_bytes(self.segmentor, min(crop, height), min(crop, width))  # windows end at the image's edges
        require_memory(image + window, f"one image under the checkpoint's test settings (resized to fit {height}x"
                                       f"{width} pixels, windows of {self.pipeline.crop}: its test_scale and "
                                       "crop_size)", "use a machine with more memory, or a checkpoint with the "
                                                     "recipe's 2048x512 and 512", self.device)
        require_memory(inputs + window, f"--batch-size {self.batch_size} (images of up to {height}x{width} pixels "
                                        f"and windows of {self.pipeline.crop})", "lower --batch-size", self.device)
        free = available_bytes(self.device)
        self.max_windows = None if free is None else max(1, int((free - inputs) // 2 // window))

    def logits(self, batch: Tensor) -> Tensor:
        """Sliding-window logits ``[B, classes, h, w]`` of normalised inputs ``[B, 3, h, w]`` of one size."""
        with torch.no_grad(), self.precision.autocast():
            return slide_inference(self.segmentor, batch.to(self.device), self.pipeline.crop, self.pipeline.stride,
                                   max_batch=self.max_windows)

    def predict(self, images: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Label maps (uint8, uint16 beyond 256 classes) ``[H, W]`` at each image's own size for RGB uint8
        images ``[H, W, 3]``; consecutive images of one size share forwards of up to ``batch_size``."""
        labels: List[np.ndarray] = []
        start = 0
        while start < len(images):
            size = images[start].shape[:2]
            stop = start + 1
            while stop < len(images) and stop - start < self.batch_size and images[stop].shape[:2] == size:
                stop += 1
            batch = torch.stack([preprocess(image, self.pipeline) for image in images[start:stop]])
            logits = self.logits(batch)
            for one in logits:  # resize one at a time: the full-size logits of a batch can be large
                labels.append(label_map(one, size, self.num_classes))
            start = stop
        return labels


def label_map(logits: Tensor, size: Tuple[int, int], num_classes: int) -> np.ndarray:
    """Arg-max of ``logits [classes, h, w]`` resized bilinearly to ``size`` (the release's ``rescale``):
    ``[H, W]`` uint8 (uint16 beyond 256 classes)."""
    full = resize_bilinear(logits[None].float(), tuple(size))[0]
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    return full.argmax(0).cpu().numpy().astype(dtype)


def forward_bytes(segmentor: Segmentor, height: int, width: Optional[int] = None) -> int:
    """Rough peak activation memory, in bytes, of one ``height`` × ``width`` input (square without ``width``)
    through ``segmentor`` in eval mode: the backbone's tokens and attention plus the neck's and UperNet's maps
    at stride 4 (the largest)."""
    width = height if width is None else width
    backbone = segmentor.backbone
    patch = backbone.patch_size
    tokens = (height // patch) * (width // patch) + backbone.num_prefix_tokens
    dim = backbone.embed_dim
    channels = int(segmentor.config.get("decode_head", {}).get("channels", dim))
    stride4 = (height // 4) * (width // 4)
    backbone_bytes = tokens * dim * 12 + max(backbone.heads_per_block) * tokens * tokens * 2
    head_bytes = stride4 * (2 * dim + 10 * channels + segmentor.num_classes) if segmentor.neck is not None else 0
    return 4 * (backbone_bytes + head_bytes)
