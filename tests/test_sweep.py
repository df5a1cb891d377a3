"""`unip sweep run` / `unip sweep report` end to end on the shipped tiny sweep (configs/sweeps/tiny.yaml: two
randomly initialised ViT-T × one generated SODA-layout set × fine-tuning, linear probing and layer-wise probing
of blocks 4 and 12, 6 steps each at 64 px), two CPU cells at a time: SIGKILL of the sweep half-way and resume
without redoing finished cells, the report's numbers against every cell's metrics.json, the FLOP counts against
the ViT's formula, the HTML in a headless browser, the dry run, a failing cell, changed settings, the lock, and
the paper's sweep file."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import unip
from unip.cli import main
from unip.data.synth import write_soda
from unip.errors import ConfigError
from unip.seg.results import read_metrics
from unip.sweep import plan_cells, read_sweep
from unip.sweep.run import Job, _command, parse_devices
from unip.sweep.spec import find_sweep

from locks import held_lock

CELLS = ["vit-t-sin-cos-random/synth/ft-seed0", "vit-t-sin-cos-random/synth/lp-seed0",
         "vit-t-sin-cos-random/synth/lp-layer04-seed0", "vit-t-sin-cos-random/synth/lp-layer12-seed0",
         "vit-t-learned-random/synth/ft-seed0", "vit-t-learned-random/synth/lp-seed0",
         "vit-t-learned-random/synth/lp-layer04-seed0", "vit-t-learned-random/synth/lp-layer12-seed0"]
ANALYSES = ["analysis/vit-t-sin-cos-random", "analysis/vit-t-learned-random"]
BACKBONES = {"ViT-T sin-cos (random)": "vit-t-sin-cos-random", "ViT-T learned (random)": "vit-t-learned-random"}


def _env():
    src = str(Path(unip.__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
                PYTHONUNBUFFERED="1")


def _run_cli(argv):
    """``unip.cli.main(argv)`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _processes_mentioning(text):
    """PIDs whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if text.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_data") / "synth"
    write_soda(str(root), 8, 4, size=(96, 64), seed=0)
    return root


@pytest.fixture(scope="module")
def swept(data, tmp_path_factory):
    """The tiny sweep run as `unip sweep run tiny --devices cpu,cpu`, SIGKILLed when its first cell has finished,
    then resumed by the same command line (in this process). Returns what the test functions check."""
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    argv = ["sweep", "run", "tiny", "--out", str(out), "--var", f"data={data}", "--devices", "cpu,cpu"]
    log = out.parent / "first-run.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "unip.cli", *argv], stdout=handle, stderr=subprocess.STDOUT,
                                   env=_env())
    deadline = time.monotonic() + 300
    while not list(out.glob("cells/*/*/*/metrics.json")):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no cell finished in 300 s: " + log.read_text()
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_state = json.loads((out / "sweep.json").read_text())
    finished = {str(p.parent.relative_to(out / "cells")): p.stat().st_mtime_ns
                for p in out.glob("cells/*/*/*/metrics.json")}
    states = {str(p.parent.parent.relative_to(out / "cells")) for p in out.glob("cells/*/*/*/checkpoints/step-*.pt")}
    orphans = []
    if sys.platform.startswith("linux"):  # its cells die with it (PR_SET_PDEATHSIG)
        for _ in range(50):
            orphans = _processes_mentioning(str(out / "cells"))
            if not orphans:
                break
            time.sleep(0.2)
    code, stdout, stderr = _run_cli(argv)
    return {"out": out, "data": data, "killed_state": killed_state, "finished": finished, "states": states,
            "orphans": orphans,
            "code": code, "stdout": stdout, "stderr": stderr, "seconds": time.perf_counter() - start}


# ============================================================================================ run and resume
def test_a_killed_sweep_resumes_without_redoing_finished_cells(swept):
    out, state = swept["out"], json.loads((swept["out"] / "sweep.json").read_text())
    assert swept["code"] == 0, swept["stdout"] + swept["stderr"]
    assert not swept["orphans"], "cells outlived the killed sweep"
    assert sorted(state["jobs"]) == sorted(CELLS + ANALYSES)
    assert all(job["status"] == "done" for job in state["jobs"].values()), state["jobs"]
    assert f"{len(swept['finished'])} finished before" in swept["stdout"]
    for cell, mtime in swept["finished"].items():  # finished before the kill: untouched, launched once
        assert (out / "cells" / cell / "metrics.json").stat().st_mtime_ns == mtime
        assert state["jobs"][cell]["runs"] == 1
        assert (out / "cells" / cell / "sweep-stdout.log").read_text().count("# unip sweep, run ") == 1
    interrupted = [cell for cell, job in swept["killed_state"]["jobs"].items()
                   if job["status"] == "running" and cell not in swept["finished"]]
    assert interrupted, "the kill should have caught a cell running"
    for cell in interrupted:  # run again, in the same folder, with --resume auto
        assert state["jobs"][cell]["runs"] == 2
        log = (out / "cells" / cell / "sweep-stdout.log").read_text()
        assert log.count("# unip sweep, run ") == 2 and "--resume auto" in log
        if cell in swept["states"]:  # it had saved a training state: it continued from it
            assert re.search(r"resumed from .*step-0+([36])\.pt at step \1\b", log), log[-3000:]
    for cell in CELLS:
        metrics = read_metrics(out / "cells" / cell / "metrics.json")
        assert metrics["split"] == "test" and metrics["step"] == 6 and metrics["model"]["backbone"]["random_init"]
        assert metrics["model"]["mode"] == {"ft": "fine-tuning", "lp": "linear probe"}.get(
            cell.split("/")[-1].split("-seed")[0], "layer-wise probe")
    layer4 = read_metrics(out / "cells" / CELLS[2] / "metrics.json")
    assert layer4["model"]["feature_layers"] == [4]
    for analysis in ANALYSES:
        profile = json.loads((out / analysis / "profile.json").read_text())
        assert len(profile["models"][0]["layers"]) == 12  # the probed (frozen) backbone's blocks
    print(f"tiny sweep with a kill and a resume: {swept['seconds']:.0f} s; interrupted {interrupted}, with a "
          f"training state {sorted(set(interrupted) & swept['states'])}")


def test_rerun_of_a_finished_sweep_runs_nothing(swept):
    code, stdout, _ = _run_cli(["sweep", "run", "tiny", "--out", str(swept["out"]), "--var", f"data={swept['data']}"])
    assert code == 0 and "0 run now, 10 before" in stdout


def test_changed_settings_of_finished_cells_are_refused(swept, tmp_path):
    document = yaml.safe_load(find_sweep("tiny").read_text())
    document["set"]["optim.iterations"] = 7
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(document))
    before = (swept["out"] / "sweep.json").read_bytes()
    code, _, stderr = _run_cli(["sweep", "run", str(changed), "--out", str(swept["out"]), "--var",
                                f"data={swept['data']}"])
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "8 cell(s) ran with other settings than the sweep file gives now (8 finished, 0 stopped" in stderr
    assert "ran with: optim.iterations=6; now: optim.iterations=7" in stderr
    assert (swept["out"] / "sweep.json").read_bytes() == before


def test_a_second_sweep_on_a_busy_folder_stops(swept):
    with held_lock(swept["out"], "unip sweep run") as pid:
        code, _, stderr = _run_cli(["sweep", "run", "tiny", "--out", str(swept["out"]), "--var",
                                    f"data={swept['data']}"])
        assert code == 2 and f"in use by unip sweep run (pid {pid} on " in stderr
        code, stdout, _ = _run_cli(["sweep", "run", "tiny", "--out", str(swept["out"]), "--var",
                                    f"data={swept['data']}", "--dry-run"])  # a look writes nothing: allowed
        assert code == 0 and "10 done" in stdout
    assert not (swept["out"] / ".unip.lock").exists()


# ============================================================================================ report
@pytest.fixture(scope="module")
def report(swept):
    code, stdout, stderr = _run_cli(["sweep", "report", str(swept["out"])])
    assert code == 0, stderr
    return swept["out"] / "report", stdout


def _metrics(out, backbone, protocol):
    return read_metrics(out / "cells" / BACKBONES[backbone] / "synth" / f"{protocol}-seed0" / "metrics.json")


def test_report_table_equals_the_cells_metrics(swept, report):
    folder, printed = report
    out = swept["out"]
    rows = list(csv.DictReader(open(folder / "table.csv")))
    assert [row["backbone"] for row in rows] == list(BACKBONES)
    markdown = (folder / "report.md").read_text()
    html = (folder / "report.html").read_text()
    for row in rows:
        for protocol in ("ft", "lp"):
            miou = _metrics(out, row["backbone"], protocol)["mIoU"]
            assert float(row[f"{protocol}_synth"]) == miou and float(row[f"{protocol}_average"]) == miou
            total = float(row["backbone_GFLOPs"]) + float(row[f"{protocol}_head_GFLOPs"])
            assert float(row[f"{protocol}_mIoU_per_GFLOP"]) == pytest.approx(miou / total, rel=1e-12)
            line = next(line for line in markdown.splitlines() if line.startswith(f"| {row['backbone']} |"))
            assert f"| {miou:.2f} |" in line and f"<td>{miou:.2f}</td>" in html
        assert row["family"].startswith("random init") and row["size"] == "tiny"
    assert printed.startswith("# unip sweep report: tiny")
    cells = {row["job"]: row for row in csv.DictReader(open(folder / "cells.csv"))}
    assert sorted(cells) == sorted(CELLS)
    for cell, row in cells.items():
        metrics = read_metrics(out / "cells" / cell / "metrics.json")
        assert row["status"] == "done"
        assert [float(row[k]) for k in ("mIoU", "mAcc", "aAcc")] == [metrics[k] for k in ("mIoU", "mAcc", "aAcc")]
    layerwise = list(csv.DictReader(open(folder / "layerwise.csv")))
    assert len(layerwise) == 4
    for row in layerwise:
        cell = f"{BACKBONES[row['backbone']]}/synth/lp-layer{int(row['block']):02d}-seed0"
        assert float(row["mIoU"]) == read_metrics(out / "cells" / cell / "metrics.json")["mIoU"]
        profile = json.loads((out / "analysis" / BACKBONES[row["backbone"]] / "profile.json").read_text())
        layer = profile["models"][0]["layers"][int(row["block"]) - 1]
        assert float(row["NMI"]) == layer["nmi"] and row["pattern"] == layer["pattern"]


def test_report_flops_follow_the_vit_formula(report):
    """Backbone GFLOPs at 512 px against the ViT's multiply-adds counted by hand (ViT-T: width 192, 12 blocks,
    1024 patches + CLS); the FT head (LL-FPN + UperNet of 32 channels) and the probe against a direct count."""
    folder, _ = report
    rows = list(csv.DictReader(open(folder / "table.csv")))
    tokens, width, depth = 1025, 192, 12
    per_block = 2 * tokens * width * (3 * width + width + 8 * width) + 2 * 2 * tokens * tokens * width
    patch_embed = 2 * 1024 * (3 * 16 * 16) * width
    expected = (depth * per_block + patch_embed) / 1e9
    for row in rows:
        assert float(row["backbone_GFLOPs"]) == pytest.approx(expected, rel=1e-9)
        assert 5.5 < float(row["params_M"]) < 5.8  # ViT-T with a 32×32 position table
        # the linear probe: one 1×1 conv from 4 × 192 channels to 21 classes on the 32×32 map
        assert float(row["lp_head_GFLOPs"]) == pytest.approx(2 * 32 * 32 * 4 * 192 * 21 / 1e9, rel=1e-9)
        assert 1.0 < float(row["ft_head_GFLOPs"]) < 10.0


def test_report_figures_and_html(report):
    folder, _ = report
    for name in ("benchmark.png", "layerwise.png"):
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.info.get("Software") == "unip" and image.width > 500
            assert len(np.unique(np.asarray(image.convert("L")))) > 20  # not blank
    html = (folder / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count('src="data:image/png;base64,') == 2
    assert not re.search(r'(src|href)="(http|//|file:)', html)  # no external asset
    assert 'id="benchmark"' in html and 'id="layerwise"' in html


def test_report_is_rewritten_in_place_and_keeps_user_files(report):
    folder, _ = report
    (folder / "notes.txt").write_text("mine")
    (folder / "table.csv").write_text("my own table\n")
    code, _, stderr = _run_cli(["sweep", "report", str(folder.parent)])
    assert code == 2 and "table.csv" in stderr and "not written by unip" in stderr
    (folder / "table.csv").unlink()
    code, _, _ = _run_cli(["sweep", "report", str(folder.parent)])
    assert code == 0 and (folder / "notes.txt").read_text() == "mine" and (folder / "table.csv").is_file()


def _browser():
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def test_html_report_renders_in_a_headless_browser(report, tmp_path):
    """Chromium loads the page from a file, offline: both tables render with their rows, both embedded
    figures decode to their PNG sizes."""
    browser = _browser()
    if browser is None:
        if os.environ.get("UNIP_REQUIRE_BROWSER"):
            pytest.fail("UNIP_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no Chromium installed (apt-get install chromium; .ci/run installs it)")
    folder, _ = report
    probe = ('<script>window.addEventListener("load", () => { document.body.dataset.images = [...document.images]'
             '.map(i => i.complete + ":" + i.naturalWidth + "x" + i.naturalHeight).join(","); '
             'document.body.dataset.tables = [...document.querySelectorAll("table")].map(t => t.id + ":" + '
             't.rows.length + ":" + Math.round(t.getBoundingClientRect().width)).join(","); });</script>')
    page = tmp_path / "report.html"
    page.write_text((folder / "report.html").read_text().replace("</body>", probe + "</body>"))
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    images = re.search(r'data-images="([^"]*)"', dom).group(1).split(",")
    sizes = []
    for name in ("benchmark.png", "layerwise.png"):
        with Image.open(folder / name) as image:
            sizes.append(f"true:{image.width}x{image.height}")
    assert images == sizes
    tables = dict((t.split(":")[0], t.split(":")[1:]) for t in re.search(r'data-tables="([^"]*)"', dom).group(1)
                  .split(","))
    assert int(tables["benchmark"][0]) == 3 and int(tables["benchmark"][1]) > 300  # header + 2 backbones
    assert int(tables["layerwise"][0]) == 3  # header + blocks 4 and 12
    assert "ViT-T learned (random)" in dom


# ============================================================================================ dry run, failures
def test_dry_run_lists_cells_with_their_cost_and_writes_nothing(data, tmp_path, swept):
    out = tmp_path / "dry"
    code, stdout, stderr = _run_cli(["sweep", "run", "tiny", "--out", str(out), "--var", f"data={data}", "--dry-run"])
    assert code == 0 and stderr == "" and not out.exists()
    lines = stdout.splitlines()
    for job in CELLS + ANALYSES:
        assert any(line.startswith(job + " ") for line in lines), job
    ft = next(line for line in lines if line.startswith(CELLS[0]))
    assert re.search(r"to run\s+toy\s+6\s+12\s+[\d.]+\s+[\d.]+ GFLOP", ft)  # 6 steps × batch 2
    assert "10 job(s), 0 done; to run: 8 cell(s) (96 training images" in stdout
    # the finished sweep: everything done; without --var the dry run still shows the cells
    code, stdout, _ = _run_cli(["sweep", "run", "tiny", "--out", str(swept["out"]), "--var", f"data={data}",
                                "--dry-run"])
    assert code == 0 and "10 job(s), 10 done" in stdout
    code, stdout, _ = _run_cli(["sweep", "run", "tiny", "--out", str(out), "--dry-run", "--only", "*/lp-layer*"])
    assert code == 0 and "not set yet: --var data=..." in stdout and not out.exists()
    assert "4 job(s), 0 done; to run: 4 cell(s)" in stdout and "lp-layer12" in stdout and "ft-seed0" not in stdout


def test_a_failing_cell_is_listed_and_the_others_complete(data, tmp_path):
    sweep = {"name": "failing", "preset": "toy",
             "set": {"optim.iterations": 2, "optim.warmup_iterations": 1, "optim.batch_size": 2, "data.crop_size": 64,
                     "data.scale": [256, 64], "model.channels": 32, "run.eval_every": 0, "run.save_every_steps": 0},
             "backbones": [{"name": "random", "size": "tiny", "source": "none"},
                           {"name": "broken", "size": "tiny", "source": str(tmp_path / "broken.pth")}],
             "datasets": [{"name": "synth", "root": str(data), "layout": "soda"}],
             "protocols": {"ft": {}}}
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")  # there (the sweep checks that), but unreadable
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = tmp_path / "out"
    code, stdout, stderr = _run_cli(["sweep", "run", str(path), "--out", str(out), "--devices", "cpu,cpu"])
    assert code == 1, stdout + stderr
    assert stderr.strip() == ("unip sweep run: 1 job(s) failed (listed above; logs in their folders); run the same "
                              "command again to retry them")
    failed = [line for line in stdout.splitlines() if line.startswith("  FAILED ")]  # the summary at the end
    assert len(failed) == 1 and "broken.pth: not a checkpoint" in failed[0]
    assert failed[0].startswith("  FAILED broken/synth/ft-seed0: unip finetune: error: ")
    assert read_metrics(out / "cells" / "random" / "synth" / "ft-seed0" / "metrics.json")["step"] == 2
    state = json.loads((out / "sweep.json").read_text())
    assert state["jobs"]["broken/synth/ft-seed0"]["status"] == "failed"
    assert "broken.pth" in state["jobs"]["broken/synth/ft-seed0"]["error"]
    assert state["jobs"]["random/synth/ft-seed0"]["status"] == "done"
    # the report lists it
    code, _, _ = _run_cli(["sweep", "report", str(out)])
    assert code == 0
    assert "broken/synth/ft-seed0" in (out / "report" / "report.md").read_text()
    assert "broken.pth" in (out / "report" / "report.html").read_text()


# ============================================================================================ what the report averages
def _hand_made_sweep(tmp_path, data, **changes):
    """A sweep file of one random-init ViT-T × data sets D1 and D2 (the same generated folder) × ft and lp, seed 0,
    with ``changes`` to its top-level entries; returns its path."""
    document = {"name": "hand", "preset": "toy", "seeds": [0],
                "backbones": [{"name": "A", "size": "tiny", "source": "none"}],
                "datasets": [{"name": "D1", "root": str(data), "layout": "soda"},
                             {"name": "D2", "root": str(data), "layout": "soda"}],
                "protocols": {"ft": {}, "lp": {}}, **changes}
    path = tmp_path / "hand.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _hand_made_folder(out, sweep_file, results):
    """A sweep folder as `unip sweep run` leaves it, made by hand: ``sweep.json`` records the sweep of
    ``sweep_file`` and a done cell per entry of ``results`` ({cell id: mIoU}), whose metrics.json holds it."""
    from unip.sweep.state import write_state

    jobs = {}
    for cell, miou in results.items():
        _finish(out, cell, miou)
        backbone, dataset, label = cell.split("/")
        jobs[cell] = {"kind": "cell", "folder": f"cells/{cell}", "backbone": backbone.upper(),
                      "dataset": dataset.upper(), "protocol": label.split("-")[0], "layer": None,
                      "seed": int(label.split("seed")[1]), "status": "done", "runs": 1}
    write_state(out, {"sweep": read_sweep(str(sweep_file)).to_dict(), "jobs": jobs})


def _finish(out, cell, miou):
    """A finished cell: a metrics.json (the report's only source of numbers) with mIoU ``miou``."""
    from unip.seg.results import METRICS_FORMAT, write_metrics

    write_metrics(out / "cells" / cell / "metrics.json", {"format": METRICS_FORMAT, "version": 1, "mIoU": miou,
                                                          "mAcc": miou + 1, "aAcc": miou + 2})


def _table(out):
    """`unip sweep report out`: (table.csv's first row, report.md, report.html, cells.csv's job ids)."""
    code, _, stderr = _run_cli(["sweep", "report", str(out)])
    assert code == 0, stderr
    folder = out / "report"
    row = next(csv.DictReader(open(folder / "table.csv")))
    cells = [r["job"] for r in csv.DictReader(open(folder / "cells.csv"))]
    return row, (folder / "report.md").read_text(), (folder / "report.html").read_text(), cells


def test_report_leaves_out_records_of_seeds_the_sweep_file_no_longer_asks_for(data, tmp_path):
    """The reviewer's folder: `seeds: [0]`, cells D1 seed 0 = 50 and D1 seed 1 = 70 recorded (an older file's
    seeds), D2 seed 0 = 40: D1 is 50 (seed 1 is left out, and the report says so), the FT average 45."""
    out = tmp_path / "out"
    _hand_made_folder(out, _hand_made_sweep(tmp_path, data),
                      {"a/d1/ft-seed0": 50.0, "a/d1/ft-seed1": 70.0, "a/d2/ft-seed0": 40.0})
    row, markdown, html, cells = _table(out)
    assert float(row["ft_D1"]) == 50.0 and float(row["ft_D2"]) == 40.0 and float(row["ft_average"]) == 45.0
    assert "a/d1/ft-seed1" not in cells and sorted(cells) == ["a/d1/ft-seed0", "a/d1/lp-seed0", "a/d2/ft-seed0",
                                                               "a/d2/lp-seed0"]
    assert "Left out: 1 recorded cell(s) that the sweep file no longer asks for" in markdown
    assert "`a/d1/ft-seed1`" in markdown and "<code>a/d1/ft-seed1</code>" in html
    assert "finished ones of the sweep file's seeds (0)" in markdown
    # with both seeds in the file, D1 is their mean and nothing is left out
    _hand_made_folder(out, _hand_made_sweep(tmp_path, data, seeds=[0, 1]), {"a/d1/ft-seed0": 50.0,
                                                                            "a/d1/ft-seed1": 70.0,
                                                                            "a/d2/ft-seed0": 40.0})
    row, markdown, _, cells = _table(out)
    assert float(row["ft_D1"]) == 60.0 and float(row["ft_D2"]) == 40.0 and float(row["ft_average"]) == 50.0
    assert "a/d1/ft-seed1" in cells and "Left out" not in markdown


def test_report_shows_no_average_while_a_planned_data_set_has_no_result(data, tmp_path):
    from unip.sweep.report_folder import write_report

    out = tmp_path / "out"
    sweep_file = _hand_made_sweep(tmp_path, data, protocols={"ft": {}, "lp": {"datasets": ["D1"]}})
    _hand_made_folder(out, sweep_file, {"a/d1/ft-seed0": 50.0, "a/d1/lp-seed0": 30.0})
    row, markdown, html, cells = _table(out)
    assert float(row["ft_D1"]) == 50.0 and row["ft_D2"] == "" and row["ft_average"] == ""
    assert row["ft_mIoU_per_GFLOP"] == ""
    line = next(line for line in markdown.splitlines() if line.startswith("| A |"))
    assert line.split(" | ")[7:10] == ["50.00", "-", "-"]  # FT D1, FT D2, FT avg
    assert "`a/d2/ft-seed0`: not run" in markdown and "a/d2/ft-seed0" in html
    # LP is limited to D1 by the sweep file: its one planned data set has a result, so it has an average
    assert float(row["lp_D1"]) == 30.0 and float(row["lp_average"]) == 30.0 and "a/d2/lp-seed0" not in cells
    report = write_report(out)  # what the benchmark figure draws: the same averages
    assert report.rows[0].average == {"ft": None, "lp": 30.0}


def test_report_tells_a_cell_stopped_part_way_from_one_never_started(data, tmp_path):
    """A cell a killed sweep had started (its record: runs 1, no metrics.json) is "not finished", not "not run"."""
    from unip.sweep.state import read_state, write_state

    out = tmp_path / "out"
    _hand_made_folder(out, _hand_made_sweep(tmp_path, data), {"a/d1/ft-seed0": 50.0})
    state = read_state(out)
    state["jobs"]["a/d2/ft-seed0"] = {"kind": "cell", "folder": "cells/a/d2/ft-seed0", "backbone": "A",
                                      "dataset": "D2", "protocol": "ft", "layer": None, "seed": 0,
                                      "status": "interrupted", "runs": 1}
    write_state(out, state)
    _, markdown, _, _ = _table(out)
    assert "`a/d2/ft-seed0`: not finished" in markdown and "`a/d1/lp-seed0`: not run" in markdown
    status = {r["job"]: r["status"] for r in csv.DictReader(open(out / "report" / "cells.csv"))}
    assert status == {"a/d1/ft-seed0": "done", "a/d1/lp-seed0": "not run", "a/d2/ft-seed0": "not finished",
                      "a/d2/lp-seed0": "not run"}


def test_an_only_run_records_what_it_ran_and_the_average_waits_for_the_rest(data, tmp_path):
    """`unip sweep run --only '*/d1/*'` (its cells finished: metrics.json written by hand rather than trained, so
    that the run only finds them) records D1's cells; the report still plans D2, so there is no average until a
    second `--only '*/d2/*'` run has D2's results."""
    from unip.sweep.state import write_state

    out = tmp_path / "out"
    sweep_file = _hand_made_sweep(tmp_path, data)
    write_state(out, {"sweep": read_sweep(str(sweep_file)).to_dict(), "jobs": {}})
    _finish(out, "a/d1/ft-seed0", 50.0)
    _finish(out, "a/d1/lp-seed0", 30.0)
    code, stdout, stderr = _run_cli(["sweep", "run", str(sweep_file), "--out", str(out), "--only", "*/d1/*"])
    assert code == 0 and "2 of 2 job(s) finished (0 run now, 2 before)" in stdout, stdout + stderr
    assert sorted(json.loads((out / "sweep.json").read_text())["jobs"]) == ["a/d1/ft-seed0", "a/d1/lp-seed0"]
    row, markdown, _, cells = _table(out)
    assert float(row["ft_D1"]) == 50.0 and row["ft_average"] == "" and row["lp_average"] == ""
    assert sorted(cells) == ["a/d1/ft-seed0", "a/d1/lp-seed0", "a/d2/ft-seed0", "a/d2/lp-seed0"]
    assert "Cells without results (2)" in markdown
    _finish(out, "a/d2/ft-seed0", 40.0)
    _finish(out, "a/d2/lp-seed0", 20.0)
    code, stdout, _ = _run_cli(["sweep", "run", str(sweep_file), "--out", str(out), "--only", "*/d2/*"])
    assert code == 0 and "(0 run now, 2 before)" in stdout
    row, markdown, _, _ = _table(out)
    assert [float(row[k]) for k in ("ft_D1", "ft_D2", "ft_average", "lp_D1", "lp_D2", "lp_average")] == [
        50.0, 40.0, 45.0, 30.0, 20.0, 25.0]
    assert "Cells without results" not in markdown


def test_the_recorded_sweep_plans_the_same_cells_as_its_file():
    """The report plans from sweep.json's record of the sweep file (Sweep.from_dict): the same cells, protocol
    limits and `layers: all` included."""
    from unip.sweep.spec import Sweep

    for name, variables in (("tiny", {"data": "/d"}), ("paper", {"data": "/d", "weights": "/w"})):
        sweep = read_sweep(name, variables)
        recorded = Sweep.from_dict(json.loads(json.dumps(sweep.to_dict())))
        assert [c.id for c in plan_cells(recorded)] == [c.id for c in plan_cells(sweep)]


# ========================================================================================= checks before anything runs
def _recorded_folder(out, sweep_file, cells):
    """A sweep folder as an earlier `unip sweep run` of ``sweep_file`` left it: per entry of ``cells`` ({cell id:
    "finished" | "stopped" | "killed early"}) the job's record with the command line it ran with and, in its
    folder, a metrics.json (finished), a training state (stopped part-way) or nothing (killed before its first
    save)."""
    from unip.sweep.run import cell_jobs
    from unip.sweep.state import write_state

    jobs = {job.id: job for job in cell_jobs(read_sweep(str(sweep_file)), out)}
    records = {}
    for cell, how in cells.items():
        job = jobs[cell]
        if how == "finished":
            _finish(out, cell, 50.0)
        elif how == "stopped":
            (job.folder / "checkpoints").mkdir(parents=True)
            (job.folder / "checkpoints" / "step-00000003.pt").write_bytes(b"a training state")
        records[cell] = {"kind": "cell", "folder": f"cells/{cell}", **job.coordinates, "args": job.args, "runs": 1,
                         "status": "done" if how == "finished" else "interrupted"}
    write_state(out, {"sweep": read_sweep(str(sweep_file)).to_dict(), "jobs": records})


@pytest.mark.parametrize("how", ["finished", "stopped"])
def test_cells_that_ran_with_other_settings_stop_the_run_and_the_dry_run_alike(data, tmp_path, how):
    """A cell that holds a result or a training state (here a/d1/ft-seed0) and ran with optim.iterations 6 stops a
    sweep file that now says 7 before anything starts, in the dry run (which shows it as changed) and in the run,
    with the same one line (exit 2): retrying could never help (the cell is skipped, or its resume is refused).
    A cell killed before its first save (a/d2/ft-seed0) starts afresh with the new settings; with the old settings
    back, nothing is refused."""
    out = tmp_path / "out"
    _recorded_folder(out, _hand_made_sweep(tmp_path, data, set={"optim.iterations": 6}),
                     {"a/d1/ft-seed0": how, "a/d2/ft-seed0": "killed early"})
    changed = _hand_made_sweep(tmp_path, data, set={"optim.iterations": 7})
    before = (out / "sweep.json").read_bytes()
    dry = _run_cli(["sweep", "run", str(changed), "--out", str(out), "--dry-run"])
    run = _run_cli(["sweep", "run", str(changed), "--out", str(out)])
    assert dry[0] == run[0] == 2 and dry[2] == run[2], (dry, run)
    error = run[2].strip()
    assert len(error.splitlines()) == 1 and error.startswith("unip sweep run: error: ")
    stopped = 0 if how == "finished" else 1
    assert (f"1 cell(s) ran with other settings than the sweep file gives now ({1 - stopped} finished, {stopped} "
            "stopped part-way with a training state), e.g. a/d1/ft-seed0 (ran with: optim.iterations=6; now: "
            "optim.iterations=7); restore those settings, use a new --out, or delete those cells' folders (e.g. "
            f"{out / 'cells' / 'a' / 'd1' / 'ft-seed0'})") in error
    lines = dry[1].splitlines()
    assert re.match(r"a/d1/ft-seed0\s+changed\s+toy\s+7\b", next(line for line in lines if line.startswith("a/d1/ft")))
    assert re.match(r"a/d2/ft-seed0\s+to run\b", next(line for line in lines if line.startswith("a/d2/ft")))
    assert "4 job(s), 0 done, 1 changed; to run: 3 cell(s)" in dry[1]
    assert (out / "sweep.json").read_bytes() == before  # nothing started
    assert not list(out.glob("cells/*/*/*/sweep-stdout.log"))
    # the settings it ran with: a finished cell is done, a stopped one continues
    code, stdout, stderr = _run_cli(["sweep", "run", str(_hand_made_sweep(tmp_path, data, set={"optim.iterations": 6})),
                                     "--out", str(out), "--dry-run"])
    assert code == 0 and stderr == "" and "changed" not in stdout
    assert re.match(r"a/d1/ft-seed0\s+" + ("done" if how == "finished" else "to run"),
                    next(line for line in stdout.splitlines() if line.startswith("a/d1/ft")))


def test_a_missing_or_foreign_data_set_stops_the_sweep_before_any_cell(data, tmp_path):
    """A data set folder that is missing, or is not a data set of its layout, and an analysis images folder that
    is missing: one line naming the sweep file's entry and the fix, exit 2, before any folder is created (not
    a failing `unip finetune` per cell). The dry run shows the table, then stops alike."""
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    for root, expected in ((tmp_path / "nodata", f"{tmp_path / 'nodata'}: data set folder not found"),
                           (tmp_path / "empty", f"{tmp_path / 'empty' / 'JPEGImages'}: folder not found (not a soda "
                                                 "data set?")):
        code, stdout, stderr = _run_cli(["sweep", "run", "tiny", "--out", str(out), "--var", f"data={root}"])
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stdout + stderr
        assert f"tiny.yaml: data set 'synth' (layout soda): {expected}" in stderr
        assert stderr.strip().endswith(f"; pass the right folder with --var data=DIR (now {root})")
        assert not out.exists()
        code, stdout, dry = _run_cli(["sweep", "run", "tiny", "--out", str(out), "--var", f"data={root}", "--dry-run"])
        assert code == 2 and dry == stderr and "8 cell(s)" in stdout and not out.exists()
    # no variable: the entry of the file is named
    sweep_file = _hand_made_sweep(tmp_path, data, datasets=[{"name": "D1", "root": str(tmp_path / "nodata"),
                                                             "layout": "soda"}])
    code, _, stderr = _run_cli(["sweep", "run", str(sweep_file), "--out", str(out)])
    assert code == 2 and "data set 'D1' (layout soda)" in stderr and stderr.strip().endswith("fix its root in the "
                                                                                            "sweep file")
    # the data set is there, the images unip analyze profiles are not
    sweep_file = _hand_made_sweep(tmp_path, data, protocols={"layerwise": {"layers": [2]}},
                                  analysis={"images": str(tmp_path / "noimages")})
    code, _, stderr = _run_cli(["sweep", "run", str(sweep_file), "--out", str(out)])
    assert code == 2 and f"analysis.images {tmp_path / 'noimages'}: image folder not found" in stderr
    assert not out.exists()
    # a finished cell does not read its data set again: only what is left to run is checked
    _recorded_folder(out, _hand_made_sweep(tmp_path, data), {"a/d1/ft-seed0": "finished"})
    moved = _hand_made_sweep(tmp_path, data, datasets=[{"name": "D1", "root": str(data), "layout": "soda"},
                                                       {"name": "D2", "root": str(tmp_path / "nodata"),
                                                        "layout": "soda"}])
    code, stdout, stderr = _run_cli(["sweep", "run", str(moved), "--out", str(out), "--only", "*/d1/ft-*"])
    assert code == 0 and "(0 run now, 1 before)" in stdout, stderr


def test_devices_this_machine_lacks_stop_the_sweep_before_any_cell(data, tmp_path, monkeypatch):
    """--gpus / --devices naming CUDA devices that are not there: one line naming the option and the fix, exit
    2, nothing created; the dry run shows the table first; a selection with nothing left to run passes. CUDA is
    faked away (or to one device)."""
    import torch

    out = tmp_path / "out"
    argv = ["sweep", "run", "tiny", "--out", str(out), "--var", f"data={data}"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for option, value in (("--gpus", "2"), ("--devices", "cpu,cuda:0"), ("--devices", "cuda")):
        code, stdout, stderr = _run_cli(argv + [option, value])
        assert code == 2 and stderr.strip() == (f"unip sweep run: error: {option} {value}: CUDA is not available on "
                                                "this machine; run the cells on the CPU with --devices cpu (or "
                                                "cpu,cpu: two at a time)"), stdout + stderr
        assert not out.exists()
    code, stdout, dry = _run_cli(argv + ["--gpus", "2", "--dry-run"])
    assert code == 2 and dry == stderr.replace("--devices cuda", "--gpus 2") and "8 cell(s)" in stdout
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, stderr = _run_cli(argv + ["--gpus", "2"])
    assert code == 2 and stderr.strip() == ("unip sweep run: error: --gpus 2: there is no cuda:1 on this machine, it "
                                            "has 1 CUDA device(s) (cuda:0); use --gpus 1 or fewer, or --devices with "
                                            "indices below 1")
    assert not out.exists()
    from unip.sweep.run import check_devices

    check_devices(["cuda:0", "cuda", "cpu", "auto"])  # what there is passes
    with pytest.raises(ConfigError, match="devices cuda:0,cuda:3: there is no cuda:3"):
        check_devices(["cuda:0", "cuda:3"])
    # nothing left to run: a finished selection reruns (to report, say) on a machine without the devices
    sweep_file = _hand_made_sweep(tmp_path, data)
    _recorded_folder(out, sweep_file, {"a/d1/ft-seed0": "finished"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, stdout, stderr = _run_cli(["sweep", "run", str(sweep_file), "--out", str(out), "--only", "*/d1/ft-*",
                                     "--gpus", "2"])
    assert code == 0 and "(0 run now, 1 before)" in stdout, stderr
    code, _, stderr = _run_cli(["sweep", "run", str(sweep_file), "--out", str(out), "--gpus", "2"])
    assert code == 2 and "--gpus 2: CUDA is not available" in stderr


# ============================================================================================ the sweep files
def test_the_paper_sweep_file_reads_and_every_cell_has_a_preset():
    sweep = read_sweep("paper", allow_unset=True)
    assert sweep.unset == ["data", "weights"]
    assert len(sweep.backbones) == 22 and [d.name for d in sweep.datasets] == ["SODA", "MFNet", "SCUT-Seg"]
    families = {b.family for b in sweep.backbones}
    assert families == {"UNIP (MAE-L)", "UNIP (iBOT-L)", "MAE", "CrossMAE", "DeiT", "DeiT III", "DINO", "iBOT"}
    assert sweep.backbone("UNIP-S (MAE-L)").source == "${weights}/mae_large_layer18_distill_unip_small_100ep_infmix.pth"
    cells = plan_cells(sweep)
    assert len(cells) == 22 * 3 * 2 + 4 * 12  # ft + lp everywhere, every block of four ViT-B on SODA
    for preset in sorted({(c.preset, c.protocol) for c in cells}):
        cell = next(c for c in cells if (c.preset, c.protocol) == preset)
        config = cell.config()
        assert config["optim"]["effective_batch"] == 8 and config["model"]["head"] == (
            "upernet" if cell.protocol == "ft" else "linear")
    unip_s = next(c for c in cells if c.backbone.name == "UNIP-S (MAE-L)" and c.protocol == "ft")
    assert unip_s.config()["model"]["last_block_heads"] == "default" and unip_s.preset == "soda_small"
    mae_l = next(c for c in cells if c.backbone.name == "MAE-L" and c.dataset.name == "SCUT-Seg")
    assert mae_l.preset == "scut_large" and mae_l.config()["optim"]["iterations"] == 16800


def test_a_long_seed_list_is_bounded_and_planned_in_linear_time(data, tmp_path, monkeypatch):
    """20,000 seeds: refused at once (over max_cells, counted without planning); with max_cells raised, the dry
    run resolves the settings once for all the cells (they differ in seed and folder only), and each cell's config
    is its own copy with its own seed and folder (a --set run.seed of the file would win, as in unip finetune)."""
    import unip.sweep.spec

    document = {"name": "long", "preset": "toy", "seeds": list(range(20_000)),
                "backbones": [{"name": "A", "size": "tiny", "source": "none"}],
                "datasets": [{"name": "D", "root": str(data), "layout": "soda"}], "protocols": {"ft": {}}}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match=r"20,000 cells .* more than max_cells \(10,000\)"):
        read_sweep(str(path))
    path.write_text(yaml.safe_dump({**document, "max_cells": 20_000}))
    calls = []
    real = unip.sweep.spec.make_config  # unip.seg.train's, as the sweep file's cells resolve their settings
    monkeypatch.setattr(unip.sweep.spec, "make_config", lambda *args, **kwargs: calls.append(1) or real(*args,
                                                                                                        **kwargs))
    start = time.perf_counter()
    code, stdout, stderr = _run_cli(["sweep", "run", str(path), "--out", str(tmp_path / "out"), "--dry-run"])
    seconds = time.perf_counter() - start
    assert code == 0 and "20000 job(s), 0 done; to run: 20000 cell(s)" in stdout, stderr
    assert len(calls) == 1 and seconds < 60, (len(calls), seconds)  # before: 40,000 resolutions, some 100 s
    cells = plan_cells(read_sweep(str(path)))
    first, last = cells[0].config("f0"), cells[-1].config("f1")
    assert (first["run"]["seed"], first["run"]["output"], last["run"]["seed"], last["run"]["output"]) == \
        (0, "f0", 19_999, "f1")
    first["optim"]["betas"].append(0.5)  # a copy: the next cell's settings stay as resolved
    assert len(cells[1].config()["optim"]["betas"]) == 2
    path.write_text(yaml.safe_dump({**document, "seeds": [3, 4], "set": {"run.seed": 7}}))
    assert [c.config()["run"]["seed"] for c in plan_cells(read_sweep(str(path)))] == [7, 7]


def test_variables_settings_and_names(tmp_path):
    document = {"vars": {"root": None, "tag": "x"}, "preset": "toy", "set": {"data.scale": [256, 64],
                "model.last_block_heads": "default", "optim.lr": 1e-3},
                "backbones": [{"name": "A (1)", "size": "small", "source": "none", "set": ["optim.iterations=3"]}],
                "datasets": [{"name": "D", "root": "${root}/d-${tag}", "layout": "soda"}],
                "protocols": {"layerwise": {"layers": "all"}}, "analysis": {"images": "${root}/img"}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(document))
    sweep = read_sweep(str(path), {"root": "/data"})
    cells = plan_cells(sweep)
    assert [c.layer for c in cells] == list(range(1, 13)) and cells[0].id == "a-1/d/lp-layer01-seed0"
    assert sweep.datasets[0].root == "/data/d-x" and sweep.analysis.images == "/data/img"
    config = cells[0].config()
    assert config["data"]["scale"] == [256, 64] and config["model"]["last_block_heads"] == "default"
    assert config["optim"]["lr"] == 1e-3 and config["optim"]["iterations"] == 3
    assert config["model"]["backbone"] == "unip_vit_small_patch16"  # source none: the size's architecture
    args = cells[0].finetune_args("/o")
    assert args[:4] == ["finetune", "toy", "--probe-layer", "1"] and "--resume" in args and "auto" in args
    with pytest.raises(ConfigError, match=r"\$\{root\} has no value; pass --var root=VALUE"):
        read_sweep(str(path))
    with pytest.raises(ConfigError, match="--var nope: .* has no such variable"):
        read_sweep(str(path), {"root": "/d", "nope": "1"})
    document["backbones"].append({"name": "a-1", "size": "tiny", "source": "none"})
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match="two backbones named 'A \\(1\\)' and 'a-1'"):
        read_sweep(str(path), {"root": "/d"})


def test_devices_become_slots_and_cuda_visible_devices(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert parse_devices() == ["auto"] and parse_devices(gpus=2) == ["cuda:0", "cuda:1"]
    assert parse_devices(devices="cuda:3,cpu") == ["cuda:3", "cpu"]
    with pytest.raises(ConfigError, match="--devices"):
        parse_devices(devices="gpu0")
    job = Job("x", "cell", tmp_path, ["finetune", "toy"], {})
    command, env = _command(job, "cuda:3", ["cuda:1", "cuda:3"])
    assert command[-4:] == ["finetune", "toy", "--device", "cuda"] and env["CUDA_VISIBLE_DEVICES"] == "3"
    command, env = _command(job, "cpu", ["cpu"])
    assert command[-2:] == ["--device", "cpu"] and env.get("CUDA_VISIBLE_DEVICES") == os.environ.get(
        "CUDA_VISIBLE_DEVICES")
    # cuda:N is the device this process calls cuda:N: the N-th of its own CUDA_VISIBLE_DEVICES
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert _command(job, "cuda:1", ["cuda:0", "cuda:1"])[1]["CUDA_VISIBLE_DEVICES"] == "6"


def test_a_missing_backbone_checkpoint_stops_the_sweep_before_any_cell(data, tmp_path):
    """A backbone whose checkpoint file (``source: FILE`` or ``timm:NAME@FILE``) is not there: one line naming
    the sweep entry, the file and the --var it comes from, exit 2, nothing created (not one failing `unip
    finetune` per cell); a selection of that backbone's finished cells does not need the file."""
    out = tmp_path / "out"
    missing = tmp_path / "weights" / "mae.pth"
    for source in (str(missing), f"timm:vit_tiny_patch16_224@{missing}"):
        sweep_file = _hand_made_sweep(tmp_path, data, vars={"weights": str(tmp_path / "weights")},
                                      backbones=[{"name": "A", "size": "tiny", "source": source.replace(
                                          str(tmp_path / "weights"), "${weights}")}])
        code, stdout, stderr = _run_cli(["sweep", "run", str(sweep_file), "--out", str(out)])
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stdout + stderr
        assert f"backbone 'A': {missing}: checkpoint file not found; pass the right folder with --var weights=DIR" \
            in stderr
        assert not out.exists()
    _recorded_folder(out, sweep_file, {"a/d1/ft-seed0": "finished"})
    code, stdout, stderr = _run_cli(["sweep", "run", str(sweep_file), "--out", str(out), "--only", "*/d1/ft-*"])
    assert code == 0 and "(0 run now, 1 before)" in stdout, stderr
