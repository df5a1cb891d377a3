"""The sweep report as one self-contained HTML page: tables, figures embedded as base64 PNG, inline CSS, no
script and no external asset (it opens from a file, offline, in any browser)."""

from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path
from typing import List, Sequence

from unip import __version__
from unip.sweep.report import (COST_SIZE, BackboneRow, Collected, LayerwiseCurve, benchmark_table, layerwise_table,
                               left_out_note, seeds_note)
from unip.text import printable

#: The first line of ``report.html`` (how a later report recognises it as its own).
HTML_FIRST_LINE = "<!DOCTYPE html><!-- unip sweep report -->"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.failed { color: #b00; }
.note { color: #555; font-size: 13px; }
code { background: #f6f6f6; padding: 0 3px; }
"""


def _escape(text: object) -> str:
    return html.escape(printable(text))


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], table_id: str) -> str:
    head = "".join(f"<th>{_escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{_escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'


def embedded_image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_escape(alt)}">'


def html_report(collected: Collected, rows: Sequence[BackboneRow], curves: Sequence[LayerwiseCurve],
                figures: Sequence[Path]) -> str:
    """The page: the paper's table, the benchmark figure, the layer-wise figure and table, unfinished cells."""
    sweep = collected.sweep
    header, cells = benchmark_table(rows, collected.datasets)
    done = sum(1 for c in collected.cells if c.metrics is not None)
    parts: List[str] = [
        HTML_FIRST_LINE, '<html lang="en"><head><meta charset="utf-8">',
        f"<title>unip sweep report: {_escape(sweep['name'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>unip sweep report: {_escape(sweep['name'])}</h1>",
        f'<p class="note">Sweep folder <code>{_escape(collected.folder)}</code>, sweep file '
        f"<code>{_escape(sweep['file'])}</code>; {done} of {len(collected.cells)} cells finished; written "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')} by unip {__version__}.</p>",
        "<h2>Benchmark</h2>",
        f'<p class="note">Test mIoU (%) of the best model of each cell (its <code>metrics.json</code>): '
        f"{_escape(seeds_note(sweep))}. GFLOPs and parameters per {COST_SIZE}×{COST_SIZE} input "
        "(torch.utils.flop_counter); head = LL-FPN + UperNet (FT) or the linear probe (LP); mIoU/GFLOP = average "
        "mIoU / (backbone + head GFLOPs).</p>",
        html_table(header, cells, "benchmark"),
    ]
    note = left_out_note(collected, lambda job: f"<code>{_escape(job)}</code>")
    if note:
        parts.append(f'<p class="note" id="left-out">{note}</p>')
    for figure in figures:
        parts.append(f"<figure>{embedded_image(figure, figure.stem)}<figcaption class=\"note\">{figure.name}"
                     "</figcaption></figure>")
        if figure.stem == "benchmark" and curves:
            parts.append("<h2>Layer-wise linear probing and NMI</h2>")
    if curves:
        header, cells = layerwise_table(curves, collected.profiles)
        parts.append(html_table(header, cells, "layerwise"))
    unfinished = [c for c in collected.cells if c.metrics is None]
    if unfinished:
        parts.append(f"<h2>Cells without results ({len(unfinished)})</h2><ul>")
        parts += [f'<li class="failed"><code>{_escape(c.id)}</code>: {_escape(c.status)}'
                  + (f": {_escape(c.error)}" if c.error else "") + "</li>" for c in unfinished]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


__all__ = ["html_report", "html_table", "embedded_image"]
