"""ONNX export of a whole segmentor, checked against onnxruntime right after export.

The graph (``SegmentorLogits``): input ``image`` float32 ``[B, 3, H, W]``: the 8-bit model image of unip's input
mapping (``unip.data.inputs``: a radiometric raster's percentile stretch or fixed °C window, colour as luma),
repeated to three channels and normalised as in training (``(pixel - mean) / std`` on 0–255 values) → output
``logits`` float32 ``[B, classes, H, W]``: the decode head's stride-4 logits resized bilinearly to the input size,
i.e. what one window of the sliding-window test contributes (``unip.seg.whole_inference``); the arg-max over
classes is the label map. H and W must be multiples of the patch size (16) and at least 32.

* Fixed size (default): B, H and W as exported (``batch``, ``size``: the segmentor's crop, 512).
* Dynamic (``dynamic=True``): B, H and W free. Tracing a free size needs two rewrites that compute the same
  numbers: the position table is resampled for every input (the identity at the training grid), and
  UperNet's adaptive average pooling becomes averaging matrices built from the input size
  (:class:`AveragingPool2d`); ``torch.export`` would otherwise bake the traced size's pooling bins and table
  into the graph.

Precision (``precision``): ``fp32`` as traced; ``fp16`` and ``int8`` are made from the checked fp32 graph
(:mod:`unip.deploy.precision`: fp16 weights and computation with float32 input and output; int8 static QDQ
quantization calibrated on frames, with the attention left in float by default).

The model's ``metadata_props`` say how to feed it: ``unip.mean`` / ``unip.std`` (0–255), ``unip.crop`` /
``unip.stride`` (sliding window), ``unip.classes``, ``unip.palette``, ``unip.input``, ``unip.output``,
``unip.precision`` (``fp32``, ``fp16``, ``int8``), ``unip.quantization`` (int8: format, calibration frames, what
stayed in float) and ``unip.agreement`` (the label agreement below, percent, and the frames it was measured on).

Checks, before anything is put at the output path (else ``ExportError``, and nothing is left there):

* the fp32 graph: a random input (seed 0) of the export size (with ``dynamic`` also another size, batch 2) runs
  through PyTorch and onnxruntime (CPU); the logits may differ by at most ``tolerance`` (1e-4) anywhere;
* the exported graph, whatever its precision: its label agreement with the fp32 PyTorch model (the share of
  pixels whose arg-max class is the same) over the calibration frames (``calibrate``: a folder of the user's
  frames; else generated thermal scenes, :mod:`unip.deploy.calibration`) must be at least ``min_agreement``
  (99 %).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unip.deploy.calibration import DEFAULT_FRAMES, GENERATED_FRAMES, CheckFrames, folder_frames, generated_frames
from unip.deploy.precision import (DEFAULT_KEEP_FLOAT, FLOAT_GROUPS, MIN_AGREEMENT, agreement_text, check_precision,
                                   convert_fp16, label_agreement, quantize_int8)
from unip.errors import ConfigError, ExportError
from unip.memory import require_memory
from unip.models.segmentor import Segmentor
from unip.optional import require
from unip.outputs import claim, out_file, staging_folder
from unip.seg.pipeline import InferencePipeline
from unip.seg.predict import forward_bytes
from unip.seg.render import ClassInfo

log = logging.getLogger(__name__)

#: Opset the exporter writes by default (torch's dynamo exporter targets 18 and converts to others).
DEFAULT_OPSET = 18
MIN_OPSET = 18
#: Largest max-abs difference of the logits that passes the check.
TOLERANCE = 1e-4
#: Above this many bytes of weights the initialisers go to ``<file>.data`` (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1536 << 20
FORMAT_KEY = "unip.format"


class SegmentorLogits(nn.Module):
    """``segmentor`` in eval mode as one graph: ``image [B, 3, H, W]`` → ``logits [B, classes, H, W]`` (the
    decode head's logits resized bilinearly, ``align_corners=False``, to the input size)."""

    def __init__(self, segmentor: Segmentor) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, image: Tensor) -> Tensor:
        logits = self.segmentor(image)
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


class AveragingPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d(output_size)`` written as ``rows @ x @ colsᵀ`` with averaging matrices built
    from the input's size (bin ``i`` of ``n`` inputs: ``floor(i·n/k) .. ceil((i+1)·n/k)``, PyTorch's rule), so
    that a graph traced with a symbolic size pools every size correctly."""

    def __init__(self, output_size: int) -> None:
        super().__init__()
        self.output_size = int(output_size)

    def forward(self, x: Tensor) -> Tensor:
        rows = averaging_matrix(x.shape[-2], self.output_size, x)
        cols = averaging_matrix(x.shape[-1], self.output_size, x)
        return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def averaging_matrix(size, bins: int, like: Tensor) -> Tensor:
    """``[bins, size]`` matrix whose row ``i`` averages adaptive-pooling bin ``i`` of ``size`` inputs."""
    index = torch.arange(bins, device=like.device)
    start = torch.div(index * size, bins, rounding_mode="floor")
    end = torch.div((index + 1) * size + bins - 1, bins, rounding_mode="floor")
    position = torch.arange(size, device=like.device)
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


class _ResizedBranch(nn.Module):
    """A pyramid-pooling branch (pool → conv-BN-ReLU) followed by the resize to its input's size that
    UperNet applies next; UperNet's own resize then sees equal sizes and does nothing. Traced with a symbolic
    size, the branch can no longer be specialised on "pooled size == input size", which holds at some sizes."""

    def __init__(self, pool: nn.Module, conv: nn.Module) -> None:
        super().__init__()
        self.pool, self.conv = pool, conv

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.conv(self.pool(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


@contextlib.contextmanager
def traceable_sizes(segmentor: Segmentor) -> Iterator[None]:
    """Within the block, ``segmentor`` computes the same numbers in a form that traces with a free input size
    (module docstring); it is restored afterwards."""
    backbone = segmentor.backbone
    branches = getattr(segmentor.decode_head, "psp_modules", None)
    originals = list(branches) if branches is not None else []
    for index, branch in enumerate(originals):
        pool, conv = branch[0], branch[1]
        bins = pool.output_size if isinstance(pool.output_size, int) else pool.output_size[0]
        branches[index] = _ResizedBranch(AveragingPool2d(bins), conv)
    backbone.always_resample_pos_embed = True
    try:
        yield
    finally:
        del backbone.always_resample_pos_embed  # back to the class default
        for index, branch in enumerate(originals):
            branches[index] = branch


# ============================================================================================ export
@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote and measured: the file(s), the input size, the max-abs difference of
    onnxruntime's fp32 logits from PyTorch's for each checked input shape, and the exported graph's label
    agreement (percent) with the fp32 PyTorch model on ``frames``."""

    path: str
    size: Tuple[int, int]
    batch: int
    dynamic: bool
    opset: int
    precision: str = "fp32"
    differences: Dict[str, float] = field(default_factory=dict)
    agreement: Optional[float] = None
    frames: str = ""
    seconds: float = 0.0
    files: List[str] = field(default_factory=list)

    def summary(self) -> str:
        shape = "B x 3 x H x W (dynamic)" if self.dynamic else f"{self.batch} x 3 x {self.size[0]} x {self.size[1]}"
        checks = ", ".join(f"{k}: {v:.1e}" for k, v in self.differences.items())
        line = f"wrote {self.path} ({self.precision}, opset {self.opset}, input {shape}) in {self.seconds:.0f} s"
        if self.agreement is not None:
            line += (f"; label agreement with the fp32 PyTorch model {agreement_text(self.agreement)} over "
                     f"{self.frames}")
        if checks:
            line += f"; the fp32 graph matches PyTorch in onnxruntime (max abs diff of logits {checks})"
        return line


def check_size(segmentor: Segmentor, size: Tuple[int, int], batch: int = 1, what: str = "--size") -> Tuple[int, int]:
    """``size`` as ``(H, W)`` after checking it: multiples of the patch, at least 2 patches, and memory for a
    forward of ``batch`` such inputs. Raises ``ConfigError`` naming ``what``."""
    patch = segmentor.backbone.patch_size
    height, width = int(size[0]), int(size[1])
    if height < 2 * patch or width < 2 * patch or height % patch or width % patch:
        raise ConfigError(f"{what} {height} {width}: height and width must be multiples of the patch size {patch} "
                          f"and at least {2 * patch}, e.g. {max(2 * patch, height // patch * patch)} "
                          f"{max(2 * patch, width // patch * patch)}")
    if batch < 1:
        raise ConfigError(f"--batch {batch}: use at least 1")
    needed = 3 * batch * forward_bytes(segmentor, height, width)  # tracing and checking hold a few copies
    require_memory(needed, f"{what} {height} {width} with batch {batch}", f"lower {what} or --batch")
    return height, width


def default_size(segmentor: Segmentor) -> Tuple[int, int]:
    """The segmentor's sliding-window crop (its test pipeline's: 512 for the recipe's models)."""
    crop = InferencePipeline.of(segmentor).crop
    return crop, crop


def export_onnx(segmentor: Segmentor, path: str, size: Optional[Tuple[int, int]] = None, batch: int = 1,
                dynamic: bool = False, opset: Optional[int] = None, tolerance: float = TOLERANCE,
                check: bool = True, precision: str = "fp32", calibrate: Optional[str] = None,
                calibration_frames: int = DEFAULT_FRAMES, keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
                min_agreement: float = MIN_AGREEMENT, frames: Optional[CheckFrames] = None) -> OnnxExport:
    """Write ``segmentor`` as ONNX to ``path`` (module docstring) in ``precision`` and check it.

    ``size``: ``(H, W)`` of the traced (and, without ``dynamic``, the only) input, default the crop size;
    ``batch``: the fixed batch (ignored with ``dynamic``). ``calibrate``: a folder of frames (at most
    ``calibration_frames`` are used) that calibrates an int8 export and checks every export; without it, generated
    thermal scenes do (``frames``: inputs the caller has already made, instead of either). ``keep_float``: the
    groups an int8 export leaves in float32 (``unip.deploy.precision.FLOAT_GROUPS``). Raises ``ConfigError`` for bad
    options or an ``out`` that is somebody else's file, ``DataError`` for a calibration folder without a readable
    frame, ``ExportError`` when the exporter fails, onnxruntime's fp32 logits differ from PyTorch's by more than
    ``tolerance`` or the label agreement is below ``min_agreement`` percent; nothing is left at ``path`` then."""
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    require("onnxruntime", "checking the ONNX export")
    keep_float = check_precision(precision, keep_float)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    highest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= highest:
        raise ConfigError(f"--opset {opset}: the exporter writes opsets {MIN_OPSET} to {highest}")
    if not 0 <= min_agreement <= 100:
        raise ConfigError(f"--min-agreement {min_agreement:g}: a percentage, 0 to 100")
    if calibration_frames < 1:
        raise ConfigError(f"--calibration-frames {calibration_frames}: use at least 1")
    out_file(path, "--out", is_ours=is_our_onnx)
    claim([path + ".data"], is_our_onnx_data, "--out")
    size = check_size(segmentor, size or default_size(segmentor), 2 if dynamic else batch)
    pipeline = InferencePipeline.of(segmentor)
    feed_batch = 1 if dynamic else batch
    if frames is None:  # read before the export: a bad folder stops before minutes of tracing
        frames = (folder_frames(calibrate, pipeline, size, feed_batch, calibration_frames) if calibrate
                  else generated_frames(pipeline, size, feed_batch, min(GENERATED_FRAMES, calibration_frames)))
    if next(segmentor.parameters()).device.type != "cpu":  # export and check on the CPU, leave the caller's be
        segmentor = copy.deepcopy(segmentor).cpu()
    segmentor.eval()
    model = SegmentorLogits(segmentor).eval()
    start = time.perf_counter()
    folder = staging_folder(path, "--out")
    staged = os.path.join(folder, os.path.basename(path))
    traced = staged if precision == "fp32" else os.path.join(folder, ".fp32-" + os.path.basename(path))
    try:
        program = _trace(model, segmentor, size, batch, dynamic, opset)
        metadata = model_metadata(segmentor, dynamic, precision, keep_float, frames)
        program.model.metadata_props.update(metadata)
        external = sum(p.numel() * p.element_size() for p in segmentor.parameters()) > EXTERNAL_DATA_BYTES
        program.save(traced, external_data=external)
        result = OnnxExport(path, size, feed_batch, dynamic, opset, precision, frames=frames.describe())
        if check:
            result.differences = check_parity(model, traced, size, batch, dynamic, tolerance)
        if precision == "fp16":
            convert_fp16(traced, staged, metadata)
        elif precision == "int8":
            quantize_int8(traced, staged, frames.inputs, metadata, keep_float)
        if traced != staged:
            for leftover in (traced, traced + ".data"):
                if os.path.exists(leftover):
                    os.remove(leftover)
        if check:
            result.agreement = check_agreement(model, staged, frames, precision, min_agreement, keep_float)
            _record_agreement(staged, result)
        result.files = _move_into_place(folder, os.path.dirname(os.path.abspath(path)))
        result.seconds = time.perf_counter() - start
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_agreement(model: SegmentorLogits, path: str, frames: CheckFrames, precision: str, min_agreement: float,
                    keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT) -> float:
    """The label agreement (percent) of the ONNX model at ``path`` (onnxruntime, CPU) with ``model`` in fp32
    PyTorch over ``frames``; ``ExportError`` naming the number and the fix when it is below ``min_agreement``."""
    session = _session_or_error(path)

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    agreement = label_agreement(reference, lambda x: session.run(["logits"], {"image": x})[0], frames.inputs)
    if agreement < min_agreement:
        fixes = {"int8": "calibrate on more frames of your camera (--calibrate DIR, --calibration-frames N), leave "
                         f"more in float (--keep-float {','.join(_more_float(keep_float))}) or export --precision "
                         "fp16 or fp32",
                 "fp16": "export --precision fp32 (or int8 calibrated on your frames)",
                 "fp32": "report it: the fp32 graph should match PyTorch"}
        raise ExportError(f"the {precision} model's labels agree with the fp32 PyTorch model's on "
                          f"{agreement_text(agreement)} of the pixels of {frames.describe()}, below --min-agreement "
                          f"{min_agreement:g} %; the export was removed. Fix: {fixes[precision]}")
    return agreement


def _more_float(keep_float: Sequence[str]) -> List[str]:
    return list(dict.fromkeys([*keep_float, *FLOAT_GROUPS]))


def _record_agreement(path: str, result: OnnxExport) -> None:
    """Add ``unip.agreement`` to the metadata of the written model (its weights are left where they are)."""
    onnx = require("onnx", "ONNX export")
    model = onnx.load(path, load_external_data=False)
    model.metadata_props.add(key="unip.agreement", value=json.dumps(
        {"percent": round(result.agreement, 4), "frames": result.frames, "reference": "fp32 PyTorch"}))
    onnx.save(model, path)


def _trace(model: SegmentorLogits, segmentor: Segmentor, size: Tuple[int, int], batch: int, dynamic: bool,
           opset: int):
    """The ``torch.onnx.ONNXProgram`` of ``model`` (dynamo exporter; its chatter and warnings go to the log)."""
    example = torch.zeros(2 if dynamic else batch, 3, *size)
    shapes = None
    if dynamic:
        dim = torch.export.Dim
        shapes = {"image": {0: dim("batch", min=1, max=4096), 2: dim.DYNAMIC, 3: dim.DYNAMIC}}
    chatter = io.StringIO()
    context = traceable_sizes(segmentor) if dynamic else contextlib.nullcontext()
    try:
        with context, torch.no_grad(), warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(chatter), _silenced("torch.onnx", "onnxscript", "onnx_ir"):
            warnings.simplefilter("always")
            program = torch.onnx.export(model, (example,), None, dynamo=True, verbose=False, input_names=["image"],
                                        output_names=["logits"], opset_version=opset, dynamic_shapes=shapes)
    except Exception as err:
        log.debug("exporter output:\n%s", chatter.getvalue())
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {str(err).strip().splitlines()[0]}"
                          f"{' (with --dynamic; try a fixed size)' if dynamic else ''}") from err
    for warning in caught:
        log.debug("exporter warning: %s", warning.message)
    return program


@contextlib.contextmanager
def _silenced(*names: str) -> Iterator[None]:
    """The exporter's libraries log progress and fallbacks (with tracebacks) on stderr; unip reports the
    outcome itself, so they are muted for the block."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)  # their child loggers inherit it
    try:
        yield
    finally:
        for logger, level in zip(loggers, before):
            logger.setLevel(level)


def model_metadata(segmentor: Segmentor, dynamic: bool, precision: str = "fp32",
                   keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT, frames: Optional[CheckFrames] = None
                   ) -> Dict[str, str]:
    """``metadata_props`` of the exported model (module docstring): JSON texts."""
    pipeline = InferencePipeline.of(segmentor)
    classes = ClassInfo.resolve(segmentor.num_classes, None, segmentor.meta)
    patch = segmentor.backbone.patch_size
    size = "B, H and W free" if dynamic else "fixed"
    inside = {"fp32": "", "fp16": "; cast to float16 inside, weights and computation float16",
              "int8": "; quantized to uint8 inside, weights int8"}[precision]
    extra = {}
    if precision == "int8":
        extra["unip.quantization"] = json.dumps({
            "format": "QDQ", "weights": "int8, per output channel", "activations": "uint8, per tensor",
            "calibration": "MinMax on " + (frames.describe() if frames else "?"), "float": list(keep_float)})
    return {
        FORMAT_KEY: "segmentor logits v1",
        "unip.precision": precision, **extra,
        "unip.input": f"image: float32 [B, 3, H, W] ({size}; H and W multiples of {patch}): the 8-bit gray model "
                      "image repeated to 3 channels, (pixel - mean) / std on 0-255 values; the 8-bit image is unip's "
                      "input mapping (docs/thermal.md): a radiometric raster (FLIR R-JPEG/FFF/SEQ/CSQ, 16-bit "
                      "TIFF/PNG) stretched between its 1st and 99th percentile counts (or a fixed degree C window), "
                      f"a colour image as its luma 0.299 R + 0.587 G + 0.114 B, 8-bit gray as it is{inside}",
        "unip.output": "logits: float32 [B, classes, H, W], the decode head's logits resized bilinearly to the "
                       "input; argmax over classes = labels",
        "unip.mean": json.dumps(list(pipeline.mean)), "unip.std": json.dumps(list(pipeline.std)),
        "unip.crop": str(pipeline.crop), "unip.stride": str(pipeline.stride),
        "unip.test_scale": json.dumps(list(pipeline.scale)),
        "unip.classes": json.dumps(list(classes.names) if classes.names else None),
        "unip.palette": json.dumps([list(c) for c in classes.palette]),
    }


def check_parity(model: SegmentorLogits, path: str, size: Tuple[int, int], batch: int, dynamic: bool,
                 tolerance: float = TOLERANCE) -> Dict[str, float]:
    """Max-abs difference of onnxruntime's logits from PyTorch's for seeded random inputs (the export shape;
    with ``dynamic`` also a larger, non-square one with batch 2), keyed ``"BxHxW"``. Raises ``ExportError``
    naming the shape when one exceeds ``tolerance``."""
    session = _session_or_error(path)
    patch = model.segmentor.backbone.patch_size
    shapes = [(batch if not dynamic else 1, *size)]
    if dynamic:
        shapes.append((2, size[0] + 2 * patch, size[1] + 4 * patch))
    generator = torch.Generator().manual_seed(0)
    differences: Dict[str, float] = {}
    for shape in shapes:
        image = torch.randn(shape[0], 3, shape[1], shape[2], generator=generator)
        key = "x".join(str(s) for s in shape)
        with torch.no_grad():
            expected = model(image).numpy()
        try:
            got = session.run(["logits"], {"image": image.numpy()})[0]
        except Exception as err:  # onnxruntime's errors are of its own types
            raise ExportError(f"onnxruntime cannot run the exported model on input {key}: "
                              f"{str(err).strip().splitlines()[0]}; the export was removed") from err
        differences[key] = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        if not differences[key] <= tolerance:
            raise ExportError(f"the ONNX model's logits differ from PyTorch's by {differences[key]:.3g} (max abs, "
                              f"input {key}; allowed {tolerance:g}); the export was removed")
    return differences


def _session_or_error(path: str):
    try:
        return onnx_session(path)
    except Exception as err:  # onnxruntime's errors are of its own types
        raise ExportError(f"onnxruntime cannot load the exported model: {str(err).strip().splitlines()[0][:300]}; "
                          "the export was removed (another --opset may help)") from err


def onnx_session(path: str, device: Optional[torch.device] = None, threads: Optional[int] = None):
    """An onnxruntime ``InferenceSession`` for ``path``: CUDA when ``device`` is a CUDA device and the
    installed onnxruntime has it, else the CPU."""
    ort = require("onnxruntime", "running ONNX models")
    providers = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(path, sess_options=options, providers=providers)


def _move_into_place(folder: str, target: str) -> List[str]:
    moved = []
    for name in sorted(os.listdir(folder)):
        destination = os.path.join(target, name)
        os.replace(os.path.join(folder, name), destination)
        moved.append(destination)
    return moved


def is_our_onnx(path: str) -> bool:
    """True for an ONNX model ``export_onnx`` wrote (its metadata holds ``unip.format``)."""
    onnx = require("onnx", "reading ONNX models")
    model = onnx.load(path, load_external_data=False)
    return any(prop.key == FORMAT_KEY for prop in model.metadata_props)


def is_our_onnx_data(path: str) -> bool:
    """True for the external-weights file beside an ONNX model that ``export_onnx`` wrote."""
    model = path[: -len(".data")]
    return os.path.isfile(model) and is_our_onnx(model)
