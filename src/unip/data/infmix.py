"""InfMix builder: scan image folders into a checked, de-duplicated manifest and a report.

Sources (as in the paper's InfMix): every ``<infrared>/<dataset>/thermal/`` folder (one source per data set,
searched recursively), the first ``per_class`` images (sorted by name) of each ImageNet class folder, COCO
``train2017`` and any extra folders. Every file is read and fully decoded; bad files are skipped and listed
in the report with a reason, exact duplicates (same BLAKE2b hash of the bytes) are kept once, and files
whose real path lies outside the root they were found under (symlinks) are refused without being read.

Files are read through the input mapping every verb shares (``unip.data.inputs``), so a user's own thermal
recordings become pre-training images: FLIR R-JPEGs and ``.fff`` frames (their raster, not the preview), 16-bit
TIFF/PNG, and every ``every``-th frame of a ``.seq`` / ``.csq`` sequence, each frame an image of its own (record
key ``frame``; its hash is that of its counts, so a frozen camera's repeated frames are duplicates). Images that
are no sensor's raster (palette pictures, byte-swapped rasters read swapped back) are kept, listed in the report's
``issues`` and warned about once.

The manifest is JSONL, one object per image::

    {"path": ..., "source": "SODA", "kind": "infrared", "width": 640, "height": 512, "mode": "L",
     "format": "8-bit image", "bytes": 51234, "mtime_ns": ..., "hash": "<32 hex>"}

(``width`` and ``height`` are the model image's: an R-JPEG's raster; ``mode`` the PIL mode, ``I;16`` for a FLIR
raster; a sequence's frames add ``"frame": K, "step": every``; ``"issues": [...]`` where there are any.)

and ``<manifest>.report.json`` (see :func:`report_path`) holds the per-source counts and the skipped files.
Scans are incremental: a file whose (path, size, mtime) is unchanged since the last scan is not read
again, and a scan that is interrupted resumes from ``<manifest>.journal`` where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from unip.data.images import ImageReadError, read_bytes
from unip.data.inputs import INPUT_SUFFIXES, ModelInput, check_input_suffix, issue_lines, read_input
from unip.data.layouts import COCO_OTHER_DIRS, COCO_TRAIN_DIR, IMAGENET_SPLIT_DIRS, SEQUENCE_SUFFIXES, THERMAL_DIR
from unip.data.thermal import frame_count
from unip.data.thermal.frame import ISSUES
from unip.data.parallel import thread_map
from unip.errors import DataError
from unip.outputs import claim, is_our_json, is_our_jsonl, out_file

logger = logging.getLogger(__name__)

Entry = Dict[str, object]


@dataclass(frozen=True)
class Candidate:
    """One file found by a scan: where it is, which source it belongs to, and why it is refused if so.

    ``refused`` is ``(reason, detail)`` for files that must not be read, else None.
    """

    path: str
    source: str
    kind: str
    refused: Optional[Tuple[str, str]] = None


@dataclass
class ScanResult:
    """Outcome of :func:`build_manifest`: kept records, skipped entries and how much was (re)read."""

    manifest: str
    records: List[Entry]
    skipped: List[Entry]
    read: int
    reused: int
    counts: Dict[str, Dict[str, object]] = field(default_factory=dict)
    issues: Dict[str, List[str]] = field(default_factory=dict)

    def issue_lines(self) -> List[str]:
        """One line per kind of image that is no sensor's raster (palette pictures, byte-swapped rasters)."""
        return issue_lines(self.issues)

    def table(self) -> str:
        """Return the per-source count table (like the paper's InfMix table) as text."""
        return format_counts(self.counts)


# ------------------------------------------------------------------------------------- discovery
def _inside(path: str, real_root: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def walk_files(top: str, root: str) -> Iterator[Tuple[str, Optional[Tuple[str, str]]]]:
    """Yield ``(path, refusal)`` for every file under ``top`` in sorted order, recursively.

    ``refusal`` is None for files whose real path is inside ``root``; otherwise ``(reason, detail)`` says
    why the file (or a symlinked or unreadable folder, yielded as one entry) is refused: ``outside-root``
    or ``io-error``. Symlinked folders inside ``root`` are followed once.
    """
    real_root = os.path.realpath(root)
    seen = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            names = sorted(os.listdir(folder))
        except OSError as err:
            yield folder, ("io-error", f"cannot list folder: {err.strerror or err}")
            continue
        subdirs = []
        for name in names:
            path = os.path.join(folder, name)
            if not _inside(path, real_root):
                yield path, ("outside-root", f"symlink to {os.path.realpath(path)}, outside {root}")
            elif os.path.isdir(path):
                subdirs.append(path)
            elif os.path.isfile(path):
                yield path, None
        stack.extend(reversed(subdirs))


def _folder_candidates(top: str, root: str, source: str, kind: str,
                       limit: Optional[int] = None) -> Iterator[Candidate]:
    taken = 0
    for path, refused in walk_files(top, root):
        is_image = os.path.splitext(path)[1].lower() in INPUT_SUFFIXES
        if limit is not None and is_image and refused is None:
            if taken >= limit:
                continue
            taken += 1
        yield Candidate(path, source, kind, refused)


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DataError(f"{path}: {what} folder not found; check the path")
    return os.path.abspath(path)


def _subfolders(root: str) -> List[str]:
    """Sorted names of the folders directly inside ``root``."""
    return [name for name in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, name))]


def infrared_candidates(root: str) -> Iterator[Candidate]:
    """Candidates from ``root/<dataset>/thermal/`` (source = data set name, kind ``infrared``).

    Raises ``DataError`` when ``root`` is one data set's folder (it holds ``thermal/``) or holds no data set;
    folders without ``thermal/`` are skipped with a warning naming them."""
    root = _require_dir(root, "infrared root")
    if os.path.isdir(os.path.join(root, THERMAL_DIR)):
        raise DataError(f"{root}: is one data set's folder (it holds {THERMAL_DIR}/); --infrared takes the folder "
                        f"above it, which holds one folder per data set: --infrared {os.path.dirname(root)}")
    folders = _subfolders(root)
    datasets = [d for d in folders if os.path.isdir(os.path.join(root, d, THERMAL_DIR))]
    if not datasets:
        raise DataError(f"{root}: no <dataset>/{THERMAL_DIR}/ folder found; the infrared root must hold "
                        f"one folder per data set, each with a '{THERMAL_DIR}' subfolder")
    others = [d for d in folders if d not in datasets]
    if others:
        logger.warning("%s: skipped %d folder(s) without a %s/ subfolder: %s", root, len(others), THERMAL_DIR,
                       ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""))
    for name in datasets:
        yield from _folder_candidates(os.path.join(root, name, THERMAL_DIR), root, name, "infrared")


def imagenet_candidates(root: str, per_class: int) -> Iterator[Candidate]:
    """Candidates from the first ``per_class`` image files (sorted) of each class folder of ``root``.

    Raises ``DataError`` when ``root`` is the download's root (it holds ``train/``, ``val/``...) rather than
    its train folder, or holds no class folder."""
    root = _require_dir(root, "ImageNet")
    classes = _subfolders(root)
    splits = [name for name in classes if name in IMAGENET_SPLIT_DIRS]
    if splits:
        raise DataError(f"{root}: holds {', '.join(f'{name}/' for name in splits)}: an ImageNet root, not its "
                        f"train folder; pass the folder of class folders: --imagenet {os.path.join(root, 'train')}")
    if not classes:
        raise DataError(f"{root}: no class folder; --imagenet takes ImageNet's train folder, one folder per "
                        "class (pass a plain folder of images with --extra)")
    for name in classes:
        yield from _folder_candidates(os.path.join(root, name), root, "ImageNet", "imagenet", limit=per_class)


def coco_candidates(root: str) -> Iterator[Candidate]:
    """Candidates from ``root/train2017`` (or ``root`` itself when it is that folder, or a folder of images).

    Raises ``DataError`` when ``root`` is a COCO root without ``train2017/`` (it holds ``val2017/``,
    ``annotations/``...): scanning it would take those images and files in as training images."""
    root = _require_dir(root, "COCO")
    top = os.path.join(root, COCO_TRAIN_DIR)
    if not os.path.isdir(top):
        others = [name for name in _subfolders(root) if name in COCO_OTHER_DIRS]
        if others:
            raise DataError(f"{root}: a COCO root without {COCO_TRAIN_DIR}/ (it holds "
                            f"{', '.join(f'{name}/' for name in others)}); InfMix takes COCO's training images: "
                            f"unpack {COCO_TRAIN_DIR} into it, or point --coco at the {COCO_TRAIN_DIR} folder")
        top = root
    yield from _folder_candidates(top, top, "COCO", "coco")


def extra_candidates(root: str, source: str) -> Iterator[Candidate]:
    """Candidates from every file under ``root`` (source = ``source``, kind ``extra``)."""
    root = _require_dir(root, "extra")
    yield from _folder_candidates(root, root, source, "extra")


def gather_candidates(infrared: Optional[str] = None, imagenet: Optional[str] = None,
                      per_class: int = 200, coco: Optional[str] = None,
                      extra: Sequence[str] = ()) -> List[Candidate]:
    """Return every candidate file of the given sources, in a deterministic order."""
    if not (infrared or imagenet or coco or extra):
        raise DataError("no source given; pass at least one of --infrared, --imagenet, --coco, --extra")
    found: List[Candidate] = []
    if infrared:
        found.extend(infrared_candidates(infrared))
    if imagenet:
        found.extend(imagenet_candidates(imagenet, per_class))
    if coco:
        found.extend(coco_candidates(coco))
    taken = {c.source for c in found}
    for folder in extra:
        name = os.path.basename(os.path.normpath(folder)) or "extra"
        source, n = name, 1
        while source in taken:
            n += 1
            source = f"{name}-{n}"
        taken.add(source)
        found.extend(extra_candidates(folder, source))
    return found


# ------------------------------------------------------------------------------------- inspection
#: Formats whose model image is a camera's 16-bit raster (manifest ``mode`` ``I;16``).
_FLIR_FORMATS = ("FLIR JPEG", "FFF", "SEQ", "CSQ", "DJI JPEG")


def inspect_candidate(cand: Candidate, every: int = 1) -> List[Entry]:
    """The manifest records (or skip entries) of one candidate: one for an image, one per ``every``-th frame of a
    sequence (``.seq`` / ``.csq``)."""
    if os.path.splitext(cand.path)[1].lower() in SEQUENCE_SUFFIXES:
        return inspect_sequence(cand, every)
    return [inspect_file(cand)]


def _base(cand: Candidate) -> Tuple[Entry, Optional[Entry]]:
    """The fields every entry of ``cand`` has, and a skip entry when it cannot even be looked at."""
    base: Entry = {"path": cand.path, "source": cand.source, "kind": cand.kind}
    try:
        st = os.stat(cand.path)
    except OSError as err:
        return base, {**base, "reason": "io-error", "detail": f"cannot stat: {err.strerror or err}"}
    base.update(bytes=st.st_size, mtime_ns=st.st_mtime_ns)
    return base, None


def inspect_file(cand: Candidate) -> Entry:
    """Read and decode one candidate as every reader will (``unip.data.inputs``); returns its manifest record, or
    a skip entry (with ``reason``)."""
    base, failed = _base(cand)
    if failed is not None:
        return failed
    try:
        check_input_suffix(cand.path)
        data = read_bytes(cand.path)
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        item = read_input(cand.path)  # what every reader does next (e.g. an all-NaN float frame is refused)
    except ImageReadError as err:
        return {**base, "reason": err.reason, "detail": err.detail}
    return {**base, **_described(item, _pil_mode(data)), "hash": digest}


def inspect_sequence(cand: Candidate, every: int = 1) -> List[Entry]:
    """One entry per ``every``-th frame of a SEQ/CSQ (a damaged frame: a skip entry with its ``frame``)."""
    base, failed = _base(cand)
    if failed is not None:
        return [failed]
    try:
        check_input_suffix(cand.path)
        frames = frame_count(cand.path)
    except ImageReadError as err:
        return [{**base, "reason": err.reason, "detail": err.detail}]
    entries: List[Entry] = []
    for index in range(0, frames, every):
        where: Entry = {**base, "frame": index, "step": every}
        try:
            item = read_input(cand.path, frame=index)
        except ImageReadError as err:
            entries.append({**where, "reason": err.reason, "detail": err.detail})
            continue
        digest = hashlib.blake2b(item.frame.counts.tobytes(), digest_size=16).hexdigest()
        entries.append({**where, **_described(item, "I;16"), "hash": digest})
    return entries


def _described(item: ModelInput, mode: str) -> Entry:
    """A record's description of what the model will read."""
    frame = item.frame
    described: Entry = {"width": int(item.image.shape[1]), "height": int(item.image.shape[0]),
                        "mode": "I;16" if frame is not None and frame.format in _FLIR_FORMATS else mode,
                        "format": frame.format if frame is not None else "float image"}
    if item.issues:
        described["issues"] = list(item.issues)
    return described


def _pil_mode(data: bytes) -> str:
    """The PIL mode of an image file's bytes (header only), or ``I;16`` for what PIL does not read (FFF)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.mode
    except Exception:  # not a PIL format: a FLIR file
        return "I;16"


def _cached(entries: Optional[List[Entry]], cand: Candidate, every: int = 1) -> Optional[List[Entry]]:
    """The cached entries of ``cand`` if the file's size and mtime are unchanged (and a sequence's frames were
    taken with the same ``every``), else None."""
    if not entries or any(e.get("reason") in ("outside-root", "io-error") for e in entries):
        return None
    try:
        st = os.stat(cand.path)
    except OSError:
        return None
    sequence = os.path.splitext(cand.path)[1].lower() in SEQUENCE_SUFFIXES
    for entry in entries:
        if entry.get("bytes") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            return None
        if sequence and entry.get("step", every) != every:
            return None
    return [{**entry, "source": cand.source, "kind": cand.kind} for entry in entries]


# ------------------------------------------------------------------------------------- files
def report_path(manifest: str) -> str:
    """Return the report path that goes with ``manifest`` (``x.jsonl`` → ``x.report.json``)."""
    stem = manifest[:-len(".jsonl")] if manifest.endswith(".jsonl") else manifest
    return stem + ".report.json"


def _journal_path(manifest: str) -> str:
    return manifest + ".journal"


def _read_jsonl(path: str) -> List[Entry]:
    """The JSON objects of a JSONL file, one per non-empty line. Raises ``DataError`` naming the file and
    line for text that is not UTF-8 or a line that is not a JSON object (a journal may end in a
    half-written line after a crash: reading stops there)."""
    entries = []
    journal = path.endswith(".journal")
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8").strip()
                    entry = json.loads(line) if line else None
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    if journal:
                        break
                    what = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else "not valid JSON"
                    raise DataError(f"{path}:{lineno}: {what}; rebuild it with `unip data infmix`") from None
                if entry is None:
                    continue
                if not isinstance(entry, dict):
                    if journal:
                        break
                    raise DataError(f"{path}:{lineno}: not a JSON object; rebuild it with `unip data infmix`")
                entries.append(entry)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    return entries


def read_manifest(path: str) -> List[Entry]:
    """Return the records of a JSONL manifest (one dict per image, in file order)."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a manifest file; pass the .jsonl file written by "
                        "`unip data infmix`")
    if not os.path.isfile(path):
        raise DataError(f"{path}: manifest not found; build it with `unip data infmix`")
    try:
        records = _read_jsonl(path)
    except DataError:
        _refuse_json_document(path)
        raise
    for i, rec in enumerate(records, 1):
        if not isinstance(rec.get("path"), str) or not rec["path"] or "source" not in rec:
            raise DataError(f"{path}:{i}: record lacks a 'path' text or a 'source'; "
                            "rebuild it with `unip data infmix`")
    return records


def _refuse_json_document(path: str) -> None:
    """Raise ``DataError`` saying so when ``path`` holds one JSON document over several lines (e.g. a scan
    report) rather than JSONL; return otherwise (a one-line file's line error says it better) and for files too
    large to be such a document."""
    try:
        if os.path.getsize(path) > 64 << 20:
            return
        with open(path, "r", encoding="utf-8") as fh:
            text = fh.read().strip()
        document = json.loads(text)
    except (OSError, ValueError):
        return
    if "\n" not in text:
        return
    if isinstance(document, dict) and {"manifest", "counts", "skipped"} <= set(document):
        raise DataError(f"{path}: is the scan report of `unip data infmix`, not its manifest; pass the manifest "
                        f"({document['manifest']})") from None
    raise DataError(f"{path}: is one JSON document, not a manifest (JSONL: one JSON object per line); pass the "
                    ".jsonl file written by `unip data infmix`") from None


def _write_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _load_cache(manifest: str) -> Dict[str, List[Entry]]:
    """Path → the entries of the last scan (a sequence has one per frame): the earlier manifest and report,
    then the journal of an interrupted scan, whose entries replace them file by file."""
    last: List[Entry] = []
    if os.path.isfile(manifest):
        try:
            last += read_manifest(manifest)
        except DataError as err:  # a damaged earlier manifest is only a cache: rescan what it listed
            logger.warning("ignoring the earlier manifest, every file is read again: %s", err)
    report = report_path(manifest)
    if os.path.isfile(report):
        for entry in _read_report(report).get("skipped", []):
            # A duplicate carries its full record; the duplicate status is recomputed every scan.
            cached = entry.get("record") if entry.get("reason") == "duplicate" else entry
            if isinstance(cached, dict) and "path" in entry:
                last.append(cached)
    cache = _by_path(last)
    journal = _journal_path(manifest)
    if os.path.isfile(journal):
        cache.update(_by_path(_read_jsonl(journal)))
    return cache


def _by_path(entries: List[Entry]) -> Dict[str, List[Entry]]:
    grouped: Dict[str, List[Entry]] = {}
    for entry in entries:
        grouped.setdefault(str(entry["path"]), []).append(entry)
    return grouped


def _read_report(path: str) -> Dict[str, object]:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable scan report ({type(err).__name__}); delete it to rescan") from None
    if not isinstance(report, dict) or not isinstance(report.get("skipped", []), list):
        raise DataError(f"{path}: not a scan report of `unip data infmix`; delete it to rescan")
    return report


# ------------------------------------------------------------------------------------- building
def _inspect_all(cands: List[Candidate], cache: Dict[str, List[Entry]], journal: str,
                 workers: Optional[int], every: int = 1) -> Tuple[List[Entry], int, int]:
    """Return the entries of every candidate (same order; a sequence gives one per frame), how many files were
    read and how many reused."""
    entries: List[Optional[List[Entry]]] = [None] * len(cands)
    todo: List[int] = []
    for i, cand in enumerate(cands):
        if cand.refused is not None:
            entries[i] = [{"path": cand.path, "source": cand.source, "kind": cand.kind,
                           "reason": cand.refused[0], "detail": cand.refused[1]}]
        else:
            entries[i] = _cached(cache.get(cand.path), cand, every)
            if entries[i] is None:
                todo.append(i)
    with open(journal, "a", encoding="utf-8") as jf, \
            tqdm(total=len(todo), desc="scan", unit="img", disable=None) as bar:
        results = thread_map(lambda cand: inspect_candidate(cand, every), (cands[i] for i in todo), workers)
        for n, (i, found) in enumerate(zip(todo, results), 1):
            entries[i] = found
            jf.write("".join(json.dumps(entry) + "\n" for entry in found))
            if n % 256 == 0:
                jf.flush()
            bar.update()
    done = [e for found in entries if found is not None for e in found]
    refused = sum(c.refused is not None for c in cands)
    return done, len(todo), len(cands) - len(todo) - refused


def scan_folder(root: str, workers: Optional[int] = None) -> Tuple[List[Entry], List[Entry]]:
    """Decode-check every image under ``root`` in memory (no manifest file): ``(records, skipped)``,
    with the same checks and duplicate rule as :func:`build_manifest`. For sets read once, e.g. a plain
    folder given to ``unip pretrain --data``; large sets are better scanned once into a manifest."""
    cands = list(extra_candidates(root, os.path.basename(os.path.normpath(root)) or "extra"))
    entries: List[Entry] = []
    for cand in cands:
        if cand.refused is not None:
            entries.append({"path": cand.path, "source": cand.source, "kind": cand.kind,
                            "reason": cand.refused[0], "detail": cand.refused[1]})
    readable = [c for c in cands if c.refused is None]
    for found in thread_map(inspect_candidate, readable, workers):
        entries.extend(found)
    return _split(entries)


def _split(entries: List[Entry]) -> Tuple[List[Entry], List[Entry]]:
    """Separate good records from skip entries, marking later copies of the same content as duplicates."""
    records: List[Entry] = []
    skipped: List[Entry] = []
    first_of: Dict[str, str] = {}
    for entry in entries:
        if "reason" in entry:
            skipped.append(entry)
        elif entry["hash"] in first_of:
            skipped.append({"path": entry["path"], "source": entry["source"], "kind": entry["kind"],
                            "reason": "duplicate", "detail": f"same content as {first_of[entry['hash']]}",
                            "record": entry})
        else:
            first_of[str(entry["hash"])] = str(entry["path"])
            records.append(entry)
    return records, skipped


def count_by_source(records: List[Entry], skipped: List[Entry]) -> Dict[str, Dict[str, object]]:
    """Return ``{source: {"kind", "images", "skipped", "duplicates"}}`` in first-seen order."""
    counts: Dict[str, Dict[str, object]] = {}

    def row(entry: Entry) -> Dict[str, object]:
        return counts.setdefault(str(entry["source"]), {"kind": entry["kind"], "images": 0,
                                                         "skipped": 0, "duplicates": 0})
    for rec in records:
        row(rec)["images"] += 1  # type: ignore[operator]
    for entry in skipped:
        key = "duplicates" if entry["reason"] == "duplicate" else "skipped"
        row(entry)[key] += 1  # type: ignore[operator]
    return counts


def format_counts(counts: Dict[str, Dict[str, object]]) -> str:
    """Return a fixed-width text table of :func:`count_by_source` with a total row."""
    width = max([len("source")] + [len(s) for s in counts])
    lines = [f"{'source':<{width}}  {'kind':<9} {'images':>9} {'skipped':>8} {'duplicates':>10}"]
    totals = [0, 0, 0]
    for source, c in counts.items():
        vals = [int(c["images"]), int(c["skipped"]), int(c["duplicates"])]  # type: ignore[arg-type]
        totals = [a + b for a, b in zip(totals, vals)]
        lines.append(f"{source:<{width}}  {str(c['kind']):<9} {vals[0]:>9,} {vals[1]:>8,} {vals[2]:>10,}")
    lines.append(f"{'total':<{width}}  {'':<9} {totals[0]:>9,} {totals[1]:>8,} {totals[2]:>10,}")
    return "\n".join(lines)


def skip_reasons(skipped: Sequence[Entry]) -> str:
    """The skipped files counted by reason, most common first (``2 empty, 1 truncated``); for ``outside-root``,
    why such files are not read."""
    reasons = Counter(str(entry["reason"]) for entry in skipped)
    text = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    if "outside-root" in reasons:
        text += (": a symlink is read only when its real path stays inside the root it was found under, so pass "
                 "the folders it points to")
    return text


def build_manifest(out: str, infrared: Optional[str] = None, imagenet: Optional[str] = None,
                   per_class: int = 200, coco: Optional[str] = None, extra: Sequence[str] = (),
                   workers: Optional[int] = None, every: int = 1) -> ScanResult:
    """Scan the given sources into the JSONL manifest ``out`` and its report; returns a :class:`ScanResult`.

    Files already described by an existing manifest/report/journal at ``out`` with the same size and
    mtime are not read again. ``every``: a SEQ/CSQ gives its frames 0, every, 2·every, ...
    """
    if per_class < 1:
        raise DataError(f"--per-class {per_class}: must be at least 1")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise DataError(f"--every {every}: must be at least 1 (1: every frame of a sequence)")
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise DataError(f"{out}: is a folder; --out names the manifest file to write, "
                        f"e.g. {out}/infmix.jsonl")
    out_file(out, "--out", is_ours=is_our_jsonl(["path", "source"]))
    claim([report_path(out)], is_our_json(["manifest", "counts", "skipped"]))
    claim([_journal_path(out)], is_our_jsonl(["path"]))
    cands = gather_candidates(infrared, imagenet, per_class, coco, extra)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cache = _load_cache(out)
    journal = _journal_path(out)
    entries, n_read, n_reused = _inspect_all(cands, cache, journal, workers, every)
    records, skipped = _split(entries)
    counts = count_by_source(records, skipped)
    issues = _issues(records)
    _write_atomic(out, "".join(json.dumps(r) + "\n" for r in records))
    report = {"manifest": out,
              "roots": {"infrared": infrared, "imagenet": imagenet, "per_class": per_class,
                        "coco": coco, "extra": list(extra)},
              "images": len(records), "read": n_read, "reused": n_reused,
              "counts": counts, "skipped": skipped, "issues": issues}
    _write_atomic(report_path(out), json.dumps(report, indent=1) + "\n")
    os.remove(journal)
    if not records:
        raise DataError(f"no readable images found ({len(skipped)} file(s) skipped: {skip_reasons(skipped)}; "
                        f"listed in {report_path(out)}); point --infrared/--imagenet/--coco/--extra at image folders")
    return ScanResult(out, records, skipped, n_read, n_reused, counts, issues)


def _issues(records: List[Entry]) -> Dict[str, List[str]]:
    """Issue → the files whose records have it (each file once); each kind is warned about once, naming the
    first file."""
    found: Dict[str, List[str]] = {}
    for record in records:
        for issue in record.get("issues") or ():
            paths = found.setdefault(str(issue), [])
            if not paths or paths[-1] != record["path"]:
                paths.append(str(record["path"]))
    for issue, paths in found.items():
        logger.warning("%s: %s; %d file(s) in all, listed under 'issues' in the scan report", paths[0],
                       ISSUES.get(issue, issue), len(paths))
    return found
