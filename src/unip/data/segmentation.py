"""Segmentation data sets: SODA, MFNet (thermal), SCUT-Seg and a generic folder layout, read as the release does.

Layouts (folder names, split files, classes and palettes live in :mod:`unip.data.layouts`):

========  =========================  =====================  ==========================================
layout    images                     labels                 splits train / val / test
========  =========================  =====================  ==========================================
soda      ``JPEGImages/*.jpg``       ``SegmentationClass``  ``train_infrared.txt`` / ``test_infrared.txt``
                                     ``PNG/*.png``          / ``test_infrared.txt``
mfnet     ``thermal_imgs/*.png``     ``labels/*.png``       ``train.txt`` / ``val_test.txt`` / ``test.txt``
scut      ``images/*.jpg``           ``labels/*.png``       ``train.txt`` / ``val.txt`` / ``val.txt``
folder    ``images/*``               ``labels/*.png``       ``train.txt`` / ``val.txt`` / ``test.txt``
                                                            (or as ``classes.yaml`` says)
========  =========================  =====================  ==========================================

A split file lists one image name (stem) per line; anything after the first whitespace is ignored and an
image suffix on the name is dropped. A name is a path relative to the image (and label) folder that stays inside
it: an absolute name or one whose ``..`` lead out is an error naming the split file and line
(:mod:`unip.data.listed`). Label PNGs hold class ids (0 = background, which counts); 255 is
ignored. Images are read through the input mapping every verb shares (:mod:`unip.data.inputs`): 8- or 16-bit,
gray or colour, FLIR R-JPEGs and ``.fff`` frames (their raster); 16-bit rasters get the percentile stretch, colour
images their luma; the gray image is repeated to three channels.

A folder data set describes itself in ``classes.yaml``::

    classes: [background, person, car]      # position = id in the label PNGs (required)
    palette: [[0, 0, 0], [220, 20, 60], [0, 0, 142]]   # optional; default: the VOC colour map
    splits: {train: train.txt, val: val.txt, test: val.txt}   # optional; default: the three files

Which layout a folder holds, and opening a data set by name, is :mod:`unip.data.datasets` (the table of named
data sets). Bad input raises :class:`unip.errors.DataError` naming the file: a missing split file, image or label
when a data set is opened; an unreadable image or label, a label whose size differs from its image's, or a
label value that is neither a class id nor 255 when a sample is read. :func:`scan_split` and
:func:`inspect_pair` return the same findings as :class:`Problem` lists instead (used by
:mod:`unip.data.seg_check` to list every problem of a data set at once).
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from unip.data import layouts as L
from unip.data.images import ImageReadError, read_label
from unip.data.inputs import read_input
from unip.data.listed import ListedPathError, relative_entry
from unip.engine.config import load_yaml
from unip.errors import DataError

log = logging.getLogger(__name__)

Palette = Tuple[Tuple[int, int, int], ...]
#: What a transform receives and returns: the sample dict of :meth:`SegmentationDataset.load`.
SampleTransform = Callable[[Dict[str, Any]], Dict[str, Any]]

@dataclass(frozen=True)
class SegLayout:
    """Where a layout keeps its files and what its classes are.

    ``splits`` maps ``train``/``val``/``test`` to split-file names (relative to the data root). An image
    is ``<image_dir>/<name><suffix>``, the layout's ``image_suffix`` tried first, then every image suffix;
    a label is ``<label_dir>/<name>.png``.
    """

    name: str
    image_dir: str
    label_dir: str
    splits: Dict[str, str]
    classes: Tuple[str, ...]
    palette: Palette
    image_suffix: Optional[str] = None
    label_suffix: str = ".png"

    @property
    def image_suffixes(self) -> Tuple[str, ...]:
        first = (self.image_suffix,) if self.image_suffix else ()
        return first + tuple(s for s in L.FRAME_SUFFIXES if s != self.image_suffix)


#: The three benchmark layouts of the release (their entries in ``unip.data.datasets.DATASETS`` add how each is
#: recognised and prepared).
LAYOUTS: Dict[str, SegLayout] = {
    "soda": SegLayout("soda", L.SODA_IMAGE_DIR, L.SODA_LABEL_DIR, dict(L.SODA_SPLITS), L.SODA_CLASSES,
                      L.SODA_PALETTE, ".jpg"),
    "mfnet": SegLayout("mfnet", L.MFNET_IMAGE_DIR, L.MFNET_LABEL_DIR, dict(L.MFNET_SPLITS), L.MFNET_CLASSES,
                       L.MFNET_PALETTE, ".png"),
    "scut": SegLayout("scut", L.SCUT_IMAGE_DIR, L.SCUT_LABEL_DIR, dict(L.SCUT_SPLITS), L.SCUT_CLASSES,
                      L.SCUT_PALETTE, ".jpg"),
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data set: the file at fault, a short ``code`` and a sentence saying what.

    Codes: ``missing-folder``, ``missing-split-file``, ``unreadable-split-file``, ``entry-outside`` (a listed name
    that is absolute or leads out of its folder; ``path`` is then the split file and line), ``empty-split``,
    ``missing-image``, ``missing-label``, ``unreadable-image``, ``unreadable-label``, ``size-mismatch``,
    ``bad-label-value``.
    """

    path: str
    code: str
    detail: str

    @property
    def message(self) -> str:
        return f"{self.path}: {self.detail}"


@dataclass(frozen=True)
class Sample:
    """One listed image: its name (stem) and the image and label files."""

    name: str
    image: str
    label: str


# ------------------------------------------------------------------------------------- layouts
def _classes_file(root: str) -> Optional[str]:
    for name in (L.FOLDER_CLASSES_FILE, os.path.splitext(L.FOLDER_CLASSES_FILE)[0] + ".yml"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def _parse_palette(value: Any, num_classes: int, path: str) -> Palette:
    if not isinstance(value, list) or len(value) != num_classes:
        raise DataError(f"{path}: 'palette' must list one [R, G, B] colour per class ({num_classes})")
    colours = []
    for colour in value:
        if (not isinstance(colour, (list, tuple)) or len(colour) != 3
                or not all(isinstance(c, int) and 0 <= c <= 255 for c in colour)):
            raise DataError(f"{path}: palette entry {colour!r} is not [R, G, B] with integers 0..255")
        colours.append((colour[0], colour[1], colour[2]))
    return tuple(colours)


def read_folder_layout(root: str) -> SegLayout:
    """Return the :class:`SegLayout` described by ``root/classes.yaml`` (module docstring)."""
    path = _classes_file(root)
    if path is None:
        raise DataError(f"{os.path.join(root, L.FOLDER_CLASSES_FILE)}: not found; a folder data set needs it "
                        "with 'classes: [name, ...]' (id = position)")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = load_yaml(fh) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{path}: cannot read: {err}".splitlines()[0]) from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if (not isinstance(classes, list) or not classes or len(classes) > L.IGNORE_INDEX
            or not all(isinstance(c, (str, int)) for c in classes)):
        raise DataError(f"{path}: needs 'classes:' listing 1 to 255 class names (id = position)")
    names = tuple(str(c) for c in classes)
    palette = (_parse_palette(data["palette"], len(names), path) if data.get("palette") is not None
               else L.voc_palette(len(names)))
    splits = dict(L.FOLDER_SPLITS)
    if data.get("splits") is not None:
        given = data["splits"]
        if not isinstance(given, dict) or not set(given) <= set(L.SPLIT_NAMES) \
                or not all(isinstance(v, str) and v for v in given.values()):
            raise DataError(f"{path}: 'splits' must map train/val/test to split-file names")
        splits.update({split: relative_entry(name, root, f"{path}: splits.{split}") for split, name in given.items()})
    return SegLayout("folder", L.FOLDER_IMAGE_DIR, L.FOLDER_LABEL_DIR, splits, names, palette)


def check_seg_command(root: str, dataset: str = "auto") -> str:
    """The ``unip data check-seg`` command line that reads ``root`` as ``dataset`` (the layout a command was asked
    for, not the one detection would pick) and lists every problem."""
    option = "" if str(dataset).lower() == "auto" else f" --dataset {str(dataset).lower()}"
    return f"unip data check-seg {shlex.quote(str(root))}{option}"


# ------------------------------------------------------------------------------------- splits
def read_split_file(path: str) -> List[str]:
    """Return the image names listed in a split file (first token of each line, image suffix dropped).

    Blank lines and lines starting with ``#`` are skipped. Raises :class:`DataError` if it is missing, and
    :class:`ListedPathError` (one) naming the line when a name is absolute or leads out of the image and label
    folders through ``..`` (:mod:`unip.data.listed`).
    """
    try:
        with open(path, "r", encoding="utf-8-sig") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the split file: {err}") from None
    names = []
    for number, line in enumerate(lines, 1):
        token = line.strip().split()[0] if line.strip() else ""
        if not token or token.startswith("#"):
            continue
        token = relative_entry(token, "the image and label folders", f"{path}, line {number}")
        stem, suffix = os.path.splitext(token)
        names.append(stem if suffix.lower() in L.FRAME_SUFFIXES else token)
    return names


class _Folder:
    """The file names of one folder, listed once (found in a set instead of one stat per image)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.names = set(os.listdir(path))
        except OSError:  # missing or unreadable: every file in it is then reported missing
            self.names = set()

    def find(self, name: str, suffixes: Sequence[str]) -> Optional[str]:
        for suffix in suffixes:
            if "/" in name or os.sep in name:
                if os.path.isfile(os.path.join(self.path, name + suffix)):
                    return os.path.join(self.path, name + suffix)
            elif name + suffix in self.names:
                return os.path.join(self.path, name + suffix)
        return None


def structure_problems(root: str, layout: SegLayout, split: str) -> List[Problem]:
    """What is wrong with ``split`` of the data set at ``root`` that shows without reading a file: the
    layout's image or label folder missing (``missing-folder``), the split file missing
    (``missing-split-file``). Raises :class:`DataError` for a split the layout does not have."""
    if split not in layout.splits:
        raise DataError(f"split '{split}': must be one of {', '.join(layout.splits)}")
    problems = [Problem(os.path.join(root, folder), "missing-folder", "folder not found")
                for folder in (layout.image_dir, layout.label_dir) if not os.path.isdir(os.path.join(root, folder))]
    split_path = os.path.join(root, layout.splits[split])
    if not os.path.isfile(split_path):
        problems.append(Problem(split_path, "missing-split-file", f"split file of '{split}' not found"))
    return problems


def scan_split(root: str, layout: SegLayout, split: str) -> Tuple[List[Sample], List[Problem]]:
    """Return the samples of ``split`` whose image and label files exist, and the problems found.

    Problems: the split file is missing or empty, or a listed image or label file is missing. Files are
    not opened here (see :func:`inspect_pair`).
    """
    problems = structure_problems(root, layout, split)
    if any(p.code == "missing-split-file" for p in problems):
        return [], problems
    split_path = os.path.join(root, layout.splits[split])
    try:
        names = read_split_file(split_path)
    except ListedPathError as err:
        return [], problems + [Problem(err.where, "entry-outside", err.detail)]
    except DataError as err:
        return [], problems + [Problem(split_path, "unreadable-split-file", str(err).rsplit(": ", 1)[-1])]
    if not names:
        problems.append(Problem(split_path, "empty-split", "the split file lists no image"))
    if any(p.code == "missing-folder" for p in problems):
        return [], problems
    images = _Folder(os.path.join(root, layout.image_dir))
    labels = _Folder(os.path.join(root, layout.label_dir))
    samples: List[Sample] = []
    for name in names:
        image = images.find(name, layout.image_suffixes)
        label = labels.find(name, (layout.label_suffix,))
        if image is None:
            expected = os.path.join(images.path, name + (layout.image_suffix or ".*"))
            problems.append(Problem(expected, "missing-image", f"image listed in {split_path} not found"))
        if label is None:
            expected = os.path.join(labels.path, name + layout.label_suffix)
            problems.append(Problem(expected, "missing-label", f"label listed in {split_path} not found"))
        if image is not None and label is not None:
            samples.append(Sample(name, image, label))
    return samples, problems


# ------------------------------------------------------------------------------------- samples
def label_problems(label: np.ndarray, image_shape: Tuple[int, int], sample: Sample,
                   num_classes: int) -> List[Problem]:
    """Return what is wrong with a decoded ``label`` (uint8 ``[H, W]``) of ``sample``: size, values."""
    problems = []
    if label.shape != tuple(image_shape):
        problems.append(Problem(sample.label, "size-mismatch",
                                f"label is {label.shape[1]}x{label.shape[0]} but its image {sample.image} "
                                f"is {image_shape[1]}x{image_shape[0]}"))
    bad = (label >= num_classes) & (label != L.IGNORE_INDEX)
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        problems.append(Problem(sample.label, "bad-label-value",
                                f"value(s) {shown} ({int(bad.sum())} pixels) are neither a class id "
                                f"0..{num_classes - 1} nor {L.IGNORE_INDEX} (ignore)"))
    return problems


def _unreadable(err: ImageReadError, code: str) -> Problem:
    return Problem(err.path, code, f"{err.detail} ({err.reason})")


def inspect_pair(sample: Sample, num_classes: int) -> Tuple[List[Problem], Optional[np.ndarray], Tuple[str, ...]]:
    """Decode ``sample`` fully and check it; returns ``(problems, histogram, issues)``. ``issues``: what the image
    was found to be instead of a sensor's raster (a palette picture, a byte-swapped raster; ``InputNotes``), not a
    problem.

    ``histogram`` is int64 ``[256]``, the pixel count of each label value (None if the label cannot be
    read).
    """
    problems: List[Problem] = []
    image = label = None
    issues: Tuple[str, ...] = ()
    try:
        item = read_input(sample.image)
        image, issues = item.image, item.issues
    except ImageReadError as err:
        problems.append(_unreadable(err, "unreadable-image"))
    try:
        label = read_label(sample.label)
    except ImageReadError as err:
        problems.append(_unreadable(err, "unreadable-label"))
    if label is None:
        return problems, None, issues
    if image is not None:
        problems += label_problems(label, image.shape[:2], sample, num_classes)
    return problems, np.bincount(label.ravel(), minlength=256).astype(np.int64), issues


def load_sample(sample: Sample, num_classes: int, split_file: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Read ``sample``; returns image uint8 ``[H, W, 3]`` (the input mapping's model image, gray repeated:
    ``unip.data.inputs``) and label uint8 ``[H, W]``.

    Raises :class:`DataError` (a plain one, so DataLoader workers can re-raise it) naming the file and the fix
    (mending it, or dropping its name from ``split_file``, the split that lists it: a removed file is missed).
    """
    fix = f"fix it, or drop '{sample.name}' from {split_file}" if split_file else "fix or remove the file"
    try:
        image = read_input(sample.image).rgb
        label = read_label(sample.label)
    except ImageReadError as err:
        raise DataError(f"{err.path}: {err.detail} ({err.reason}); {fix}") from None
    problems = label_problems(label, image.shape[:2], sample, num_classes)
    if problems:
        raise DataError(f"{problems[0].message}; {fix}")
    return image, label


class SegmentationDataset(Dataset):
    """The samples of one split of a segmentation data set.

    ``ds[i]`` is ``transform(ds.load(i))`` (or ``ds.load(i)`` without a transform): a dict with
    ``image``, ``label``, ``path`` (image file), ``label_path``, ``name`` (stem) and ``index``.

    Attributes: ``root``, ``layout`` (``soda``/``mfnet``/``scut``/``folder``), ``split``, ``split_file``,
    ``classes`` (names, id = position), ``palette`` (one ``(r, g, b)`` per class), ``num_classes``,
    ``ignore_index`` (255), ``samples`` (list of :class:`Sample`), ``transform``.
    """

    ignore_index = L.IGNORE_INDEX

    def __init__(self, root: str, layout: SegLayout, split: str, samples: Sequence[Sample],
                 transform: Optional[SampleTransform] = None) -> None:
        self.root, self.layout, self.split = root, layout.name, split
        self.split_file = os.path.join(root, layout.splits[split])
        self.classes: Tuple[str, ...] = layout.classes
        self.palette: Palette = layout.palette
        self.samples: List[Sample] = list(samples)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Dict[str, Any]:
        """Return sample ``index`` before any transform.

        ``image``: uint8 ``[3, H, W]`` (gray repeated); ``label``: uint8 ``[H, W]`` class ids, 255 =
        ignore; ``path``, ``label_path``, ``name``: str; ``index``: int.
        """
        sample = self.samples[index]
        image, label = load_sample(sample, self.num_classes, self.split_file)
        return {"image": torch.from_numpy(image).permute(2, 0, 1).contiguous(), "label": torch.from_numpy(label),
                "path": sample.image, "label_path": sample.label, "name": sample.name, "index": index}

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.load(index)
        return self.transform(item) if self.transform is not None else item

    def __repr__(self) -> str:
        return (f"SegmentationDataset({self.layout}, {self.root!r}, split={self.split!r}, "
                f"{len(self)} images, {self.num_classes} classes)")
