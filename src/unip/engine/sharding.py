"""Disjoint shares of a data set for distributed ranks.

DataLoader workers of a map-style data set already receive disjoint batches from the sampler; what a
distributed run needs on top is that each rank samples a disjoint part of the indices. Unlike
``torch.utils.data.DistributedSampler``, :class:`RankSampler` never pads with repeated samples: with
``even=False`` the shares are disjoint and together complete; with ``even=True`` every rank gets the same
number of samples (needed so that DDP ranks run the same number of steps) by dropping at most
``world_size - 1`` samples, a different few each epoch when shuffling. With ``even=True`` the shares are
exactly those of ``DistributedSampler(drop_last=True)``. ``set_epoch(epoch, start)`` can start part-way
into this rank's share, so that a resumed training run sees exactly the samples it had not yet seen.
"""

from __future__ import annotations

import os
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import Sampler

from unip.errors import ConfigError


def rank_and_world() -> Tuple[int, int]:
    """Return ``(rank, world_size)`` from ``torch.distributed`` if initialised, else from the
    ``RANK``/``WORLD_SIZE`` environment variables (default 0/1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_indices(n: int, rank: int, world_size: int, shuffle: bool = True, seed: int = 0,
                  epoch: int = 0, even: bool = False) -> List[int]:
    """Return the indices of ``range(n)`` that belong to ``rank`` of ``world_size``.

    All ranks must pass the same ``seed`` and ``epoch``: the permutation is shared and rank ``r`` takes
    every ``world_size``-th position starting at ``r``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world size {world_size}: need 0 <= rank < world size")
    if shuffle:
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    if even:
        order = order[:n - n % world_size]
    return order[rank::world_size]


class RankSampler(Sampler[int]):
    """Sampler over this rank's share of ``range(n)``; call :meth:`set_epoch` each epoch to reshuffle."""

    def __init__(self, n: int, rank: Optional[int] = None, world_size: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, even: bool = True) -> None:
        default_rank, default_world = rank_and_world()
        self.n = n
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.shuffle, self.seed, self.even = shuffle, seed, even
        self.epoch, self.start = 0, 0
        shard_indices(0, self.rank, self.world_size)  # validates rank/world early

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use ``epoch`` to derive the next permutation (same on every rank); skip the first ``start``
        indices of this rank's share."""
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> List[int]:
        """Return this rank's indices for the current epoch, from ``start`` on."""
        return shard_indices(self.n, self.rank, self.world_size, self.shuffle, self.seed, self.epoch,
                             self.even)[self.start:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        total = self.n - self.n % self.world_size if self.even else self.n
        return max(0, len(range(self.rank, total, self.world_size)) - self.start)
