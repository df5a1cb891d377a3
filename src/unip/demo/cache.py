"""The demo's teacher cache: ``<cache>/demo/teacher-<key>/`` holding ``teacher.safetensors`` (a segmentor whose
backbone is the teacher), ``metrics.json`` (its test evaluation) and ``teacher.json`` (how it was made).

``<cache>`` is ``$UNIP_CACHE`` when set, else ``$XDG_CACHE_HOME/unip``, else ``~/.cache/unip``. The key hashes
every setting that makes the teacher (``TeacherRecipe.key``), so other settings make another entry. An entry is
written in a temporary folder beside it and renamed into place, so a reader never sees half of one; a damaged
entry is made again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from unip import __version__
from unip.checkpoint import architecture_of
from unip.demo.settings import TeacherRecipe
from unip.outputs import out_folder

TEACHER_FILE = "teacher.safetensors"
RECORD_FILE = "teacher.json"
METRICS_FILE = "metrics.json"
RECORD_FORMAT = "unip-demo-teacher"


def cache_root() -> Path:
    """Where unip caches what it makes: ``$UNIP_CACHE``, else ``$XDG_CACHE_HOME/unip``, else ``~/.cache/unip``.
    Raises ``ConfigError`` when that path is a file."""
    # a read-only cache may still hold the teacher (and one that cannot be written is handled where it is written)
    if os.environ.get("UNIP_CACHE"):
        return Path(out_folder(os.environ["UNIP_CACHE"], "UNIP_CACHE", writable=False))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(out_folder(os.path.join(base, "unip"), "the cache folder (XDG_CACHE_HOME or ~/.cache)",
                           writable=False))


@dataclass
class CachedTeacher:
    """A cache entry: the teacher segmentor, its test metrics and its record (recipe, when made, how long)."""

    folder: Path
    record: Dict[str, Any]

    @property
    def file(self) -> Path:
        return self.folder / TEACHER_FILE

    @property
    def metrics(self) -> Path:
        return self.folder / METRICS_FILE


def entry_folder(root: Path, key: str) -> Path:
    return root / "demo" / f"teacher-{key}"


def find_teacher(root: Path, key: str) -> Tuple[Optional[CachedTeacher], str]:
    """``(the cached teacher, "")`` when the entry for ``key`` is complete and readable, else ``(None, why)``."""
    folder = entry_folder(root, key)
    if not folder.exists():
        return None, "not cached yet"
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
        if record.get("format") != RECORD_FORMAT or record.get("key") != key:
            return None, f"{folder / RECORD_FILE} is not this teacher's record"
        if architecture_of(folder / TEACHER_FILE) != "Segmentor":
            return None, f"{folder / TEACHER_FILE} is not a segmentor"
        json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))["mIoU"]
    except Exception as err:  # any unreadable part: the entry is made again
        return None, f"the cached entry {folder} is damaged ({type(err).__name__}: {str(err)[:120]})"
    return CachedTeacher(folder, record), ""


def store_teacher(root: Path, key: str, recipe: TeacherRecipe, image_size: Tuple[int, int], segmentor: Path,
                  metrics: Path, seconds: float) -> CachedTeacher:
    """Copy a freshly made teacher (its segmentor file and metrics.json) into the cache, atomically; returns the
    entry. Raises ``OSError`` when the cache cannot be written."""
    folder = entry_folder(root, key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        shutil.copyfile(segmentor, staging / TEACHER_FILE)
        shutil.copyfile(metrics, staging / METRICS_FILE)
        record = {"format": RECORD_FORMAT, "version": 1, "key": key, "recipe": asdict(recipe),
                  "image_size": list(image_size), "made": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "seconds": round(seconds, 1), "unip_version": __version__}
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if folder.exists():  # a damaged entry (find_teacher said so): ours to replace
            shutil.rmtree(folder)
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.exists():
                raise
            # another demo stored the same teacher in the meantime: keep theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    found, why = find_teacher(root, key)
    if found is None:
        raise OSError(why)
    return found
