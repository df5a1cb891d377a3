"""Necks: a plain ViT's stride-16 token maps → a four-level pyramid (strides 4, 8, 16, 32) for UperNet.

Both necks apply the same four operations as the release (BEiT/MAE segmentation backbones), one per level:

* ``fpn1`` ×4: ConvTranspose 2×2 s2 → BatchNorm → GELU → ConvTranspose 2×2 s2 (stride 4),
* ``fpn2`` ×2: ConvTranspose 2×2 s2 (stride 8),
* ``fpn3`` ×1: identity (stride 16),
* ``fpn4`` ×½: max-pool 2 (stride 32).

``llfpn`` (LL-FPN, the paper's) feeds all four with the last block's map; ``fpn`` feeds them with four blocks
(4, 6, 8, 12 of 12), one each. Module names match the release's ``backbone.fpn1.0/1/3``, ``backbone.fpn2.0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

from torch import Tensor, nn

from unip.errors import ConfigError

class PyramidNeck(nn.Module):
    """Stride-16 maps ``[B, C, h, w]`` (1 or 4 of them) → 4 maps ``[B, C, 4h, 4w]``, ``[B, C, 2h, 2w]``,
    ``[B, C, h, w]``, ``[B, C, h/2, w/2]``. With one input map every level reads it (LL-FPN); with four,
    level ``i`` reads map ``i`` (multi-layer FPN)."""

    strides = (4, 8, 16, 32)

    def __init__(self, channels: int, num_inputs: int = 1) -> None:
        super().__init__()
        if num_inputs not in (1, 4):
            raise ConfigError(f"a pyramid neck reads 1 map (LL-FPN) or 4 maps (FPN), not {num_inputs}")
        self.num_inputs = num_inputs
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, maps: Sequence[Tensor]) -> List[Tensor]:
        if len(maps) != self.num_inputs:
            raise ValueError(f"this neck reads {self.num_inputs} map(s), got {len(maps)}")
        inputs = list(maps) * 4 if self.num_inputs == 1 else list(maps)
        return [op(x) for op, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), inputs)]


def pyramid_layers(depth: int) -> List[int]:
    """The four blocks (1-based) the multi-layer FPN and the linear probe read: 4, 6, 8, 12 of 12, and the
    same fractions (1/3, 1/2, 2/3, 1) of another depth (8, 12, 16, 24 of 24)."""
    return [max(1, (depth * k + 6) // 12) for k in (4, 6, 8, 12)]


# ------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class NeckKind:
    """One kind of neck (an entry of ``NECKS``): ``build(channels)`` makes it for a backbone of that width;
    ``layers(depth)`` are the blocks (1-based) whose maps it reads, in order."""

    name: str
    build: Callable[[int], nn.Module]
    layers: Callable[[int], List[int]]
    description: str


#: The necks, by the name configs use (``model.neck``, the segmentor header's ``neck``).
NECKS: Dict[str, NeckKind] = {
    "llfpn": NeckKind("llfpn", lambda channels: PyramidNeck(channels, num_inputs=1), lambda depth: [depth],
                      "LL-FPN (the paper's): all four levels built from the last block's map"),
    "fpn": NeckKind("fpn", lambda channels: PyramidNeck(channels, num_inputs=4), pyramid_layers,
                    "multi-layer FPN: level i built from the i-th of blocks 4/6/8/12 of 12"),
}


def neck_kind(name: Any) -> NeckKind:
    """The ``NECKS`` entry of ``name``; ``ConfigError`` naming the choices for any other."""
    if name not in NECKS:
        raise ConfigError(f"unknown neck {name!r}; choose one of: {', '.join(NECKS)}")
    return NECKS[name]


def build_neck(kind: str, channels: int) -> nn.Module:
    """The neck ``kind`` (a name in ``NECKS``) for a backbone of width ``channels``."""
    return neck_kind(kind).build(channels)
