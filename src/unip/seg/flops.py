"""Model FLOPs and parameters of a segmentor, per part (backbone, neck, decode head, auxiliary head).

``torch.utils.flop_counter`` counts the matrix products and convolutions of one forward. ``segmentor_cost``
runs it on the ``meta`` device (shapes only, no memory, no weights: a ViT-L + UperNet at 512 px takes
half a second), so a segmentor's cost is known from its config alone (``Segmentor.config``, stored in every
segmentor file). Attention is counted on the CPU's flash kernel as on the CUDA ones (torch counts only the
latter by default). Normalisations, activations, resizes and softmax are not counted (as everywhere).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from unip.models.segmentor import Segmentor

#: The parts of a ``Segmentor``, in forward order.
PARTS = ("backbone", "neck", "decode_head", "auxiliary_head")


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """A counter that also counts the CPU flash-attention kernels (torch counts only the CUDA ones)."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, depth=2, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops})


def part_flops(counter: FlopCounterMode) -> Dict[str, int]:
    """FLOPs per part of a segmentor (``PARTS``) and in total (``"total"``), from a finished count."""
    counts = counter.get_flop_counts()
    flops = {part: sum(counts.get(f"Segmentor.{part}", {}).values()) for part in PARTS[1:]}
    flops["total"] = sum(counts.get("Global", {}).values())
    # the segmentor calls backbone.forward_intermediates, not backbone(): no module hook; it is the rest
    flops["backbone"] = flops["total"] - sum(flops[part] for part in PARTS[1:])
    return flops


def segmentor_cost(config: Mapping[str, Any], size: int = 512, training: bool = False) -> Dict[str, Dict[str, float]]:
    """GFLOPs of one forward of a ``size``×``size`` image through the segmentor ``config`` describes, and its
    parameters in millions, per part; computed on the meta device.

    Returns ``{"gflops": {part: G, "total": G}, "params_m": {part: M, "total": M}}`` for the parts of
    ``PARTS``. ``training=False`` is inference (no auxiliary head: it runs only in training); ``True`` counts
    the training forward (with it). The backbone is rebuilt at ``size`` (its position table resampled to that
    grid), so the parameters are those of a ``size``-px backbone; the backbone's FLOPs stop at its deepest
    feature layer (a probe of block 4 runs 4 blocks)."""
    config = copy.deepcopy(dict(config))
    config["backbone"] = {**config["backbone"], "img_size": [size, size]}
    batch = 2 if training else 1  # BatchNorm in training mode needs two values per channel (PPM's 1×1 map)
    with torch.device("meta"):
        model = Segmentor(config).train(training)
        counter = flop_counter()
        with counter, torch.no_grad():
            model(torch.empty(batch, 3, size, size))
    gflops = {part: value / batch / 1e9 for part, value in part_flops(counter).items()}
    params = {part: sum(p.numel() for p in module.parameters()) / 1e6 if module is not None else 0.0
              for part, module in ((part, getattr(model, part, None)) for part in PARTS)}
    params["total"] = sum(params.values())
    return {"gflops": gflops, "params_m": params}


__all__ = ["PARTS", "flop_counter", "part_flops", "segmentor_cost"]
