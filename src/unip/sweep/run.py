"""``unip sweep run``: every cell of a sweep as its own ``unip finetune`` process, one per device slot.

Each job (a cell, or the ``unip analyze`` of a backbone for the layer-wise plot) is a subprocess
``python -m unip.cli ...``, so that a crash or an out-of-memory in one cannot end the sweep, and so that
cells run side by side, one per GPU (``CUDA_VISIBLE_DEVICES``). The sweep:

* skips a finished job (``state.cell_finished``: a valid ``metrics.json``; ``state.analysis_finished``);
* runs every cell with ``--resume auto``, so a cell killed half-way continues from its newest state;
* goes on past a failed job and lists it at the end with the last line it printed (its one-line error);
* checks before it starts anything or creates a folder (``check_sweep``, which the dry run shares): the
  devices exist, the data sets of the cells to run are there, and no cell that holds a result or a training
  state was run with another command line than the sweep file gives now (a finished one would mix settings in
  the table, an interrupted one could never resume);
* records every job, its status, device, time and error in ``<out>/sweep.json`` (atomic writes);
* holds the folder's lock (``unip.run_lock``) while it runs (a second sweep on the same folder stops at once);
  its children die with it (Linux: ``PR_SET_PDEATHSIG``), so a killed sweep leaves no cell writing behind its back.

The NMI profiles (``unip analyze``) run after the cells, once per backbone, when the layer-wise protocol is
present: of the pre-trained source as it is, or, for a randomly initialised backbone, of the frozen backbone
stored in one of its finished probe cells (exactly the weights that were probed).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import unip
from unip.data.datasets import check_structure
from unip.errors import CheckpointError, ConfigError, DataError
from unip.optional import require
from unip.run_lock import hold
from unip.seg.results import METRICS_FILE, read_metrics
from unip.seg.train import SEGMENTOR_FILE
from unip.sweep.cost import CellCost, CostModel
from unip.sweep.slurm import (POLL_SECONDS as JOB_POLL_SECONDS, SUBMITIT_DIR, CellCommand, SlurmSettings, active_job,
                              job_command, sigterm_interrupts)
from unip.sweep.spec import Cell, Sweep, plan_cells
from unip.sweep.state import (ANALYSIS_DIR, CELLS_DIR, STDERR_LOG, STDOUT_LOG, analysis_finished,
                              cell_finished, cell_has_training_state, claim_sweep_folder, read_state, relative,
                              write_state)
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
    checked) here. Raises ``ConfigError`` naming the sweep file and the cell."""
    jobs = []
    for cell in plan_cells(sweep):
        folder = out / CELLS_DIR / cell.id
        try:
            cell.check()
        except ConfigError as err:  # the cell's settings come from several entries of the file: name it
            raise ConfigError(f"{sweep.file}: {err}") from None
        coordinates = {"backbone": cell.backbone.name, "dataset": cell.dataset.name, "protocol": cell.protocol,
                       "layer": cell.layer, "seed": cell.seed}
        jobs.append(Job(cell.id, "cell", folder, cell.finetune_args(str(folder)), coordinates, cell))
    return jobs


def analysis_jobs(sweep: Sweep, out: Path, cells: Sequence[Job]) -> List[Job]:
    """One ``unip analyze`` per backbone that has layer-wise cells (none without that protocol).

    A randomly initialised backbone is read from the ``segmentor.safetensors`` of its first finished probe
    cell (frozen: the probed weights); while there is none, the job is ``blocked``."""
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
    two CPU cells side by side); neither → one slot, ``auto``. Raises ``ConfigError`` naming the option
    (``check_devices`` says whether this machine has them)."""
    if gpus is not None and devices is not None:
        raise ConfigError("--gpus and --devices: give one of them")
    if gpus is not None:
        if gpus < 1:
            raise ConfigError(f"--gpus {gpus}: must be at least 1")
        slots = [f"cuda:{i}" for i in range(gpus)]
    elif devices is None:
        slots = ["auto"]
    else:
        slots = [part.strip() for part in devices.split(",")]
        bad = next((slot for slot in slots if not _DEVICE.match(slot)), None)
        if bad is not None:
            raise ConfigError(f"--devices {devices!r}: {bad!r} is not a device; use cpu, cuda, cuda:N or auto, comma-"
                              "separated (one cell runs on each at a time)")
    return slots


def check_devices(slots: Sequence[str], option: Optional[str] = None) -> None:
    """``ConfigError`` when a slot is a CUDA device this machine does not have: ``cuda`` or ``cuda:N`` without
    CUDA, or ``N`` past the last CUDA device this process sees (``CUDA_VISIBLE_DEVICES`` counts: ``_command``
    hands a cell the same device). ``option`` is how the slots were given (``--gpus 2``), for the message."""
    cuda = [slot for slot in slots if slot.startswith("cuda")]
    if not cuda:
        return
    import torch

    given = option or f"devices {','.join(slots)}"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"{given}: CUDA is not available on this machine; run the cells on the CPU with --devices "
                          "cpu (or cpu,cpu: two at a time)")
    beyond = next((slot for slot in cuda if ":" in slot and int(slot.split(":", 1)[1]) >= count), None)
    if beyond is not None:
        last = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ConfigError(f"{given}: there is no {beyond} on this machine, it has {count} CUDA device(s) ({last}); "
                          f"use --gpus {count} or fewer, or --devices with indices below {count}")


# ============================================================================================ dry run
@dataclass
class PlannedJob:
    """A job as the dry run shows it: whether it is already finished, and its estimated cost (cells)."""

    job: Job
    finished: bool
    preset: str = "-"
    cost: Optional[CellCost] = None
    changed: bool = False


def plan_sweep(sweep: Sweep, out: Path, only: Sequence[str] = (), cells: Optional[List[Job]] = None
               ) -> List[PlannedJob]:
    """The selected jobs of ``sweep`` in ``out`` with their status (a cell that ``run_sweep`` would refuse as
    changed is ``changed``: ``changed_cells``) and estimated cost; writes nothing. ``cells``: ``cell_jobs(sweep,
    out)`` when the caller has them. The dry run then calls ``check_sweep``, as ``run_sweep`` does."""
    model = CostModel()
    out = claim_sweep_folder(out, in_use_ok=True)
    cells = cell_jobs(sweep, out) if cells is None else cells
    check_selection(cells + analysis_jobs(sweep, out, cells), only)
    changed = set() if sweep.unset else {job.id for job in changed_cells(cells, recorded_jobs(out))}
    planned = []
    costs: Dict[Cell, CellCost] = {}  # cells that differ in their seed alone cost the same
    for job in select(cells, only):
        assert job.cell is not None
        key = dataclasses.replace(job.cell, seed=0)
        if key not in costs:
            costs[key] = model.cell(job.cell, job.cell.config())
        planned.append(PlannedJob(job, job.finished(), job.cell.preset, costs[key], changed=job.id in changed))
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
        status = "changed" if p.changed else "done" if p.finished else ("waits" if p.job.blocked else "to run")
        if p.cost is None:
            lines.append(f"{p.job.id:<{width}}  {status:<8}  {'(unip analyze)':<14}")
            continue
        lines.append(f"{p.job.id:<{width}}  {status:<8}  {p.preset:<14} {p.cost.iterations:>7,} {p.cost.images:>10,} "
                     f"{p.cost.gflops_per_image:>10.1f} {flop_text(p.cost.pflops * 1e15):>11}")
    changed = sum(1 for p in planned if p.changed)
    todo = [p for p in planned if not p.finished and not p.changed]
    cells = [p for p in todo if p.cost is not None]
    total = sum(p.cost.pflops for p in cells if p.cost)
    images = sum(p.cost.images for p in cells if p.cost)
    done = len(planned) - len(todo) - changed
    lines.append(f"{len(planned)} job(s), {done} done{f', {changed} changed' if changed else ''}; to run: "
                 f"{len(cells)} cell(s) ({images:,} training images, {flop_text(total * 1e15)} estimated for "
                 f"training, evaluations not counted) and {len(todo) - len(cells)} analysis job(s)")
    return "\n".join(lines)


# ============================================================================================ checks
def check_sweep(sweep: Sweep, out: Path, devices: Sequence[str] = ("auto",), only: Sequence[str] = (),
                cells: Optional[List[Job]] = None, devices_option: Optional[str] = None) -> List[Job]:
    """What ``run_sweep`` checks before it starts a job or creates a folder, and the dry run after its table
    (so that both stop alike): ``out`` is a sweep folder, every ``--only`` pattern matches, the ``devices``
    exist (when a selected job is left to run), no cell ran with other settings (``check_unchanged``), and the
    data sets and analysis images that the selected unfinished jobs read are there (``check_data``). With
    variables unset (a dry run), the checks that need their values are skipped. ``cells``: ``cell_jobs(sweep,
    out)`` when the caller has them; ``devices_option``: how the devices were given (``--gpus 2``), for the
    message.

    Returns the cell jobs; raises ``ConfigError`` or ``DataError`` with one line naming what to fix."""
    out = claim_sweep_folder(out, in_use_ok=True)  # run_sweep checked (and then holds) the lock
    cells = cell_jobs(sweep, out) if cells is None else cells
    jobs = cells + analysis_jobs(sweep, out, cells)
    check_selection(jobs, only)
    pending = [job for job in select(jobs, only) if not job.finished()]
    if pending:  # a finished sweep reruns (its report, say) on a machine without the devices it ran on
        check_devices(devices, devices_option)
    if not sweep.unset:
        check_unchanged(out, cells, recorded_jobs(out))
        check_data(sweep, pending)
    return cells


def recorded_jobs(out: Path) -> Dict[str, Any]:
    """``sweep.json``'s record per job id (empty for a new folder); ``ConfigError`` when it is damaged."""
    return dict((read_state(out) or {}).get("jobs", {}))


def changed_cells(cells: Sequence[Job], records: Mapping[str, Any]) -> List[Job]:
    """The cells that were run with another command line than they would run with now (``records``: the
    recorded jobs of ``sweep.json``) and hold what a rerun would not redo: a result (the sweep skips it) or a
    training state (``--resume auto`` continues it, and ``unip finetune`` refuses other settings)."""
    changed = []
    for job in cells:
        record = records.get(job.id)
        args = record.get("args") if isinstance(record, dict) else None
        if isinstance(args, list) and _comparable(args) != _comparable(job.args) and (
                job.finished() or cell_has_training_state(job.folder)):
            changed.append(job)
    return changed


def check_unchanged(out: Path, cells: Sequence[Job], records: Mapping[str, Any]) -> None:
    """``ConfigError`` when some of ``cells`` are ``changed_cells``: one line with how many, the first with its
    old and new arguments, and what to do."""
    changed = changed_cells(cells, records)
    if not changed:
        return
    first = changed[0]
    before, now = _comparable(records[first.id]["args"]), _comparable(first.args)
    was = " ".join(arg for arg in before if arg not in now) or "-"
    becomes = " ".join(arg for arg in now if arg not in before) or "-"
    finished = sum(1 for job in changed if job.finished())
    raise ConfigError(
        f"{out}: {len(changed)} cell(s) ran with other settings than the sweep file gives now ({finished} "
        f"finished, {len(changed) - finished} stopped part-way with a training state), e.g. {first.id} (ran with: "
        f"{was[:150]}; now: {becomes[:150]}); restore those settings, use a new --out, or delete those cells' "
        f"folders (e.g. {first.folder}) to run them again from the start")


def check_data(sweep: Sweep, jobs: Sequence[Job]) -> None:
    """``DataError`` when a data set that a cell of ``jobs`` trains on is missing or not a segmentation data set
    of its layout, or when an analysis job of ``jobs`` has no ``analysis.images`` folder; ``CheckpointError``
    when the checkpoint file a job's backbone comes from is missing. Quick: folders, split files
    (``unip.data.datasets.check_structure``) and file existence, nothing is read."""
    check_backbone_files(sweep, jobs)
    checked = set()
    for job in jobs:
        if job.cell is None or job.cell.dataset.root in checked:
            continue
        dataset = job.cell.dataset
        checked.add(dataset.root)
        try:
            check_structure(dataset.root, dataset.layout)
        except DataError as err:
            raise DataError(f"{sweep.file}: data set {dataset.name!r} (layout {dataset.layout}): {one_line(str(err))}"
                            f"; {_path_fix(sweep, dataset.root, 'its root')}") from None
    analysis = sweep.analysis
    if analysis is not None and any(job.kind == "analysis" for job in jobs) and not os.path.isdir(analysis.images):
        raise DataError(f"{sweep.file}: analysis.images {analysis.images}: image folder not found (unip analyze "
                        f"profiles the backbones on it); {_path_fix(sweep, analysis.images, 'analysis.images')}")


def check_backbone_files(sweep: Sweep, jobs: Sequence[Job]) -> None:
    """``CheckpointError`` when a backbone of ``jobs`` names a checkpoint file (``source: FILE`` or
    ``timm:NAME@FILE``) that is not there: before any cell starts, not in every cell that would load it."""
    names = {job.coordinates.get("backbone") for job in jobs}
    for backbone in sweep.backbones:
        if backbone.name not in names or backbone.random_init:
            continue
        source = backbone.source
        path = source.partition("@")[2] if source.startswith("timm:") else source  # timm:NAME downloads
        if path and not os.path.isfile(path):
            raise CheckpointError(f"{sweep.file}: backbone {backbone.name!r}: {path}: checkpoint file not found; "
                                  f"{_path_fix(sweep, os.path.abspath(path), 'its source')}")


def _path_fix(sweep: Sweep, path: str, entry: str) -> str:
    """How to point the sweep at the right folder: the ``--var`` that ``path`` comes from, else the entry."""
    sources = [(len(folder), name, value) for name, value in sweep.variables.items() if value
               for folder in [os.path.abspath(os.path.expanduser(value))]
               if os.path.commonpath([path, folder]) == folder]
    if sources:
        _, name, value = max(sources)
        return f"pass the right folder with --var {name}=DIR (now {value})"
    return f"fix {entry} in the sweep file"


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


def run_sweep(sweep: Sweep, out: Path, devices: Sequence[str] = ("auto",), only: Sequence[str] = (),
              devices_option: Optional[str] = None, slurm: Optional[SlurmSettings] = None) -> SweepRun:
    """Run the selected jobs of ``sweep`` in the sweep folder ``out`` (module docstring) on the device slots
    ``devices`` (``parse_devices``), or each as a cluster job with ``slurm`` (``unip.sweep.slurm``); returns a
    ``SweepRun``. Raises ``ConfigError`` or ``DataError`` before anything runs or any folder is created when a
    check of ``check_sweep`` fails, and ``ConfigError`` when ``out`` is in use. SIGTERM stops the sweep as Ctrl-C
    does (its running jobs stopped, recorded as interrupted).

    ``sweep.json`` records the whole sweep (the report plans its cells from it) and a record per job that ran
    or was found finished: ``only`` narrows what runs, not what the sweep is."""
    out = claim_sweep_folder(out)
    if sweep.unset:
        raise ConfigError(f"{sweep.file}: no value for {', '.join('${' + n + '}' for n in sweep.unset)}; pass "
                          + " ".join(f"--var {n}=VALUE" for n in sweep.unset))
    if slurm is not None:
        require("submitit", "unip sweep run --launcher slurm")  # before the folder is claimed
    cells = check_sweep(sweep, out, ("auto",) if slurm else devices, only, devices_option=devices_option)
    out.mkdir(parents=True, exist_ok=True)
    with hold(str(out), "unip sweep run"), sigterm_interrupts():
        state = _State(out, sweep, read_state(out))
        result = SweepRun(out, [], {})

        def scheduler() -> "_Scheduler":
            return _Scheduler(state, list(devices), result) if slurm is None else _Submitted(state, slurm, result)
        selected = select(cells, only)
        scheduler().run(selected)
        analyses = select(analysis_jobs(sweep, out, cells), only)
        scheduler().run(analyses)
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

    def _to_run(self, jobs: Sequence[Job]) -> Deque[Job]:
        """The jobs left to run; finished ones are recorded as done (skipped), blocked ones as failed."""
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
        return queue

    def run(self, jobs: Sequence[Job]) -> None:
        queue = self._to_run(jobs)
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
        self._ended(job, code, start, offset)

    def _ended(self, job: Job, code: Optional[int], start: float, offset: int, why: str = "") -> None:
        """Record a job that ended with exit code ``code`` (None: the launcher says ``why``)."""
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
            error = _error_line(job.folder / STDERR_LOG, offset, code if code is not None else 1)
            if code is None and not error.startswith("unip "):
                error = why
            self._fail(job, record, error)

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


class _Submitted(_Scheduler):
    """Runs jobs as submitit jobs (a Slurm job array, or submitit's local executor), recording each in the state
    with its job id; waits for the jobs an earlier, killed sweep left queued or running (``slurm.active_job``)."""

    def __init__(self, state: _State, settings: SlurmSettings, result: SweepRun) -> None:
        super().__init__(state, [], result)
        self.settings = settings
        self.folder = state.out / SUBMITIT_DIR
        self.submitted: Dict[str, Tuple[Job, Any, float, int]] = {}

    def run(self, jobs: Sequence[Job]) -> None:
        queue = self._to_run(jobs)
        for job in list(queue):
            record = self.state.record(job)
            earlier = (active_job(self.settings, self.folder, str(record.get("job_id") or ""))
                       if record.get("status") in ("submitted", "running") else None)
            if earlier is not None:
                queue.remove(job)
                self.submitted[job.id] = (job, earlier, time.monotonic(), _log_size(job.folder / STDERR_LOG))
                logger.info("%s: waits for Slurm job %s of an earlier sweep", job.id, earlier.job_id)
        self.state.write()
        try:
            if queue:
                self._submit(list(queue))
            while self.submitted:
                time.sleep(JOB_POLL_SECONDS[self.settings.cluster])
                for job_id in list(self.submitted):
                    self._check(job_id)
        except BaseException:
            self._cancel_all()
            raise

    def _submit(self, jobs: List[Job]) -> None:
        executor = self.settings.executor(self.folder)
        env = _package_env()
        commands = []
        for job in jobs:
            job.folder.mkdir(parents=True, exist_ok=True)
            record = self.state.record(job)
            record.update(status="submitted", device=self.settings.cluster, started=_now(), args=job.args,
                          runs=record.get("runs", 0) + 1, error=None, finished=None, seconds=None, returncode=None)
            command = job_command(job.args, self.settings.gpus_per_job)
            header = f"# unip sweep, run {record['runs']} at {record['started']} as a {self.settings.describe()}: " \
                     f"{shlex.join(command)}\n"
            watch = os.getpid() if self.settings.cluster == "local" else None  # local jobs die with the sweep
            commands.append(CellCommand(command, env, str(job.folder / STDOUT_LOG), str(job.folder / STDERR_LOG),
                                        header, watch))
        offsets = [_log_size(job.folder / STDERR_LOG) for job in jobs]
        with executor.batch():
            handles = [executor.submit(command) for command in commands]
        for job, handle, offset in zip(jobs, handles, offsets):
            self.state.record(job).update(job_id=str(handle.job_id), launcher=self.settings.cluster)
            self.submitted[job.id] = (job, handle, time.monotonic(), offset)
        self.state.write()
        logger.info("sweep: submitted %d job(s) to %s", len(jobs), self.settings.describe())

    def _check(self, job_id: str) -> None:
        job, handle, start, offset = self.submitted[job_id]
        if not handle.done():
            return
        del self.submitted[job_id]
        code: Optional[int] = None
        why = ""
        try:
            code = int(handle.result())
        except Exception as err:  # submitit's errors: the job failed, timed out or was cancelled
            why = one_line(f"{self.settings.cluster} job {handle.job_id}: {str(err).strip().splitlines()[0]}")[:400]
        self._ended(job, code, start, offset, why)

    def _cancel_all(self) -> None:
        """Interrupted: cancel the submitted jobs (the next sweep resumes their cells), record them."""
        for job, handle, _, _ in self.submitted.values():
            with contextlib.suppress(Exception):
                handle.cancel(check=False)
            self.state.record(job).update(status="interrupted", finished=_now())
        self.submitted.clear()
        self.state.write()


def _log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _package_env() -> Dict[str, str]:
    """What a job's environment needs on top of its own: this unip first on the path, unbuffered output."""
    package_root = str(Path(unip.__file__).resolve().parents[1])
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join([package_root] + path), "PYTHONUNBUFFERED": "1"}


def _command(job: Job, device: str, slots: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """The subprocess command of ``job`` on ``device`` and its environment: the same Python and unip as this
    process, ``CUDA_VISIBLE_DEVICES`` for ``cuda:N``, CPU threads shared among CPU slots."""
    env = dict(os.environ, **_package_env())
    flag = device
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = _physical_device(int(device.split(":", 1)[1]))
        flag = "cuda"
    cpu_slots = sum(1 for slot in slots if slot == "cpu")
    if device == "cpu" and cpu_slots > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_slots))
    return [sys.executable, "-m", "unip.cli", *job.args, "--device", flag], env


def _physical_device(index: int) -> str:
    """What ``CUDA_VISIBLE_DEVICES`` gives a cell for the slot ``cuda:index``: the device that this process
    calls ``cuda:index`` (the index-th entry of its own ``CUDA_VISIBLE_DEVICES``, when that is set)."""
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and index < len(visible):
        return visible[index]
    return str(index)


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

    miou = read_metrics(job.folder / METRICS_FILE).get("mIoU")
    return f": test mIoU {miou:.2f}" if isinstance(miou, (int, float)) else ""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


__all__ = ["Job", "PlannedJob", "SweepRun", "analysis_jobs", "cell_jobs", "changed_cells", "check_backbone_files",
           "check_data", "check_devices", "check_selection", "check_sweep", "check_unchanged", "flop_text",
           "parse_devices", "plan_sweep", "plan_table", "recorded_jobs", "run_sweep", "select"]
