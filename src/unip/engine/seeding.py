"""Seeds of a training run: the process-wide seed, and seeds derived from (seed, ...) coordinates.

Deriving a seed from where we are (epoch and sample, or rank and step) instead of carrying RNG state
makes augmentations and drop-path masks independent of worker count, timing and resumption.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Optional

import numpy as np
import torch

#: Keeps step seeds apart from sample seeds that happen to share the same coordinates.
_STEP_DOMAIN = 1


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integer coordinates, e.g. ``(seed, epoch, index)``."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return int(state.view(np.uint64)[0] >> np.uint64(1))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one optimiser step on one rank (drop-path masks). Re-seeding every step makes the
    masks a function of (seed, rank, step) alone, so a resumed run, on any number of processes, draws
    exactly what an uninterrupted run would, without carrying every rank's RNG state in the checkpoint."""
    return mixed_seed(seed, rank, step, _STEP_DOMAIN)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng(device: Optional[torch.device] = None) -> Iterator[None]:
    """Run a block (e.g. an evaluation) and restore python's, numpy's and torch's RNG states afterwards,
    with ``device``'s CUDA generator when it is a CUDA device: what the block draws leaves training alone."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
