"""The ``unip`` command line: parses arguments and calls library functions.

Each verb group has a module here (``info``, ``data``, ``analyze``, ``training``, ``inference``, ``deploy``,
``sweep``, ``serve``, ``demo``) with an ``add_<verb>(subparsers)`` function per verb that declares its options and
sets ``func`` to the module's ``_run_<verb>(args)``; shared parser parts and the pieces of the error boundary live in
``unip.cli.app``. ``main`` is the one error boundary (README "Errors and exit codes"):

* bad input — a ``unip.errors.UnipError`` from the library, a bad option (argparse), a file that cannot
  be read or written — ends with exit code 2 and one line ``unip VERB: error: ...``;
* memory that runs out ends with exit code 1 and one line ``unip VERB: error: out of memory ...``;
* anything else is a bug: exit code 1 and one line ``unip VERB: internal error: ...``; with
  ``UNIP_DEBUG=1`` in the environment the traceback is printed too;
* a reader that goes away (``unip ... | head -1``) is not an error: the rest of the output is discarded and the
  verb finishes with its own exit code.

``VERB`` includes the action of verbs that have one (``unip data pack: error: ...``), as argparse's own lines do.

Nothing here holds logic that the Python API does not offer.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from functools import partial
from typing import Callable, List, Optional

from unip import __version__
from unip.cli import analyze, data, demo, deploy, inference, info, serve, sweep, training
from unip.cli.app import (Parser, UsageError, closed_pipes_are_not_errors, configure_logging, describe_failure,
                          print_warning, tolerate_odd_text, verb_parser)
from unip.errors import UnipError


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo.add_demo(sub, command=run)  # the demo runs its stages through ``run``: it sits below the CLI


VERBS: List[Callable[[argparse._SubParsersAction], None]] = [
    info.add_info, data.add_data, analyze.add_analyze, training.add_pretrain, training.add_finetune,
    inference.add_evaluate, inference.add_predict, deploy.add_export, deploy.add_bench, sweep.add_sweep,
    serve.add_serve, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="unip",
        description="UNIP: attention-pattern analysis, NMI-HAD pre-training and infrared segmentation.")
    parser.add_argument("--version", action="version", version=f"unip {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def run(argv: List[str]) -> int:
    """Parse ``argv`` and run the verb, letting its exceptions through (for callers with their own error
    boundary, e.g. ``unip demo`` running its stages); returns the verb's exit code."""
    args = build_parser().parse_args(argv)
    if not getattr(args, "func", None):
        raise UnipError(f"no verb in {argv}")
    return int(args.func(args) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code (module docstring)."""
    tolerate_odd_text()
    configure_logging()
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the verb's own parser: "unip predict: error: ... (see unip predict --help)"
            verb_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    except UsageError:
        return 2
    if not getattr(args, "func", None):
        print("unip: error: no verb given (see unip --help for the list)", file=sys.stderr)
        return 2
    verb = " ".join(filter(None, [args.verb, getattr(args, f"{args.verb}_verb", None)]))  # e.g. "data pack"
    configure_logging(verb)
    try:
        with warnings.catch_warnings(), closed_pipes_are_not_errors():
            warnings.showwarning = partial(print_warning, verb)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"unip {verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the one boundary: every failure becomes one line and an exit code
        code, line = describe_failure(err, sys.argv[1:] if argv is None else argv)
        if os.environ.get("UNIP_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"unip {verb}: {line}", file=sys.stderr)
        return code
