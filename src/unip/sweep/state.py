"""The sweep folder: its layout, the state file (``sweep.json``) and what counts as a finished job.

::

    <out>/sweep.json                      the state: the sweep as read, every job with its status (atomic writes)
    <out>/cells/<backbone>/<dataset>/<ft|lp|lp-layerNN>-seed<S>/   a unip finetune run folder per cell
        metrics.json, segmentor.safetensors, checkpoints/, log.jsonl, ...   (docs/segmentation.md)
        sweep-stdout.log, sweep-stderr.log                                  what the run printed
    <out>/analysis/<backbone>/            unip analyze of the backbone (profile.json: per-layer NMI)
    <out>/report/                         unip sweep report (default)

A cell is finished when its ``metrics.json`` is a readable ``unip-segmentation-metrics`` document, and started
(it continues with ``--resume auto``) when ``checkpoints/`` holds a training state; an analysis is finished when
its ``profile.json`` lists the model. The files are the truth: the state file records what was run,
where, how long and why it failed, but a job is never skipped on the state file's word alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

from unip import __version__
from unip.atomic import atomic_write_text
from unip.engine.checkpointing import find_latest
from unip.engine.run_folder import CHECKPOINT_DIR
from unip.errors import ConfigError
from unip.outputs import out_folder
from unip.run_lock import LOCK_FILE
from unip.seg.results import METRICS_FILE, METRICS_FORMAT

STATE_FILE = "sweep.json"
STATE_FORMAT = "unip-sweep-state"
STATE_VERSION = 1
CELLS_DIR = "cells"
ANALYSIS_DIR = "analysis"
REPORT_DIR = "report"
#: The lock of a running sweep (``unip.run_lock``), and the one versions before it left behind.
LOCK_FILES = (LOCK_FILE, ".sweep.lock")
STDOUT_LOG, STDERR_LOG = "sweep-stdout.log", "sweep-stderr.log"

PathLike = Union[str, Path]


def claim_sweep_folder(out: PathLike, option: str = "--out", in_use_ok: bool = False) -> Path:
    """Check that ``out`` is new, empty, or a sweep folder (its ``sweep.json`` is ours) and (unless ``in_use_ok``:
    a dry run, which writes nothing) that no other sweep is running in it; returns it as a ``Path``. Raises
    ``ConfigError`` otherwise: a sweep never writes into a folder of somebody else's."""
    out_folder(str(out), option, in_use_ok=in_use_ok)
    path = Path(out)
    state = path / STATE_FILE
    if state.exists() and not (state.is_file() and _is_state(state)):
        raise ConfigError(f"{state}: exists and was not written by unip sweep; choose another {option}")
    if not state.exists() and path.is_dir():
        foreign = sorted(name for name in os.listdir(path)
                         if name not in LOCK_FILES and not name.startswith(f".{STATE_FILE}"))  # lock, temporaries
        if foreign:
            shown = ", ".join(repr(name) for name in foreign[:3])
            raise ConfigError(f"{path}: holds files that are not a sweep's ({shown}) and no {STATE_FILE}; choose a "
                              f"new or empty {option}")
    return path


def _is_state(path: Path) -> bool:
    try:
        return read_json(path).get("format") == STATE_FORMAT
    except (OSError, ValueError):
        return False


def read_json(path: PathLike) -> Dict[str, Any]:
    with open(path, "r", encoding="utf-8") as handle:
        document = json.load(handle)
    if not isinstance(document, dict):
        raise ValueError(f"{path}: not a JSON object")
    return document


def read_state(out: PathLike) -> Optional[Dict[str, Any]]:
    """The state document of the sweep folder ``out``, or ``None`` when there is none yet. Raises
    ``ConfigError`` when ``sweep.json`` is damaged or of another format."""
    path = Path(out) / STATE_FILE
    if not path.exists():
        return None
    try:
        document = read_json(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable sweep state ({err}); it is unip sweep run's record of the "
                          "sweep") from None
    if document.get("format") != STATE_FORMAT or not isinstance(document.get("jobs"), dict):
        raise ConfigError(f"{path}: not a unip sweep state file (format {STATE_FORMAT!r} expected)")
    return document


def write_state(out: PathLike, document: Dict[str, Any]) -> Path:
    """Write the state document atomically (a reader or a resumed sweep never sees half a file)."""
    path = Path(out) / STATE_FILE
    document = {**document, "format": STATE_FORMAT, "version": STATE_VERSION, "unip_version": __version__}
    atomic_write_text(path, json.dumps(document, indent=1, allow_nan=False) + "\n")
    return path


def cell_finished(folder: PathLike) -> bool:
    """True when ``folder/metrics.json`` is a readable ``unip-segmentation-metrics`` document."""
    try:
        return read_json(Path(folder) / METRICS_FILE).get("format") == METRICS_FORMAT
    except (OSError, ValueError):
        return False


def cell_has_training_state(folder: PathLike) -> bool:
    """True when ``folder/checkpoints/`` holds a ``step-*.pt`` training state: a run that stopped part-way,
    which ``--resume auto`` continues from."""
    return find_latest(Path(folder) / CHECKPOINT_DIR) is not None


def analysis_finished(folder: PathLike) -> bool:
    """True when ``folder/profile.json`` (``unip analyze``) is readable and profiles a model."""
    try:
        models = read_json(Path(folder) / "profile.json").get("models")
    except (OSError, ValueError):
        return False
    return isinstance(models, list) and bool(models) and isinstance(models[0], dict) and "layers" in models[0]


def relative(path: PathLike, out: PathLike) -> str:
    """``path`` relative to the sweep folder (what the state file stores: the folder may move)."""
    return os.path.relpath(str(path), str(out))


__all__ = ["ANALYSIS_DIR", "CELLS_DIR", "REPORT_DIR", "STATE_FILE", "STATE_FORMAT", "STATE_VERSION",
           "analysis_finished", "cell_finished", "cell_has_training_state", "claim_sweep_folder", "read_json",
           "read_state", "relative", "write_state"]
