"""Grayscale statistics and size histograms of a manifest or pack, per source and overall.

``mean``/``std`` are in [0, 1] and weight every image equally (mean of per-image means; std from the mean
of per-image second moments), because pre-training draws images, not pixels, uniformly; these are the
numbers to compare with InfMix's 0.3801 / 0.1871. ``pixel_mean``/``pixel_std`` weight every pixel equally.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from unip.atomic import atomic_write_text
from unip.data.images import ImageReadError
from unip.data.packed import GrayImages, open_images
from unip.data.parallel import thread_map
from unip.errors import ConfigError, DataError
from unip.outputs import claim, is_our_json, is_our_png, out_file, save_figure
from unip.text import printable

#: Keys every statistics document holds (how a later run recognises its own file).
_DOCUMENT_KEYS = ("input", "overall", "sources", "short_side_bins")

#: Upper edges of the short-side histogram bins (pixels); the last bin is open.
SHORT_SIDE_BINS: Tuple[int, ...] = (128, 256, 384, 512, 640, 768, 1024, 2048)


class _Moments:
    """Running sums for image- and pixel-weighted mean/std and the size histogram of one group."""

    def __init__(self) -> None:
        self.images = 0
        self.unreadable = 0
        self.sum_mean = self.sum_sq = 0.0
        self.pixels = 0
        self.pix_sum = self.pix_sq = 0.0
        self.short_hist = [0] * (len(SHORT_SIDE_BINS) + 1)
        self.sizes: Dict[str, int] = {}

    def add(self, gray: np.ndarray) -> None:
        x = gray.astype(np.float64) / 255.0
        s, sq, n = float(x.sum()), float(np.square(x).sum()), x.size
        self.images += 1
        self.sum_mean += s / n
        self.sum_sq += sq / n
        self.pixels += n
        self.pix_sum += s
        self.pix_sq += sq
        h, w = gray.shape
        self.short_hist[int(np.searchsorted(SHORT_SIDE_BINS, min(h, w), side="left"))] += 1
        key = f"{w}x{h}"
        self.sizes[key] = self.sizes.get(key, 0) + 1

    def result(self) -> Dict[str, object]:
        def mean_std(total: float, total_sq: float, n: int) -> Tuple[Optional[float], Optional[float]]:
            if n == 0:  # every image of the group unreadable: no statistics (null in the JSON)
                return None, None
            m = total / n
            return m, math.sqrt(max(total_sq / n - m * m, 0.0))
        mean, std = mean_std(self.sum_mean, self.sum_sq, self.images)
        pmean, pstd = mean_std(self.pix_sum, self.pix_sq, self.pixels)
        top = sorted(self.sizes.items(), key=lambda kv: -kv[1])[:10]
        return {"images": self.images, "unreadable": self.unreadable, "mean": mean, "std": std,
                "pixel_mean": pmean, "pixel_std": pstd, "short_side_hist": self.short_hist, "top_sizes": dict(top)}


def compute_stats(path: str, limit: Optional[int] = None, seed: int = 0,
                  workers: Optional[int] = None) -> Dict[str, object]:
    """Return statistics of the manifest file or pack folder ``path``.

    The dict holds ``overall`` and ``sources`` (name → the same fields): ``images``, ``unreadable`` (how many
    could not be read now), ``mean``, ``std``, ``pixel_mean``, ``pixel_std`` (None for a source none of whose
    images could be read), ``short_side_hist`` (counts per bin of ``short_side_bins``) and ``top_sizes``; plus
    ``unreadable``: ``[{"path", "source", "reason"}]``, the files skipped. ``limit`` samples that many images at
    random (by ``seed``) instead of reading all.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: read at least 1 image")
    data: GrayImages = open_images(path, transform=None)
    if len(data) == 0:
        raise DataError(f"{path}: holds no images; build it with `unip data infmix` from image folders")
    order = np.arange(len(data))
    if limit is not None and limit < len(order):
        order = np.sort(np.random.default_rng(seed).choice(order, size=limit, replace=False))
    overall, per_source = _Moments(), {}  # type: _Moments, Dict[str, _Moments]
    unreadable: List[Dict[str, str]] = []

    def read(i: int):
        try:
            return data.read(int(i))
        except ImageReadError as err:
            return err

    results = thread_map(read, order, workers)
    for i, gray in tqdm(zip(order, results), total=len(order), desc="stats", unit="img", disable=None):
        source = per_source.setdefault(data.source(int(i)), _Moments())
        if isinstance(gray, ImageReadError):
            unreadable.append({"path": gray.path, "source": data.source(int(i)), "reason": gray.reason})
            overall.unreadable += 1
            source.unreadable += 1
            continue
        overall.add(gray)
        source.add(gray)
    if overall.images == 0:
        first = unreadable[0]
        raise DataError(f"{path}: none of the {len(order)} images could be read (first: {first['path']}: "
                        f"{first['reason']})")
    return {"input": os.path.abspath(path), "sampled": len(order), "total": len(data),
            "short_side_bins": list(SHORT_SIDE_BINS), "overall": overall.result(),
            "sources": {name: m.result() for name, m in per_source.items()}, "unreadable": unreadable}


def format_summary(stats: Dict[str, Any], shown: int = 3) -> str:
    """The printed summary of :func:`compute_stats`: a first line when only a sample was read (``--limit``),
    one line per group (overall, then each source) with its images, mean and std and, when files could not be
    read, a line counting them by reason and naming the first ``shown``."""
    groups = [("overall", stats["overall"]), *stats["sources"].items()]
    lines = [_group_line(name, group) for name, group in groups]
    sampled, total = stats.get("sampled"), stats.get("total")
    if sampled is not None and total is not None and sampled < total:
        lines.insert(0, f"a random sample of {sampled:,} of the {total:,} images (--limit): the numbers below "
                        f"estimate the whole set")
    unreadable: List[Dict[str, str]] = stats["unreadable"]
    if unreadable:
        reasons: Dict[str, int] = {}
        for entry in unreadable:
            reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
        counts = ", ".join(f"{reason} {n:,}" for reason, n in sorted(reasons.items()))
        named = ", ".join(printable(entry["path"]) for entry in unreadable[:shown])
        more = f" and {len(unreadable) - shown:,} more" if len(unreadable) > shown else ""
        hint = "; rescan with `unip data infmix` to drop files gone since the scan" if "missing" in reasons else ""
        lines.append(f"skipped {len(unreadable):,} unreadable file(s) ({counts}): {named}{more} (all listed under "
                     f"'unreadable' in the JSON){hint}")
    return "\n".join(lines)


def _group_line(name: str, group: Dict[str, Any]) -> str:
    numbers = ("  no readable image" if group["mean"] is None else
               f"  mean {group['mean']:.4f}  std {group['std']:.4f}")
    skipped = f"  unreadable {group['unreadable']:,}" if group.get("unreadable") else ""
    return f"{printable(name):<20} images {group['images']:>9,}{numbers}{skipped}"


def bin_labels() -> List[str]:
    """Return the text label of each short-side bin (``"≤128"`` ... ``">2048"``)."""
    return [f"≤{b}" for b in SHORT_SIDE_BINS] + [f">{SHORT_SIDE_BINS[-1]}"]


def plot_stats(stats: Dict[str, object], png: str) -> None:
    """Write a PNG with the mean ± std per source and the short-side histogram per source."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources: Dict[str, Dict[str, object]] = stats["sources"]  # type: ignore[assignment]
    names = list(sources)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    means = [math.nan if sources[n]["mean"] is None else float(sources[n]["mean"]) for n in names]
    stds = [math.nan if sources[n]["std"] is None else float(sources[n]["std"]) for n in names]
    ax1.bar(range(len(names)), means, yerr=stds, capsize=3, color="0.5")
    ax1.set_xticks(range(len(names)), [printable(n) for n in names], rotation=45, ha="right")
    ax1.set_ylabel("gray level (0-1), mean ± std")
    ax1.set_title(f"overall {float(stats['overall']['mean']):.4f} ± {float(stats['overall']['std']):.4f}")
    labels = bin_labels()
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        hist = sources[name]["short_side_hist"]
        ax2.bar(np.arange(len(labels)) + k * width, hist, width=width, label=printable(name))
    ax2.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=45, ha="right")
    ax2.set_xlabel("short side (px)")
    ax2.set_ylabel("images")
    ax2.legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    save_figure(fig, png, dpi=100)
    plt.close(fig)


def output_paths(prefix: str, option: str = "--out") -> Tuple[str, str]:
    """``(<prefix>.json, <prefix>.png)``, checked before any work: each may be new or a file an earlier
    ``unip data stats`` wrote; anything else raises ``ConfigError``."""
    json_path, png_path = prefix + ".json", prefix + ".png"
    out_file(json_path, option, is_ours=is_our_json(_DOCUMENT_KEYS))
    claim([png_path], is_our_png, option)
    return json_path, png_path


def write_stats(stats: Dict[str, object], prefix: str) -> Tuple[str, str]:
    """Write ``<prefix>.json`` and ``<prefix>.png``; returns both paths."""
    json_path, png_path = output_paths(prefix)
    atomic_write_text(json_path, json.dumps(stats, indent=1))  # a write cut short leaves the earlier file
    plot_stats(stats, png_path)
    return json_path, png_path
