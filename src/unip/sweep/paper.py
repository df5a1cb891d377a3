"""The paper's own benchmark points (docs/recipe.md#the-papers-results): average mIoU over SODA, MFNet and
SCUT-Seg under fine-tuning and linear probing, read off the release's benchmark figure (±0.3; the DINO
linear-probing values are marked ≈ there). ``unip sweep report`` draws them as reference markers, at the
backbone GFLOPs of the size's architecture at 512 px (computed, not read off the figure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class PaperPoint:
    """One model of the paper's benchmark figure: name, family (one line per family), size, FT and LP."""

    name: str
    family: str
    size: str
    ft: Optional[float]
    lp: Optional[float]


PAPER_POINTS: Tuple[PaperPoint, ...] = (
    PaperPoint("UNIP-T (MAE-L)", "UNIP (MAE-L)", "tiny", 60.3, 35.8),
    PaperPoint("UNIP-S (MAE-L)", "UNIP (MAE-L)", "small", 64.4, 44.0),
    PaperPoint("UNIP-B (MAE-L)", "UNIP (MAE-L)", "base", 65.2, 47.4),
    PaperPoint("UNIP-T (iBOT-L)", "UNIP (iBOT-L)", "tiny", 60.6, 41.1),
    PaperPoint("UNIP-S (iBOT-L)", "UNIP (iBOT-L)", "small", 64.7, 48.4),
    PaperPoint("UNIP-B (iBOT-L)", "UNIP (iBOT-L)", "base", 65.1, 51.5),
    PaperPoint("MAE-T", "MAE", "tiny", 46.7, 22.2),
    PaperPoint("MAE-S", "MAE", "small", 55.4, 31.1),
    PaperPoint("MAE-B", "MAE", "base", 60.9, 34.6),
    PaperPoint("MAE-L", "MAE", "large", 64.3, 42.4),
    PaperPoint("iBOT-S", "iBOT", "small", 62.1, 45.6),
    PaperPoint("iBOT-B", "iBOT", "base", 63.8, 47.8),
    PaperPoint("iBOT-L", "iBOT", "large", 64.9, 49.5),
    PaperPoint("DINO-S", "DINO", "small", 61.7, 45.0),
    PaperPoint("DINO-B", "DINO", "base", 62.7, 47.2),
)

__all__ = ["PAPER_POINTS", "PaperPoint"]
