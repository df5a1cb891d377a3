"""One writer per folder (``unip.run_lock``): live and stale locks, nested holds, torchrun ranks, file systems
without locks, and many processes racing for one folder."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from unip import run_lock
from unip.errors import ConfigError

from locks import held_lock, stale_lock


def test_a_held_folder_refuses_a_second_writer_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    with held_lock(folder, "unip finetune") as pid:
        record = json.loads((folder / run_lock.LOCK_FILE).read_text())
        assert record["pid"] == pid and record["host"] == socket.gethostname() and record["command"] == "unip finetune"
        for attempt in (run_lock.check_free, lambda f: run_lock.hold(f, "unip evaluate").__enter__()):
            with pytest.raises(ConfigError, match=re.escape(f"--out {folder}: in use by unip finetune (pid {pid} on "
                                                            f"{socket.gethostname()}, started {record['started']}); "
                                                            "wait for it to finish or stop it")):
                attempt(str(folder))
        assert json.loads((folder / run_lock.LOCK_FILE).read_text()) == record  # the holder's lock is untouched
    assert not folder.exists()  # released: the lock file removed, and the folder its holder made for it


def test_a_killed_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "run"
    pid = stale_lock(folder, "unip pretrain")
    run_lock.check_free(str(folder))  # stale: free
    with caplog.at_level("WARNING", logger="unip"):
        with run_lock.hold(str(folder), "unip pretrain"):
            assert json.loads((folder / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and re.fullmatch(
        re.escape(f"{folder}: took over the lock of unip pretrain (pid {pid} on {socket.gethostname()}, started ")
        + r"\d{4}-\d\d-\d\dT[^)]+\): it ended without releasing it", warnings[0]), warnings
    assert not (folder / run_lock.LOCK_FILE).exists()


def test_nested_holds_share_the_lock_and_a_missing_folder_is_removed_again(tmp_path):
    folder = tmp_path / "new" / "run"
    with run_lock.hold(str(folder), "unip finetune"):
        with run_lock.hold(str(folder), "unip finetune"):  # e.g. the trainer inside finetune()
            run_lock.check_free(str(folder))  # this process's own lock does not count
        assert (folder / run_lock.LOCK_FILE).exists()
    assert not (tmp_path / "new").exists()  # created for the lock, empty again: gone
    with run_lock.hold(str(folder), "unip finetune", enabled=False):  # a torchrun rank other than 0
        assert not folder.exists()


def test_a_refusal_leaves_no_folder_behind(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / run_lock.LOCK_FILE).write_text("my notes")
    with pytest.raises(ConfigError, match=r"\.unip\.lock: exists and is not a unip lock file"):
        with run_lock.hold(str(tmp_path / "run"), "unip predict"):
            pass
    assert (tmp_path / "run" / run_lock.LOCK_FILE).read_text() == "my notes"


@pytest.mark.parametrize("holder, refused", [
    ("this machine, running", True), ("this machine, gone", False), ("another machine", True)])
def test_without_system_locks_the_record_decides(tmp_path, monkeypatch, holder, refused):
    """A file system that refuses flock (ENOLCK): a live process of this machine (or any of another machine, which
    cannot be asked) holds the folder; a gone process of this machine does not."""
    monkeypatch.setattr(run_lock, "_os_lock", lambda fd, shared: None)
    folder = tmp_path / "run"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid, host = {"this machine, running": (sleeper.pid, socket.gethostname()),
                 "this machine, gone": (int(done.stdout), socket.gethostname()),
                 "another machine": (sleeper.pid, "elsewhere.invalid")}[holder]
    (folder / run_lock.LOCK_FILE).write_text(run_lock.Holder(pid, host, "2025-01-01T00:00:00+00:00",
                                                             "unip finetune").to_json())
    try:
        if refused:
            with pytest.raises(ConfigError, match=rf"in use by unip finetune \(pid {pid} on {host}.*if it no longer "
                                                  rf"runs, delete {folder}/\.unip\.lock"):
                run_lock.check_free(str(folder))
            with pytest.raises(ConfigError, match="in use by"):
                run_lock.hold(str(folder), "unip finetune").__enter__()
        else:
            run_lock.check_free(str(folder))
            with run_lock.hold(str(folder), "unip finetune"):
                assert json.loads((folder / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        sleeper.kill()
        sleeper.wait()


_RACER = """
import os, sys, time
from unip.errors import ConfigError
from unip.run_lock import hold
folder, tally = sys.argv[1], sys.argv[2]
held = 0
for _ in range(40):
    try:
        with hold(folder, "unip finetune"):
            with open(tally, "a") as f:
                f.write("+\\n")
            time.sleep(0.002)
            with open(tally, "a") as f:
                f.write("-\\n")
            held += 1
    except ConfigError:
        time.sleep(0.001)
print(held)
"""


def test_racing_processes_never_hold_one_folder_together(tmp_path):
    """Four processes take and release the lock of one folder (creating and removing its lock file) as fast as
    they can: the tally they keep inside the lock never shows two holders at once."""
    folder, tally = tmp_path / "run", tmp_path / "tally.txt"
    folder.mkdir()
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(folder), str(tally)], stdout=subprocess.PIPE,
                               text=True) for _ in range(4)]
    held = [int(racer.communicate(timeout=120)[0]) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers) and sum(held) > 0
    depth = 0
    for mark in Path(tally).read_text().split():
        depth += 1 if mark == "+" else -1
        assert depth in (0, 1)
    assert depth == 0 and not (folder / run_lock.LOCK_FILE).exists()
