"""Text shown to people: file names that any terminal, log line or figure can display, and byte sizes.

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


def byte_size(nbytes: float) -> str:
    """``nbytes`` as text in the unit its size calls for: ``"1.5 GiB"``, ``"512 MiB"``, ``"36 KiB"``, ``"700 B"``."""
    for unit, scale, digits in (("GiB", 2**30, 1), ("MiB", 2**20, 0), ("KiB", 2**10, 0)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.{digits}f} {unit}"
    return f"{nbytes:,.0f} B"
