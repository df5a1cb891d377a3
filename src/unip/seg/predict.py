"""Label maps from a fine-tuned segmentor with its test pipeline (``unip.seg.pipeline.InferencePipeline``: the
recipe's resize, normalisation and sliding windows, read from the segmentor's header), batched: every window of a
batch in one forward; the logits are resized bilinearly back to the image's own size; the arg-max is the label map.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from unip.engine.distributed import resolve_device
from unip.engine.loop import resolve_precision
from unip.engine.settings import COMPILE_MODES
from unip.errors import ConfigError
from unip.memory import available_bytes, require_memory
from unip.models.heads import resize_bilinear
from unip.models.segmentor import Segmentor
from unip.seg.inference import slide_inference
from unip.seg.pipeline import InferencePipeline

log = logging.getLogger(__name__)


class Predictor:
    """A segmentor on a device, ready to turn decoded images into label maps.

    ``precision``: ``fp32`` (default), ``bf16``, ``fp16`` or ``auto`` (``resolve_precision``: autocast on CUDA,
    auto → bf16 or fp16; on a CPU bf16 runs bf16 autocast, fp16 and auto fp32).
    ``batch_size``: images per forward (all their windows at once), for images of one size.
    ``compile_mode``: run the forwards through ``torch.compile`` in this mode (:func:`compiled_for_inference`);
    None: eager."""

    def __init__(self, segmentor: Segmentor, device: str = "auto", precision: str = "fp32", batch_size: int = 4,
                 pipeline: Optional[InferencePipeline] = None, compile_mode: Optional[str] = None,
                 compile_backend: str = "inductor") -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: use at least 1 image per batch")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.segmentor = segmentor.eval().to(self.device)
        self.compile_mode = compile_mode
        self.model: nn.Module = self.segmentor if compile_mode is None else \
            compiled_for_inference(self.segmentor, compile_mode, self.device, compile_backend)
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
        window = forward_bytes(self.segmentor, min(crop, height), min(crop, width),  # windows end at the image's edges
                               fused_attention=True)
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
        quiet = quiet_torch_build_logs() if self.compile_mode else contextlib.nullcontext()
        with torch.no_grad(), self.precision.autocast(), quiet:
            return slide_inference(self.model, batch.to(self.device), self.pipeline.crop, self.pipeline.stride,
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
            batch = torch.stack([self.pipeline.preprocess(image) for image in images[start:stop]])
            logits = self.logits(batch)
            for one in logits:  # resize one at a time: the full-size logits of a batch can be large
                labels.append(label_map(one, size, self.num_classes))
            start = stop
        return labels


@contextlib.contextmanager
def quiet_torch_build_logs() -> Iterator[None]:
    """Inductor on a machine without CUDA logs a warning about ``CUDA_HOME`` on stderr when it first compiles;
    unip's stderr is for its own one-line messages."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def compiled_for_inference(segmentor: Segmentor, mode: str, device: torch.device, backend: str = "inductor"
                           ) -> nn.Module:
    """``segmentor`` through ``torch.compile`` for prediction (``--compile MODE``): ``default`` freezes the weights
    into the graph as constants (inductor's inference setting, as ``unip bench``'s compiled rows), ``reduce-overhead``
    replays each window-batch shape as a CUDA graph (CUDA only), ``max-autotune`` searches kernel configurations
    (slow to start). The first forward of each new shape compiles (seconds to minutes); the labels are the eager
    model's up to floating-point reordering. Raises ``ConfigError`` for an unknown mode or CUDA graphs off CUDA."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"--compile {mode}: choose one of {', '.join(COMPILE_MODES)}")
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ConfigError(f"--compile {mode}: replays CUDA graphs, so it needs a CUDA device (this run uses "
                          f"{device}); use --compile default, or --device cuda")
    if mode == "default":
        options = {"freezing": True} if backend == "inductor" else None
        return torch.compile(segmentor, backend=backend, options=options)
    return torch.compile(segmentor, backend=backend, mode=mode)


def label_map(logits: Tensor, size: Tuple[int, int], num_classes: int) -> np.ndarray:
    """Arg-max of ``logits [classes, h, w]`` resized bilinearly to ``size`` (the release's ``rescale``):
    ``[H, W]`` uint8 (uint16 beyond 256 classes)."""
    full = resize_bilinear(logits[None].float(), tuple(size))[0]
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    return full.argmax(0).cpu().numpy().astype(dtype)


def forward_bytes(segmentor: Segmentor, height: int, width: Optional[int] = None, fused_attention: bool = False
                  ) -> int:
    """Rough peak activation memory, in bytes, of one ``height`` × ``width`` input (square without ``width``)
    through ``segmentor`` in eval mode: the backbone's tokens and attention plus the neck's and UperNet's maps
    at stride 4 (the largest). ``fused_attention``: the forward runs PyTorch's fused attention
    (``scaled_dot_product_attention``: flash or memory-efficient kernels, on CPUs and GPUs), which never holds a
    tokens × tokens matrix; without it (an exported ONNX graph) each block's attention matrix is counted."""
    width = height if width is None else width
    backbone = segmentor.backbone
    patch = backbone.patch_size
    tokens = (height // patch) * (width // patch) + backbone.num_prefix_tokens
    dim = backbone.embed_dim
    channels = int(segmentor.config.get("decode_head", {}).get("channels", dim))
    stride4 = (height // 4) * (width // 4)
    attention = 0 if fused_attention else max(backbone.heads_per_block) * tokens * tokens * 2
    backbone_bytes = tokens * dim * 12 + attention
    head_bytes = stride4 * (2 * dim + 10 * channels + segmentor.num_classes) if segmentor.neck is not None else 0
    return 4 * (backbone_bytes + head_bytes)
