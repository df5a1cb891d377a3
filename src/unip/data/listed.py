"""Paths that data files list: each entry is a relative path that stays inside the folder it is relative to.

Split files (``train.txt``, ``train_infrared.txt``, ...), the list files of a download (SCUT-Seg's
``scut_train.txt``) and the ``splits:`` of a folder data set's ``classes.yaml`` name files of the data set. An
entry that is absolute (``/data/x``; on Windows also ``C:\\x``, ``\\\\server\\x``) or whose ``..`` lead out of its
folder (``../../elsewhere/x``) is refused with a ``ListedPathError`` naming the file and line: otherwise a run
would train on, or a preparer convert, files that are not part of the data set, without a word.

The rule is about the text: ``..`` is resolved inside the entry (``a/../b`` is ``b``), links are not followed.
A linked folder inside the data set that points elsewhere was put there by the data set's owner and is read like
any other folder.
"""

from __future__ import annotations

import os

from unip.errors import DataError


class ListedPathError(DataError):
    """An entry of a list file leaves its folder: ``where`` names the file and line, ``detail`` says what."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}")
        self.where, self.detail = where, detail


def relative_entry(entry: str, root: str, where: str) -> str:
    """``entry`` normalised (``a/./b/../c`` → ``a/c``) when it is a relative path that stays inside ``root`` (the
    folder it is relative to, as text for the message). Raises ``ListedPathError`` naming ``where`` (``FILE, line
    N``) otherwise."""
    drive, _ = os.path.splitdrive(entry)
    if os.path.isabs(entry) or drive:
        why = "is an absolute path"
    else:
        normal = os.path.normpath(entry)
        if normal == os.curdir:
            why = "names the folder itself, not a file"
        elif normal == os.pardir or normal.startswith(os.pardir + os.sep):
            why = "leads out of it through '..'"
        else:
            return normal
    raise ListedPathError(where, f"{entry!r} {why}; entries are paths relative to {root} that stay inside it: "
                                 "fix the line")


__all__ = ["ListedPathError", "relative_entry"]
