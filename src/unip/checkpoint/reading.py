"""Reading checkpoint files without running code from them, and bringing release key names to ours.

``read_checkpoint`` reads ``.safetensors`` (cannot hold code) and PyTorch pickles (``.pth/.pt/.bin``) with
``torch.load(weights_only=True)`` and an explicit allow-list (``SAFE_GLOBALS``); anything else is refused
with a ``CheckpointError``. ``extract_state_dict`` unwraps release containers; ``normalize_keys`` strips
wrapper prefixes and renames release keys.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from unip.checkpoint.states import is_training_state, state_as_model_file
from unip.errors import CheckpointError

PathLike = Union[str, "os.PathLike[str]"]

def _numpy_globals() -> List[Any]:
    """What a pickled numpy array or scalar needs (mmseg checkpoints may keep e.g. ``meta["PALETTE"]`` as one):
    array/scalar reconstruction and dtypes, under numpy 2's names and the ``numpy.core`` names of files written
    with numpy 1. They rebuild data only; any object inside still goes through this allow-list."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    old = "numpy.core.multiarray"
    dtypes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGUS"}  # numpy 2 pickles dtypes by class
    return [np.ndarray, np.dtype, *sorted(dtypes, key=str), multiarray._reconstruct, multiarray.scalar,
            (multiarray._reconstruct, f"{old}._reconstruct"), (multiarray.scalar, f"{old}.scalar")]


#: Python objects a checkpoint may contain besides tensors and plain containers: the UNIP, MAE and DINO
#: releases store their command line as an ``argparse.Namespace`` under ``args``; mmseg's fine-tuned files
#: may hold numpy arrays in ``meta``.
SAFE_GLOBALS: List[Any] = [argparse.Namespace, *_numpy_globals()]

#: Containers that wrap a state dict, tried in this order (DINO: ``teacher`` before ``student``).
CONTAINER_KEYS = ("model", "state_dict", "teacher", "student", "module")
#: Key prefixes that training wrappers add (DDP ``module.``, DINO/iBOT ``backbone.``, ``encoder.``).
STRIP_PREFIXES = ("module.", "backbone.", "encoder.")
#: The only keys a backbone may set aside (an allow-list): pre-training decoders and heads, classifiers and what
#: pools tokens for them, and the mask tokens that replace masked patches in pre-training (MAE's ``mask_token``,
#: iBOT's ``masked_embed``). None of them takes part in computing the backbone's tokens. Any other key the model has
#: no place for makes loading fail (``check_fits``, ``load_weights``): it would change the computation (a q/k norm,
#: a distillation token, a relative position bias), so dropping it would load another function than the file's.
IGNORED_KEY = re.compile(r"^(decoder|mask_token$|masked_embed$|head\.|head_dist\.|fc_norm\.|attn_pool\.)")
CONFIG_METADATA_KEY = "unip.config"


def _preview(keys: List[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … {len(keys) - limit} more" if len(keys) > limit else "")


def read_checkpoint(path: PathLike) -> Tuple[Any, Dict[str, str]]:
    """Read a checkpoint file without executing code.

    Returns ``(content, metadata)``: the unpickled object (or the safetensors state dict) and the
    safetensors header metadata (``{}`` for PyTorch files). A safetensors file is recognised by its content
    whatever its name. A unip training state (``checkpoints/step-*.pt``) reads like the model file its run
    writes: its model's state dict and that file's header (``unip.checkpoint.states``)."""
    if not str(path).strip():
        raise CheckpointError("empty checkpoint path (an empty argument): pass a checkpoint file "
                              "(.pth/.pt/.bin/.safetensors) or timm:<name>")
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass a checkpoint file (.pth/.pt/.bin/.safetensors)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors" or is_safetensors(path):
        return _read_safetensors(path)
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{path}: an ONNX graph (what unip export writes), not a checkpoint: run it with "
                              "onnxruntime (docs/inference.md); pass the .safetensors file it was exported from")
    content = _read_pickle(path)
    if is_training_state(content):
        state_dict, header = state_as_model_file(content, str(path))
        return state_dict, {CONFIG_METADATA_KEY: header}
    return content, {}


def architecture_of(source: PathLike) -> str:
    """The ``architecture`` a file's header names (``"VisionTransformer"``, ``"Segmentor"``), or
    ``"VisionTransformer"`` for release files and ``timm:`` sources (which only hold backbones, except the
    release's fine-tuned mmseg checkpoints: ``"Segmentor"`` when the state dict has ``decode_head.*`` keys)."""
    text = str(source)
    if text.startswith("timm:"):
        return "VisionTransformer"
    content, metadata = read_checkpoint(source)
    if CONFIG_METADATA_KEY in metadata:
        try:
            return str(json.loads(metadata[CONFIG_METADATA_KEY]).get("architecture", "VisionTransformer"))
        except (ValueError, AttributeError):
            return "VisionTransformer"  # open_model reports the damaged header
    inner = content.get("state_dict") if isinstance(content, dict) else None
    if isinstance(inner, dict) and any(str(k).startswith("decode_head.") for k in inner):
        return "Segmentor"
    return "VisionTransformer"


def is_our_checkpoint(path: str) -> bool:
    """True for a safetensors file written by ``unip.checkpoint.save_checkpoint`` or ``unip.seg.save_segmentor``
    (it carries our config); a recogniser for ``unip.outputs.claim``."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as handle:
        return CONFIG_METADATA_KEY in (handle.metadata() or {})


def is_safetensors(path: PathLike) -> bool:
    """True when the file starts like a safetensors file, whatever its name: an 8-byte little-endian header
    length that fits the file, then the JSON header's ``{``."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(9)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return False
    return len(start) == 9 and start[8:] == b"{" and 0 < int.from_bytes(start[:8], "little") <= size - 8


def _read_safetensors(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except Exception as err:  # damaged files raise SafetensorError, OSError, ValueError, ...
        raise CheckpointError(f"{path}: not a readable safetensors file ({_brief(err)})") from err


def _read_pickle(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            # zip-format files (torch.save's default) are mapped, not read: what the caller never touches (a
            # training state's optimizer moments, a release's decoder) stays on disk; legacy files are read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if not _starts_like_torch_save(path):  # an image, a manifest, a YAML file given by mistake
            raise CheckpointError(f"{path}: not a checkpoint: neither torch.save's format (a zip archive or a "
                                  "pickle) nor safetensors; pass the weights file (.pth/.pt/.bin/.safetensors)"
                                  ) from err
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        culprit = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                       lines[0] if lines else type(err).__name__)
        raise CheckpointError(
            f"{path}: refused to load ({culprit[:200]}): not a PyTorch checkpoint, or one that needs Python "
            "objects outside the allow-list, and loading those could run code from the file. If you trust "
            "its origin, re-save only its state dict (torch.save(ckpt['model'], 'weights.pth')) and load "
            "that") from err
    except MemoryError:
        raise
    except Exception as err:  # damaged files raise RuntimeError, EOFError, BadZipFile, KeyError, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_brief(err)})") from err


def _starts_like_torch_save(path: Path) -> bool:
    """True for a zip archive (``torch.save``'s format) or a pickle of protocol 2 or later (its legacy format, and
    ``pickle.dump``'s default), which start with the PROTO opcode 0x80."""
    try:
        with open(path, "rb") as handle:
            return zipfile.is_zipfile(handle) or handle.seek(0) == 0 and handle.read(1) == b"\x80"
    except OSError:
        return True  # let the caller's own error stand


def _brief(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def extract_state_dict(content: Any, source: str = "checkpoint") -> Dict[str, Tensor]:
    """Unwrap ``model`` / ``state_dict`` / ``teacher`` / ``student`` / ``module`` containers until a
    mapping of tensors remains. Returns that state dict (keys unchanged)."""
    for _ in range(4):
        if _is_state_dict(content):
            odd = [key for key in content if not isinstance(key, str)]
            if odd:
                raise CheckpointError(f"{source}: weight names must be text, found {_preview([repr(k) for k in odd])}")
            return dict(content)
        if not isinstance(content, Mapping):
            break
        inner = next((content[k] for k in CONTAINER_KEYS if isinstance(content.get(k), Mapping)), None)
        if inner is None:
            break
        content = inner
    found = _preview(sorted(map(str, content.keys()))) if isinstance(content, Mapping) else type(content).__name__
    raise CheckpointError(f"{source}: no state dict found (top-level entries: {found}); expected tensors, "
                          f"possibly inside one of {', '.join(CONTAINER_KEYS)}")


def normalize_keys(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> Tuple[Dict[str, Tensor], List[str]]:
    """Bring release key names to ours: strip wrapper prefixes, rename ``gamma_1/2`` (DeiT III, BEiT) to
    ``ls1/ls2.gamma`` and DINOv2's ``mlp.w12/w3`` (its packed SwiGLU) to ``mlp.fc1/fc2``, bring DINOv2's
    ``register_tokens`` to timm's register layout, fuse BEiT's ``q_bias``/``v_bias`` into ``qkv.bias``, and set aside
    the keys that may be ignored (``IGNORED_KEY``: decoder, mask-token, classifier and pooling keys). Returns
    ``(state_dict, ignored_keys)``; raises ``CheckpointError`` naming ``source`` and the key when half of a split
    bias is missing or the halves do not fit together."""
    renamed: Dict[str, Tensor] = {}
    ignored: List[str] = []
    for key, value in state_dict.items():
        key = _strip_prefixes(key)
        key = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", key)
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key))
        if IGNORED_KEY.match(key):
            ignored.append(key)
        else:
            renamed[key] = value
    return _fuse_split_qkv_bias(_timm_registers(renamed), source), ignored


def _timm_registers(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """DINOv2's release keeps its registers in ``register_tokens``, which get no position, and the CLS token's
    position in row 0 of ``pos_embed``; timm's layout (what timm's own conversion writes) is ``reg_token`` with a
    position table of the patches only (``no_embed_class``), the CLS row added to ``cls_token``: the same tokens."""
    table, cls = state_dict.get("pos_embed"), state_dict.get("cls_token")
    if "register_tokens" not in state_dict or table is None or cls is None or table.ndim != 3 \
            or cls.shape != table[:, :1].shape:
        return state_dict
    state_dict["reg_token"] = state_dict.pop("register_tokens")
    state_dict["cls_token"], state_dict["pos_embed"] = cls + table[:, :1], table[:, 1:]
    return state_dict


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _fuse_split_qkv_bias(state_dict: Dict[str, Tensor], source: str) -> Dict[str, Tensor]:
    for key in sorted(k for k in state_dict if k.endswith((".attn.q_bias", ".attn.v_bias"))):
        stem, half = key[: -len("q_bias")], key[-len("q_bias"):]
        other = stem + ("v_bias" if half == "q_bias" else "q_bias")
        if other not in state_dict:
            if key not in state_dict:  # its pair was fused already
                continue
            raise CheckpointError(f"{source}: holds {key} but no {other}: a split attention bias (BEiT's) needs "
                                  "both halves; the file is damaged or incomplete")
        if half == "v_bias":
            continue
        q_bias, v_bias = state_dict[key], state_dict[other]
        if q_bias.ndim != 1 or q_bias.shape != v_bias.shape:
            raise CheckpointError(f"{source}: {key} {tuple(q_bias.shape)} and {other} {tuple(v_bias.shape)} are not "
                                  "two halves of one attention bias (1-D, of one length); the file is damaged")
        del state_dict[key], state_dict[other]
        state_dict[stem + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return state_dict


