"""``unip evaluate`` and ``unip predict``: a fine-tuned segmentor on a data set's split, on images and videos."""

from __future__ import annotations

import argparse
import sys
from typing import List

from unip.cli.app import WORKERS, TableChoices
from unip.engine.config import integer, number
from unip.text import printable


def _scales_arg(text: str) -> List[float]:
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected scale factors like 0.75,1.0,1.25, got {text!r}") from None
    if not scales or any(not 0 < s <= 8 for s in scales):
        raise argparse.ArgumentTypeError(f"each scale must be in (0, 8], got {text!r}")
    return scales


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="mIoU / mAcc / aAcc and per-class IoU / Acc of a segmentor on a split",
                       description="Evaluate a segmentor checkpoint (unip finetune's, or the release's fine-tuned "
                                   "mmsegmentation .pth) by sliding windows (crop/stride of the checkpoint, the "
                                   "recipe's 512/341) on a split of a data set: prints a per-class table, writes "
                                   "metrics.json, confusion.png (row-normalised) and overlays/ of a few images to "
                                   "--out. Multi-GPU: torchrun --nproc_per_node=N -m unip.cli evaluate ...")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="segmentor .safetensors or release .pth")
    p.add_argument("--data", required=True, metavar="ROOT", help="data set root")
    p.add_argument("--dataset", choices=TableChoices("unip.data.datasets:DATASETS", "auto"), default="auto",
                   help="layout of --data; its class list names the classes")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--flip", action="store_true", help="test-time augmentation: average with the mirrored image")
    p.add_argument("--scales", type=_scales_arg, default=[1.0], metavar="S1,S2,...",
                   help="test-time augmentation: average over these scale factors, e.g. 0.75,1.0,1.25")
    p.add_argument("--out", default="eval_out", metavar="DIR",
                   help="folder for metrics.json, confusion.png, overlays/ (default: eval_out)")
    p.add_argument("--batch-windows", dest="batch_windows", action="store_true", default=True,
                   help="run the windows of an image (and of same-sized images) as one batch (default)")
    p.add_argument("--one-window-at-a-time", dest="batch_windows", action="store_false",
                   help="run the windows one at a time, as the release does")
    p.add_argument("--batch-size", type=integer(1, 1024).option(), default=1, help="images per evaluation batch")
    p.add_argument("--overlays", type=integer(0, 10_000).option(), default=4,
                   help="overlay figures of the first N images (0: none)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast on CUDA (auto: bf16, else fp16); on a CPU bf16 runs bf16 autocast, fp16 and "
                        "auto fp32")
    p.add_argument("--workers", type=integer(0, 256).option(), default=2, help="data-loader workers per rank")
    p.add_argument("--check-data", action="store_true", help="decode every image and label of the split first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from unip.seg.report import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, args.data, args.dataset, args.split, out=args.out, flip=args.flip,
                                 scales=args.scales, batch_windows=args.batch_windows, batch_size=args.batch_size,
                                 workers=args.workers, device=args.device, precision=args.precision,
                                 overlays=args.overlays, check_data=args.check_data, progress=not args.no_progress)
    if report.is_main:
        print(report.table)
        overlays = len(report.files) - 2
        print(f"wrote {report.files[0]}, {report.files[1]}"
              + (f" and {overlays} overlay(s) in {report.files[2].parent}" if overlays > 0 else ""))

# -------------------------------------------------------------------------------------- predict
def _formats(text: str) -> List[str]:
    from unip.seg.predict_run import FORMATS

    chosen = [part.strip() for part in text.split(",") if part.strip()]
    if not chosen or any(part not in FORMATS for part in chosen):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {','.join(FORMATS)}, got {text!r}")
    return chosen


def add_thermal_options(p: argparse.ArgumentParser) -> None:
    """The input mapping's options (``unip.data.inputs.InputMapping``): the same in every verb that takes them."""
    p.add_argument("--thermal-range", metavar="LOW:HIGH", default=None,
                   help="map radiometric inputs through this fixed window in °C (LOW → black, HIGH → white) for "
                        "every frame, instead of stretching each frame's counts (needs temperatures; a negative LOW "
                        "as --thermal-range=-10:35)")
    p.add_argument("--emissivity", type=number(gt=0, le=1).option(float), default=None,
                   help="emissivity for the temperatures of FLIR files (default: the file's)")
    p.add_argument("--distance", type=number(ge=0).option(float), default=None, metavar="METRES",
                   help="object distance for the temperatures of FLIR files (default: the file's)")
    p.add_argument("--reflected", type=number(gt=-273.15).option(float), default=None, metavar="CELSIUS",
                   help="reflected apparent temperature for FLIR files (default: the file's)")
    p.add_argument("--tlinear", type=number(gt=0).option(float), default=None, metavar="K",
                   help="kelvin per count of linear 16-bit images and camera frames (e.g. 0.01 for a radiometric "
                        "Lepton, 0.04 or 0.01 for Boson / Tau 2 TLinear): gives them temperatures")


def add_compile_option(p: argparse.ArgumentParser) -> None:
    """``--compile MODE`` of the verbs that predict (``unip.seg.predict.compiled_for_inference``)."""
    p.add_argument("--compile", choices=TableChoices("unip.engine.settings:COMPILE_MODES"), default=None,
                   metavar="MODE",
                   help="run the model through torch.compile: default (weights frozen into the graph), "
                        "reduce-overhead (CUDA graphs; CUDA only), max-autotune, max-autotune-no-cudagraphs; each new "
                        "input shape compiles first (seconds to minutes); worth it on a GPU for many frames")


def input_mapping(args: argparse.Namespace):
    """The ``InputMapping`` of the options ``add_thermal_options`` added (``ConfigError`` for a bad range)."""
    from unip.data.inputs import InputMapping, parse_thermal_range

    window = parse_thermal_range(args.thermal_range) if args.thermal_range is not None else None
    return InputMapping(window, args.emissivity, args.distance, args.reflected, args.tlinear)


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="label maps, colour masks, overlays, class areas and °C for images, thermal "
                                       "files, folders, videos and live cameras",
                       description="Run a fine-tuned segmentor (ours or the release's mmseg checkpoint) with the "
                                   "recipe's test pipeline (fit into 2048x512, normalise, sliding window) on "
                                   "images, FLIR radiometric files (R-JPEG, FFF, SEQ, CSQ), 16-bit TIFF/PNG, "
                                   "folders (recursive), videos and live cameras (--camera). Every input is read "
                                   "as the sensor recorded it and mapped to 8 bits one way (docs/thermal.md). "
                                   "Writes under --out: label/ (class ids), color/, overlay/ (with a legend and a "
                                   "°C bar), video/ (annotated videos), areas.csv and areas.json (pixels, percent "
                                   "and °C per class). Unreadable inputs are listed at the end (exit code 1).")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image or thermal file (.jpg .png .tif .fff .seq .csq ...), folder, or video file")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="our fine-tuned .safetensors segmentor or the release's fine-tuned mmseg .pth")
    p.add_argument("--out", default="predictions", metavar="DIR", help="output folder (default predictions)")
    p.add_argument("--dataset", choices=TableChoices("unip.data.datasets:named_with_classes"),
                   help="class names and palette of this data set (default: the checkpoint's, else ids)")
    p.add_argument("--format", dest="formats", type=_formats, default=None, metavar="LIST",
                   help="what to write, comma-separated: label,color,overlay,video (default: all)")
    p.add_argument("--every", type=integer(1).option(), default=1, metavar="N",
                   help="videos and SEQ/CSQ sequences: predict every N-th frame (default 1)")
    p.add_argument("--camera", type=integer(0).option(), action="append", default=[], metavar="N",
                   help="read live camera N (0: the first) through OpenCV: 16-bit Y16 frames where it gives them "
                        "(UVC thermal cores: PureThermal/Lepton, Boson), 8-bit otherwise; ends at --max-frames or "
                        "Ctrl-C with complete outputs")
    p.add_argument("--max-frames", type=integer(1).option(), default=None, metavar="N",
                   help="at most N frames of each camera, video or sequence")
    p.add_argument("--show", action="store_true",
                   help="show the overlays in a live window as they are made (needs a display; q ends a camera)")
    p.add_argument("--batch-size", type=integer(1, 4096).option(), default=4,
                   help="images per forward (all their windows at once; default 4)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                   help="autocast dtype (auto: bf16 on CUDA, else fp16); on a CPU bf16 runs bf16 autocast, "
                        "fp16 and auto fp32")
    p.add_argument("--alpha", type=number(ge=0, le=1).option(float), default=0.5,
                   help="weight of the colour mask in overlays (default 0.5)")
    p.add_argument("--workers", type=WORKERS, default=None, help="image reading/writing threads")
    add_compile_option(p)
    add_thermal_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from unip.seg.predict_run import FORMATS, PredictOptions, predict_files

    options = PredictOptions(out=args.out, dataset=args.dataset, formats=args.formats or list(FORMATS),
                             every=args.every, batch_size=args.batch_size, device=args.device,
                             precision=args.precision, alpha=args.alpha, workers=args.workers,
                             progress=not args.no_progress, mapping=input_mapping(args), cameras=args.camera,
                             max_frames=args.max_frames, show=args.show, compile=args.compile)
    result = predict_files(args.checkpoint, args.inputs, options)
    print(result.summary())
    for line in result.issues:
        print(f"  note: {line}")
    if not result.failed:
        return 0
    for failure in result.failed:
        where = printable(failure.input) + ("" if failure.frame is None else f" (frame {failure.frame})")
        print(f"  failed {where}: {printable(failure.reason)}")
    print(f"unip predict: error: {len(result.failed)} input(s) could not be read (listed above); the rest were "
          "done", file=sys.stderr)
    return 1
