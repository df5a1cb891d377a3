"""A progress bar with rate and ETA on rank 0 (nothing on other ranks or when disabled)."""

from __future__ import annotations

from typing import Any, Mapping

from tqdm import tqdm


def progress_bar(total: int, initial: int = 0, desc: str = "train", enabled: bool = True) -> tqdm:
    """A ``tqdm`` over optimiser steps: ``update(n)``, ``set_postfix(...)``, ``close()``.

    ``initial`` is the step a resumed run starts at, so the ETA covers only what is left."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                disable=not enabled, smoothing=0.05)


def postfix(metrics: Mapping[str, Any]) -> str:
    """Compact ``key=value`` text for the bar."""
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)
