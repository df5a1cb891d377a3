"""Per-head metrics of post-softmax attention maps ``attn[B, H, Q, K]`` → ``[B, H]``.

Conventions shared by every metric (DESIGN.md §4):

* The first ``num_prefix_tokens`` rows and columns (CLS, then register tokens) are dropped and each
  remaining query row is renormalised to sum to 1, so ``p(k|q)`` is a distribution over image patches.
  A row whose whole mass sat on prefix tokens (or that underflowed to zero in fp16) carries no spatial
  preference and is treated as uniform over the patches.
* Queries are weighted uniformly (``p(q) = 1/Q``).
* Maps are read in float32 (fp16/bf16 are upcast, float64 stays float64); the small per-row results are
  combined in float64.

``nmi``: I(Q;K) / sqrt(H(Q)·H(K)) with p(k) = Σ_q p(q)·p(k|q) (Park et al., ICLR 2023). 0 when every query
attends alike (global), 1 for a one-to-one (permutation) map; 0 by definition when H(K) or H(Q) is 0.

``attention_distance``: Σ_k p(k|q)·‖pos_q − pos_k‖ in input pixels (patch centres on the token grid),
averaged over queries.

``attention_entropy``: Shannon entropy (nats) of each renormalised query row, averaged over queries; it
equals H(K|Q), the term NMI subtracts from H(K). Its maximum is log(number of patches).

``attention_metrics`` computes all three in one pass over the map and is what profiles use.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

Grid = Tuple[int, int]

METRICS: Tuple[str, ...] = ("nmi", "distance", "entropy")


def _check_map(attn: Tensor, num_prefix_tokens: int) -> None:
    if attn.ndim != 4:
        raise ValueError(f"expected an attention map [B, H, Q, K], got shape {tuple(attn.shape)}")
    if not 0 <= num_prefix_tokens < min(attn.shape[-2:]):
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} leaves no patch tokens in a map of "
                         f"shape {tuple(attn.shape)}")


def _patches(attn: Tensor, num_prefix_tokens: int) -> Tensor:
    """The patch-to-patch block ``[B, H, Q', K']`` in float32 (float64 kept), not renormalised."""
    _check_map(attn, num_prefix_tokens)
    block = attn[..., num_prefix_tokens:, num_prefix_tokens:]
    return block if block.dtype in (torch.float32, torch.float64) else block.float()


def infer_grid(num_patches: int, grid: Optional[Grid] = None) -> Grid:
    """The token grid ``(rows, cols)``: ``grid`` if given (checked), else the square one; raises otherwise."""
    if grid is not None:
        rows, cols = int(grid[0]), int(grid[1])
        if rows * cols != num_patches:
            raise ValueError(f"grid {rows}x{cols} does not hold the map's {num_patches} patch tokens")
        return rows, cols
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid; pass grid=(rows, cols)")
    return side, side


@lru_cache(maxsize=16)
def _distance_table(grid: Grid, patch_size: float, device: str, dtype: torch.dtype) -> Tensor:
    rows = torch.arange(grid[0], dtype=torch.float64).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], dtype=torch.float64).repeat(grid[0])
    centres = torch.stack([rows, cols], dim=1) * patch_size
    return torch.cdist(centres, centres).to(device=device, dtype=dtype)


def distance_table(grid: Grid, patch_size: float = 16, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """Pixel distances between patch centres, ``[P, P]`` with P = rows·cols, row-major token order."""
    return _distance_table((int(grid[0]), int(grid[1])), float(patch_size), str(torch.device(device)), dtype)


def uniform_distance(grid: Grid, patch_size: float = 16) -> float:
    """Attention distance (pixels) of a map that attends uniformly to all patches: the global reference."""
    return float(distance_table(grid, patch_size, dtype=torch.float64).mean())


class _RowStats:
    """Row sums and the per-row quantities every metric needs, without renormalising the map."""

    def __init__(self, block: Tensor) -> None:
        self.block = block
        mass = block.sum(dim=-1)
        self.empty = mass <= 0
        self.mass = torch.where(self.empty, torch.ones_like(mass), mass)

    def _per_row(self, row_sums: Tensor, if_empty: Tensor | float) -> Tensor:
        """Σ_k p(k|q)·f(q,k) from Σ_k a(q,k)·f(q,k) of the raw rows; ``if_empty`` for massless rows."""
        return torch.where(self.empty, if_empty, row_sums / self.mass).double()

    def entropy(self) -> Tensor:
        """Entropy of each renormalised row, ``[B, H, Q]``: H = log s − Σ a·log a / s for row sum s."""
        keys = self.block.shape[-1]
        a_log_a = torch.special.xlogy(self.block, self.block).sum(dim=-1)
        value = torch.where(self.empty, math.log(keys), self.mass.log() - a_log_a / self.mass)
        return value.double().clamp_min(0.0)

    def distance(self, table: Tensor) -> Tensor:
        """Mean pixel distance of each renormalised row, ``[B, H, Q]``."""
        weighted = (self.block * table.to(self.block.dtype)).sum(dim=-1)
        return self._per_row(weighted, table.mean(dim=-1).to(weighted.dtype))

    def key_marginal(self) -> Tensor:
        """p(k) = mean over queries of the renormalised rows, ``[B, H, K]`` in float64."""
        weights = torch.where(self.empty, torch.zeros_like(self.mass), self.mass.reciprocal())
        marginal = torch.einsum("bhqk,bhq->bhk", self.block, weights).double()
        empty_share = self.empty.double().sum(dim=-1, keepdim=True) / self.block.shape[-1]
        return (marginal + empty_share) / self.block.shape[-2]


def _nmi_from(rows: _RowStats, row_entropy: Tensor) -> Tensor:
    """NMI ``[B, H]`` from the row statistics and the per-row entropies H(K|Q=q)."""
    marginal = rows.key_marginal()
    h_k = -torch.special.xlogy(marginal, marginal).sum(dim=-1)
    h_q = math.log(rows.block.shape[-2])
    mutual = (h_k - row_entropy.mean(dim=-1)).clamp_min(0.0)
    denominator = (h_k * h_q).sqrt()
    defined = denominator > 1e-12
    nmi = mutual / torch.where(defined, denominator, torch.ones_like(denominator))
    return torch.where(defined, nmi, torch.zeros_like(nmi)).clamp(0.0, 1.0)


def nmi(attn: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Normalised mutual information between queries and keys of each head: float64 ``[B, H]`` in [0, 1]."""
    rows = _RowStats(_patches(attn, num_prefix_tokens))
    return _nmi_from(rows, rows.entropy())


def attention_entropy(attn: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Mean Shannon entropy (nats) of the renormalised query rows: float64 ``[B, H]``."""
    return _RowStats(_patches(attn, num_prefix_tokens)).entropy().mean(dim=-1)


def attention_distance(attn: Tensor, patch_size: float = 16, grid: Optional[Grid] = None,
                       num_prefix_tokens: int = 1) -> Tensor:
    """Mean attention distance in pixels: float64 ``[B, H]``. ``grid`` = token rows × cols (square if None)."""
    block = _patches(attn, num_prefix_tokens)
    table = distance_table(infer_grid(block.shape[-1], grid), patch_size, block.device, block.dtype)
    return _RowStats(block).distance(table).mean(dim=-1)


def attention_metrics(attn: Tensor, patch_size: float = 16, grid: Optional[Grid] = None,
                      num_prefix_tokens: int = 1) -> Dict[str, Tensor]:
    """``{"nmi", "distance", "entropy"}`` → float64 ``[B, H]`` each, sharing one pass over the map."""
    block = _patches(attn, num_prefix_tokens)
    table = distance_table(infer_grid(block.shape[-1], grid), patch_size, block.device, block.dtype)
    rows = _RowStats(block)
    row_entropy = rows.entropy()
    return {"nmi": _nmi_from(rows, row_entropy),
            "distance": rows.distance(table).mean(dim=-1),
            "entropy": row_entropy.mean(dim=-1)}
