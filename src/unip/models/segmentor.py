"""The segmentation model: ViT backbone → neck (pyramid) → decode head (+ auxiliary head for training).

A ``Segmentor`` is built from a JSON-able config (stored in its checkpoints, see ``unip.seg.checkpoint``)::

    {"backbone": {VisionTransformer kwargs},
     "feature_layers": [12],                 # 1-based blocks whose raw (un-normed) tokens it reads
     "neck": "llfpn" | "fpn" | None,         # a name in unip.models.necks.NECKS; None: the head reads the block
                                             # maps directly (a head that does not read a pyramid: linear probe)
     "decode_head": {"type": "upernet", "channels": 384, "pool_scales": [1, 2, 3, 6], "dropout": 0.1}
                    | {"type": "linear"},     # "type": a name in unip.models.heads.HEADS
     "auxiliary_head": {"type": "fcn", "channels": 256, "num_convs": 1, "kernel_size": 3, "in_index": 2,
                        "dropout": 0.1, "loss_weight": 0.4} | None,
     "num_classes": 21,
     "frozen_backbone": false}               # linear probing: backbone frozen and kept in eval mode

``unip.seg.build_segmentor`` makes this config from a pre-trained backbone and the recipe's options.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Union

from torch import Tensor, nn

from unip.errors import ConfigError
from unip.models.heads import build_auxiliary_head, build_decode_head, head_kind
from unip.models.necks import NECKS, build_neck, neck_kind
from unip.models.vit import VisionTransformer


class Segmentor(nn.Module):
    """Backbone + neck + heads (submodules ``backbone``, ``neck``, ``decode_head``, ``auxiliary_head``).

    * ``pyramid(x)`` → the neck's four maps ``[B, C, H/s, W/s]`` for s = 4, 8, 16, 32 (no neck: the block
      maps at stride 16);
    * ``forward(x)`` in eval mode → the decode head's logits ``[B, classes, H/4, W/4]`` (linear probe:
      ``[B, classes, H/16, W/16]``; see ``output_stride``); in training mode → ``{"decode": those logits,
      "aux": auxiliary logits [B, classes, H/16, W/16]}`` ("aux" only with an auxiliary head), to be
      weighted by ``loss_weights``.

    ``meta`` holds what is not architecture (class names, palette, normalisation, test crop/stride, the
    pre-trained source) and travels with the checkpoint."""

    def __init__(self, config: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        self.config: Dict[str, Any] = copy.deepcopy(dict(config))
        self.meta: Dict[str, Any] = copy.deepcopy(dict(meta or {}))
        try:
            self.backbone = VisionTransformer(**self.config["backbone"])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"cannot build the backbone {self.config['backbone']}: {err}") from err
        self.config["backbone"] = dict(self.backbone.config)  # every argument, in canonical form
        self.feature_layers = self._check_layers(self.config["feature_layers"])
        width = self.backbone.embed_dim
        neck = self.config.get("neck")
        self.neck: Optional[nn.Module] = build_neck(neck, width) if neck else None
        reads = len(neck_kind(neck).layers(self.backbone.depth)) if neck else None
        if reads is not None and reads != len(self.feature_layers):
            raise ConfigError(f"neck {neck!r} reads {reads} block(s), feature_layers lists {self.feature_layers}")
        head = dict(self.config["decode_head"])
        kind = head_kind(head.get("type"))
        if kind.reads_pyramid != (self.neck is not None):
            raise ConfigError(f"decode head {kind.name!r} with neck {neck!r}: "
                              + (f"it reads a neck's pyramid; add one ({', '.join(NECKS)})" if kind.reads_pyramid
                                 else "it reads the block maps directly; drop the neck"))
        in_channels = [width] * (4 if self.neck is not None else len(self.feature_layers))
        if not _is_int(self.config["num_classes"]):
            raise ConfigError(f"num_classes must be a whole number, not {self.config['num_classes']!r}")
        self.num_classes = int(self.config["num_classes"])
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, not {self.num_classes}")
        self.decode_head = build_decode_head(head, in_channels, self.num_classes)
        aux = self.config.get("auxiliary_head")
        if aux and self.neck is None:
            raise ConfigError("an auxiliary head reads the pyramid: it needs a neck")
        self.auxiliary_head = build_auxiliary_head(dict(aux), in_channels, self.num_classes) if aux else None
        self.frozen_backbone = bool(self.config.get("frozen_backbone", False))
        if self.frozen_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self._freeze_unreached()

    def _freeze_unreached(self) -> None:
        """The final norm and blocks after the deepest feature layer never see a gradient: freeze them, so
        that DDP needs no ``find_unused_parameters`` and optimisers skip them (their values are kept)."""
        self.backbone.norm.requires_grad_(False)
        for block in self.backbone.blocks[max(self.feature_layers):]:
            block.requires_grad_(False)

    def _check_layers(self, layers: List[int]) -> List[int]:
        # a list of ints only: int("12") would pass, and "12" iterates as the layers [1, 2]
        if not isinstance(layers, (list, tuple)) or not all(_is_int(layer) for layer in layers):
            raise ConfigError(f"feature_layers must be a list of block numbers, not {layers!r}")
        layers = [int(layer) for layer in layers]
        depth = self.backbone.depth
        if not layers or any(not 1 <= layer <= depth for layer in layers):
            raise ConfigError(f"feature layers {layers} out of range: the backbone has blocks 1..{depth}")
        return layers

    # ------------------------------------------------------------------------------ properties
    @property
    def output_stride(self) -> int:
        """Stride of the decode head's logits: 4 with a neck (UperNet), the patch size without."""
        return 4 if self.neck is not None else self.backbone.patch_size

    @property
    def loss_weights(self) -> Dict[str, float]:
        """Weight of each training output's loss: ``{"decode": 1.0, "aux": 0.4}`` (no "aux" without one)."""
        weights = {"decode": 1.0}
        if self.auxiliary_head is not None:
            weights["aux"] = float(self.config["auxiliary_head"].get("loss_weight", 0.4))
        return weights

    def no_weight_decay(self) -> set:
        """Full names of the backbone's position table and tokens, which take no weight decay (see
        ``unip.engine.optim.param_groups``; the release decays them by a naming slip)."""
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    def train(self, mode: bool = True) -> "Segmentor":
        """As ``nn.Module.train``, but a frozen backbone stays in eval mode (no drop path, fixed statistics)."""
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    # ------------------------------------------------------------------------------ forward
    def block_maps(self, x: Tensor) -> List[Tensor]:
        """Raw outputs of ``feature_layers`` (no final norm, CLS dropped): ``[B, D, H/16, W/16]`` each, in order."""
        indices = sorted({layer - 1 for layer in self.feature_layers})
        maps = dict(zip(indices, self.backbone.forward_intermediates(x, indices)))
        return [maps[layer - 1] for layer in self.feature_layers]

    def pyramid(self, x: Tensor) -> List[Tensor]:
        """The neck's four maps (strides 4, 8, 16, 32); without a neck, the block maps (stride 16)."""
        maps = self.block_maps(x)
        return self.neck(maps) if self.neck is not None else maps

    def forward(self, x: Tensor) -> Union[Tensor, Dict[str, Tensor]]:
        maps = self.pyramid(x)
        logits = self.decode_head(maps)
        if not self.training:
            return logits
        outputs = {"decode": logits}
        if self.auxiliary_head is not None:
            outputs["aux"] = self.auxiliary_head(maps)
        return outputs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
