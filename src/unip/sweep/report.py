"""What ``unip sweep report`` shows: a sweep folder's cells, their costs, and the rows and tables of the paper's
table (``unip.sweep.report_folder`` writes them, with ``figures`` and ``html``).

``collect`` reads ``sweep.json`` (the sweep file as last run: the cells it plans and what they stand for; records of
cells it no longer plans are left out, and the report says so), every finished cell's ``metrics.json`` (mIoU, the
only source of the numbers) and each backbone's ``profile.json`` (NMI per layer); ``model_costs`` counts
parameters and FLOPs (``unip.seg.flops``, on the meta device, cached by model config in ``FlopsCache``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from unip.atomic import atomic_write_text
from unip.errors import ConfigError, UnipError
from unip.models.presets import SIZE_PRESETS, preset_config
from unip.seg.build import segmentor_config
from unip.seg.checkpoint import read_segmentor_header
from unip.seg.flops import segmentor_cost
from unip.seg.results import METRICS_FILE
from unip.seg.train import SEGMENTOR_FILE
from unip.sweep.spec import Cell, Sweep, plan_cells
from unip.sweep.state import (ANALYSIS_DIR, CELLS_DIR, STATE_FILE, analysis_finished, cell_finished,
                              read_json, read_state)
from unip.text import printable

PathLike = Union[str, Path]
#: Input size of the FLOP and parameter counts (the recipe's crop and sliding window).
COST_SIZE = 512
CACHE_FORMAT = "unip-flops-cache"
PROTOCOL_LABELS = {"ft": "FT", "lp": "LP"}


# ============================================================================================ collecting
@dataclass
class CellResult:
    """One cell of the sweep: its coordinates, status and (when finished) its ``metrics.json``."""

    id: str
    backbone: str
    dataset: str
    protocol: str
    layer: Optional[int]
    seed: int
    folder: Path
    metrics: Optional[Dict[str, Any]]
    error: Optional[str]
    started: bool = False  # a sweep started it (its record's runs): killed or stopped part-way, or still running

    @property
    def miou(self) -> Optional[float]:
        return self.metrics.get("mIoU") if self.metrics else None

    @property
    def status(self) -> str:
        if self.metrics is not None:
            return "done"
        return "failed" if self.error else ("not finished" if self.started else "not run")


@dataclass
class Collected:
    """What a sweep folder holds: the sweep as read (``sweep.json``), the cells its sweep file asks for (with
    their results), its NMI profiles, and the ids of recorded cells that the sweep file no longer asks for."""

    folder: Path
    sweep: Dict[str, Any]
    cells: List[CellResult]
    profiles: Dict[str, Dict[str, Any]]
    left_out: List[str] = field(default_factory=list)

    @property
    def datasets(self) -> List[str]:
        return [d["name"] for d in self.sweep["datasets"]]

    def backbone(self, name: str) -> Dict[str, Any]:
        return next(b for b in self.sweep["backbones"] if b["name"] == name)


def planned_cells(state: Mapping[str, Any], where: Path) -> List[Cell]:
    """The cells of the sweep recorded in the state document ``state`` (``plan_cells`` of the sweep file as the
    last ``unip sweep run`` read it, whatever ``--only`` selected); raises ``ConfigError`` naming ``where``."""
    try:
        return plan_cells(Sweep.from_dict(state["sweep"]))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"{where}: its 'sweep' entry is damaged ({type(err).__name__}: {err}); run unip sweep run "
                          "on this folder again to rewrite it (finished cells are skipped)") from None


def collect(sweep_dir: PathLike) -> Collected:
    """Read the sweep folder ``sweep_dir``: the cells come from the sweep file (``planned_cells``), their results
    from their folders, their errors from the state; recorded cells the sweep file no longer asks for (other
    seeds, protocols, blocks, backbones or data sets) are left out. Raises ``ConfigError`` when it is not a
    sweep folder."""
    folder = Path(sweep_dir)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such sweep folder (the --out of unip sweep run)")
    state = read_state(folder)
    if state is None or not isinstance(state.get("sweep"), dict):
        raise ConfigError(f"{folder}: not a sweep folder (no sweep.json); pass the --out of unip sweep run")
    records = state["jobs"]
    cells = []
    for cell in planned_cells(state, folder / STATE_FILE):
        record = records.get(cell.id) if isinstance(records.get(cell.id), dict) else {}
        cell_folder = folder / CELLS_DIR / cell.id
        metrics = read_json(cell_folder / METRICS_FILE) if cell_finished(cell_folder) else None
        cells.append(CellResult(cell.id, cell.backbone.name, cell.dataset.name, cell.protocol, cell.layer, cell.seed,
                                cell_folder, metrics, None if metrics else record.get("error"),
                                started=bool(record.get("runs"))))
    planned = {cell.id for cell in cells}
    left_out = sorted(job_id for job_id, record in records.items()
                      if isinstance(record, dict) and record.get("kind") == "cell" and job_id not in planned)
    profiles = {}
    for backbone in state["sweep"]["backbones"]:
        analysis = folder / ANALYSIS_DIR / backbone["slug"]
        if analysis_finished(analysis):
            profiles[backbone["name"]] = read_json(analysis / "profile.json")["models"][0]
    return Collected(folder, state["sweep"], cells, profiles, left_out)


def mean(values: Sequence[float]) -> Optional[float]:
    """The mean of ``values`` (``None`` when empty; the value itself for one, so that it equals metrics.json)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return values[0] if len(values) == 1 else sum(values) / len(values)


# ============================================================================================ costs
class FlopsCache:
    """``unip.seg.flops.segmentor_cost`` at ``COST_SIZE`` px, remembered in ``flops.json`` by model config."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: Dict[str, Any] = {}
        if path.is_file():
            try:
                document = read_json(path)
                if document.get("format") == CACHE_FORMAT and isinstance(document.get("entries"), dict):
                    self.entries = document["entries"]
            except (OSError, ValueError):
                pass
        self.changed = False

    def cost(self, config: Mapping[str, Any]) -> Dict[str, Dict[str, float]]:
        key = hashlib.sha1(json.dumps([config, COST_SIZE], sort_keys=True).encode()).hexdigest()
        if key not in self.entries:
            self.entries[key] = segmentor_cost(config, COST_SIZE)
            self.changed = True
        return self.entries[key]

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"format": CACHE_FORMAT, "version": 1, "size": COST_SIZE,
                                                 "entries": self.entries}, indent=1) + "\n")


def backbone_only(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A segmentor config that runs ``config``'s whole backbone and a negligible head: for its backbone cost."""
    depth = int(config["backbone"]["depth"])
    return {**config, "feature_layers": [depth], "neck": None, "decode_head": {"type": "linear"},
            "auxiliary_head": None, "frozen_backbone": True}


@dataclass
class ModelCost:
    """Per backbone: parameters (M) and GFLOPs of the backbone at 512 px, and of the FT / LP heads."""

    params_m: Optional[float] = None
    backbone_gflops: Optional[float] = None
    head_gflops: Dict[str, Optional[float]] = field(default_factory=lambda: {"ft": None, "lp": None})


def model_costs(collected: Collected, cache: FlopsCache) -> Dict[str, ModelCost]:
    """The ``ModelCost`` of every backbone, from the configs stored in its finished cells' segmentor files."""
    costs = {b["name"]: ModelCost() for b in collected.sweep["backbones"]}
    for cell in collected.cells:
        cost = costs[cell.backbone]
        wanted = cell.protocol if cell.protocol in ("ft", "lp") else None
        if cell.metrics is None or (cost.backbone_gflops is not None and (wanted is None
                                                                           or cost.head_gflops[wanted] is not None)):
            continue
        try:
            config, _ = read_segmentor_header(cell.folder / SEGMENTOR_FILE)
        except UnipError:
            continue
        if cost.backbone_gflops is None:
            whole = cache.cost(backbone_only(config))
            cost.backbone_gflops, cost.params_m = whole["gflops"]["backbone"], whole["params_m"]["backbone"]
        if wanted is not None and cost.head_gflops[wanted] is None:
            gflops = cache.cost(config)["gflops"]
            cost.head_gflops[wanted] = gflops["neck"] + gflops["decode_head"]
    return costs


def paper_backbone_gflops(cache: FlopsCache) -> Dict[str, float]:
    """Backbone GFLOPs at 512 px of each size's architecture (where the paper's points are drawn)."""
    return {size: cache.cost(backbone_only(segmentor_config(1, preset_config(arch), head="linear",
                                                            img_size=COST_SIZE)))["gflops"]["backbone"]
            for size, arch in SIZE_PRESETS.items()}


# ============================================================================================ tables
@dataclass
class BackboneRow:
    """One row of the paper's table: mIoU per data set (mean over seeds) and average, for FT and LP."""

    name: str
    family: str
    size: str
    cost: ModelCost
    miou: Dict[str, Dict[str, Optional[float]]]   # protocol → data set → mIoU
    average: Dict[str, Optional[float]]           # protocol → average over the data sets

    def per_gflop(self, protocol: str) -> Optional[float]:
        """Average mIoU per GFLOP of the whole inference model (backbone + that protocol's head)."""
        head, average = self.cost.head_gflops[protocol], self.average[protocol]
        if average is None or head is None or self.cost.backbone_gflops is None:
            return None
        return average / (self.cost.backbone_gflops + head)


def benchmark_rows(collected: Collected, costs: Mapping[str, ModelCost]) -> List[BackboneRow]:
    """One ``BackboneRow`` per backbone of the sweep, in the sweep file's order. ``collected.cells`` are the
    planned cells: a data set's mIoU is the mean over its finished seeds, a protocol's average exists only when
    every data set the sweep file plans for that backbone and protocol has one."""
    rows = []
    for backbone in collected.sweep["backbones"]:
        miou: Dict[str, Dict[str, Optional[float]]] = {}
        average: Dict[str, Optional[float]] = {}
        for protocol in PROTOCOL_LABELS:
            cells = [c for c in collected.cells if c.backbone == backbone["name"] and c.protocol == protocol]
            planned = [d for d in collected.datasets if any(c.dataset == d for c in cells)]
            miou[protocol] = {d: mean([c.miou for c in cells if c.dataset == d and c.miou is not None])
                              for d in collected.datasets}
            values = [miou[protocol][d] for d in planned]
            average[protocol] = mean(values) if planned and all(v is not None for v in values) else None
        rows.append(BackboneRow(backbone["name"], backbone["family"], backbone["size"], costs[backbone["name"]],
                                miou, average))
    return rows


@dataclass
class LayerwiseCurve:
    """A backbone's layer-wise linear probe on one data set: block → mIoU (mean over seeds)."""

    backbone: str
    dataset: str
    miou: Dict[int, float]


def layerwise_curves(collected: Collected) -> List[LayerwiseCurve]:
    curves = []
    for backbone in collected.sweep["backbones"]:
        for dataset in collected.datasets:
            cells = [c for c in collected.cells if c.backbone == backbone["name"] and c.dataset == dataset
                     and c.protocol == "layerwise" and c.miou is not None]
            layers = sorted({int(c.layer) for c in cells if c.layer is not None})
            if layers:
                curves.append(LayerwiseCurve(backbone["name"], dataset, {
                    layer: mean([c.miou for c in cells if c.layer == layer]) for layer in layers}))
    return curves


def nmi_by_layer(profile: Mapping[str, Any]) -> Dict[int, Tuple[float, str]]:
    """``{block: (NMI, pattern)}`` of an ``unip analyze`` profile entry."""
    return {int(entry["layer"]): (float(entry["nmi"]), str(entry.get("pattern"))) for entry in profile["layers"]}


TABLE_PREFIX = "backbone,family,size,params_M,backbone_GFLOPs,ft_head_GFLOPs,lp_head_GFLOPs"


def table_columns(datasets: Sequence[str]) -> List[str]:
    columns = TABLE_PREFIX.split(",")
    for protocol in PROTOCOL_LABELS:
        columns += [f"{protocol}_{d}" for d in datasets] + [f"{protocol}_average"]
    return columns + ["ft_mIoU_per_GFLOP", "lp_mIoU_per_GFLOP"]


def table_values(row: BackboneRow, datasets: Sequence[str]) -> List[Any]:
    values: List[Any] = [row.name, row.family, row.size, row.cost.params_m, row.cost.backbone_gflops,
                         row.cost.head_gflops["ft"], row.cost.head_gflops["lp"]]
    for protocol in PROTOCOL_LABELS:
        values += [row.miou[protocol][d] for d in datasets] + [row.average[protocol]]
    return values + [row.per_gflop("ft"), row.per_gflop("lp")]


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A CSV file (numbers at full precision: ``repr`` reads back to the same float; ``None`` → empty)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
    atomic_write_text(path, buffer.getvalue())
    return path


def _number(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def clean(text: str) -> str:
        return printable(text).replace("|", "\\|")

    lines = ["| " + " | ".join(clean(h) for h in header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(clean(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def benchmark_table(rows: Sequence[BackboneRow], datasets: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    """The paper's table as text cells (mIoU with 2 decimals, GFLOPs with 1, parameters with 1)."""
    header = ["backbone", "family", "size", "params (M)", "backbone GFLOPs", "FT head GFLOPs", "LP head GFLOPs"]
    for protocol, label in PROTOCOL_LABELS.items():
        header += [f"{label} {d}" for d in datasets] + [f"{label} avg"]
    header += ["FT mIoU/GFLOP", "LP mIoU/GFLOP"]
    cells = []
    for row in rows:
        values = table_values(row, datasets)
        text = [str(v) for v in values[:3]] + [_number(v, 1) for v in values[3:7]]
        text += [_number(v) for v in values[7:-2]] + [_number(v, 3) for v in values[-2:]]
        cells.append(text)
    return header, cells


def layerwise_table(curves: Sequence[LayerwiseCurve], profiles: Mapping[str, Mapping[str, Any]]
                    ) -> Tuple[List[str], List[List[str]]]:
    """Block × (mIoU per backbone and data set, NMI and pattern per backbone)."""
    layers = sorted({layer for curve in curves for layer in curve.miou})
    backbones = list(dict.fromkeys(curve.backbone for curve in curves))
    header = ["block"] + [f"{c.backbone} · {c.dataset} mIoU" for c in curves] + [f"{b} NMI" for b in backbones]
    rows = []
    for layer in layers:
        row = [str(layer)] + [_number(c.miou.get(layer)) for c in curves]
        for backbone in backbones:
            nmi = nmi_by_layer(profiles[backbone]).get(layer) if backbone in profiles else None
            row.append(f"{nmi[0]:.3f} ({nmi[1]})" if nmi else "-")
        rows.append(row)
    return header, rows


def seeds_note(sweep: Mapping[str, Any]) -> str:
    """How the table's numbers are formed, for the report's text."""
    seeds = ", ".join(map(str, sweep["seeds"]))
    return (f"per data set the mean over the finished ones of the sweep file's seeds ({seeds}); the average over the "
            "data sets only when every data set of that protocol has a result")


def left_out_note(collected: Collected, code: Callable[[str], str] = lambda job: f"`{printable(job)}`"
                  ) -> Optional[str]:
    """The line that says which recorded cells the report leaves out (``None`` when none); ``code`` formats a
    job id (Markdown by default)."""
    if not collected.left_out:
        return None
    shown = ", ".join(code(job) for job in collected.left_out[:3])
    more = f" and {len(collected.left_out) - 3} more" if len(collected.left_out) > 3 else ""
    return (f"Left out: {len(collected.left_out)} recorded cell(s) that the sweep file no longer asks for (other "
            f"seeds, protocols, blocks, backbones or data sets): {shown}{more}.")


__all__ = ["BackboneRow", "CellResult", "Collected", "FlopsCache", "LayerwiseCurve", "ModelCost", "benchmark_rows",
           "collect", "layerwise_curves", "model_costs"]
