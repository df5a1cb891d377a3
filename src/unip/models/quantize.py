"""FP8 weights and activations for frozen models (the NMI-HAD teacher), through torchao.

On Hopper-class GPUs (compute capability >= 8.9) FP8 matmuls run at twice the bf16 peak. A frozen model
needs no gradients, so its ``nn.Linear`` layers can use torchao's dynamic FP8 quantisation: weights
are stored in float8 (e4m3) with one scale per output row, activations are quantised per row on the fly,
and the product runs as a scaled FP8 matmul. Everything else (patch embedding, norms, softmax/SDPA) stays
bf16. ``torch.compile`` fuses the activation quantisation into the neighbouring kernels; without it the
quantisation costs more than the faster matmul saves.

torchao is optional (``pip install unip[fp8]``): ``fp8_unavailable_reason`` says why FP8 cannot run here,
so that callers refuse it with one clear line instead of failing inside torchao.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from unip.errors import ConfigError

logger = logging.getLogger(__name__)

#: Smallest CUDA compute capability with FP8 tensor cores (Ada 8.9, Hopper 9.0).
MIN_CAPABILITY = (8, 9)


def fp8_unavailable_reason(device: torch.device) -> Optional[str]:
    """``None`` when FP8 matmuls can run on ``device``; otherwise why not (one line, with the fix)."""
    if device.type != "cuda":
        return f"FP8 needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper), not {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"FP8 needs compute capability >= 8.9 (Ada/Hopper); {torch.cuda.get_device_name(device)} "
                f"has {capability[0]}.{capability[1]}")
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "FP8 needs torchao: pip install 'unip[fp8]' (or pip install torchao)"
    return None


def quantize_linear_fp8(model: nn.Module) -> nn.Module:
    """Turn every ``nn.Linear`` of the frozen ``model`` (on a CUDA device, bf16) into a dynamic FP8 linear
    (float8 e4m3 weights with per-row scales; activations quantised per row at run time). In place;
    returns ``model``. Raises ``ConfigError`` where FP8 cannot run."""
    device = next(model.parameters()).device
    reason = fp8_unavailable_reason(device)
    if reason:
        raise ConfigError(reason)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    model.to(torch.bfloat16)  # per-row FP8 scaling works from bf16 weights
    count = sum(isinstance(m, nn.Linear) for m in model.modules())
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    logger.info("FP8 (torchao, per-row dynamic scaling): %d linear layers quantised", count)
    return model
