"""``unip bench``: a segmentor's latency and throughput on this machine in PyTorch eager, ``torch.compile`` and
ONNX Runtime, with its parameters and GFLOPs per part.

What runs: :class:`unip.deploy.onnx_export.SegmentorLogits` (the exported graph: the decode head's logits
resized to the input) on a seeded random input of ``size`` (default the crop, 512 × 512) and ``batch`` (1).
``torch.compile`` uses inductor with frozen weights (its inference setting) unless another backend is named.
For each runtime the first call is timed as set-up (compilation; for ONNX Runtime also the export, its check
and the session), then ``warmup`` more untimed calls and ``iters`` timed ones: latency = the median (and 90th
percentile) of the timed calls, throughput = batch / mean latency. CUDA timings synchronise the device; ONNX
Runtime is fed from host memory (the copies are part of its latency) and uses its CUDA provider where the
installed onnxruntime has it.

GFLOPs: ``torch.utils.flop_counter`` on one image (2 FLOPs per multiply-add; attention counted through its
math kernel, which the CPU's fused kernel would hide), per part: backbone, neck, decode head. The auxiliary
head is trained but not run at test time: its parameters are listed, its FLOPs are not part of inference.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from unip.atomic import atomic_write_text
from unip.deploy.onnx_export import SegmentorLogits, check_size, default_size, export_onnx, onnx_session
from unip.engine.distributed import resolve_device
from unip.engine.loop import resolve_precision
from unip.errors import ConfigError
from unip.models.segmentor import Segmentor
from unip.text import one_line

log = logging.getLogger(__name__)

RUNTIMES: Tuple[str, ...] = ("eager", "compile", "onnx")
LABELS = {"eager": "PyTorch eager", "compile": "torch.compile", "onnx": "ONNX Runtime"}
PARTS = (("backbone", "backbone"), ("neck", "neck"), ("decode_head", "decode head"),
         ("auxiliary_head", "auxiliary head (training only)"))


@dataclass
class RuntimeRow:
    """One runtime's timings (``status`` ``ok``, ``skipped`` or ``failed``; ``detail`` says why)."""

    runtime: str
    label: str
    where: str
    status: str = "ok"
    detail: str = ""
    setup_s: Optional[float] = None
    latency_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    images_per_s: Optional[float] = None


@dataclass
class PartCost:
    """Parameters (millions) and GFLOPs per image of one part (``gflops`` None: not run at test time)."""

    part: str
    params_m: float
    gflops: Optional[float]


@dataclass
class BenchResult:
    """Everything ``benchmark`` measured; ``table()`` for people, ``to_dict()`` for JSON."""

    checkpoint: str
    size: Tuple[int, int]
    batch: int
    device: str
    precision: str
    threads: int
    parts: List[PartCost] = field(default_factory=list)
    rows: List[RuntimeRow] = field(default_factory=list)

    @property
    def failed(self) -> List[RuntimeRow]:
        return [row for row in self.rows if row.status == "failed"]

    def to_dict(self) -> Dict[str, Any]:
        document = asdict(self)
        document.update(format="unip-bench", version=1, torch=torch.__version__)
        return document

    def table(self) -> str:
        height, width = self.size
        lines = [f"{self.checkpoint}: input {self.batch}x3x{height}x{width}, {self.device} "
                 f"({self.threads} CPU threads), {self.precision}", "",
                 f"{'part':<32}{'params (M)':>12}{'GFLOPs':>10}"]
        for part in self.parts:
            flops = "-" if part.gflops is None else f"{part.gflops:.2f}"
            lines.append(f"{part.part:<32}{part.params_m:>12.2f}{flops:>10}")
        inference = [p for p in self.parts if p.gflops is not None]
        lines.append(f"{'total (inference)':<32}{sum(p.params_m for p in inference):>12.2f}"
                     f"{sum(p.gflops for p in inference):>10.2f}")
        lines += ["", f"{'runtime':<16}{'where':<26}{'setup s':>9}{'latency ms':>12}{'p90 ms':>9}{'images/s':>10}"]
        for row in self.rows:
            if row.status != "ok":
                lines.append(f"{row.label:<16}{row.where:<26}  {row.status}: {row.detail}")
                continue
            lines.append(f"{row.label:<16}{row.where:<26}{row.setup_s:>9.2f}{row.latency_ms:>12.1f}"
                         f"{row.p90_ms:>9.1f}{row.images_per_s:>10.2f}")
        return "\n".join(lines)


# ============================================================================================ costs
def model_costs(segmentor: Segmentor, size: Tuple[int, int]) -> List[PartCost]:
    """Parameters and GFLOPs (one image of ``size``) of each part of ``segmentor`` (module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    shadow = copy.deepcopy(segmentor).to("meta").eval()  # shapes only: counting costs no arithmetic
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        shadow(torch.zeros(1, 3, *size, device="meta"))
    counts = counter.get_flop_counts()
    top = type(segmentor).__name__

    def flops(name: str) -> float:
        return sum(counts.get(name, {}).values()) / 1e9

    # the segmentor calls backbone.forward_intermediates, which module tracking does not see: the backbone's
    # FLOPs are what the rest leaves of the total
    heads = flops(f"{top}.neck") + flops(f"{top}.decode_head")
    parts = []
    for attribute, label in PARTS:
        module = getattr(segmentor, attribute, None)
        if module is None:
            continue
        params = sum(p.numel() for p in module.parameters()) / 1e6
        cost = {"backbone": flops(top) - heads, "auxiliary_head": None}.get(attribute, flops(f"{top}.{attribute}"))
        parts.append(PartCost(label, params, cost))
    return parts


# ============================================================================================ timings
def benchmark(segmentor: Segmentor, checkpoint: str = "segmentor", size: Optional[Tuple[int, int]] = None,
              batch: int = 1, device: str = "auto", precision: str = "fp32", warmup: int = 1, iters: int = 5,
              runtimes: Sequence[str] = RUNTIMES, compile_backend: str = "inductor") -> BenchResult:
    """Time ``segmentor`` in each of ``runtimes`` (module docstring); every runtime of ``RUNTIMES`` gets a row,
    those not asked for are ``skipped``, those that raise are ``failed`` (with the reason), the rest ``ok``.
    Raises ``ConfigError`` for bad options (size, batch, counts, device, a compile backend torch does not know)
    before any timing."""
    if warmup < 0 or iters < 1:
        raise ConfigError(f"--warmup {warmup} / --iters {iters}: use --warmup 0 or more and --iters 1 or more")
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ConfigError(f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")
    if "compile" in runtimes:
        check_compile_backend(compile_backend)
    torch_device = resolve_device(device)
    amp = resolve_precision(precision, torch_device)
    size = check_size(segmentor, size or default_size(segmentor), batch)
    result = BenchResult(checkpoint, size, batch, str(torch_device), amp.name, torch.get_num_threads())
    result.parts = model_costs(segmentor, size)
    segmentor = segmentor.eval().to(torch_device)
    model = SegmentorLogits(segmentor).eval()
    image = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))

    def sync() -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)

    def in_torch(call: Callable[[torch.Tensor], Any]) -> Callable[[], Any]:
        x = image.to(torch_device)

        def run() -> Any:
            with torch.no_grad(), amp.autocast():
                out = call(x)
            sync()
            return out
        return run

    makers: Dict[str, Callable[[], Tuple[Callable[[], Any], str]]] = {
        "eager": lambda: (in_torch(model), str(torch_device)),
        "compile": lambda: (in_torch(_compiled(model, compile_backend)), f"{torch_device} ({compile_backend})"),
        "onnx": lambda: _onnx_runner(segmentor, size, batch, image, torch_device),
    }
    with _quiet_torch_build_logs():
        for runtime in RUNTIMES:
            result.rows.append(_run_row(runtime, runtimes, makers, warmup, iters, batch, torch_device))
    return result


def check_compile_backend(backend: str) -> None:
    """Raise ``ConfigError`` unless ``backend`` is a ``torch.compile`` backend of this torch (any that
    ``torch._dynamo.list_backends`` knows, debug ones such as ``eager`` and ``aot_eager`` included)."""
    from torch._dynamo import list_backends

    if backend not in list_backends(exclude_tags=()):
        raise ConfigError(f"--compile-backend {backend}: torch.compile has no such backend; choose one of "
                          f"{', '.join(list_backends())} (or a debug backend: eager, aot_eager)")


def _compiled(model: torch.nn.Module, backend: str) -> Callable[[torch.Tensor], Any]:
    """``torch.compile`` for inference: with inductor, weights are frozen into the graph as constants (the
    setting inductor recommends for inference; on a CPU it also lets convolutions use pre-packed weights)."""
    options = {"freezing": True} if backend == "inductor" else None
    return torch.compile(model, backend=backend, options=options)


def _run_row(runtime: str, asked: Sequence[str], makers: Dict[str, Callable[[], Tuple[Callable[[], Any], str]]],
             warmup: int, iters: int, batch: int, device: torch.device) -> RuntimeRow:
    row = RuntimeRow(runtime, LABELS[runtime], str(device))
    if runtime not in asked:
        row.status, row.detail = "skipped", f"--no-{runtime}"
        return row
    try:
        start = time.perf_counter()
        run, row.where = makers[runtime]()
        _time(run, row, start, warmup, iters, batch)
    except ConfigError:
        raise
    except Exception as err:  # an optional runtime that does not work here is reported, not fatal
        log.debug("%s failed", runtime, exc_info=True)
        row.status, row.detail = "failed", one_line(f"{type(err).__name__}: {err}")[:200]
    return row


@contextlib.contextmanager
def _quiet_torch_build_logs() -> Iterator[None]:
    """Inductor on a machine without CUDA logs a warning about ``CUDA_HOME`` on stderr; unip's stderr is for
    its own one-line messages."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _onnx_runner(segmentor: Segmentor, size: Tuple[int, int], batch: int, image: torch.Tensor,
                 device: torch.device) -> Tuple[Callable[[], Any], str]:
    """Export to a temporary file (checked), open an onnxruntime session; returns the call and its provider."""
    folder = tempfile.mkdtemp(prefix="unip-bench-")
    try:
        path = os.path.join(folder, "segmentor.onnx")
        export_onnx(segmentor, path, size=size, batch=batch)
        session = onnx_session(path, device)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    feed = {"image": image.numpy()}

    def run() -> Any:
        return session.run(["logits"], feed)
    run.cleanup = lambda: shutil.rmtree(folder, ignore_errors=True)  # type: ignore[attr-defined]
    return run, session.get_providers()[0]


def _time(run: Callable[[], Any], row: RuntimeRow, start: float, warmup: int, iters: int, batch: int) -> None:
    """Fill ``row``: set-up (from ``start`` to the end of the first call), then ``warmup`` untimed calls and
    ``iters`` timed ones."""
    try:
        run()
        row.setup_s = time.perf_counter() - start
        for _ in range(warmup):
            run()
        seconds = []
        for _ in range(iters):
            begin = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - begin)
    finally:
        cleanup = getattr(run, "cleanup", None)
        if cleanup:
            cleanup()
    seconds.sort()
    row.latency_ms = 1000 * statistics.median(seconds)
    row.p90_ms = 1000 * seconds[-(-9 * len(seconds) // 10) - 1]  # nearest rank: 90 % of the calls took at most this
    row.images_per_s = batch / statistics.mean(seconds)


def write_json(result: BenchResult, path: str) -> str:
    """Write ``result.to_dict()`` to ``path`` atomically; returns ``path``."""
    atomic_write_text(path, json.dumps(result.to_dict(), indent=1) + "\n")
    return path


__all__ = ["RUNTIMES", "BenchResult", "PartCost", "RuntimeRow", "benchmark", "check_compile_backend", "model_costs",
           "write_json"]
