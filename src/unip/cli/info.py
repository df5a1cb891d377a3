"""``unip info``: a checkpoint's architecture and load report."""

from __future__ import annotations

import argparse

from unip.errors import CheckpointError


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a checkpoint's architecture and load report",
                       description="Read a checkpoint (any supported format, a training state step-*.pt, or "
                                   "timm:<name>[@weights]) without running code from it, rebuild its model and "
                                   "print a summary. Exit code 2 (after the summary) when the other verbs refuse "
                                   "it: missing, mis-shaped or non-finite weights.")
    p.add_argument("checkpoint", help="checkpoint file (.pth/.pt/.bin/.safetensors) or timm:<name>[@file]; a "
                                      "thermal file or image: its camera, raster, counts, temperatures, calibration")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from unip.checkpoint_kinds import inspect_checkpoint

    summary, problem = inspect_checkpoint(args.checkpoint)
    print(summary)
    if problem:  # the report is printed; the exit code says that the other verbs refuse the file
        raise CheckpointError(problem)
    return 0
