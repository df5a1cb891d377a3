"""Packed images: grayscale uint8 pixels in a few large shard files, read by memory-mapping.

Layout of a pack folder::

    index.json        {"format": "unip-packed", "version": 2, "count", "short_side", "shards", "sources",
                       "skipped", "manifest"}
    index.npy         int64 [count, 5]: shard number, byte offset, height, width, source number
    paths.jsonl       the original file of each image, one JSON string per line (any file name survives:
                      newlines, bytes that are not UTF-8; a sequence's frame: ``FILE#frame=K``); version 1
                      packs have paths.txt, one per line
    shard-00000.bin   raw row-major uint8 pixels of consecutive images, at most ``shard_bytes`` each

``pack_manifest`` replaces an existing folder only when it is such a pack and holds nothing else, so a
mistyped ``--out`` never deletes anybody's files. Readers check the index against the shard files and
raise ``DataError`` naming the file when a pack is damaged (truncated shard, bad index).

Image ``i`` is ``shard[offset : offset + height * width]`` reshaped to ``[height, width]``: O(1) random
access without decoding. Readers open the shards with ``np.memmap`` lazily, on first access in each
process, so DataLoader workers (forked or spawned) and DDP ranks each map the files themselves and share
the page cache.

Default short side 512: RandomResizedCrop keeps at least 20 % of the area; on a square image of side S a
square crop of 20 % area has side sqrt(0.2)·S, which is at least 224 px when S >= 501. Packing at 512
therefore never makes the smallest crop upsample. Smaller images are stored as they are (never upscaled).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from unip.atomic import replace_folder
from unip.data.images import ImageReadError, resize_short_side
from unip.data.infmix import Entry, read_manifest
from unip.data.inputs import read_model_gray
from unip.data.parallel import thread_map
from unip.data.transforms import Transform, pretrain_transform
from unip.errors import DataError
from unip.outputs import foreign_names, out_folder

PACK_FORMAT = "unip-packed"
PACK_VERSION = 2
#: Versions this reader understands (1: paths.txt, one path per line).
READABLE_VERSIONS = (1, 2)
DEFAULT_SHORT_SIDE = 512
DEFAULT_SHARD_BYTES = 1 << 30
INDEX_JSON, INDEX_NPY, PATHS_JSONL, PATHS_TXT = "index.json", "index.npy", "paths.jsonl", "paths.txt"
#: Names a pack folder may hold; a folder with anything else is not replaced.
_PACK_FILE = re.compile(r"^(index\.json|index\.npy|paths\.jsonl|paths\.txt|shard-\d{5,}\.bin)$")

_DEFAULT = "default"


@dataclass
class PackResult:
    """Outcome of :func:`pack_manifest`: where the pack is, how many images and shards, what was skipped."""

    out: str
    count: int
    shards: List[str]
    total_bytes: int
    skipped: List[Entry]


# ------------------------------------------------------------------------------------- manifests
def read_listed(path: str, manifest: Optional[str], frame: Optional[int] = None) -> np.ndarray:
    """The model image (``unip.data.inputs``) of a file that the manifest file ``manifest`` lists (None: records
    given in memory), frame ``frame`` of a sequence; returns uint8 ``[H, W]``. A file gone since the scan raises
    ``ImageReadError`` ``missing``, whose fix is a rescan (which drops it from the manifest), not the file."""
    try:
        return read_model_gray(path, frame)
    except ImageReadError as err:
        if manifest is None or err.reason != "io-error" or os.path.lexists(path):
            raise
        raise ImageReadError(path, "missing", f"listed in {manifest} but gone since the scan",
                             "rescan with `unip data infmix` (the manifest then drops it) or put it back") from None


def read_manifest_file(path: str) -> List[Entry]:
    """:func:`unip.data.infmix.read_manifest`, saying what a pack folder or a pack's ``index.json`` given
    instead is, and what to pass (``DataError``)."""
    if os.path.isdir(path):
        if _is_pack_index(os.path.join(path, INDEX_JSON)):
            raise DataError(f"{path}: is a pack folder (written by `unip data pack`), not a manifest; to pack again, "
                            f"pass the manifest it was made from{_packed_from(os.path.join(path, INDEX_JSON))}")
        raise DataError(f"{path}: is a folder, not a manifest file; scan it into one with "
                        f"`unip data infmix --extra {path} --out MANIFEST.jsonl`")
    if os.path.basename(path) == INDEX_JSON and _is_pack_index(path):
        raise DataError(f"{path}: is a pack's index, not a manifest; where a pack is read (`unip data stats`, "
                        f"`unip pretrain --data`) pass its folder {os.path.dirname(path) or '.'}; to pack again, "
                        f"pass the manifest it was made from{_packed_from(path)}")
    return read_manifest(path)


def _packed_from(index_json: str) -> str:
    """`` (PATH)`` naming the manifest a pack was made from, as its index records it ('' when unknown)."""
    try:
        with open(index_json, "r", encoding="utf-8") as fh:
            manifest = json.load(fh).get("manifest")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" ({manifest})" if isinstance(manifest, str) else ""


# ------------------------------------------------------------------------------------- writing
def _load_pixels(record: Entry, short_side: int, manifest: Optional[str]) -> np.ndarray:
    return resize_short_side(read_listed(str(record["path"]), manifest, listed_frame(record)), short_side)


def listed_frame(record: Entry) -> Optional[int]:
    """The frame a manifest record names (a frame of a SEQ/CSQ), or None for a single image."""
    frame = record.get("frame")
    return frame if isinstance(frame, int) and not isinstance(frame, bool) and frame >= 0 else None


def listed_name(record: Entry) -> str:
    """How a pack's ``paths.jsonl`` names a record's image: its path, ``PATH#frame=K`` for a sequence's frame."""
    frame = listed_frame(record)
    return str(record["path"]) if frame is None else f"{record['path']}#frame={frame}"


class _ShardWriter:
    """Appends pixel buffers to numbered shard files, starting a new one when the current would overflow."""

    def __init__(self, folder: str, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self.names: List[str] = []
        self.size = 0
        self.fh = None

    def _open_next(self) -> None:
        self.close()
        self.names.append(f"shard-{len(self.names):05d}.bin")
        self.fh = open(os.path.join(self.folder, self.names[-1]), "wb")
        self.size = 0

    def append(self, pixels: np.ndarray) -> List[int]:
        """Write ``pixels``; returns ``[shard number, byte offset]``."""
        if self.fh is None or (self.size and self.size + pixels.nbytes > self.shard_bytes):
            self._open_next()
        where = [len(self.names) - 1, self.size]
        self.fh.write(np.ascontiguousarray(pixels).tobytes())
        self.size += pixels.nbytes
        return where

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def _prepare_out(out: str) -> str:
    """Return a fresh temporary folder next to ``out``; refuse an ``out`` that is not new, empty or a pack."""
    out_folder(out, "--out")
    if os.path.isdir(out) and os.listdir(out):
        foreign = _foreign_files(out)
        if foreign or not _is_pack_index(os.path.join(out, INDEX_JSON)):
            shown = ", ".join(repr(name) for name in foreign[:3]) or "no readable index.json"
            raise DataError(f"{out}: folder exists and is not a pack written by `unip data pack` ({shown}); "
                            "nothing was changed: choose an empty or new folder")
    _remove_stale_partials(out)
    tmp = f"{os.path.abspath(out)}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _foreign_files(folder: str) -> List[str]:
    """Names in ``folder`` that a pack does not hold (folders, links and other files), sorted."""
    return foreign_names(folder, _PACK_FILE)


def _is_pack_index(path: str) -> bool:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == PACK_FORMAT and meta.get("version") in READABLE_VERSIONS


def _remove_stale_partials(out: str) -> None:
    """Delete ``<out>.partial-<pid>`` folders left by killed packs (their process no longer runs and they
    hold only pack files)."""
    prefix = f"{os.path.basename(os.path.abspath(out))}.partial-"
    parent = os.path.dirname(os.path.abspath(out))
    for name in os.listdir(parent):
        pid = name[len(prefix):]
        path = os.path.join(parent, name)
        if name.startswith(prefix) and pid.isdigit() and not _process_alive(int(pid)) \
                and os.path.isdir(path) and not os.path.islink(path) and not _foreign_files(path):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pack_manifest(manifest: Union[str, Sequence[Entry]], out: str, short_side: int = DEFAULT_SHORT_SIDE,
                  shard_bytes: int = DEFAULT_SHARD_BYTES, workers: Optional[int] = None) -> PackResult:
    """Decode, grayscale and resize every image of ``manifest`` into a pack folder ``out``.

    ``manifest`` is a JSONL path or its records. Files that became unreadable since the scan are skipped
    and listed in ``index.json``. Returns a :class:`PackResult`.
    """
    if short_side < 1 or shard_bytes < 1:
        raise DataError(f"{out}: short side ({short_side}) and shard size ({shard_bytes}) must be positive")
    out_folder(out, "--out")
    records = read_manifest_file(manifest) if isinstance(manifest, str) else list(manifest)
    if not records:
        raise DataError(f"{manifest if isinstance(manifest, str) else 'manifest'}: lists no images; "
                        "nothing to pack")
    manifest_file = manifest if isinstance(manifest, str) else None
    tmp = _prepare_out(out)
    writer = _ShardWriter(tmp, shard_bytes)
    sources: Dict[str, int] = {}
    rows: List[List[int]] = []
    paths: List[str] = []
    skipped: List[Entry] = []

    def load(rec: Entry) -> Union[np.ndarray, ImageReadError]:
        try:
            return _load_pixels(rec, short_side, manifest_file)
        except ImageReadError as err:
            return err

    try:
        loaded = thread_map(load, records, workers)
        bar = tqdm(zip(records, loaded), total=len(records), desc="pack", unit="img", disable=None)
        for rec, pixels in bar:
            if isinstance(pixels, ImageReadError):
                skipped.append({"path": rec["path"], "reason": pixels.reason, "detail": pixels.detail,
                                **({} if listed_frame(rec) is None else {"frame": listed_frame(rec)})})
                continue
            source = sources.setdefault(str(rec.get("source", "")), len(sources))
            rows.append(writer.append(pixels) + list(pixels.shape) + [source])
            paths.append(listed_name(rec))
        writer.close()
        if not rows:
            raise DataError(f"none of the {len(records)} images could be read (first: {skipped[0]['path']}: "
                            f"{skipped[0]['reason']}); nothing to pack")
        index = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
        np.save(os.path.join(tmp, INDEX_NPY), index)
        with open(os.path.join(tmp, PATHS_JSONL), "w", encoding="ascii") as fh:
            fh.write("".join(json.dumps(p) + "\n" for p in paths))
        meta = {"format": PACK_FORMAT, "version": PACK_VERSION, "count": len(rows), "short_side": short_side,
                "shards": writer.names, "sources": list(sources), "skipped": skipped,
                "manifest": os.path.abspath(manifest) if isinstance(manifest, str) else None}
        with open(os.path.join(tmp, INDEX_JSON), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
        replace_folder(tmp, out)  # readers never see a half-written pack
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = int((index[:, 2] * index[:, 3]).sum()) if len(index) else 0
    return PackResult(out, len(rows), writer.names, total, skipped)


# ------------------------------------------------------------------------------------- reading
class GrayImages(Dataset):
    """Base of the pre-training data sets: item ``i`` is ``transform(uint8 [1, H, W])``.

    With the default transform an item is float32 ``[3, 224, 224]`` (see
    :func:`unip.data.transforms.pretrain_transform`); with ``transform=None`` it is the uint8 ``[1, H, W]``
    tensor as stored. ``return_index=True`` makes items ``(image, index)``.
    """

    def __init__(self, transform: Union[Transform, None, str] = _DEFAULT, return_index: bool = False) -> None:
        self.transform = pretrain_transform() if transform == _DEFAULT else transform
        self.return_index = return_index

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> np.ndarray:
        """Return image ``index`` as uint8 ``[H, W]``."""
        raise NotImplementedError

    def pixels(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 ``[H, W]`` for the transform; may be a view that must not be kept."""
        return self.read(index)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image = torch.from_numpy(self.pixels(index)).unsqueeze(0)
        if self.transform is not None:
            image = self.transform(image)
        return (image, index) if self.return_index else image


class PackedImages(GrayImages):
    """Images of a pack folder written by :func:`pack_manifest`, memory-mapped lazily in each process."""

    def __init__(self, folder: str, transform: Union[Transform, None, str] = _DEFAULT,
                 return_index: bool = False) -> None:
        super().__init__(transform, return_index)
        self.folder = folder
        self.meta = _read_index_json(folder)
        self.index = _read_index(folder, self.meta)
        self.sources: List[str] = [str(name) for name in self.meta["sources"]]
        self._maps: Dict[int, np.memmap] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _shard(self, number: int) -> np.memmap:
        if self._pid != os.getpid():  # forked: never reuse the parent's mappings
            self._maps, self._pid = {}, os.getpid()
        if number not in self._maps:
            path = os.path.join(self.folder, self.meta["shards"][number])
            try:
                # copy-on-write: views are writable for torch.from_numpy, the file is never changed
                self._maps[number] = np.memmap(path, dtype=np.uint8, mode="c")
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: cannot map shard ({err}); rebuild with `unip data pack`") from None
        return self._maps[number]

    def pixels(self, index: int) -> np.ndarray:
        """A view into the mapped shard, no copy: the crop then reads only the pixels it needs."""
        shard, offset, height, width, _ = (int(v) for v in self.index[index])
        return self._shard(shard)[offset:offset + height * width].reshape(height, width)

    def read(self, index: int) -> np.ndarray:
        return np.array(self.pixels(index))

    def source(self, index: int) -> str:
        """Return the source name (e.g. ``"SODA"``, ``"COCO"``) of image ``index``."""
        return self.sources[int(self.index[index, 4])]

    def paths(self) -> List[str]:
        """Return the original file of every image, in index order."""
        if self.meta["version"] == 1:
            path = os.path.join(self.folder, PATHS_TXT)
            try:
                with open(path, "r", encoding="utf-8", errors="surrogateescape") as fh:
                    return fh.read().splitlines()
            except OSError as err:
                raise DataError(f"{path}: cannot read ({err.strerror}); rebuild with `unip data pack`") from None
        path = os.path.join(self.folder, PATHS_JSONL)
        try:
            with open(path, "r", encoding="ascii") as fh:
                paths = [json.loads(line) for line in fh]
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: unreadable ({type(err).__name__}); rebuild with `unip data pack`") from None
        if len(paths) != len(self) or not all(isinstance(p, str) for p in paths):
            raise DataError(f"{path}: does not list the {len(self)} images of the index; rebuild with "
                            "`unip data pack`")
        return paths


def _damaged(path: str, what: str) -> DataError:
    return DataError(f"{path}: {what}; the pack is damaged, rebuild it with `unip data pack`")


def _read_index_json(folder: str) -> Dict[str, object]:
    """The pack's ``index.json``, checked; raises ``DataError`` naming the file."""
    path = os.path.join(folder, INDEX_JSON)
    if not os.path.isfile(path):
        raise DataError(f"{folder}: no {INDEX_JSON}, so not a pack folder; for a folder of images, scan it into a "
                        f"manifest first (`unip data infmix --extra {folder} --out MANIFEST.jsonl`) and pass that, or "
                        "its pack (`unip data pack MANIFEST.jsonl --out PACK`)")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as err:
        raise _damaged(path, f"unreadable ({type(err).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != PACK_FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise DataError(f"{path}: not a {PACK_FORMAT} index of version {' or '.join(map(str, READABLE_VERSIONS))}; "
                        "rebuild with `unip data pack`")
    shards, sources = meta.get("shards"), meta.get("sources")
    if not isinstance(shards, list) or not isinstance(sources, list) or not isinstance(meta.get("count"), int) \
            or not all(isinstance(name, str) and _PACK_FILE.match(name) for name in shards):
        raise _damaged(path, "missing or malformed 'count', 'shards' or 'sources'")
    return meta


def _read_index(folder: str, meta: Dict[str, object]) -> np.ndarray:
    """``index.npy`` as int64 ``[count, 5]``, checked against ``index.json`` and the shard file sizes."""
    path = os.path.join(folder, INDEX_NPY)
    try:
        index = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise _damaged(path, f"unreadable ({type(err).__name__})") from None
    if index.ndim != 2 or index.shape[1] != 5 or index.dtype.kind not in "iu" or len(index) != meta["count"]:
        raise _damaged(path, f"holds {index.dtype} {tuple(index.shape)}, expected int64 [{meta['count']}, 5]")
    index = index.astype(np.int64, copy=False)
    shards, sources = meta["shards"], meta["sources"]  # type: ignore[index]
    shard, offset, height, width, source = index.T
    if len(index) and (shard.min() < 0 or shard.max() >= len(shards) or offset.min() < 0 or height.min() < 1
                       or width.min() < 1 or source.min() < 0 or source.max() >= len(sources)):
        raise _damaged(path, "refers to shards, sources or sizes that do not exist")
    needs = np.zeros(len(shards), dtype=np.int64)
    np.maximum.at(needs, shard, offset + height * width)
    for name, needed in zip(shards, needs.tolist()):
        shard_path = os.path.join(folder, name)
        size = os.path.getsize(shard_path) if os.path.isfile(shard_path) else -1
        if size < needed:
            what = "missing" if size < 0 else f"truncated: {size:,} bytes, the index needs {needed:,}"
            raise _damaged(shard_path, what)
    return index


class ManifestImages(GrayImages):
    """Images listed in a manifest, decoded from the original files on every access (no pack needed)."""

    def __init__(self, manifest: Union[str, Sequence[Entry]],
                 transform: Union[Transform, None, str] = _DEFAULT, return_index: bool = False) -> None:
        super().__init__(transform, return_index)
        records = read_manifest_file(manifest) if isinstance(manifest, str) else list(manifest)
        self.manifest: Optional[str] = manifest if isinstance(manifest, str) else None
        self.files: List[str] = [str(r["path"]) for r in records]
        self.frames: List[Optional[int]] = [listed_frame(r) for r in records]
        self.sources_of: List[str] = [str(r.get("source", "")) for r in records]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        return read_listed(self.files[index], self.manifest, self.frames[index])

    def source(self, index: int) -> str:
        """Return the source name of image ``index``."""
        return self.sources_of[index]


def open_images(path: str, transform: Union[Transform, None, str] = _DEFAULT,
                return_index: bool = False) -> GrayImages:
    """Return :class:`PackedImages` for a pack folder, :class:`ManifestImages` for a manifest file."""
    if os.path.isdir(path):
        return PackedImages(path, transform, return_index)
    return ManifestImages(path, transform, return_index)
