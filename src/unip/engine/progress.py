"""Progress with rate and ETA on rank 0 (nothing on other ranks or when disabled): a bar on a terminal, a text
line per logged step elsewhere (a log file, a cluster job), where a bar's carriage returns make one huge line."""

from __future__ import annotations

import datetime
from typing import Any, Mapping, Optional

from tqdm import tqdm


def shown(enabled: bool) -> Optional[bool]:
    """tqdm's ``disable`` for a bar that is wanted when ``enabled``: shown only when stderr is a terminal."""
    return None if enabled else True


def progress_bar(total: int, initial: int = 0, desc: str = "train", enabled: bool = True) -> tqdm:
    """A ``tqdm`` over optimiser steps: ``update(n)``, ``set_postfix(...)``, ``close()``; ``bar.disable`` is true
    when it is not shown (not ``enabled``, or stderr is not a terminal).

    ``initial`` is the step a resumed run starts at, so the ETA covers only what is left."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                disable=shown(enabled), smoothing=0.05)


def progress_line(step: int, total: int, steps_done: int, elapsed: float, metrics: Mapping[str, Any]) -> str:
    """``step 120/1000 (12%): loss=0.123 ...; ETA 0:12:34`` — the ETA from ``steps_done`` steps in ``elapsed``
    seconds of this process."""
    eta = ""
    if steps_done > 0 and step < total:
        seconds = round((total - step) * elapsed / steps_done)
        eta = f"; ETA {datetime.timedelta(seconds=seconds)}"
    return f"step {step}/{total} ({100 * step // max(total, 1)}%): {postfix(metrics)}{eta}"


def postfix(metrics: Mapping[str, Any]) -> str:
    """Compact ``key=value`` text for the bar."""
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)
