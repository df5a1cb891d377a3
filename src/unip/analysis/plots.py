"""Figures of the analysis (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402

from unip.analysis.patterns import PatternThresholds  # noqa: E402
from unip.analysis.profile import AttentionProfile  # noqa: E402
from unip.outputs import save_figure  # noqa: E402
from unip.text import printable  # noqa: E402

_LABELS = {"nmi": "NMI", "distance": "attention distance (px)", "entropy": "attention entropy (nats)"}


@dataclass
class Curve:
    """One model's line in a depth plot: its label, profile and the layer selected for distillation."""

    label: str
    profile: AttentionProfile
    selected: Optional[int] = None


def _depth_axis(curves: Sequence[Curve]) -> Tuple[bool, str]:
    relative = len({c.profile.depth for c in curves}) > 1
    return relative, "relative depth (layer / depth)" if relative else "layer"


def plot_metric_by_depth(curves: Sequence[Curve], metric: str, path: str,
                         thresholds: Optional[PatternThresholds] = None) -> str:
    """Draw ``metric`` against depth, one line per model (head mean; band = min..max over heads), a star on
    the selected layer; models of different depth share a relative-depth axis. Writes ``path``, returns it."""
    relative, xlabel = _depth_axis(curves)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for curve in curves:
        layers = curve.profile.layers
        x = np.array([s.layer for s in layers], dtype=float)
        if relative:
            x = x / curve.profile.depth
        heads = [np.asarray(s.mean[metric]) for s in layers]
        line, = ax.plot(x, curve.profile.values(metric), marker="o", ms=3, label=printable(curve.label))
        ax.fill_between(x, [h.min() for h in heads], [h.max() for h in heads], color=line.get_color(), alpha=0.15)
        if curve.selected is not None:
            index = [s.layer for s in layers].index(curve.selected)
            ax.plot(x[index], curve.profile.values(metric)[index], marker="*", ms=14, color=line.get_color(),
                    markeredgecolor="black", linestyle="none")
    if metric == "nmi" and thresholds is not None:
        for value, name in ((thresholds.nmi_local, "local ≥"), (thresholds.nmi_global, "global ≤")):
            ax.axhline(value, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(f"{name} {value:g}", (0.01, value), xycoords=("axes fraction", "data"), fontsize=7,
                        color="grey", va="bottom")
    references = {round(curve.profile.uniform_distance, 6) for curve in curves}
    if metric == "distance" and len(references) == 1:
        value = references.pop()
        ax.axhline(value, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(f"uniform attention {value:.0f} px", (0.01, value), xycoords=("axes fraction", "data"),
                    fontsize=7, color="grey", va="bottom")
    ax.set_xlabel(xlabel)
    if not relative:  # layers are whole numbers: no 1.5 tick on a shallow model's axis
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(_LABELS.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{_LABELS.get(metric, metric)} by depth (★ selected layer)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_query_attention(image: np.ndarray, attention: Tensor, points: Sequence[Tuple[int, int]],
                         layers: Sequence[int], path: str, title: str = "") -> str:
    """One row per query point: the image with the point, then its attention ``attention[q, l]`` over the
    image at each of ``layers`` (``attention`` is ``[points, layers, rows, cols]``). Writes ``path``."""
    height, width = image.shape
    fig, axes = plt.subplots(len(points), len(layers) + 1, squeeze=False,
                             figsize=(2.0 * (len(layers) + 1), 2.0 * len(points) * height / width + 0.4))
    for row, (x, y) in enumerate(points):
        axes[row, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].plot(x, y, marker="x", color="red", ms=8, mew=2)
        axes[row, 0].set_title(f"query ({x},{y})", fontsize=8)
        for col, layer in enumerate(layers, start=1):
            axes[row, col].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row, col].imshow(attention[row, col - 1].numpy(), cmap="inferno", alpha=0.6,
                                  extent=(0, width, height, 0), interpolation="nearest")
            axes[row, col].plot(x, y, marker="x", color="cyan", ms=5)
            axes[row, col].set_title(f"layer {layer}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(printable(title), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_feature_pca(image: np.ndarray, colours: List[Tuple[str, Tensor]], path: str) -> str:
    """The image, then each model's PCA colouring ``[rows, cols, 3]`` of its last-layer features. Writes ``path``."""
    height, width = image.shape
    fig, axes = plt.subplots(1, len(colours) + 1, squeeze=False, figsize=(2.6 * (len(colours) + 1), 2.8))
    axes[0, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("image", fontsize=8)
    for ax, (label, rgb) in zip(axes[0, 1:], colours):
        ax.imshow(rgb.numpy(), extent=(0, width, height, 0), interpolation="nearest")
        ax.set_title(f"{printable(label)}: last-layer PCA", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
