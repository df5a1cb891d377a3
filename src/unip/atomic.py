"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A reader (or a resumed run after a kill) sees either the old file or the complete new one, never a
half-written file. A writer killed mid-write leaves its temporary file (``.<name>.tmp-<pid>``) behind;
``remove_temporaries`` deletes such leftovers when the next run starts. ``replace_folder`` swaps a whole
folder written beside its target (``.<name>.tmp-<pid>``) into place.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, List, Union

_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp-\d+$")


def temporary_path(target: Union[str, os.PathLike]) -> Path:
    """Where ``atomic_path`` writes before the rename: ``.<name>.tmp-<pid>`` in the target's folder."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


@functools.lru_cache(maxsize=1)
def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file here: ``0o666`` less the process's umask."""
    try:  # Linux states it; reading it avoids setting the umask, which is process-wide
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yields a temporary path in ``path``'s folder; on success it is fsynced and renamed to ``path``.

    The file gets the mode a plain write would give it (some writers, e.g. safetensors', create their files
    readable by the owner only). On an exception the temporary file is removed and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.chmod(tmp, file_mode())
        except OSError:  # file systems without modes (vfat, some network mounts): the write still counts
            pass
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_temporaries(folder: Union[str, os.PathLike], owns: Callable[[str], bool]) -> List[Path]:
    """Delete the temporary files a killed ``atomic_path`` writer left in ``folder`` for the targets whose
    name ``owns(name)`` accepts (so that nothing a caller did not write is touched).

    Returns the paths removed (none when ``folder`` does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and owns(match.group("target")) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def replace_folder(staging: Union[str, os.PathLike], target: Union[str, os.PathLike]) -> Path:
    """Put the folder ``staging`` (complete, written beside ``target``, e.g. at ``temporary_path(target)``) in
    place of ``target``, whose previous content is removed as a whole. Two renames: a reader sees the old
    folder or the new one (or, between the renames, none), never a mix. Returns ``target``."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target
