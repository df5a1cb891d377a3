"""``unip export`` and ``unip bench``: a segmentor as ONNX or a backbone for timm; its speed on this machine."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Tuple

from unip.deploy.precision import DEFAULT_KEEP_FLOAT
from unip.engine.config import integer
from unip.errors import ConfigError
from unip.outputs import is_our_json, out_file


_SIDE = integer(1, 65_536).option()
#: Frames of a calibration folder used by default (``unip.deploy.calibration.DEFAULT_FRAMES``; not imported here:
#: building the parser imports no torch).
DEFAULT_FRAMES = 32


def _group_list(text: str) -> Tuple[str, ...]:
    """``--keep-float attention,layernorm`` → its names (``none`` → none; checked by the export)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    return () if names == ("none",) else names


def _name_list(text: str) -> Tuple[str, ...]:
    """``a,b`` → ``("a", "b")`` (checked by the library)."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (a percentage, e.g. 99.5)") from None
    if not 0 <= value <= 100:  # nan fails too
        raise argparse.ArgumentTypeError(f"{text}: a percentage from 0 to 100")
    return value


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a segmentor as ONNX (checked with onnxruntime), a backbone for timm",
                       description="--format onnx: the whole segmentor as one ONNX graph, normalised image "
                                   "[B, 3, H, W] -> logits [B, classes, H, W] (the decode head's, resized to the "
                                   "input), in fp32, fp16 (GPUs) or int8 (CPUs; calibrated on --calibrate DIR), run "
                                   "through onnxruntime right after export: the fp32 graph's logits must match "
                                   "PyTorch's within 1e-4, and the exported model's labels must agree with the fp32 "
                                   "PyTorch model's on at least --min-agreement percent of the pixels of the "
                                   "calibration frames (generated thermal scenes without --calibrate), or the "
                                   "export fails and nothing is written. "
                                   "--format timm: the backbone of a pre-trained student or of a segmentor as "
                                   "model.safetensors + config.json that timm loads (checked in timm).")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="onnx: a fine-tuned segmentor (ours or the release's); timm: any backbone unip info reads, "
                        "or a segmentor")
    p.add_argument("--format", required=True, choices=("onnx", "timm"), help="what to write")
    p.add_argument("--out", metavar="PATH", help="onnx: the .onnx file (default <checkpoint stem>.onnx); timm: a "
                                                 "folder (default <checkpoint stem>-timm)")
    p.add_argument("--size", nargs=2, type=_SIDE, metavar=("H", "W"),
                   help="onnx: input height and width, multiples of 16 (default the crop size, 512 512)")
    p.add_argument("--dynamic", action="store_true", help="onnx: batch, height and width free (default fixed)")
    p.add_argument("--batch", type=integer(1, 4096).option(), default=1, help="onnx: the fixed batch (default 1)")
    p.add_argument("--opset", type=integer(1, 1000).option(), default=None,
                   help="onnx: ONNX opset (default 18)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="onnx: fp32 (default); fp16: weights and computation float16, input and output float32 (for "
                        "GPUs); int8: ONNX Runtime static quantization (QDQ), calibrated on --calibrate (for CPUs)")
    p.add_argument("--calibrate", metavar="DIR",
                   help="onnx: a folder of frames from your camera that calibrates int8 and checks every precision "
                        "(default: generated thermal scenes)")
    p.add_argument("--calibration-frames", type=integer(1, 100_000).option(), default=DEFAULT_FRAMES, metavar="N",
                   help=f"onnx: frames of --calibrate used at most, spread over the folder (default {DEFAULT_FRAMES})")
    p.add_argument("--keep-float", type=_group_list, default=None, metavar="GROUPS",
                   help="onnx int8: what stays float32, comma-separated from attention, layernorm, classifier, or "
                        "none (default attention)")
    p.add_argument("--min-agreement", type=_percent, default=99.0, metavar="PERCENT",
                   help="onnx: the least label agreement with the fp32 PyTorch model (percent of pixels, default "
                        "99); below it the export is refused")
    p.add_argument("--last-block-heads", choices=("default",), default=None,
                   help="timm: export a UNIP student whose last block has more heads than the others with the "
                        "default count there too (its attention changes; see docs/inference.md)")
    p.set_defaults(func=_run_export)


def _default_export_path(checkpoint: str, suffix: str) -> str:
    """``<checkpoint stem><suffix>`` in the working folder. A ``timm:NAME@FILE`` source gives FILE's stem, a
    ``timm:NAME`` one its NAME (with its pretrained tag) with characters not allowed in file names on common systems
    (``:`` on Windows and macOS's Finder, ``/``, ...) turned into ``_``."""
    if checkpoint.startswith("timm:"):
        name, _, weights = checkpoint[len("timm:"):].partition("@")
        if not weights:
            return (re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", name) or "model") + suffix
        checkpoint = weights
    stem = os.path.splitext(os.path.basename(os.path.normpath(checkpoint)))[0] or "model"
    return stem + suffix


def _run_export(args: argparse.Namespace) -> int:
    if args.format == "timm":
        from unip.deploy.timm_export import export_timm

        onnx_only = (args.size or args.dynamic or args.opset is not None or args.batch != 1 or args.precision != "fp32"
                     or args.calibrate or args.keep_float is not None)
        if onnx_only:
            raise ConfigError("--size, --dynamic, --batch, --opset, --precision, --calibrate and --keep-float are "
                              "options of --format onnx")
        result = export_timm(args.checkpoint, args.out or _default_export_path(args.checkpoint, "-timm"),
                             last_block_heads=args.last_block_heads)
        checks = ", ".join(f"{route} {diff:.1e}" for route, diff in result.differences.items())
        what = "a segmentor's backbone" if result.source_kind == "segmentor" else "a pre-trained backbone"
        print(f"wrote {result.folder}/model.safetensors and config.json ({what} as timm's {result.architecture}); "
              f"timm loads it and its features match unip's (max abs diff: {checks})")
        for note in result.notes:
            print(f"note: {note}")
        print("load it with:\n  import timm\n  " + result.usage().replace("\n", "\n  "))
        return 0
    from unip.deploy.onnx_export import export_onnx
    from unip.seg.checkpoint import load_segmentor

    if args.last_block_heads:
        raise ConfigError("--last-block-heads is an option of --format timm")
    out = args.out or _default_export_path(args.checkpoint, ".onnx")
    segmentor = load_segmentor(args.checkpoint)
    if args.keep_float is not None and args.precision != "int8":
        raise ConfigError("--keep-float is an option of --precision int8")
    result = export_onnx(segmentor, out, size=tuple(args.size) if args.size else None, batch=args.batch,
                         dynamic=args.dynamic, opset=args.opset, precision=args.precision, calibrate=args.calibrate,
                         calibration_frames=args.calibration_frames, min_agreement=args.min_agreement,
                         keep_float=DEFAULT_KEEP_FLOAT if args.keep_float is None else args.keep_float)
    print(result.summary())
    return 0


# ---------------------------------------------------------------------------------------- bench
def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency, throughput, label agreement, parameters and GFLOPs of a segmentor on "
                                     "this machine",
                       description="Time a segmentor on generated thermal frames of --size (e.g. 512 640, a camera "
                                   "frame) by sliding windows (the recipe's test pipeline) and whole, in PyTorch "
                                   "eager, torch.compile and ONNX Runtime fp32, int8 and fp16, with each row's label "
                                   "agreement with fp32 PyTorch; and count its parameters and GFLOPs per part "
                                   "(backbone, neck, decode head). Prints a table; --out also writes it as JSON.")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a fine-tuned segmentor (ours or the release's)")
    p.add_argument("--size", nargs=2, type=_SIDE, metavar=("H", "W"),
                   help="frame height and width as the model sees them, multiples of 16 (default the crop size, "
                        "512 512; a 640x512 camera: 512 640)")
    p.add_argument("--batch", type=integer(1, 4096).option(), default=1, help="frames per call (default 1)")
    p.add_argument("--modes", type=_name_list, default=("slide", "whole"), metavar="LIST",
                   help="slide (sliding windows of the crop, the recipe's test pipeline), whole (the frame in one "
                        "forward), comma-separated (default both)")
    p.add_argument("--onnx-precisions", type=_name_list, default=("fp32", "int8", "fp16"), metavar="LIST",
                   help="ONNX Runtime rows: fp32, int8, fp16, comma-separated (default all)")
    p.add_argument("--threads", type=integer(1, 4096).option(), default=None, metavar="N",
                   help="intra-op threads of PyTorch and ONNX Runtime (default PyTorch's, for both)")
    p.add_argument("--calibrate", metavar="DIR",
                   help="frames that calibrate the int8 rows (default generated thermal scenes)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                   help="autocast dtype of the PyTorch rows (auto: bf16 on CUDA, else fp16); on a CPU bf16 runs bf16 "
                        "autocast, fp16 and auto fp32")
    p.add_argument("--warmup", type=integer(0, 10_000).option(), default=1,
                   help="untimed calls after the first (default 1)")
    p.add_argument("--iters", type=integer(1, 100_000).option(), default=5, help="timed calls (default 5)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on a CPU)")
    p.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    p.add_argument("--compile-backend", default="inductor", metavar="NAME",
                   help="torch.compile backend (default inductor)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="torch.compile rows replay CUDA graphs (inductor, --device cuda)")
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from unip.deploy.bench import RUNTIMES, benchmark, write_json
    from unip.seg.checkpoint import load_segmentor

    if args.out is not None:  # an empty --out is refused here too, not skipped after the timing
        out_file(args.out, "--out", is_ours=is_our_json(["format", "rows", "parts"]))
    skip = {"compile": args.no_compile, "onnx": args.no_onnx}
    runtimes = [r for r in RUNTIMES if not skip.get(r, False)]
    segmentor = load_segmentor(args.checkpoint)
    result = benchmark(segmentor, args.checkpoint, size=tuple(args.size) if args.size else None, batch=args.batch,
                       device=args.device, precision=args.precision, warmup=args.warmup, iters=args.iters,
                       runtimes=runtimes, compile_backend=args.compile_backend, modes=args.modes,
                       onnx_precisions=args.onnx_precisions, threads=args.threads, calibrate=args.calibrate,
                       cuda_graphs=args.cuda_graphs)
    print(result.table())
    if args.out:
        print(f"wrote {write_json(result, args.out)}")
    if result.failed:
        print(f"unip bench: error: {', '.join(r.label for r in result.failed)} failed on this machine (reason in "
              "the table)", file=sys.stderr)
        return 1
    return 0
