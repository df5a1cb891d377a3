"""ViT backbones and their weights: loading weights by name with a report, building a backbone from an
architecture, describing it, and saving self-describing safetensors files. ``unip.checkpoint.sources`` opens a
backbone from any source."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from unip.atomic import atomic_path
from unip.checkpoint.architecture import _misfit
from unip.checkpoint.reading import (CONFIG_METADATA_KEY, PathLike, _preview, extract_state_dict,
                                     normalize_keys, read_checkpoint)
from unip.data.transforms import INFMIX_MEAN, INFMIX_STD
from unip.engine.checkpointing import describe_names, non_finite_tensors
from unip.errors import CheckpointError, ConfigError
from unip.models.pos_embed import is_square_grid, resample_pos_embed
from unip.models.vit import VisionTransformer

DEFAULT_NORMALIZATION = {"mean": [INFMIX_MEAN] * 3, "std": [INFMIX_STD] * 3}


@dataclass
class LoadReport:
    """What ``load_weights`` did with each key of a checkpoint. ``ignored``: keys set aside because they may be
    (``IGNORED_KEY``); ``unexpected``: any other key the model has no place for, which a strict load refuses."""

    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    reshaped: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    #: loaded weights holding NaN or an infinity
    non_finite: List[str] = field(default_factory=list)
    #: why a strict load refuses these weights (its ``CheckpointError`` message); ``None`` when they load
    problem: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched and not self.unexpected and not self.non_finite

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} loaded"]
        for name, label in (("non_finite", "not finite"), ("missing", "missing"),
                            ("mismatched", "mismatched"), ("unexpected", "unexpected"), ("reshaped", "reshaped"),
                            ("ignored", "ignored")):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{len(keys)} {label} ({_preview(keys)})")
        return ", ".join(parts)


# ============================================================================================ loading
def load_weights(model: VisionTransformer, source: Union[PathLike, Mapping[str, Tensor]],
                 allow_partial: bool = False, name: Optional[str] = None) -> LoadReport:
    """Load a checkpoint file (or a state dict) into ``model`` by name.

    Position tables of another grid are resampled bicubically. Returns a ``LoadReport``. Raises
    ``CheckpointError`` naming the file (``name`` for a state dict read from one) and the keys when a
    backbone weight is missing or has another shape, when the file holds a weight the model has no place for
    (other than the keys ``IGNORED_KEY`` allows to set aside: such a weight changes the computation), or when a
    weight holds NaN or an infinity, unless ``allow_partial`` (then the model keeps its own values for missing
    and mis-shaped weights, the others are left out, and the report's ``problem`` says what a strict load
    refuses)."""
    if isinstance(source, Mapping):
        name = name or "state dict"
        state_dict = extract_state_dict(source, name)
    else:
        name = name or str(source)
        state_dict = extract_state_dict(read_checkpoint(source)[0], name)
    state_dict, ignored = normalize_keys(state_dict, name)
    report = LoadReport(source=name, ignored=ignored)
    own = model.state_dict()
    params = dict(model.named_parameters())
    to_load: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        if key == "pos_embed" and value.shape != own[key].shape:
            try:
                value = _fit_pos_embed(value, model, name)
                report.reshaped.append(key)
            except CheckpointError:
                pass  # reported as mismatched, with the file's shape
        if value.shape != own[key].shape:
            report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
            continue
        to_load[key] = value
    # A fixed (non-trainable) sin-cos table is rebuilt by the model: not required from the file.
    required = [k for k in own if k not in params or params[k].requires_grad]
    report.missing = [k for k in required if k not in state_dict]
    report.loaded = sorted(to_load)
    report.non_finite = non_finite_tensors(to_load)  # once per tensor, one host sync per device
    if report.missing or report.mismatched or report.unexpected:
        report.problem = _misfit(name, "the model", report.missing, report.mismatched, report.unexpected)
    elif report.non_finite:
        report.problem = non_finite_problem(name, report.non_finite)
    if report.problem and not allow_partial:
        raise CheckpointError(report.problem)
    model.load_state_dict(to_load, strict=False)
    return report


def non_finite_problem(source: str, names: List[str]) -> str:
    """The refusal of weights that hold NaN or an infinity (``names``: those tensors)."""
    return (f"{source}: {describe_names(names)} hold NaN or infinite values ({len(names)} tensor(s)); the file is "
            "damaged or was saved after training diverged: use an earlier checkpoint of that run")


def _fit_pos_embed(table: Tensor, model: VisionTransformer, source: str) -> Tensor:
    """Resample a position table ``[1, rows, D]`` (or ``[rows, D]``) to the model's grid and prefix."""
    if table.ndim not in (2, 3) or table.shape[-1] != model.embed_dim or (table.ndim == 3 and table.shape[0] != 1):
        raise CheckpointError(f"{source}: pos_embed of shape {tuple(table.shape)} does not fit width "
                              f"{model.embed_dim}; expected [1, rows, {model.embed_dim}]")
    table = table.reshape(1, -1, table.shape[-1])
    model_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    for prefix in dict.fromkeys((model_prefix, 1, 0, model.num_prefix_tokens)):
        if is_square_grid(table.shape[1] - prefix):
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
    #: why a strict open (what every verb but ``unip info`` does) refuses the source; ``None`` when it loads
    problem: Optional[str] = None


def build_backbone(config: Dict[str, Any], source: str) -> VisionTransformer:
    try:
        return VisionTransformer(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: cannot build the architecture {config}: {err}") from err


def backbone_lines(model: VisionTransformer) -> List[str]:
    """The ``architecture:`` and ``parameters:`` lines of ``unip info`` for a backbone."""
    config, heads = model.config, model.heads_per_block
    heads_text = f"{heads[0]}" if len(set(heads)) == 1 else f"{heads[0]} (last block: {heads[-1]})"
    return [f"architecture:  ViT width {config['embed_dim']}, depth {config['depth']}, heads {heads_text}, "
            f"patch {config['patch_size']}, image {config['img_size'][0]}x{config['img_size'][1]}, "
            f"{config['pos_embed_type']} position embedding{_variants_text(config)}",
            f"parameters:    {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"]


def _variants_text(config: Mapping[str, Any]) -> str:
    """``", q/k norm, SwiGLU MLP (packed), SiLU"``: the block variants a config sets (empty for a plain ViT)."""
    mlp = {"swiglu_packed": "SwiGLU MLP (packed fc1, timm's SwiGLUPacked)", "swiglu": "SwiGLU MLP (fc1_g, fc1_x)"}
    parts = (["q/k norm"] if config.get("qk_norm") else []) + \
        ([mlp[config["mlp_layer"]]] if config.get("mlp_layer", "mlp") != "mlp" else []) + \
        ([f"MLP activation {config['act_layer']}"] if config.get("act_layer", "gelu") != "gelu" else []) + \
        (["MLP norm"] if config.get("scale_mlp_norm") else [])
    return "".join(", " + part for part in parts)


# ============================================================================================ saving
def save_checkpoint(model: VisionTransformer, path: PathLike, meta: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model``'s weights as safetensors with a JSON config in the header, atomically.

    The config holds the architecture (``VisionTransformer`` kwargs plus ``heads_per_block``), patch and
    image size, the input normalisation (default: InfMix mean/std) and any ``meta`` entries (JSON-able).
    ``load_model(path)`` rebuilds the model from it. Returns the path written."""
    return write_model_file(model, path, checkpoint_header(model, meta), "checkpoints")


def write_model_file(module: nn.Module, path: PathLike, header: str, what: str) -> Path:
    """Write ``module``'s weights as safetensors with ``header`` as its ``unip.config`` metadata, atomically;
    ``what`` names the files in the error for another suffix. Returns the path written."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: {what} are written as .safetensors; change the file name")
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", CONFIG_METADATA_KEY: header})
    return path


def checkpoint_header(model: VisionTransformer, meta: Optional[Mapping[str, Any]] = None) -> str:
    """The JSON document ``save_checkpoint`` writes in the header (``unip.config``): ``architecture``,
    ``normalization`` (default: InfMix mean/std), the ``meta`` entries and ``model`` (``VisionTransformer`` kwargs
    plus ``heads_per_block``). Raises ``ConfigError`` when ``meta`` is not JSON-serialisable."""
    config = dict(model.config, heads_per_block=model.heads_per_block)
    document = {"architecture": "VisionTransformer", "normalization": DEFAULT_NORMALIZATION,
                **dict(meta or {}), "model": config}
    try:
        return json.dumps(document)
    except TypeError as err:
        raise ConfigError(f"checkpoint metadata must be JSON-serialisable: {err}") from err
