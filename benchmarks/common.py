"""Shared by the benchmark scripts: options (CPU threads, the card's peak for MFU), a JSON copy of the results, and
training steps run as the trainer runs them."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Optional

import torch


def add_common_options(parser: argparse.ArgumentParser, peak: str = "bf16") -> None:
    """``--threads``, ``--peak-tflops`` (the card's dense ``peak`` peak) and ``--json``."""
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help=f"the card's dense {peak} peak (H100 SXM / H200: 989; A100: 312)")
    parser.add_argument("--json", default=None, help="also write the results to this file")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def write_json(result: Any, path: str | None) -> None:
    """Write ``result`` to ``path`` (nothing when ``path`` is empty)."""
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)


def run_block(step: Callable[..., Callable[[], float]], count: int, *inputs: Any) -> None:
    """``count`` calls of ``step(*inputs)`` (each queues an optimiser step and returns what reads its loss) as
    ``unip``'s trainer runs them: each loss read after the next step is queued, the last at the end (a step
    that reads its own loss, as the release's do, has read it already)."""
    pending: Optional[Callable[[], float]] = None
    for _ in range(count):
        read = step(*inputs)
        if pending is not None:
            pending()
        pending = read
    if pending is not None:
        pending()
