"""Folder locks (``unip.run_lock``) held by another process, live or killed, for the tests of every verb that
writes a run folder."""

import contextlib
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

_HOLDER = """
import sys
from unip.run_lock import hold
with hold(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes it
"""


def _start(folder: Path, command: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), command], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@contextlib.contextmanager
def held_lock(folder: Path, command: str = "unip finetune") -> Iterator[int]:
    """``folder``'s lock held by another live process while the block runs (then released as a run ends);
    yields its pid."""
    holder = _start(folder, command)
    try:
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def stale_lock(folder: Path, command: str = "unip finetune") -> int:
    """Leave ``folder`` with the lock file of a process that was SIGKILLed while holding it; returns its pid."""
    holder = _start(folder, command)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (folder / ".unip.lock").is_file()
    return holder.pid
