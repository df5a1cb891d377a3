"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

A state file holds the model, optimiser and AMP-scaler state, the position (epoch, global step, step
within the epoch), every RNG state (python, numpy, torch CPU, CUDA) and any extra JSON-like entries
(config, metrics). It is written atomically (``unip.atomic.atomic_path``: a killed run leaves the previous
file intact) and read back with ``torch.load(weights_only=True)``: no code from the file ever runs.

Files are named ``step-00001234.pt`` in a run's checkpoint folder; ``find_latest`` resolves
``--resume auto`` to the highest step.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from unip.atomic import atomic_path
from unip.errors import CheckpointError

PathLike = Union[str, Path]
STATE_PATTERN = re.compile(r"^step-(\d{8})\.pt$")


def state_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def capture_rng() -> Dict[str, Any]:
    """Every RNG state as tensors and plain Python values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Inverse of ``capture_rng``. CUDA states are restored when both the file and this machine have them."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(folder: PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: Optional[torch.amp.GradScaler] = None, *, epoch: int, step_in_epoch: int,
               extra: Optional[Dict[str, Any]] = None, keep: int = 2) -> Path:
    """Write ``folder/step-{step}.pt`` atomically and delete all but the ``keep`` newest state files.

    ``epoch``/``step_in_epoch`` say where to continue: the next step to run is ``step_in_epoch`` of
    ``epoch`` (0-based). Returns the path written."""
    path = Path(folder) / state_name(step)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "step": int(step), "epoch": int(epoch), "step_in_epoch": int(step_in_epoch),
        "rng": capture_rng(),
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    prune(folder, keep)
    return path


def list_states(folder: PathLike) -> List[Path]:
    """State files in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if STATE_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(STATE_PATTERN.match(p.name).group(1)))


def prune(folder: PathLike, keep: int) -> None:
    if keep > 0:
        for old in list_states(folder)[:-keep]:
            old.unlink(missing_ok=True)


def find_latest(folder: PathLike) -> Optional[Path]:
    """The state file with the highest step in ``folder``, or ``None`` when there is none."""
    states = list_states(folder)
    return states[-1] if states else None


def resolve_resume(resume: Optional[str], folder: PathLike) -> Optional[Path]:
    """``None``/``""`` → no resume; ``"auto"`` → ``find_latest(folder)`` (``None`` when the run is new);
    anything else must be an existing state file."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(folder)
    path = Path(resume)
    if path.is_dir():
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"{path}: no step-*.pt training state in this folder; "
                                  "pass a state file or --resume auto")
        return latest
    if not path.is_file():
        raise CheckpointError(f"{path}: resume file does not exist; pass a step-*.pt file or --resume auto")
    return path


def load_state(path: PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
               scaler: Optional[torch.amp.GradScaler] = None, restore_rng_states: bool = True) -> Dict[str, Any]:
    """Load a state file into ``model`` (strict), ``optimizer`` and ``scaler``; restore RNG states.

    Returns the rest of the state: ``step``, ``epoch``, ``step_in_epoch`` and ``extra``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot read training state ({type(err).__name__}: {err}); "
                              "delete it to resume from the previous one") from err
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: training state does not fit this run ({str(err)[:300]}); "
                              "resume with the configuration that wrote it") from err
    if restore_rng_states:
        restore_rng(state["rng"])
    return {key: state[key] for key in ("step", "epoch", "step_in_epoch", "extra")}
