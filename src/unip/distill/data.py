"""Pre-training images for ``unip pretrain``: a pack folder, a manifest, or a plain folder of images.

Uses ``unip.data``'s data sets (uint8 grayscale → transform); adds the plain-folder case, the
deterministic (no-augmentation) crop of exact-equivalence tests and the full-frame input of layer selection.
"""

from __future__ import annotations

import os
from functools import lru_cache, partial
from typing import Sequence, Tuple

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from unip.analysis.images import Normalization, frame_input
from unip.data.infmix import scan_folder, skip_reasons
from unip.data.inputs import INPUT_SUFFIXES
from unip.data.packed import INDEX_JSON, GrayImages, ManifestImages, PackedImages
from unip.data.transforms import Transform, normalize_batch, pretrain_transform
from unip.errors import DataError


def crop_transform(size: int, augment: bool = True, scale: Sequence[float] = (0.2, 1.0)) -> Transform:
    """uint8 ``[1, H, W]`` → uint8 ``[1, size, size]``: the pre-training augmentation (RandomResizedCrop,
    flip) or, without ``augment``, a deterministic short-side resize (bicubic) and centre crop. Loaders
    ship these 1-byte crops; ``normalize_batch`` finishes them on the training device."""
    if augment:
        return pretrain_transform(size, tuple(scale), normalize=False)
    return v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size)])


def build_transform(size: int, mean: float, std: float, augment: bool = True,
                    scale: Sequence[float] = (0.2, 1.0)) -> Transform:
    """``crop_transform`` followed by normalisation: uint8 ``[1, H, W]`` → float32 ``[3, size, size]``."""
    return v2.Compose([crop_transform(size, augment, scale), partial(normalize_batch, mean=mean, std=std)])


def frame_transform(size: int, mean: float, std: float) -> Transform:
    """uint8 ``[1, H, W]`` → float32 ``[3, size, size]`` as ``unip analyze`` prepares an image (the whole frame
    resized, aspect not kept; ``unip.analysis.images.frame_input``), so that ``--teacher-layer auto`` chooses
    what ``unip analyze`` chooses on the same frames."""
    return partial(_frame_input, size=(size, size), norm=Normalization((mean,) * 3, (std,) * 3))


def _frame_input(x: torch.Tensor, size: Tuple[int, int], norm: Normalization) -> torch.Tensor:
    return frame_input(x[0].numpy(), size, norm)


def open_pretrain_images(path: str, transform: Transform) -> GrayImages:
    """A data set of ``transform(uint8 [1, H, W])`` items from a pack folder (``index.json``), a manifest
    file (JSONL from ``unip data infmix``) or any folder of images (searched recursively)."""
    if not path:
        raise DataError("no training data: pass --data PACK_DIR|MANIFEST|IMAGE_DIR")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, INDEX_JSON)):
            return PackedImages(path, transform)
        return checked_folder(path, transform)
    if os.path.isfile(path):
        if os.path.splitext(path)[1].lower() in INPUT_SUFFIXES:
            raise DataError(f"{path}: an image file, not a data set; pass the folder that holds the images "
                            f"(--data {os.path.dirname(path) or '.'}), a pack folder or a manifest")
        return ManifestImages(path, transform)
    raise DataError(f"{path}: training data not found; pass a pack folder, a manifest file or an image folder")


def _scan_folder(path: str) -> Tuple[list, list]:
    """``unip.data.infmix.scan_folder``, once per folder and content per process (layer choice and training
    share it; a file added, removed or rewritten since means a new scan)."""
    return _scan_folder_as_of(path, _folder_state(path))


def _folder_state(path: str) -> int:
    """A hash of every file's relative path, size and modification time under ``path``."""
    state = []
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                info = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            state.append((os.path.relpath(os.path.join(folder, name), path), info.st_size, info.st_mtime_ns))
    return hash(tuple(sorted(state)))


@lru_cache(maxsize=4)
def _scan_folder_as_of(path: str, state: int) -> Tuple[list, list]:
    return scan_folder(path)


def checked_folder(path: str, transform: Transform) -> ManifestImages:
    """A folder's images after decoding each once: unreadable files and exact duplicates are skipped
    and listed in the data set's ``skipped`` (``[{"path", "reason", "detail"}, ...]``)."""
    records, skipped = _scan_folder(os.path.abspath(path))
    if not records:
        raise DataError(f"{path}: no readable images found ({len(skipped)} file(s) skipped: {skip_reasons(skipped)}); "
                        "pass a folder of jpg/png/bmp/tiff images, a manifest or a pack")
    dataset = ManifestImages(records, transform)
    dataset.skipped = skipped
    return dataset


def describe_skipped(dataset: Dataset, limit: int = 3) -> str:
    """One line on the files a folder scan skipped ('' when none)."""
    skipped = getattr(dataset, "skipped", [])
    if not skipped:
        return ""
    shown = "; ".join(f"{e['path']}: {e['reason']}" for e in skipped[:limit])
    more = f"; … {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"skipped {len(skipped)} file(s) of the data folder: {shown}{more}"


def image_files(dataset: GrayImages) -> Sequence[str]:
    """The original file of every image of a pre-training data set, in index order (a pack lists the files it
    was packed from; a pack without that list: its shards' names and each image's place and size)."""
    if not isinstance(dataset, PackedImages):
        return dataset.files  # type: ignore[attr-defined]
    try:
        return dataset.paths()
    except DataError:  # the paths file is optional for training
        return [f"{dataset.meta['shards'][int(s)]}/{o}/{h}x{w}" for s, o, h, w, _ in dataset.index.tolist()]


def take(dataset: Dataset, count: int, seed: int = 0) -> list:
    """``count`` items of ``dataset`` at seeded random indices (all when it is smaller)."""
    total = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return [dataset[i] for i in sorted(order)]
