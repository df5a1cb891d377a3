"""The segmentation data sets unip knows by name: one table, ``DATASETS``, from which everything that names a data
set is derived — ``--dataset`` choices, the ``data.dataset`` setting's rule, a sweep's ``layout:``, ``unip data
prepare``, detection of a folder's layout and the class names ``unip predict --dataset`` gives a release file.

Each entry says where the data set keeps its files and what its classes are (its ``SegLayout``, or a function of
the folder for the generic folder layout), how to recognise a folder holding it, and, for data sets whose
original download needs converting, how (``prepare``) and how to recognise that download. Adding a data set is
one entry here (plus, if you like, presets named ``<name>_<size>`` that give its schedule)::

    DATASETS["mine"] = NamedDataset("mine", "My set", SegLayout("mine", "images", "masks", {...}, classes, palette),
                                    recognise=lambda root: os.path.isdir(os.path.join(root, "masks")))

Detection (``detect_dataset``) asks the entries in table order, then reports an unprepared download, then asks the
``fallback`` entries (SCUT-Seg: any ``images/`` + ``labels/`` folder).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from unip.data import layouts as L
from unip.data.seg_prepare import MFNET, SCUT, Preparation, PrepareResult, prepare_download
from unip.data.segmentation import (LAYOUTS, SampleTransform, SegLayout, SegmentationDataset, check_seg_command,
                                    read_folder_layout, scan_split, structure_problems)
from unip.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedDataset:
    """One data set unip knows by name (an entry of ``DATASETS``).

    ``name``: what ``--dataset``, ``data.dataset`` and a sweep's ``layout:`` say, and the stem of its presets;
    ``title``: how messages name it; ``layout``: its folders, split files, classes and palette, or a function of
    the data set's root that reads them (the folder layout's ``classes.yaml``); ``recognise(root)``: whether a
    folder holds it, ready to read; ``enter``: a sub-folder that holds the data set where present (SODA's
    ``InfraredSemanticLabel/``); ``prepare``: how ``unip data prepare NAME`` converts its original download, and
    ``is_download(root)`` recognises that download; ``fallback``: recognised only when nothing else is."""

    name: str
    title: str
    layout: Union[SegLayout, Callable[[str], SegLayout]]
    recognise: Callable[[str], bool]
    enter: Optional[str] = None
    prepare: Optional[Preparation] = None
    is_download: Optional[Callable[[str], bool]] = None
    fallback: bool = False

    def read_layout(self, root: str) -> SegLayout:
        """The layout of the data set at ``root``."""
        return self.layout if isinstance(self.layout, SegLayout) else self.layout(root)

    @property
    def classes(self) -> Optional[Tuple[str, ...]]:
        """Its class names (id = position), or ``None`` when each folder states its own."""
        return self.layout.classes if isinstance(self.layout, SegLayout) else None


def _isdir(root: str, *parts: str) -> bool:
    return os.path.isdir(os.path.join(root, *parts))


def _has_png(folder: str, look: int = 20) -> bool:
    try:
        with os.scandir(folder) as entries:
            for n, entry in enumerate(entries):
                if entry.name.lower().endswith(".png"):
                    return True
                if n >= look:
                    break
    except OSError:
        pass
    return False


def _is_mfnet_download(root: str) -> bool:
    """MFNet's ``ir_seg_dataset``: 4-channel PNGs in ``images/``, its split files, no ``thermal_imgs/`` yet."""
    return (_isdir(root, L.MFNET_RAW_IMAGE_DIR) and not _isdir(root, L.MFNET_IMAGE_DIR)
            and os.path.isfile(os.path.join(root, L.MFNET_SPLITS["test"]))
            and _has_png(os.path.join(root, L.MFNET_RAW_IMAGE_DIR)))


def _is_scut_download(root: str) -> bool:
    """SCUT-Seg as downloaded: ``scut_train.txt`` / ``scut_val.txt`` of image and label paths."""
    return any(os.path.isfile(os.path.join(root, name)) for name in L.SCUT_RAW_SPLITS.values())


def _has_classes_file(root: str) -> bool:
    return any(os.path.isfile(os.path.join(root, name))
               for name in (L.FOLDER_CLASSES_FILE, os.path.splitext(L.FOLDER_CLASSES_FILE)[0] + ".yml"))


#: Every named data set, in the order detection asks them.
DATASETS: Dict[str, NamedDataset] = {
    "soda": NamedDataset(
        "soda", "SODA", LAYOUTS["soda"], enter=L.SODA_SUBDIR,
        recognise=lambda root: _isdir(root, L.SODA_SUBDIR) or (_isdir(root, L.SODA_IMAGE_DIR)
                                                                and _isdir(root, L.SODA_LABEL_DIR))),
    "mfnet": NamedDataset(
        "mfnet", "MFNet", LAYOUTS["mfnet"], prepare=MFNET, is_download=_is_mfnet_download,
        recognise=lambda root: _isdir(root, L.MFNET_IMAGE_DIR) and _isdir(root, L.MFNET_LABEL_DIR)),
    "scut": NamedDataset(
        "scut", "SCUT-Seg", LAYOUTS["scut"], prepare=SCUT, is_download=_is_scut_download, fallback=True,
        recognise=lambda root: _isdir(root, L.SCUT_IMAGE_DIR) and _isdir(root, L.SCUT_LABEL_DIR)),
    "folder": NamedDataset("folder", "images/ + labels/ + classes.yaml", read_folder_layout,
                           recognise=_has_classes_file),
}


def dataset_names() -> List[str]:
    """The names of every data set, in table order."""
    return list(DATASETS)


def prepared_names() -> List[str]:
    """The data sets whose download ``unip data prepare`` converts."""
    return [name for name, entry in DATASETS.items() if entry.prepare is not None]


def named_with_classes() -> List[str]:
    """The data sets with a fixed class list (``unip predict --dataset`` names a release file's classes by it)."""
    return [name for name, entry in DATASETS.items() if entry.classes is not None]


def named_dataset(name: str) -> NamedDataset:
    """The entry of ``name`` (any case); ``DataError`` naming the choices for another."""
    entry = DATASETS.get(str(name).lower())
    if entry is None:
        raise DataError(f"data set '{name}': must be one of {', '.join(DATASETS)} or auto")
    return entry


def _download_hint(root: str) -> Optional[str]:
    """Which ``unip data prepare`` turns ``root`` into a readable layout, if it looks like an original download."""
    for entry in DATASETS.values():
        if entry.is_download is not None and entry.is_download(root):
            return (f"it looks like the original {entry.title} download: run `unip data prepare {entry.name} ROOT "
                    "OUT` first")
    return None


def detect_dataset(root: str) -> str:
    """The name of the data set at ``root``: the first entry of ``DATASETS`` that recognises it, then (after an
    unprepared download is reported) the ``fallback`` entries. Raises :class:`DataError` if none does."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: data set folder not found")
    entries = list(DATASETS.values())
    for entry in entries:
        if not entry.fallback and entry.recognise(root):
            return entry.name
    hint = _download_hint(root)
    if hint:
        raise DataError(f"{root}: {hint}")
    for entry in entries:
        if entry.fallback and entry.recognise(root):
            log.info("%s: no other layout matches: reading it as %s", root, entry.title)
            return entry.name
    raise DataError(f"{root}: not a known segmentation layout ({', '.join(e.title for e in entries)}); see "
                    "docs/segmentation-data.md or pass the data set name")


def resolve_layout(root: str, dataset: str = "auto") -> Tuple[str, SegLayout]:
    """Return ``(data_root, layout)`` for ``root`` read as ``dataset`` (``auto`` detects it).

    A root holding the entry's ``enter`` folder (SODA's ``InfraredSemanticLabel/``) is entered. Raises
    :class:`DataError` for an unknown name, a missing folder, or an original download that needs ``unip data
    prepare`` first."""
    root = os.path.abspath(os.path.expanduser(root))
    if str(dataset).lower() == "auto":
        entry = DATASETS[detect_dataset(root)]
    else:
        entry = named_dataset(dataset)
        if not os.path.isdir(root):
            raise DataError(f"{root}: data set folder not found")
    if entry.enter and _isdir(root, entry.enter):
        root = os.path.join(root, entry.enter)
    layout = entry.read_layout(root)
    prepared = _isdir(root, layout.image_dir) and os.path.isfile(os.path.join(root, layout.splits["train"]))
    hint = _download_hint(root) if entry.prepare is not None and not prepared else None
    if hint:
        raise DataError(f"{root}: {hint}")
    return root, layout


def check_structure(root: str, dataset: str = "auto", splits: Sequence[str] = L.SPLIT_NAMES) -> Tuple[str, SegLayout]:
    """The quick look before a long job reads the data set at ``root`` as ``dataset`` (``auto`` detects it):
    the layout resolves (:func:`resolve_layout`) and its folders and the split files of ``splits`` exist.
    No image is read and no split is listed. Returns ``(data_root, layout)``; raises :class:`DataError`
    naming the first problem."""
    data_root, layout = resolve_layout(root, dataset)
    for split in splits:
        problems = structure_problems(data_root, layout, split)
        if problems:
            raise DataError(f"{problems[0].message} (not a {layout.name} data set? "
                            f"`{check_seg_command(root, dataset)}` lists every problem)")
    return data_root, layout


def open_segmentation_dataset(root: str, dataset: str = "auto", split: str = "train",
                              transform: Optional[SampleTransform] = None) -> SegmentationDataset:
    """Open split ``split`` (``train``, ``val`` or ``test``) of the data set at ``root``.

    ``dataset`` is a name in ``DATASETS`` or ``auto`` (see :func:`detect_dataset`). Raises :class:`DataError`
    naming the first missing split file, image or label (with the count of the others: ``unip data check-seg``
    lists them all). Images are decoded when a sample is read.
    """
    data_root, layout = resolve_layout(root, dataset)
    samples, problems = scan_split(data_root, layout, split)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s); list them with `{check_seg_command(root, dataset)}`)" \
            if len(problems) > 1 else ""
        raise DataError(problems[0].message + more)
    return SegmentationDataset(data_root, layout, split, samples, transform)


def prepare_dataset(dataset: str, raw: str, out: str, workers: Optional[int] = None,
                    progress: bool = False) -> PrepareResult:
    """Convert the original download ``raw`` of ``dataset`` (a name in ``prepared_names()``: ``mfnet``, ``scut``)
    into its layout in ``out`` (``unip.data.seg_prepare``). Raises :class:`DataError` for a data set that needs
    no preparation, a folder that is not its download, an ``out`` that cannot be used, or no image surviving."""
    entry = DATASETS.get(str(dataset).lower())
    if entry is None or entry.prepare is None:
        needs_none = f" ({entry.title} needs no preparation)" if entry is not None else ""
        raise DataError(f"data set '{dataset}': prepare knows {', '.join(prepared_names())}{needs_none}")
    return prepare_download(entry.name, entry.prepare, raw, out, workers, progress)


__all__ = ["DATASETS", "NamedDataset", "check_structure", "dataset_names", "detect_dataset", "named_dataset",
           "named_with_classes", "open_segmentation_dataset", "prepare_dataset", "prepared_names", "resolve_layout"]
