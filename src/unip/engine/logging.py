"""Metric logs of a run, written by rank 0 only: a JSONL file (one object per record) and TensorBoard.

Other ranks get a logger whose methods do nothing, so loops call it unconditionally.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union


class MetricLogger:
    """``log(step, metrics, prefix)`` appends ``{"step", "time", "kind": prefix, **metrics}`` to
    ``<folder>/log.jsonl`` and writes every numeric metric as a TensorBoard scalar ``<prefix>/<name>`` under
    ``<folder>/tb``. ``prefix`` says what a record is: ``train``, ``eval``, ``setup``. Lists (e.g. per-class
    IoU) go to the JSONL file only. Disabled when ``enabled`` is False."""

    def __init__(self, folder: Union[str, Path], enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self.handle = None
        if not enabled:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.handle = open(folder / "log.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder / "tb"))

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record: Dict[str, Any] = {"step": int(step), "time": round(time.time(), 3), "kind": prefix}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key in ("step", "time", "kind") or isinstance(value, bool):
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
