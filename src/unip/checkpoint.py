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
import json
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from unip.atomic import atomic_path
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
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pickle(path), {}


def _read_safetensors(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


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
            f"{path}: refused to load, the file needs Python objects outside the allow-list "
            f"({culprit[:200]}). Loading it could run code from the file. If you trust its "
            "origin, re-save only its state dict (torch.save(ckpt['model'], 'weights.pth')) and load "
            "that") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def extract_state_dict(content: Any, source: str = "checkpoint") -> Dict[str, Tensor]:
    """Unwrap ``model`` / ``state_dict`` / ``teacher`` / ``student`` / ``module`` containers until a
    mapping of tensors remains. Returns that state dict (keys unchanged)."""
    for _ in range(4):
        if _is_state_dict(content):
            return dict(content)
        if not isinstance(content, Mapping):
            break
        inner = next((content[k] for k in CONTAINER_KEYS if isinstance(content.get(k), Mapping)), None)
        if inner is None:
            break
        content = inner
    found = sorted(content.keys()) if isinstance(content, Mapping) else type(content).__name__
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
                 allow_partial: bool = False) -> LoadReport:
    """Load a checkpoint file (or a state dict) into ``model`` by name.

    Position tables of another grid are resampled bicubically. Returns a ``LoadReport``. Raises
    ``CheckpointError`` naming the keys when a backbone weight is missing or has another shape,
    unless ``allow_partial`` (then the model keeps its own values for those)."""
    if isinstance(source, Mapping):
        name, state_dict = "state dict", extract_state_dict(source)
    else:
        name = str(source)
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
        problems = []
        if report.missing:
            problems.append(f"missing {_preview(report.missing)}")
        if report.mismatched:
            problems.append(f"shape mismatch {_preview(report.mismatched)}")
        raise CheckpointError(f"{name}: does not fit the model: {'; '.join(problems)}. Check that the "
                              "checkpoint matches the architecture, or pass allow_partial=True "
                              "(--allow-partial) to keep the model's own values for those keys")
    model.load_state_dict(to_load, strict=False)
    return report


def _fit_pos_embed(table: Tensor, model: VisionTransformer, source: str) -> Tensor:
    """Resample a position table ``[1, rows, D]`` (or ``[rows, D]``) to the model's grid and prefix."""
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
    """Like ``load_model`` but returns a ``LoadedModel`` with the report and metadata."""
    text = str(source)
    if text.startswith("timm:"):
        loaded = _open_timm(text[len("timm:"):], allow_partial, overrides)
    else:
        content, metadata = read_checkpoint(source)
        state_dict = extract_state_dict(content, text)
        config, architecture_from, meta = _architecture(content, metadata, state_dict, text)
        config.update(overrides)
        model = _build(config, text)
        report = load_weights(model, state_dict, allow_partial=allow_partial)
        report.source = text
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
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{source}: corrupt '{CONFIG_METADATA_KEY}' metadata ({err})") from err
        config.pop("heads_per_block", None)
        return config, "unip metadata", meta
    args = content.get("args") if isinstance(content, Mapping) else None
    if isinstance(args, argparse.Namespace) and getattr(args, "model", None) in PRESETS:
        config = dict(PRESETS[args.model])
        if getattr(args, "last_heads", None):
            config["last_heads"] = int(args.last_heads)
        config["drop_path_rate"] = 0.0
        meta = {k: v for k, v in vars(args).items() if k in ("model", "last_heads", "teacher_model",
                                                            "intermediate", "input_size")}
        return config, f"release args (model={args.model}, last_heads={config.get('last_heads')})", meta
    return infer_architecture(state_dict, source), "inferred from weight shapes", {}


def infer_architecture(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> Dict[str, Any]:
    """Derive ``VisionTransformer`` kwargs from weight shapes (release key names accepted).

    Head counts cannot be read from weights: the standard count of that width is used (else 64
    channels per head); override with ``num_heads`` / ``last_heads`` when that is wrong."""
    sd, _ = normalize_keys(state_dict)
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError(f"{source}: no patch_embed.proj.weight, not a ViT backbone checkpoint")
    embed_dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m), default=-1)
    if depth == 0:
        raise CheckpointError(f"{source}: no blocks.* weights, not a ViT backbone checkpoint")
    heads = next((s["num_heads"] for s in VIT_SIZES.values() if s["embed_dim"] == embed_dim),
                 max(1, embed_dim // 64))
    class_token = "cls_token" in sd
    num_reg = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    rows = sd["pos_embed"].reshape(-1, embed_dim).shape[0] if "pos_embed" in sd else 196
    prefix = int(class_token) + num_reg
    no_embed_class = prefix > 0 and int((rows) ** 0.5) ** 2 == rows
    side = int((rows - (0 if no_embed_class else prefix)) ** 0.5)
    return dict(img_size=side * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
                qkv_bias="blocks.0.attn.qkv.bias" in sd,
                layer_scale=1e-5 if "blocks.0.ls1.gamma" in sd else None,
                class_token=class_token, num_reg_tokens=num_reg, no_embed_class=no_embed_class)


# ============================================================================================ timm
def _open_timm(spec: str, allow_partial: bool, overrides: Dict[str, Any]) -> LoadedModel:
    """``NAME`` (timm downloads the weights) or ``NAME@FILE`` (a local weights file, read by our safe
    reader and passed through the model family's timm ``checkpoint_filter_fn`` for release layouts)."""
    name, _, weights_file = spec.partition("@")
    reference = _create_timm(name, pretrained=not weights_file)
    config = config_from_timm(reference, f"timm:{name}")
    config.update(overrides)
    model = _build(config, f"timm:{name}")
    if weights_file:
        state_dict = extract_state_dict(read_checkpoint(weights_file)[0], weights_file)
        filter_fn = getattr(sys.modules[type(reference).__module__], "checkpoint_filter_fn", None)
        state_dict = filter_fn(state_dict, reference) if filter_fn else state_dict
    else:
        state_dict = reference.state_dict()
    report = load_weights(model, state_dict, allow_partial=allow_partial)
    report.source = f"timm:{spec}"
    return LoadedModel(model, report, f"timm model {name}", {"timm_model": name})


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    """``timm.create_model(name)`` without a classifier; errors become ``CheckpointError``."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise CheckpointError(f"timm:{name}: unknown timm model; see timm.list_models()") from err
        raise CheckpointError(f"timm:{name}: timm could not load the weights ({err})") from err
    except Exception as err:  # network and hub errors come in many types
        raise CheckpointError(
            f"timm:{name}: could not get pretrained weights ({type(err).__name__}: {str(err)[:160]}). "
            f"Offline, download the file elsewhere and pass timm:{name}@/path/to/weights") from err


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
