"""``unip sweep run --launcher slurm`` through submitit: a 3-cell sweep on submitit's local executor (the same path as
on a Slurm cluster) finishes, is SIGKILLed once its first cell has finished and resumes without redoing that cell
(its jobs died with it); the Slurm settings become submitit's parameters; a job an earlier sweep left running on the
cluster is waited for, not submitted again; options of the other launcher are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unip.cli import main
from unip.data.synth import write_soda
from unip.errors import ConfigError

from test_sweep import _env, _processes_mentioning, _run_cli

submitit = pytest.importorskip("submitit")

SWEEP = """name: three
vars: {data: null}
preset: toy
set:
  optim.iterations: 4
  optim.warmup_iterations: 1
  optim.batch_size: 2
  data.crop_size: 64
  data.scale: [256, 64]
  model.channels: 16
  run.eval_every: 0
  run.save_every_steps: 2
  run.keep_checkpoints: 1
  run.log_every: 1
seeds: [0]
backbones:                         # a quick cell, then two slowed down: the kill finds them half-way
  - {name: A, size: tiny, source: none, set: {optim.iterations: 2}}
  - {name: B, size: tiny, source: none, set: {optim.iterations: 6, debug.step_delay: 1.0}}
  - {name: C, size: tiny, source: none, set: {optim.iterations: 6, debug.step_delay: 1.0}}
datasets:
  - {name: synth, root: "${data}", layout: soda}
protocols:
  ft: {}
"""
CELLS = [f"{backbone}/synth/ft-seed0" for backbone in "abc"]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm_sweep")
    write_soda(str(root / "data"), 6, 2, size=(96, 64), seed=0)
    path = root / "three.yaml"
    path.write_text(SWEEP)
    return path


def test_a_killed_submitit_sweep_resumes_without_redoing_finished_cells(sweep_file):
    out = sweep_file.parent / "out"
    argv = ["sweep", "run", str(sweep_file), "--out", str(out), "--var", f"data={sweep_file.parent / 'data'}",
            "--launcher", "submitit-local"]
    env = dict(_env(), OMP_NUM_THREADS="1")
    log = sweep_file.parent / "first-run.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "unip.cli", *argv], stdout=handle,
                                   stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 400
    while not list(out.glob("cells/*/*/*/metrics.json")):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no cell finished in 400 s: " + log.read_text()
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = json.loads((out / "sweep.json").read_text())["jobs"]
    assert all(record["launcher"] == "local" and record["job_id"] for record in killed.values())
    finished = {str(p.parent.relative_to(out / "cells")): p.stat().st_mtime_ns
                for p in out.glob("cells/*/*/*/metrics.json")}
    orphans = []
    for _ in range(40):  # the local executor's jobs watch the sweep and stop their cell when it is gone
        orphans = [pid for pid in _processes_mentioning(str(out / "cells")) if pid != os.getpid()]
        if not orphans:
            break
        time.sleep(0.25)
    assert not orphans, "cells outlived the killed sweep"

    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        code, stdout, stderr = _run_cli(argv)
    finally:
        del os.environ["OMP_NUM_THREADS"]
    assert code == 0, stderr[-2000:]
    assert "3 of 3 job(s) finished" in stdout and f"({3 - len(finished)} run now, {len(finished)} before)" in stdout
    jobs = json.loads((out / "sweep.json").read_text())["jobs"]
    assert sorted(jobs) == CELLS and all(jobs[cell]["status"] == "done" for cell in CELLS)
    for cell, mtime in finished.items():  # untouched, submitted once
        assert (out / "cells" / cell / "metrics.json").stat().st_mtime_ns == mtime
        assert jobs[cell]["runs"] == 1 and jobs[cell]["job_id"] == killed[cell]["job_id"]
    for cell in set(CELLS) - set(finished):
        assert jobs[cell]["runs"] == 2 and jobs[cell]["job_id"] != killed[cell]["job_id"]
    assert (out / "slurm").is_dir()
    assert _run_cli(argv)[1].count("run now") == 1 and "(0 run now, 3 before)" in _run_cli(argv)[1]


def test_slurm_settings_become_submitit_parameters(tmp_path, monkeypatch):
    from unip.sweep.slurm import SlurmSettings, job_command, parse_options, parse_time

    bin_dir = tmp_path / "bin"  # submitit's Slurm executor looks for srun; nothing is submitted here
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert [parse_time(t) for t in ("90", "2:30:00", "1-00:00", "0:00:30")] == [90, 150, 1440, 1]
    for bad in ("soon", "0", "1:2:3:4"):
        with pytest.raises(ConfigError, match="--slurm-time"):
            parse_time(bad)
    assert parse_options(["constraint=h100", "--qos=high"]) == {"constraint": "h100", "qos": "high"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(["h100"])
    settings = SlurmSettings(partition="gpu", account="lab", time_min=600, gpus_per_job=2, cpus_per_job=16,
                             mem="64G", max_parallel=8, options={"constraint": "h100"})
    executor = settings.executor(tmp_path)
    parameters = executor._executor.parameters
    assert parameters["partition"] == "gpu" and parameters["account"] == "lab" and parameters["mem"] == "64G"
    assert parameters["time"] == 600 and parameters["gpus_per_node"] == 2 and parameters["cpus_per_task"] == 16
    assert parameters["array_parallelism"] == 8 and parameters["additional_parameters"] == {"constraint": "h100"}
    assert job_command(["finetune", "x"], 2)[1:5] == ["-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node=2"]
    assert job_command(["finetune", "x"], 1)[-2:] == ["--device", "cuda"]
    assert job_command(["finetune", "x"], 0)[-2:] == ["--device", "cpu"]


def test_a_job_left_running_by_a_killed_sweep_is_waited_for(sweep_file, monkeypatch, tmp_path):
    """A record says cell a/synth/ft-seed0 was submitted as Slurm job 77 and Slurm still runs it: the resumed sweep
    submits the other two and waits for job 77 (whose cell then finishes), instead of submitting it again."""
    import unip.sweep.run as run
    from unip.sweep import read_sweep
    from unip.sweep.slurm import SlurmSettings
    from unip.sweep.state import write_state

    out = tmp_path / "out"
    (out / "cells" / CELLS[0]).mkdir(parents=True)
    write_state(out, {"jobs": {CELLS[0]: {"status": "running", "job_id": "77", "launcher": "slurm", "runs": 1}}})
    submitted = []

    class Finished:
        job_id = "77"

        def done(self):
            (out / "cells" / CELLS[0] / "metrics.json").write_text(json.dumps({"format": "unip-segmentation-metrics"}))
            return True

        def result(self):
            return 0

    class Executor:
        def batch(self):
            import contextlib
            return contextlib.nullcontext()

        def submit(self, command):
            submitted.append(command)
            (Path(command.stdout).parent / "metrics.json").write_text(json.dumps({"format":
                                                                                   "unip-segmentation-metrics"}))
            return type("Job", (), {"job_id": str(100 + len(submitted)), "done": lambda self: True,
                                    "result": lambda self: 0})()

    monkeypatch.setattr(run, "active_job", lambda settings, folder, job_id: Finished() if job_id == "77" else None)
    monkeypatch.setattr(SlurmSettings, "executor", lambda self, folder: Executor())
    monkeypatch.setattr(run, "JOB_POLL_SECONDS", {"slurm": 0.0, "local": 0.0})
    sweep = read_sweep(str(sweep_file), {"data": str(sweep_file.parent / "data")})
    result = run.run_sweep(sweep, out, slurm=SlurmSettings())
    assert [str(Path(c.stdout).parent.relative_to(out / "cells")) for c in submitted] == CELLS[1:]
    jobs = json.loads((out / "sweep.json").read_text())["jobs"]
    assert jobs[CELLS[0]]["job_id"] == "77" and jobs[CELLS[0]]["runs"] == 1 and jobs[CELLS[0]]["status"] == "done"
    assert [jobs[c]["job_id"] for c in CELLS[1:]] == ["101", "102"] and result.status == dict.fromkeys(CELLS, "done")


@pytest.mark.parametrize("extra, message", [
    (["--launcher", "slurm", "--gpus", "2"], "--gpus and --devices place cells on this machine"),
    (["--slurm-partition", "gpu"], "--slurm-partition is an option of --launcher slurm"),
    (["--launcher", "slurm", "--slurm-time", "tomorrow"], "--slurm-time 'tomorrow'"),
    (["--launcher", "slurm", "--slurm-option", "h100"], "--slurm-option 'h100': give KEY=VALUE"),
])
def test_options_of_the_other_launcher_are_refused(sweep_file, tmp_path, capsys, extra, message):
    code = main(["sweep", "run", str(sweep_file), "--out", str(tmp_path / "o"), "--var", "data=x", *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()
