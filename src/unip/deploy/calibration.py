"""The frames that calibrate an int8 export and check every export: a folder of the user's frames, or generated
thermal scenes, as inputs of the exported graph's size.

* **A folder** (``--calibrate DIR``): its image files (searched recursively, sorted; regular files only), at most
  ``limit`` of them spread evenly over the sorted list (consecutive video frames are alike); each is read as
  ``unip predict`` reads it (8- or 16-bit, gray repeated to three channels: :func:`unip.data.images.read_rgb`),
  put through the segmentor's test pipeline (resize to fit its test scale, normalise:
  :meth:`unip.seg.pipeline.InferencePipeline.preprocess`) and cut into the windows of the export size that
  sliding-window inference would feed the graph (one window when the export size is the frame's). A file that
  cannot be decoded is skipped and counted; a folder with no readable frame is a ``DataError``.
* **Generated** (no folder): ``count`` thermal scenes of ``unip.data.synth`` rendered at the export size and
  normalised (no resize: they are drawn at the size the graph takes).

Every input is float32 ``[batch, 3, H, W]``; the windows are grouped ``batch`` at a time (the last group filled
up with the first windows again).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from unip.data.images import ImageReadError, read_rgb, walk_once
from unip.data.layouts import IMAGE_SUFFIXES
from unip.data.seg_transforms import normalize_steps
from unip.data.synth import render_scene, to_uint8
from unip.errors import DataError
from unip.seg.inference import window_spans, window_stride
from unip.seg.pipeline import InferencePipeline
from unip.text import printable

log = logging.getLogger(__name__)

#: Frames of a ``--calibrate`` folder used at most (spread over the folder): MinMax ranges settle within a few dozen
#: frames of one camera, and each frame costs a forward of the fp32 graph (calibration), of PyTorch and of the
#: export (the check).
DEFAULT_FRAMES = 32
#: Generated scenes that check an export made without a folder (and calibrate an int8 one).
GENERATED_FRAMES = 8


@dataclass
class CheckFrames:
    """Inputs of the exported graph (float32 ``[batch, 3, H, W]`` each) and where they come from."""

    inputs: List[np.ndarray]
    source: str
    frames: int
    skipped: int = 0
    skipped_names: List[str] = field(default_factory=list)

    def describe(self) -> str:
        """``"32 frames of DIR (2 unreadable files skipped)"`` / ``"8 generated thermal scenes"``."""
        skipped = f" ({self.skipped} unreadable file{'s' if self.skipped != 1 else ''} skipped)" if self.skipped else ""
        return f"{self.source}{skipped}"


def folder_frames(folder: str, pipeline: InferencePipeline, size: Tuple[int, int], batch: int = 1,
                  limit: int = DEFAULT_FRAMES, option: str = "--calibrate") -> CheckFrames:
    """Up to ``limit`` frames of ``folder`` as graph inputs of ``size`` (module docstring). Raises ``DataError``
    naming ``option`` when the folder is missing or holds no readable image."""
    if not os.path.isdir(folder):
        raise DataError(f"{option} {printable(folder)}: not a folder; give a folder of frames from your camera "
                        f"({', '.join(IMAGE_SUFFIXES)}, 8- or 16-bit)")
    files = [os.path.join(root, name) for root, _, names in walk_once(folder) for name in names
             if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
    chosen = spread(files, limit)
    windows: List[torch.Tensor] = []
    skipped: List[str] = []
    for path in chosen:
        try:
            image = read_rgb(path)
        except ImageReadError as err:
            log.info("calibration: skipped %s", err)
            skipped.append(path)
            continue
        windows += export_windows(pipeline.preprocess(image), size)
    read = len(chosen) - len(skipped)
    if not read:
        what = (f"{len(skipped)} image file(s), none readable (e.g. {printable(skipped[0])})" if skipped
                else "no image file")
        raise DataError(f"{option} {printable(folder)}: {what}; put frames from your camera "
                        f"({', '.join(IMAGE_SUFFIXES)}, 8- or 16-bit) in it")
    if len(chosen) < len(files):
        log.info("calibration: %d of the %d image files of %s, spread over the folder", len(chosen), len(files),
                 printable(folder))
    source = f"{read} frame{'s' if read != 1 else ''} of {printable(folder)}"
    return CheckFrames(batched(windows, batch), source, read, len(skipped), skipped)


def generated_frames(pipeline: InferencePipeline, size: Tuple[int, int], batch: int = 1,
                     count: int = GENERATED_FRAMES) -> CheckFrames:
    """``count`` generated thermal scenes of ``size``, normalised as the pipeline does (module docstring)."""
    normalize = v2.Compose(normalize_steps(list(pipeline.mean), list(pipeline.std)))
    windows = []
    for index in range(count):
        temperature, _ = render_scene(0, index, size[0], size[1], name="calibration")
        gray = torch.from_numpy(to_uint8(temperature))[None].repeat(3, 1, 1)
        windows.append(normalize(tv_tensors.Image(gray)).as_subclass(torch.Tensor))
    return CheckFrames(batched(windows, batch), f"{count} generated thermal scene{'s' if count != 1 else ''}", count)


def spread(items: Sequence[str], limit: int) -> List[str]:
    """At most ``limit`` of ``items``, evenly spaced (first and last included), in order."""
    if len(items) <= limit:
        return list(items)
    if limit == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def export_windows(x: torch.Tensor, size: Tuple[int, int]) -> List[torch.Tensor]:
    """The windows of ``size`` (H, W) that cover the preprocessed frame ``x [3, h, w]`` (mmseg's placement with a
    stride of two thirds of the window; a side shorter than the window is padded with zeros, the normalised mean,
    at the bottom/right as ``whole_inference`` pads)."""
    height, width = size
    pad_h, pad_w = max(height - x.shape[-2], 0), max(width - x.shape[-1], 0)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    rows = window_spans(x.shape[-2], height, window_stride(height))
    cols = window_spans(x.shape[-1], width, window_stride(width))
    return [x[:, y0:y1, x0:x1] for y0, y1 in rows for x0, x1 in cols]


def batched(windows: Sequence[torch.Tensor], batch: int) -> List[np.ndarray]:
    """``windows`` ``[3, H, W]`` stacked ``batch`` at a time as float32 arrays (the last group filled up with the
    first windows again)."""
    groups = []
    for first in range(0, len(windows), batch):
        group = list(windows[first:first + batch])
        group += [windows[i % len(windows)] for i in range(batch - len(group))]
        groups.append(torch.stack(group).float().numpy())
    return groups


__all__ = ["DEFAULT_FRAMES", "GENERATED_FRAMES", "CheckFrames", "batched", "export_windows", "folder_frames",
           "generated_frames", "spread"]
