"""Metric logs of a run, written by rank 0 only: a JSONL file (one object per record) and TensorBoard.

Other ranks get a logger whose methods do nothing, so loops call it unconditionally.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

LOG_FILE = "log.jsonl"
TB_DIR = "tb"
#: keys of every record of ``LOG_FILE``
RECORD_KEYS = ("step", "time", "kind")


class MetricLogger:
    """``log(step, metrics, prefix)`` appends ``{"step", "time", "kind": prefix, **metrics}`` to
    ``<folder>/log.jsonl`` and writes every numeric metric as a TensorBoard scalar ``<prefix>/<name>`` under
    ``<folder>/tb``. ``prefix`` says what a record is: ``train``, ``eval``, ``setup``. Lists (e.g. per-class
    IoU) go to the JSONL file only. Disabled when ``enabled`` is False.

    ``purge_step``: a run resumed from step S passes S + 1, so that TensorBoard drops the events of the old
    trajectory from that step on (the trainer marks the JSONL file with a ``resume`` record instead; readers
    take ``records_of_last_run``)."""

    def __init__(self, folder: Union[str, Path], enabled: bool = True, tensorboard: bool = True,
                 purge_step: Optional[int] = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.handle = None
        if not enabled:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.handle = open(folder / LOG_FILE, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder / TB_DIR), purge_step=purge_step)

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record: Dict[str, Any] = {"step": int(step), "time": round(time.time(), 3), "kind": prefix}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key in RECORD_KEYS or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        self.close()


def records_of_last_run(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The records of the newest run in a ``log.jsonl`` (as parsed, in file order): those from its last ``setup``
    record on (a new run into the same folder starts with one), without the records a resume superseded (at a
    ``resume`` record of step S, the earlier ``train``/``eval`` records past S belong to the abandoned
    trajectory)."""
    starts = [i for i, record in enumerate(records) if record.get("kind") == "setup"]
    kept: List[Dict[str, Any]] = []
    for record in records[starts[-1]:] if starts else records:
        if record.get("kind") == "resume":
            step = int(record.get("step", 0))
            kept = [r for r in kept if r.get("kind") not in ("train", "eval") or int(r.get("step", 0)) <= step]
        kept.append(record)
    return kept


def read_records(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """The records of a ``log.jsonl`` file in file order, skipping lines that are not JSON objects (a partial last
    line of a killed process). ``OSError`` (``UnicodeDecodeError``: ``ValueError``) when it cannot be read."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def last_logged(folder: Union[str, Path], key: str) -> Optional[Any]:
    """The newest value of ``key`` in the newest run's records of ``<folder>/log.jsonl`` (``None`` when the log
    is missing, unreadable or has no such record): what an earlier process of a resumed run chose."""
    try:
        records = read_records(Path(folder) / LOG_FILE)
    except (OSError, ValueError):
        return None
    values = [r[key] for r in records_of_last_run(records) if key in r]
    return values[-1] if values else None


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars → Python numbers (lists and dicts element-wise); NaN/inf → ``None``
    (strict JSON has no such numbers)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
