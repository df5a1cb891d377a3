"""Deterministic, resumable data order for training loops.

* ``ResumableSampler``: torch's ``DistributedSampler`` (shuffled by ``seed + epoch``, the same
  permutation on every rank) that can start part-way into an epoch, so a resumed run sees exactly the
  samples the interrupted one had not yet seen.
* ``SeededDataset``: every sample's random augmentation is drawn from a generator seeded by
  ``(seed, epoch, index)``. Augmentations then depend neither on worker count, worker timing, rank
  layout nor on what ran before, which makes resumed and multi-process runs reproducible.
"""

from __future__ import annotations

import random
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


class SeededDataset(Dataset):
    """Wraps ``dataset`` so that item ``i`` in epoch ``e`` is computed under RNGs seeded by (seed, e, i).

    The global torch/numpy/python RNGs of the calling process are left as they were."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        seed = sample_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch can start at sample ``start`` of this rank's share.

    Call ``set_epoch(epoch, start)`` before iterating; ``start`` is a count of samples of this rank."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def build_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, shuffle: bool = True, pin_memory: bool = False,
                 seeded: bool = True) -> DataLoader:
    """A ``DataLoader`` over a ``ResumableSampler`` (and a ``SeededDataset`` unless ``seeded=False``).

    Incomplete last batches are dropped so that every step has the same global batch. Use
    ``set_loader_epoch`` before each epoch."""
    if seeded and not isinstance(dataset, SeededDataset):
        dataset = SeededDataset(dataset, seed)
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    # its own generator: creating an iterator must not draw from the global RNG, or a run resumed
    # mid-epoch (one iterator creation more) would draw different drop-path masks
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=False, generator=generator)


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Prepare ``loader`` (from ``build_loader``) for ``epoch``, skipping its first ``start_batch`` batches."""
    sampler: Optional[ResumableSampler] = loader.sampler  # type: ignore[assignment]
    if isinstance(sampler, ResumableSampler):
        sampler.set_epoch(epoch, start_batch * (loader.batch_size or 1))
    if isinstance(loader.dataset, SeededDataset):
        loader.dataset.set_epoch(epoch)


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches each rank gets per epoch (``DistributedSampler`` with ``drop_last=True``)."""
    return (num_samples // world_size) // batch_size
