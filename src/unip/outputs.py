"""Where verbs write: output paths are checked before any work, and nothing of the user's is overwritten.

* ``out_folder`` / ``out_file``: an ``--out`` that cannot be what the verb writes (a file where a folder
  is meant, a folder where a file is meant, a path below a file) fails at once, naming the option, and so does
  a folder that another unip process is writing (its lock, ``unip.run_lock``, names the holder).
* ``claim``: a verb may replace an existing file only when it recognises the file as its own earlier
  output (``is_ours``); anything else is the user's and the verb stops instead.
* ``plain_name``: a name taken from the command line becomes exactly one folder inside ``--out``.
* ``save_figure`` / ``save_png``: PNG figures and images carry ``Software: unip`` so that a later run recognises
  them (``is_our_png``); ``save_jpeg`` writes JPEGs with the comment ``unip`` (``is_our_jpeg``). Files are
  recognised by what they hold, not by their names: a real data set named like unip's output (SODA's
  ``JPEGImages/00000.jpg``) is never taken for it.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, List, Optional, Pattern, Sequence

from unip.atomic import atomic_path
from unip.errors import ConfigError
from unip.run_lock import check_free

#: The ``Software`` text of every PNG figure unip writes.
FIGURE_SOFTWARE = "unip"
#: The comment (COM segment) of every JPEG unip writes.
JPEG_COMMENT = b"unip"

Recogniser = Callable[[str], bool]


def _existing_ancestor(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _check_parent(path: str, option: str) -> None:
    ancestor = _existing_ancestor(os.path.dirname(os.path.abspath(path)) or ".")
    if os.path.exists(ancestor) and not os.path.isdir(ancestor):
        raise ConfigError(f"{option} {path}: {ancestor} is a file, not a folder; choose another path")


def _check_writable(folder: str, path: str, option: str) -> None:
    """``ConfigError`` when ``folder`` (or, while it does not exist, the nearest folder above it that does) cannot
    be written: a read-only file system or no permission would otherwise stop the verb after its work."""
    existing = _existing_ancestor(folder)
    if os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write in {existing} (read-only or no permission); choose "
                          f"another {option}")


def out_folder(path: str, option: str = "--out", writable: bool = True, in_use_ok: bool = False) -> str:
    """Check that ``path`` can be (or already is) a folder to write into; returns it.

    Raises ``ConfigError`` when it, or a folder on the way to it, is an existing file, (``writable``) when it
    cannot be written, or (unless ``in_use_ok``: a look that writes nothing) when another process holds its
    lock (``unip.run_lock``)."""
    if not path:
        raise ConfigError(f"{option}: empty path; name the folder to write")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {path}: is a file, not a folder; choose a new or empty folder")
    _check_parent(path, option)
    if writable:
        _check_writable(path, path, option)
    if not in_use_ok:
        check_free(path, option)
    return path


def out_file(path: str, option: str = "--out", is_ours: Optional[Recogniser] = None) -> str:
    """Check that ``path`` can be written as a file; returns it. An existing folder there, a file on the way
    to it, a folder that cannot be written, or (with ``is_ours``) an existing file that this verb did not write
    raises ``ConfigError``."""
    if not path:
        raise ConfigError(f"{option}: empty path; name the file to write")
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path}: is a folder; name the file to write")
    _check_parent(path, option)
    _check_writable(os.path.dirname(os.path.abspath(path)), path, option)
    if is_ours is not None:
        claim([path], is_ours, option)
    return path


def staging_folder(target: str, option: str = "--out") -> str:
    """Create (and return) ``.<name>.tmp-<pid>`` beside ``target``, where a verb writes before it moves its
    files into place. A place that cannot be written raises ``ConfigError`` naming ``option`` and ``target``
    (not the hidden folder)."""
    target = os.path.abspath(target)
    folder = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{option} {target}: cannot write in {os.path.dirname(target)} "
                          f"({err.strerror or err}); choose another path") from err
    return folder


def claim(paths: Iterable[str], is_ours: Recogniser, option: str = "--out") -> None:
    """Allow writing ``paths``: each must be absent or a file that ``is_ours`` recognises.

    Raises ``ConfigError`` naming the first path that is a folder or somebody else's file."""
    for path in paths:
        if os.path.isdir(path):
            raise ConfigError(f"{path}: is a folder where unip would write a file; move it away or choose "
                              f"another {option}")
        if os.path.lexists(path) and not (os.path.isfile(path) and _safely(is_ours, path)):
            raise ConfigError(f"{path}: exists and was not written by unip; move it away or choose another "
                              f"{option}")


def foreign_names(folder: str, ours: Pattern[str]) -> List[str]:
    """Sorted names in ``folder`` that are not plain files matching ``ours`` (``[]`` when it does not exist)."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder)
                  if not ours.match(name) or os.path.islink(os.path.join(folder, name))
                  or not os.path.isfile(os.path.join(folder, name)))


def claim_folder(folder: str, ours: Pattern[str], option: str = "--out", is_ours: Optional[Recogniser] = None) -> None:
    """Allow writing files into ``folder``: it must be new or hold only files named like ``ours`` (earlier
    output of the same verb) and, with ``is_ours``, recognised by it too (each file is opened). Raises
    ``ConfigError`` naming a few of the other entries."""
    out_folder(folder, option)
    foreign = foreign_names(folder, ours)
    unmarked = False
    if is_ours is not None and not foreign and os.path.isdir(folder):
        foreign = sorted(name for name in os.listdir(folder) if not _safely(is_ours, os.path.join(folder, name)))
        unmarked = bool(foreign)
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        hint = (" (named like unip's output but without unip's mark: if an earlier unip version wrote them, "
                "delete them)" if unmarked else "")
        raise ConfigError(f"{folder}: holds files unip did not write ({shown}){hint}; nothing was changed: "
                          f"choose another {option}")


def _safely(is_ours: Recogniser, path: str) -> bool:
    try:
        return bool(is_ours(path))
    except Exception:  # unreadable or of another format: not ours
        return False


def plain_name(name: str, option: str) -> str:
    """``name`` if it is one plain path component (no separator, not ``.``/``..``, not empty); it then
    names a folder inside the output folder and cannot reach outside it. Raises ``ConfigError``."""
    separators = [os.sep] + ([os.altsep] if os.altsep else [])
    if not name or name in (".", "..") or "\0" in name or any(s in name for s in separators):
        raise ConfigError(f"{option} {name!r}: must be a plain name (no '/', '..' or empty name); "
                          "it becomes a folder inside --out")
    return name


# ------------------------------------------------------------------------------------- recognisers
def is_our_json(keys: Sequence[str]) -> Recogniser:
    """A recogniser of JSON documents (objects) that hold all of ``keys``."""
    def recognise(path: str) -> bool:
        with open(path, "r", encoding="utf-8") as handle:
            document = json.load(handle)
        return isinstance(document, dict) and all(key in document for key in keys)
    return recognise


def is_our_jsonl(keys: Sequence[str]) -> Recogniser:
    """A recogniser of JSONL files whose first record holds all of ``keys`` (an empty file counts)."""
    def recognise(path: str) -> bool:
        with open(path, "r", encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), None)
        if first is None:
            return True
        record = json.loads(first)
        return isinstance(record, dict) and all(key in record for key in keys)
    return recognise


def is_our_yaml(keys: Sequence[str]) -> Recogniser:
    """A recogniser of YAML mappings that hold all of ``keys`` (e.g. the sections of a run's config)."""
    def recognise(path: str) -> bool:
        import yaml

        with open(path, "r", encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
        return isinstance(document, dict) and all(key in document for key in keys)
    return recognise


def is_our_png(path: str) -> bool:
    """True for a PNG that ``save_figure`` wrote (its ``Software`` text is ``unip``)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.format == "PNG" and str(image.info.get("Software", "")).startswith(FIGURE_SOFTWARE)


def is_our_jpeg(path: str) -> bool:
    """True for a JPEG that ``save_jpeg`` wrote (its comment is ``unip``)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.format == "JPEG" and image.info.get("comment") == JPEG_COMMENT


def starts_with_line(line: str) -> Recogniser:
    """A recogniser of text files whose first line is ``line`` (e.g. a CSV header)."""
    def recognise(path: str) -> bool:
        with open(path, "r", encoding="utf-8") as handle:
            return handle.readline().rstrip("\r\n") == line
    return recognise


def save_png(pixels, path: str, compress_level: int = 6) -> str:
    """Write an image array (uint8 ``[H, W]`` or ``[H, W, 3]``, uint16 ``[H, W]``) as PNG marked
    ``Software: unip`` (so that ``is_our_png`` recognises it), atomically; returns ``path``."""
    from PIL import Image, PngImagePlugin


    info = PngImagePlugin.PngInfo()
    info.add_text("Software", FIGURE_SOFTWARE)
    image = Image.fromarray(pixels)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info, compress_level=compress_level)
    return path


def save_jpeg(pixels, path: str, quality: int = 92) -> str:
    """Write an image array (uint8 ``[H, W]`` or ``[H, W, 3]``) as a JPEG with the comment ``unip`` (so that
    ``is_our_jpeg`` recognises it); returns ``path``."""
    from PIL import Image

    Image.fromarray(pixels).save(path, format="JPEG", quality=quality, comment=JPEG_COMMENT)
    return path


def save_figure(figure, path: str, dpi: int = 100) -> str:
    """Write a matplotlib ``figure`` as PNG marked ``Software: unip``, atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, metadata={"Software": FIGURE_SOFTWARE})
    return path
