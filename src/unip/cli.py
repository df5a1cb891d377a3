"""The ``unip`` command line: parses arguments and calls library functions.

Each verb has an ``_add_<verb>(subparsers)`` function that declares its options and sets ``func`` to a
``_run_<verb>(args)`` function. Library errors (``unip.errors.UnipError``) end the program with exit
code 2 and one line on stderr; nothing here holds logic that the Python API does not offer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, List, Optional

from unip import __version__
from unip.errors import UnipError


# ----------------------------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a checkpoint's architecture and load report",
                       description="Read a checkpoint (any supported format, or timm:<name>[@weights]) "
                                   "without running code from it, rebuild its model and print a summary.")
    p.add_argument("checkpoint", help="checkpoint file (.pth/.pt/.bin/.safetensors) or timm:<name>[@file]")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from unip.checkpoint import describe_checkpoint

    print(describe_checkpoint(args.checkpoint))
    return 0


# ----------------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline at toy scale on generated data (offline, CPU)")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from unip.demo import run_demo

    run_demo(args.out)
    return 0


# ----------------------------------------------------------------------------------------- data
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="pre-training sets (build, check, pack); segmentation sets (prepare, check); "
                                    "synthetic data",
                       description="InfMix-style pre-training data: scan folders into a checked manifest, "
                                   "measure it, pack it for fast loading, or generate synthetic thermal scenes. "
                                   "Segmentation data: prepare the MFNet / SCUT-Seg downloads, check a data set.")
    verbs = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True)

    q = verbs.add_parser("infmix", help="scan image folders into a checked, de-duplicated JSONL manifest",
                         description="Scan <infrared>/<dataset>/thermal/, ImageNet class folders (first K per "
                                     "class), COCO train2017 and extra folders; every file is decoded, bad "
                                     "files and duplicates are listed in <manifest>.report.json. Rescans only "
                                     "read new or changed files; an interrupted scan resumes.")
    q.add_argument("--infrared", metavar="ROOT", help="root holding <dataset>/thermal/ folders")
    q.add_argument("--imagenet", metavar="DIR", help="ImageNet train folder (one folder per class)")
    q.add_argument("--per-class", type=int, default=200, help="images per ImageNet class (default 200)")
    q.add_argument("--coco", metavar="DIR", help="COCO root (with train2017/) or the train2017 folder")
    q.add_argument("--extra", metavar="DIR", action="append", default=[], help="another folder (repeatable)")
    q.add_argument("--out", required=True, metavar="MANIFEST", help="manifest file to write (.jsonl)")
    q.add_argument("--workers", type=int, default=None, help="reader threads (default min(8, CPUs))")
    q.set_defaults(func=_run_data_infmix)

    q = verbs.add_parser("stats", help="grayscale mean/std and size histograms per source (JSON + PNG)")
    q.add_argument("input", metavar="MANIFEST_OR_PACK", help="manifest file or pack folder")
    q.add_argument("--out", metavar="PREFIX", help="write PREFIX.json and PREFIX.png "
                                                  "(default: next to the input, <name>.stats.json/.png)")
    q.add_argument("--limit", type=int, default=None, help="read only this many images, sampled at random")
    q.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    q.add_argument("--workers", type=int, default=None, help="reader threads (default min(8, CPUs))")
    q.set_defaults(func=_run_data_stats)

    q = verbs.add_parser("pack", help="pack a manifest into memory-mappable grayscale shards",
                         description="Decode, grayscale and downscale (short side at most S) every image of "
                                     "a manifest into a few large shard files plus an index.")
    q.add_argument("manifest", help="manifest file written by `unip data infmix`")
    q.add_argument("--out", required=True, metavar="DIR", help="pack folder to write (replaced atomically)")
    q.add_argument("--short-side", type=int, default=512,
                   help="largest short side kept, in pixels (default 512: a 20%%-area crop still has >= 224 px)")
    q.add_argument("--shard-mb", type=int, default=1024, help="largest shard file in MiB (default 1024)")
    q.add_argument("--workers", type=int, default=None, help="reader threads (default min(8, CPUs))")
    q.set_defaults(func=_run_data_pack)

    q = verbs.add_parser("synth", help="write procedurally generated thermal scenes in the real layouts",
                         description="Unlabeled: <out>/<name>/thermal/*.jpg (InfMix layout). With --labeled: "
                                     "SODA layout (JPEGImages/, SegmentationClassPNG/, train_infrared.txt, "
                                     "test_infrared.txt) with a subset of SODA's classes.")
    q.add_argument("--out", required=True, metavar="ROOT", help="folder to write into")
    q.add_argument("--num", type=int, default=100, help="images per set (default 100)")
    q.add_argument("--name", action="append", default=None,
                   help="unlabeled set name, repeatable (default: synth)")
    q.add_argument("--labeled", action="store_true", help="write a labeled set in SODA's layout instead")
    q.add_argument("--num-test", type=int, default=None, help="labeled: test images out of --num (default num/4)")
    q.add_argument("--size", default="640x512", help="WIDTHxHEIGHT (default 640x512)")
    q.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    q.add_argument("--bit-depth", type=int, choices=(8, 16), default=8,
                   help="unlabeled: 8 (JPEG) or 16 (raw-count PNG)")
    q.set_defaults(func=_run_data_synth)

    q = verbs.add_parser("prepare", help="turn the MFNet or SCUT-Seg download into the layout fine-tuning reads",
                         description="MFNet: the thermal (4th) channel of images/*.png → thermal_imgs/, labels/ "
                                     "and the split files (val_test.txt = val + test if absent). SCUT-Seg: "
                                     "images → images/, *_labelIds.png remapped to ids 0-9 (others 255) → "
                                     "labels/, scut_train/val.txt → train.txt/val.txt. Every file is checked; "
                                     "bad ones are skipped and listed in OUT/prepare-report.json. Reruns "
                                     "convert only new or changed files; nothing is deleted.")
    q.add_argument("dataset", choices=("mfnet", "scut"), help="which download RAW is")
    q.add_argument("raw", metavar="RAW", help="the unpacked original download")
    q.add_argument("out", metavar="OUT", help="folder to write (new, empty, or an earlier output of this command)")
    q.add_argument("--workers", type=int, default=None, help="reader threads (default min(8, CPUs))")
    q.set_defaults(func=_run_data_prepare)

    q = verbs.add_parser("check-seg", help="list every problem of a segmentation data set; per-class pixel counts",
                         description="Read every split file, image and label of a SODA, MFNet, SCUT-Seg or "
                                     "folder data set and list all problems at once (missing files, unreadable "
                                     "images, label size or values); exit 2 if there is any. A clean set "
                                     "prints images per split and pixels per class.")
    q.add_argument("root", metavar="ROOT", help="data set folder")
    q.add_argument("--dataset", default="auto", choices=("auto", "soda", "mfnet", "scut", "folder"),
                   help="layout of ROOT (default: detect it)")
    q.add_argument("--split", action="append", choices=("train", "val", "test"),
                   help="split to check, repeatable (default: all three)")
    q.add_argument("--workers", type=int, default=None, help="reader threads (default min(8, CPUs))")
    q.set_defaults(func=_run_data_check_seg)


def _run_data_infmix(args: argparse.Namespace) -> int:
    from unip.data.infmix import build_manifest, report_path

    result = build_manifest(args.out, infrared=args.infrared, imagenet=args.imagenet, per_class=args.per_class,
                            coco=args.coco, extra=args.extra, workers=args.workers)
    print(result.table())
    print(f"read {result.read:,} files, reused {result.reused:,} unchanged; "
          f"manifest {result.manifest}, report {report_path(result.manifest)}")
    return 0


def _run_data_stats(args: argparse.Namespace) -> int:
    import os

    from unip.data.stats import compute_stats, write_stats

    stem = os.path.normpath(args.input) if os.path.isdir(args.input) else os.path.splitext(args.input)[0]
    prefix = args.out or stem + ".stats"
    stats = compute_stats(args.input, limit=args.limit, seed=args.seed, workers=args.workers)
    for name, s in [("overall", stats["overall"]), *stats["sources"].items()]:
        print(f"{name:<20} images {s['images']:>9,}  mean {s['mean']:.4f}  std {s['std']:.4f}")
    json_path, png_path = write_stats(stats, prefix)
    print(f"wrote {json_path} and {png_path}")
    return 0


def _run_data_pack(args: argparse.Namespace) -> int:
    from unip.data.packed import pack_manifest

    result = pack_manifest(args.manifest, args.out, short_side=args.short_side,
                           shard_bytes=args.shard_mb << 20, workers=args.workers)
    print(f"packed {result.count:,} images ({result.total_bytes / 2**30:.2f} GiB) into "
          f"{len(result.shards)} shard(s) in {result.out}; skipped {len(result.skipped)}")
    for entry in result.skipped:
        print(f"  skipped {entry['path']}: {entry['reason']}")
    return 0


def _run_data_synth(args: argparse.Namespace) -> int:
    from unip.data.synth import parse_size, write_soda, write_unlabeled

    size = parse_size(args.size)
    if args.labeled:
        num_test = args.num // 4 if args.num_test is None else args.num_test
        labeled = write_soda(args.out, args.num - num_test, num_test, size=size, seed=args.seed)
        print(f"wrote {args.num} labeled images in SODA layout to {args.out} "
              f"(train {len(labeled.splits['train'])}, test {len(labeled.splits['test'])})")
        print("classes (SODA id: name): " + ", ".join(f"{i}: {n}" for i, n in labeled.classes.items()))
        return 0
    for name in args.name or ["synth"]:
        write_unlabeled(args.out, args.num, name=name, size=size, seed=args.seed, bit_depth=args.bit_depth)
        print(f"wrote {args.num} images to {args.out}/{name}/thermal")
    return 0


def _run_data_prepare(args: argparse.Namespace) -> int:
    from unip.data.seg_prepare import prepare_dataset

    result = prepare_dataset(args.dataset, args.raw, args.out, workers=args.workers, progress=True)
    print(result.table())
    for entry in result.skipped:
        print(f"  skipped {entry['path']}: {entry['detail']} ({entry['reason']})")
    print(f"wrote the {args.dataset} layout to {result.out}; report {result.report}")
    return 0


def _run_data_check_seg(args: argparse.Namespace) -> int:
    from unip.data.seg_check import check_segmentation

    report = check_segmentation(args.root, args.dataset, args.split, workers=args.workers, progress=True)
    if not report.ok:
        print("\n".join(report.problem_lines()))
        print(f"unip data check-seg: error: {len(report.problems)} problem(s) in {report.root} ({report.layout} "
              "layout), listed above", file=sys.stderr)
        return 2
    print(report.summary())
    print("no problems found")
    return 0


# -------------------------------------------------------------------------------------- analyze
def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="layer-wise attention patterns (NMI, distance, entropy) and the layer to distil",
        description="Profile the attention of one or more ViTs over a folder of images: per layer and head "
                    "NMI, attention distance and entropy; classify layers as local / hybrid / global; pick "
                    "the layer NMI-HAD should distil (the deepest hybrid one). Writes profile.json, "
                    "profile.csv, nmi.png, distance.png and attention_<model>.png to --out.")
    p.add_argument("--model", action="append", required=True, metavar="SOURCE",
                   help="checkpoint file or timm:<name>[@file]; repeat to compare models")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of jpg/png/bmp/tiff images (8/16-bit)")
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
    p.add_argument("--nmi-local", type=float, default=0.40, help="NMI at or above which a layer is local")
    p.add_argument("--nmi-global", type=float, default=0.10, help="NMI at or below which a layer is global")
    p.add_argument("--local-distance", type=float, default=0.30,
                   help="a layer is local when its distance is at most this fraction of uniform attention's")
    p.add_argument("--compare-features", action="store_true",
                   help="also write features.png: PCA colouring of each model's last-layer features")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    import os

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
        compare_features=args.compare_features, progress=not args.no_progress,
        autocast_dtype={"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision])
    result = analyze(args.model, args.images, options)
    print(result.text)
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable image(s), e.g. {result.skipped[0]} (see profile.json)")
    print(f"wrote {', '.join(sorted(os.path.basename(f) for f in result.files))} to {args.out}")
    return 0


# ------------------------------------------------------------------------------------- pretrain
#: CLI options of ``unip pretrain`` and the config keys they set (``--set`` reaches every other key).
_PRETRAIN_OPTIONS = {
    "teacher": "teacher.source", "teacher_layer": "teacher.layer", "student": "student.model",
    "data": "data.path", "out": "run.output", "epochs": "optim.epochs", "batch_size": "optim.batch_size",
    "accum_iter": "optim.accum_iter", "blr": "optim.blr", "device": "run.device",
    "precision": "run.precision", "resume": "run.resume", "seed": "run.seed", "workers": "data.num_workers",
    "teacher_precision": "run.teacher_precision",
}


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="NMI-HAD: distil a teacher's hybrid-layer attention into a UNIP student",
                       description="Distil the attention logits of a frozen teacher's block into the last "
                                   "block of a UNIP student. Settings come from a preset (configs/pretrain/"
                                   "<name>.yaml or a YAML file), then the options below, then --set. "
                                   "Multi-GPU: torchrun --nproc_per_node=N -m unip.cli pretrain ...")
    p.add_argument("preset", nargs="?", help="preset name (mae-l_unip-s, dino-b_unip-s, ibot-l_unip-s, "
                                             "mae-l_unip-b, mae-l_unip-t, toy) or a YAML file")
    p.add_argument("--teacher", metavar="SOURCE", help="teacher checkpoint file or timm:<name>[@file]")
    p.add_argument("--teacher-layer", metavar="N|auto", type=_layer_arg,
                   help="1-based teacher block to distil, or auto (NMI-guided choice)")
    p.add_argument("--student", metavar="MODEL", help="student preset, e.g. unip_vit_small_patch16")
    p.add_argument("--data", metavar="PATH", help="pack folder, manifest file, or folder of images")
    p.add_argument("--out", metavar="DIR", help="run folder: checkpoints/, log.jsonl, tb/, student.safetensors")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per process and micro-batch")
    p.add_argument("--accum-iter", type=int, help="micro-batches per optimiser step")
    p.add_argument("--blr", type=float, help="base lr; lr = blr × effective batch / 256")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="AMP on CUDA; CPU runs fp32")
    p.add_argument("--compile", dest="compile", action="store_const", const=True,
                   help="torch.compile teacher, student and loss (default: on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False, help="run eagerly")
    p.add_argument("--teacher-precision", choices=["auto", "fp32", "bf16", "fp8"],
                   help="teacher weights: auto (bf16 in bf16 runs), fp32, bf16, or fp8 (torchao, Ada/Hopper GPUs)")
    p.add_argument("--resume", metavar="PATH|auto", help="training state to continue from; auto = latest in --out")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data-loader worker processes per rank")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, e.g. --set optim.clip_grad=1.0 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    p.set_defaults(func=_run_pretrain)


def _layer_arg(text: str):
    return text if text == "auto" else int(text)


def _run_pretrain(args: argparse.Namespace) -> int:
    from unip.distill.train import make_config, train
    from unip.engine.config import dump_config

    values = {key: getattr(args, name) for name, key in _PRETRAIN_OPTIONS.items()
              if getattr(args, name) is not None}
    if args.compile is not None:
        values["run.compile"] = args.compile
    config = make_config(args.preset, tuple(args.overrides), values)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    result = train(config)
    print(f"pre-training finished after {result.steps} steps (loss {result.last_loss:.4g}); "
          f"student: {result.student}")
    return 0


VERBS: List[Callable[[argparse._SubParsersAction], None]] = [
    _add_info, _add_data, _add_analyze, _add_pretrain, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unip",
        description="UNIP: attention-pattern analysis, NMI-HAD pre-training and infrared segmentation.")
    parser.add_argument("--version", action="version", version=f"unip {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a line is logged (tests swap it)."""

    stream = property(lambda self: sys.stdout, lambda self, value: None)


def _configure_logging() -> None:
    """Library code logs through ``logging`` (loggers under ``unip``); the CLI shows INFO and up on stdout."""
    log = logging.getLogger("unip")
    if not any(isinstance(handler, _ConsoleHandler) for handler in log.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: Optional[List[str]] = None) -> int:
    _configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UnipError as err:
        print(f"unip {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unip {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
