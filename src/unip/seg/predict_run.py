"""``unip predict``: label maps, colour masks, overlays, class areas (and temperatures) and annotated videos for
images, thermal-camera files, folders of them (searched recursively), video files, FLIR sequences and live cameras.

Every input is read through the one input mapping (``unip.data.inputs``: a radiometric raster stretched per
frame or mapped through a fixed °C window, colour images as their luma) and goes through
``unip.seg.prediction`` (labels, the ``areas.json`` entry, the overlay), as ``unip serve`` does.

What it writes under ``out`` (``formats`` chooses the first four)::

    label/<name>.png      class ids, 8-bit gray (16-bit beyond 256 classes), the model image's size (a
                          radiometric file's raster, not its preview)
    color/<name>.png      each id's palette colour
    overlay/<name>.png    the model's image blended with the colours, a legend of the classes present (with °C),
                          a °C bar where the input has temperatures
    video/<video>.mp4     for a video, a SEQ/CSQ or a camera: its overlays, at its frame rate / every
    areas.csv, areas.json pixels, percent and °C (mean, median, min, max) of each class, per image and frame

``<name>``: an image named on the command line → its stem; an image found in a folder → ``<folder name>/<path
inside it without suffix>``; a video's or sequence's frames → ``<stem>/frame_<index, 6 digits>``; camera N's
frames → ``camera<N>/frame_<index>``.

Inputs named on the command line must exist and be images, videos or folders (``DataError`` otherwise); a
video or sequence is opened before any work; a file reached twice is predicted once. An image or video that cannot
be read is skipped, listed in the result (and in areas.json) and the rest are done; so is a damaged frame of a
sequence (the frames after it are read where the file lets them be found). A camera run ends at ``max_frames``,
when the camera stops giving frames, or at Ctrl-C, with complete outputs. Nothing is written over a file unip
did not write. areas.csv / areas.json list every file the run wrote, also when it is interrupted (areas.json's
``complete`` is then false); files of an earlier run into the same ``out`` that this run does not replace stay,
unlisted (a warning says how many).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
from tqdm import tqdm

from unip.atomic import atomic_write_text
from unip.data.camera import CameraReader
from unip.data.images import ImageReadError, walk_once
from unip.data.inputs import InputMapping, InputNotes, ModelInput, picture_input, read_input
from unip.data.layouts import FRAME_SUFFIXES, IMAGE_SUFFIXES, SEQUENCE_SUFFIXES, THERMAL_SUFFIXES, VIDEO_SUFFIXES
from unip.data.parallel import default_workers, thread_map
from unip.data.thermal import ThermalFileError, frame_count
from unip.data.video import VideoReader, VideoWriter, is_our_video, opencv
from unip.errors import ConfigError, DataError
from unip.memory import require_memory
from unip.outputs import claim, is_our_json, is_our_png, out_file, out_folder, save_png
from unip.run_lock import hold
from unip.seg.checkpoint import load_segmentor
from unip.seg.predict import Predictor
from unip.seg.prediction import area_record, render_overlay
from unip.seg.render import ClassInfo, colorize
from unip.text import printable

log = logging.getLogger(__name__)

#: What ``--format`` may list.
FORMATS: Tuple[str, ...] = ("label", "color", "overlay", "video")
REPORT_FORMAT = "unip-predict"
CSV_HEADER = ("input", "frame", "time_s", "width", "height", "class_id", "class_name", "pixels", "percent",
              "celsius_mean", "celsius_median", "celsius_min", "celsius_max")
#: The header of areas.csv files of earlier versions (without temperatures): a rerun replaces them too.
EARLIER_CSV_HEADERS = (CSV_HEADER[:9],)
CSV_FILE, JSON_FILE = "areas.csv", "areas.json"
#: Frame rate given to the annotated video of a sequence whose frames carry no time.
DEFAULT_SEQUENCE_FPS = 30.0


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
    #: ``torch.compile`` mode of the forwards (``unip.seg.predict.compiled_for_inference``), or None: eager
    compile: Optional[str] = None
    alpha: float = 0.5
    workers: Optional[int] = None
    progress: bool = True
    #: library callers (``unip serve``): called after each batch with (frames done, frames in all); an exception it
    #: raises stops the run as an interruption does (the reports list what was done, ``complete`` false)
    on_progress: Optional[Callable[[int, int], None]] = None
    mapping: InputMapping = field(default_factory=InputMapping)
    cameras: Sequence[int] = ()
    max_frames: Optional[int] = None
    show: bool = False

    def check(self) -> None:
        """Raise ``ConfigError`` naming the option that is out of range."""
        if self.max_frames is not None and (isinstance(self.max_frames, bool) or not isinstance(self.max_frames, int)
                                            or self.max_frames < 1):
            raise ConfigError(f"--max-frames {self.max_frames}: use 1 or more")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.cameras):
            raise ConfigError(f"--camera {list(self.cameras)}: camera numbers are 0 or more (0: the first camera)")
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
    """One input: ``kind`` "image", "video", "sequence" (a FLIR SEQ/CSQ) or "camera", its output ``name``; a video,
    sequence or camera is opened (``video``: ``VideoReader``, ``ThermalSequence`` or ``CameraReader``)."""

    kind: str
    path: str
    name: str
    video: Any = None

    def frame_indices(self, every: int, max_frames: Optional[int] = None) -> Sequence[int]:
        """The frames to predict (a camera's are not known in advance: none)."""
        if self.kind == "camera":
            return range(0)
        indices = range(0, self.video.frame_count, every) if self.video is not None else range(1)
        return indices if max_frames is None or self.video is None else indices[:max_frames]


class ThermalSequence:
    """A FLIR SEQ/CSQ opened for ``unip predict``: ``frame_count`` (damaged frames included), ``fps`` (from the
    frames' times, else ``DEFAULT_SEQUENCE_FPS``), ``start`` (frame 0's time or None). Raises ``DataError`` when
    the file cannot be read at all."""

    def __init__(self, path: str, mapping: InputMapping) -> None:
        self.path = path
        self.frame_count = frame_count(path)
        first = read_input(path, mapping, 0).frame
        self.start = first.timestamp if first is not None else None
        self.fps = DEFAULT_SEQUENCE_FPS
        if self.frame_count > 1 and self.start is not None:
            try:
                second = read_input(path, mapping, 1).frame
            except ImageReadError:
                second = None
            step = (second.timestamp - self.start).total_seconds() if second and second.timestamp else 0.0
            if 0 < step < 60:
                self.fps = 1.0 / step

    def time_of(self, item: ModelInput) -> Optional[float]:
        """Seconds from frame 0 to ``item``'s frame (from their times, else from the frame rate)."""
        stamp = item.frame.timestamp if item.frame is not None else None
        if self.start is not None and stamp is not None:
            return (stamp - self.start).total_seconds()
        return None if item.index is None else item.index / self.fps


@dataclass
class Failure:
    """An input (a video's frame when ``frame`` is set) that could not be used, and why."""

    input: str
    reason: str
    frame: Optional[int] = None


@dataclass
class Frame:
    """An image or frame on its way through the model: ``item`` the mapped input (None: ``error`` says why)."""

    source: Source
    name: str
    index: Optional[int] = None
    time_s: Optional[float] = None
    item: Optional[ModelInput] = None
    error: Optional[str] = None


@dataclass
class PredictResult:
    """What ``predict_files`` did: counts (``video_inputs``: videos, sequences and cameras that gave frames), the
    files of the report, annotated videos written (``videos``, with ``--format video``), failed inputs, the frames
    per second of a camera run (``fps``), and one line per kind of input that was not a sensor's raster
    (``issues``)."""

    out: str
    images: int = 0
    frames: int = 0
    video_inputs: int = 0
    videos: List[str] = field(default_factory=list)
    failed: List[Failure] = field(default_factory=list)
    reports: List[str] = field(default_factory=list)
    fps: Optional[float] = None
    issues: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.images} image(s)"] + ([f"{self.frames} frame(s) of {self.video_inputs} video(s), "
                                                f"sequence(s) or camera(s)"] if self.frames else [])
        speed = f" at {self.fps:.1f} frames/s" if self.fps else ""
        return f"predicted {' and '.join(parts)}{speed}; wrote {self.out} ({', '.join(self.reports)})"


# ============================================================================================ inputs
def kind_of(path: str) -> Optional[str]:
    """``"image"`` (images and ``.fff`` frames), ``"sequence"`` (``.seq``, ``.csq``), ``"video"`` or ``None`` from
    the file's suffix."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in FRAME_SUFFIXES:
        return "image"
    return "sequence" if suffix in SEQUENCE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def _open(kind: str, path: str, mapping: InputMapping) -> Any:
    """The reader of a video or sequence (``DataError`` when it cannot be read), None for an image."""
    if kind == "video":
        if mapping.thermal_range is not None:
            raise ConfigError(f"{printable(path)}: a video holds no temperatures, so --thermal-range cannot map it; "
                              "leave --thermal-range out, or give radiometric files (R-JPEG, FFF, SEQ, CSQ)")
        return VideoReader(path)
    if kind == "sequence":
        return ThermalSequence(path, mapping)
    return None


def find_sources(inputs: Sequence[str], exclude: Optional[str] = None, mapping: Optional[InputMapping] = None
                 ) -> Tuple[List[Source], List[Failure]]:
    """The images and videos that ``inputs`` name (files, or folders searched recursively, in sorted order,
    skipping ``exclude`` (the output folder), its output subfolders (``label/``, ``color/``, ... when it is
    an input itself) and those of earlier runs found inside (``is_predict_output``), and files that are neither:
    counted, except earlier runs' ``areas.csv`` / ``areas.json``), with output names (module docstring).

    A file reached more than once (the same file named twice, overlapping globs or folders: one resolved path)
    is predicted once, under the name of its first mention. Videos and sequences are opened: one named on the
    command line that cannot be read raises ``DataError``, one found in a folder becomes a ``Failure``. A missing
    input, an input of another type or a folder without images or videos raises ``DataError``."""
    mapping = mapping or InputMapping()
    if not inputs:
        raise DataError("no INPUT given: name image files, thermal files, folders or video files (or --camera N)")
    sources: List[Source] = []
    failed: List[Failure] = []
    seen: Dict[str, str] = {}  # resolved path → the path it was first given as
    repeated: List[str] = []
    for given in inputs:
        if os.path.isdir(given):
            found = _folder_sources(given, exclude, failed, seen, repeated, mapping)
            if not found and not any(f.input.startswith(os.path.join(given, "")) for f in failed) \
                    and not any(r.startswith(os.path.join(given, "")) for r in repeated):
                raise DataError(f"{given}: no images ({' '.join(IMAGE_SUFFIXES)}), thermal files "
                                f"({' '.join(THERMAL_SUFFIXES)}) or videos ({' '.join(VIDEO_SUFFIXES)}) in this "
                                "folder or below it")
            sources += found
        elif os.path.isfile(given):
            kind = kind_of(given)
            if kind is None:
                raise DataError(f"{given}: not an image ({' '.join(IMAGE_SUFFIXES)}), a thermal file "
                                f"({' '.join(THERMAL_SUFFIXES)}) nor a video ({' '.join(VIDEO_SUFFIXES)})")
            if _repeated(given, seen, repeated):
                continue
            name = os.path.splitext(os.path.basename(given))[0]
            sources.append(Source(kind, given, name, _open(kind, given, mapping)))
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
                    repeated: List[str], mapping: InputMapping) -> List[Source]:
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
                found.append(Source(kind, path, name, _open(kind, path, mapping)))
            except ConfigError:
                raise
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

    def __init__(self, out: str, formats: Sequence[str], every: int, max_frames: Optional[int] = None) -> None:
        self.out = out
        self.formats = [f for f in FORMATS if f in formats]
        self.every = every
        self.max_frames = max_frames
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
            indices: Iterable[Optional[int]] = [None] if source.video is None else \
                source.frame_indices(self.every, self.max_frames)
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
        claim([os.path.join(self.out, CSV_FILE)], _is_our_csv, "--out")
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


def _is_our_csv(path: str) -> bool:
    """An areas.csv of this version or an earlier one (its header)."""
    with open(path, "r", encoding="utf-8") as handle:
        header = tuple(handle.readline().rstrip("\r\n").split(","))
    return header == CSV_HEADER or header in EARLIER_CSV_HEADERS


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
        ``batch_size``, ``compile``); raises ``UnipError``."""
        segmentor = load_segmentor(checkpoint)
        classes = ClassInfo.resolve(segmentor.num_classes, options.dataset, segmentor.meta)
        predictor = Predictor(segmentor, options.device, options.precision, options.batch_size,
                              compile_mode=options.compile)
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
    window = _live_window(options.show)
    sources, failed = find_sources(inputs, exclude=options.out, mapping=options.mapping) if inputs or not \
        options.cameras else ([], [])
    model = model or PredictModel.load(checkpoint, options)
    sources += [Source("camera", f"camera {index}", f"camera{index}", CameraReader(index, options.mapping))
                for index in options.cameras]  # opened last: a camera waits on nothing else
    try:
        with hold(options.out, "unip predict"):  # from the look at what --out holds to the last file written
            plan = OutputPlan(options.out, options.formats, options.every, options.max_frames)
            plan.check(sources)
            run = _Run(plan, model.classes, model.predictor, options, window)
            run.result.failed += failed
            return run.go(sources, checkpoint)
    finally:
        for source in sources:
            if source.kind == "camera":
                source.video.close()
        if window is not None:
            window.close()


class _Window:
    """The live window of ``--show`` (OpenCV's): one overlay at a time; ``q`` or Esc in it asks to stop."""

    TITLE = "unip predict (q: stop)"

    def __init__(self) -> None:
        self.cv2 = opencv()
        self.closed_by_user = False

    def show(self, rgb: np.ndarray) -> None:
        self.cv2.imshow(self.TITLE, np.ascontiguousarray(rgb[:, :, ::-1]))
        if self.cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            self.closed_by_user = True

    def close(self) -> None:
        self.cv2.destroyAllWindows()


def _live_window(show: bool) -> Optional[_Window]:
    """The ``--show`` window, or None; ``ConfigError`` where there is no display or OpenCV has no GUI."""
    if not show:
        return None
    import sys

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ConfigError("--show: no display here (DISPLAY and WAYLAND_DISPLAY are unset); leave --show out, the "
                          "outputs are written to --out")
    window = _Window()
    try:
        window.cv2.namedWindow(_Window.TITLE)
    except Exception as err:  # cv2.error: the headless build has no windows
        raise ConfigError(f"--show: OpenCV cannot open a window ({str(err).strip().splitlines()[-1][:120]}); "
                          "install opencv-python (not opencv-python-headless), or leave --show out") from None
    return window


class _Run:
    """One ``predict_files`` call: frames in, files and area records out."""

    def __init__(self, plan: OutputPlan, classes: ClassInfo, predictor: Predictor, options: PredictOptions,
                 window: Optional[_Window] = None) -> None:
        self.plan, self.classes, self.predictor, self.options = plan, classes, predictor, options
        self.window = window
        self.result = PredictResult(plan.out)
        self.records: List[Dict[str, Any]] = []
        self.notes = InputNotes()
        self.workers = options.workers or default_workers()
        self.video_writer: Any = None
        self.video_source: Optional[Source] = None
        self.checked_sizes: Dict[Tuple[int, int], Optional[str]] = {}
        self.stop_asked = False

    def go(self, sources: Sequence[Source], checkpoint: str) -> PredictResult:
        every, most = self.options.every, self.options.max_frames
        cameras = any(s.kind == "camera" for s in sources)
        total = None if cameras else sum(len(s.frame_indices(every, most)) for s in sources)
        bar = tqdm(total=total, unit="img", desc="predict", dynamic_ncols=True, disable=not self.options.progress)
        writes = _Writes(self.workers)
        done = 0
        try:
            with _ctrl_c_ends_cameras(self) if cameras else contextlib.nullcontext():
                for batch in _batches(self._frames(sources), self.predictor.batch_size):
                    usable = [f for f in batch if f.item is not None and not self._too_large(f)]
                    for frame in batch:
                        if frame.item is None:
                            self.result.failed.append(Failure(frame.source.path, frame.error or "unreadable",
                                                              frame.index))
                    labels = self.predictor.predict([f.item.rgb for f in usable]) if usable else []
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
        for kind, group in itertools.groupby(sources, key=lambda s: s.kind):
            if kind == "image":
                for frame in thread_map(self._read_image, list(group), self.workers):
                    if frame.item is not None:  # noted in input order: the warning names the first such file
                        self.notes.note(frame.source.path, frame.item.issues)
                    yield frame
            else:
                for source in group:
                    yield from {"video": self._video_frames, "sequence": self._sequence_frames,
                                "camera": self._camera_frames}[kind](source)

    def _read_image(self, source: Source) -> Frame:
        try:
            item = read_input(source.path, self.options.mapping)
        except ImageReadError as err:
            return Frame(source, source.name, error=f"{err.detail} ({err.reason})")
        return Frame(source, source.name, item=item)

    def _video_frames(self, source: Source) -> Iterator[Frame]:
        count = 0
        planned = source.frame_indices(self.options.every, self.options.max_frames)
        for index, picture in itertools.islice(source.video.pictures(self.options.every), len(planned)):
            count += 1
            item = picture_input(picture, source.path, self.options.mapping, index)
            self.notes.note(source.path, item.issues)
            yield self._first_of(source, count, Frame(source, self.plan.frame_name(source, index), index,
                                                      index / source.video.fps, item))
        if count < len(planned):
            log.info("%s: ended after %d of the %d frames its header announces", source.path, count, len(planned))

    def _sequence_frames(self, source: Source) -> Iterator[Frame]:
        """The frames of a SEQ/CSQ, each read on its own: a damaged one is a failure and the rest go on."""
        count = 0
        for index in source.frame_indices(self.options.every, self.options.max_frames):
            name = self.plan.frame_name(source, index)
            try:
                item = read_input(source.path, self.options.mapping, index)
            except ThermalFileError as err:
                yield Frame(source, name, index, error=f"{err.detail} ({err.reason})")
                continue
            count += 1
            self.notes.note(source.path, item.issues)
            yield self._first_of(source, count, Frame(source, name, index, source.video.time_of(item), item))

    def _camera_frames(self, source: Source) -> Iterator[Frame]:
        """A camera's frames until --max-frames, Ctrl-C, ``q`` in the --show window or the end of its stream;
        the frames per second are logged every few seconds and at the end."""
        camera = source.video
        started = time.monotonic()
        reported = started
        count = 0
        for index, item, seconds in camera.frames(self.options.max_frames, stop=self._stopping):
            count += 1
            self.notes.note(source.path, item.issues)
            yield self._first_of(source, count, Frame(source, self.plan.frame_name(source, index), index, seconds,
                                                      item))
            now = time.monotonic()
            if now - reported >= 5.0:
                log.info("%s: %d frames, %.1f frames/s", source.path, count, count / (now - started))
                reported = now
        elapsed = time.monotonic() - started
        self.result.fps = count / elapsed if count and elapsed > 0 else None
        if count:
            log.info("%s: %d frames in %.1f s, %.1f frames/s (capture, prediction and writing)", source.path, count,
                     elapsed, self.result.fps)

    def _stopping(self) -> bool:
        return self.stop_asked or (self.window is not None and self.window.closed_by_user)

    def _first_of(self, source: Source, count: int, frame: Frame) -> Frame:
        if count == 1:
            self.result.video_inputs += 1
        return frame

    def _too_large(self, frame: Frame) -> bool:
        """Images whose full-size logits do not fit in memory are failures (the rest go on)."""
        size = tuple(frame.item.image.shape[:2])
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
        record = area_record(frame.item, labels, self.classes, frame.name, frame.time_s)
        record["files"] = {k: os.path.relpath(v, self.plan.out).replace(os.sep, "/") for k, v in files.items()}
        self.records.append(record)
        if frame.index is None:
            self.result.images += 1
        else:
            self.result.frames += 1
        if "label" in files:
            writes.png(labels, files["label"])
        if "color" in files:
            writes.png(colorize(labels, self.classes.palette), files["color"])
        in_video = frame.index is not None and "video" in self.plan.formats
        if "overlay" in files or in_video or self.window is not None:
            shown = render_overlay(frame.item, labels, self.classes, self.options.alpha, record)
            if "overlay" in files:
                writes.png(shown, files["overlay"])
            if in_video:
                self._video_for(frame.source, shown.shape[:2]).write(shown)
            if self.window is not None:
                self.window.show(shown)

    def _video_for(self, source: Source, size: Tuple[int, int]) -> Any:
        """The annotated video of ``source``, opened at its first frame (the previous one is completed)."""
        if self.video_source is not source:
            self._close_video()
            fps = source.video.fps / (1 if source.kind == "camera" else self.options.every)
            self.video_writer = VideoWriter(self.plan.path("video", source.name), fps, size)
            self.video_source = source
        return self.video_writer

    def _close_video(self) -> None:
        if self.video_writer is not None:
            self.result.videos.append(self.video_writer.close())
            self.video_writer, self.video_source = None, None

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
            "format": REPORT_FORMAT, "version": 2, "checkpoint": checkpoint, "complete": complete,
            "classes": list(self.classes.all_names),
            "palette": [list(c) for c in self.classes.palette],
            "test_pipeline": {"scale": list(pipeline.scale), "mean": list(pipeline.mean), "std": list(pipeline.std),
                              "crop": pipeline.crop, "stride": pipeline.stride},
            "input_mapping": self.options.mapping.record(),
            "device": str(self.predictor.device), "precision": self.predictor.precision.name,
            "compile": self.predictor.compile_mode,
            "images": self.records,
            "videos": [os.path.relpath(v, out).replace(os.sep, "/") for v in self.result.videos],
            "failed": [{"input": f.input, "frame": f.frame, "reason": f.reason} for f in self.result.failed],
            "issues": self.notes.files,
        }
        atomic_write_text(json_path, json.dumps(document, indent=1) + "\n")
        self.result.reports = [CSV_FILE, JSON_FILE]
        self.result.issues = self.notes.summary()


@contextlib.contextmanager
def _ctrl_c_ends_cameras(run: _Run) -> Iterator[None]:
    """While cameras are read: the first Ctrl-C (SIGINT) asks the run to stop after the frame at hand, so that
    its outputs are complete; a second one interrupts at once. Only the main thread can take signals: elsewhere
    Ctrl-C interrupts as usual."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask_to_stop(signum: int, frame: Any) -> None:
        if run.stop_asked:
            raise KeyboardInterrupt
        run.stop_asked = True
        log.warning("Ctrl-C: stopping after this frame (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, ask_to_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _batches(frames: Iterable[Frame], size: int) -> Iterator[List[Frame]]:
    """Frames in batches of ``size``; a camera's frames one at a time (each is shown and written when it comes)."""
    batch: List[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size or frame.source.kind == "camera":
            yield batch
            batch = []
    if batch:
        yield batch


def areas_csv(records: Sequence[Dict[str, Any]], classes: ClassInfo) -> str:
    """The CSV text of the area records: one row per (image or frame, class), ``CSV_HEADER`` columns (input
    paths as printable text: bytes that are not UTF-8 as ``\\xNN``; areas.json keeps them exact; the °C columns
    empty where the input has no temperatures or the class is absent)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for record in records:
        celsius = [record.get(key) or [None] * len(record["pixels"]) for key in CSV_HEADER[9:]]
        for class_id, (pixels, percent) in enumerate(zip(record["pixels"], record["percent"])):
            writer.writerow([printable(record["input"]), "" if record["frame"] is None else record["frame"],
                             "" if record["time_s"] is None else record["time_s"], record["width"], record["height"],
                             class_id, classes.name(class_id), pixels, percent]
                            + ["" if column[class_id] is None else column[class_id] for column in celsius])
    return buffer.getvalue()
