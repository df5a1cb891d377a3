"""Streaming layer-wise attention profile of a ViT over a set of images.

``profile_model`` runs the model once per batch and reduces each block's attention map to per-head metrics
(``unip.analysis.metrics``) as soon as the block has produced it (on a GPU, as soon as a few blocks have),
so only one (a few) layer's maps are alive at a time, and the statistics take O(layers × heads) memory
whatever the number of images. Per layer and head it keeps the mean and the spread (population standard
deviation, ddof=0) of every metric over images, merged batch by batch in float64 (Chan et al.'s parallel
form of Welford's update).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from unip.analysis.metrics import METRICS, Grid, attention_metrics, uniform_distance
from unip.engine.progress import shown
from unip.errors import ConfigError, DataError
from unip.models.cpu_linear import onednn_linears
from unip.models.vit import VisionTransformer


@dataclass
class LayerStats:
    """Statistics of one layer: per-head ``mean[metric]`` and ``std[metric]`` over images (lists of H)."""

    layer: int
    mean: Dict[str, List[float]]
    std: Dict[str, List[float]]
    pattern: Optional[str] = None

    @property
    def heads(self) -> int:
        return len(self.mean[METRICS[0]])

    def value(self, metric: str) -> float:
        """The layer's value of ``metric``: the mean over heads of the per-head means."""
        values = self.mean[metric]
        return sum(values) / len(values)


@dataclass
class AttentionProfile:
    """Layer-wise attention statistics of one model over ``num_images`` images.

    ``distance`` values are in input pixels; ``uniform_distance`` is the distance of a map attending
    uniformly over the ``grid`` (the global reference that pattern classification normalises by)."""

    source: str
    num_images: int
    depth: int
    patch_size: int
    grid: Grid
    layers: List[LayerStats] = field(default_factory=list)

    @property
    def uniform_distance(self) -> float:
        return uniform_distance(self.grid, self.patch_size)

    def layer(self, number: int) -> LayerStats:
        """The statistics of layer ``number`` (1-based); raises ``KeyError`` if it was not profiled."""
        for stats in self.layers:
            if stats.layer == number:
                return stats
        raise KeyError(f"layer {number} is not in this profile (layers {[s.layer for s in self.layers]})")

    def values(self, metric: str) -> List[float]:
        """Head-averaged ``metric`` of every profiled layer, in layer order."""
        return [stats.value(metric) for stats in self.layers]

    def to_dict(self) -> Dict[str, Any]:
        return {"source": self.source, "num_images": self.num_images, "depth": self.depth,
                "patch_size": self.patch_size, "grid": list(self.grid),
                "uniform_distance": self.uniform_distance,
                "layers": [{"layer": s.layer, "heads": s.heads, "pattern": s.pattern,
                            **{m: s.value(m) for m in METRICS}, "mean": s.mean, "std": s.std}
                           for s in self.layers]}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "AttentionProfile":
        layers = [LayerStats(d["layer"], d["mean"], d["std"], d.get("pattern")) for d in data["layers"]]
        return cls(data["source"], data["num_images"], data["depth"], data["patch_size"],
                   tuple(data["grid"]), layers)


class ProfileAccumulator:
    """Running per-layer, per-head mean and M2 of the metrics; ``update`` takes one batch at a time.

    All layers are merged in one update (heads of every layer side by side), so that the cost per batch is
    a handful of small ops whatever the depth."""

    def __init__(self) -> None:
        self.count = 0
        self._heads: Dict[int, int] = {}
        self._mean: Optional[Tensor] = None
        self._m2: Optional[Tensor] = None

    def update(self, batch: Dict[int, Tensor]) -> None:
        """Merge a batch ``{layer: Tensor[B, H, len(METRICS)]}``; every batch must hold the same layers
        and every layer the same number of images."""
        heads = {layer: values.shape[1] for layer, values in sorted(batch.items())}
        if self._heads and heads != self._heads:
            raise ValueError(f"a batch holds layers/heads {heads}, earlier batches {self._heads}")
        sizes = {values.shape[0] for values in batch.values()}
        if len(sizes) != 1:
            raise ValueError(f"every layer of a batch must hold the same number of images, got {sizes}")
        values = torch.cat([batch[layer] for layer in heads], dim=1).double()
        added = sizes.pop()
        batch_mean = values.mean(dim=0)
        batch_m2 = (values - batch_mean).square_().sum(dim=0)
        if self._mean is None or self._m2 is None:
            self._heads, self._mean, self._m2, self.count = heads, batch_mean, batch_m2, added
            return
        total = self.count + added
        delta = batch_mean - self._mean
        self._mean = self._mean + delta * (added / total)
        self._m2 = self._m2 + batch_m2 + delta.square_() * (self.count * added / total)
        self.count = total

    def layer_stats(self) -> List[LayerStats]:
        """Per-layer statistics so far (``std`` with ddof=0), in layer order."""
        if self._mean is None or self._m2 is None:
            return []
        means = self._mean.cpu().split(list(self._heads.values()))
        stds = (self._m2.cpu() / self.count).clamp_min(0.0).sqrt().split(list(self._heads.values()))
        return [LayerStats(layer, {m: mean[:, i].tolist() for i, m in enumerate(METRICS)},
                           {m: std[:, i].tolist() for i, m in enumerate(METRICS)})
                for layer, mean, std in zip(self._heads, means, stds)]


def attention_by_layer(model: VisionTransformer, x: Tensor,
                       layers: Sequence[int]) -> Iterator[Tuple[int, Tensor, Grid]]:
    """Yield ``(layer, attn[B, H, N, N], grid)`` for each wanted layer as its block runs, so that the
    caller can reduce and drop it: peak memory is one layer's maps."""
    grid = model.token_grid(x)
    for layer, attn in model.iter_attention_maps(x, layers):
        yield layer, attn, grid


def _reduce(pending: List[Tuple[int, Tensor]], model: VisionTransformer, grid: Grid,
            pool: Dict[Tuple, Tensor]) -> Dict[int, Tensor]:
    """Metrics of maps of one shape, reduced together: ``{layer: float64 Tensor[B, H, len(METRICS)]}``."""
    maps = pending[0][1] if len(pending) == 1 else torch.cat([attn for _, attn in pending])
    dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    key = (tuple(maps.shape), dtype, maps.device)
    if key not in pool:
        pool[key] = torch.empty(maps.shape, dtype=dtype, device=maps.device)
    metrics = attention_metrics(maps, model.patch_size, grid, model.num_prefix_tokens, scratch=pool[key])
    values = torch.stack([metrics[m] for m in METRICS], dim=-1)
    return {layer: chunk for (layer, _), chunk in zip(pending, values.chunk(len(pending)))}


def batch_metrics(model: VisionTransformer, x: Tensor, layers: Sequence[int],
                  scratch: Optional[Dict[Tuple, Tensor]] = None,
                  layer_group: int = 1) -> Tuple[Dict[int, Tensor], Grid]:
    """Metrics of one batch: ``{layer: float64 Tensor[B, H, len(METRICS)]}`` on x's device, and the grid.

    Up to ``layer_group`` consecutive maps of one shape are reduced together (fewer, larger kernels: on a
    GPU the metrics cost launches, not arithmetic), holding that many maps at once. ``scratch`` (a
    dict, filled on first use) keeps one temporary per shape across calls, so that the metrics do not
    allocate a map-sized buffer for every layer of every batch."""
    pool: Dict[Tuple, Tensor] = {} if scratch is None else scratch
    out: Dict[int, Tensor] = {}
    pending: List[Tuple[int, Tensor]] = []
    grid: Grid = (0, 0)
    for layer, attn, grid in attention_by_layer(model, x, layers):
        if pending and attn.shape != pending[0][1].shape:
            out.update(_reduce(pending, model, grid, pool))
            pending = []
        pending.append((layer, attn))
        if len(pending) >= layer_group:
            out.update(_reduce(pending, model, grid, pool))
            pending = []
    if pending:
        out.update(_reduce(pending, model, grid, pool))
    return out, grid


def _batches(images: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    iterator = iter(images)
    while True:
        chunk = list(itertools.islice(iterator, batch_size))
        if not chunk:
            return
        yield torch.stack(chunk)


def _accumulator_device(device: torch.device) -> torch.device:
    # float64 statistics stay on the accelerator (no per-batch sync) unless it lacks float64 (Apple MPS)
    return torch.device("cpu") if device.type == "mps" else device


def profile_model(model: VisionTransformer, images: Iterable[Tensor], batch_size: int = 16,
                  device: Optional[torch.device | str] = None, layers: Optional[Sequence[int]] = None,
                  autocast_dtype: Optional[torch.dtype] = None, progress: bool = True,
                  source: str = "model", layer_group: Optional[int] = None,
                  cpu_linear: Optional[str] = None) -> AttentionProfile:
    """Profile ``model``'s attention over ``images`` (an iterable of normalised ``[C, H, W]`` tensors of one
    size, e.g. ``unip.analysis.images.ImageFolder``). Moves the model to ``device`` (default: where it is)
    and puts it in eval mode. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the model under autocast;
    the metrics are computed in float32/64 regardless. ``layer_group``: how many layers' maps are reduced
    together (default 1 on CPU, keeping one map alive; 4 on accelerators, where fewer kernel launches
    matter more than memory). Without autocast on a CPU, the fp32 linear layers run through oneDNN for the
    duration where that kernel is faster (``cpu_linear``: ``auto``/``onednn``/``default``, ``None`` reads
    ``$UNIP_CPU_LINEAR``; ``unip.models.cpu_linear``; ``ConfigError`` for another value). Returns an
    ``AttentionProfile``; raises ``DataError`` when ``images`` is empty."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}; change --batch-size")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    group = layer_group or (1 if device.type == "cpu" else 4)
    layers = sorted(set(layers)) if layers else list(range(1, model.depth + 1))
    acc = ProfileAccumulator()
    acc_device = _accumulator_device(device)
    total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    kernels = onednn_linears(model, cpu_linear) if autocast_dtype is None else contextlib.nullcontext()
    grid: Grid = (0, 0)
    scratch: Dict[Tuple, Tensor] = {}
    with kernels, torch.inference_mode(), amp, tqdm(total=total, unit="img", desc=f"profiling {source}",
                                                    disable=shown(progress), leave=False) as bar:
        for x in _batches(images, batch_size):
            metrics, grid = batch_metrics(model, x.to(device, non_blocking=True), layers, scratch, group)
            acc.update({layer: values.to(acc_device) for layer, values in metrics.items()})
            bar.update(x.shape[0])
    if acc.count == 0:
        raise DataError(f"{source}: no images to profile; pass at least one readable image")
    return AttentionProfile(source, acc.count, model.depth, model.patch_size, grid, acc.layer_stats())

