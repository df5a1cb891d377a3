"""The ``unip`` command line: parses arguments and calls library functions.

Each verb has an ``_add_<verb>(subparsers)`` function that declares its options and sets ``func`` to a
``_run_<verb>(args)`` function. Library errors (``unip.errors.UnipError``) end the program with exit
code 2 and one line on stderr; nothing here holds logic that the Python API does not offer.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional

from unip import __version__
from unip.errors import UnipError


# ----------------------------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a checkpoint's architecture and load report",
                       description="Read a checkpoint (any supported format, or timm:<name>[@weights]) "
                                   "without running code from it, rebuild its model and print a summary.")
    p.add_argument("checkpoint", help="checkpoint file (.pth/.pt/.bin/.safetensors) or timm:<name>[@file]")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from unip.checkpoint import describe_checkpoint

    print(describe_checkpoint(args.checkpoint))
    return 0


# ----------------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline at toy scale on generated data (offline, CPU)")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from unip.demo import run_demo

    run_demo(args.out)
    return 0


VERBS: List[Callable[[argparse._SubParsersAction], None]] = [_add_info, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unip",
        description="UNIP: attention-pattern analysis, NMI-HAD pre-training and infrared segmentation.")
    parser.add_argument("--version", action="version", version=f"unip {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UnipError as err:
        print(f"unip {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unip {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
