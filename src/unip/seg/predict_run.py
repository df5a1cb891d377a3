"""``unip predict``: label maps, colour masks, overlays, class areas and annotated videos for images, folders
of images (searched recursively) and video files.

What it writes under ``out`` (``formats`` chooses the first four)::

    label/<name>.png      class ids, 8-bit gray (16-bit beyond 256 classes), the input's own size
    color/<name>.png      each id's palette colour
    overlay/<name>.png    the input blended with the colours, a legend of the classes present
    video/<video>.mp4     for a video: its overlays, at the video's frame rate / every
    areas.csv, areas.json pixels and percent of each class, per image and per video frame

``<name>``: an image named on the command line → its stem; an image found in a folder → ``<folder name>/<path
inside it without suffix>``; a video's frames → ``<video stem>/frame_<index, 6 digits>``.

Inputs named on the command line must exist and be images, videos or folders (``DataError`` otherwise); a
video is opened before any work; a file reached twice is predicted once. An image or video that cannot be read
is skipped, listed in the result (and in areas.json) and the rest are done. Nothing is written over a file unip
did not write. areas.csv / areas.json list every file the run wrote, also when it is interrupted (areas.json's
``complete`` is then false); files of an earlier run into the same ``out`` that this run does not replace stay,
unlisted (a warning says how many).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
from tqdm import tqdm

from unip.atomic import atomic_write_text
from unip.data.images import ImageReadError, read_rgb, walk_once
from unip.data.layouts import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from unip.data.parallel import default_workers, thread_map
from unip.data.video import VideoReader, VideoWriter, is_our_video
from unip.errors import ConfigError, DataError
from unip.memory import require_memory
from unip.outputs import claim, is_our_json, is_our_png, out_file, out_folder, save_png, starts_with_line
from unip.run_lock import hold
from unip.seg.checkpoint import load_segmentor
from unip.seg.predict import Predictor
from unip.seg.render import ClassInfo, class_areas, colorize, overlay
from unip.text import printable

log = logging.getLogger(__name__)

#: What ``--format`` may list.
FORMATS: Tuple[str, ...] = ("label", "color", "overlay", "video")
REPORT_FORMAT = "unip-predict"
CSV_HEADER = ("input", "frame", "time_s", "width", "height", "class_id", "class_name", "pixels", "percent")
CSV_FILE, JSON_FILE = "areas.csv", "areas.json"


@dataclass
class PredictOptions:
    """Options of :func:`predict_files` (the ``unip predict`` command line)."""

    out: str = "predictions"
    dataset: Optional[str] = None
    formats: Sequence[str] = FORMATS
    every: int = 1
    batch_size: int = 4
    device: str = "auto"
    precision: str = "fp32"
    alpha: float = 0.5
    workers: Optional[int] = None
    progress: bool = True
    #: library callers (``unip serve``): called after each batch with (frames done, frames in all); an exception it
    #: raises stops the run as an interruption does (the reports list what was done, ``complete`` false)
    on_progress: Optional[Callable[[int, int], None]] = None

    def check(self) -> None:
        """Raise ``ConfigError`` naming the option that is out of range."""
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ConfigError(f"--format {','.join(self.formats)}: list one or more of {','.join(FORMATS)}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"--every {self.every}: use 1 (every frame) or more")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"--alpha {self.alpha}: the mask's weight must be between 0 and 1")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: use at least 1 thread")


@dataclass
class Source:
    """One input file: ``kind`` "image" or "video", its output ``name``; a video is opened (``video``)."""

    kind: str
    path: str
    name: str
    video: Any = None

    def frame_indices(self, every: int) -> range:
        return range(0, self.video.frame_count, every) if self.video is not None else range(1)


@dataclass
class Failure:
    """An input (a video's frame when ``frame`` is set) that could not be used, and why."""

    input: str
    reason: str
    frame: Optional[int] = None


@dataclass
class Frame:
    """A decoded image or video frame on its way through the model (``image`` None: ``error`` says why)."""

    source: Source
    name: str
    index: Optional[int] = None
    time_s: Optional[float] = None
    image: Optional[np.ndarray] = None
    error: Optional[str] = None


@dataclass
class PredictResult:
    """What ``predict_files`` did: counts (``video_inputs``: videos that gave frames), the files of the report,
    annotated videos written (``videos``, with ``--format video``), failed inputs."""

    out: str
    images: int = 0
    frames: int = 0
    video_inputs: int = 0
    videos: List[str] = field(default_factory=list)
    failed: List[Failure] = field(default_factory=list)
    reports: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.images} image(s)"] + ([f"{self.frames} frame(s) of {self.video_inputs} video(s)"]
                                               if self.frames else [])
        return f"predicted {' and '.join(parts)}; wrote {self.out} ({', '.join(self.reports)})"


# ============================================================================================ inputs
def kind_of(path: str) -> Optional[str]:
    """``"image"``, ``"video"`` or ``None`` from the file's suffix."""
    suffix = os.path.splitext(path)[1].lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def find_sources(inputs: Sequence[str], exclude: Optional[str] = None) -> Tuple[List[Source], List[Failure]]:
    """The images and videos that ``inputs`` name (files, or folders searched recursively, in sorted order,
    skipping ``exclude`` (the output folder), its output subfolders (``label/``, ``color/``, ... when it is
    an input itself) and those of earlier runs found inside (``is_predict_output``), and files that are neither:
    counted, except earlier runs' ``areas.csv`` / ``areas.json``), with output names (module docstring).

    A file reached more than once (the same file named twice, overlapping globs or folders: one resolved path)
    is predicted once, under the name of its first mention. Videos are opened: one named on the command line
    that cannot be read raises ``DataError``, one found in a folder becomes a ``Failure``. A missing input, an
    input of another type or a folder without images or videos raises ``DataError``."""
    if not inputs:
        raise DataError("no INPUT given: name image files, folders or video files")
    sources: List[Source] = []
    failed: List[Failure] = []
    seen: Dict[str, str] = {}  # resolved path → the path it was first given as
    repeated: List[str] = []
    for given in inputs:
        if os.path.isdir(given):
            found = _folder_sources(given, exclude, failed, seen, repeated)
            if not found and not any(f.input.startswith(os.path.join(given, "")) for f in failed) \
                    and not any(r.startswith(os.path.join(given, "")) for r in repeated):
                raise DataError(f"{given}: no images ({' '.join(IMAGE_SUFFIXES)}) or videos "
                                f"({' '.join(VIDEO_SUFFIXES)}) in this folder or below it")
            sources += found
        elif os.path.isfile(given):
            kind = kind_of(given)
            if kind is None:
                raise DataError(f"{given}: not an image ({' '.join(IMAGE_SUFFIXES)}) nor a video "
                                f"({' '.join(VIDEO_SUFFIXES)})")
            if _repeated(given, seen, repeated):
                continue
            name = os.path.splitext(os.path.basename(given))[0]
            sources.append(Source(kind, given, name, VideoReader(given) if kind == "video" else None))
        elif os.path.exists(given):  # never opened: reading a FIFO would wait for a writer
            raise DataError(f"{given}: not a regular file (a FIFO, device or socket); name image or video files, or "
                            "folders")
        else:
            raise DataError(f"{given}: no such file or folder")
    if repeated:
        log.info("%d input file(s) given more than once (e.g. %s, first as %s): each is predicted once",
                 len(repeated), printable(repeated[0]), printable(seen[os.path.realpath(repeated[0])]))
    return sources, failed


def _repeated(path: str, seen: Dict[str, str], repeated: List[str]) -> bool:
    """True (and ``path`` added to ``repeated``) when ``path`` resolves to a file already in ``seen``; else
    records it there."""
    resolved = os.path.realpath(path)
    if resolved in seen:
        repeated.append(path)
        return True
    seen[resolved] = path
    return False


def _folder_sources(folder: str, exclude: Optional[str], failed: List[Failure], seen: Dict[str, str],
                    repeated: List[str]) -> List[Source]:
    prefix = os.path.basename(os.path.normpath(os.path.abspath(folder))) or "input"
    # the output folder and its outputs (label/, color/, ... of an --out that is also an input) are never read
    skip = {os.path.realpath(p) for p in [exclude, *(os.path.join(exclude, fmt) for fmt in FORMATS)]} \
        if exclude else set()
    found: List[Source] = []
    others = 0
    earlier: List[str] = []  # subfolders that an earlier run wrote into (another --out)
    for root, dirs, files in walk_once(folder, skip):  # linked subfolders too, each real folder once
        for sub in (os.path.join(root, d) for d in dirs):
            if is_predict_output(sub):  # another --out of an earlier run: its outputs are not read either
                earlier.append(sub)
                skip.update(os.path.realpath(os.path.join(sub, fmt)) for fmt in FORMATS)
        reports = JSON_FILE in files and is_predict_output(root)  # an earlier run's areas.csv / areas.json: ours
        for filename in files:
            path = os.path.join(root, filename)
            kind = kind_of(path)
            if kind is None:
                others += not (reports and filename in (CSV_FILE, JSON_FILE))
                continue
            if _repeated(path, seen, repeated):
                continue
            inner = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
            name = f"{prefix}/{inner}"
            if kind == "image":
                found.append(Source(kind, path, name))
                continue
            try:
                found.append(Source(kind, path, name, VideoReader(path)))
            except DataError as err:
                reason = str(err)
                failed.append(Failure(path, reason[len(path) + 2:] if reason.startswith(path + ": ") else reason))
    if others:
        log.info("%s: skipped %d file(s) that are neither images nor videos", folder, others)
    if earlier:
        log.info("%s: skipped the %s outputs of %d earlier unip predict run(s) in it (e.g. in %s); name such a "
                 "folder as an INPUT to predict its images", folder, "/, ".join(FORMATS) + "/", len(earlier),
                 printable(earlier[0]))
    return found


def is_predict_output(folder: str) -> bool:
    """True for a folder that ``unip predict`` wrote (its ``areas.json`` says ``"format": "unip-predict"``)."""
    try:
        with open(os.path.join(folder, JSON_FILE), "r", encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and document.get("format") == REPORT_FORMAT


# ============================================================================================ outputs
class OutputPlan:
    """Where each output of each input goes, checked before any work: names do not collide, and every path
    is new or unip's own earlier output."""

    def __init__(self, out: str, formats: Sequence[str], every: int) -> None:
        self.out = out
        self.formats = [f for f in FORMATS if f in formats]
        self.every = every
        self.image_formats = [f for f in self.formats if f != "video"]

    def path(self, fmt: str, name: str) -> str:
        suffix = ".mp4" if fmt == "video" else ".png"
        return os.path.join(self.out, fmt, *name.split("/")) + suffix

    def frame_name(self, source: Source, index: Optional[int]) -> str:
        return source.name if index is None else f"{source.name}/frame_{index:06d}"

    def check(self, sources: Sequence[Source]) -> None:
        """Raise ``ConfigError`` for two inputs with one output name or an output path that is not ours; log
        a note when ``out`` holds outputs of an earlier run that this one does not replace."""
        out_folder(self.out, "--out")
        for fmt in self.formats:
            out_folder(os.path.join(self.out, fmt), "--out")
        owners: Dict[str, str] = {}
        planned: Set[str] = set()
        for source in sources:
            indices: Iterable[Optional[int]] = [None] if source.video is None else source.frame_indices(self.every)
            for index in indices:
                name = self.frame_name(source, index)
                if name in owners:
                    raise ConfigError(f"{owners[name]} and {source.path} would both write {name}.png; give them "
                                      "separately, with another --out each")
                owners[name] = source.path
                for fmt in self.image_formats:
                    planned.add(out_file(self.path(fmt, name), "--out", is_ours=is_our_png))
            if source.video is not None and "video" in self.formats:
                planned.add(out_file(self.path("video", source.name), "--out", is_ours=is_our_video))
        claim([os.path.join(self.out, CSV_FILE)], starts_with_line(",".join(CSV_HEADER)), "--out")
        claim([os.path.join(self.out, JSON_FILE)], is_our_json(["format", "images"]), "--out")
        earlier = self.earlier_files(planned)
        if earlier:
            log.warning("%s holds %d file(s) of an earlier run that this run does not write (e.g. %s): they stay, "
                        "and this run's %s and %s do not list them", printable(self.out), len(earlier),
                        printable(earlier[0]), CSV_FILE, JSON_FILE)

    def earlier_files(self, planned: Set[str]) -> List[str]:
        """Files in ``out``'s ``label/``, ``color/``, ``overlay/`` and ``video/`` folders that are not in
        ``planned`` (sorted): outputs of an earlier run into the same folder."""
        found = []
        for fmt in FORMATS:
            for root, dirs, files in os.walk(os.path.join(self.out, fmt)):
                dirs.sort()
                found += [path for path in (os.path.join(root, f) for f in sorted(files))
                          if path not in planned and os.path.splitext(path)[1] in (".png", ".mp4")]
        return found


class _Writes:
    """PNG writes on a few threads (PNG encoding releases the GIL), at most ``4 × workers`` pending."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.pending: Deque[Future] = deque()
        self.limit = 4 * workers

    def png(self, pixels: np.ndarray, path: str) -> None:
        self.pending.append(self.pool.submit(save_png, pixels, path))
        while len(self.pending) > self.limit:
            self.pending.popleft().result()

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


# ============================================================================================ the run
@dataclass
class PredictModel:
    """A segmentor loaded for prediction: the ``checkpoint`` it came from, its ``predictor`` (on its device, memory
    planned) and its ``classes``."""

    checkpoint: str
    predictor: Predictor
    classes: ClassInfo

    @classmethod
    def load(cls, checkpoint: str, options: PredictOptions) -> "PredictModel":
        """Read ``checkpoint`` with the model options of ``options`` (``dataset``, ``device``, ``precision``,
        ``batch_size``); raises ``UnipError``."""
        segmentor = load_segmentor(checkpoint)
        classes = ClassInfo.resolve(segmentor.num_classes, options.dataset, segmentor.meta)
        predictor = Predictor(segmentor, options.device, options.precision, options.batch_size)
        predictor.plan_memory()
        return cls(checkpoint, predictor, classes)


def predict_files(checkpoint: str, inputs: Sequence[str], options: Optional[PredictOptions] = None,
                  model: Optional[PredictModel] = None) -> PredictResult:
    """Run ``unip predict`` (module docstring): returns a ``PredictResult``; ``failed`` lists the inputs that
    could not be read. Bad options, checkpoints, inputs or output folders raise ``UnipError`` before any work.
    ``model``: the segmentor of ``checkpoint`` already loaded (``PredictModel.load``; ``unip serve`` loads it once
    for every upload), used as it is (its device, precision, batch size and classes)."""
    options = options or PredictOptions()
    options.check()
    out_folder(options.out, "--out")
    sources, failed = find_sources(inputs, exclude=options.out)
    model = model or PredictModel.load(checkpoint, options)
    with hold(options.out, "unip predict"):  # from the look at what --out holds to the last file written
        plan = OutputPlan(options.out, options.formats, options.every)
        plan.check(sources)
        run = _Run(plan, model.classes, model.predictor, options)
        run.result.failed += failed
        return run.go(sources, checkpoint)


class _Run:
    """One ``predict_files`` call: frames in, files and area records out."""

    def __init__(self, plan: OutputPlan, classes: ClassInfo, predictor: Predictor, options: PredictOptions) -> None:
        self.plan, self.classes, self.predictor, self.options = plan, classes, predictor, options
        self.result = PredictResult(plan.out)
        self.records: List[Dict[str, Any]] = []
        self.workers = options.workers or default_workers()
        self.video_writer: Any = None
        self.video_source: Optional[Source] = None
        self.checked_sizes: Dict[Tuple[int, int], Optional[str]] = {}

    def go(self, sources: Sequence[Source], checkpoint: str) -> PredictResult:
        total = sum(len(s.frame_indices(self.options.every)) for s in sources)
        bar = tqdm(total=total, unit="img", desc="predict", dynamic_ncols=True, disable=not self.options.progress)
        writes = _Writes(self.workers)
        done = 0
        try:
            for batch in _batches(self._frames(sources), self.predictor.batch_size):
                usable = [f for f in batch if f.image is not None and not self._too_large(f)]
                for frame in batch:
                    if frame.image is None:
                        self.result.failed.append(Failure(frame.source.path, frame.error or "unreadable", frame.index))
                labels = self.predictor.predict([f.image for f in usable]) if usable else []
                for frame, label in zip(usable, labels):
                    self._write(frame, label, writes)
                bar.update(len(batch))
                done += len(batch)
                if self.options.on_progress is not None:
                    self.options.on_progress(done, total)
            self._close_video()
            writes.close()
        except BaseException as err:
            if self.video_writer is not None:
                self.video_writer.abort()
            try:
                writes.close()
            finally:
                self._write_partial_reports(checkpoint, err)
            raise
        finally:
            bar.close()
        self._write_reports(checkpoint)
        return self.result

    # ------------------------------------------------------------------------------ frames
    def _frames(self, sources: Sequence[Source]) -> Iterator[Frame]:
        """Every frame to predict, in input order; images decoded on ``workers`` threads."""
        for is_video, group in itertools.groupby(sources, key=lambda s: s.kind == "video"):
            if is_video:
                for source in group:
                    yield from self._video_frames(source)
            else:
                yield from thread_map(self._read_image, list(group), self.workers)

    def _read_image(self, source: Source) -> Frame:
        try:
            return Frame(source, source.name, image=read_rgb(source.path))
        except ImageReadError as err:
            return Frame(source, source.name, error=f"{err.detail} ({err.reason})")

    def _video_frames(self, source: Source) -> Iterator[Frame]:
        every = self.options.every
        count = 0
        for index, rgb in source.video.frames(every):
            count += 1
            if count == 1:
                self.result.video_inputs += 1
            yield Frame(source, self.plan.frame_name(source, index), index, index / source.video.fps, rgb)
        if count < len(source.frame_indices(every)):
            log.info("%s: ended after %d of the %d frames its header announces", source.path, count,
                     len(source.frame_indices(every)))

    def _too_large(self, frame: Frame) -> bool:
        """Images whose full-size logits do not fit in memory are failures (the rest go on)."""
        size = tuple(frame.image.shape[:2])
        if size not in self.checked_sizes:
            try:
                require_memory(4 * 3 * self.classes.num_classes * size[0] * size[1],
                               f"an image of {size[0]}x{size[1]} pixels", "downscale it first")
                self.checked_sizes[size] = None
            except ConfigError as err:
                self.checked_sizes[size] = str(err)
        reason = self.checked_sizes[size]
        if reason:
            self.result.failed.append(Failure(frame.source.path, reason, frame.index))
        return reason is not None

    # ------------------------------------------------------------------------------ outputs
    def _write(self, frame: Frame, labels: np.ndarray, writes: _Writes) -> None:
        files = {fmt: self.plan.path(fmt, frame.name) for fmt in self.plan.image_formats}
        claim(files.values(), is_our_png, "--out")  # a frame beyond the count the video announced was not checked
        # recorded before its files are written: the report of an interrupted run lists every file it began
        self.records.append(self._record(frame, labels, files))
        if frame.index is None:
            self.result.images += 1
        else:
            self.result.frames += 1
        if "label" in files:
            writes.png(labels, files["label"])
        if "color" in files:
            writes.png(colorize(labels, self.classes.palette), files["color"])
        in_video = frame.index is not None and "video" in self.plan.formats
        if "overlay" in files or in_video:
            shown = overlay(frame.image, labels, self.classes, self.options.alpha)
            if "overlay" in files:
                writes.png(shown, files["overlay"])
            if in_video:
                self._video_for(frame.source).write(shown)

    def _video_for(self, source: Source) -> Any:
        """The annotated video of ``source``, opened at its first frame (the previous one is completed)."""
        if self.video_source is not source:
            self._close_video()
            fps = source.video.fps / self.options.every
            self.video_writer = VideoWriter(self.plan.path("video", source.name), fps, source.video.size)
            self.video_source = source
        return self.video_writer

    def _close_video(self) -> None:
        if self.video_writer is not None:
            self.result.videos.append(self.video_writer.close())
            self.video_writer, self.video_source = None, None

    def _record(self, frame: Frame, labels: np.ndarray, files: Dict[str, str]) -> Dict[str, Any]:
        pixels = class_areas(labels, self.classes.num_classes)
        total = max(int(labels.size), 1)
        return {"input": frame.source.path, "frame": frame.index,
                "time_s": None if frame.time_s is None else round(frame.time_s, 4), "name": frame.name,
                "height": int(labels.shape[0]), "width": int(labels.shape[1]),
                "files": {k: os.path.relpath(v, self.plan.out).replace(os.sep, "/") for k, v in files.items()},
                "pixels": [int(p) for p in pixels],
                "percent": [round(100.0 * int(p) / total, 4) for p in pixels]}

    def _write_partial_reports(self, checkpoint: str, err: BaseException) -> None:
        """After an interruption or error: the reports of the images and frames done so far (``"complete":
        false``), so that they list every file this run wrote; none when nothing was written (an earlier
        run's reports then still describe the folder)."""
        if not self.records:
            return
        self._write_reports(checkpoint, complete=False)
        log.warning("stopped (%s) after %d image(s) and frame(s): %s and %s list those", type(err).__name__,
                    len(self.records), CSV_FILE, JSON_FILE)

    def _write_reports(self, checkpoint: str, complete: bool = True) -> None:
        out = self.plan.out
        csv_path, json_path = os.path.join(out, CSV_FILE), os.path.join(out, JSON_FILE)
        atomic_write_text(csv_path, areas_csv(self.records, self.classes))
        pipeline = self.predictor.pipeline
        document = {
            "format": REPORT_FORMAT, "version": 1, "checkpoint": checkpoint, "complete": complete,
            "classes": list(self.classes.all_names),
            "palette": [list(c) for c in self.classes.palette],
            "test_pipeline": {"scale": list(pipeline.scale), "mean": list(pipeline.mean), "std": list(pipeline.std),
                              "crop": pipeline.crop, "stride": pipeline.stride},
            "device": str(self.predictor.device), "precision": self.predictor.precision.name,
            "images": self.records,
            "videos": [os.path.relpath(v, out).replace(os.sep, "/") for v in self.result.videos],
            "failed": [{"input": f.input, "frame": f.frame, "reason": f.reason} for f in self.result.failed],
        }
        atomic_write_text(json_path, json.dumps(document, indent=1) + "\n")
        self.result.reports = [CSV_FILE, JSON_FILE]


def _batches(frames: Iterable[Frame], size: int) -> Iterator[List[Frame]]:
    batch: List[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def areas_csv(records: Sequence[Dict[str, Any]], classes: ClassInfo) -> str:
    """The CSV text of the area records: one row per (image or frame, class), ``CSV_HEADER`` columns (input
    paths as printable text: bytes that are not UTF-8 as ``\\xNN``; areas.json keeps them exact)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for record in records:
        for class_id, (pixels, percent) in enumerate(zip(record["pixels"], record["percent"])):
            writer.writerow([printable(record["input"]), "" if record["frame"] is None else record["frame"],
                             "" if record["time_s"] is None else record["time_s"], record["width"], record["height"],
                             class_id, classes.name(class_id), pixels, percent])
    return buffer.getvalue()
