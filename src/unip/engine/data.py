"""Deterministic, resumable data order for training loops.

* ``unip.data.sharding.RankSampler``: each rank's share of one permutation per epoch (shuffled by
  ``seed + epoch``, as ``DistributedSampler``) that can start part-way into an epoch, so a resumed run
  sees exactly the samples the interrupted one had not yet seen.
* ``SeededDataset``: every sample's random augmentation is drawn from a generator seeded by
  ``(seed, epoch, index)``. Augmentations then depend neither on worker count, worker timing, rank
  layout nor on what ran before, which makes resumed and multi-process runs reproducible.
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unip.data.sharding import RankSampler
from unip.engine.seeding import mixed_seed


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
        seed = mixed_seed(self.seed, self.epoch, index)
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


def build_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, shuffle: bool = True, pin_memory: bool = False,
                 seeded: bool = True) -> DataLoader:
    """A ``DataLoader`` over a ``RankSampler`` (and a ``SeededDataset`` unless ``seeded=False``).

    Incomplete last batches are dropped so that every step has the same global batch. Use
    ``set_loader_epoch`` before each epoch."""
    if seeded and not isinstance(dataset, SeededDataset):
        dataset = SeededDataset(dataset, seed)
    sampler = RankSampler(len(dataset), rank, world_size, shuffle=shuffle, seed=seed, even=True)
    # its own generator: creating an iterator must not draw from the global RNG, or a run resumed
    # mid-epoch (one iterator creation more) would draw different drop-path masks
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=False, generator=generator)


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Prepare ``loader`` (from ``build_loader``) for ``epoch``, skipping its first ``start_batch`` batches."""
    sampler: Optional[RankSampler] = loader.sampler  # type: ignore[assignment]
    if isinstance(sampler, RankSampler):
        sampler.set_epoch(epoch, start_batch * (loader.batch_size or 1))
    if isinstance(loader.dataset, SeededDataset):
        loader.dataset.set_epoch(epoch)


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches each rank gets per epoch (``RankSampler(even=True)``, incomplete batches dropped)."""
    return (num_samples // world_size) // batch_size
