"""Process-group set-up from torchrun's environment (``env://``), the few collectives training and
evaluation need, and what changes in a model under DDP (SyncBatchNorm, unwrapping for saving).

Without ``WORLD_SIZE`` > 1 in the environment everything degrades to a single process: rank 0 of 1,
no process group, collectives return their input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from unip.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node, ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` → this rank's CUDA device if there is one, else CPU; ``"cpu"``/``"cuda"``/``"cuda:N"``.

    Raises ``ConfigError`` for a name that is not a device, a device of another kind (``mps``, ``meta``, ...) or a
    CUDA device on a machine without one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # e.g. mps or meta: torch names them, unip does not run there
        raise ConfigError(f"--device {name}: unip runs on a CPU or a CUDA GPU; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto", backend: Optional[str] = None) -> DistInfo:
    """Join the process group described by torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``.

    Backend: NCCL on CUDA, gloo on CPU (unless ``backend`` is given). Returns this process's ``DistInfo``;
    the CUDA device of the local rank is made current."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch_device = resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch_device.type == "cuda" else "gloo")
        kwargs = {"device_id": torch_device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                **kwargs)
    return DistInfo(rank, world_size, local_rank, torch_device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all ranks (a new tensor; the input when not distributed)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor; the input itself when not distributed).

    Integer tensors (confusion matrices) are summed exactly; every rank must call it the same number of
    times, so reduce once per evaluation, not once per batch (ranks may hold different batch counts)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def uses_sync_batchnorm(info: DistInfo, backend: Optional[str] = None) -> bool:
    """True only for a multi-process run on CUDA with NCCL (``backend``: the process group's, by default).

    ``SyncBatchNorm`` needs CUDA tensors and a process group: on one process it would only slow things
    down, and on CPU/gloo it raises. Plain ``BatchNorm`` is kept there."""
    if backend is None and is_distributed():
        backend = dist.get_backend()
    return info.world_size > 1 and info.device.type == "cuda" and backend == "nccl"


def sync_batchnorm(model: nn.Module, info: DistInfo, backend: Optional[str] = None) -> nn.Module:
    """``model`` with every ``BatchNorm*d`` turned into ``SyncBatchNorm`` when ``uses_sync_batchnorm``;
    otherwise ``model`` unchanged. Parameter and buffer names stay the same (checkpoints fit both)."""
    if uses_sync_batchnorm(info, backend):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, in any
    nesting: what to save, evaluate or export."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if is_distributed():
        dist.destroy_process_group()
