"""Position embeddings: the fixed 2-D sin-cos table and bicubic resampling to another token grid."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Sin-cos features of 1-D positions: ``[P]`` → ``[P, dim]`` (sines first, then cosines)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid: Tuple[int, int]) -> Tensor:
    """MAE's fixed 2-D table for a ``grid = (h, w)`` token grid: ``[h*w, dim]`` in row-major token order.

    The first half of the channels encodes the column (x), the second half the row (y), as in the MAE
    release that UNIP's students use, so weights pre-trained there keep their meaning."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    return table.to(torch.float32)


def is_square_grid(count: int) -> bool:
    """True when ``count`` tokens (or position rows) fill a square grid of side >= 1."""
    return count > 0 and math.isqrt(count) ** 2 == count


def square_grid_side(count: int, what: str = "tokens") -> int:
    """Side of the square grid that ``count`` tokens (or position rows) fill; ``ValueError`` if they do not."""
    if not is_square_grid(count):
        raise ValueError(f"{count} {what} do not form a square grid")
    return math.isqrt(count)


def resample_pos_embed(pos_embed: Tensor, new_grid: Tuple[int, int], num_prefix_tokens: int = 1,
                       old_grid: Optional[Tuple[int, int]] = None, antialias: bool = True,
                       always: bool = False) -> Tensor:
    """Bicubically resample the grid part of ``pos_embed [1, prefix + h*w, D]`` to ``new_grid``.

    Prefix rows (CLS, registers) are kept as they are. ``old_grid`` defaults to a square grid.
    ``antialias=True`` is timm's resampling; ``antialias=False`` is plain bicubic (the MAE/BEiT
    ``interpolate_pos_embed`` that the release's fine-tuning uses: the two differ even when enlarging).
    ``always``: resample even when the grids are equal (the identity, up to rounding), so that a graph
    traced with a symbolic ``new_grid`` (ONNX export with a dynamic input size) does not branch on it.
    Returns ``[1, prefix + H*W, D]`` in the input's dtype."""
    prefix, table = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_grid is None:
        side = square_grid_side(table.shape[1], "position rows")
        old_grid = (side, side)
    if not always and tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = table.shape[-1]
    image = table.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    table = image.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, table], dim=1)
