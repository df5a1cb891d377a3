"""fp16 and int8 versions of an exported fp32 graph, and the label agreement that every export states.

* **fp16** (for GPUs): weights and computation in float16, made with ONNX Runtime's own float16 converter
  (``onnxruntime.transformers.float16``, the converter of onnxconverter-common that ONNX Runtime's float16 page
  recommends, shipped inside onnxruntime), ``keep_io_types``: the input ``image`` and the output ``logits`` stay
  float32, with a Cast at each end. ONNX Runtime's CPU provider has float16 kernels for few operators and runs
  the others in float32 behind inserted Casts, so an fp16 graph is no faster on a CPU.
* **int8** (for CPUs): ONNX Runtime's static quantization in QDQ format (QuantizeLinear / DequantizeLinear pairs
  that the runtime fuses into integer kernels): weights int8 per output channel, activations uint8 per tensor
  (U8S8, what ONNX Runtime recommends for x86-64), ranges from MinMax calibration on the caller's frames. The
  groups of ``keep_float`` stay in float32 (:data:`FLOAT_GROUPS`); the default keeps the attention in float:
  quantized, its q·kᵀ, softmax and attention·v cost more than they save on a CPU (ONNX Runtime's QLinearSoftmax
  alone took longer than the whole float attention) and they lose the most labels (docs/inference.md).

:func:`label_agreement`: the share of pixels (over every input of a ``CheckFrames``) whose arg-max class is the
same in two models, in percent.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from unip.errors import ConfigError
from unip.optional import require

log = logging.getLogger(__name__)

PRECISIONS: Tuple[str, ...] = ("fp32", "fp16", "int8")
#: What an int8 export may leave in float32: ``attention`` (the activation × activation MatMuls of every block,
#: q·kᵀ and attention·v, and so their Softmax), ``layernorm`` (every LayerNormalization), ``classifier`` (the
#: decode head's last convolution, the one that gives the class logits).
FLOAT_GROUPS: Tuple[str, ...] = ("attention", "layernorm", "classifier")
DEFAULT_KEEP_FLOAT: Tuple[str, ...] = ("attention",)
#: The label agreement (percent of pixels) below which an export is refused.
MIN_AGREEMENT = 99.0


def check_precision(precision: str, keep_float: Sequence[str]) -> Tuple[str, ...]:
    """``keep_float`` as a tuple after checking ``precision`` and the group names; ``ConfigError`` otherwise."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    unknown = [group for group in keep_float if group not in FLOAT_GROUPS]
    if unknown:
        raise ConfigError(f"--keep-float {','.join(keep_float)}: {', '.join(unknown)} is not a group; choose from "
                          f"{', '.join(FLOAT_GROUPS)} (comma-separated), or none")
    return tuple(dict.fromkeys(keep_float))


# ============================================================================================ fp16
def convert_fp16(source: str, target: str, metadata: Dict[str, str]) -> None:
    """Write ``source`` (an fp32 ONNX file) as an fp16 graph with float32 input and output to ``target``."""
    onnx = require("onnx", "fp16 export")
    require("onnxruntime", "fp16 export")
    float16 = importlib.import_module("onnxruntime.transformers.float16")
    model = onnx.load(source)
    with _quiet_libraries():
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    _save_with_metadata(converted, target, metadata)


# ============================================================================================ int8
def quantize_int8(source: str, target: str, inputs: Iterable[np.ndarray], metadata: Dict[str, str],
                  keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT, input_name: str = "image") -> None:
    """Write ``source`` (an fp32 ONNX file) statically quantized (QDQ, module docstring) to ``target``, calibrated
    on ``inputs`` (float32 arrays the graph takes)."""
    onnx = require("onnx", "int8 export")
    require("onnxruntime", "int8 export")
    quantization = importlib.import_module("onnxruntime.quantization")
    registry = importlib.import_module("onnxruntime.quantization.registry")
    model = onnx.load(source, load_external_data=False)
    op_types = sorted(set(registry.QLinearOpsRegistry) | set(registry.QDQRegistry))
    if "layernorm" in keep_float:
        op_types.remove("LayerNormalization")
    excluded = float_nodes(model.graph, keep_float)
    reader = _Reader(inputs, input_name)
    with _quiet_libraries():
        quantization.quantize_static(
            source, target, reader, quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax, op_types_to_quantize=op_types,
            nodes_to_exclude=excluded)
    _save_with_metadata(onnx.load(target), target, metadata)


def float_nodes(graph, keep_float: Sequence[str]) -> List[str]:
    """Names of the nodes of ``graph`` (an ``onnx.GraphProto``) that ``keep_float``'s groups leave in float32
    (``layernorm`` is left out by operator type instead)."""
    constant = {tensor.name for tensor in graph.initializer} | {""}
    for node in graph.node:  # topological order: what is computed from weights alone (a transposed weight) is one
        if all(name in constant for name in node.input):
            constant.update(node.output)
    names = []
    if "attention" in keep_float:
        names += [node.name for node in graph.node if node.op_type == "Softmax"
                  or (node.op_type == "MatMul" and not any(name in constant for name in node.input))]
    if "classifier" in keep_float:
        convs = [node.name for node in graph.node if node.op_type == "Conv"]
        names += convs[-1:]  # nodes are in topological order: the last convolution gives the logits
    return names


class _Reader:
    """onnxruntime's ``CalibrationDataReader``: one feed per input."""

    def __init__(self, inputs: Iterable[np.ndarray], name: str) -> None:
        self._inputs: Iterator[np.ndarray] = iter(inputs)
        self._name = name

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        item = next(self._inputs, None)
        return None if item is None else {self._name: item}


# ============================================================================================ agreement
def label_agreement(reference: Callable[[np.ndarray], np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
                    inputs: Iterable[np.ndarray]) -> float:
    """Percent of pixels whose arg-max over classes (axis 1 of the logits ``[B, classes, H, W]``) is the same for
    ``reference`` and ``candidate``, over every input."""
    same = total = 0
    for x in inputs:
        expected = np.asarray(reference(x)).argmax(1)
        got = np.asarray(candidate(x)).argmax(1)
        same += int((expected == got).sum())
        total += expected.size
    return 100.0 * same / max(total, 1)


def agreement_text(agreement: float) -> str:
    """``99.87 %``; below 100 never rounded up to it (``99.996`` → ``99.99 %``)."""
    shown = np.floor(agreement * 100) / 100 if agreement < 100 else 100.0
    return f"{shown:.2f} %"


# ============================================================================================ helpers
def _save_with_metadata(model, path: str, metadata: Dict[str, str]) -> None:
    onnx = require("onnx", "ONNX export")
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """onnxruntime's quantization and float16 tools log advice and progress on the root logger (and warnings);
    unip reports the outcome itself, so those records are dropped for the block."""
    import warnings

    root = logging.getLogger()
    drop = _DropAll()
    root.addFilter(drop)  # only records logged on the root logger itself: unip's own loggers are unaffected
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(drop)


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        log.debug("onnxruntime: %s", record.getMessage())
        return False


__all__ = ["DEFAULT_KEEP_FLOAT", "FLOAT_GROUPS", "MIN_AGREEMENT", "PRECISIONS", "agreement_text", "check_precision",
           "convert_fp16", "float_nodes", "label_agreement", "quantize_int8"]
