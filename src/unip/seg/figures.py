"""Figures of an evaluation (matplotlib, Agg backend): prediction / ground-truth overlays with a legend, the
confusion matrix. (Colour masks and blending: ``unip.seg.render``.)

Every figure is written through ``unip.outputs.save_figure`` (marked as unip's, atomically), so a later run
recognises and may replace it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from torch import Tensor  # noqa: E402

from unip.outputs import save_figure  # noqa: E402
from unip.seg.render import blend  # noqa: E402
from unip.text import printable  # noqa: E402

Colour = Tuple[int, int, int]


def save_overlay(image: np.ndarray, prediction: np.ndarray, label: Optional[np.ndarray],
                 class_names: Sequence[str], palette: Sequence[Colour], path: str, title: str = "") -> str:
    """A figure of ``prediction`` (and ``label`` when given) over the thermal ``image [H, W, 3]`` uint8, with
    a legend of the classes that appear in either; writes ``path`` (PNG) and returns it."""
    panels = [("prediction", prediction)] + ([("ground truth", label)] if label is not None else [])
    height, width = image.shape[:2]
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(min(16.0, 4.2 * len(panels) * max(width / height, 0.5)), 4.2))
    for ax, (name, ids) in zip(axes[0], panels):
        ax.imshow(blend(image, ids, palette))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    present = sorted({int(v) for ids in (prediction, label) if ids is not None for v in np.unique(ids)
                      if int(v) < len(class_names)})
    handles = [Patch(facecolor=np.asarray(palette[i]) / 255.0, edgecolor="black", linewidth=0.3,
                     label=printable(class_names[i])) for i in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    if title:
        fig.suptitle(printable(title), fontsize=9)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 0.95 if title else 1))
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def save_confusion(confusion: Tensor, class_names: Sequence[str], path: str, title: str = "") -> str:
    """The confusion matrix ``[C, C]`` (rows = ground truth) normalised per row (share of each class's
    labelled pixels, in percent; rows without pixels stay empty) as a heat map; writes ``path``, returns it."""
    counts = confusion.double().cpu().numpy()
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(totals > 0, counts / totals * 100, np.nan)
    size = len(class_names)
    side = min(16.0, 2.5 + 0.42 * size)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    shown = ax.imshow(shares, cmap="viridis", vmin=0, vmax=100)
    names = [printable(name) for name in class_names]
    ax.set_xticks(range(size), names, rotation=90, fontsize=7)
    ax.set_yticks(range(size), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if size <= 25:
        for row in range(size):
            for col in range(size):
                if np.isfinite(shares[row, col]) and shares[row, col] >= 0.5:
                    ax.text(col, row, f"{shares[row, col]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if shares[row, col] < 60 else "black")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="% of the row's labelled pixels")
    ax.set_title(printable(title) if title else "confusion matrix (row-normalised)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["save_confusion", "save_overlay"]
