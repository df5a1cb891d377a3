"""Saving and loading fine-tuned segmentors: our safetensors files and the release's mmseg checkpoints.

Our file: safetensors with the ``Segmentor``'s state dict and, in the header (``unip.config``), a JSON
document ``{"architecture": "Segmentor", "model": backbone kwargs + heads_per_block, "segmentor": the rest of
the config, "normalization", "crop_size", "stride", "class_names", "palette", ...}``. Its ``model`` entry has
the layout of a backbone checkpoint, so ``unip.checkpoint.load_model`` also reads the fine-tuned backbone
from it.

The release's fine-tuned checkpoints (``{"meta", "state_dict"}``, mmsegmentation 0.x, layout in
docs/checkpoints.md) hold no configuration: the architecture is read from the shapes
(width, depth, classes, UperNet and FCN widths), every block has width / 64 heads (as the release built
them), the neck is LL-FPN (the release's train scripts set ``out_indices=[11]*4``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from unip.checkpoint import (CONFIG_METADATA_KEY, backbone_lines, check_architecture, check_fits, infer_architecture,
                             normalize_keys, read_checkpoint)
from unip.checkpoint.backbone import non_finite_problem, write_model_file
from unip.engine.checkpointing import non_finite_tensors
from unip.errors import CheckpointError, ConfigError
from unip.models.segmentor import Segmentor
from unip.seg.build import AUXILIARY_HEAD, default_drop_path, fit_problems
from unip.seg.pipeline import RECIPE_META, InferencePipeline
from unip.text import one_line

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
ARCHITECTURE = "Segmentor"


# ============================================================================================ saving
def save_segmentor(segmentor: Segmentor, path: PathLike, meta: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``segmentor`` as safetensors with its config and ``segmentor.meta`` (updated by ``meta``:
    class names, palette, normalisation, crop/stride, training facts; JSON-able) in the header, atomically.
    ``load_segmentor(path)`` rebuilds it. Returns the path written."""
    return write_model_file(segmentor, path, segmentor_header(segmentor, meta), "segmentors")


def segmentor_header(segmentor: Segmentor, meta: Optional[Mapping[str, Any]] = None) -> str:
    """The JSON document ``save_segmentor`` writes in the header (module docstring); ``ConfigError`` when
    ``meta`` is not JSON-serialisable."""
    config = dict(segmentor.config)
    backbone = dict(config.pop("backbone"), heads_per_block=segmentor.backbone.heads_per_block)
    document = {**segmentor.meta, **dict(meta or {}), "architecture": ARCHITECTURE, "model": backbone,
                "segmentor": config}
    try:
        return json.dumps(document)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"segmentor metadata must be JSON-serialisable: {err}") from err


# ============================================================================================ loading
def load_segmentor(path: PathLike) -> Segmentor:
    """Rebuild a ``Segmentor`` with its weights from our ``.safetensors`` file or the release's fine-tuned
    mmseg checkpoint; returns it in eval mode on the CPU. Raises ``CheckpointError`` naming the file (and
    the keys) when it is not a segmentor or its weights do not fit."""
    source = str(path)
    content, metadata = read_checkpoint(path)
    if CONFIG_METADATA_KEY in metadata:
        config, meta = _config_from_header(metadata[CONFIG_METADATA_KEY], source)
        state = dict(content)
    else:
        state_dict = content.get("state_dict") if isinstance(content, Mapping) else None
        if not isinstance(state_dict, Mapping) or not any(k.startswith("decode_head.") for k in state_dict):
            raise CheckpointError(f"{source}: not a segmentation checkpoint (expected our .safetensors segmentor "
                                  "or an mmsegmentation {'meta', 'state_dict'} file with decode_head.* weights)")
        release_meta = content.get("meta") if isinstance(content.get("meta"), Mapping) else {}
        config, state, meta = release_segmentor(state_dict, release_meta, source)
    check_architecture(config["backbone"], source)  # bounded before anything is allocated
    skeleton = _check_shapes(config, meta, state, source)  # the header matched against the tensors, likewise
    ours = CONFIG_METADATA_KEY in metadata
    meta = _checked_classes(meta, skeleton.num_classes, source, strict=ours)
    InferencePipeline.from_meta(meta, source)  # a test pipeline that cannot run, or runs beyond the bounds
    segmentor = _build(config, meta, source)
    load_exact(segmentor, state, source)
    return segmentor.eval()


def _build(config: Mapping[str, Any], meta: Mapping[str, Any], source: str) -> Segmentor:
    """``Segmentor(config, meta)`` (on the meta device inside ``torch.device("meta")``); ``CheckpointError``
    naming ``source`` when the header cannot describe one."""
    try:
        return Segmentor(config, meta)
    except ConfigError as err:
        raise CheckpointError(f"{source}: cannot rebuild the segmentor: {err}") from err
    except (KeyError, TypeError, ValueError) as err:  # an entry missing from the header, or of the wrong type
        problem = f"no entry {err}" if isinstance(err, KeyError) else one_line(err)[:200]
        raise CheckpointError(f"{source}: cannot rebuild the segmentor from its header ({problem})") from err


def _check_shapes(config: Mapping[str, Any], meta: Mapping[str, Any], state: Mapping[str, Tensor],
                  source: str) -> Segmentor:
    """``CheckpointError`` unless the segmentor that ``config`` describes has exactly the weights of ``state``,
    checked before anything is allocated: the backbone against its expected shapes (a header that describes a
    much larger ViT than the tensors: ``check_fits``), then every weight of the model built on the meta device
    (shapes only, no memory). Returns that meta-device skeleton."""
    backbone = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
    check_fits(config["backbone"], backbone, source)
    with torch.device("meta"):
        skeleton = _build(config, meta, source)
    problems = fit_problems(skeleton.state_dict(), state, may_miss=("num_batches_tracked",))
    if problems:
        raise CheckpointError(f"{source}: its weights are not those of the segmentor it describes ({problems}); "
                              "the file is damaged, or its header was edited")
    return skeleton


def _checked_classes(meta: Dict[str, Any], num_classes: int, source: str, strict: bool) -> Dict[str, Any]:
    """``meta`` whose ``class_names`` and ``palette`` (when present) fit a head of ``num_classes``. A misfit is a
    ``CheckpointError`` in our file (``strict``: we wrote it wrongly, or it was edited) and, in a release file, a
    warning naming it, the misfit entries left out (ids and the VOC colours are used)."""
    shown = {"class_names": "meta.CLASSES", "palette": "meta.PALETTE"} if not strict else {}  # the file's names
    problems = {key: problem for key in ("class_names", "palette")
                for problem in [class_list_problem(key, meta.get(key), num_classes, shown.get(key, key))] if problem}
    if not problems:
        return meta
    text = " and ".join(problems.values())
    if strict:
        raise CheckpointError(f"{source}: its header's {text} for a head of {num_classes} classes; the file was "
                              "written wrongly or edited: write it again, or remove those entries from its header")
    log.warning("%s: %s for its %d classes (rows of decode_head.conv_seg.weight); not used", source, text,
                num_classes)
    return {key: value for key, value in meta.items() if key not in problems}


def class_list_problem(key: str, value: Any, num_classes: int, name: Optional[str] = None) -> Optional[str]:
    """What is wrong with ``class_names`` (texts) or ``palette`` (``[R, G, B]`` of 0..255) ``value`` for a head of
    ``num_classes`` (``None``: nothing, or absent), calling it ``name`` (default ``key``)."""
    name = name or key
    if value is None:
        return None
    if key == "class_names":
        fits = isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)
        what = f"{name} {_shown(value)} is not a list of names" if not fits else None
    else:
        fits = isinstance(value, (list, tuple)) and all(
            isinstance(colour, (list, tuple)) and len(colour) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in colour)
            for colour in value)
        what = f"{name} {_shown(value)} is not a list of [R, G, B] colours (0..255)" if not fits else None
    if what or len(value) == num_classes:
        return what
    unit = "name" if key == "class_names" else "colour"
    return f"{name} lists {len(value)} {unit}{'s' if len(value) != 1 else ''} ({_shown(value)})"


def _shown(value: Any, limit: int = 60) -> str:
    text = one_line(json.dumps(value, default=str)) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_segmentor_header(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(config, meta)`` of our segmentor file from its header alone (no tensor is read): the ``Segmentor``
    config and what ``segmentor.meta`` holds. Raises ``CheckpointError`` when it is not our segmentor file."""
    from safetensors import safe_open

    source = str(path)
    try:
        with safe_open(source, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # missing or damaged files raise SafetensorError, OSError, ...
        raise CheckpointError(f"{source}: not a readable safetensors file ({one_line(err)[:200]})") from err
    if CONFIG_METADATA_KEY not in metadata:
        raise CheckpointError(f"{source}: not a unip segmentor file (no '{CONFIG_METADATA_KEY}' header)")
    return _config_from_header(metadata[CONFIG_METADATA_KEY], source)


def _config_from_header(header: str, source: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    try:
        document = json.loads(header)
    except ValueError as err:
        raise CheckpointError(f"{source}: corrupt '{CONFIG_METADATA_KEY}' metadata ({err})") from err
    architecture = document.pop("architecture", None)
    if architecture != ARCHITECTURE:
        raise CheckpointError(f"{source}: a {architecture or 'backbone'} checkpoint, not a segmentor; use it as "
                              "the pre-trained backbone of a fine-tuning run instead")
    try:
        backbone = dict(document.pop("model"))
        config = dict(document.pop("segmentor"))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: segmentor metadata lacks its 'model'/'segmentor' entries") from err
    backbone.pop("heads_per_block", None)
    config["backbone"] = backbone
    return config, document


def load_exact(segmentor: Segmentor, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``segmentor`` requiring every key and shape to match (BatchNorm's
    ``num_batches_tracked`` may be absent) and every weight to be finite; raises ``CheckpointError`` naming
    ``source`` and the keys."""
    problems = fit_problems(segmentor.state_dict(), state, may_miss=("num_batches_tracked",))
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the segmentor: {problems}")
    non_finite = non_finite_tensors(dict(state))
    if non_finite:
        raise CheckpointError(non_finite_problem(source, non_finite))
    segmentor.load_state_dict(dict(state), strict=False)


# ============================================================================================ the release's
def release_segmentor(state_dict: Mapping[str, Tensor], meta: Mapping[str, Any], source: str
                      ) -> Tuple[Dict[str, Any], Dict[str, Tensor], Dict[str, Any]]:
    """``(Segmentor config, state dict in our names, meta)`` of a release (mmseg 0.x) fine-tuned checkpoint.

    Renames ``backbone.fpn*`` → ``neck.fpn*`` and ``gamma_1/2`` → ``ls1/ls2.gamma``; reads width, depth,
    classes and head widths from the shapes."""
    backbone_sd = {k: v for k, v in state_dict.items() if k.startswith("backbone.") and not _is_neck(k)}
    state, ignored = normalize_keys(backbone_sd, source)
    if ignored:
        log.warning("%s: ignored backbone keys %s", source, ", ".join(ignored))
    state = {f"backbone.{k}": v for k, v in state.items()}
    for key, value in state_dict.items():
        if _is_neck(key):
            state["neck." + key[len("backbone."):]] = value
        elif not key.startswith("backbone."):
            state[key] = value
    backbone = infer_architecture(backbone_sd, source)
    backbone.update(num_heads=max(1, backbone["embed_dim"] // 64), last_heads=None, pos_embed_type="learned",
                    layer_scale=1.0 if backbone["layer_scale"] else None, drop_path_rate=default_drop_path(backbone))
    config = {
        "backbone": backbone,
        "feature_layers": [backbone["depth"]],
        "neck": "llfpn",
        "decode_head": _release_upernet(state_dict, source),
        "auxiliary_head": _release_fcn(state_dict),
        "num_classes": int(_require(state_dict, "decode_head.conv_seg.weight", source).shape[0]),
        "frozen_backbone": False,
    }
    return config, state, _release_meta(meta, config["num_classes"], source)


def _is_neck(key: str) -> bool:
    return re.match(r"backbone\.fpn[1-4]\.", key) is not None


def _require(state_dict: Mapping[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state_dict:
        raise CheckpointError(f"{source}: no {key} in the state dict; not an LL-FPN + UperNet checkpoint of the "
                              "release")
    return state_dict[key]


def _release_upernet(state_dict: Mapping[str, Tensor], source: str) -> Dict[str, Any]:
    channels = int(_require(state_dict, "decode_head.bottleneck.conv.weight", source).shape[0])
    scales = {m.group(1) for k in state_dict for m in [re.match(r"decode_head\.psp_modules\.(\d+)\.", k)] if m}
    if len(scales) != 4:
        raise CheckpointError(f"{source}: {len(scales)} pyramid-pooling branches, expected 4 (scales 1, 2, 3, 6)")
    return {"type": "upernet", "channels": channels, "pool_scales": [1, 2, 3, 6], "dropout": 0.1}


def _release_fcn(state_dict: Mapping[str, Tensor]) -> Union[Dict[str, Any], None]:
    if "auxiliary_head.conv_seg.weight" not in state_dict:
        return None
    convs = sorted({int(m.group(1)) for k in state_dict
                    for m in [re.match(r"auxiliary_head\.convs\.(\d+)\.conv\.weight", k)] if m})
    first = state_dict.get("auxiliary_head.convs.0.conv.weight")
    channels = int(first.shape[0]) if first is not None else int(state_dict["auxiliary_head.conv_seg.weight"].shape[1])
    kernel = int(first.shape[-1]) if first is not None else 3
    return dict(AUXILIARY_HEAD, channels=channels, num_convs=len(convs), kernel_size=kernel)


def _release_meta(meta: Mapping[str, Any], num_classes: int, source: str) -> Dict[str, Any]:
    """Our meta for a release file: the recipe's test defaults, and class names / palette when mmseg stored
    them (``meta["CLASSES"]``, ``meta["PALETTE"]``); ``load_segmentor`` leaves out, with a warning, those that do
    not fit its classes."""
    out: Dict[str, Any] = {**RECIPE_META, "source_format": "mmsegmentation (UNIP release)", "pretrained": source}
    for key, ours in (("CLASSES", "class_names"), ("PALETTE", "palette")):
        if meta.get(key) is not None:
            out[ours] = _plain(meta[key])
    return out


def _plain(value: Any) -> Any:
    """``value`` with tuples and numpy arrays or scalars (mmseg may keep its palette as an array) as lists and
    Python numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value



# ============================================================================================ info
def describe_segmentor(path: PathLike) -> str:
    """A human-readable summary of a segmentor file (``unip info``): backbone, neck and heads, classes,
    parameters of the backbone and of the rest, test settings and where the file came from."""
    segmentor = load_segmentor(path)
    config, meta = segmentor.config, segmentor.meta
    head = config["decode_head"]
    head_text = f"{head['type']}" + (f" ({head['channels']} channels)" if "channels" in head else "")
    aux = config.get("auxiliary_head")
    if aux:
        head_text += f" + {aux['type']} auxiliary ({aux['channels']} channels, weight {aux['loss_weight']})"
    names = meta.get("class_names")
    backbone_params = sum(p.numel() for p in segmentor.backbone.parameters())
    total = sum(p.numel() for p in segmentor.parameters())
    lines = [f"source:        {path}", *backbone_lines(segmentor.backbone)[:1],
             f"segmentor:     neck {config.get('neck') or 'none'} on blocks {config['feature_layers']}, "
             f"decode head {head_text}",
             f"classes:       {segmentor.num_classes}" + (f" ({', '.join(names)})" if names else " (ids only)"),
             f"parameters:    {total / 1e6:.2f} M (backbone {backbone_params / 1e6:.2f} M, "
             f"neck and heads {(total - backbone_params) / 1e6:.2f} M)",
             f"from:          {meta.get('source_format', 'unip metadata')}"]
    shown = ("crop_size", "stride", "dataset", "pretrained", "train", "training_state")
    lines += [f"{key + ':':<14} {meta[key]}" for key in shown if key in meta]
    return "\n".join(lines)
