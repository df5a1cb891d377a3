"""Reading every supported checkpoint format safely, and writing self-describing checkpoints.

Sources that ``load_model`` accepts:

* our own ``.safetensors`` files (written by ``save_checkpoint``: weights + a JSON config in the header),
* PyTorch files (``.pth/.pt/.bin``) of the UNIP, MAE, DINO, iBOT, DeiT and timm releases,
* ``timm:<name>`` (weights downloaded by timm) or ``timm:<name>@<file>`` (timm reads a local file).

Nothing is ever executed from a file: pickles are read with ``torch.load(weights_only=True)`` and an
explicit allow-list (``SAFE_GLOBALS``); anything else is refused with a ``CheckpointError``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import pickle
import re
import socket
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from unip.atomic import atomic_path
from unip.engine.config import Rule, flag, integer, number, text
from unip.errors import CheckpointError, ConfigError
from unip.models.pos_embed import resample_pos_embed
from unip.models.presets import PRESETS, VIT_SIZES, create_model
from unip.models.vit import VisionTransformer

PathLike = Union[str, "os.PathLike[str]"]

#: Python objects a checkpoint may contain besides tensors and plain containers: the UNIP, MAE and DINO
#: releases store their command line as an ``argparse.Namespace`` under ``args``.
SAFE_GLOBALS: List[Any] = [argparse.Namespace]

#: Containers that wrap a state dict, tried in this order (DINO: ``teacher`` before ``student``).
CONTAINER_KEYS = ("model", "state_dict", "teacher", "student", "module")
#: Key prefixes that training wrappers add (DDP ``module.``, DINO/iBOT ``backbone.``, ``encoder.``).
STRIP_PREFIXES = ("module.", "backbone.", "encoder.")
#: Keys that belong to pre-training heads or classifiers, never to the backbone.
IGNORED_KEY = re.compile(r"^(decoder|mask_token|head\.|head_dist\.|fc_norm\.|dist_token)")
CONFIG_METADATA_KEY = "unip.config"
DEFAULT_NORMALIZATION = {"mean": [0.3801] * 3, "std": [0.1871] * 3}

#: Bounds of a plausible ViT described by a file (metadata, release args or key names); the largest released
#: ViTs lie far inside them. Checked before anything is allocated (``check_architecture``).
MAX_DEPTH, MAX_WIDTH, MAX_PATCH, MAX_IMAGE_SIDE, MAX_TOKENS = 256, 8192, 256, 8192, 65_536
ARCHITECTURE_RULES: Dict[str, Rule] = {
    "depth": integer(1, MAX_DEPTH), "embed_dim": integer(1, MAX_WIDTH), "num_heads": integer(1, MAX_WIDTH),
    "last_heads": integer(0, MAX_WIDTH, null=True), "patch_size": integer(1, MAX_PATCH),
    "in_chans": integer(1, 64), "mlp_ratio": number(gt=0, le=16), "qkv_bias": flag(),
    "layer_scale": number(null=True), "drop_path_rate": number(ge=0, lt=1), "norm_eps": number(gt=0, le=1),
    "pos_embed_type": text("learned", "sincos"), "class_token": flag(), "num_reg_tokens": integer(0, 64),
    "no_embed_class": flag(),
}
#: Seconds to wait for the weights server before calling ``timm:NAME`` unreachable.
NETWORK_TIMEOUT_S = 3.0


@dataclass
class LoadReport:
    """What ``load_weights`` did with each key of a checkpoint."""

    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    reshaped: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} loaded"]
        for name in ("missing", "mismatched", "unexpected", "reshaped", "ignored"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{len(keys)} {name} ({_preview(keys)})")
        return ", ".join(parts)


def _preview(keys: List[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … {len(keys) - limit} more" if len(keys) > limit else "")


# ============================================================================================ reading
def read_checkpoint(path: PathLike) -> Tuple[Any, Dict[str, str]]:
    """Read a checkpoint file without executing code.

    Returns ``(content, metadata)``: the unpickled object (or the safetensors state dict) and the
    safetensors header metadata (``{}`` for PyTorch files)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass a checkpoint file (.pth/.pt/.bin/.safetensors)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pickle(path), {}


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
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
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


def normalize_keys(state_dict: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Bring release key names to ours: strip wrapper prefixes, rename ``gamma_1/2`` (DeiT III, BEiT) to
    ``ls1/ls2.gamma``, fuse BEiT's ``q_bias``/``v_bias`` into ``qkv.bias``, and set aside decoder,
    mask-token and classifier keys. Returns ``(state_dict, ignored_keys)``."""
    renamed: Dict[str, Tensor] = {}
    ignored: List[str] = []
    for key, value in state_dict.items():
        key = _strip_prefixes(key)
        key = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", key)
        if IGNORED_KEY.match(key):
            ignored.append(key)
        else:
            renamed[key] = value
    return _fuse_split_qkv_bias(renamed), ignored


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _fuse_split_qkv_bias(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    for key in [k for k in state_dict if k.endswith(".attn.q_bias")]:
        stem = key[: -len("q_bias")]
        q_bias, v_bias = state_dict.pop(key), state_dict.pop(stem + "v_bias")
        state_dict[stem + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return state_dict


# ============================================================================================ loading
def load_weights(model: VisionTransformer, source: Union[PathLike, Mapping[str, Tensor]],
                 allow_partial: bool = False, name: Optional[str] = None) -> LoadReport:
    """Load a checkpoint file (or a state dict) into ``model`` by name.

    Position tables of another grid are resampled bicubically. Returns a ``LoadReport``. Raises
    ``CheckpointError`` naming the file (``name`` for a state dict read from one) and the keys when a
    backbone weight is missing or has another shape, unless ``allow_partial`` (then the model keeps its
    own values for those)."""
    if isinstance(source, Mapping):
        name = name or "state dict"
        state_dict = extract_state_dict(source, name)
    else:
        name = name or str(source)
        state_dict = extract_state_dict(read_checkpoint(source)[0], name)
    state_dict, ignored = normalize_keys(state_dict)
    report = LoadReport(source=name, ignored=ignored)
    own = model.state_dict()
    params = dict(model.named_parameters())
    to_load: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        if key == "pos_embed" and value.shape != own[key].shape:
            value = _fit_pos_embed(value, model, name)
            report.reshaped.append(key)
        if value.shape != own[key].shape:
            report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
            continue
        to_load[key] = value
    # A fixed (non-trainable) sin-cos table is rebuilt by the model: not required from the file.
    required = [k for k in own if k not in params or params[k].requires_grad]
    report.missing = [k for k in required if k not in state_dict]
    report.loaded = sorted(to_load)
    if not report.ok and not allow_partial:
        raise CheckpointError(_misfit(name, "the model", report.missing, report.mismatched))
    model.load_state_dict(to_load, strict=False)
    return report


def _misfit(source: str, what: str, missing: List[str], mismatched: List[str]) -> str:
    problems = ([f"missing {_preview(missing)}"] if missing else []) + \
               ([f"shape mismatch {_preview(mismatched)}"] if mismatched else [])
    return (f"{source}: does not fit {what}: {'; '.join(problems)}. The file is incomplete or holds another "
            "architecture")


def _fit_pos_embed(table: Tensor, model: VisionTransformer, source: str) -> Tensor:
    """Resample a position table ``[1, rows, D]`` (or ``[rows, D]``) to the model's grid and prefix."""
    if table.ndim not in (2, 3) or table.shape[-1] != model.embed_dim or (table.ndim == 3 and table.shape[0] != 1):
        raise CheckpointError(f"{source}: pos_embed of shape {tuple(table.shape)} does not fit width "
                              f"{model.embed_dim}; expected [1, rows, {model.embed_dim}]")
    table = table.reshape(1, -1, table.shape[-1])
    model_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    for prefix in dict.fromkeys((model_prefix, 1, 0, model.num_prefix_tokens)):
        grid = table.shape[1] - prefix
        side = int(grid ** 0.5)
        if grid > 0 and side * side == grid:
            break
    else:
        raise CheckpointError(f"{source}: pos_embed with {table.shape[1]} rows is not a square grid")
    resampled = resample_pos_embed(table, model.grid_size, num_prefix_tokens=prefix)
    grid_part = resampled[:, prefix:]
    if prefix == model_prefix:
        return resampled
    if model_prefix == 0:
        return grid_part
    if prefix == 0:
        return torch.cat([grid_part.new_zeros(1, model_prefix, grid_part.shape[-1]), grid_part], dim=1)
    raise CheckpointError(f"{source}: pos_embed has {prefix} prefix rows, the model {model_prefix}")


# ============================================================================================ models
@dataclass
class LoadedModel:
    """A model rebuilt from a source, how its architecture was determined, and the load report."""

    model: VisionTransformer
    report: LoadReport
    architecture_from: str
    meta: Dict[str, Any] = field(default_factory=dict)


def load_model(source: PathLike, allow_partial: bool = False, **overrides: Any) -> VisionTransformer:
    """Rebuild a backbone from ``source`` with its weights (see the module docstring for sources).

    The architecture comes from our metadata, a release's ``args`` (``args.model``, ``args.last_heads``),
    timm, or, failing those, the shapes of the weights (heads then assume 64 channels per head, or the
    standard ViT size of that width). ``overrides`` are ``VisionTransformer`` arguments
    (e.g. ``last_heads=16``, ``img_size=512``). Returns the model in eval mode."""
    return open_model(source, allow_partial=allow_partial, **overrides).model


def open_model(source: PathLike, allow_partial: bool = False, **overrides: Any) -> LoadedModel:
    """Like ``load_model`` but returns a ``LoadedModel`` with the report and metadata.

    The architecture a file describes is checked (``check_architecture``, ``check_fits``) before the model
    is allocated, so a small file cannot make it allocate a huge one."""
    text = str(source)
    if text.startswith("timm:"):
        loaded = _open_timm(text[len("timm:"):], allow_partial, overrides)
    else:
        content, metadata = read_checkpoint(source)
        state_dict = extract_state_dict(content, text)
        config, architecture_from, meta = _architecture(content, metadata, state_dict, text)
        config.update(overrides)
        check_architecture(config, text)
        check_fits(config, normalize_keys(state_dict)[0], text, allow_partial)
        model = _build(config, text)
        report = load_weights(model, state_dict, allow_partial=allow_partial, name=text)
        loaded = LoadedModel(model, report, architecture_from, meta)
    loaded.model.eval()
    return loaded


def _build(config: Dict[str, Any], source: str) -> VisionTransformer:
    try:
        return VisionTransformer(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: cannot build the architecture {config}: {err}") from err


def _architecture(content: Any, metadata: Mapping[str, str], state_dict: Mapping[str, Tensor],
                  source: str) -> Tuple[Dict[str, Any], str, Dict[str, Any]]:
    """Returns ``(VisionTransformer kwargs, where they came from, extra metadata)``."""
    if CONFIG_METADATA_KEY in metadata:
        try:
            meta = json.loads(metadata[CONFIG_METADATA_KEY])
            config = dict(meta.pop("model"))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{source}: corrupt '{CONFIG_METADATA_KEY}' metadata ({_brief(err)}); "
                                  "the file was damaged after it was written") from err
        config.pop("heads_per_block", None)
        return config, "unip metadata", meta
    args = content.get("args") if isinstance(content, Mapping) else None
    if isinstance(args, argparse.Namespace) and getattr(args, "model", None) in PRESETS:
        config = dict(PRESETS[args.model])
        last_heads = getattr(args, "last_heads", None)
        if last_heads:
            if isinstance(last_heads, bool) or not isinstance(last_heads, (int, str)) or not str(last_heads).isdigit():
                raise CheckpointError(f"{source}: args.last_heads={last_heads!r} is not a head count")
            config["last_heads"] = int(last_heads)
        config["drop_path_rate"] = 0.0
        meta = {k: v for k, v in vars(args).items() if k in ("model", "last_heads", "teacher_model",
                                                            "intermediate", "input_size")}
        return config, f"release args (model={args.model}, last_heads={config.get('last_heads')})", meta
    return infer_architecture(state_dict, source), "inferred from weight shapes", {}


def infer_architecture(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> Dict[str, Any]:
    """Derive ``VisionTransformer`` kwargs from weight shapes (release key names accepted).

    Head counts cannot be read from weights: the standard count of that width is used (else 64
    channels per head); override with ``num_heads`` / ``last_heads`` when that is wrong. Raises
    ``CheckpointError`` when the shapes do not describe a ViT."""
    sd, _ = normalize_keys(state_dict)

    def shape(key: str, ndim: int) -> Tuple[int, ...]:
        if key not in sd:
            raise CheckpointError(f"{source}: no {key}, not a ViT backbone checkpoint")
        if sd[key].ndim != ndim:
            raise CheckpointError(f"{source}: {key} has shape {tuple(sd[key].shape)}, a ViT's has {ndim} "
                                  "dimensions; the file is damaged or not a ViT")
        return tuple(sd[key].shape)

    embed_dim, in_chans, patch, patch_w = shape("patch_embed.proj.weight", 4)
    if patch != patch_w:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has a {patch}x{patch_w} kernel; "
                              "only square patches are supported")
    numbers = [int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m]
    depth = 1 + max(numbers, default=-1)
    if depth == 0:
        raise CheckpointError(f"{source}: no blocks.* weights, not a ViT backbone checkpoint")
    if depth > MAX_DEPTH:
        raise CheckpointError(f"{source}: key names describe {depth} blocks (blocks.{depth - 1}.*), more than "
                              f"the {MAX_DEPTH} a ViT plausibly has; the file is damaged")
    hidden = shape("blocks.0.mlp.fc1.weight", 2)[0]
    heads = next((s["num_heads"] for s in VIT_SIZES.values() if s["embed_dim"] == embed_dim),
                 max(1, embed_dim // 64))
    if embed_dim % heads:
        heads = 1
    class_token = "cls_token" in sd
    num_reg = shape("reg_token", 3)[1] if "reg_token" in sd else 0
    prefix = int(class_token) + num_reg
    rows = _position_rows(sd, embed_dim, source) if "pos_embed" in sd else 196 + prefix
    no_embed_class = prefix > 0 and math.isqrt(rows) ** 2 == rows
    grid = rows - (0 if no_embed_class else prefix)
    side = math.isqrt(max(grid, 0))
    if grid < 1 or side * side != grid:
        raise CheckpointError(f"{source}: pos_embed has {rows} rows, not a square grid of patches plus {prefix} "
                              "prefix token(s); the file is damaged or not a ViT")
    return dict(img_size=side * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                num_heads=heads, mlp_ratio=hidden / embed_dim, qkv_bias="blocks.0.attn.qkv.bias" in sd,
                layer_scale=1e-5 if "blocks.0.ls1.gamma" in sd else None,
                class_token=class_token, num_reg_tokens=num_reg, no_embed_class=no_embed_class)


def _position_rows(sd: Mapping[str, Tensor], embed_dim: int, source: str) -> int:
    table = sd["pos_embed"]
    if table.ndim not in (2, 3) or table.shape[-1] != embed_dim or table.numel() == 0:
        raise CheckpointError(f"{source}: pos_embed of shape {tuple(table.shape)} does not fit width {embed_dim}")
    return table.numel() // embed_dim


def check_architecture(config: Mapping[str, Any], source: str) -> None:
    """Raise ``CheckpointError`` naming ``source`` unless ``config`` (``VisionTransformer`` kwargs) describes a
    plausible ViT: known settings of the right types, depth, width, patch and image size within the
    ``MAX_*`` bounds, head counts that divide the width, at most ``MAX_TOKENS`` patches."""
    defaults = {name: p.default for name, p in inspect.signature(VisionTransformer).parameters.items()}
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise CheckpointError(f"{source}: unknown architecture setting(s) {', '.join(map(str, unknown))}")
    full = {**defaults, **config}
    for key, rule in ARCHITECTURE_RULES.items():
        if not rule.accepts(full[key]):
            raise CheckpointError(f"{source}: describes an implausible ViT: {key} must be {rule.describe()}, "
                                  f"got {full[key]!r}")
    width, patch = full["embed_dim"], full["patch_size"]
    for key in ("num_heads", "last_heads"):
        if full[key] and width % full[key]:
            raise CheckpointError(f"{source}: {key}={full[key]} does not divide the width {width}")
    size = full["img_size"]
    sides = [size] * 2 if isinstance(size, int) and not isinstance(size, bool) else size
    side_rule = integer(patch, MAX_IMAGE_SIDE)
    if not isinstance(sides, (list, tuple)) or len(sides) != 2 or not all(side_rule.accepts(v) for v in sides):
        raise CheckpointError(f"{source}: img_size must be a size (or height, width) from the patch {patch} to "
                              f"{MAX_IMAGE_SIDE} px, got {size!r}")
    tokens = (sides[0] // patch) * (sides[1] // patch)
    if tokens > MAX_TOKENS:
        raise CheckpointError(f"{source}: {sides[0]}x{sides[1]} px with patch {patch} gives {tokens:,} tokens, "
                              f"more than {MAX_TOKENS:,}")
    if int(width * full["mlp_ratio"]) < 1:
        raise CheckpointError(f"{source}: mlp_ratio {full['mlp_ratio']} leaves no MLP channel at width {width}")


def expected_shapes(config: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """The shape of every weight of ``VisionTransformer(**config)``, computed without building it (timm's
    key names). ``config`` must have passed ``check_architecture``."""
    defaults = {name: p.default for name, p in inspect.signature(VisionTransformer).parameters.items()}
    c = {**defaults, **config}
    width, depth, patch = c["embed_dim"], c["depth"], c["patch_size"]
    height, wide = (c["img_size"], c["img_size"]) if isinstance(c["img_size"], int) else c["img_size"]
    prefix = int(c["class_token"]) + c["num_reg_tokens"]
    rows = (height // patch) * (wide // patch) + (0 if c["no_embed_class"] else prefix)
    hidden = int(width * c["mlp_ratio"])
    shapes: Dict[str, Tuple[int, ...]] = {"patch_embed.proj.weight": (width, c["in_chans"], patch, patch),
                                          "patch_embed.proj.bias": (width,), "pos_embed": (1, rows, width)}
    if c["class_token"]:
        shapes["cls_token"] = (1, 1, width)
    if c["num_reg_tokens"]:
        shapes["reg_token"] = (1, c["num_reg_tokens"], width)
    block = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
             "attn.proj.weight": (width, width), "attn.proj.bias": (width,), "norm2.weight": (width,),
             "norm2.bias": (width,), "mlp.fc1.weight": (hidden, width), "mlp.fc1.bias": (hidden,),
             "mlp.fc2.weight": (width, hidden), "mlp.fc2.bias": (width,)}
    if c["qkv_bias"]:
        block["attn.qkv.bias"] = (3 * width,)
    if c["layer_scale"]:
        block.update({"ls1.gamma": (width,), "ls2.gamma": (width,)})
    for index in range(depth):
        shapes.update({f"blocks.{index}.{key}": shape for key, shape in block.items()})
    shapes.update({"norm.weight": (width,), "norm.bias": (width,)})
    return shapes


def check_fits(config: Mapping[str, Any], state_dict: Mapping[str, Tensor], source: str,
               allow_partial: bool = False) -> None:
    """Check, before allocating, that the weights in ``state_dict`` (normalised keys) are the weights of
    ``VisionTransformer(**config)`` (the position table aside, which is resampled to the grid).

    Raises ``CheckpointError`` naming ``source`` when a weight is missing or mis-shaped (unless
    ``allow_partial``), and in any case when the file holds less than half of the model's weights: then
    the architecture it describes is not the one its tensors hold."""
    shapes = expected_shapes(config)
    shapes.pop("pos_embed")
    missing = [key for key in shapes if key not in state_dict]
    mismatched = [f"{key} {tuple(state_dict[key].shape)} vs {shape}" for key, shape in shapes.items()
                  if key in state_dict and tuple(state_dict[key].shape) != shape]
    if (missing or mismatched) and not allow_partial:
        raise CheckpointError(_misfit(source, "the architecture it describes", missing, mismatched))
    expected = sum(math.prod(shape) for shape in shapes.values())
    found = sum(math.prod(shape) for key, shape in shapes.items()
                if key in state_dict and tuple(state_dict[key].shape) == shape)
    if 2 * found < expected:
        raise CheckpointError(f"{source}: describes a ViT of {expected:,} weights (width {config.get('embed_dim')}, "
                              f"depth {config.get('depth')}) but holds only {found:,} of them; its metadata or "
                              "key names do not match its tensors")


# ============================================================================================ timm
def _open_timm(spec: str, allow_partial: bool, overrides: Dict[str, Any]) -> LoadedModel:
    """``NAME`` (timm downloads the weights) or ``NAME@FILE`` (a local weights file, read by our safe
    reader and passed through the model family's timm ``checkpoint_filter_fn`` for release layouts)."""
    name, at, weights_file = spec.partition("@")
    if not name or (at and not weights_file):
        raise CheckpointError(f"timm:{spec}: expected timm:NAME or timm:NAME@FILE, e.g. "
                              "timm:vit_base_patch16_224.mae@/path/to/weights.pth")
    if weights_file:  # read first: a missing or unsafe file fails before timm builds anything
        state_dict = extract_state_dict(read_checkpoint(weights_file)[0], weights_file)
    reference = _create_timm(name, pretrained=not weights_file)
    config = config_from_timm(reference, f"timm:{name}")
    config.update(overrides)
    check_architecture(config, f"timm:{spec}")
    model = _build(config, f"timm:{name}")
    if weights_file:
        filter_fn = getattr(sys.modules[type(reference).__module__], "checkpoint_filter_fn", None)
        try:
            state_dict = filter_fn(state_dict, reference) if filter_fn else state_dict
        except Exception as err:  # timm's filters index keys and reshape without checking
            raise CheckpointError(f"{weights_file}: does not fit timm:{name} ({_brief(err)})") from err
    else:
        state_dict = reference.state_dict()
    report = load_weights(model, state_dict, allow_partial=allow_partial, name=weights_file or f"timm:{name}")
    report.source = f"timm:{spec}"
    return LoadedModel(model, report, f"timm model {name}", {"timm_model": name})


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    """``timm.create_model(name)`` without a classifier; errors become ``CheckpointError``. Without a
    network, pretrained weights come from timm's cache or fail at once (no minute of download retries)."""
    import timm

    if not timm.is_model(name):
        raise CheckpointError(f"timm:{name}: unknown timm model; see timm.list_models()")
    offline = _offline_for_download(name) if pretrained else False
    try:
        with _hub_offline(offline):
            return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise CheckpointError(f"timm:{name}: unknown timm model; see timm.list_models()") from err
        raise CheckpointError(f"timm:{name}: timm could not load the weights ({_brief(err)})") from err
    except Exception as err:  # network and hub errors come in many types
        raise CheckpointError(
            f"timm:{name}: could not get pretrained weights ({_brief(err, 160)}). "
            f"Offline, download the file elsewhere and pass timm:{name}@/path/to/weights") from err


def _offline_for_download(name: str) -> bool:
    """True when the weights of ``name`` are in the local cache but their server cannot be reached (timm
    must then read the cache without asking the server). Raises ``CheckpointError`` at once when they are
    neither cached nor reachable."""
    from huggingface_hub import constants as hub
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or hub.HF_HUB_OFFLINE:
        return False  # timm and the hub then answer quickly by themselves
    if cfg.hf_hub_id:
        url, cached = hub.ENDPOINT, _hub_cached(cfg.hf_hub_id, cfg.hf_hub_filename)
    elif cfg.url:
        url, cached = cfg.url, os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints",
                                                           os.path.basename(urlparse(cfg.url).path)))
    else:
        return False
    host = _network_target(url)
    if _reachable(*host):
        return False
    if cached:
        return True
    raise CheckpointError(f"timm:{name}: cannot download the pretrained weights ({host[0]} does not answer: "
                          f"offline?); download them elsewhere and pass timm:{name}@/path/to/weights")


def _hub_cached(repo_id: str, filename: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, n), str) for n in names)


def _network_target(url: str) -> Tuple[str, int]:
    """``(host, port)`` a download of ``url`` connects to first: the HTTPS proxy when one is set."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    parsed = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else url)
    try:
        port = parsed.port
    except ValueError:
        port = None
    return parsed.hostname or "", port or (443 if parsed.scheme == "https" else 80)


def _reachable(host: str, port: int, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """True when a TCP connection to ``host:port`` opens within ``timeout`` seconds (name lookup included)."""
    answered = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.set()
        except OSError:
            pass

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return answered.is_set()


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Tell huggingface_hub to read its cache only (no request that would wait for the network)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def config_from_timm(reference: nn.Module, source: str) -> Dict[str, Any]:
    """``VisionTransformer`` kwargs equivalent to a timm ``VisionTransformer``; raises ``ConfigError``
    for variants this backbone does not implement (pre-norm, q/k norm, SwiGLU MLP, attention pooling)."""
    from timm.layers import Mlp as TimmMlp
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if not isinstance(reference, TimmViT):
        raise ConfigError(f"{source}: {type(reference).__name__} is not a plain timm VisionTransformer")
    block = reference.blocks[0]
    unsupported = [what for what, bad in [
        ("pre-norm", not isinstance(getattr(reference, "norm_pre", nn.Identity()), nn.Identity)),
        ("q/k norm", not isinstance(getattr(block.attn, "q_norm", nn.Identity()), nn.Identity)),
        ("gated MLP", type(block.mlp) is not TimmMlp),
        ("final norm", isinstance(reference.norm, nn.Identity)),
        ("LayerNorm", not isinstance(block.norm1, nn.LayerNorm)),
    ] if bad]
    if unsupported:
        raise ConfigError(f"{source}: unsupported ViT variant ({', '.join(unsupported)})")
    embed_dim = reference.embed_dim
    heads = [b.attn.num_heads for b in reference.blocks]
    return dict(img_size=list(reference.patch_embed.img_size), patch_size=reference.patch_embed.patch_size[0],
                in_chans=reference.patch_embed.proj.in_channels, embed_dim=embed_dim, depth=len(heads),
                num_heads=heads[0], last_heads=heads[-1] if heads[-1] != heads[0] else None,
                mlp_ratio=block.mlp.fc1.out_features / embed_dim, qkv_bias=block.attn.qkv.bias is not None,
                layer_scale=1e-5 if hasattr(block.ls1, "gamma") else None, norm_eps=block.norm1.eps,
                class_token=reference.cls_token is not None, num_reg_tokens=reference.num_reg_tokens,
                no_embed_class=reference.no_embed_class)


# ============================================================================================ saving
def save_checkpoint(model: VisionTransformer, path: PathLike, meta: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model``'s weights as safetensors with a JSON config in the header, atomically.

    The config holds the architecture (``VisionTransformer`` kwargs plus ``heads_per_block``), patch and
    image size, the input normalisation (default: InfMix mean/std) and any ``meta`` entries (JSON-able).
    ``load_model(path)`` rebuilds the model from it. Returns the path written."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: checkpoints are written as .safetensors; change the file name")
    config = dict(model.config, heads_per_block=model.heads_per_block)
    document = {"architecture": "VisionTransformer", "normalization": DEFAULT_NORMALIZATION,
                **dict(meta or {}), "model": config}
    try:
        header = json.dumps(document)
    except TypeError as err:
        raise ConfigError(f"checkpoint metadata must be JSON-serialisable: {err}") from err
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", CONFIG_METADATA_KEY: header})
    return path


# ============================================================================================ info
def describe_checkpoint(source: PathLike, allow_partial: bool = True) -> str:
    """A human-readable summary of a checkpoint: architecture, where it came from, load report."""
    loaded = open_model(source, allow_partial=allow_partial)
    model = loaded.model
    config = model.config
    heads = model.heads_per_block
    heads_text = f"{heads[0]}" if len(set(heads)) == 1 else f"{heads[0]} (last block: {heads[-1]})"
    lines = [
        f"source:        {source}",
        f"architecture:  ViT width {config['embed_dim']}, depth {config['depth']}, heads {heads_text}, "
        f"patch {config['patch_size']}, image {config['img_size'][0]}x{config['img_size'][1]}, "
        f"{config['pos_embed_type']} position embedding",
        f"parameters:    {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M",
        f"from:          {loaded.architecture_from}",
        f"weights:       {loaded.report.summary()}",
    ]
    lines += [f"{key + ':':<14} {value}" for key, value in loaded.meta.items() if key != "architecture"]
    return "\n".join(lines)


__all__ = ["SAFE_GLOBALS", "LoadReport", "LoadedModel", "config_from_timm", "create_model",
           "describe_checkpoint", "extract_state_dict", "infer_architecture", "load_model", "load_weights",
           "normalize_keys", "open_model", "read_checkpoint", "save_checkpoint"]
