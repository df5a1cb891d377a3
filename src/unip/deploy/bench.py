"""``unip bench``: a segmentor's latency, throughput and label agreement on this machine in PyTorch eager,
``torch.compile`` and ONNX Runtime (fp32, int8, fp16), on a camera frame, whole and by sliding windows, with its
parameters and GFLOPs per part.

What runs: ``batch`` generated thermal frames of ``size`` (default the crop; ``--size 512 640`` is a 640×512
camera frame, the size the recipe's test resize keeps it at), normalised with the segmentor's mean / std, through

* ``slide``: the recipe's test pipeline, sliding windows of the segmentor's crop with its stride (all windows of
  the batch in one forward, as ``unip predict``), logits averaged where windows overlap
  (``unip.seg.slide_inference``);
* ``whole``: the whole frame in one forward (``unip.seg.whole_inference``);

in each runtime: PyTorch eager and ``torch.compile`` (inductor with frozen weights, its inference setting, unless
another backend is named) under the ``precision`` autocast, and ONNX Runtime on graphs exported at the size each
mode feeds (``slide``: the window, batch = windows × frames; ``whole``: the frame) in each of ``onnx_precisions``
(:func:`unip.deploy.onnx_export.export_onnx`: int8 calibrated on ``calibrate``'s frames or generated scenes).
Each row's **agreement** is the share of pixels whose label (arg-max) equals the fp32 PyTorch eager model's in the
same mode on the same frames. ONNX Runtime's CPU provider has float16 kernels for few operators and runs the rest
in float32 behind Casts: its fp16 row on a CPU shows that cost, not a speed-up.

For each row the first call is timed as set-up (compilation; for ONNX Runtime also the export, its checks and the
session), then ``warmup`` more untimed calls and ``iters`` timed ones: latency = the median (and 90th percentile)
of the timed calls, throughput = frames / mean latency. CUDA timings synchronise the device; ONNX Runtime is fed
from host memory (the copies are part of its latency) and uses its CUDA provider where the installed onnxruntime
has it. ``threads``: PyTorch's intra-op threads and ONNX Runtime's (default: PyTorch's current count, for both).

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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from unip.atomic import atomic_write_text
from unip.deploy.calibration import folder_frames, generated_frames
from unip.deploy.onnx_export import check_size, default_size, export_onnx, onnx_session
from unip.deploy.precision import PRECISIONS, agreement_text
from unip.engine.distributed import resolve_device
from unip.engine.loop import resolve_precision
from unip.errors import ConfigError
from unip.models.segmentor import Segmentor
from unip.seg.inference import slide_inference, whole_inference, window_spans
from unip.seg.pipeline import InferencePipeline
from unip.seg.predict import quiet_torch_build_logs
from unip.text import one_line

log = logging.getLogger(__name__)

RUNTIMES: Tuple[str, ...] = ("eager", "compile", "onnx")
LABELS = {"eager": "PyTorch eager", "compile": "torch.compile", "onnx": "ONNX Runtime"}
MODES: Tuple[str, ...] = ("slide", "whole")
PARTS = (("backbone", "backbone"), ("neck", "neck"), ("decode_head", "decode head"),
         ("auxiliary_head", "auxiliary head (training only)"))
#: Frames that check (and calibrate, for int8) the bench's ONNX exports when no folder is given.
BENCH_CHECK_FRAMES = 4


@dataclass
class RuntimeRow:
    """One runtime's timings in one mode and precision (``status`` ``ok``, ``skipped`` or ``failed``; ``detail``
    says why) and its label agreement (percent) with fp32 PyTorch eager."""

    runtime: str
    label: str
    where: str
    precision: str = "fp32"
    mode: str = "whole"
    status: str = "ok"
    detail: str = ""
    setup_s: Optional[float] = None
    latency_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    images_per_s: Optional[float] = None
    agreement: Optional[float] = None


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
    windows: int = 1
    crop: int = 0
    stride: int = 0
    parts: List[PartCost] = field(default_factory=list)
    rows: List[RuntimeRow] = field(default_factory=list)

    @property
    def failed(self) -> List[RuntimeRow]:
        return [row for row in self.rows if row.status == "failed"]

    def to_dict(self) -> Dict[str, Any]:
        document = asdict(self)
        document.update(format="unip-bench", version=2, torch=torch.__version__, onnxruntime=_ort_version())
        return document

    def table(self) -> str:
        height, width = self.size
        lines = [f"{self.checkpoint}: input {self.batch}x3x{height}x{width}, {self.device} "
                 f"({self.threads} CPU threads), {self.precision}; slide: {self.windows} window(s) of {self.crop} "
                 f"(stride {self.stride}) per frame", "",
                 f"{'part':<32}{'params (M)':>12}{'GFLOPs':>10}"]
        for part in self.parts:
            flops = "-" if part.gflops is None else f"{part.gflops:.2f}"
            lines.append(f"{part.part:<32}{part.params_m:>12.2f}{flops:>10}")
        inference = [p for p in self.parts if p.gflops is not None]
        lines.append(f"{'total (inference)':<32}{sum(p.params_m for p in inference):>12.2f}"
                     f"{sum(p.gflops for p in inference):>10.2f}")
        lines += ["", f"{'runtime':<15}{'prec':<6}{'mode':<7}{'where':<24}{'setup s':>8}{'latency ms':>12}"
                      f"{'p90 ms':>9}{'frames/s':>10}{'agreement':>11}"]
        for row in self.rows:
            head = f"{row.label:<15}{row.precision:<6}{row.mode:<7}{row.where:<24}"
            if row.status != "ok":
                lines.append(f"{head}  {row.status}: {row.detail}")
                continue
            agreement = "-" if row.agreement is None else agreement_text(row.agreement)
            lines.append(f"{head}{row.setup_s:>8.2f}{row.latency_ms:>12.1f}{row.p90_ms:>9.1f}"
                         f"{row.images_per_s:>10.2f}{agreement:>11}")
        return "\n".join(lines)


def _ort_version() -> Optional[str]:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


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
              runtimes: Sequence[str] = RUNTIMES, compile_backend: str = "inductor", modes: Sequence[str] = MODES,
              onnx_precisions: Sequence[str] = PRECISIONS, threads: Optional[int] = None,
              calibrate: Optional[str] = None, calibration_frames: int = BENCH_CHECK_FRAMES,
              cuda_graphs: bool = False) -> BenchResult:
    """Time ``segmentor`` in each of ``runtimes`` × ``modes`` (× ``onnx_precisions`` for ONNX Runtime; module
    docstring). Every runtime of ``RUNTIMES`` gets a row per mode and precision: those not asked for are ``skipped``,
    those that raise are ``failed`` (with the reason), the rest ``ok``. Raises ``ConfigError`` for bad options
    (size, batch, counts, device, modes, precisions, threads, a compile backend torch does not know) and
    ``DataError`` for a ``calibrate`` folder without a readable frame, before any timing. ``cuda_graphs``: the
    compiled rows replay CUDA graphs (inductor's ``triton.cudagraphs``; CUDA only)."""
    if warmup < 0 or iters < 1:
        raise ConfigError(f"--warmup {warmup} / --iters {iters}: use --warmup 0 or more and --iters 1 or more")
    _check_names("runtime", runtimes, RUNTIMES)
    _check_names("--modes", modes, MODES)
    _check_names("--onnx-precisions", onnx_precisions, PRECISIONS)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: use 1 or more")
    if "compile" in runtimes:
        check_compile_backend(compile_backend)
    torch_device = resolve_device(device)
    if cuda_graphs and (torch_device.type != "cuda" or compile_backend != "inductor"):
        raise ConfigError("--cuda-graphs: CUDA graphs are replayed by inductor on a CUDA device (--device cuda, "
                          "--compile-backend inductor)")
    amp = resolve_precision(precision, torch_device)
    size = check_size(segmentor, size or default_size(segmentor), batch)
    pipeline = InferencePipeline.of(segmentor)
    window = (min(pipeline.crop, size[0]), min(pipeline.crop, size[1]))
    windows = len(window_spans(size[0], pipeline.crop, pipeline.stride)) * len(
        window_spans(size[1], pipeline.crop, pipeline.stride))
    if "slide" in modes:
        check_size(segmentor, window, batch * windows)
    if "onnx" in runtimes and calibrate:  # a bad folder stops here, not after the PyTorch rows
        folder_frames(calibrate, pipeline, window, 1, 1)
    if threads is not None:
        torch.set_num_threads(threads)
    result = BenchResult(checkpoint, size, batch, str(torch_device), amp.name, torch.get_num_threads(), windows,
                         pipeline.crop, pipeline.stride)
    result.parts = model_costs(segmentor, size)
    segmentor = segmentor.eval().to(torch_device)
    frames = torch.from_numpy(generated_frames(pipeline, size, batch, count=batch).inputs[0])

    def infer(module: nn.Module, mode: str, x: torch.Tensor) -> torch.Tensor:
        if mode == "slide":
            return slide_inference(module, x, pipeline.crop, pipeline.stride)
        return whole_inference(module, x)

    def sync() -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)

    def runner(module: nn.Module, mode: str, on_device: bool, autocast: bool) -> Callable[[], torch.Tensor]:
        x = frames.to(torch_device) if on_device else frames

        def run() -> torch.Tensor:
            with torch.no_grad(), (amp.autocast() if autocast else contextlib.nullcontext()):
                out = infer(module, mode, x)
            sync()
            return out
        return run

    references = {mode: runner(segmentor, mode, True, False)().argmax(1).cpu() for mode in modes}
    context = _RowContext(segmentor, pipeline, size, window, windows, batch, torch_device, threads or
                          torch.get_num_threads(), calibrate, calibration_frames, cuda_graphs)
    with quiet_torch_build_logs():
        for mode in modes:
            for runtime in RUNTIMES:
                for row_precision in (onnx_precisions if runtime == "onnx" and runtime in runtimes else
                                      PRECISIONS if runtime == "onnx" else [amp.name]):
                    row = RuntimeRow(runtime, LABELS[runtime], str(torch_device), row_precision, mode)
                    if runtime not in runtimes:
                        row.status, row.detail = "skipped", f"--no-{runtime}"
                    else:
                        _run_row(row, lambda: context.module(row, compile_backend), runner, warmup, iters, batch,
                                 references[mode])
                    result.rows.append(row)
    return result


def _check_names(option: str, given: Sequence[str], known: Sequence[str]) -> None:
    unknown = [name for name in given if name not in known]
    if unknown or not given:
        raise ConfigError(f"{option} {','.join(given) or '(empty)'}: choose from {', '.join(known)} (comma-separated)")


@dataclass
class _RowContext:
    """What makes a row's model: the eager segmentor, a compiled one, or an ONNX Runtime session on a graph
    exported for the row's mode and precision."""

    segmentor: Segmentor
    pipeline: InferencePipeline
    size: Tuple[int, int]
    window: Tuple[int, int]
    windows: int
    batch: int
    device: torch.device
    threads: int
    calibrate: Optional[str]
    calibration_frames: int
    cuda_graphs: bool = False

    def module(self, row: RuntimeRow, backend: str) -> Tuple[nn.Module, str, Callable[[], None]]:
        """``(module, where, cleanup)`` for ``row``."""
        if row.runtime == "eager":
            return self.segmentor, str(self.device), _nothing
        if row.runtime == "compile":
            graphs = ", CUDA graphs" if self.cuda_graphs else ""
            return (_compiled(self.segmentor, backend, self.cuda_graphs), f"{self.device} ({backend}{graphs})",
                    _nothing)
        size, batch = (self.window, self.batch * self.windows) if row.mode == "slide" else (self.size, self.batch)
        folder = tempfile.mkdtemp(prefix="unip-bench-")
        try:
            path = os.path.join(folder, "segmentor.onnx")
            export_onnx(self.segmentor, path, size=size, batch=batch, precision=row.precision,
                        calibrate=self.calibrate, calibration_frames=self.calibration_frames, min_agreement=0.0)
            session = onnx_session(path, self.device, self.threads)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        provider = session.get_providers()[0]
        where = "CPU EP, fp16 via casts" if provider == "CPUExecutionProvider" and row.precision == "fp16" else provider
        return _OnnxLogits(session), where, lambda: shutil.rmtree(folder, ignore_errors=True)


def _nothing() -> None:
    return None


class _OnnxLogits(nn.Module):
    """An onnxruntime session of the exported graph as a module: ``x [B, 3, H, W]`` (host memory) → logits at the
    input size, so that ``whole_inference`` and ``slide_inference`` run it as they run the segmentor."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(["logits"], {"image": feed})[0])


def check_compile_backend(backend: str) -> None:
    """Raise ``ConfigError`` unless ``backend`` is a ``torch.compile`` backend of this torch (any that
    ``torch._dynamo.list_backends`` knows, debug ones such as ``eager`` and ``aot_eager`` included)."""
    from torch._dynamo import list_backends

    if backend not in list_backends(exclude_tags=()):
        raise ConfigError(f"--compile-backend {backend}: torch.compile has no such backend; choose one of "
                          f"{', '.join(list_backends())} (or a debug backend: eager, aot_eager)")


def _compiled(model: torch.nn.Module, backend: str, cuda_graphs: bool = False) -> Callable[[torch.Tensor], Any]:
    """``torch.compile`` for inference: with inductor, weights are frozen into the graph as constants (the
    setting inductor recommends for inference; on a CPU it also lets convolutions use pre-packed weights), and
    with ``cuda_graphs`` each shape's kernels are replayed as one CUDA graph (what ``mode="reduce-overhead"``
    turns on)."""
    options = {"freezing": True, **({"triton.cudagraphs": True} if cuda_graphs else {})} \
        if backend == "inductor" else None
    return torch.compile(model, backend=backend, options=options)


def _run_row(row: RuntimeRow, make: Callable[[], Tuple[nn.Module, str, Callable[[], None]]],
             runner: Callable[[nn.Module, str, bool, bool], Callable[[], torch.Tensor]], warmup: int, iters: int,
             batch: int, reference: torch.Tensor) -> None:
    """Fill ``row``: its timings and its labels' agreement with ``reference``; a runtime that raises is ``failed``."""
    try:
        start = time.perf_counter()
        module, row.where, cleanup = make()
        try:
            on_torch = row.runtime != "onnx"
            out = _time(runner(module, row.mode, on_torch, on_torch), row, start, warmup, iters, batch)
        finally:
            cleanup()
        row.agreement = 100.0 * float((out.argmax(1).cpu() == reference).float().mean())
    except ConfigError:
        raise
    except Exception as err:  # an optional runtime that does not work here is reported, not fatal
        log.debug("%s %s %s failed", row.runtime, row.precision, row.mode, exc_info=True)
        row.status, row.detail = "failed", one_line(f"{type(err).__name__}: {err}")[:200]


def _time(run: Callable[[], Any], row: RuntimeRow, start: float, warmup: int, iters: int, batch: int) -> Any:
    """Fill ``row``: set-up (from ``start`` to the end of the first call), then ``warmup`` untimed calls and
    ``iters`` timed ones. Returns what the first call returned."""
    first = run()
    row.setup_s = time.perf_counter() - start
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(iters):
        begin = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - begin)
    seconds.sort()
    row.latency_ms = 1000 * statistics.median(seconds)
    row.p90_ms = 1000 * seconds[-(-9 * len(seconds) // 10) - 1]  # nearest rank: 90 % of the calls took at most this
    row.images_per_s = batch / statistics.mean(seconds)
    return first


def write_json(result: BenchResult, path: str) -> str:
    """Write ``result.to_dict()`` to ``path`` atomically; returns ``path``."""
    atomic_write_text(path, json.dumps(result.to_dict(), indent=1) + "\n")
    return path


__all__ = ["MODES", "RUNTIMES", "BenchResult", "PartCost", "RuntimeRow", "benchmark", "check_compile_backend",
           "model_costs", "write_json"]
