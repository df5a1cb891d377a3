"""``unip analyze``: layer-wise attention patterns and the layer to distil."""

from __future__ import annotations

import argparse
import os

from unip.cli.app import Once
from unip.cli.inference import add_thermal_options, input_mapping
from unip.engine.config import number


def add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="layer-wise attention patterns (NMI, distance, entropy) and the layer to distil",
        description="Profile the attention of one or more ViTs over a folder of images: per layer and head "
                    "NMI, attention distance and entropy; classify layers as local / hybrid / global; pick "
                    "the layer NMI-HAD should distil (the deepest hybrid one). Writes profile.json, "
                    "profile.csv, nmi.png, distance.png and attention_<model>.png to --out.")
    p.add_argument("--model", action="append", required=True, metavar="SOURCE",
                   help="checkpoint file or timm:<name>[@file]; repeat to compare models")
    p.add_argument("--images", required=True, metavar="DIR", action=Once,
                   help="folder of jpg/png/bmp/tiff images (8/16-bit)")
    p.add_argument("--num-images", type=int, default=64, metavar="N", help="use the first N images (0: all)")
    p.add_argument("--out", default="analysis_out", metavar="DIR", help="folder for the files written")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per forward; larger batches amortise kernel launches on a GPU")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype of the forward pass (metrics are always float32/64)")
    p.add_argument("--size", metavar="H[,W]", help="input size in pixels (default: the model's image size)")
    p.add_argument("--norm", default="infmix",
                   help="input normalisation: infmix (pre-training, default), imagenet, none, or MEAN,STD")
    p.add_argument("--query", action="append", default=[], metavar="X,Y",
                   help="query pixel on the model input for the attention figures (repeatable)")
    p.add_argument("--nmi-local", type=number(ge=0, le=1).option(float), default=0.40,
                   help="NMI at or above which a layer is local")
    p.add_argument("--nmi-global", type=number(ge=0, le=1).option(float), default=0.10,
                   help="NMI at or below which a layer is global")
    p.add_argument("--local-distance", type=number(ge=0, lt=1).option(float), default=0.30,
                   help="a layer is local when its distance is at most this fraction of uniform attention's")
    p.add_argument("--compare-features", action="store_true",
                   help="also write features.png: PCA colouring of each model's last-layer features")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_thermal_options(p)
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    import torch

    from unip.analysis.images import parse_normalization, parse_size
    from unip.analysis.patterns import PatternThresholds
    from unip.analysis.queries import parse_point
    from unip.analysis.run import AnalyzeOptions, analyze

    options = AnalyzeOptions(
        out=args.out, num_images=args.num_images or None, batch_size=args.batch_size, device=args.device,
        size=parse_size(args.size) if args.size else None, norm=parse_normalization(args.norm),
        queries=[parse_point(q) for q in args.query],
        thresholds=PatternThresholds(args.nmi_local, args.nmi_global, args.local_distance),
        compare_features=args.compare_features, progress=not args.no_progress, mapping=input_mapping(args),
        autocast_dtype={"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision])
    result = analyze(args.model, args.images, options)
    print(result.text)
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable image(s), e.g. {result.skipped[0]} (see profile.json)")
    print(f"wrote {', '.join(sorted(os.path.basename(f) for f in result.files))} to {args.out}")
    return 0
