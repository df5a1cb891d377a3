"""Turn the original MFNet and SCUT-Seg downloads into the release's layouts (``unip data prepare``).

MFNet (``ir_seg_dataset``): ``images/<name>.png`` are 4-channel RGB-T frames (R, G, B, thermal), ``labels/
<name>.png`` hold ids 0..8, and split files ``train.txt``, ``val.txt``, ``test.txt`` (optionally
``val_test.txt``, ``test_day.txt``, ``test_night.txt``) list names. Output: ``thermal_imgs/<name>.png``
(the 4th channel, 8-bit gray), ``labels/<name>.png`` and every split file present; ``val_test.txt``, which
the release validates on, is written as ``val.txt`` followed by ``test.txt`` when the download lacks it.

SCUT-Seg: ``scut_train.txt`` / ``scut_val.txt`` list ``IMAGE [LABEL]`` paths relative to the download that stay
inside it (an absolute path or ``..`` out of it is an error naming the line: :mod:`unip.data.listed`); images are
JPEGs under ``images/`` (possibly in sub-folders), labels Cityscapes-style ``<name>_labelIds.png`` (e.g.
under ``gt_instance/``). A listed path is looked up as given, under ``images/``, and else by name anywhere
in the download (regular files only: a FIFO or device is never opened). Output: ``images/<name>.jpg`` (the
same bytes), ``labels/<name>.png`` with ids 0, 7, 24, 25, 26, 27, 13, 21, 28, 17 remapped to 0..9 and every
other id to 255, and ``train.txt`` / ``val.txt``.

Both: every listed file is fully decoded and checked (image/label sizes, label values); a bad or missing
pair is skipped, left out of the split files written and listed with its reason in
``OUT/prepare-report.json``. Files are written atomically; ``OUT/.prepare-state.jsonl`` records what was
converted from which source (size, mtime), so a rerun or a run resumed after a kill converts only what is
new or changed. Nothing outside ``OUT`` is written and nothing is deleted; ``OUT`` must be empty, new, or
an earlier output of the same preparation.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from unip.atomic import atomic_path, atomic_write_text, remove_temporaries
from unip.data import layouts as L
from unip.data.images import ImageReadError, check_suffix, decode, read_bytes, read_label, regular_files
from unip.data.listed import relative_entry
from unip.data.parallel import thread_map
from unip.data.segmentation import read_split_file
from unip.errors import DataError

logger = logging.getLogger(__name__)

REPORT_FILE = "prepare-report.json"
STATE_FILE = ".prepare-state.jsonl"

#: Optional MFNet split files copied when present (besides train/val/test and val_test).
MFNET_EXTRA_SPLITS = ("test_day.txt", "test_night.txt")


@dataclass(frozen=True)
class Job:
    """One image to prepare: its output name, source files (None when not found) and why not found."""

    name: str
    image: Optional[str]
    label: Optional[str]
    missing: Optional[Tuple[str, str]] = None  # (path, detail) when a source is missing


@dataclass
class PrepareResult:
    """What :func:`prepare_download` did; ``splits`` maps each split file written to listed/written counts."""

    dataset: str
    raw: str
    out: str
    splits: Dict[str, Dict[str, int]]
    converted: int
    reused: int
    skipped: List[Dict[str, str]]
    ignored_ids: Dict[str, int] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def report(self) -> str:
        return os.path.join(self.out, REPORT_FILE)

    def table(self) -> str:
        """Text summary: one line per split file, then the counts."""
        lines = [f"{'split file':<16} {'listed':>8} {'written':>8}"]
        for name, c in self.splits.items():
            lines.append(f"{name:<16} {c['listed']:>8,} {c['written']:>8,}")
        lines.append(f"converted {self.converted:,}, reused {self.reused:,} unchanged, skipped {len(self.skipped):,}")
        return "\n".join(lines + self.notes)

    def to_json(self) -> Dict[str, object]:
        return {"dataset": self.dataset, "status": "done", "raw": self.raw, "out": self.out,
                "splits": self.splits, "converted": self.converted, "reused": self.reused,
                "skipped": self.skipped, "ignored_ids": self.ignored_ids, "notes": self.notes}


# ------------------------------------------------------------------------------------- output folder
def _claim_output(raw: str, out: str, dataset: str) -> None:
    """Make sure ``out`` may be written (module docstring) and mark it as this preparation's output."""
    report = os.path.join(out, REPORT_FILE)
    if os.path.isfile(report):
        try:
            with open(report, "r", encoding="utf-8") as fh:
                previous = json.load(fh).get("dataset")
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous != dataset:
            raise DataError(f"{out}: holds another preparation ({previous or 'unreadable report'}); "
                            "choose an empty folder")
        return
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"{out}: exists and is not empty; choose a new or empty folder (nothing is deleted)")
    atomic_write_text(report, json.dumps({"dataset": dataset, "status": "running", "raw": raw}) + "\n")


def _signature(path: str) -> List[object]:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def _load_state(out: str) -> Dict[str, dict]:
    state: Dict[str, dict] = {}
    path = os.path.join(out, STATE_FILE)
    if not os.path.isfile(path):
        return state
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except ValueError:
                break  # a half-written last line after a kill
            if _valid_entry(entry):  # any other damage: that image is converted again
                state[entry["name"]] = entry
    return state


def _valid_entry(entry: object) -> bool:
    """Whether a state line has the shape ``_run_job`` writes (name, sources, outputs)."""
    return (isinstance(entry, dict) and isinstance(entry.get("name"), str)
            and isinstance(entry.get("sources"), list) and isinstance(entry.get("outputs"), list)
            and all(isinstance(p, str) for p in entry["outputs"])
            and isinstance(entry.get("ignored_ids", {}), dict)
            and all(str(k).isdigit() and isinstance(v, int) for k, v in entry.get("ignored_ids", {}).items()))


def _reusable(job: Job, entry: Optional[dict]) -> bool:
    if entry is None or job.image is None or job.label is None:
        return False
    try:
        same = entry["sources"] == [_signature(job.image), _signature(job.label)]
    except OSError:
        return False
    return same and all(os.path.isfile(p) for p in entry["outputs"])


# ------------------------------------------------------------------------------------- converters
class Skip(Exception):
    """A job cannot be converted: ``path`` at fault, short ``reason`` and ``detail``."""

    def __init__(self, path: str, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


def _save_png(pixels: np.ndarray, path: str) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def _label_ids(path: str, image_size: Tuple[int, int]) -> np.ndarray:
    """Read a label (uint8 ``[H, W]`` ids) and check its size against the image's ``(H, W)``."""
    try:
        label = read_label(path)
    except ImageReadError as err:
        raise Skip(path, err.reason, err.detail) from None
    if label.shape != image_size:
        raise Skip(path, "size-mismatch", f"label is {label.shape[1]}x{label.shape[0]}, "
                                          f"image is {image_size[1]}x{image_size[0]}")
    return label


def _mfnet_outputs(job: Job, out: str) -> List[str]:
    """The files converting ``job`` writes: ``[image, label]`` under ``out`` (none for a job without image)."""
    if job.image is None:
        return []
    return [os.path.join(out, L.MFNET_IMAGE_DIR, job.name + ".png"),
            os.path.join(out, L.MFNET_LABEL_DIR, job.name + ".png")]


def _scut_outputs(job: Job, out: str) -> List[str]:
    """The files converting ``job`` writes: ``[image, label]`` under ``out`` (none for a job without image)."""
    if job.image is None:
        return []
    return [os.path.join(out, L.SCUT_IMAGE_DIR, job.name + os.path.splitext(job.image)[1].lower()),
            os.path.join(out, L.SCUT_LABEL_DIR, job.name + ".png")]


def _remove_temporaries(preparation: "Preparation", out: str, jobs: Sequence[Job],
                        split_files: Sequence[str]) -> List[Path]:
    """Delete the temporary files that a killed run left for the files this run writes (``unip.atomic``);
    returns their paths."""
    owned: Dict[str, set] = {out: {REPORT_FILE, STATE_FILE, *split_files}}
    for job in jobs:
        for path in preparation.outputs(job, out):
            owned.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
    return [path for folder, names in owned.items() for path in remove_temporaries(folder, names.__contains__)]


def _convert_mfnet(job: Job, out: str) -> Tuple[List[str], Dict[str, int]]:
    """Write the thermal channel and the checked label of one MFNet frame; returns (outputs, {})."""
    try:
        check_suffix(job.image)
        img = decode(read_bytes(job.image), job.image)
    except ImageReadError as err:
        raise Skip(job.image, err.reason, err.detail) from None
    if img.mode != "RGBA":
        raise Skip(job.image, "not-rgbt", f"a {img.mode} image, not a 4-channel RGB-T frame")
    thermal = np.ascontiguousarray(np.asarray(img)[:, :, 3])
    label = _label_ids(job.label, thermal.shape)
    bad = (label >= len(L.MFNET_CLASSES)) & (label != L.IGNORE_INDEX)
    if bad.any():
        raise Skip(job.label, "bad-label-value", f"values {sorted(set(label[bad].tolist()))[:8]} are not MFNet "
                                                 f"ids 0..{len(L.MFNET_CLASSES) - 1} or 255")
    outputs = _mfnet_outputs(job, out)
    _save_png(thermal, outputs[0])
    _save_png(label, outputs[1])
    return outputs, {}


def scut_lookup() -> np.ndarray:
    """Return the uint8 ``[256]`` table mapping SCUT-Seg's Cityscapes ids to 0..9 (others → 255)."""
    table = np.full(256, L.IGNORE_INDEX, np.uint8)
    for new, old in enumerate(L.SCUT_RAW_IDS):
        table[old] = new
    return table


def _convert_scut(job: Job, out: str) -> Tuple[List[str], Dict[str, int]]:
    """Copy one SCUT-Seg JPEG and write its remapped label; returns (outputs, {raw id: pixels → 255})."""
    try:
        check_suffix(job.image)
        data = read_bytes(job.image)
        img = decode(data, job.image)
    except ImageReadError as err:
        raise Skip(job.image, err.reason, err.detail) from None
    raw = _label_ids(job.label, (img.height, img.width))
    counts = np.bincount(raw.ravel(), minlength=256)
    table = scut_lookup()
    ignored = {str(i): int(counts[i]) for i in np.nonzero(counts)[0]
               if table[i] == L.IGNORE_INDEX and i != L.IGNORE_INDEX}
    outputs = _scut_outputs(job, out)
    with atomic_path(outputs[0]) as tmp:
        tmp.write_bytes(data)
    _save_png(table[raw], outputs[1])
    return outputs, ignored


# ------------------------------------------------------------------------------------- job lists
def _mfnet_jobs(raw: str) -> Tuple[Dict[str, List[str]], Dict[str, Job], List[str]]:
    """Return ({output split file: names}, {name: job}, notes) for an MFNet download."""
    lists: Dict[str, List[str]] = {}
    for split_file in ("train.txt", "val.txt", "test.txt", "val_test.txt") + MFNET_EXTRA_SPLITS:
        path = os.path.join(raw, split_file)
        if os.path.isfile(path):
            lists[split_file] = read_split_file(path)
            odd = next((n for n in lists[split_file] if os.path.basename(n) != n or n in (".", "..")), None)
            if odd is not None:  # it would read and write outside the data set's folders
                raise DataError(f"{path}: lists {odd!r}, which is not a plain file name (MFNet's are like 00001D); "
                                "fix the split file")
    notes = []
    for required in ("train.txt", "test.txt"):
        if required not in lists:
            raise DataError(f"{os.path.join(raw, required)}: not found; is {raw} the MFNet download "
                            "(images/, labels/, train.txt, val.txt, test.txt)?")
    if "val_test.txt" not in lists and "val.txt" in lists:
        lists["val_test.txt"] = lists["val.txt"] + lists["test.txt"]
        notes.append("val_test.txt (the release's validation split) = val.txt followed by test.txt")
    jobs = {}
    for name in dict.fromkeys(n for names in lists.values() for n in names):
        image = os.path.join(raw, L.MFNET_RAW_IMAGE_DIR, name + ".png")
        label = os.path.join(raw, L.MFNET_RAW_LABEL_DIR, name + ".png")
        missing = next(((p, "listed in a split file but not found") for p in (image, label)
                        if not os.path.isfile(p)), None)
        jobs[name] = Job(name, image if os.path.isfile(image) else None,
                         label if os.path.isfile(label) else None, missing)
    return lists, jobs, notes


def _index_files(raw: str, out: str, keep: Callable[[str], Optional[str]]) -> Dict[str, List[str]]:
    """Map ``keep(file name)`` (a key, or None to drop the file) to the paths of the regular files under ``raw``
    (not ``out``)."""
    index: Dict[str, List[str]] = {}
    real_out = os.path.realpath(out)
    for folder, dirs, files in os.walk(raw):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) != real_out)
        for name in regular_files(folder, sorted(files)):
            key = keep(name)
            if key is not None:
                index.setdefault(key, []).append(os.path.join(folder, name))
    return index


def _image_key(name: str) -> Optional[str]:
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in L.IMAGE_SUFFIXES and not stem.endswith(("_labelIds", "_color",
                                                                            "_instanceIds")) else None


def _label_key(name: str) -> Optional[str]:
    return name[:-len(L.SCUT_RAW_LABEL_SUFFIX)] if name.endswith(L.SCUT_RAW_LABEL_SUFFIX) else None


def _find(raw: str, token: Optional[str], roots: Sequence[str], index: Dict[str, List[str]], key: str,
          near: str = "") -> Tuple[Optional[str], Optional[str]]:
    """Return (path, None) for a listed file, or (None, why not) if it is missing or ambiguous. Among several
    files of the name, those under one of ``roots`` are preferred, then those in a folder ending in ``near``
    (the image's sub-folder, e.g. ``set01``, for its label)."""
    if token:
        for root in roots:
            path = os.path.join(raw, root, token)
            if os.path.isfile(path):
                return path, None
    found = index.get(key, [])
    if len(found) > 1:  # e.g. a visualisation of the same name beside the labels: prefer the expected folder
        preferred = [p for p in found for root in roots if root and p.startswith(os.path.join(raw, root, ""))]
        found = preferred or found
    if len(found) > 1 and near:
        found = [p for p in found if os.path.dirname(p).endswith(os.sep + near)] or found
    if len(found) == 1:
        return found[0], None
    if found:
        return None, f"{len(found)} files are named like it ({', '.join(found[:2])}, ...)"
    return None, "listed in a split file but not found"


def _stem(token: str) -> str:
    return os.path.splitext(os.path.basename(token))[0]


def _sub_folder(raw: str, path: str) -> str:
    """The folder of ``path`` relative to the download, without the leading ``images/`` (``images/a/x.jpg`` →
    ``a``; empty for a file at the top)."""
    parts = os.path.normpath(os.path.relpath(path, raw)).split(os.sep)[:-1]
    return os.sep.join(parts[1:] if parts[:1] == [L.SCUT_IMAGE_DIR] else parts)


def _unique_names(raw: str, images: Dict[str, Tuple[str, str]]) -> Dict[str, str]:
    """Output names of the listed images (``{image: (file name stem, path found or as listed)}`` →
    ``{image: name}``): the stem, or where several images share it (``images/a/x.jpg``, ``images/b/x.jpg``)
    the stem prefixed by each one's sub-folder (``a_x``, ``b_x``). Raises ``DataError`` when two images would
    still get one name."""
    by_stem: Dict[str, List[str]] = {}
    for image, (stem, _) in images.items():
        by_stem.setdefault(stem, []).append(image)
    names: Dict[str, str] = {}
    owner: Dict[str, str] = {}
    for image, (stem, path) in images.items():
        sub = _sub_folder(raw, path) if len(by_stem[stem]) > 1 else ""
        name = "_".join(sub.split(os.sep) + [stem]) if sub else stem
        if name in owner:
            raise DataError(f"{raw}: {os.path.relpath(images[owner[name]][1], raw)} and {os.path.relpath(path, raw)} "
                            f"would both be written as '{name}'; rename one of them (and its label) in the download")
        names[image], owner[name] = name, image
    return names


def _scut_jobs(raw: str, out: str) -> Tuple[Dict[str, List[str]], Dict[str, Job], List[str]]:
    """Return ({output split file: names}, {name: job}, notes) for a SCUT-Seg download.

    An image is named by its file name; images of the same file name in different sub-folders are told apart
    by their sub-folder (``_unique_names``)."""
    entries: Dict[str, List[Tuple[str, Optional[str]]]] = {}
    for split, raw_file in L.SCUT_RAW_SPLITS.items():
        path = os.path.join(raw, raw_file)
        if not os.path.isfile(path):
            raise DataError(f"{path}: not found; is {raw} the SCUT-Seg download (images/, *_labelIds.png, "
                            "scut_train.txt, scut_val.txt)?")
        try:
            with open(path, "r", encoding="utf-8-sig") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read the split file ({err}); it should list 'image [label]' paths, "
                            "one per line, in UTF-8") from None
        entries[L.SCUT_SPLITS[split]] = [_listed_pair(line.split(), raw, f"{path}, line {number}")
                                         for number, line in enumerate(lines, 1) if line.strip()]
    images = _index_files(raw, out, _image_key)
    labels = _index_files(raw, out, _label_key)
    tokens = dict.fromkeys(token for pairs in entries.values() for token, _ in pairs)
    found = {token: _find(raw, token, ("", L.SCUT_IMAGE_DIR), images, _stem(token)) for token in tokens}
    # an image listed in two ways (by name, by path) is one image: it is known by the file found
    image_of = {token: os.path.realpath(found[token][0]) if found[token][0] else
                os.path.normpath(os.path.join(raw, token)) for token in tokens}
    listed: Dict[str, Tuple[str, str]] = {}
    for token in tokens:
        listed.setdefault(image_of[token], (_stem(token), found[token][0] or image_of[token]))
    names = _unique_names(raw, listed)
    lists: Dict[str, List[str]] = {}
    jobs: Dict[str, Job] = {}
    for split_file, pairs in entries.items():
        lists[split_file] = [names[image_of[token]] for token, _ in pairs]
        for token, label_token in pairs:
            name = names[image_of[token]]
            if name in jobs:
                continue
            (image, why_image), (stem, path) = found[token], listed[image_of[token]]
            label, why_label = _find(raw, label_token, ("",), labels, stem, near=_sub_folder(raw, path))
            missing = ((os.path.join(raw, token), why_image) if image is None else
                       (os.path.join(raw, label_token or stem + L.SCUT_RAW_LABEL_SUFFIX), why_label)
                       if label is None else None)
            jobs[name] = Job(name, image, label, missing)  # type: ignore[arg-type]
    return lists, jobs, []


def _listed_pair(tokens: List[str], raw: str, where: str) -> Tuple[str, Optional[str]]:
    """``(image, label or None)`` of one line of a SCUT-Seg list file: paths inside the download (``raw``)."""
    image = relative_entry(tokens[0], raw, where)
    return image, relative_entry(tokens[1], raw, where) if len(tokens) > 1 else None


# ------------------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class Preparation:
    """How one data set's original download becomes its layout (the ``prepare`` of its entry in
    ``unip.data.datasets.DATASETS``): ``jobs(raw, out)`` → ``(split files and the names they list, {name: Job},
    notes)``; ``outputs(job, out)`` → the files converting a job writes; ``convert(job, out)`` → ``(those files,
    {raw id: pixels set to 255})``, raising ``Skip`` for a pair it cannot convert."""

    jobs: Callable[[str, str], Tuple[Dict[str, List[str]], Dict[str, Job], List[str]]]
    outputs: Callable[[Job, str], List[str]]
    convert: Callable[[Job, str], Tuple[List[str], Dict[str, int]]]


MFNET = Preparation(lambda raw, out: _mfnet_jobs(raw), _mfnet_outputs, _convert_mfnet)
SCUT = Preparation(_scut_jobs, _scut_outputs, _convert_scut)


def _run_job(job: Job, out: str, preparation: Preparation) -> Tuple[Job, Optional[dict], Optional[Dict[str, str]]]:
    """Convert one job; returns (job, state entry, None) or (job, None, skip entry)."""
    if job.missing is not None:
        return job, None, {"name": job.name, "path": job.missing[0], "reason": "missing", "detail": job.missing[1]}
    try:
        sources = [_signature(job.image), _signature(job.label)]  # type: ignore[arg-type]
        outputs, ignored = preparation.convert(job, out)
    except Skip as skip:
        return job, None, {"name": job.name, "path": skip.path, "reason": skip.reason, "detail": skip.detail}
    except OSError as err:
        return job, None, {"name": job.name, "path": str(err.filename or job.image), "reason": "io-error",
                           "detail": err.strerror or str(err)}
    return job, {"name": job.name, "sources": sources, "outputs": outputs, "ignored_ids": ignored}, None


def prepare_download(dataset: str, preparation: Preparation, raw: str, out: str, workers: Optional[int] = None,
                     progress: bool = False) -> PrepareResult:
    """Convert the original download ``raw`` of ``dataset`` into its layout in ``out`` as ``preparation`` says
    (``unip.data.datasets.prepare_dataset`` finds it by the data set's name).

    Returns a :class:`PrepareResult` (also written to ``out/prepare-report.json``). Raises
    :class:`DataError` if ``raw`` is not such a download, ``out`` cannot be used, or no image survives.
    """
    raw, out = os.path.abspath(os.path.expanduser(raw)), os.path.abspath(os.path.expanduser(out))
    if not os.path.isdir(raw):
        raise DataError(f"{raw}: download folder not found")
    if os.path.realpath(raw) == os.path.realpath(out):
        raise DataError(f"{out}: the output folder must differ from the download folder")
    lists, jobs, notes = preparation.jobs(raw, out)
    _claim_output(raw, out, dataset)
    removed = _remove_temporaries(preparation, out, list(jobs.values()), list(lists))
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run (e.g. %s)", len(removed), removed[0])
    state = _load_state(out)
    kept: Dict[str, dict] = {}
    skipped: List[Dict[str, str]] = []
    todo = []
    for job in jobs.values():
        if _reusable(job, state.get(job.name)):
            kept[job.name] = state[job.name]
        else:
            todo.append(job)
    reused = len(kept)
    with open(os.path.join(out, STATE_FILE), "a", encoding="utf-8") as journal:
        results = thread_map(lambda j: _run_job(j, out, preparation), todo, workers)
        for job, entry, skip in tqdm(results, total=len(todo), desc=f"prepare {dataset}", unit="img",
                                     disable=None if progress else True):
            if entry is not None:
                kept[job.name] = entry
                journal.write(json.dumps(entry) + "\n")
                journal.flush()
            else:
                skipped.append(skip)  # type: ignore[arg-type]
    return _finish(dataset, raw, out, lists, kept, skipped, reused, len(todo) - len(skipped), notes)


def _finish(dataset: str, raw: str, out: str, lists: Dict[str, List[str]], kept: Dict[str, dict],
            skipped: List[Dict[str, str]], reused: int, converted: int, notes: List[str]) -> PrepareResult:
    """Write the split files, the compacted state and the report; returns the result."""
    splits = {}
    for split_file, names in lists.items():
        written = [n for n in names if n in kept]
        atomic_write_text(os.path.join(out, split_file), "".join(f"{n}\n" for n in written))
        splits[split_file] = {"listed": len(names), "written": len(written)}
    atomic_write_text(os.path.join(out, STATE_FILE), "".join(json.dumps(e) + "\n" for e in kept.values()))
    ignored: Dict[str, int] = {}
    for entry in kept.values():
        for raw_id, pixels in entry.get("ignored_ids", {}).items():
            ignored[raw_id] = ignored.get(raw_id, 0) + pixels
    if ignored:
        notes = notes + ["pixels of other ids set to 255 (ignore): "
                         + ", ".join(f"id {k}: {v:,}" for k, v in sorted(ignored.items(), key=lambda kv: int(kv[0])))]
    result = PrepareResult(dataset, raw, out, splits, converted, reused, skipped,
                           dict(sorted(ignored.items(), key=lambda kv: int(kv[0]))), notes)
    atomic_write_text(result.report, json.dumps(result.to_json(), indent=1) + "\n")
    if not kept:
        raise DataError(f"{raw}: no usable image ({len(skipped)} skipped, reasons in {result.report})")
    return result
