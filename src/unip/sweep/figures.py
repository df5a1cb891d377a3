"""Figures of a sweep report (matplotlib, Agg backend), written through ``unip.outputs.save_figure``.

* ``benchmark_figure``: the paper's benchmark figure — average mIoU against backbone GFLOPs (log scale), one
  line per family, fine-tuning and linear probing side by side; the paper's own points (``unip.sweep.paper``)
  as hollow grey markers labelled "paper: ...".
* ``layerwise_figure``: per backbone, the layer-wise linear-probing mIoU per block (one line per data set,
  left axis) and the block's NMI from ``unip analyze`` (right axis, dashed, markers coloured by pattern): the
  paper's argument that hybrid layers segment best.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter  # noqa: E402

from unip.outputs import save_figure  # noqa: E402
from unip.sweep.paper import PAPER_POINTS  # noqa: E402
from unip.sweep.report import BackboneRow, LayerwiseCurve, nmi_by_layer  # noqa: E402
from unip.text import printable  # noqa: E402

PATTERN_COLOURS = {"local": "#1f77b4", "hybrid": "#2ca02c", "global": "#d62728"}
PAPER_MARKERS = {"MAE": "s", "iBOT": "^", "DINO": "D", "UNIP (MAE-L)": "o", "UNIP (iBOT-L)": "P"}


def benchmark_figure(rows: Sequence[BackboneRow], paper_gflops: Mapping[str, float], path: Path) -> Path:
    """Average mIoU against backbone GFLOPs per family (FT left, LP right) with the paper's points; writes
    ``path`` (PNG) and returns it."""
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.6))
    families = list(dict.fromkeys(row.family for row in rows))
    colours = {family: plt.get_cmap("tab10")(i % 10) for i, family in enumerate(families)}
    for ax, protocol, title in ((axes[0], "ft", "fine-tuning"), (axes[1], "lp", "linear probing")):
        _paper(ax, protocol, paper_gflops)
        for family in families:
            points = sorted((row.cost.backbone_gflops, row.average[protocol], row.name) for row in rows
                            if row.family == family and row.average[protocol] is not None
                            and row.cost.backbone_gflops is not None)
            if not points:
                continue
            x, y, _ = zip(*points)
            ax.plot(x, y, marker="o", ms=7, lw=2, color=colours[family], label=printable(family))
            for xi, yi, name in points:
                ax.annotate(printable(name), (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=7,
                            color=colours[family])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sorted(paper_gflops.values())))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{value:.0f}\nViT-{size[0].upper()}" for size, value in
                                                     sorted(paper_gflops.items(), key=lambda item: item[1])]))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("backbone GFLOPs (512×512 input)")
        ax.set_ylabel("average mIoU (%)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = _legend_entries(axes)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.suptitle("average test mIoU against backbone compute (grey, hollow: the paper's results)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1 + 0.03 * (len(labels) // 5), 1, 0.95))
    save_figure(fig, str(path))
    plt.close(fig)
    return path


def _paper(ax: Any, protocol: str, paper_gflops: Mapping[str, float]) -> None:
    families = list(dict.fromkeys(point.family for point in PAPER_POINTS))
    for family in families:
        points = sorted((paper_gflops[p.size], getattr(p, protocol), p.name) for p in PAPER_POINTS
                        if p.family == family and getattr(p, protocol) is not None)
        x, y, _ = zip(*points)
        ax.plot(x, y, marker=PAPER_MARKERS.get(family, "o"), ms=6, lw=1, ls="--", color="0.6", mfc="none",
                label=f"paper: {family}")


def _legend_entries(axes: Sequence[Any]) -> tuple:
    seen: Dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    ours = [label for label in seen if not label.startswith("paper: ")]
    paper = [label for label in seen if label.startswith("paper: ")]
    labels = ours + paper
    return [seen[label] for label in labels], labels


def layerwise_figure(curves: Sequence[LayerwiseCurve], profiles: Mapping[str, Mapping[str, Any]],
                     path: Path) -> Path:
    """One panel per backbone: layer-wise LP mIoU per block (left axis, a line per data set) and NMI per block
    (right axis); writes ``path`` (PNG) and returns it."""
    backbones: List[str] = list(dict.fromkeys(curve.backbone for curve in curves))
    columns = min(3, len(backbones))
    rows = math.ceil(len(backbones) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    for index, backbone in enumerate(backbones):
        ax = axes[index // columns][index % columns]
        for curve in (c for c in curves if c.backbone == backbone):
            layers = sorted(curve.miou)
            ax.plot(layers, [curve.miou[layer] for layer in layers], marker="o", lw=2,
                    label=f"LP mIoU, {printable(curve.dataset)}")
        ax.set_xlabel("block")
        ax.set_ylabel("layer-wise LP mIoU (%)")
        ax.set_title(printable(backbone), fontsize=10)
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if backbone in profiles:
            nmi = nmi_by_layer(profiles[backbone])
            blocks = sorted(nmi)
            twin = ax.twinx()
            twin.plot(blocks, [nmi[b][0] for b in blocks], ls="--", color="black", lw=1, label="NMI (unip analyze)")
            colours = [PATTERN_COLOURS.get(nmi[b][1], "grey") for b in blocks]
            twin.scatter(blocks, [nmi[b][0] for b in blocks], c=colours,
                         s=22, zorder=3)
            twin.set_ylabel("NMI")
            twin.set_ylim(bottom=0)
            extra_handles, extra_labels = twin.get_legend_handles_labels()
            handles += extra_handles + [Line2D([], [], ls="none", marker="o", color=colour)
                                        for colour in PATTERN_COLOURS.values()]
            labels += extra_labels + list(PATTERN_COLOURS)
        else:
            ax.text(0.5, 0.02, "no NMI profile (analysis not finished)", transform=ax.transAxes, ha="center",
                    fontsize=7, color="grey")
        ax.legend(handles, labels, fontsize=7, loc="best")
    for index in range(len(backbones), rows * columns):
        axes[index // columns][index % columns].axis("off")
    fig.suptitle("layer-wise linear probing (one block alone) next to the attention pattern of each block",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, str(path))
    plt.close(fig)
    return path


__all__ = ["benchmark_figure", "layerwise_figure"]
