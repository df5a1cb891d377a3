"""Deterministic, resumable data order for training loops.

* ``unip.engine.sharding.RankSampler``: each rank's share of one permutation per epoch (shuffled by
  ``seed + epoch``, as ``DistributedSampler``) that can start part-way into an epoch, so a resumed run
  sees exactly the samples the interrupted one had not yet seen.
* ``SeededDataset``: every sample's random augmentation is drawn from a generator seeded by
  ``(seed, epoch, index)``. Augmentations then depend neither on worker count, worker timing, rank
  layout nor on what ran before, which makes resumed and multi-process runs reproducible. The training
  loader's workers persist from epoch to epoch (no restart at each epoch boundary): the sampler hands them
  ``(epoch, index)`` pairs (``EpochTagged``), since a worker's copy of the dataset never sees ``set_epoch``.
* ``build_eval_loader``: every sample of an evaluation set exactly once over all ranks (no dropped tail,
  shares may differ by one), batched by ``list_collate`` so that images of different sizes travel together.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from unip.engine.sharding import RankSampler
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

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        """Item ``key`` of the current epoch, or ``key = (epoch, index)`` (from ``EpochTagged``)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        seed = mixed_seed(self.seed, epoch, index)
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


class EpochTagged(Sampler):
    """``(epoch, index)`` for each index of a ``RankSampler``: what a ``SeededDataset`` in a persistent worker
    needs to seed an item (the worker's copy keeps the epoch it was made with)."""

    def __init__(self, sampler: RankSampler) -> None:
        self.sampler = sampler

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def build_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, shuffle: bool = True, pin_memory: bool = False,
                 seeded: bool = True, collate_fn: Optional[Callable[[list], Any]] = None) -> DataLoader:
    """A ``DataLoader`` over a ``RankSampler`` (and a ``SeededDataset`` unless ``seeded=False``) whose workers
    persist over epochs.

    Incomplete last batches are dropped so that every step has the same global batch. Use
    ``set_loader_epoch`` before each epoch."""
    if seeded and not isinstance(dataset, SeededDataset):
        dataset = SeededDataset(dataset, seed)
    sampler: Sampler = RankSampler(len(dataset), rank, world_size, shuffle=shuffle, seed=seed, even=True)
    if isinstance(dataset, SeededDataset):
        sampler = EpochTagged(sampler)  # type: ignore[arg-type]
    # its own generator: creating an iterator must not draw from the global RNG, or a run resumed
    # mid-epoch (one iterator creation more) would draw different drop-path masks
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                      generator=generator, collate_fn=collate_fn)


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Prepare ``loader`` (from ``build_loader``) for ``epoch``, skipping its first ``start_batch`` batches."""
    sampler = loader.sampler
    if isinstance(sampler, (RankSampler, EpochTagged)):  # EpochTagged: each item carries the epoch to the dataset
        sampler.set_epoch(epoch, start_batch * (loader.batch_size or 1))


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches each rank gets per epoch (``RankSampler(even=True)``, incomplete batches dropped)."""
    return (num_samples // world_size) // batch_size


def list_collate(items: Sequence[Any]) -> Any:
    """Batch items without stacking, so that tensors of different sizes can share a batch.

    Tuples ``(image, label, ...)`` → a tuple of lists (one list per field); dicts → a dict of lists;
    anything else → a list of the items."""
    first = items[0]
    if isinstance(first, tuple):
        return tuple(list(field) for field in zip(*items))
    if isinstance(first, dict):
        return {key: [item[key] for item in items] for key in first}
    return list(items)


def build_eval_loader(dataset: Dataset, batch_size: int = 1, *, rank: Optional[int] = None,
                      world_size: Optional[int] = None, num_workers: int = 0, pin_memory: bool = False,
                      collate_fn: Callable[[list], Any] = list_collate) -> DataLoader:
    """A ``DataLoader`` for evaluation: rank ``r`` of ``W`` reads indices ``r, r+W, r+2W, ...`` in order
    (rank and world size default to the process group's), so every sample is read exactly once over all
    ranks: no shuffling, no dropped tail, no padding with repeats (shares may differ by one sample).

    Batches come from ``collate_fn`` (default ``list_collate``: lists, images of any size). Reduce the
    results once at the end (``unip.engine.distributed.all_reduce_sum``), not per batch."""
    sampler = RankSampler(len(dataset), rank, world_size, shuffle=False, even=False)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(0))
