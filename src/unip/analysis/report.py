"""Writing profiles (JSON, CSV) and formatting the per-layer table printed by ``unip analyze``."""

from __future__ import annotations

import csv
import json
from typing import Any, Dict, List, Sequence

from unip.analysis.metrics import METRICS
from unip.analysis.patterns import LayerSelection
from unip.analysis.profile import AttentionProfile
from unip.atomic import atomic_path

CSV_COLUMNS = ("model", "layer", "head", *METRICS, "pattern", *(f"{m}_std" for m in METRICS))


def csv_rows(label: str, profile: AttentionProfile) -> List[Dict[str, Any]]:
    """One row per (layer, head): the per-head means and image-to-image std, and the layer's pattern."""
    rows = []
    for stats in profile.layers:
        for head in range(stats.heads):
            row: Dict[str, Any] = {"model": label, "layer": stats.layer, "head": head, "pattern": stats.pattern}
            row.update({m: f"{stats.mean[m][head]:.6g}" for m in METRICS})
            row.update({f"{m}_std": f"{stats.std[m][head]:.6g}" for m in METRICS})
            rows.append(row)
    return rows


def write_csv(path: str, entries: Sequence[tuple]) -> str:
    """Write ``entries`` of ``(label, profile)`` as ``CSV_COLUMNS`` rows, atomically; returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for label, profile in entries:
            writer.writerows(csv_rows(label, profile))
    return path


def write_json(path: str, document: Dict[str, Any]) -> str:
    """Write ``document`` as indented JSON, atomically; returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(document, fh, indent=1, allow_nan=True)
        fh.write("\n")
    return path


def format_table(label: str, profile: AttentionProfile, selection: LayerSelection) -> str:
    """The per-layer table: head-averaged metrics (± image-to-image std averaged over heads) and pattern."""
    rows, cols = profile.grid
    lines = [f"{label}: {profile.source} — {profile.num_images} images, {rows}x{cols} tokens of "
             f"{profile.patch_size} px (uniform-attention distance {profile.uniform_distance:.1f} px)",
             f"{'layer':>5} {'heads':>5} {'NMI':>15} {'distance (px)':>16} {'entropy':>15}  pattern"]
    for stats in profile.layers:
        cells = []
        for metric, width in (("nmi", 15), ("distance", 16), ("entropy", 15)):
            spread = sum(stats.std[metric]) / stats.heads
            digits = 1 if metric == "distance" else 3
            cells.append(f"{stats.value(metric):.{digits}f} ±{spread:.{digits}f}".rjust(width))
        marker = "  ← distil" if stats.layer == selection.layer else ""
        lines.append(f"{stats.layer:>5} {stats.heads:>5} {' '.join(cells)}  {stats.pattern}{marker}")
    lines.append(f"selected layer for NMI-HAD: {selection}")
    return "\n".join(lines)
