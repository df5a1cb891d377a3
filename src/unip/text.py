"""Text shown to people: file names that any terminal, log line or figure can display.

File names may hold bytes that are not UTF-8 (Python keeps them as lone surrogates) or control characters
such as newlines. They stay exact wherever a path is used; ``printable`` is for display only.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: object) -> str:
    """``text`` with undecodable bytes shown as ``\\xNN`` and control characters as escapes (``\\n``);
    returns a string that encodes as UTF-8 and spans one line."""
    text = str(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that do not stand for bytes (e.g. from JSON "\ud800")
        raw = text.encode("utf-8", "backslashreplace")
    shown = raw.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], shown)


def one_line(text: object) -> str:
    """``text`` (e.g. an error message that embeds a library's multi-line text) as one printable line:
    runs of whitespace, newlines included, become one space."""
    return printable(" ".join(str(text).split()))
