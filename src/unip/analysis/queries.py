"""Where chosen query tokens look: head-averaged attention of a query over the image, per layer."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from unip.errors import ConfigError
from unip.models.vit import VisionTransformer

Point = Tuple[int, int]


def parse_point(text: str) -> Point:
    """``"x,y"`` (pixels on the model input) → ``(x, y)``; raises ``ConfigError`` otherwise."""
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--query {text!r}: expected two integers x,y (pixels on the model input)") from None
    return x, y


def query_token(point: Point, grid: Tuple[int, int], patch_size: int) -> int:
    """Index among the patch tokens (row-major) of the patch that holds pixel ``(x, y)``."""
    x, y = point
    height, width = grid[0] * patch_size, grid[1] * patch_size
    if not (0 <= x < width and 0 <= y < height):
        raise ConfigError(f"query point {x},{y} is outside the {width}x{height} model input; "
                          f"use 0 <= x < {width} and 0 <= y < {height}")
    return (y // patch_size) * grid[1] + x // patch_size


def default_layers(depth: int, extra: Sequence[int] = ()) -> List[int]:
    """A handful of layers to draw: the first, a third, two thirds, the last, and ``extra``."""
    return sorted({1, max(1, round(depth / 3)), max(1, round(2 * depth / 3)), depth, *extra})


def query_attention(model: VisionTransformer, image: Tensor, points: Sequence[Point],
                    layers: Sequence[int], head: Optional[int] = None) -> Tensor:
    """Attention of each query point over the patches, averaged over heads (or of head ``head`` alone, from 0),
    rows renormalised after the prefix tokens are dropped: float32 ``[len(points), len(layers), rows, cols]`` for
    one image ``[3, H, W]``. Raises ``ConfigError`` for a point outside the image or a head a layer lacks."""
    device = next(model.parameters()).device
    rows, cols = image.shape[-2] // model.patch_size, image.shape[-1] // model.patch_size
    tokens = [query_token(p, (rows, cols), model.patch_size) for p in points]
    prefix = model.num_prefix_tokens
    for layer in layers:
        if not 1 <= layer <= model.depth:
            raise ConfigError(f"layer {layer}: this model has layers 1 to {model.depth}")
        heads = model.heads_per_block[layer - 1]
        if head is not None and not 0 <= head < heads:
            raise ConfigError(f"head {head}: layer {layer} has heads 0 to {heads - 1}")
    model.eval()
    with torch.inference_mode():
        maps = model.attention_maps(image.unsqueeze(0).to(device), layers)
    out = []
    for layer in layers:
        heads = maps[layer][0, :, prefix:, prefix:].float()[:, tokens]  # [heads, queries, patches]
        heads = heads / heads.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # each head over the patches, as the metrics
        patches = heads.mean(dim=0) if head is None else heads[head]
        out.append(patches.reshape(len(tokens), rows, cols))
    return torch.stack(out, dim=1).cpu()
