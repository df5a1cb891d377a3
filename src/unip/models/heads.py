"""Segmentation heads: UperNet (decode), FCN (auxiliary) and linear probes.

UperNet and FCN compute what mmsegmentation 0.x computes (the release's heads), with the same module names
(``psp_modules``, ``bottleneck``, ``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``, ``convs``,
``conv_seg``; every ``ConvModule`` holds ``conv`` (no bias) → ``bn`` → ReLU), so the release's fine-tuned
weights load key for key. Every resize is bilinear with ``align_corners=False``.

Every head takes the list of pyramid maps (or block maps) and returns logits ``[B, classes, h, w]`` at the
resolution of the map it reads first (UperNet: the stride-4 map).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unip.errors import ConfigError

def resize_bilinear(x: Tensor, size: Sequence[int]) -> Tensor:
    """``x [B, C, h, w]`` → ``[B, C, *size]``, bilinear, ``align_corners=False`` (mmseg's ``resize``);
    ``x`` itself when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    """Conv (no bias) → BatchNorm → ReLU, named ``conv``/``bn`` like mmcv's ``ConvModule``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv's init

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class _ClassifierMixin(nn.Module):
    """``Dropout2d`` (if any) → 1×1 ``conv_seg`` with bias, initialised N(0, 0.01) as in mmseg."""

    def _init_classifier(self, channels: int, num_classes: int, dropout: float) -> None:
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def classify(self, x: Tensor) -> Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x)


class UperNetHead(_ClassifierMixin):
    """UperNet (PPM on the coarsest map + top-down FPN fusion), mmseg's ``UPerHead``.

    ``maps``: four maps of strides 4, 8, 16, 32 with ``in_channels`` channels. Returns logits
    ``[B, num_classes, H/4, W/4]``."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        in_channels = list(in_channels)
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels[-1], channels, 1))
            for scale in self.pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self._init_classifier(channels, num_classes, dropout)

    def pyramid_pooling(self, x: Tensor) -> Tensor:
        """The top lateral: ``bottleneck(cat[x, resize(conv(avgpool_s(x))) for each scale s])``."""
        pooled = [resize_bilinear(module(x), x.shape[-2:]) for module in self.psp_modules]
        return self.bottleneck(torch.cat([x] + pooled, dim=1))

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps)]
        laterals.append(self.pyramid_pooling(maps[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[-2:])
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outputs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize_bilinear(y, size) for y in outputs], dim=1))
        return self.classify(fused)


class FCNHead(_ClassifierMixin):
    """mmseg's ``FCNHead`` without input concatenation: ``num_convs`` conv-bn-relu → dropout → ``conv_seg``
    on map ``in_index`` (2 = the stride-16 map). Returns logits at that map's resolution."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1,
                 kernel_size: int = 3, in_index: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(*(ConvModule(in_channels if i == 0 else channels, channels, kernel_size)
                                     for i in range(num_convs)))
        self._init_classifier(channels if num_convs else in_channels, num_classes, dropout)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        return self.classify(self.convs(maps[self.in_index]))


class LinearHead(_ClassifierMixin):
    """The linear probe: the maps (same size) concatenated on channels → one 1×1 ``conv_seg`` (no BN, no
    dropout). Returns logits at the maps' resolution (the segmentor resizes them to the input)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self._init_classifier(sum(in_channels), num_classes, dropout=0.0)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        return self.classify(torch.cat(list(maps), dim=1))


# ------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class HeadKind:
    """One kind of decode head a segmentor can have (an entry of ``HEADS``).

    ``build(config, in_channels, num_classes)`` makes the module from its segmentor config entry;
    ``config(width, channels)`` is that entry for a backbone of ``width`` (``channels``: the head's own width,
    ``None``: its default); ``reads_pyramid``: it reads a neck's four maps (else the block maps themselves);
    ``probe``: it is trained on a frozen backbone (probing: ``unip finetune --probe NAME``, the ``linprobe``
    presets) instead of fine-tuning the whole model; ``mode``: how results name such a run."""

    name: str
    build: Callable[[Mapping[str, Any], List[int], int], nn.Module]
    config: Callable[[int, Optional[int]], Dict[str, Any]]
    reads_pyramid: bool
    probe: bool
    mode: str
    description: str


def _build_upernet(config: Mapping[str, Any], in_channels: List[int], num_classes: int) -> nn.Module:
    return UperNetHead(in_channels, int(config["channels"]), num_classes,
                       tuple(config.get("pool_scales", (1, 2, 3, 6))), float(config.get("dropout", 0.1)))


#: The decode heads, by the name configs use (``model.head``, the segmentor header's ``decode_head.type``).
HEADS: Dict[str, HeadKind] = {
    "upernet": HeadKind(
        "upernet", _build_upernet,
        lambda width, channels: {"type": "upernet", "channels": int(channels or width), "pool_scales": [1, 2, 3, 6],
                                 "dropout": 0.1},
        reads_pyramid=True, probe=False, mode="fine-tuning",
        description="UperNet on the neck's pyramid (fine-tuning: the release's head)"),
    "linear": HeadKind(
        "linear", lambda config, in_channels, num_classes: LinearHead(in_channels, num_classes),
        lambda width, channels: {"type": "linear"},
        reads_pyramid=False, probe=True, mode="linear probe",
        description="one 1x1 conv on the frozen backbone's block maps (linear probing)"),
}


def head_kind(name: Any) -> HeadKind:
    """The ``HEADS`` entry of ``name``; ``ConfigError`` naming the choices for any other."""
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    return HEADS[name]


def probe_heads() -> List[str]:
    """The names of the heads that probe a frozen backbone (``unip finetune --probe``)."""
    return [name for name, kind in HEADS.items() if kind.probe]


def build_decode_head(config: Mapping[str, Any], in_channels: List[int], num_classes: int) -> nn.Module:
    """The decode head a segmentor config entry describes (``{"type": NAME, ...}``, ``NAME`` in ``HEADS``)."""
    return head_kind(config.get("type")).build(config, in_channels, num_classes)


def build_auxiliary_head(config: Mapping[str, Any], in_channels: List[int], num_classes: int) -> FCNHead:
    """The auxiliary head a config describes: ``{"type": "fcn", "channels", "num_convs", "in_index",
    "dropout"}`` (its ``loss_weight`` is read by the segmentor)."""
    if config.get("type") != "fcn":
        raise ConfigError(f"unknown auxiliary head {config.get('type')!r}; the only kind is 'fcn'")
    in_index = int(config.get("in_index", 2))
    return FCNHead(in_channels[in_index], int(config.get("channels", 256)), num_classes,
                   int(config.get("num_convs", 1)), int(config.get("kernel_size", 3)), in_index,
                   float(config.get("dropout", 0.1)))

