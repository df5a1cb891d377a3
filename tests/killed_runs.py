"""The scaffolding of the bit-exact resume tests (``unip pretrain``, ``unip finetune``): an uninterrupted reference
run next to a slowed-down run that is SIGKILLed after a checkpoint and resumed with ``--resume auto``."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

from unip.engine import checkpointing

UNIP = [sys.executable, "-m", "unip.cli"]


def one_thread_env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def kill_and_resume(argv: Callable[..., List[str]], reference_dir: Path, victim_dir: Path, final: str) -> str:
    """Run ``argv(reference_dir)`` to the end and ``argv(victim_dir)`` slowed down; SIGKILL the latter once
    ``checkpoints/step-00000003.pt`` exists, check it left no ``final`` file, resume it with ``--resume auto`` (which
    takes over the killed run's lock with a warning) and wait for both (each must succeed). Returns the name of the
    newest checkpoint the killed run had left."""
    reference = subprocess.Popen(UNIP + argv(reference_dir), env=one_thread_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(UNIP + argv(victim_dir, "--set", "debug.step_delay=0.5"), env=one_thread_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (victim_dir / "checkpoints" / "step-00000003.pt").exists():
        assert victim.poll() is None and time.time() < deadline, victim.stderr.read() if victim.poll() else "timeout"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (victim_dir / final).exists()
    latest = checkpointing.find_latest(victim_dir / "checkpoints").name
    resumed = subprocess.run(UNIP + argv(victim_dir, "--resume", "auto"), env=one_thread_env(), capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    # the killed run's lock (released by the system, its file left behind) is taken over with one warning
    assert f"took over the lock of unip {argv(victim_dir)[0]} (pid {victim.pid} on " in resumed.stderr
    assert not (victim_dir / ".unip.lock").exists()
    _, err = reference.communicate(timeout=180)
    assert reference.returncode == 0, err[-3000:]
    return latest
