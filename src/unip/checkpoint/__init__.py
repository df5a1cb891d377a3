"""Reading every supported checkpoint format safely, and writing self-describing checkpoints.

Sources that ``load_model`` accepts:

* our own ``.safetensors`` files (written by ``save_checkpoint``: weights + a JSON config in the header),
* PyTorch files (``.pth/.pt/.bin``) of the UNIP, MAE, DINO, iBOT, DeiT and timm releases,
* ``timm:<name>`` (weights downloaded by timm) or ``timm:<name>@<file>`` (timm reads a local file).

Nothing is ever executed from a file: pickles are read with ``torch.load(weights_only=True)`` and an
explicit allow-list (``SAFE_GLOBALS``); anything else is refused with a ``CheckpointError``.

Modules: ``reading`` (safe file reading, release containers and key names), ``states`` (training states read
as the model file of their run), ``architecture`` (plausibility bounds, architecture from weight shapes),
``backbone`` (``load_weights``, ``load_model``/``open_model``, ``save_checkpoint``), ``timm_hub`` (``timm:``
sources). A fine-tuned segmentor file (header architecture
``Segmentor``) is rebuilt by ``unip.seg.load_segmentor``; ``load_model`` reads its backbone and
``describe_checkpoint`` describes the whole segmentor.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

from unip.checkpoint.architecture import (ARCHITECTURE_RULES, MAX_DEPTH, MAX_IMAGE_SIDE, MAX_PATCH, MAX_TOKENS,
                                          MAX_WIDTH, check_architecture, check_fits, expected_shapes,
                                          infer_architecture)
from unip.checkpoint.backbone import (DEFAULT_NORMALIZATION, LoadedModel, LoadReport, load_model, load_weights,
                                      open_model, save_checkpoint)
from unip.checkpoint.reading import (CONFIG_METADATA_KEY, CONTAINER_KEYS, IGNORED_KEY, SAFE_GLOBALS,
                                     STRIP_PREFIXES, PathLike, extract_state_dict, normalize_keys, read_checkpoint)
from unip.checkpoint.timm_hub import config_from_timm
from unip.models.presets import create_model

# ============================================================================================ info
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


def describe_checkpoint(source: PathLike, allow_partial: bool = True) -> str:
    """A human-readable summary of a checkpoint: architecture, where it came from, load report (for a
    segmentor also its neck, heads and classes)."""
    return inspect_checkpoint(source, allow_partial)[0]


def inspect_checkpoint(source: PathLike, allow_partial: bool = True) -> Tuple[str, Optional[str]]:
    """``(summary, problem)``: ``describe_checkpoint``'s text, and why the verbs that use a model (``analyze``,
    ``pretrain --teacher``, ``finetune --pretrained``) refuse ``source`` (missing, mis-shaped or non-finite
    weights: the ``CheckpointError`` message they give), ``None`` when they read it. ``unip info`` prints the
    summary, then exits 2 with the problem."""
    if architecture_of(source) == "Segmentor":
        from unip.seg.checkpoint import describe_segmentor

        return describe_segmentor(source), None  # a segmentor is read strictly: any problem raised already
    loaded = open_model(source, allow_partial=allow_partial)
    lines = [f"source:        {source}", *_backbone_lines(loaded.model),
             f"from:          {loaded.architecture_from}",
             f"weights:       {loaded.report.summary()}"]
    lines += [f"{key + ':':<14} {value}" for key, value in loaded.meta.items() if key != "architecture"]
    return "\n".join(lines), loaded.problem


def _backbone_lines(model: Any) -> list:
    config, heads = model.config, model.heads_per_block
    heads_text = f"{heads[0]}" if len(set(heads)) == 1 else f"{heads[0]} (last block: {heads[-1]})"
    return [f"architecture:  ViT width {config['embed_dim']}, depth {config['depth']}, heads {heads_text}, "
            f"patch {config['patch_size']}, image {config['img_size'][0]}x{config['img_size'][1]}, "
            f"{config['pos_embed_type']} position embedding{_variants_text(config)}",
            f"parameters:    {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"]


def _variants_text(config: Dict[str, Any]) -> str:
    """``", q/k norm, SwiGLU MLP (packed), SiLU"``: the block variants a config sets (empty for a plain ViT)."""
    mlp = {"swiglu_packed": "SwiGLU MLP (packed fc1, timm's SwiGLUPacked)", "swiglu": "SwiGLU MLP (fc1_g, fc1_x)"}
    parts = (["q/k norm"] if config.get("qk_norm") else []) + \
        ([mlp[config["mlp_layer"]]] if config.get("mlp_layer", "mlp") != "mlp" else []) + \
        ([f"MLP activation {config['act_layer']}"] if config.get("act_layer", "gelu") != "gelu" else []) + \
        (["MLP norm"] if config.get("scale_mlp_norm") else [])
    return "".join(", " + part for part in parts)


__all__ = ["ARCHITECTURE_RULES", "CONFIG_METADATA_KEY", "CONTAINER_KEYS", "DEFAULT_NORMALIZATION", "IGNORED_KEY",
           "MAX_DEPTH", "MAX_IMAGE_SIDE", "MAX_PATCH", "MAX_TOKENS", "MAX_WIDTH", "SAFE_GLOBALS", "STRIP_PREFIXES",
           "LoadReport", "LoadedModel", "PathLike", "architecture_of", "check_architecture", "check_fits",
           "config_from_timm", "create_model", "describe_checkpoint", "expected_shapes", "extract_state_dict",
           "infer_architecture", "inspect_checkpoint", "load_model", "load_weights", "normalize_keys", "open_model",
           "read_checkpoint", "save_checkpoint"]
