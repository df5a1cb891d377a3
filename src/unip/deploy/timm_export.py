"""A pre-trained backbone (``unip pretrain`` output, the release's UNIP ``.pth``, anything ``unip info`` reads)
or the backbone of a fine-tuned segmentor, as a folder that timm loads: ``model.safetensors`` + ``config.json``
(timm's Hugging Face layout).

Two ways to load it (``TimmExport.usage`` prints both with the right arguments)::

    timm.create_model("local-dir:OUT", pretrained=True, num_classes=0)      # config.json holds everything
    timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="OUT/model.safetensors", num_classes=0), **model_args)

What timm 1.0 expects, and what the export writes:

* timm's key names (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.norm1/attn.qkv/attn.proj/
  ls1.gamma/norm2/mlp.fc1/mlp.fc2/ls2.gamma``, ``norm``): unip's backbone uses them, the tensors are written as
  they are;
* ``pos_embed`` ``[1, 1 + h·w, D]`` with its CLS row: a UNIP student's fixed 2-D sin-cos table (CLS row zero)
  is written as values; timm holds it as a learned table, so fine-tuning in timm will train it;
* no classifier: ``num_classes`` 0 in the config; ask timm for ``num_classes=0`` (features) or any other
  number for a new, randomly initialised head. With ``num_classes=0`` in the overlay too, timm loads strictly
  and names any key that does not fit;
* ``model_args``: ``img_size`` of the table (224 for pre-trained students, 512 for segmentor backbones; add
  ``dynamic_img_size=True`` for other sizes), ``init_values`` when the blocks have layer scale (segmentor
  backbones), and the width, depth and head count, in case the architecture name's defaults differ; the block
  variants in timm's arguments (``qk_norm``, ``act_layer``, ``scale_mlp_norm``);
* gated MLPs: a config.json cannot name an MLP class, so a ``swiglu_packed`` backbone is written under
  ``vit_giant_patch14_dinov2`` (timm's architecture with ``SwiGLUPacked``; ``model_args`` set everything else),
  and a ``swiglu`` one (``fc1_g``/``fc1_x``) is first rewritten as the same function in the packed layout:
  ``fc1`` = ``fc1_g`` stacked on ``fc1_x`` (``packed_swiglu``);
* ``mean`` / ``std`` the weights were trained with (InfMix's for UNIP students, the fine-tuning's for segmentors,
  timm's ``pretrained_cfg`` for ``timm:`` sources, ImageNet's, with a note, for other release files such as
  MAE or DINO).

Heads: timm's ``VisionTransformer`` has one head count for all blocks. A UNIP student's last block has the
teacher block's (16 after MAE-L / iBOT-L, against 6 in the other blocks of UNIP-S): the export refuses it
unless ``last_block_heads="default"``, which writes the same weights for a last block of the default count —
its q, k and v are then split into 6 heads of width 64 instead of 16 of width 24, so that block's attention
and output change (the release's fine-tuning rebuilds the block the same way).

The export is checked before it is put in place: timm builds the model from the written files (both ways, where
the installed timm knows ``local-dir:``) and its ``forward_features`` must match unip's backbone within 1e-4.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from unip.atomic import atomic_write_text
from unip.checkpoint import CONFIG_METADATA_KEY, DEFAULT_NORMALIZATION, open_model, read_checkpoint
from unip.errors import ConfigError, ExportError
from unip.models.presets import PRESETS
from unip.models.vit import VisionTransformer, mlp_ratio_of
from unip.outputs import claim, is_our_json, out_folder, staging_folder
from unip.seg.checkpoint import load_segmentor
from unip.seg.pipeline import RECIPE_META

log = logging.getLogger(__name__)

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
EXPORT_KEY = "unip.timm_export"
TOLERANCE = 1e-4
#: ImageNet's mean/std (timm's ``IMAGENET_DEFAULT_*``), what the MAE, DINO, iBOT and DeiT releases trained with.
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
#: timm architectures by (width, heads, patch): the name the config gives (``model_args`` set the rest).
TIMM_NAMES: Dict[Tuple[int, int, int], str] = {
    (192, 3, 16): "vit_tiny_patch16_224", (384, 6, 16): "vit_small_patch16_224",
    (768, 12, 16): "vit_base_patch16_224", (1024, 16, 16): "vit_large_patch16_224",
    (1280, 16, 14): "vit_huge_patch14_224",
}
#: The timm architecture whose MLP is ``SwiGLUPacked`` (a config.json names no MLP class: the architecture fixes
#: it, ``model_args`` set the rest, the activation and layer scale included).
TIMM_GATED_NAME = "vit_giant_patch14_dinov2"


@dataclass
class TimmExport:
    """What ``export_timm`` wrote: the folder, timm's architecture name and ``model_args``, and the largest
    difference of timm's features from unip's for each way of loading that was checked."""

    folder: str
    architecture: str
    model_args: Dict[str, Any]
    source_kind: str
    differences: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def weights(self) -> str:
        return os.path.join(self.folder, WEIGHTS_FILE)

    def usage(self) -> str:
        """Python lines that load the export in timm."""
        args = "".join(f", {k}={v!r}" for k, v in self.model_args.items())
        return (f'timm.create_model("local-dir:{self.folder}", pretrained=True, num_classes=0)\n'
                f'timm.create_model("{self.architecture}", pretrained=True, num_classes=0, '
                f'pretrained_cfg_overlay=dict(file="{self.weights}", num_classes=0){args})')


# ============================================================================================ sources
def is_segmentor_file(source: str) -> bool:
    """True for our segmentor ``.safetensors`` or the release's fine-tuned mmseg checkpoint."""
    if source.startswith("timm:"):
        return False
    content, metadata = read_checkpoint(source)
    if CONFIG_METADATA_KEY in metadata:
        try:
            return json.loads(metadata[CONFIG_METADATA_KEY]).get("architecture") == "Segmentor"
        except (ValueError, AttributeError):
            return False
    state = content.get("state_dict") if isinstance(content, Mapping) else None
    return isinstance(state, Mapping) and any(str(k).startswith("decode_head.") for k in state)


def open_backbone(source: str) -> Tuple[VisionTransformer, Dict[str, Any], str]:
    """``(backbone, meta, kind)`` of ``source``: a segmentor's backbone (kind ``"segmentor"``) or a
    pre-trained backbone (``"backbone"``); raises ``CheckpointError`` for files that are neither."""
    if is_segmentor_file(source):
        segmentor = load_segmentor(source)
        return segmentor.backbone, dict(segmentor.meta), "segmentor"
    loaded = open_model(source)
    return loaded.model, dict(loaded.meta), "backbone"


def uniform_heads(backbone: VisionTransformer, source: str, last_block_heads: Optional[str]) -> VisionTransformer:
    """``backbone`` when every block has one head count; with ``last_block_heads="default"`` the same weights
    with the default count in the last block too; otherwise ``ConfigError`` explaining the choice."""
    heads = backbone.heads_per_block
    if len(set(heads)) == 1:
        return backbone
    width = backbone.embed_dim
    if last_block_heads != "default":
        raise ConfigError(
            f"{source}: its last block has {heads[-1]} heads, the others {heads[0]}, but timm's VisionTransformer has "
            f"one head count for all blocks. --last-block-heads default exports the same weights with {heads[0]} "
            f"heads in the last block (q, k, v split into {heads[0]} heads of width {width // heads[0]} instead of "
            f"{heads[-1]} of width {width // heads[-1]}): that block's attention and output change, as in the "
            "release's fine-tuning, which rebuilds it the same way")
    config = dict(backbone.config, last_heads=None)
    rebuilt = VisionTransformer(**config)
    rebuilt.load_state_dict(backbone.state_dict())
    return rebuilt.eval()


def packed_swiglu(backbone: VisionTransformer) -> VisionTransformer:
    """``backbone`` when its MLPs are not ``swiglu``; otherwise the same function with ``swiglu_packed`` MLPs
    (timm's ``SwiGLUPacked``: ``fc1`` holds the gate rows ``fc1_g`` then the value rows ``fc1_x``)."""
    config = backbone.config
    if config.get("mlp_layer") != "swiglu":
        return backbone
    hidden = backbone.blocks[0].mlp.fc1_g.out_features
    packed = VisionTransformer(**dict(config, mlp_layer="swiglu_packed",
                                      mlp_ratio=mlp_ratio_of(2 * hidden, backbone.embed_dim)))
    own = backbone.state_dict()
    state = {key: value for key, value in own.items() if ".mlp.fc1_g." not in key and ".mlp.fc1_x." not in key}
    for gate in [key for key in own if ".mlp.fc1_g." in key]:
        state[gate.replace(".fc1_g.", ".fc1.")] = torch.cat([own[gate], own[gate.replace(".fc1_g.", ".fc1_x.")]])
    packed.load_state_dict(state)
    return packed.eval()


def timm_arguments(backbone: VisionTransformer, source: str) -> Tuple[str, Dict[str, Any]]:
    """``(architecture name, model_args)`` of the timm ``VisionTransformer`` that holds ``backbone``'s
    weights (``swiglu`` MLPs rewritten by ``packed_swiglu`` first). Raises ``ConfigError`` for what timm's model
    cannot express."""
    config = backbone.config
    if abs(float(config["norm_eps"]) - 1e-6) > 1e-12:
        raise ConfigError(f"{source}: LayerNorm eps {config['norm_eps']}, but timm's ViT fixes it at 1e-6 in "
                          "config.json-loadable models")
    if config.get("mlp_layer") == "swiglu":
        raise ConfigError(f"{source}: timm's config.json cannot name a SwiGLU MLP with fc1_g/fc1_x; export the "
                          "packed layout (unip.deploy.timm_export.packed_swiglu)")
    key = (backbone.embed_dim, backbone.heads_per_block[0], backbone.patch_size)
    gated = config.get("mlp_layer") == "swiglu_packed"
    name = TIMM_GATED_NAME if gated else TIMM_NAMES.get(key, "vit_base_patch16_224")
    args: Dict[str, Any] = {
        "img_size": list(config["img_size"]), "patch_size": backbone.patch_size, "in_chans": config["in_chans"],
        "embed_dim": backbone.embed_dim, "depth": backbone.depth, "num_heads": backbone.heads_per_block[0],
        "mlp_ratio": float(config["mlp_ratio"]), "qkv_bias": bool(config["qkv_bias"]),
        "class_token": bool(config["class_token"]), "reg_tokens": int(config["num_reg_tokens"]),
        "no_embed_class": bool(config["no_embed_class"]),
        "global_pool": "token" if config["class_token"] else "avg",
    }
    if config.get("layer_scale") or gated:
        # the gated architecture has layer scale unless told otherwise: 0 turns it off (timm.create_model drops
        # None arguments, and its blocks take a false init_values for none)
        args["init_values"] = float(config["layer_scale"] or 0.0)
    if gated or config.get("act_layer", "gelu") != "gelu":
        args["act_layer"] = config.get("act_layer", "gelu")
    args.update({variant: True for variant in ("qk_norm", "scale_mlp_norm") if config.get(variant)})
    return name, args


# ============================================================================================ export
def export_timm(source: str, folder: str, last_block_heads: Optional[str] = None,
                tolerance: float = TOLERANCE) -> TimmExport:
    """Write the backbone of ``source`` to ``folder`` as ``model.safetensors`` + ``config.json`` (module
    docstring), after checking that timm loads it and computes the same features. Raises ``ConfigError``
    (options, output folder, head counts), ``CheckpointError`` (source) or ``ExportError`` (timm disagrees)."""
    out_folder(folder, "--out")
    targets = [os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, CONFIG_FILE)]
    claim(targets[:1], _is_our_weights, "--out")
    claim(targets[1:], is_our_json(["architecture", "model_args", "unip"]), "--out")
    if last_block_heads not in (None, "pretrained", "default"):
        raise ConfigError(f"--last-block-heads {last_block_heads!r}: use 'default' (or leave it out)")
    backbone, meta, kind = open_backbone(source)
    pretrained_heads = backbone.heads_per_block
    backbone = uniform_heads(backbone.eval(), source, last_block_heads)
    packed = packed_swiglu(backbone)
    name, args = timm_arguments(packed, source)
    result = TimmExport(os.path.abspath(folder), name, args, kind)
    if packed is not backbone:
        result.notes.append("the SwiGLU MLPs' fc1_g and fc1_x are written stacked as fc1, timm's SwiGLUPacked "
                            "layout: the same function")
        backbone = packed
    if backbone.heads_per_block != pretrained_heads:
        result.notes.append(f"the last block has {args['num_heads']} heads in the export, {pretrained_heads[-1]} in "
                            f"{os.path.basename(source)}: its attention and output differ from the pre-trained block's")
    staging = staging_folder(result.folder, "--out")
    try:
        _write(backbone, staging, name, args, _normalization(meta, kind, result.notes), source, kind)
        result.differences = check_in_timm(backbone, staging, name, args, tolerance)
        os.makedirs(folder, exist_ok=True)
        for filename in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(os.path.join(staging, filename), os.path.join(folder, filename))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _normalization(meta: Mapping[str, Any], kind: str, notes: List[str]) -> Dict[str, List[float]]:
    """The input normalisation (0–1 scale) the weights were trained with: the one the checkpoint records (unip's
    files, timm's ``pretrained_cfg`` for ``timm:`` sources); without one, fine-tuning's for a segmentor,
    pre-training's (InfMix) for the release's UNIP student (its ``args``), and ImageNet's, with a note in
    ``notes``, for other release files (MAE, DINO, iBOT, DeiT were pre-trained with it)."""
    norm = meta.get("normalization")
    if not isinstance(norm, Mapping):
        if kind == "segmentor":
            norm = RECIPE_META["normalization"]
        elif meta.get("model") in PRESETS:
            norm = DEFAULT_NORMALIZATION
        else:
            norm = IMAGENET_NORMALIZATION
            notes.append("the file records no input normalisation: config.json states ImageNet's mean/std, with "
                         "which MAE, DINO, iBOT and DeiT were pre-trained; edit pretrained_cfg if yours differs")
    return {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]}


def _write(backbone: VisionTransformer, folder: str, name: str, args: Dict[str, Any],
           normalization: Dict[str, List[float]], source: str, kind: str) -> None:
    from safetensors.torch import save_file

    provenance = {"source": os.path.basename(source), "kind": kind, "heads_per_block": backbone.heads_per_block}
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(tensors, os.path.join(folder, WEIGHTS_FILE),
              metadata={"format": "pt", EXPORT_KEY: json.dumps(provenance)})
    height, width = args["img_size"]
    config = {
        "architecture": name,
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "tag": "unip", "custom_load": False, "input_size": [args["in_chans"], height, width],
            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": normalization["mean"], "std": normalization["std"], "num_classes": 0,
            "first_conv": "patch_embed.proj", "classifier": "head",
            "description": f"unip export of {provenance['source']} ({kind} backbone)",
        },
        "unip": provenance,
    }
    atomic_write_text(os.path.join(folder, CONFIG_FILE), json.dumps(config, indent=2) + "\n")


def check_in_timm(backbone: VisionTransformer, folder: str, name: str, args: Dict[str, Any],
                  tolerance: float = TOLERANCE) -> Dict[str, float]:
    """Build the timm model from the files in ``folder`` (``local-dir:`` where the installed timm knows it,
    and the ``pretrained_cfg_overlay`` file route) and compare ``forward_features`` with ``backbone``'s on a
    seeded random input; returns the max-abs difference per route, raises ``ExportError`` above
    ``tolerance``."""
    import timm

    weights = os.path.join(folder, WEIGHTS_FILE)
    routes = {"pretrained_cfg_overlay": lambda: timm.create_model(
        name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=weights, num_classes=0), **args)}
    if _knows_local_dir(timm):
        routes["local-dir"] = lambda: timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
    height, width = args["img_size"]
    image = torch.randn(2, args["in_chans"], height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone.forward_features(image)
    differences = {}
    for route, build in routes.items():
        try:
            model = build().eval()
        except Exception as err:  # timm raises RuntimeError/KeyError/... for files that do not fit
            raise ExportError(f"timm cannot load the export ({route}): {type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
        with torch.no_grad():
            got = model.forward_features(image)
        differences[route] = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
        if not differences[route] <= tolerance:
            raise ExportError(f"timm's features of the export ({route}) differ from unip's by "
                              f"{differences[route]:.3g} (max abs; allowed {tolerance:g}); nothing was written")
    return differences


def _knows_local_dir(timm) -> bool:
    try:
        from timm.models._factory import parse_model_name

        return parse_model_name("local-dir:x")[0] == "local-dir"
    except (ImportError, ValueError):
        return False


def _is_our_weights(path: str) -> bool:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as handle:
        return EXPORT_KEY in (handle.metadata() or {})
