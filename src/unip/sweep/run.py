"""``unip sweep run``: every cell of a sweep as its own ``unip finetune`` process, one per device slot.

Each job (a cell, or the ``unip analyze`` of a backbone for the layer-wise plot) is a subprocess
``python -m unip.cli ...``, so that a crash or an out-of-memory in one cannot end the sweep, and so that
cells run side by side, one per GPU (``CUDA_VISIBLE_DEVICES``). The sweep:

* skips a finished job (``state.cell_finished``: a valid ``metrics.json``; ``state.analysis_finished``);
* runs every cell with ``--resume auto``, so a cell killed half-way continues from its newest state;
* goes on past a failed job and lists it at the end with the last line it printed (its one-line error);
* refuses to reuse a finished cell whose command line has changed since (another ``--out`` is needed);
* records every job, its status, device, time and error in ``<out>/sweep.json`` (atomic writes);
* holds ``<out>/.sweep.lock`` while it runs (a second sweep on the same folder stops at once); its children
  die with it (Linux: ``PR_SET_PDEATHSIG``), so a killed sweep leaves no cell writing behind its back.

The NMI profiles (``unip analyze``) run after the cells, once per backbone, when the layer-wise protocol is
present: of the pre-trained source as it is, or, for a randomly initialised backbone, of the frozen backbone
stored in one of its finished probe cells (exactly the weights that were probed).
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import unip
from unip.errors import ConfigError
from unip.sweep.cost import CellCost, CostModel
from unip.sweep.spec import Cell, Sweep, plan_cells
from unip.sweep.state import (ANALYSIS_DIR, CELLS_DIR, LOCK_FILE, STDERR_LOG, STDOUT_LOG, analysis_finished,
                              cell_finished, claim_sweep_folder, read_state, relative, write_state)
from unip.text import one_line

logger = logging.getLogger(__name__)

#: Seconds between two looks at the running jobs.
POLL_SECONDS = 0.2
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


# ============================================================================================ jobs
@dataclass
class Job:
    """One subprocess of the sweep: a cell (``unip finetune``) or an analysis (``unip analyze``).

    ``args`` are the ``unip`` arguments without ``--device``; ``blocked`` says why the job cannot run (then
    ``args`` is empty). ``coordinates`` is what the state file and the report know it by."""

    id: str
    kind: str
    folder: Path
    args: List[str]
    coordinates: Dict[str, Any]
    cell: Optional[Cell] = None
    blocked: Optional[str] = None

    def finished(self) -> bool:
        return cell_finished(self.folder) if self.kind == "cell" else analysis_finished(self.folder)


def cell_jobs(sweep: Sweep, out: Path) -> List[Job]:
    """The cells of ``sweep`` as jobs writing under ``out/cells/``; every cell's settings are resolved (and so
    checked) here. Raises ``ConfigError`` naming the cell."""
    jobs = []
    for cell in plan_cells(sweep):
        folder = out / CELLS_DIR / cell.id
        cell.config(str(folder))
        coordinates = {"backbone": cell.backbone.name, "dataset": cell.dataset.name, "protocol": cell.protocol,
                       "layer": cell.layer, "seed": cell.seed}
        jobs.append(Job(cell.id, "cell", folder, cell.finetune_args(str(folder)), coordinates, cell))
    return jobs


def analysis_jobs(sweep: Sweep, out: Path, cells: Sequence[Job]) -> List[Job]:
    """One ``unip analyze`` per backbone that has layer-wise cells (none without that protocol).

    A randomly initialised backbone is read from the ``segmentor.safetensors`` of its first finished probe
    cell (frozen: the probed weights); while there is none, the job is ``blocked``."""
    from unip.seg.train import SEGMENTOR_FILE

    if sweep.analysis is None:
        return []
    analysis = sweep.analysis
    jobs = []
    for backbone in sweep.backbones:
        if not any(job.cell and job.cell.backbone == backbone and job.cell.protocol == "layerwise" for job in cells):
            continue
        folder = out / ANALYSIS_DIR / backbone.slug
        source, blocked = backbone.source, None
        if backbone.random_init:
            probed = [job for job in cells if job.cell and job.cell.backbone == backbone and job.cell.probe
                      and job.finished() and (job.folder / SEGMENTOR_FILE).is_file()]
            source = str(probed[0].folder / SEGMENTOR_FILE) if probed else ""
            blocked = None if probed else (f"{backbone.name} is randomly initialised: its NMI profile is read from "
                                           "a finished probe cell's frozen backbone, and none has finished")
        args = [] if blocked else [
            "analyze", "--model", source, "--images", analysis.images, "--out", str(folder), "--num-images",
            str(analysis.num_images), "--batch-size", str(analysis.batch_size), "--norm", analysis.norm,
            "--no-progress"]
        jobs.append(Job(f"{ANALYSIS_DIR}/{backbone.slug}", "analysis", folder, args,
                        {"backbone": backbone.name, "source": source}, blocked=blocked))
    return jobs


def select(jobs: Sequence[Job], only: Sequence[str]) -> List[Job]:
    """The jobs whose id matches one of the shell patterns ``only`` (all jobs when it is empty)."""
    return [job for job in jobs if not only or any(fnmatch.fnmatchcase(job.id, pattern) for pattern in only)]


def check_selection(jobs: Sequence[Job], only: Sequence[str]) -> None:
    """``ConfigError`` when a pattern of ``--only`` matches none of ``jobs`` (a typo would run nothing)."""
    for pattern in only:
        if not any(fnmatch.fnmatchcase(job.id, pattern) for job in jobs):
            shown = ", ".join(job.id for job in jobs[:2])
            raise ConfigError(f"--only {pattern!r} matches none of the {len(jobs)} jobs (ids like {shown}); quote "
                              "the pattern, e.g. --only '*/soda/ft-*'")


def parse_devices(gpus: Optional[int] = None, devices: Optional[str] = None) -> List[str]:
    """The device slots: ``--gpus N`` → ``cuda:0`` … ``cuda:N-1``; ``--devices cuda:0,cuda:2`` (or ``cpu,cpu``:
    two CPU cells side by side); neither → one slot, ``auto``. Raises ``ConfigError``."""
    if gpus is not None and devices is not None:
        raise ConfigError("--gpus and --devices: give one of them")
    if gpus is not None:
        if gpus < 1:
            raise ConfigError(f"--gpus {gpus}: must be at least 1")
        return [f"cuda:{i}" for i in range(gpus)]
    if devices is None:
        return ["auto"]
    slots = [part.strip() for part in devices.split(",")]
    bad = next((slot for slot in slots if not _DEVICE.match(slot)), None)
    if bad is not None:
        raise ConfigError(f"--devices {devices!r}: {bad!r} is not a device; use cpu, cuda, cuda:N or auto, comma-"
                          "separated (one cell runs on each at a time)")
    return slots


# ============================================================================================ dry run
@dataclass
class PlannedJob:
    """A job as the dry run shows it: whether it is already finished, and its estimated cost (cells)."""

    job: Job
    finished: bool
    preset: str = "-"
    cost: Optional[CellCost] = None


def plan_sweep(sweep: Sweep, out: Path, only: Sequence[str] = ()) -> List[PlannedJob]:
    """The selected jobs of ``sweep`` in ``out`` with their status and estimated cost; writes nothing."""
    model = CostModel()
    cells = cell_jobs(sweep, out)
    check_selection(cells + analysis_jobs(sweep, out, cells), only)
    planned = []
    for job in select(cells, only):
        assert job.cell is not None
        planned.append(PlannedJob(job, job.finished(), job.cell.preset, model.cell(job.cell, job.cell.config())))
    planned += [PlannedJob(job, job.finished()) for job in select(analysis_jobs(sweep, out, cells), only)]
    return planned


def plan_table(planned: Sequence[PlannedJob]) -> str:
    """The dry run's table: one line per job (preset, iterations, training images, GFLOPs per image,
    PFLOPs), then the totals of what is left to run."""
    width = max([4] + [len(p.job.id) for p in planned])
    lines = [f"{'job':<{width}}  {'status':<8}  {'preset':<14} {'iters':>7} {'images':>10} {'GFLOP/img':>10} "
             f"{'training':>11}"]
    for p in planned:
        # a random-init backbone's analysis reads a probe cell's file: it waits for the cells
        status = "done" if p.finished else ("waits" if p.job.blocked else "to run")
        if p.cost is None:
            lines.append(f"{p.job.id:<{width}}  {status:<8}  {'(unip analyze)':<14}")
            continue
        lines.append(f"{p.job.id:<{width}}  {status:<8}  {p.preset:<14} {p.cost.iterations:>7,} {p.cost.images:>10,} "
                     f"{p.cost.gflops_per_image:>10.1f} {flop_text(p.cost.pflops * 1e15):>11}")
    todo = [p for p in planned if not p.finished]
    cells = [p for p in todo if p.cost is not None]
    total = sum(p.cost.pflops for p in cells if p.cost)
    images = sum(p.cost.images for p in cells if p.cost)
    lines.append(f"{len(planned)} job(s), {len(planned) - len(todo)} done; to run: {len(cells)} cell(s) "
                 f"({images:,} training images, {flop_text(total * 1e15)} estimated for training, evaluations not "
                 f"counted) and {len(todo) - len(cells)} analysis job(s)")
    return "\n".join(lines)


def flop_text(flops: float) -> str:
    """``2.3e16`` → ``"23.0 PFLOP"``: FLOPs with an SI prefix (G, T, P, E)."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12)):
        if flops >= scale:
            return f"{flops / scale:.1f} {prefix}FLOP"
    return f"{flops / 1e9:.1f} GFLOP"


# ============================================================================================ the run
@dataclass
class SweepRun:
    """What ``run_sweep`` did: every selected job's final status (``done``, ``failed``, ``pending``), the
    errors of the failed ones, which ran now and which were finished before."""

    out: Path
    jobs: List[Job]
    status: Dict[str, str]
    errors: Dict[str, str] = field(default_factory=dict)
    ran: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)

    @property
    def failed(self) -> List[Tuple[str, str]]:
        return [(job.id, self.errors.get(job.id, "")) for job in self.jobs if self.status.get(job.id) == "failed"]


def run_sweep(sweep: Sweep, out: Path, devices: Sequence[str] = ("auto",), only: Sequence[str] = ()) -> SweepRun:
    """Run the selected jobs of ``sweep`` in the sweep folder ``out`` (module docstring) on the device slots
    ``devices`` (``parse_devices``); returns a ``SweepRun``. Raises ``ConfigError`` before anything runs when
    ``out`` is not a sweep folder, is in use, or holds finished cells of other settings.

    ``sweep.json`` records the whole sweep (the report plans its cells from it) and a record per job that ran
    or was found finished: ``only`` narrows what runs, not what the sweep is."""
    out = claim_sweep_folder(out)
    if sweep.unset:
        raise ConfigError(f"{sweep.file}: no value for {', '.join('${' + n + '}' for n in sweep.unset)}; pass "
                          + " ".join(f"--var {n}=VALUE" for n in sweep.unset))
    cells = cell_jobs(sweep, out)
    check_selection(cells + analysis_jobs(sweep, out, cells), only)
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        state = _State(out, sweep, read_state(out))
        state.check_unchanged(cells)
        result = SweepRun(out, [], {})
        selected = select(cells, only)
        _Scheduler(state, list(devices), result).run(selected)
        analyses = select(analysis_jobs(sweep, out, cells), only)
        _Scheduler(state, list(devices), result).run(analyses)
        result.jobs = selected + analyses
    return result


class _State:
    """``sweep.json`` in memory: the sweep as read and a record per job; every change is written at once."""

    def __init__(self, out: Path, sweep: Sweep, previous: Optional[Dict[str, Any]]) -> None:
        self.out = out
        self.document: Dict[str, Any] = {"sweep": sweep.to_dict(), "jobs": dict((previous or {}).get("jobs", {}))}

    def record(self, job: Job) -> Dict[str, Any]:
        entry = self.document["jobs"].setdefault(job.id, {"runs": 0})
        entry.update(kind=job.kind, folder=relative(job.folder, self.out), **job.coordinates)
        return entry

    def check_unchanged(self, cells: Sequence[Job]) -> None:
        """``ConfigError`` when a finished cell was run with another command line than the sweep asks now."""
        changed = [job for job in cells if job.finished() and "args" in self.document["jobs"].get(job.id, {})
                   and _comparable(self.document["jobs"][job.id]["args"]) != _comparable(job.args)]
        if changed:
            before = _comparable(self.document["jobs"][changed[0].id]["args"])
            now = _comparable(changed[0].args)
            was = " ".join(arg for arg in before if arg not in now) or "-"
            becomes = " ".join(arg for arg in now if arg not in before) or "-"
            raise ConfigError(f"{self.out}: {len(changed)} finished cell(s) ran with other settings than the sweep "
                              f"file gives now, e.g. {changed[0].id} (ran with: {was[:150]}; now: {becomes[:150]}); "
                              "use a new --out, or remove those cell folders to run them again")

    def write(self) -> None:
        self.document["updated"] = _now()
        write_state(self.out, self.document)


def _comparable(args: Sequence[str]) -> List[str]:
    """A cell's command line without its ``--out`` folder (the sweep folder may have moved)."""
    args = list(args)
    if "--out" in args:
        at = args.index("--out")
        del args[at:at + 2]
    return args


class _Scheduler:
    """Runs jobs as subprocesses, one per device slot at a time, recording each in the state."""

    def __init__(self, state: _State, slots: List[str], result: SweepRun) -> None:
        self.state, self.slots, self.result = state, slots, result
        self.running: Dict[int, Tuple[Job, subprocess.Popen, float, int]] = {}
        self.total = 0
        self.started = 0

    def run(self, jobs: Sequence[Job]) -> None:
        queue: Deque[Job] = deque()
        for job in jobs:
            record = self.state.record(job)
            if job.finished():
                record["status"] = "done"
                self.result.status[job.id] = "done"
                self.result.skipped.append(job.id)
            elif job.blocked:
                self._fail(job, record, job.blocked)
            else:
                record.setdefault("status", "pending")
                queue.append(job)
        self.total = len(queue)
        self.state.write()
        if queue:
            logger.info("sweep: %d job(s) to run on %s; %d finished before", len(queue), ", ".join(self.slots),
                        len(self.result.skipped))
        try:
            while queue or self.running:
                for slot in range(len(self.slots)):
                    if slot not in self.running and queue:
                        self._start(queue.popleft(), slot)
                time.sleep(POLL_SECONDS)
                for slot in list(self.running):
                    self._poll(slot)
        except BaseException:
            self._stop_all()
            raise

    # ---------------------------------------------------------------------------------------- one job
    def _start(self, job: Job, slot: int) -> None:
        device = self.slots[slot]
        command, env = _command(job, device, self.slots)
        job.folder.mkdir(parents=True, exist_ok=True)
        record = self.state.record(job)
        record.update(status="running", device=device, started=_now(), args=job.args, runs=record.get("runs", 0) + 1,
                      error=None, finished=None, seconds=None, returncode=None)
        self.state.write()
        stderr_path = job.folder / STDERR_LOG
        offset = stderr_path.stat().st_size if stderr_path.exists() else 0
        header = f"# unip sweep, run {record['runs']} at {record['started']} on {device}: {shlex.join(command)}\n"
        with open(job.folder / STDOUT_LOG, "a", encoding="utf-8") as stdout, \
                open(stderr_path, "a", encoding="utf-8") as stderr:
            stdout.write(header)
            stdout.flush()
            process = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
                                       preexec_fn=_die_with_parent())
        self.started += 1
        self.running[slot] = (job, process, time.monotonic(), offset)
        logger.info("[%d/%d] start %s on %s", self.started, self.total, job.id, device)

    def _poll(self, slot: int) -> None:
        job, process, start, offset = self.running[slot]
        code = process.poll()
        if code is None:
            return
        del self.running[slot]
        seconds = time.monotonic() - start
        record = self.state.record(job)
        record.update(finished=_now(), seconds=round(seconds, 1), returncode=code)
        self.result.ran.append(job.id)
        if code == 0 and job.finished():
            record.update(status="done", error=None)
            self.result.status[job.id] = "done"
            self.state.write()
            logger.info("done %s in %.0f s%s", job.id, seconds, _summary(job))
        else:
            self._fail(job, record, _error_line(job.folder / STDERR_LOG, offset, code))

    def _fail(self, job: Job, record: Dict[str, Any], error: str) -> None:
        record.update(status="failed", error=error)
        self.result.status[job.id] = "failed"
        self.result.errors[job.id] = error
        self.state.write()
        logger.info("FAILED %s: %s", job.id, error)

    def _stop_all(self) -> None:
        """Interrupted: stop the running jobs (they resume with the sweep) and record them as pending."""
        for _, process, _, _ in self.running.values():
            with contextlib.suppress(OSError):
                process.terminate()
        for job, process, _, _ in self.running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            self.state.record(job).update(status="interrupted", finished=_now())
        self.running.clear()
        self.state.write()


def _command(job: Job, device: str, slots: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """The subprocess command of ``job`` on ``device`` and its environment: the same Python and unip as this
    process, ``CUDA_VISIBLE_DEVICES`` for ``cuda:N``, CPU threads shared among CPU slots."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    package_root = str(Path(unip.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    flag = device
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        flag = "cuda"
    cpu_slots = sum(1 for slot in slots if slot == "cpu")
    if device == "cpu" and cpu_slots > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_slots))
    return [sys.executable, "-m", "unip.cli", *job.args, "--device", flag], env


def _die_with_parent() -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that makes the child die with the sweep (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``):
    a killed sweep must not leave a cell writing while a resumed one starts it again. ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it
    parent = os.getpid()

    def set_death_signal() -> None:
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before the call
            os._exit(1)

    return set_death_signal


def _error_line(stderr: Path, offset: int, code: int) -> str:
    """The one line that says why a job failed: the last ``unip ...: error`` line it printed (the CLI's error
    boundary), else its last line, else how it ended."""
    try:
        with open(stderr, "r", encoding="utf-8", errors="replace") as handle:
            handle.seek(offset)
            lines = [line.strip() for line in handle.read().splitlines() if line.strip()]
    except OSError:
        lines = []
    unip_lines = [line for line in lines if line.startswith("unip ") and ": error" in line]
    if unip_lines:
        return one_line(unip_lines[-1])[:400]
    ending = (f"killed by signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
              else f"exit code {code}")
    if code == 0:
        ending = "exit code 0 but no result file"
    return one_line(f"{ending}: {lines[-1]}" if lines else ending)[:400]


def _summary(job: Job) -> str:
    if job.kind != "cell":
        return ""
    from unip.seg.results import METRICS_FILE, read_metrics

    miou = read_metrics(job.folder / METRICS_FILE).get("mIoU")
    return f": test mIoU {miou:.2f}" if isinstance(miou, (int, float)) else ""


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold ``out/.sweep.lock`` (released by the system even when the sweep is killed)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"{out}: another unip sweep run is working in this folder ({LOCK_FILE} is held); "
                              "wait for it or stop it") from None
        yield


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


__all__ = ["Job", "PlannedJob", "SweepRun", "analysis_jobs", "cell_jobs", "check_selection", "flop_text",
           "parse_devices", "plan_sweep", "plan_table", "run_sweep", "select"]
