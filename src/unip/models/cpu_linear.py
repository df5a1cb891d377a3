"""fp32 linear layers of frozen models on a CPU through oneDNN, where that kernel is the faster one.

PyTorch runs an fp32 ``nn.Linear`` on a CPU as a BLAS sgemm (MKL in the PyPI wheels). On some CPUs oneDNN's
fp32 matmul, which the same wheels ship for their mixed-precision paths, computes the same product faster:
measured 1.12–1.24× on the ViT-L layers of the NMI-HAD teacher (1,576 rows; about 210 against 170–190 GFLOP/s)
on a 2-core AMD EPYC with AVX-512, torch 2.14.1. The arithmetic is the same (fp32 products and sums; only the
summation order differs, ~1e-6 relative).

oneDNN's op has no backward, so this serves frozen models: the NMI-HAD teacher (``Teacher.set_precision``) and
the attention profiles of ``unip analyze`` and ``--teacher-layer auto`` (``profile_model``). A switched layer
still takes the usual path whenever a call is not a plain fp32 CPU product without gradients (autocast,
autograd, another device, ``torch.compile``/export tracing). Which kernel wins depends on the CPU, so
``use_onednn_linears`` first times both on the model's largest layer and switches only when oneDNN is clearly
faster; models whose largest layer has under 1 M weights (where a timing would be noise) never switch.
``UNIP_CPU_LINEAR=default`` keeps PyTorch's kernel everywhere (``onednn`` forces oneDNN).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import statistics
import time
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unip.errors import ConfigError

logger = logging.getLogger(__name__)

#: The environment variable that overrides the choice (``auto``, ``onednn`` or ``default``).
ENV_VAR = "UNIP_CPU_LINEAR"
CHOICES = ("auto", "onednn", "default")
#: Models whose largest linear layer has fewer weights than this keep the default kernel (timings of small
#: products are noise).
MIN_WEIGHTS = 1 << 20
#: oneDNN is chosen only when it takes at most this share of the default kernel's time.
MAX_TIME_SHARE = 0.95


def onednn_linear_available() -> bool:
    """True when this torch has oneDNN's fp32 linear op for dense CPU tensors."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(x: Tensor, weight: Tensor, bias: "Tensor | None") -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _register_flop_formula() -> None:
    """Let ``torch.utils.flop_counter`` count the op like the ``addmm`` it replaces (MFU figures stay right)."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def linear_flops(input_shape, weight_shape, *args, **kwargs) -> int:
        return 2 * math.prod(input_shape[:-1]) * weight_shape[0] * weight_shape[1]


if onednn_linear_available():
    try:
        _register_flop_formula()
    except ValueError:  # already registered (the module was reloaded)
        pass


class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` whose plain fp32 CPU calls without gradients run oneDNN's kernel; every other call is
    ``F.linear``. It adds no state: layers switch by changing their class (``use_onednn_linears``)."""

    def forward(self, x: Tensor) -> Tensor:
        if self._plain_cpu_call(x):
            return _onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _plain_cpu_call(self, x: Tensor) -> bool:
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return False
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias)):
            return False
        return not (torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling() or torch.jit.is_tracing())


def _median_seconds(runs: List[Callable[[], Tensor]], repeats: int) -> List[float]:
    """Median seconds per call of each of ``runs``, timed in turn (one call of each per round) after a warm-up
    call of each, so that a change of machine load hits all alike."""
    times: List[List[float]] = [[] for _ in runs]
    for round_ in range(repeats + 1):
        for run, spent in zip(runs, times):
            start = time.perf_counter()
            run()
            if round_:  # round 0 warms up: kernel creation, first touch of the output
                spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


@functools.lru_cache(maxsize=None)
def onednn_is_faster(in_features: int, out_features: int, threads: int, rows: int = 1024, repeats: int = 5) -> bool:
    """Time ``rows × in_features`` through an ``out_features × in_features`` fp32 layer with both kernels
    (in turn, median); True when oneDNN takes at most ``MAX_TIME_SHARE`` of the default kernel's time.
    Cached per shape and thread count (``threads`` is part of the key only)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.zeros(out_features)
    with torch.no_grad():
        default, onednn = _median_seconds([lambda: F.linear(x, weight, bias),
                                           lambda: _onednn_linear(x, weight, bias)], repeats)
    logger.info("fp32 CPU linear %dx%d (%d rows, %d threads): default %.1f ms, oneDNN %.1f ms", out_features,
                in_features, rows, threads, 1e3 * default, 1e3 * onednn)
    return onednn <= MAX_TIME_SHARE * default


def requested_choice(choice: Optional[str] = None) -> str:
    """``choice``, or ``$UNIP_CPU_LINEAR`` when it is ``None``, or ``auto``; ``ConfigError`` for anything but
    ``auto``, ``onednn`` or ``default``."""
    choice = choice or os.environ.get(ENV_VAR) or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"{ENV_VAR}={choice!r}: choose one of {', '.join(CHOICES)}")
    return choice


def decide(model: nn.Module, choice: Optional[str] = None) -> str:
    """``onednn`` or ``default``: the kernel ``use_onednn_linears(model, choice)`` gives the model's fp32 CPU
    linear layers (``auto`` times the kernels on the largest of them)."""
    choice = requested_choice(choice)
    layers = _switchable(model)
    if not layers or choice == "default":
        return "default"
    if not onednn_linear_available():
        if choice == "onednn":
            logger.warning("%s=onednn: this torch has no oneDNN linear op; PyTorch's kernel is used", ENV_VAR)
        return "default"
    if choice == "onednn":
        return "onednn"
    largest = max(layers, key=lambda m: m.weight.numel())
    faster = largest.weight.numel() >= MIN_WEIGHTS and onednn_is_faster(
        largest.in_features, largest.out_features, torch.get_num_threads())
    return "onednn" if faster else "default"


def use_onednn_linears(model: nn.Module, choice: Optional[str] = None) -> List[nn.Linear]:
    """Switch the fp32 CPU ``nn.Linear`` layers of ``model`` to ``OneDnnLinear``, in place (calls that need
    gradients still take the usual path, so a trainable layer stays correct, just not faster).

    ``choice``: ``auto`` (when oneDNN is faster on the model's largest layer, timed once per process),
    ``onednn`` (always, where the op exists) or ``default`` (never; layers already switched go back);
    ``None`` reads ``$UNIP_CPU_LINEAR`` (default ``auto``). Returns the layers this call switched to oneDNN."""
    kind = OneDnnLinear if decide(model, choice) == "onednn" else nn.Linear
    changed = [layer for layer in _switchable(model) if type(layer) is not kind]
    for layer in changed:
        layer.__class__ = kind
    if kind is OneDnnLinear and changed:
        logger.info("%d fp32 linear layers run through oneDNN on this CPU", len(changed))
    return changed if kind is OneDnnLinear else []


@contextlib.contextmanager
def onednn_linears(model: nn.Module, choice: Optional[str] = None) -> Iterator[int]:
    """``use_onednn_linears`` for the duration of a ``with`` block: every linear layer has its earlier kind
    again afterwards. Yields how many layers it switched to oneDNN."""
    before = [(m, type(m)) for m in model.modules() if type(m) in (nn.Linear, OneDnnLinear)]
    switched = use_onednn_linears(model, choice)
    try:
        yield len(switched)
    finally:
        for layer, kind in before:
            layer.__class__ = kind


def linear_kernel(model: nn.Module) -> str:
    """The choice that gives ``model``'s linear layers their kernels again: ``onednn`` when some layer runs
    through oneDNN, else ``default`` (for run records)."""
    return "onednn" if any(type(m) is OneDnnLinear for m in model.modules()) else "default"


def _switchable(model: nn.Module) -> List[nn.Linear]:
    """The plain or switched linear layers of ``model`` with fp32 weights on a CPU."""
    return [m for m in model.modules() if type(m) in (nn.Linear, OneDnnLinear)
            and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
