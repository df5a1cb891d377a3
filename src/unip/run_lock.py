"""One writer per folder: a verb that writes a run folder (or a sweep folder) holds its lock while it works.

``take(folder, command)`` (or the context manager ``hold``) creates ``<folder>/.unip.lock``, locks it and writes
who holds it (JSON: pid, host, start time, command, torchrun job); ``release()`` removes the lock file when the
verb ends. A second process that asks for the same folder stops with a ``ConfigError`` naming the holder;
``check_free(folder)`` says the same before a verb does any work (``unip.outputs.out_folder`` calls it), without
taking the lock.

How the lock is held:

* POSIX: ``fcntl.flock`` (exclusive) on the lock file. The system releases it when the process ends, however it
  ends (SIGKILL included), so the file a killed run leaves behind is a *stale* lock: the next run takes it over
  with a warning naming the dead holder. On network file systems that do not pass flock between machines, the
  lock guards runs of one machine only.
* Windows: ``msvcrt.locking`` of one byte past the record (so others can read the record), which Windows too
  releases when the process ends.
* Where neither works (a file system that refuses locks): the record is the lock. One of a process that still
  runs on this machine, or of another machine (which cannot be asked), refuses; one whose process is gone on
  this machine is taken over with a warning. Two runs started in the same instant may then both go on.

A process may take a folder's lock more than once (nested takes share it). Under torchrun, only rank 0
takes the lock (``enabled``): a refusal ends rank 0, and torchrun then ends the other ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from unip.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".unip.lock"
#: Windows locks a byte range, which others cannot read: the locked byte lies past any record.
_LOCKED_BYTE = 1 << 20
#: Tries (and seconds between them) before a lock held by another process counts as taken: a ``check_free``
#: of another process holds it for an instant.
_TRIES, _PAUSE = 10, 0.02
#: Errors of a file system that does not lock at all.
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
#: A lock file that is a link is not followed (the record would be written wherever it points); Windows opens it
#: as bytes.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)

#: Folders (real paths) this process holds → how many takes share the lock.
_held: Dict[str, int] = {}


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock: what its lock file records. ``job`` is torchrun's run id (empty outside
    torchrun): the other ranks of the holder's own job are not kept out by it."""

    pid: int
    host: str
    started: str
    command: str
    job: str = ""

    @classmethod
    def here(cls, command: str) -> "Holder":
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), started, command, _job())

    @property
    def is_this_process(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()

    @property
    def is_ours(self) -> bool:
        """This process, or another rank of this process's torchrun job."""
        return self.is_this_process or bool(self.job and self.job == _job())

    def describe(self) -> str:
        return f"{self.command} (pid {self.pid} on {self.host}, started {self.started})"

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "started": self.started, "command": self.command,
                           "job": self.job})


def _job() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def lock_path(folder: str) -> str:
    return os.path.join(folder, LOCK_FILE)


class FolderLock:
    """A folder's lock as ``take`` returns it; ``release()`` lets go of it (once; later calls do nothing)."""

    def __init__(self, key: Optional[str] = None, release: Optional[Callable[[], None]] = None,
                 created: Sequence[str] = ()) -> None:
        self._key, self._release, self._created = key, release, list(created)

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        _held[key] -= 1
        if _held[key]:
            return
        del _held[key]
        if self._release is not None:
            self._release()
        _remove_empty(self._created)


#: What ``take`` returns where it takes nothing (``enabled`` false).
NO_LOCK = FolderLock()


def take(folder: str, command: str, enabled: bool = True, option: str = "--out") -> FolderLock:
    """Take the lock of ``folder`` (created, with the folders above it, when missing; removed again by
    ``release()`` when it is then empty); ``command`` names the holder (``unip finetune``). Raises ``ConfigError``
    naming ``option``, the folder and its holder when another process holds it. ``enabled`` false (a torchrun rank
    other than 0, a verb with nothing to write) takes nothing. A process may take a folder it holds again (the
    trainer inside ``finetune``): the lock is let go at the last ``release()``."""
    if not enabled:
        return NO_LOCK
    key = os.path.realpath(folder)
    if key in _held:
        _held[key] += 1
        return FolderLock(key)
    created = _make_folders(folder, option)
    try:
        release = _acquire(folder, Holder.here(command), option)
    except BaseException:
        _remove_empty(created)
        raise
    _held[key] = 1
    return FolderLock(key, release, created)


@contextlib.contextmanager
def hold(folder: str, command: str, enabled: bool = True, option: str = "--out") -> Iterator[None]:
    """``take`` the lock of ``folder`` for the block and release it after."""
    lock = take(folder, command, enabled, option)
    try:
        yield
    finally:
        lock.release()


def check_free(folder: str, option: str = "--out") -> None:
    """``ConfigError`` naming the holder when another process holds the lock of ``folder``; nothing when it is
    free, stale (its holder is gone) or held by this process (or by rank 0 of this process's torchrun job, whose
    other ranks look at the folder too). Takes no lock and creates nothing."""
    path = lock_path(folder)
    if not os.path.isfile(path):
        return
    holder = read_holder(path)
    if holder is not None and holder.is_ours:
        return
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return
    try:
        locked = _os_lock(fd, shared=True)
        if locked:
            _os_unlock(fd)
    finally:
        os.close(fd)
    if locked is False or (locked is None and _record_holds(holder)):
        raise _in_use(folder, holder, option, record_only=locked is None)


def read_holder(path: str) -> Optional[Holder]:
    """The holder a lock file records; ``None`` when it is empty, unreadable or not a record."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            document = json.loads(handle.read(4096) or "null")
        return Holder(int(document["pid"]), str(document["host"]), str(document["started"]), str(document["command"]),
                      str(document.get("job", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------- taking and releasing
def _acquire(folder: str, holder: Holder, option: str):
    """Lock ``folder``'s lock file and record ``holder`` in it; returns the function that releases it."""
    path = lock_path(folder)
    for attempt in range(_TRIES + 1):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except OSError as err:
            raise ConfigError(f"{option} {folder}: cannot create its lock file {LOCK_FILE} "
                              f"({err.strerror or err}); choose another {option}") from None
        try:
            locked = _os_lock(fd, shared=False)
        except BaseException:
            os.close(fd)
            raise
        if locked is False:
            os.close(fd)
            if attempt < _TRIES:
                time.sleep(_PAUSE)
                continue
            raise _in_use(folder, read_holder(path), option)
        if locked and not _same_file(fd, path):  # the holder removed it as it let go: lock the new one
            os.close(fd)
            continue
        previous = read_holder(path)
        refusal = None
        if previous is None and os.fstat(fd).st_size > 0:
            refusal = ConfigError(f"{path}: exists and is not a unip lock file; move it away or choose another "
                                  f"{option}")
        elif locked is None and _record_holds(previous):
            refusal = _in_use(folder, previous, option, record_only=True)
        if refusal is not None:
            if locked:
                _os_unlock(fd)
            os.close(fd)
            raise refusal
        if previous is not None:
            how = "its process is gone" if locked is None else "it ended without releasing it"
            log.warning("%s: took over the lock of %s: %s", folder, previous.describe(), how)
        _write_record(fd, holder)
        return lambda: _release(fd, path, bool(locked))
    raise ConfigError(f"{option} {folder}: its lock file {path} keeps being replaced; choose another {option}")


def _release(fd: int, path: str, locked: bool) -> None:
    """Remove the lock file and let go of it. Under POSIX the file is removed while still locked (the next
    ``_acquire`` sees that the path is no longer the file it locked); Windows cannot remove an open file."""
    if sys.platform != "win32":
        _unlink(path)
    if locked:
        _os_unlock(fd)
    os.close(fd)
    if sys.platform == "win32":
        _unlink(path)  # fails harmlessly while another process has it open


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _write_record(fd: int, holder: Holder) -> None:
    data = holder.to_json().encode("utf-8")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _record_holds(holder: Optional[Holder]) -> bool:
    """Without OS locks: whether the recorded ``holder`` may still run (another machine's cannot be asked)."""
    if holder is None or holder.is_ours:
        return False
    return holder.host != socket.gethostname() or _running(holder.pid)


def _running(pid: int) -> bool:
    if sys.platform == "win32":  # os.kill(pid, 0) would send Ctrl-C there: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by somebody else
        return True
    return True


def _in_use(folder: str, holder: Optional[Holder], option: str, record_only: bool = False) -> ConfigError:
    who = holder.describe() if holder is not None else "another unip process (its lock names none yet)"
    stale_hint = f"; if it no longer runs, delete {lock_path(folder)}" if record_only else ""
    return ConfigError(f"{option} {folder}: in use by {who}; wait for it to finish or stop it, or choose another "
                       f"{option}{stale_hint}")


# ------------------------------------------------------------------------------------- the system's locks
def _fcntl():
    try:
        import fcntl
    except ImportError:
        return None
    return fcntl


def _msvcrt():
    try:
        import msvcrt
    except ImportError:
        return None
    return msvcrt


def _os_lock(fd: int, shared: bool) -> Optional[bool]:
    """Lock ``fd`` without waiting: ``True`` locked, ``False`` held by another process, ``None`` when this system
    or file system cannot lock."""
    fcntl, msvcrt = _fcntl(), _msvcrt()
    try:
        if fcntl is not None:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return True
        if msvcrt is not None:
            os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
    except OSError as err:
        if err.errno in _NO_LOCKING:
            return None
        return False
    return None


def _os_unlock(fd: int) -> None:
    fcntl, msvcrt = _fcntl(), _msvcrt()
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        elif msvcrt is not None:
            os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass  # closing the file releases it too


# ------------------------------------------------------------------------------------- folders
def _make_folders(folder: str, option: str) -> List[str]:
    """Create ``folder`` and the missing folders above it; returns those created, deepest first."""
    created = []
    current = os.path.abspath(folder)
    while not os.path.isdir(current):
        created.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{option} {folder}: cannot create it ({err.strerror or err}); choose another "
                          f"{option}") from None
    return created


def _remove_empty(created: List[str]) -> None:
    for folder in created:
        try:
            os.rmdir(folder)
        except OSError:
            return


__all__ = ["FolderLock", "Holder", "LOCK_FILE", "NO_LOCK", "check_free", "hold", "lock_path", "read_holder", "take"]
