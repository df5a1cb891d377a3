"""``unip sweep run --launcher slurm``: every job of a sweep (a cell, an NMI profile) as one job of a cluster
scheduler, through submitit.

The sweep process (on a login node, say) plans and checks the sweep as ``unip sweep run`` always does, holds the
sweep folder's lock and ``sweep.json``, submits the jobs still to run as one job array, and waits for them. Each
job runs exactly the command line the local launcher would run in a subprocess (``python -m unip.cli finetune ...
--resume auto --device cuda``, with ``torchrun`` when a job has several GPUs), from the same Python and unip (the
cluster's nodes must see them, and the sweep folder, on a shared file system), writing the same cell folder and
its ``sweep-stdout.log`` / ``sweep-stderr.log``. Where the jobs run (partition, account, time, GPUs, CPUs, memory,
any other ``sbatch`` option) comes from :class:`SlurmSettings`, i.e. the command line: the sweep file says what
to run, the command line where (as ``--gpus`` / ``--devices`` do for the local launcher).

Resuming is as for the local launcher: finished cells (their ``metrics.json``) are skipped, the others run with
``--resume auto``. Ctrl-C (or SIGTERM) of the sweep cancels its jobs and records them as ``interrupted``. A sweep
killed outright (SIGKILL, a lost login session) leaves its Slurm jobs running; ``sweep.json`` records their ids,
and the next ``unip sweep run`` of the folder waits for those still queued or running instead of submitting them
again. ``cluster="local"`` (``--launcher submitit-local``) runs the same path through submitit's local executor on
this machine (to try a cluster sweep out, and in the tests); its jobs die with the sweep, as local cells do.

submitit's own files (each job's pickled call, its logs and result) go to ``<sweep folder>/slurm/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from unip.errors import ConfigError
from unip.optional import require

logger = logging.getLogger(__name__)

SUBMITIT_DIR = "slurm"
LAUNCHERS: Tuple[str, ...] = ("local", "slurm", "submitit-local")
#: Slurm job states in which a recorded job is still going to finish on its own (the next sweep waits for it).
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")
#: Seconds between two looks at the submitted jobs (submitit asks Slurm itself at most every few seconds).
POLL_SECONDS = {"slurm": 5.0, "local": 0.2}
DEFAULT_TIME_MIN = 12 * 60
_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?$")


@dataclass(frozen=True)
class SlurmSettings:
    """Where each job of the sweep runs. ``cluster``: ``slurm`` or ``local`` (submitit's local executor);
    ``time_min``: the job's time limit in minutes; ``mem``: Slurm's ``--mem`` (``64G``; None: the partition's
    default); ``max_parallel``: jobs of the array running at once (None: as many as Slurm allows); ``options``:
    any other ``sbatch`` option (``{"constraint": "h100", "qos": "high"}``)."""

    cluster: str = "slurm"
    partition: Optional[str] = None
    account: Optional[str] = None
    time_min: int = DEFAULT_TIME_MIN
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    mem: Optional[str] = None
    max_parallel: Optional[int] = None
    options: Mapping[str, str] = field(default_factory=dict)

    def executor(self, folder: Path) -> Any:
        """A submitit ``AutoExecutor`` writing to ``folder`` with these settings."""
        submitit = require("submitit", "unip sweep run --launcher slurm")
        executor = submitit.AutoExecutor(folder=str(folder), cluster=self.cluster)
        parameters: Dict[str, Any] = {"name": "unip-sweep", "timeout_min": self.time_min, "nodes": 1,
                                      "tasks_per_node": 1, "gpus_per_node": self.gpus_per_job,
                                      "cpus_per_task": self.cpus_per_job}
        if self.cluster == "slurm":
            slurm = {"partition": self.partition, "account": self.account, "mem": self.mem,
                     "array_parallelism": self.max_parallel}
            parameters.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
            if self.options:
                parameters["slurm_additional_parameters"] = dict(self.options)
        executor.update_parameters(**parameters)
        return executor

    def describe(self) -> str:
        """``slurm (partition gpu, 1 GPU, 8 CPUs, 12:00:00 per job)``."""
        where = [f"partition {self.partition}"] if self.partition else []
        where += [f"{self.gpus_per_job} GPU{'s' if self.gpus_per_job != 1 else ''}", f"{self.cpus_per_job} CPUs",
                  f"{self.time_min // 60}:{self.time_min % 60:02d}:00"]
        name = "submitit's local executor" if self.cluster == "local" else "slurm"
        return f"{name} ({', '.join(where)} per job)"


def parse_time(text: str, option: str = "--slurm-time") -> int:
    """Minutes of a Slurm time: ``90`` (minutes), ``H:MM``, ``H:MM:SS`` or ``D-HH:MM[:SS]`` (seconds rounded up).
    Raises ``ConfigError`` naming ``option``."""
    text = text.strip()
    if text.isdigit():
        minutes = int(text)
    else:
        match = _TIME.match(text)
        if not match:
            raise ConfigError(f"{option} {text!r}: give minutes (720) or Slurm's H:MM:SS (12:00:00) or D-HH:MM:SS")
        days, hours, mins, secs = (int(g) if g else 0 for g in match.groups())
        minutes = days * 1440 + hours * 60 + mins + (1 if secs else 0)
    if minutes < 1:
        raise ConfigError(f"{option} {text!r}: a job needs at least one minute")
    return minutes


def parse_options(pairs: Sequence[str], option: str = "--slurm-option") -> Dict[str, str]:
    """``["constraint=h100", "qos=high"]`` → ``{"constraint": "h100", "qos": "high"}``; ``ConfigError`` for a
    pair without ``=`` or a key that is not an ``sbatch`` option name."""
    options: Dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not equals or not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            raise ConfigError(f"{option} {pair!r}: give KEY=VALUE with an sbatch option as KEY, e.g. "
                              f"{option} constraint=h100")
        options[key] = value.strip()
    return options


# ============================================================================================ one job
class CellCommand:
    """What a submitted job runs (pickled by submitit): ``command`` with ``extra_env`` over the job's own
    environment, its output appended to ``stdout`` / ``stderr`` (the cell folder's logs, after ``header``);
    returns the exit code. With ``watch_pid``, the command is stopped when that process (the sweep) ends."""

    def __init__(self, command: List[str], extra_env: Dict[str, str], stdout: str, stderr: str, header: str,
                 watch_pid: Optional[int] = None) -> None:
        self.command, self.extra_env = command, extra_env
        self.stdout, self.stderr, self.header = stdout, stderr, header
        self.watch_pid = watch_pid

    def __call__(self) -> int:
        env = dict(os.environ, **self.extra_env)
        with open(self.stdout, "a", encoding="utf-8") as out, open(self.stderr, "a", encoding="utf-8") as err:
            out.write(self.header)
            out.flush()
            process = subprocess.Popen(self.command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
            if self.watch_pid is not None:
                threading.Thread(target=_stop_when_gone, args=(self.watch_pid, process), daemon=True).start()
            try:
                return process.wait()
            except BaseException:  # the job is cancelled or times out: stop the cell with it
                process.terminate()
                process.wait()
                raise


def _stop_when_gone(pid: int, process: "subprocess.Popen[bytes]") -> None:
    while process.poll() is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            process.terminate()
            return
        except PermissionError:  # alive, another user's (cannot happen for our own parent, but harmless)
            pass
        time.sleep(0.5)


def job_command(args: Sequence[str], gpus: int) -> List[str]:
    """The command of a job: ``python -m unip.cli ARGS --device cuda`` (``cpu`` without GPUs), under
    ``torch.distributed.run`` (torchrun, one process per GPU) when the job has more than one GPU."""
    device = ["--device", "cuda" if gpus >= 1 else "cpu"]
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                "-m", "unip.cli", *args, *device]
    return [sys.executable, "-m", "unip.cli", *args, *device]


def active_job(settings: SlurmSettings, folder: Path, job_id: str) -> Optional[Any]:
    """The submitit job ``job_id`` of an earlier sweep when Slurm still has it queued or running (the next sweep
    waits for it instead of submitting the cell again), else None. Local-executor jobs died with their sweep."""
    if settings.cluster != "slurm" or not job_id:
        return None
    submitit = require("submitit", "unip sweep run --launcher slurm")
    job = submitit.SlurmJob(folder=str(folder), job_id=str(job_id))
    try:
        state = str(job.state).upper()
    except Exception as err:  # sacct unreachable: submit again (the cell's lock keeps two runs apart)
        logger.info("could not ask Slurm about job %s (%s)", job_id, err)
        return None
    return job if state.split()[0] in ACTIVE_STATES else None


@contextlib.contextmanager
def sigterm_interrupts() -> Any:
    """Within the block SIGTERM (``kill``, ``scancel`` of a sweep run as a job) stops the sweep as Ctrl-C does:
    its jobs are stopped or cancelled and recorded as interrupted. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


__all__ = ["ACTIVE_STATES", "LAUNCHERS", "SUBMITIT_DIR", "CellCommand", "SlurmSettings", "active_job",
           "job_command", "parse_options", "parse_time", "sigterm_interrupts"]
