"""The CLI's shared parts: the argument parser that reports a bad command line as one line, option types that
several verbs share, and the pieces of the one error boundary (``unip.cli.main``): how a failure becomes an exit code
and one line, warnings and log lines as one line each, and output to a reader that went away."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import importlib
from typing import Any, Iterator, List, NoReturn, Optional, Sequence

from unip.engine.config import integer
from unip.errors import UnipError
from unip.text import one_line


#: Option values shared by several verbs.
WORKERS = integer(1, 256).option()
SEED = integer(0, 2**63 - 1).option()


class TableChoices(Sequence):
    """An option's ``choices=`` read from an extension point's table (``unip.models.HEADS``, ``unip.data.datasets.
    DATASETS``, ...) when argparse first needs them — to check a value or show ``--help`` — so that an entry added
    to the table is a choice at once, and building the parser imports no table (and no torch).

    ``TableChoices("unip.models.heads:probe_heads")`` calls that function; ``"unip.models.heads:HEADS"`` takes the
    keys of that mapping; ``first`` are choices before them (``auto``)."""

    def __init__(self, where: str, *first: str) -> None:
        self.where, self.first = where, first

    def _names(self) -> List[str]:
        module, _, name = self.where.partition(":")
        table: Any = getattr(importlib.import_module(module), name)
        return [*self.first, *(table() if callable(table) else table)]

    def __getitem__(self, index: Any) -> Any:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()


class UsageError(Exception):
    """argparse found a bad command line (already printed as one line)."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line, without repeating the usage block, and reads the
    choices of an option from its table (``TableChoices``) only when a value is checked or help is shown."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if not isinstance(kwargs.get("choices"), TableChoices) or "metavar" in kwargs:
            return super().add_argument(*args, **kwargs)
        # argparse formats an option's metavar when it is added, which would read (and import) the table now
        action = super().add_argument(*args, metavar="CHOICE", **kwargs)
        action.metavar = None  # usage, help and errors list the table's choices when they are shown
        return action

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise UsageError(message)


class Once(argparse.Action):
    """An option that takes one value: given again with another value it is a usage error, instead of argparse's
    silent "the last one wins" (``--infrared A --infrared B`` would scan B only)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        given = getattr(namespace, self.dest, None)
        if given is not None and os.path.normpath(given) != os.path.normpath(values):
            raise argparse.ArgumentError(self, f"given twice ({given} and {values}); it takes one {self.metavar}")
        setattr(namespace, self.dest, values)


class ConsoleHandler(logging.Handler):
    """Log lines of the ``unip`` loggers: warnings on stderr as one line ``unip VERB: warning: ...`` (as Python
    warnings and errors are), the rest on stdout as they are; whatever ``sys.stdout``/``sys.stderr`` are when a
    line is logged (tests swap them)."""

    verb = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno == logging.WARNING:
                print(f"{' '.join(filter(None, ['unip', self.verb]))}: warning: {one_line(text)}", file=sys.stderr,
                      flush=True)
            else:
                print(text, file=sys.stdout, flush=True)
        except Exception:  # logging's rule: a failed log line never ends the program
            self.handleError(record)


def configure_logging(verb: str = "") -> None:
    """Library code logs through ``logging`` (loggers under ``unip``); the CLI shows INFO and up: warnings on
    stderr, prefixed with ``verb``, the rest on stdout."""
    log = logging.getLogger("unip")
    handler = next((handler for handler in log.handlers if isinstance(handler, ConsoleHandler)), None)
    if handler is None:
        handler = ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    handler.verb = verb
    log.setLevel(logging.INFO)


def verb_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the verb (and action: ``data pack``) that ``args`` were parsed by; ``parser`` without one."""
    names = [getattr(args, "verb", None)]
    names.append(getattr(args, f"{names[0]}_verb", None))
    for name in names:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
        if name not in choices:
            break
        parser = choices[name]
    return parser


class PipeSafeStream:
    """A text stream whose reader may go away (``unip ... | head -1``): once a write or flush meets a closed
    pipe, the file descriptor is pointed at the null device and the verb goes on, its output discarded."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (e.g. a test's capture)
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)  # what is still buffered, and later output, goes nowhere instead of failing
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def closed_pipes_are_not_errors():
    """While a verb runs, stdout and stderr are :class:`PipeSafeStream`; the last flush is checked too."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (PipeSafeStream(stream) for stream in streams)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


def describe_failure(err: BaseException, argv: Sequence[str] = ()) -> tuple:
    """``(exit code, one-line text)`` for an exception that ended the verb of the command line ``argv``."""
    if isinstance(err, UnipError):
        return 2, f"error: {one_line(original_message(str(err)))}"
    if is_out_of_memory(err):
        from unip.memory import out_of_memory_fix

        return 1, f"error: out of memory ({one_line(err)[:200]}); {out_of_memory_fix(argv)}"
    if isinstance(err, OSError):
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        reason = err.strerror or str(err)
        return 2, f"error: {one_line(f'{where}: {reason}' if where else reason)}"
    return 1, (f"internal error: {type(err).__name__}: {one_line(err)[:300]}; rerun with UNIP_DEBUG=1 "
               "for the traceback")


def original_message(text: str) -> str:
    """The error's own message when ``text`` is a DataLoader worker's re-raise ("Caught DataError in DataLoader
    worker process 0. Original Traceback (most recent call last): ... unip.errors.DataError: MESSAGE"):
    MESSAGE, without the worker's traceback; ``text`` otherwise."""
    if "Original Traceback" not in text:
        return text
    last = next((line for line in reversed(text.splitlines()) if line.strip()), text)
    return re.sub(r"^[\w.]+: ", "", last.strip(), count=1)


def print_warning(verb: str, message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (from unip or a library) as one line each, like errors."""
    print(f"unip {verb}: warning: {one_line(message)}", file=sys.stderr)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def tolerate_odd_text() -> None:
    """File names with undecodable bytes print as escapes instead of failing the print."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass
