"""``unip demo``: the whole UNIP pipeline at toy scale, offline, on a CPU, through the real CLI.

Generated infrared scenes (unlabeled and labeled) → a teacher (made offline and cached: no weights can be
downloaded here) → its attention profile and hybrid layer (``unip analyze``) → NMI-HAD distillation into a small
student (``unip pretrain --teacher-layer auto``) → LL-FPN + UperNet fine-tuning of the distilled student and, with
the same schedule and seed, of the same student from its random initial weights (``unip finetune``) → evaluation
(``unip evaluate``) → predictions (``unip predict``) → one summary (table, JSON, Markdown, figure).

Every stage reports the command it runs (the demo doubles as a tour) and its time through ``say``: the CLI passes
``print``; called as a library without one, the demo logs (logger ``unip.demo``). A stage's failure stops the
demo with that stage's error (``UnipError``); the CLI turns it into one line.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from unip.checkpoint import is_our_checkpoint, load_model, save_checkpoint
from unip.data.layouts import SODA_IMAGE_DIR, SODA_SPLITS
from unip.demo.cache import CachedTeacher, cache_root, find_teacher, store_teacher
from unip.demo.settings import FAST, FULL, DemoSettings
from unip.demo.summary import SUMMARY_TITLE, build_summary, read_profile, write_summary
from unip.distill.train import DEFAULTS as PRETRAIN_DEFAULTS
from unip.engine.logging import LOG_FILE, RECORD_KEYS
from unip.engine.run_folder import CONFIG_FILE, RUN_FOLDERS
from unip.errors import ConfigError, UnipError
from unip.models import create_model
from unip.outputs import claim, is_our_json, is_our_jsonl, is_our_png, is_our_yaml, out_folder, starts_with_line
from unip.seg.train import DEFAULTS as FINETUNE_DEFAULTS

logger = logging.getLogger("unip.demo")

STAGES = 9


class Layout:
    """Where each stage writes, under the demo's ``--out``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.unlabeled, self.labeled = root / "data" / "unlabeled", root / "data" / "labeled"
        self.manifest, self.pack = root / "data" / "infmix.jsonl", root / "data" / "pack"
        self.teacher_data = root / "teacher" / "data"
        self.teacher_init, self.teacher_run = root / "teacher" / "init.safetensors", root / "teacher" / "run"
        self.analysis_teacher, self.analysis = root / "analysis_teacher", root / "analysis"
        self.student_random = root / "student_random.safetensors"
        self.pretrain = root / "pretrain"
        self.student = self.pretrain / "student.safetensors"
        self.finetune_distilled, self.finetune_random = root / "finetune_distilled", root / "finetune_random"
        self.evaluate, self.predictions = root / "evaluate", root / "predictions"
        self.summary_json, self.summary_md, self.summary_png = (root / "summary.json", root / "summary.md",
                                                                root / "summary.png")

    @staticmethod
    def best(run: Path) -> Path:
        """The best model of a fine-tuning run folder."""
        return run / "checkpoints" / "best.safetensors"


@dataclass
class Tour:
    """Runs the stages and reports them through ``say``: a numbered heading per stage, each command as a user would
    type it, its time. ``command`` runs one ``unip`` command line (without ``unip``) and returns its exit code:
    ``unip.cli.run``, which the CLI hands to ``run_demo`` (the demo sits below the CLI and never imports it)."""

    say: Callable[[str], None] = logger.info
    command: Optional[Callable[[List[str]], int]] = None
    stage_seconds: Dict[str, float] = field(default_factory=dict)
    number: int = 0
    current: str = ""
    started: float = field(default_factory=time.perf_counter)

    def stage(self, title: str) -> None:
        self._close()
        self.number += 1
        self.current = title
        self._stage_start = time.perf_counter()
        self.say(f"\n[{self.number}/{STAGES}] {title}  ({self.elapsed():.0f} s so far)")

    def unip(self, *argv: object) -> None:
        """Run ``unip ARGV`` through the CLI; its errors propagate (the demo's boundary reports them once)."""
        if self.command is None:
            raise TypeError("Tour.command is not set: pass the CLI's runner, unip.cli.run")
        args = [str(a) for a in argv]
        self.say(f"$ unip {' '.join(shlex.quote(a) for a in args)}")
        start = time.perf_counter()
        if self.command(args) != 0:
            raise UnipError(f"demo stage failed: unip {' '.join(args)}")
        self.say(f"({time.perf_counter() - start:.1f} s)")

    def python(self, line: str) -> None:
        self.say(f">>> {line}")

    def note(self, text: str) -> None:
        self.say(f"# {text}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def finish(self) -> Dict[str, float]:
        self._close()
        return self.stage_seconds

    def _close(self) -> None:
        if self.current:
            self.stage_seconds[self.current] = round(time.perf_counter() - self._stage_start, 1)


def run_demo(command: Callable[[List[str]], int], out: str = "demo_out", fast: bool = False, seed: int = 0,
             settings: Optional[DemoSettings] = None, say: Optional[Callable[[str], None]] = None) -> Path:
    """Run every stage into ``out`` with ``settings`` (default ``FAST`` if ``fast`` else ``FULL``), each ``unip``
    command through ``command`` (``unip.cli.run``), reporting each stage, command and the summary table through
    ``say`` (default: log them); returns the path of ``summary.json``.

    Raises ``UnipError`` (e.g. a ``ConfigError`` when ``out`` is a file or holds files of the demo's names that
    unip did not write, or when ``UNIP_CACHE`` is a file) before any work, or a stage's error."""
    settings = settings or (FAST if fast else FULL)
    paths = Layout(Path(out_folder(out, "--out")))
    claim([str(paths.student_random)], is_our_checkpoint)
    claim([str(paths.summary_json)], is_our_json(["format", "verdict"]))
    claim([str(paths.summary_md)], starts_with_line(SUMMARY_TITLE))
    claim([str(paths.summary_png)], is_our_png)
    cache = cache_root()
    paths.root.mkdir(parents=True, exist_ok=True)
    tour = Tour(say or logger.info, command)
    tour.say(f"unip demo ({settings.name}{', seed ' + str(seed) if seed else ''}): the UNIP pipeline at toy scale on "
          f"generated infrared scenes, CPU only ({torch.get_num_threads()} threads); everything goes to {paths.root}/")

    make_data(tour, paths, settings)
    teacher = get_teacher(tour, paths, settings, cache)
    heads = profile_teacher(tour, paths, settings, teacher)
    distil(tour, paths, settings, teacher, heads, seed)
    compare_attention(tour, paths, settings, teacher)
    finetune_both(tour, paths, settings, seed)
    evaluate_and_predict(tour, paths, settings)

    tour.stage("summary")
    summary = build_summary(paths, settings, teacher, seed, tour)
    tour.say("\n" + write_summary(summary, paths))
    tour.say(f"\ndemo finished in {tour.elapsed():.0f} s: everything it wrote is in {paths.root}/ "
          f"(summary: {paths.summary_md}, {paths.summary_png})")
    return paths.summary_json


# -------------------------------------------------------------------------------------------- stages
def make_data(tour: Tour, paths: Layout, settings: DemoSettings) -> None:
    size = "{}x{}".format(*settings.image_size)
    tour.stage("generated infrared scenes: unlabeled (pre-training) and labeled (fine-tuning)")
    tour.unip("data", "synth", "--out", paths.unlabeled, "--num", settings.unlabeled_per_set, "--name", "street",
              "--name", "campus", "--size", size)
    tour.unip("data", "synth", "--labeled", "--out", paths.labeled, "--num",
              settings.labeled_train + settings.labeled_test, "--num-test", settings.labeled_test, "--size", size)
    tour.unip("data", "infmix", "--infrared", paths.unlabeled, "--out", paths.manifest)
    tour.unip("data", "pack", paths.manifest, "--out", paths.pack, "--short-side", min(settings.image_size))


def get_teacher(tour: Tour, paths: Layout, settings: DemoSettings, cache: Path) -> "TeacherInfo":
    """The cached teacher, or a new one made and cached (kept in the run folder when the cache is not writable)."""
    recipe = settings.teacher
    key = recipe.key(settings.image_size)
    tour.stage("the teacher (made offline: no weights can be downloaded here)")
    found, why = find_teacher(cache, key)
    if found is not None:
        tour.note(f"reusing the demo teacher cached at {found.folder} (made {found.record.get('made')} in "
                  f"{found.record.get('seconds')} s): {recipe.describe()}")
        info = TeacherInfo(found.file, found.metrics, cached=True, made_seconds=None, entry=found)
    else:
        tour.note(f"making the demo teacher ({why}): {recipe.describe()}; it is cached for later runs")
        start = time.perf_counter()
        size = "{}x{}".format(*settings.image_size)
        tour.unip("data", "synth", "--labeled", "--out", paths.teacher_data, "--num",
                  recipe.train_images + recipe.test_images, "--num-test", recipe.test_images, "--size", size,
                  "--seed", recipe.data_seed)
        shape = dict(depth=recipe.depth, embed_dim=recipe.embed_dim, num_heads=recipe.num_heads,
                     img_size=settings.input_size)
        save_random_model(tour, "vit_small_patch16", shape, recipe.init_seed, paths.teacher_init)
        clear_earlier_run(tour, paths.teacher_run, "finetune")
        tour.unip("finetune", "demo", "--pretrained", paths.teacher_init, "--data", paths.teacher_data, "--out",
                  paths.teacher_run, "--iterations", recipe.iterations, "--set", f"optim.lr={recipe.lr}", "--seed",
                  recipe.init_seed)
        seconds = time.perf_counter() - start
        made = paths.teacher_run / "segmentor.safetensors"
        try:
            entry: Optional[CachedTeacher] = store_teacher(cache, key, recipe, settings.image_size, made,
                                                           paths.teacher_run / "metrics.json", seconds)
            tour.note(f"cached the teacher in {entry.folder}")  # type: ignore[union-attr]
        except OSError as err:
            entry = None
            tour.note(f"could not cache the teacher in {cache} ({err}); using {made} (later runs make it again)")
        file = entry.file if entry else made
        metrics = entry.metrics if entry else paths.teacher_run / "metrics.json"
        info = TeacherInfo(file, metrics, cached=False, made_seconds=round(seconds, 1), entry=entry)
    tour.unip("info", info.file)
    return info


def profile_teacher(tour: Tour, paths: Layout, settings: DemoSettings, teacher: "TeacherInfo") -> int:
    """``unip analyze`` of the teacher; returns the head count of the layer it selects (the student's last block)."""
    tour.stage("attention profile of the teacher: NMI per layer, and the hybrid layer to distil")
    tour.unip("analyze", "--model", teacher.file, "--images", analysis_images(paths), "--num-images",
              settings.analysis_images, "--out", paths.analysis_teacher)
    layer = read_profile(paths.analysis_teacher)[0]["selected_layer"]
    return load_model(teacher.file).heads_per_block[layer - 1]


def distil(tour: Tour, paths: Layout, settings: DemoSettings, teacher: "TeacherInfo", heads: int, seed: int) -> None:
    tour.stage("NMI-HAD: distil the teacher's hybrid-layer attention into the student's last block")
    tour.note("the student's random initial weights are saved first: the baseline is fine-tuned from them")
    shape = dict(depth=settings.student_depth, embed_dim=settings.student_width, num_heads=settings.student_heads,
                 last_heads=heads, img_size=settings.input_size)
    save_random_model(tour, "unip_vit_tiny_patch16", shape, seed, paths.student_random)
    clear_earlier_run(tour, paths.pretrain, "pretrain")
    tour.unip("pretrain", "demo", "--teacher", teacher.file, "--teacher-layer", "auto", "--data", paths.pack,
              "--out", paths.pretrain, "--epochs", settings.pretrain_epochs, "--seed", seed, "--set",
              f"student.init={paths.student_random}")
    tour.unip("info", paths.student)


def compare_attention(tour: Tour, paths: Layout, settings: DemoSettings, teacher: "TeacherInfo") -> None:
    tour.stage("attention of the teacher and of the student before and after distillation")
    tour.unip("analyze", "--model", teacher.file, "--model", paths.student_random, "--model", paths.student,
              "--images", analysis_images(paths), "--num-images", settings.analysis_images, "--out", paths.analysis)


def finetune_both(tour: Tour, paths: Layout, settings: DemoSettings, seed: int) -> None:
    for title, source, run in (
            ("fine-tune the distilled student: LL-FPN + UperNet on the labeled scenes", paths.student,
             paths.finetune_distilled),
            ("fine-tune the same student from its random initial weights: same schedule, same seed",
             paths.student_random, paths.finetune_random)):
        tour.stage(title)
        clear_earlier_run(tour, run, "finetune")
        tour.unip("finetune", "demo", "--pretrained", source, "--data", paths.labeled, "--out", run, "--iterations",
                  settings.finetune_iterations, "--seed", seed)


def evaluate_and_predict(tour: Tour, paths: Layout, settings: DemoSettings) -> None:
    best = paths.best(paths.finetune_distilled)
    tour.stage("evaluate the distilled student's segmentor, and predict a few test images")
    tour.unip("evaluate", "--checkpoint", best, "--data", paths.labeled, "--out", paths.evaluate)
    names = (paths.labeled / SODA_SPLITS["test"]).read_text(encoding="utf-8").split()[:settings.predict_images]
    images = [paths.labeled / SODA_IMAGE_DIR / f"{name}.jpg" for name in names]
    tour.unip("predict", "--checkpoint", best, *images, "--out", paths.predictions)


# -------------------------------------------------------------------------------------------- helpers
@dataclass
class TeacherInfo:
    """The teacher the demo used: its segmentor file (the backbone is the teacher), its test metrics, whether it
    came from the cache, how long making it took (when made in this run) and its cache entry (if any)."""

    file: Path
    metrics: Path
    cached: bool
    made_seconds: Optional[float]
    entry: Optional[CachedTeacher]


def save_random_model(tour: Tour, preset: str, shape: Dict[str, int], seed: int, path: Path) -> None:
    """Write a randomly initialised ``preset`` (seeded) as a self-describing checkpoint, reporting the Python."""
    arguments = ", ".join(f"{key}={value}" for key, value in shape.items())
    tour.python(f"torch.manual_seed({seed}); save_checkpoint(create_model({preset!r}, {arguments}), '{path}')")
    torch.manual_seed(seed)
    save_checkpoint(create_model(preset, **shape), path, {"note": "random initial weights (unip demo)"})


def clear_earlier_run(tour: Tour, run: Path, verb: str) -> None:
    """Before the demo reruns ``unip VERB`` into ``run`` (``make demo`` twice, another ``--seed``): delete the
    earlier run's training states, best model and logs, which a new run refuses to start over. Only when ``run`` is
    recognisably that verb's run folder (its config.yaml is ours); otherwise the verb's own error stands."""
    sections = list(PRETRAIN_DEFAULTS if verb == "pretrain" else FINETUNE_DEFAULTS)
    config = run / CONFIG_FILE
    if not config.is_file():
        return
    try:
        claim([str(config)], is_our_yaml(sections))
        claim([str(run / LOG_FILE)], is_our_jsonl(RECORD_KEYS))
    except ConfigError:
        return
    tour.note(f"clearing the earlier run in {run}/ ({', '.join(RUN_FOLDERS)}, {LOG_FILE})")
    for name in RUN_FOLDERS:
        folder = run / name
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
    (run / LOG_FILE).unlink(missing_ok=True)


def analysis_images(paths: Layout) -> Path:
    return paths.unlabeled / "street" / "thermal"


__all__ = ["FAST", "FULL", "Layout", "TeacherInfo", "Tour", "run_demo"]

