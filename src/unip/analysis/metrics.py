"""Per-head metrics of post-softmax attention maps ``attn[B, H, Q, K]`` → ``[B, H]``.

Conventions shared by every metric (docs/recipe.md#attention-metrics):

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

from unip.models.pos_embed import square_grid_side

Grid = Tuple[int, int]

METRICS: Tuple[str, ...] = ("nmi", "distance", "entropy")


def _check_map(attn: Tensor, num_prefix_tokens: int) -> None:
    if attn.ndim != 4:
        raise ValueError(f"expected an attention map [B, H, Q, K], got shape {tuple(attn.shape)}")
    if not 0 <= num_prefix_tokens < min(attn.shape[-2:]):
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} leaves no patch tokens in a map of "
                         f"shape {tuple(attn.shape)}")


def infer_grid(num_patches: int, grid: Optional[Grid] = None) -> Grid:
    """The token grid ``(rows, cols)``: ``grid`` if given (checked), else the square one; raises otherwise."""
    if grid is not None:
        rows, cols = int(grid[0]), int(grid[1])
        if rows * cols != num_patches:
            raise ValueError(f"grid {rows}x{cols} does not hold the map's {num_patches} patch tokens")
        return rows, cols
    try:
        side = square_grid_side(num_patches, "patch tokens")
    except ValueError as err:
        raise ValueError(f"{err}; pass grid=(rows, cols)") from None
    return side, side


@lru_cache(maxsize=16)
def _distance_table(grid: Grid, patch_size: float, prefix: int, device: str,
                    dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    rows = torch.arange(grid[0], dtype=torch.float64).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], dtype=torch.float64).repeat(grid[0])
    centres = torch.stack([rows, cols], dim=1) * patch_size
    table = torch.cdist(centres, centres)
    padded = torch.nn.functional.pad(table, (prefix, 0, prefix, 0))
    return padded.to(device=device, dtype=dtype), table.mean(dim=-1).to(device=device, dtype=dtype)


def distance_table(grid: Grid, patch_size: float = 16, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, num_prefix_tokens: int = 0) -> Tensor:
    """Pixel distances between patch centres, ``[N, N]`` with N = prefix + rows·cols (row-major patches);
    rows and columns of prefix tokens are 0."""
    return _distance_table((int(grid[0]), int(grid[1])), float(patch_size), int(num_prefix_tokens),
                           str(torch.device(device)), dtype)[0]


def uniform_distance(grid: Grid, patch_size: float = 16) -> float:
    """Attention distance (pixels) of a map that attends uniformly to all patches: the global reference."""
    return float(distance_table(grid, patch_size, dtype=torch.float64).mean())


class _RowStats:
    """Per-query sums over the patch keys of one map. Elementwise work runs on the whole (contiguous) map,
    into ``scratch`` (same shape and dtype), its one full-size temporary; the op count is kept low because
    on a GPU these small kernels cost more in launches than in arithmetic."""

    def __init__(self, attn: Tensor, num_prefix_tokens: int, scratch: Optional[Tensor] = None) -> None:
        _check_map(attn, num_prefix_tokens)
        attn = attn.detach()  # statistics, not a loss: a map from a model with trainable weights works too
        self.attn = attn if attn.dtype in (torch.float32, torch.float64) else attn.float()
        if scratch is None or scratch.shape != self.attn.shape or scratch.dtype != self.attn.dtype:
            scratch = torch.empty_like(self.attn)
        self.scratch = scratch
        self.prefix = num_prefix_tokens
        self.mass = self._over_patch_keys(self.attn)
        self.empty = self.mass <= 0
        # 1/s for rows with mass on patches, 0 for massless rows (their values are set by torch.where)
        self.inv_mass = torch.where(self.empty, 0.0, self.mass.reciprocal())

    @property
    def keys(self) -> int:
        return self.attn.shape[-1] - self.prefix

    @property
    def queries(self) -> int:
        return self.attn.shape[-2] - self.prefix

    def _over_patch_keys(self, values: Tensor) -> Tensor:
        """Σ over patch keys, for patch queries: ``[B, H, N, N]`` → ``[B, H, Q']``. Sums the slice rather
        than subtracting the prefix columns from the full row: that would cancel catastrophically when
        CLS takes almost all of a row's mass."""
        return values[..., self.prefix:, self.prefix:].sum(dim=-1)

    def entropy(self) -> Tensor:
        """Entropy of each renormalised row, float64 ``[B, H, Q']``: log s − Σ a·log a / s for row sum s."""
        # Σ a·log2(a): log2 because CPU builds vectorise it much better than log (the one transcendental
        # pass over the map); an exact zero gives 0·(−inf) = NaN, which nansum drops (0·log 0 = 0)
        a_log_a = torch.log2(self.attn, out=self.scratch).mul_(self.attn)
        a_log_a_sum = a_log_a[..., self.prefix:, self.prefix:].nansum(dim=-1)
        value = self.mass.log() - a_log_a_sum * (math.log(2) * self.inv_mass)
        return torch.where(self.empty, math.log(self.keys), value).double().clamp_min(0.0)

    def distance(self, table: Tensor, uniform_rows: Tensor) -> Tensor:
        """Mean pixel distance of each renormalised row, float64 ``[B, H, Q']``; ``table`` is the padded
        ``[N, N]`` table, ``uniform_rows`` the per-query distance of uniform attention (for massless rows)."""
        weighted = self._over_patch_keys(torch.mul(self.attn, table, out=self.scratch))
        return torch.where(self.empty, uniform_rows, weighted * self.inv_mass).double()

    def key_marginal(self) -> Tensor:
        """p(k) = mean over queries of the renormalised rows, float64 ``[B, H, K']``."""
        weights = self.attn.new_zeros(self.attn.shape[:-1])
        weights[..., self.prefix:] = self.inv_mass
        weighted = torch.mul(self.attn, weights.unsqueeze(-1), out=self.scratch)
        marginal = weighted[..., self.prefix:, self.prefix:].sum(dim=-2).double()
        # massless rows count as uniform: each adds 1/K to every key
        marginal += self.empty.sum(dim=-1, keepdim=True) / self.keys
        return marginal.div_(self.queries)

    def nmi(self, row_entropy: Tensor) -> Tensor:
        """NMI ``[B, H]`` from the per-row entropies H(K|Q=q); 0 where H(K) or H(Q) is 0."""
        marginal = self.key_marginal()
        h_k = -torch.special.xlogy(marginal, marginal).sum(dim=-1)
        mutual = (h_k - row_entropy.mean(dim=-1)).clamp_min(0.0)
        # I(Q;K) <= H(K): when H(K)·H(Q) is ~0 the clamp of the denominator makes the ratio ~0, not NaN
        return (mutual / (h_k * math.log(self.queries)).sqrt().clamp_min(1e-12)).clamp(0.0, 1.0)


def _distance(rows: _RowStats, patch_size: float, grid: Optional[Grid]) -> Tensor:
    """Per-row distances ``[B, H, Q']`` with the (cached) table of this grid."""
    grid = infer_grid(rows.keys, grid)
    table, uniform_rows = _distance_table((int(grid[0]), int(grid[1])), float(patch_size), rows.prefix,
                                          str(rows.attn.device), rows.attn.dtype)
    return rows.distance(table, uniform_rows)


def nmi(attn: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Normalised mutual information between queries and keys of each head: float64 ``[B, H]`` in [0, 1]."""
    with _no_autocast(attn):
        rows = _RowStats(attn, num_prefix_tokens)
        return rows.nmi(rows.entropy())


def attention_entropy(attn: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """Mean Shannon entropy (nats) of the renormalised query rows: float64 ``[B, H]``."""
    with _no_autocast(attn):
        return _RowStats(attn, num_prefix_tokens).entropy().mean(dim=-1)


def attention_distance(attn: Tensor, patch_size: float = 16, grid: Optional[Grid] = None,
                       num_prefix_tokens: int = 1) -> Tensor:
    """Mean attention distance in pixels: float64 ``[B, H]``. ``grid`` = token rows × cols (square if None)."""
    with _no_autocast(attn):
        rows = _RowStats(attn, num_prefix_tokens)
        return _distance(rows, patch_size, grid).mean(dim=-1)


def attention_metrics(attn: Tensor, patch_size: float = 16, grid: Optional[Grid] = None,
                      num_prefix_tokens: int = 1, scratch: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """``{"nmi", "distance", "entropy"}`` → float64 ``[B, H]`` each, sharing the row sums.

    ``scratch``: an optional float32 (float64 for float64 maps) buffer of the map's shape to reuse as the
    temporary, which saves a large allocation per call (on CPU mostly page faults); it is overwritten."""
    with _no_autocast(attn):
        rows = _RowStats(attn, num_prefix_tokens, scratch)
        row_entropy = rows.entropy()
        return {"nmi": rows.nmi(row_entropy),
                "distance": _distance(rows, patch_size, grid).mean(dim=-1),
                "entropy": row_entropy.mean(dim=-1)}


def _no_autocast(attn: Tensor):
    """Metrics are computed in the map's float32/64, also when called inside an autocast region."""
    return torch.autocast(attn.device.type, enabled=False)
