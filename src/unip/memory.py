"""Memory a command will need, checked before it is allocated.

Sizes typed on the command line (an image size, a batch) can ask for more memory than the machine has;
instead of letting the allocation fail half-way (or the system swap), verbs estimate what they need and
call ``require_memory``, which raises a ``ConfigError`` naming the option to change. When memory runs out
anyway, ``out_of_memory_fix`` says what to change, blaming only the sizes that the command line gave.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch

from unip.errors import ConfigError
from unip.text import byte_size

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", "r", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> Optional[int]:
    """What ``ulimit -v`` (RLIMIT_AS) still allows this process to map, or None without a limit."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm", "r", encoding="ascii") as handle:
            mapped = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        mapped = 0
    return max(soft - mapped, 0)


def available_bytes(device: Optional[torch.device] = None) -> Optional[int]:
    """Bytes that can still be allocated on ``device`` (CPU by default): free GPU memory for CUDA, else the
    smaller of the system's available memory and what the process's address-space limit leaves.
    Returns None when that cannot be told."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    limits = [value for value in (_meminfo_available(), _address_space_left()) if value is not None]
    return min(limits) if limits else None


def require_memory(nbytes: float, what: str, fix: str, device: Optional[torch.device] = None) -> None:
    """Raise ``ConfigError`` ("``what`` needs about X, only Y are available; ``fix``") when ``nbytes`` exceed
    what ``available_bytes(device)`` reports."""
    available = available_bytes(device)
    if available is not None and nbytes > available:
        where = f" on {device}" if device is not None and device.type != "cpu" else ""
        raise ConfigError(f"{what} needs about {byte_size(nbytes)} of memory, but only {byte_size(available)} are "
                          f"available{where}; {fix}")


#: Options that set a size or a batch: what a user can lower when memory runs out.
SIZE_OPTIONS = ("--size", "--batch-size", "--batch", "--scales")
#: ``--set`` settings that set a size or a batch.
_SIZE_SETTING = re.compile(r"(batch_size|crop_size|img_size|scale|channels|embed_dim|depth)$")


def out_of_memory_fix(argv: Sequence[str]) -> str:
    """What to do after memory ran out in the command ``argv`` (the arguments after ``unip``): lower the size
    and batch options it gives (``SIZE_OPTIONS``, ``--set`` of a size), or, when it gives none, find more
    memory (the model or the inputs themselves are too large for what is free)."""
    given = []
    for index, arg in enumerate(argv):
        name, _, inline = arg.partition("=")
        if name in SIZE_OPTIONS:
            given.append(name)
        elif name == "--set":
            setting = inline or (argv[index + 1] if index + 1 < len(argv) else "")
            key = setting.partition("=")[0].strip()
            if _SIZE_SETTING.search(key):
                given.append(f"--set {key}")
    if given:
        return f"lower {', '.join(dict.fromkeys(given))} (given on the command line)"
    return ("the command line gives no size or batch to lower: the model or its inputs need more memory than is "
            "free here; close other programs or use a machine with more memory")
