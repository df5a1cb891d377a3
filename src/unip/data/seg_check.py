"""Check a whole segmentation data set at once: every split file, image and label, and per-class pixel counts.

``unip data check-seg`` and the fine-tuning and evaluation entry points call :func:`check_segmentation`
before a run, so that every problem is listed up front instead of one failing a run hours in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
from tqdm import tqdm

from unip.data.layouts import IGNORE_INDEX, SPLIT_NAMES
from unip.data.parallel import thread_map
from unip.data.datasets import resolve_layout
from unip.data.inputs import InputNotes, issue_lines
from unip.data.segmentation import Palette, Problem, Sample, inspect_pair, read_split_file, scan_split
from unip.errors import DataError


@dataclass
class SplitSummary:
    """One split: its file, how many images it lists (present or not) and the label-value histogram.

    ``pixels`` is int64 ``[256]``: pixels of each label value over the split's readable labels (value
    255 = ignored pixels).
    """

    split: str
    split_file: str
    images: int = 0
    pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))


@dataclass
class SegCheckReport:
    """What :func:`check_segmentation` found: the layout, per-split summaries and every problem."""

    root: str
    layout: str
    classes: Tuple[str, ...]
    palette: Palette
    splits: List[SplitSummary]
    problems: List[Problem]
    notes: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem_lines(self) -> List[str]:
        """One line per problem: ``path: what is wrong``."""
        return [p.message for p in self.problems]

    def note_lines(self, shown: int = 3) -> List[str]:
        """One line per kind of image that is no sensor's raster (palette pictures, byte-swapped rasters)."""
        return issue_lines(self.notes, shown)

    def summary(self) -> str:
        """A table: images per split, then pixels per class (count and share of labelled pixels)."""
        lines = [f"{self.root}: {self.layout} layout, {len(self.classes)} classes"]
        for s in self.splits:
            lines.append(f"  {s.split:<5} {s.images:>8,} images  ({s.split_file})")
        header = f"  {'id':>3}  {'class':<16}" + "".join(f" {s.split + ' pixels':>20}" for s in self.splits)
        lines.append(header)
        rows = [(i, name) for i, name in enumerate(self.classes)] + [(IGNORE_INDEX, "(ignore)")]
        for i, name in rows:
            cells = []
            for s in self.splits:
                labelled = int(s.pixels[:len(self.classes)].sum())
                share = f"{100.0 * s.pixels[i] / labelled:5.1f}%" if labelled and i != IGNORE_INDEX else " " * 6
                cells.append(f" {int(s.pixels[i]):>13,} {share}")
            lines.append(f"  {i:>3}  {name[:16]:<16}" + "".join(cells))
        return "\n".join(lines)


def check_segmentation(root: str, dataset: str = "auto", splits: Optional[Sequence[str]] = None,
                       workers: Optional[int] = None, progress: bool = False) -> SegCheckReport:
    """Check ``splits`` (default train, val and test) of the data set at ``root``; never raises on bad files.

    Every listed image and label is fully decoded; problems (see :class:`Problem`) are collected, not
    raised; images that are no sensor's raster (palette pictures, byte-swapped rasters) are listed in ``notes``
    (and warned about once), not problems. A split file shared by several splits (SODA's val and test) is read
    once. Raises :class:`unip.errors.DataError` only when ``root`` is not a data set at all (no folder, unknown layout,
    unknown split name).
    """
    data_root, layout = resolve_layout(root, dataset)
    names = list(splits) if splits else list(SPLIT_NAMES)
    summaries: List[SplitSummary] = []
    problems: List[Problem] = []
    per_split: Dict[str, List[Sample]] = {}
    seen: Set[Problem] = set()
    for split in names:
        samples, found = scan_split(data_root, layout, split)
        split_file = layout.splits[split]
        new = [p for p in found if p not in seen]  # a shared split file or folder is reported once
        problems += new
        seen.update(new)
        per_split[split] = samples
        listed_path = os.path.join(data_root, split_file)
        try:
            listed = len(read_split_file(listed_path))
        except DataError:  # missing or unreadable: already a problem
            listed = 0
        summaries.append(SplitSummary(split, split_file, images=listed))
    unique = list({s.image: s for samples in per_split.values() for s in samples}.values())
    results: Dict[str, Optional[np.ndarray]] = {}
    notes = InputNotes()
    checks = thread_map(lambda s: (s, inspect_pair(s, len(layout.classes))), unique, workers)
    for sample, (found, histogram, issues) in tqdm(checks, total=len(unique), desc="check", unit="img",
                                                   disable=None if progress else True):
        notes.note(sample.image, issues)  # in the data set's order: the warning names its first such image
        problems += found
        results[sample.image] = histogram if not found else None
    for summary in summaries:
        for sample in per_split[summary.split]:
            histogram = results.get(sample.image)
            if histogram is not None:
                summary.pixels += histogram
    return SegCheckReport(data_root, layout.name, layout.classes, layout.palette, summaries, problems,
                          notes.files)

