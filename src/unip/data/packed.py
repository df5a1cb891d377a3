"""Packed images: grayscale uint8 pixels in a few large shard files, read by memory-mapping.

Layout of a pack folder::

    index.json        {"format": "unip-packed", "version": 1, "count", "short_side", "shards", "sources",
                       "skipped", "manifest"}
    index.npy         int64 [count, 5]: shard number, byte offset, height, width, source number
    paths.txt         the original file of each image, one per line
    shard-00000.bin   raw row-major uint8 pixels of consecutive images, at most ``shard_bytes`` each

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
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from unip.data.images import ImageReadError, read_gray, resize_short_side
from unip.data.infmix import Entry, read_manifest
from unip.data.parallel import thread_map
from unip.data.transforms import Transform, pretrain_transform
from unip.errors import DataError

PACK_FORMAT = "unip-packed"
PACK_VERSION = 1
DEFAULT_SHORT_SIDE = 512
DEFAULT_SHARD_BYTES = 1 << 30
INDEX_JSON, INDEX_NPY, PATHS_TXT = "index.json", "index.npy", "paths.txt"

_DEFAULT = "default"


@dataclass
class PackResult:
    """Outcome of :func:`pack_manifest`: where the pack is, how many images and shards, what was skipped."""

    out: str
    count: int
    shards: List[str]
    total_bytes: int
    skipped: List[Entry]


# ------------------------------------------------------------------------------------- writing
def _load_pixels(path: str, short_side: int) -> np.ndarray:
    return resize_short_side(read_gray(path), short_side)


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
    """Return a fresh temporary folder next to ``out``; refuse an ``out`` that holds something else."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"{out}: is a file; --out names the pack folder to write")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, INDEX_JSON)):
        raise DataError(f"{out}: folder exists and is not a pack; choose an empty or new folder")
    _remove_stale_partials(out)
    tmp = f"{os.path.abspath(out)}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _remove_stale_partials(out: str) -> None:
    """Delete ``<out>.partial-<pid>`` folders left by killed packs (their process no longer runs)."""
    prefix = f"{os.path.basename(os.path.abspath(out))}.partial-"
    parent = os.path.dirname(os.path.abspath(out))
    for name in os.listdir(parent):
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: str, out: str) -> None:
    """Replace ``out`` by ``tmp`` so that readers never see a half-written pack."""
    old = f"{os.path.abspath(out)}.old-{os.getpid()}"
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def pack_manifest(manifest: Union[str, Sequence[Entry]], out: str, short_side: int = DEFAULT_SHORT_SIDE,
                  shard_bytes: int = DEFAULT_SHARD_BYTES, workers: Optional[int] = None) -> PackResult:
    """Decode, grayscale and resize every image of ``manifest`` into a pack folder ``out``.

    ``manifest`` is a JSONL path or its records. Files that became unreadable since the scan are skipped
    and listed in ``index.json``. Returns a :class:`PackResult`.
    """
    if short_side < 1 or shard_bytes < 1:
        raise DataError(f"{out}: short side ({short_side}) and shard size ({shard_bytes}) must be positive")
    records = read_manifest(manifest) if isinstance(manifest, str) else list(manifest)
    tmp = _prepare_out(out)
    writer = _ShardWriter(tmp, shard_bytes)
    sources: Dict[str, int] = {}
    rows: List[List[int]] = []
    paths: List[str] = []
    skipped: List[Entry] = []

    def load(rec: Entry) -> Union[np.ndarray, ImageReadError]:
        try:
            return _load_pixels(str(rec["path"]), short_side)
        except ImageReadError as err:
            return err

    try:
        loaded = thread_map(load, records, workers)
        bar = tqdm(zip(records, loaded), total=len(records), desc="pack", unit="img", disable=None)
        for rec, pixels in bar:
            if isinstance(pixels, ImageReadError):
                skipped.append({"path": rec["path"], "reason": pixels.reason, "detail": pixels.detail})
                continue
            source = sources.setdefault(str(rec.get("source", "")), len(sources))
            rows.append(writer.append(pixels) + list(pixels.shape) + [source])
            paths.append(str(rec["path"]))
        writer.close()
        index = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
        np.save(os.path.join(tmp, INDEX_NPY), index)
        with open(os.path.join(tmp, PATHS_TXT), "w", encoding="utf-8") as fh:
            fh.write("".join(p + "\n" for p in paths))
        meta = {"format": PACK_FORMAT, "version": PACK_VERSION, "count": len(rows), "short_side": short_side,
                "shards": writer.names, "sources": list(sources), "skipped": skipped,
                "manifest": os.path.abspath(manifest) if isinstance(manifest, str) else None}
        with open(os.path.join(tmp, INDEX_JSON), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
        _publish(tmp, out)
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
        meta_path = os.path.join(folder, INDEX_JSON)
        if not os.path.isfile(meta_path):
            raise DataError(f"{folder}: no {INDEX_JSON}; build the pack with `unip data pack`")
        with open(meta_path, "r", encoding="utf-8") as fh:
            self.meta = json.load(fh)
        if self.meta.get("format") != PACK_FORMAT or self.meta.get("version") != PACK_VERSION:
            raise DataError(f"{meta_path}: not a {PACK_FORMAT} v{PACK_VERSION} index; "
                            "rebuild with `unip data pack`")
        self.index = np.load(os.path.join(folder, INDEX_NPY))
        self.sources: List[str] = list(self.meta["sources"])
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
        with open(os.path.join(self.folder, PATHS_TXT), "r", encoding="utf-8") as fh:
            return fh.read().splitlines()


class ManifestImages(GrayImages):
    """Images listed in a manifest, decoded from the original files on every access (no pack needed)."""

    def __init__(self, manifest: Union[str, Sequence[Entry]],
                 transform: Union[Transform, None, str] = _DEFAULT, return_index: bool = False) -> None:
        super().__init__(transform, return_index)
        records = read_manifest(manifest) if isinstance(manifest, str) else list(manifest)
        self.files: List[str] = [str(r["path"]) for r in records]
        self.sources_of: List[str] = [str(r.get("source", "")) for r in records]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        return read_gray(self.files[index])

    def source(self, index: int) -> str:
        """Return the source name of image ``index``."""
        return self.sources_of[index]


def open_images(path: str, transform: Union[Transform, None, str] = _DEFAULT,
                return_index: bool = False) -> GrayImages:
    """Return :class:`PackedImages` for a pack folder, :class:`ManifestImages` for a manifest file."""
    if os.path.isdir(path):
        return PackedImages(path, transform, return_index)
    return ManifestImages(path, transform, return_index)
