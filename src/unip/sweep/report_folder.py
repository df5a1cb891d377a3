"""``unip sweep report``: the report folder (default ``<sweep>/report``), claimed before anything is written, then
written from the sweep folder's cells (``unip.sweep.report``):

* ``table.csv`` / ``table.md``: one row per backbone: family, size, parameters, backbone GFLOPs and head GFLOPs
  (fine-tuning: LL-FPN + UperNet; linear probing: the 1×1 conv) per 512×512 input, test mIoU per data set and
  their average for FT and LP (mean over the finished seeds; the average only when every planned data set has a
  result), and average mIoU per GFLOP of the whole model;
* ``cells.csv``: every cell with its mIoU / mAcc / aAcc or its error; ``layerwise.csv``: mIoU per block with
  the block's NMI and pattern;
* ``benchmark.png``: average mIoU against backbone GFLOPs per family, with the paper's points
  (``unip.sweep.paper``); ``layerwise.png``: each backbone's layer-wise LP curve next to its NMI profile;
* ``report.md`` and ``report.html`` (everything in one file, figures embedded: opens in any browser);
* ``flops.json``: the FLOP counts (``unip.seg.flops``, on the meta device), cached by model config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence

from unip.atomic import atomic_write_text
from unip.outputs import claim, is_our_json, is_our_png, out_folder
from unip.sweep.figures import benchmark_figure, layerwise_figure
from unip.sweep.html import HTML_FIRST_LINE, html_report
from unip.sweep.report import (COST_SIZE, TABLE_PREFIX, BackboneRow, CellResult, Collected, FlopsCache,
                               LayerwiseCurve, PathLike, benchmark_rows, benchmark_table, collect, layerwise_curves,
                               layerwise_table, left_out_note, markdown_table, model_costs, nmi_by_layer,
                               paper_backbone_gflops, seeds_note, table_columns, table_values, write_csv)
from unip.sweep.state import REPORT_DIR
from unip.text import printable

TABLE_CSV, CELLS_CSV, LAYERWISE_CSV = "table.csv", "cells.csv", "layerwise.csv"
REPORT_MD, REPORT_HTML, FLOPS_CACHE = "report.md", "report.html", "flops.json"
BENCHMARK_PNG, LAYERWISE_PNG = "benchmark.png", "layerwise.png"
MD_FIRST_LINE = "# unip sweep report"


@dataclass
class Report:
    """The report folder, the files written and the Markdown text (also printed by the CLI)."""

    out: Path
    files: List[Path]
    markdown: str
    rows: List[BackboneRow]


def _starts_with(prefix: str) -> Callable[[str], bool]:
    def recognise(path: str) -> bool:
        with open(path, "r", encoding="utf-8") as handle:
            return handle.readline().startswith(prefix)
    return recognise


def claim_report_folder(out: Path) -> None:
    """The report folder may be new or hold this command's earlier files; raises ``ConfigError``."""
    out_folder(str(out), "--out")
    claim([str(out / name) for name in (TABLE_CSV,)], _starts_with(TABLE_PREFIX))
    claim([str(out / CELLS_CSV)], _starts_with("job,backbone,"))
    claim([str(out / LAYERWISE_CSV)], _starts_with("backbone,dataset,block,"))
    claim([str(out / REPORT_MD)], _starts_with(MD_FIRST_LINE))
    claim([str(out / REPORT_HTML)], _starts_with(HTML_FIRST_LINE))
    claim([str(out / BENCHMARK_PNG), str(out / LAYERWISE_PNG)], is_our_png)
    claim([str(out / FLOPS_CACHE)], is_our_json(["format", "entries"]))


def write_report(sweep_dir: PathLike, out: Optional[PathLike] = None) -> Report:
    """Write the report of the sweep folder ``sweep_dir`` to ``out`` (default ``<sweep_dir>/report``); returns
    a ``Report``. Raises ``ConfigError`` (not a sweep folder, an output that is not ours) before writing."""
    collected = collect(sweep_dir)
    out = Path(out) if out is not None else collected.folder / REPORT_DIR
    claim_report_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = FlopsCache(out / FLOPS_CACHE)
    costs = model_costs(collected, cache)
    paper_gflops = paper_backbone_gflops(cache)
    rows = benchmark_rows(collected, costs)
    curves = layerwise_curves(collected)
    datasets = collected.datasets
    files = [write_csv(out / TABLE_CSV, table_columns(datasets), [table_values(r, datasets) for r in rows]),
             write_csv(out / CELLS_CSV, ["job", "backbone", "family", "size", "dataset", "protocol", "block", "seed",
                                         "status", "mIoU", "mAcc", "aAcc", "folder", "error"],
                       [_cell_row(collected, c) for c in collected.cells])]
    if curves:
        files.append(write_csv(out / LAYERWISE_CSV, ["backbone", "dataset", "block", "mIoU", "NMI", "pattern"],
                               _layerwise_rows(curves, collected.profiles)))
    figures = [benchmark_figure(rows, paper_gflops, out / BENCHMARK_PNG)]
    if curves:
        figures.append(layerwise_figure(curves, collected.profiles, out / LAYERWISE_PNG))
    files += figures
    markdown = report_markdown(collected, rows, curves)
    atomic_write_text(out / REPORT_MD, markdown + "\n")
    files.append(out / REPORT_MD)
    atomic_write_text(out / REPORT_HTML, html_report(collected, rows, curves, figures))
    files.append(out / REPORT_HTML)
    cache.save()
    files.append(out / FLOPS_CACHE)
    return Report(out, files, markdown, rows)


def _cell_row(collected: Collected, cell: CellResult) -> List[Any]:
    backbone = collected.backbone(cell.backbone)
    metrics = cell.metrics or {}
    return [cell.id, cell.backbone, backbone["family"], backbone["size"], cell.dataset, cell.protocol, cell.layer,
            cell.seed, cell.status, metrics.get("mIoU"), metrics.get("mAcc"), metrics.get("aAcc"),
            str(cell.folder), cell.error]


def _layerwise_rows(curves: Sequence[LayerwiseCurve], profiles: Mapping[str, Mapping[str, Any]]) -> List[List[Any]]:
    rows = []
    for curve in curves:
        nmi = nmi_by_layer(profiles[curve.backbone]) if curve.backbone in profiles else {}
        for layer, miou in curve.miou.items():
            value, pattern = nmi.get(layer, (None, None))
            rows.append([curve.backbone, curve.dataset, layer, miou, value, pattern])
    return rows


def report_markdown(collected: Collected, rows: Sequence[BackboneRow], curves: Sequence[LayerwiseCurve]) -> str:
    """The report as Markdown: the paper's table, the layer-wise table, and the cells that did not finish."""
    sweep = collected.sweep
    header, cells = benchmark_table(rows, collected.datasets)
    parts = [f"{MD_FIRST_LINE}: {printable(sweep['name'])}", "",
             f"Sweep folder `{printable(collected.folder)}` (sweep file `{printable(sweep['file'])}`). Test mIoU (%) "
             f"of the best model of each cell; {seeds_note(sweep)}. GFLOPs and parameters per {COST_SIZE}×{COST_SIZE} "
             "input; head = LL-FPN + UperNet (FT) or the linear probe (LP); mIoU/GFLOP = average mIoU / (backbone + "
             "head GFLOPs).", "",
             markdown_table(header, cells)]
    note = left_out_note(collected)
    if note:
        parts += ["", note]
    if curves:
        header, cells = layerwise_table(curves, collected.profiles)
        parts += ["", "## Layer-wise linear probing", "", markdown_table(header, cells)]
    unfinished = [c for c in collected.cells if c.metrics is None]
    if unfinished:
        parts += ["", f"## Cells without results ({len(unfinished)})", ""]
        parts += [f"- `{printable(c.id)}`: {c.status}" + (f": {printable(c.error)}" if c.error else "")
                  for c in unfinished]
    return "\n".join(parts)


__all__ = ["Report", "claim_report_folder", "report_markdown", "write_report"]
