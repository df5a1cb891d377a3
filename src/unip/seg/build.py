"""A ``Segmentor`` for fine-tuning or linear probing, built on a pre-trained backbone
(docs/recipe.md#fine-tuning-model, docs/recipe.md#linear-probing).

Backbone sources (``backbone=``): our ``unip pretrain`` output (``.safetensors``), the release's pre-trained
UNIP ``.pth`` (head count of the last block from ``args.last_heads``), MAE / DINO / iBOT / DeiT files,
``timm:NAME[@FILE]`` (everything ``unip.checkpoint.open_model`` reads), or a preset name
(``unip.models.list_models()``) for a randomly initialised backbone.

Fine-tuning (``head="upernet"``): the backbone at the crop size (512) with a trainable position table
resampled once, bicubically, to that grid (32×32), trainable layer scale created at 1.0 in every block (the
only weights a pre-trained file may lack), drop path 0.1 (0.2 for ViT-L), features = raw tokens of the last
block (LL-FPN) or of blocks 4/6/8/12 (FPN), UperNet + FCN auxiliary head with the backbone's width.
Linear probing (``head="linear"``): backbone, embeddings and final norm frozen, tokens of blocks 4/6/8/12
(or the ``probe_layers`` given) concatenated → one 1×1 conv.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor

from unip.checkpoint import open_model
from unip.errors import CheckpointError, ConfigError
from unip.models.heads import head_kind
from unip.models.necks import neck_kind, pyramid_layers
from unip.models.pos_embed import resample_pos_embed
from unip.models.presets import PRESETS, create_model
from unip.models.segmentor import Segmentor
from unip.models.vit import VisionTransformer
from unip.seg.inference import RECIPE_CROP
from unip.seg.pipeline import InferencePipeline

log = logging.getLogger(__name__)

AUXILIARY_HEAD: Dict[str, Any] = {"type": "fcn", "channels": 256, "num_convs": 1, "kernel_size": 3, "in_index": 2,
                                  "dropout": 0.1, "loss_weight": 0.4}

LastBlockHeads = Union[None, str, int]


def default_drop_path(config: Mapping[str, Any]) -> float:
    """0.1 for T/S/B backbones, 0.2 for ViT-L and larger (the release's configs)."""
    return 0.2 if int(config["embed_dim"]) >= 1024 else 0.1


def last_block_head_count(config: Mapping[str, Any], choice: LastBlockHeads) -> Optional[int]:
    """The ``last_heads`` value for ``choice``: ``None``/``"pretrained"`` keeps the pre-trained count,
    ``"default"`` gives the last block the count of the others (the release: width / 64 everywhere), an int
    (or a string of digits) sets it. Returns ``None`` when the last block has the default count."""
    if choice is None or choice == "pretrained":
        heads = config.get("last_heads")
    elif choice == "default":
        heads = None
    else:
        try:
            heads = int(choice)
        except (TypeError, ValueError):
            raise ConfigError(f"last_block_heads must be 'pretrained', 'default' or a head count, "
                              f"not {choice!r}") from None
        width = int(config["embed_dim"])
        if heads < 1 or width % heads:
            raise ConfigError(f"last_block_heads={heads} does not divide the backbone width {width}")
    return None if heads in (None, 0, config["num_heads"]) else int(heads)


def segmentation_backbone_config(pretrained: Mapping[str, Any], img_size: int = RECIPE_CROP, probe: bool = False,
                                 drop_path_rate: Optional[float] = None,
                                 last_block_heads: LastBlockHeads = None) -> Dict[str, Any]:
    """``VisionTransformer`` kwargs of the segmentation backbone from those of the pre-trained one.

    Position table trainable (``learned``) at ``img_size``; fine-tuning (``probe=False``) adds layer scale
    1.0 where the pre-trained model has none and sets drop path (default by size); probing keeps the
    pre-trained blocks as they are and has no drop path."""
    config = dict(pretrained)
    config.update(img_size=[img_size, img_size], pos_embed_type="learned",
                  last_heads=last_block_head_count(config, last_block_heads))
    if probe:
        config["drop_path_rate"] = 0.0
    else:
        config["layer_scale"] = config.get("layer_scale") or 1.0
        config["drop_path_rate"] = default_drop_path(config) if drop_path_rate is None else float(drop_path_rate)
    return config


def build_segmentor(num_classes: int, backbone: str, *, neck: str = "llfpn", head: str = "upernet",
                    probe_layers: Optional[Sequence[int]] = None, img_size: int = RECIPE_CROP,
                    drop_path_rate: Optional[float] = None, last_block_heads: LastBlockHeads = None,
                    auxiliary_head: bool = True, channels: Optional[int] = None,
                    meta: Optional[Mapping[str, Any]] = None, allow_partial: bool = False) -> Segmentor:
    """A ``Segmentor`` with ``num_classes`` outputs on the pre-trained ``backbone`` (module docstring).

    ``neck``: a name in ``unip.models.NECKS`` (``"llfpn"``, the paper's, or ``"fpn"``); ``head``: a name in
    ``unip.models.HEADS`` (``"upernet"``: fine-tuning; a probe head such as ``"linear"``: frozen backbone,
    ``probe_layers`` 1-based, default 4/6/8/12 of 12; one layer for layer-wise probing). ``channels``: the
    head's width (UperNet's; default: the backbone's). ``last_block_heads``: see ``last_block_head_count``.
    ``meta`` (class names, palette, ...) is merged over the recipe's test pipeline with windows of ``img_size``
    (``unip.seg.pipeline``). ``allow_partial`` is passed to the reading of the pre-trained file. Returns the model
    in training mode."""
    if head_kind(head).reads_pyramid:
        neck_kind(neck)  # an unknown neck is refused before the backbone is read
    source, source_meta = open_pretrained(backbone, img_size, allow_partial)
    config = segmentor_config(num_classes, source.config, neck=neck, head=head, probe_layers=probe_layers,
                              img_size=img_size, drop_path_rate=drop_path_rate, last_block_heads=last_block_heads,
                              auxiliary_head=auxiliary_head, channels=channels)
    test_pipeline = InferencePipeline(crop=img_size).to_meta()  # windows of the crop, stride 2/3 of it
    segmentor = Segmentor(config, {**test_pipeline, **source_meta, **dict(meta or {})})
    load_pretrained_backbone(segmentor.backbone, source, str(backbone))
    segmentor.train()
    return segmentor


def segmentor_config(num_classes: int, pretrained: Mapping[str, Any], *, neck: str = "llfpn", head: str = "upernet",
                     probe_layers: Optional[Sequence[int]] = None, img_size: int = RECIPE_CROP,
                     drop_path_rate: Optional[float] = None, last_block_heads: LastBlockHeads = None,
                     auxiliary_head: bool = True, channels: Optional[int] = None) -> Dict[str, Any]:
    """The ``Segmentor`` config that ``build_segmentor`` builds on a backbone whose ``VisionTransformer`` kwargs
    are ``pretrained`` (same options; no weights are read: e.g. to count a model's FLOPs from a preset)."""
    kind = head_kind(head)
    backbone_config = segmentation_backbone_config(pretrained, img_size, kind.probe, drop_path_rate,
                                                   last_block_heads)
    depth = int(backbone_config["depth"])
    if kind.reads_pyramid:
        layers = neck_kind(neck).layers(depth)
    else:
        layers = [int(layer) for layer in probe_layers] if probe_layers else pyramid_layers(depth)
    return {
        "backbone": backbone_config,
        "feature_layers": layers,
        "neck": neck if kind.reads_pyramid else None,
        "decode_head": kind.config(int(backbone_config["embed_dim"]), channels),
        "auxiliary_head": dict(AUXILIARY_HEAD) if auxiliary_head and kind.reads_pyramid and not kind.probe else None,
        "num_classes": int(num_classes),
        "frozen_backbone": kind.probe,
    }


def open_pretrained(source: str, img_size: int, allow_partial: bool = False
                    ) -> Tuple[VisionTransformer, Dict[str, Any]]:
    """The pre-trained backbone named by ``source`` and what to record about it in the segmentor's meta.

    A preset name that is not an existing file gives a randomly initialised backbone at ``img_size``."""
    text = str(source)
    if text in PRESETS and not Path(text).exists():
        log.info("backbone: %s, randomly initialised", text)
        return create_model(text, img_size=img_size), {"pretrained": None, "backbone_preset": text}
    loaded = open_model(text, allow_partial=allow_partial)
    log.info("backbone from %s (%s): %s", text, loaded.architecture_from, loaded.report.summary())
    info = {"pretrained": text, "pretrained_architecture_from": loaded.architecture_from}
    if loaded.meta:
        info["pretrained_meta"] = {k: v for k, v in loaded.meta.items() if isinstance(v, (str, int, float, bool))}
    return loaded.model, info


def load_pretrained_backbone(backbone: VisionTransformer, source: VisionTransformer, name: str) -> None:
    """Copy ``source``'s weights into the segmentation ``backbone``, resampling the position table once to
    ``backbone``'s grid (plain bicubic, as the release's ``interpolate_pos_embed``).

    Only the layer scales the fine-tuning adds may be missing; anything else missing, unexpected or of
    another shape raises ``CheckpointError`` naming ``name`` and the keys."""
    state: Dict[str, Tensor] = dict(source.state_dict())
    own = backbone.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if source.no_embed_class else source.num_prefix_tokens
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], backbone.grid_size, num_prefix_tokens=prefix,
                                                old_grid=source.grid_size, antialias=False)
    problems = fit_problems(own, state, may_miss=(".ls1.gamma", ".ls2.gamma"))
    if problems:
        raise CheckpointError(f"{name}: the pre-trained backbone does not fit the segmentation backbone: {problems}")
    added = [k for k in own if k not in state]
    backbone.load_state_dict(state, strict=False)
    if added:
        log.info("backbone: %d layer-scale weights created at their initial value (not in %s)", len(added), name)


def fit_problems(own: Mapping[str, Tensor], state: Mapping[str, Tensor], may_miss: Tuple[str, ...] = ()) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``own``: missing keys (except
    those ending in one of ``may_miss``), unexpected keys, shape mismatches; ``""`` when it fits."""
    missing = [k for k in own if k not in state and not k.endswith(may_miss)]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    parts = [f"{what} {_preview(keys)}" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
    return "; ".join(parts)


def _preview(keys: List[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", … {len(keys) - limit} more" if len(keys) > limit else "")
