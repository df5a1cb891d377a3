"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

A state file holds the model, optimiser and AMP-scaler state, the position (epoch, global step, step
within the epoch), every RNG state (python, numpy, torch CPU, CUDA) and any extra JSON-like entries
(config, step plan, the header of the run's model file: ``unip.checkpoint`` reads a state like that file). It
is written atomically (``unip.atomic.atomic_path``: a killed run leaves the previous file intact) and read back
with ``torch.load(weights_only=True)``: no code from the file ever runs.

Files are named ``step-00001234.pt`` in a run's checkpoint folder; ``find_latest`` resolves
``--resume auto`` to the highest step. A state is written only when every floating-point tensor of the
model and the optimiser is finite (``NonFiniteStateError`` otherwise), so after a divergence the newest
state is the last finite one; ``find_resume_state`` also skips non-finite states written by other tools.
The best model of a run (by an evaluation metric) sits next to the states as ``best.safetensors`` with
``best.json`` (metric, value, step); pruning never touches them.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from unip.atomic import atomic_path, atomic_write_text, remove_temporaries
from unip.errors import CheckpointError, UnipError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
STATE_PATTERN = re.compile(r"^step-(\d{8})\.pt$")
BEST_WEIGHTS = "best.safetensors"
BEST_JSON = "best.json"
#: ``extra`` entry of a state that holds the JSON header of the model file its run writes (``Task.model_header``):
#: with it ``unip.checkpoint`` reads the state like that file (``unip.checkpoint.states``).
MODEL_HEADER_KEY = "model_header"


class NonFiniteStateError(UnipError):
    """The weights or the optimiser state hold NaN or inf; such a state is never written."""


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
    ``epoch`` (0-based). Raises ``NonFiniteStateError`` (and writes nothing) when a weight or optimiser
    tensor is not finite. Returns the path written."""
    path = Path(folder) / state_name(step)
    bad = non_finite_tensors({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    if bad:
        raise NonFiniteStateError(f"{path}: not written, {describe_names(bad)} not finite; the newest "
                                  f"finite state is {find_latest(folder) or 'none'}")
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


def non_finite_tensors(tree: Any, prefix: str = "") -> List[str]:
    """Dotted names of the floating-point tensors in a nest of dicts/lists/tuples (a state dict, an
    optimiser state dict) that hold a NaN or an infinity; ``[]`` when all are finite.

    One host sync per device, not per tensor."""
    flags: Dict[torch.device, List[Tuple[str, torch.Tensor]]] = {}
    for name, tensor in _floating_tensors(tree, prefix):
        flags.setdefault(tensor.device, []).append((name, torch.isfinite(tensor).all()))
    bad = []
    for entries in flags.values():
        finite = torch.stack([flag for _, flag in entries]).tolist()
        bad += [name for (name, _), ok in zip(entries, finite) if not ok]
    return bad


def _floating_tensors(tree: Any, prefix: str):
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            yield prefix.rstrip("."), tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _floating_tensors(value, f"{prefix}{key}.")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _floating_tensors(value, f"{prefix}{index}.")


def describe_names(names: List[str], limit: int = 3) -> str:
    """``"a, b, c and 4 more"`` for error messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


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


def state_step(path: PathLike) -> int:
    """The step in a state file's name (``step-00001234.pt`` → 1234)."""
    return int(STATE_PATTERN.match(Path(path).name).group(1))  # type: ignore[union-attr]


def remove_after(folder: PathLike, step: int) -> List[Path]:
    """Delete the state files of ``folder`` past ``step``, and the best model (``best.*``) when it was chosen
    after ``step``: what a run continued from ``step`` on another trajectory must not be outranked by.
    Returns the paths removed."""
    removed = [path for path in list_states(folder) if state_step(path) > step]
    best = read_best(folder)
    if best is not None and int(best["step"]) > step:
        removed += [Path(folder) / name for name in (BEST_JSON, BEST_WEIGHTS) if (Path(folder) / name).exists()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


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


def find_resume_state(resume: Optional[str], folder: PathLike) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The training state to resume from, read (``read_state``): ``(path, state)``, or ``None`` for a new run.

    ``resume`` as in ``resolve_resume``. With ``auto`` (or a folder) the newest state whose tensors are all
    finite is taken; newer non-finite ones (written by older versions) are skipped with a warning. An
    explicit file that holds non-finite values is a ``CheckpointError``."""
    path = resolve_resume(resume, folder)
    if path is None:
        return None
    explicit = resume != "auto" and not Path(str(resume)).is_dir()
    candidates = [path] if explicit else list(reversed(list_states(path.parent)))
    for candidate in candidates:
        state = read_state(candidate)
        bad = non_finite_tensors({"model": state["model"], "optimizer": state.get("optimizer")})
        if not bad:
            return candidate, state
        if explicit:
            raise CheckpointError(f"{candidate}: {describe_names(bad)} not finite (a diverged run); resume "
                                  "from an earlier step-*.pt or with --resume auto")
        logger.warning("%s: skipped, %s not finite (a diverged run)", candidate, describe_names(bad))
    raise CheckpointError(f"{path.parent}: every training state holds non-finite values; start a new run "
                          "(without --resume) in another --out folder")


def read_state(path: PathLike) -> Dict[str, Any]:
    """A state file's content (``weights_only`` unpickling: no code from the file runs); ``CheckpointError``
    when it cannot be read or is not a training state."""
    ours = bool(STATE_PATTERN.match(Path(path).name))  # named as unip names its states: damaged, not foreign
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        if not ours:
            raise CheckpointError(f"{path}: not a unip training state (it does not load as one: "
                                  f"{_load_failure(err)}); pass a step-*.pt file from a run's checkpoints/ folder, "
                                  "or --resume auto") from err
        raise CheckpointError(f"{path}: cannot read the training state ({_load_failure(err)}); delete it to "
                              "resume from the previous one, or pass another step-*.pt file") from err
    missing = [key for key in ("model", "step", "epoch", "step_in_epoch", "rng") if not isinstance(state, dict)
               or key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a unip training state (no {', '.join(missing)}); pass a step-*.pt file "
                              "written by a unip training run")
    problem = _state_problem(state)
    if problem:
        fix = "delete it to resume from the previous one, or pass" if ours else "pass"
        raise CheckpointError(f"{path}: damaged training state ({problem}); {fix} another step-*.pt file")
    return state


def _load_failure(err: Exception) -> str:
    """A short reason why ``torch.load`` failed: the weights-only unpickler's own complaint rather than
    PyTorch's paragraph about ``weights_only`` (which suggests running code from the file)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:  # its first sentence: what the file holds that a state may not
        text = text.split(marker, 1)[1].strip().split(". ", 1)[0].split("\n", 1)[0]
    text = " ".join(text.split()).rstrip(".")
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__


def _state_problem(state: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the entries of a training state that has every key, or ``None``."""
    for key in ("step", "epoch", "step_in_epoch"):
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{key} is {value!r}, not a whole number >= 0"
    for key in ("model", "optimizer", "extra"):
        if key in state and not isinstance(state[key], dict):
            return f"{key} is a {type(state[key]).__name__}, not a dict"
    scaler = state.get("scaler")
    if scaler is not None and not isinstance(scaler, dict):
        return f"scaler is a {type(scaler).__name__}, not a dict"
    extra = state.get("extra", {})
    if "plan" in extra and not isinstance(extra["plan"], dict):
        return f"extra.plan is a {type(extra['plan']).__name__}, not a dict"
    loss = extra.get("loss")
    if loss is not None and (not isinstance(loss, (int, float)) or isinstance(loss, bool)):
        return f"extra.loss is {loss!r}, not a number"
    return _rng_problem(state["rng"])


def _rng_problem(rng: Any) -> Optional[str]:
    if not isinstance(rng, dict):
        return f"rng is a {type(rng).__name__}, not a dict"
    missing = [key for key in ("python", "numpy", "torch") if key not in rng]
    if missing:
        return f"rng has no {', '.join(missing)} state"
    torch_state = rng["torch"]
    if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8 and torch_state.dim() == 1
            and torch_state.device.type == "cpu"):
        return "rng.torch is not a CPU uint8 tensor (torch.get_rng_state())"
    python = rng["python"]
    if not (isinstance(python, (tuple, list)) and len(python) == 3 and isinstance(python[1], (tuple, list))):
        return "rng.python is not a random.getstate() tuple"
    npy = rng["numpy"]
    if not (isinstance(npy, dict) and all(k in npy for k in ("name", "keys", "pos", "has_gauss", "cached"))
            and isinstance(npy["keys"], torch.Tensor)):
        return "rng.numpy is not a numpy.random.get_state() record"
    return None


def load_state(path: PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
               scaler: Optional[torch.amp.GradScaler] = None, restore_rng_states: bool = True) -> Dict[str, Any]:
    """Load a state file into ``model`` (strict), ``optimizer`` and ``scaler``; restore RNG states.

    Returns the rest of the state: ``step``, ``epoch``, ``step_in_epoch`` and ``extra``."""
    return apply_state(read_state(path), path, model, optimizer, scaler, restore_rng_states)


def apply_state(state: Dict[str, Any], path: PathLike, model: torch.nn.Module,
                optimizer: Optional[torch.optim.Optimizer] = None, scaler: Optional[torch.amp.GradScaler] = None,
                restore_rng_states: bool = True) -> Dict[str, Any]:
    """``load_state`` for a state already read from ``path`` (named in errors)."""
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"{path}: training state does not fit this run ({str(err)[:300]}); "
                              "resume with the configuration that wrote it") from err
    if restore_rng_states:
        try:
            restore_rng(state["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: damaged RNG state ({type(err).__name__}: {str(err)[:200]}); delete it "
                                  "to resume from the previous one") from err
    return {"step": state["step"], "epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"],
            "extra": state.get("extra", {})}


def remove_stale_temporaries(folder: PathLike) -> List[Path]:
    """Delete what a killed save left in a checkpoint folder (``.step-*.pt.tmp-<pid>``, best files).
    Returns the paths removed."""
    return remove_temporaries(folder, lambda name: bool(STATE_PATTERN.match(name)) or name in (BEST_WEIGHTS,
                                                                                                BEST_JSON))


# ----------------------------------------------------------------------------------------- best model
def read_best(folder: PathLike) -> Optional[Dict[str, Any]]:
    """The record of ``folder/best.json`` (``metric``, ``mode``, ``value``, ``step``, ``file``) or ``None``."""
    path = Path(folder) / BEST_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        float(record["value"]), int(record["step"]), str(record["metric"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable best-model record ({err}); delete it (and "
                              f"{BEST_WEIGHTS}) to start the best-model search anew") from err
    return record


def write_best(folder: PathLike, record: Dict[str, Any]) -> Path:
    """Write ``folder/best.json`` atomically; returns its path."""
    path = Path(folder) / BEST_JSON
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path
