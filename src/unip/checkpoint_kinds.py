"""The kinds of checkpoint file ``unip info`` describes: one table, kind → recogniser + describer.

``inspect_checkpoint`` asks each kind in turn whether it recognises a source; the first that does describes it.
A new kind (a file that another part of unip writes) is one entry here. This module sits above ``unip.seg`` and
``unip.checkpoint``, so that neither needs the other to describe a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from unip.checkpoint import PathLike, architecture_of, describe_backbone
from unip.data.thermal import describe_thermal, is_thermal_file
from unip.seg.checkpoint import ARCHITECTURE as SEGMENTOR, describe_segmentor

#: ``(summary, problem)``: the text ``unip info`` prints, and why the verbs that use the model refuse the file
#: (``None`` when they read it).
Description = Tuple[str, Optional[str]]


@dataclass(frozen=True)
class CheckpointKind:
    """One kind of checkpoint file: ``recognise(source)`` says whether a source is one; ``describe(source,
    allow_partial)`` returns its ``Description``."""

    name: str
    recognise: Callable[[PathLike], bool]
    describe: Callable[[PathLike, bool], Description]


def _is_segmentor(source: PathLike) -> bool:
    return architecture_of(source) == SEGMENTOR


def _describe_segmentor(source: PathLike, allow_partial: bool) -> Description:
    return describe_segmentor(source), None  # a segmentor is read strictly: any problem is raised already


#: Tried in this order; the last one recognises every source. A thermal-camera file or an image (recognised by its
#: content) is no checkpoint, but ``unip info`` describes it too: camera, raster, counts, °C, calibration.
CHECKPOINT_KINDS: Tuple[CheckpointKind, ...] = (
    CheckpointKind("thermal file or image", lambda source: is_thermal_file(str(source)),
                   lambda source, allow_partial: (describe_thermal(str(source)), None)),
    CheckpointKind("segmentor", _is_segmentor, _describe_segmentor),
    CheckpointKind("backbone", lambda source: True, describe_backbone),
)


def inspect_checkpoint(source: PathLike, allow_partial: bool = True) -> Description:
    """``(summary, problem)``: ``describe_checkpoint``'s text, and why the verbs that use a model (``analyze``,
    ``pretrain --teacher``, ``finetune --pretrained``) refuse ``source`` (missing, mis-shaped or non-finite
    weights: the ``CheckpointError`` message they give), ``None`` when they read it. ``unip info`` prints the
    summary, then exits 2 with the problem."""
    kind = next(kind for kind in CHECKPOINT_KINDS if kind.recognise(source))
    return kind.describe(source, allow_partial)


def describe_checkpoint(source: PathLike, allow_partial: bool = True) -> str:
    """A human-readable summary of a checkpoint: architecture, where it came from, load report (for a
    segmentor also its neck, heads and classes)."""
    return inspect_checkpoint(source, allow_partial)[0]


__all__ = ["CHECKPOINT_KINDS", "CheckpointKind", "Description", "describe_checkpoint", "inspect_checkpoint"]
