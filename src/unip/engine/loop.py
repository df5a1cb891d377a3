"""One optimiser step of a training loop: gradient accumulation, mixed precision, clipping and a stop on a
non-finite loss.

``Precision`` says how a device computes (bf16/fp16 autocast on CUDA, fp32 or bf16 autocast on a CPU);
``train_step`` runs ``loss_fn`` over the micro-batches of one step and updates the weights once. DDP gradient
synchronisation is skipped on all micro-batches but the last (``no_sync``). A loss function returns the
total loss, or ``(total, {name: component})`` for losses with named parts (e.g. decode and auxiliary heads):
the parts are averaged like the total and reported for logging.

Reading the loss back is a host sync: the device idles from the end of the step until the host has launched
the next one. With a ``LossGate`` (fused AdamW) the step does not read it: the optimiser
skips its update on the device when the loss is not finite, and keeps skipping from then on, so a loop can read
each step's loss after it has queued the next step and still stop with the weights of the last good step.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from unip.engine.distributed import all_reduce_mean
from unip.errors import ConfigError, UnipError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: What a loss function returns: the total loss, or the total and its named components (0-d tensors).
LossOutput = Union[Tensor, Tuple[Tensor, Mapping[str, Tensor]]]


class NonFiniteLossError(UnipError):
    """The loss became NaN or infinite; the run stops before the weights are touched."""


@dataclass(frozen=True)
class Precision:
    """Compute precision of a run: ``dtype`` is the autocast dtype, ``None`` for plain fp32."""

    device_type: str
    dtype: Optional[torch.dtype]

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is enabled only for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype is torch.float16)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto`` → bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on a CPU (exact: what the tests compare).
    On a CPU, ``bf16`` runs under bf16 autocast (about 2× faster for ViTs where the CPU has bf16 instructions:
    ``cpu_has_native_bf16``; emulated and slower elsewhere, which is logged) and ``fp16`` gives fp32 (CPU fp16
    autocast is slower than fp32 for these models), which is logged as a warning: every verb (``pretrain``,
    ``finetune``, ``evaluate``, ``predict``, ``bench``) resolves its precision here."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if device.type == "cpu" and name == "bf16":
        if not cpu_has_native_bf16():
            logger.warning("this CPU has no bf16 instructions (AVX512-BF16 or AMX): bf16 autocast is emulated and "
                           "likely slower than fp32")
        return Precision("cpu", torch.bfloat16)
    if device.type != "cuda":
        if name in ("fp16", "bf16"):
            logger.warning("precision %s is not used on %s: it computes in fp32 (fp16 autocast is slower than fp32 "
                           "on CPUs; --precision bf16 gives mixed precision on a CPU)", name, device.type)
        return Precision(device.type, None)
    if name == "auto":
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Precision("cuda", {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name])


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), so that bf16 autocast is fast."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(probe() for probe in probes if probe is not None)
    except RuntimeError:  # a torch built without the probes' backend
        return False


class StepResult:
    """What one optimiser step did: the loss (mean over micro-batches and ranks), the mean of each named loss
    component (empty when the loss function returns a tensor) and this rank's gradient norm before clipping (a
    0-d tensor). The losses stay on the device until first read (``loss``, ``components`` or ``read()``: a
    host sync), which raises ``NonFiniteLossError`` when the loss is not finite."""

    def __init__(self, means: Tensor, names: Sequence[str], stop_message: str) -> None:
        self._means, self._names, self._stop_message = means, list(names), stop_message
        self._values: Optional[List[float]] = None
        self.grad_norm: Optional[Tensor] = None

    def read(self) -> "StepResult":
        """Read the losses from the device (once); ``NonFiniteLossError`` (at every read) when the loss is not
        finite."""
        if self._values is None:
            self._values = self._means.tolist()
        if not math.isfinite(self._values[0]):
            raise NonFiniteLossError(self._stop_message.format(loss=self._values[0]))
        return self

    @property
    def loss(self) -> float:
        return self.read()._values[0]  # type: ignore[index]

    @property
    def components(self) -> Dict[str, float]:
        return dict(zip(self._names, self.read()._values[1:]))  # type: ignore[index]


class LossGate:
    """Keeps the weights of the last step with a finite loss without reading the loss on the host.

    Each step hands the optimiser a ``found_inf`` flag (as ``torch.amp.GradScaler`` does for fused optimisers)
    that is 1 from the first non-finite loss on: the fused AdamW kernels then leave weights, moments and step
    counts as they were, and the loop stops when it reads that step's loss (``StepResult.read``), later. Under
    an fp16 GradScaler the flag is also 1 for a step whose gradients are not finite, the step the scaler skips
    (and ``update`` then lowers the scale, as after ``scaler.step``). Only optimisers that take the flag qualify
    (fused AdamW: ``applies``)."""

    def __init__(self) -> None:
        self.stopped: Optional[Tensor] = None  # 0-d float on the device: 1.0 once a loss was not finite

    @staticmethod
    def applies(optimizer: torch.optim.Optimizer) -> bool:
        fused = all(group.get("fused") for group in optimizer.param_groups)
        return fused and getattr(optimizer, "_step_supports_amp_scaling", False)

    @classmethod
    def for_optimizer(cls, optimizer: torch.optim.Optimizer) -> Optional["LossGate"]:
        """A gate for ``optimizer``'s steps, ``None`` where it does not apply (then each step reads its loss)."""
        return cls() if cls.applies(optimizer) else None

    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: Tensor,
             grad_norm: Tensor) -> None:
        """``optimizer.step()`` then ``scaler.update()`` (after ``scaler.unscale_``), the step skipped on the
        device when ``loss`` or an earlier gated loss was not finite, or, under an enabled scaler, when the
        unscaled gradients are not (``grad_norm``: their total norm)."""
        bad = (~torch.isfinite(loss)).float()
        self.stopped = bad if self.stopped is None else torch.maximum(self.stopped, bad)
        skip = self.stopped
        if scaler.is_enabled():
            skip = torch.maximum(skip, (~torch.isfinite(grad_norm)).float())
        optimizer.found_inf = skip  # type: ignore[attr-defined]  # what Adam.step hands its kernels
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
        scaler.update()


def split_loss(output: LossOutput) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``(total, {name: component})`` from what a loss function returned."""
    if isinstance(output, tuple):
        total, components = output
        return total, dict(components)
    return output, {}


def train_step(model: nn.Module, loss_fn: Callable[[object], LossOutput], micro_batches: Sequence[object],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, precision: Precision,
               clip_grad: Optional[float] = None, where: str = "", gate: Optional[LossGate] = None) -> StepResult:
    """Accumulate gradients of ``loss_fn(batch)`` over ``micro_batches`` and take one optimiser step.

    ``model`` is the (possibly DDP-wrapped) module that ``loss_fn`` calls; each micro-batch's loss is
    divided by their number, so the step equals one over the concatenated batch. A non-finite loss on any rank
    raises ``NonFiniteLossError`` (naming ``where``) before any weight changes: here, or, with a ``gate`` that
    applies to the optimiser, when the returned ``StepResult`` is first read (the gate has kept the weights of
    the step before). Returns a ``StepResult``."""
    optimizer.zero_grad(set_to_none=True)
    count = len(micro_batches)
    totals = torch.zeros((), device=_device_of(model))
    names: Sequence[str] = ()
    for index, batch in enumerate(micro_batches):
        sync = index == count - 1
        with _maybe_no_sync(model, sync), precision.autocast():
            loss, components = split_loss(loss_fn(batch))
        names = list(components)
        # the total and its parts travel together: one all-reduce and one host read per step
        totals = totals + torch.stack([loss.detach().float(), *(c.detach().float() for c in components.values())])
        with _maybe_no_sync(model, sync):
            scaler.scale(loss / count).backward()
    means = all_reduce_mean(totals / count)
    result = StepResult(means, names, f"the loss became {{loss}} {where}; the run stopped before updating the "
                        f"weights. {divergence_advice(precision, clip_grad)}")
    gated = gate is not None and LossGate.applies(optimizer)
    if not gated:
        try:
            result.read()  # the host sync that stops before a bad update
        except NonFiniteLossError:
            optimizer.zero_grad(set_to_none=True)
            raise
    scaler.unscale_(optimizer)
    result.grad_norm = nn.utils.clip_grad_norm_(_params(optimizer), clip_grad or float("inf")).detach()
    if gated:
        gate.step(optimizer, scaler, means[0], result.grad_norm)  # type: ignore[union-attr]
    else:
        scaler.step(optimizer)
        scaler.update()
    return result


def divergence_advice(precision: Precision, clip_grad: Optional[float] = None) -> str:
    """What may stop a run from diverging again, for the run's ``precision`` and gradient clipping: a lower
    lr, clipping (tighter when set), and a wider precision (fp16 → bf16 / fp32, bf16 → fp32)."""
    clip = f"a lower optim.clip_grad than {clip_grad:g}" if clip_grad else "--set optim.clip_grad=1.0"
    wider = {"fp16": "--precision bf16 or fp32 instead of fp16", "bf16": "--precision fp32 instead of bf16"}
    steps = ["lower the lr", clip] + ([wider[precision.name]] if precision.name in wider else [])
    text = ", ".join(steps[:-1]) + " or " + steps[-1]
    return text[0].upper() + text[1:]


def _params(optimizer: torch.optim.Optimizer) -> Iterable[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _maybe_no_sync(model: nn.Module, sync: bool) -> ContextManager:
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()
