"""Options and output shared by the benchmark scripts: CPU threads, the card's peak for MFU, a JSON copy of the
results."""

from __future__ import annotations

import argparse
import json
from typing import Any

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
