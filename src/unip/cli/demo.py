"""``unip demo``: the pipeline at toy scale on generated data."""

from __future__ import annotations

import argparse
from functools import partial
from typing import Callable, List

from unip.cli.app import SEED


def add_demo(sub: argparse._SubParsersAction, command: Callable[[List[str]], int]) -> None:
    """The ``demo`` verb; its stages run through ``command`` (``unip.cli.run``)."""
    p = sub.add_parser("demo", help="run the pipeline at toy scale on generated data (offline, CPU)",
                       description="The whole UNIP pipeline at toy scale, offline, on a CPU, through the real CLI "
                                   "(each command is printed): generated infrared scenes, a teacher (made once and "
                                   "cached under $UNIP_CACHE, $XDG_CACHE_HOME/unip or ~/.cache/unip), its attention "
                                   "profile, NMI-HAD distillation into a small student, LL-FPN + UperNet "
                                   "fine-tuning of the distilled student and of the same student from random "
                                   "weights, evaluation, predictions; then a summary table (printed, summary.json, "
                                   "summary.md) and figure (summary.png). About 3 minutes on a 2-core CPU "
                                   "the first time, under 2 once the teacher is cached (--fast: under 30 s).")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes (default demo_out)")
    p.add_argument("--fast", action="store_true", help="a shorter version (smaller teacher, data and schedules): "
                                                      "checks the pipeline, too short for a meaningful comparison")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the student's initial weights, pre-training and "
                                                        "fine-tuning (default 0)")
    p.set_defaults(func=partial(_run_demo, command=command))


def _run_demo(args: argparse.Namespace, command: Callable[[List[str]], int]) -> int:
    from unip.demo import run_demo

    run_demo(command, args.out, fast=args.fast, seed=args.seed, say=lambda text: print(text, flush=True))
    return 0
