"""Ordered, bounded parallel map over threads (image decoding releases the GIL)."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Iterable, Iterator, Optional, TypeVar

from unip.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Return the default number of reader threads: ``min(8, CPUs)``."""
    return min(8, os.cpu_count() or 1)


def thread_map(fn: Callable[[T], R], items: Iterable[T], workers: Optional[int] = None,
               window: int = 4) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, computed by ``workers`` threads.

    At most ``window * workers`` results are in flight, so memory stays bounded when the consumer is
    slower than the readers (unlike ``ThreadPoolExecutor.map``, which submits everything at once).
    Raises ``ConfigError`` for a ``workers`` count below 1.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"--workers {workers}: use a number of reader threads of at least 1")
    return _ordered_map(fn, items, workers or default_workers(), window)


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    pending: Deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
