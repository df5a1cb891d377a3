"""The ``unip`` command line: parses arguments and calls library functions.

Each verb has an ``_add_<verb>(subparsers)`` function that declares its options and sets ``func`` to a
``_run_<verb>(args)`` function. ``main`` is the one error boundary (README "Errors and exit codes"):

* bad input — a ``unip.errors.UnipError`` from the library, a bad option (argparse), a file that cannot
  be read or written — ends with exit code 2 and one line ``unip VERB: error: ...``;
* memory that runs out ends with exit code 1 and one line ``unip VERB: error: out of memory ...``;
* anything else is a bug: exit code 1 and one line ``unip VERB: internal error: ...``; with
  ``UNIP_DEBUG=1`` in the environment the traceback is printed too;
* a reader that goes away (``unip ... | head -1``) is not an error: the rest of the output is discarded and the
  verb finishes with its own exit code.

``VERB`` includes the action of verbs that have one (``unip data pack: error: ...``), as argparse's own lines do.

Nothing here holds logic that the Python API does not offer.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import traceback
import warnings
from functools import partial
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

from unip import __version__
from unip.engine.config import integer, list_presets, number
from unip.errors import UnipError
from unip.text import one_line

#: Option values shared by several verbs.
WORKERS = integer(1, 256).option()
SEED = integer(0, 2**63 - 1).option()


class _UsageError(Exception):
    """argparse found a bad command line (already printed as one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line, without repeating the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise _UsageError(message)


class _Once(argparse.Action):
    """An option that takes one value: given again with another value it is a usage error, instead of argparse's
    silent "the last one wins" (``--infrared A --infrared B`` would scan B only)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        given = getattr(namespace, self.dest, None)
        if given is not None and os.path.normpath(given) != os.path.normpath(values):
            raise argparse.ArgumentError(self, f"given twice ({given} and {values}); it takes one {self.metavar}")
        setattr(namespace, self.dest, values)


# ----------------------------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a checkpoint's architecture and load report",
                       description="Read a checkpoint (any supported format, a training state step-*.pt, or "
                                   "timm:<name>[@weights]) without running code from it, rebuild its model and "
                                   "print a summary. Exit code 2 (after the summary) when the other verbs refuse "
                                   "it: missing, mis-shaped or non-finite weights.")
    p.add_argument("checkpoint", help="checkpoint file (.pth/.pt/.bin/.safetensors) or timm:<name>[@file]; a "
                                      "thermal file or image: its camera, raster, counts, temperatures, calibration")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from unip.checkpoint import inspect_checkpoint
    from unip.data.thermal import describe_thermal, is_thermal_file
    from unip.errors import CheckpointError

    if is_thermal_file(args.checkpoint):  # by content: a FLIR file (R-JPEG, FFF, SEQ, CSQ) or an image
        print(describe_thermal(args.checkpoint))
        return 0
    summary, problem = inspect_checkpoint(args.checkpoint)
    print(summary)
    if problem:  # the report is printed; the exit code says that the other verbs refuse the file
        raise CheckpointError(problem)
    return 0


# ----------------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline at toy scale on generated data (offline, CPU)",
                       description="The whole UNIP pipeline at toy scale, offline, on a CPU, through the real CLI "
                                   "(each command is printed): generated infrared scenes, a teacher (made once and "
                                   "cached under $UNIP_CACHE, $XDG_CACHE_HOME/unip or ~/.cache/unip), its attention "
                                   "profile, NMI-HAD distillation into a small student, LL-FPN + UperNet "
                                   "fine-tuning of the distilled student and of the same student from random "
                                   "weights, evaluation, predictions; then a summary table (printed, summary.json, "
                                   "summary.md) and figure (summary.png). About 3 minutes on a 2-core CPU "
                                   "the first time, under 2 once the teacher is cached (--fast: under 30 s).")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes (default demo_out)")
    p.add_argument("--fast", action="store_true", help="a shorter version (smaller teacher, data and schedules): "
                                                      "checks the pipeline, too short for a meaningful comparison")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the student's initial weights, pre-training and "
                                                        "fine-tuning (default 0)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from unip.demo import run_demo

    run_demo(args.out, fast=args.fast, seed=args.seed, say=lambda text: print(text, flush=True))
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
    q.add_argument("--infrared", metavar="ROOT", action=_Once,
                   help="root holding <dataset>/thermal/ folders (one root: put every data set's folder under it)")
    q.add_argument("--imagenet", metavar="DIR", action=_Once, help="ImageNet train folder (one folder per class)")
    q.add_argument("--per-class", type=integer(1).option(), default=200,
                   help="images per ImageNet class (default 200)")
    q.add_argument("--coco", metavar="DIR", action=_Once, help="COCO root (with train2017/) or the train2017 folder")
    q.add_argument("--extra", metavar="DIR", action="append", default=[], help="another folder (repeatable)")
    q.add_argument("--out", required=True, metavar="MANIFEST", help="manifest file to write (.jsonl)")
    q.add_argument("--workers", type=WORKERS, default=None, help="reader threads (default min(8, CPUs))")
    q.set_defaults(func=_run_data_infmix)

    q = verbs.add_parser("stats", help="grayscale mean/std and size histograms per source (JSON + PNG)")
    q.add_argument("input", metavar="MANIFEST_OR_PACK", help="manifest file or pack folder")
    q.add_argument("--out", metavar="PREFIX", help="write PREFIX.json and PREFIX.png (default: next to the "
                                                  "input, <name>.stats.json/.png; a folder: inside it)")
    q.add_argument("--limit", type=integer(1).option(), default=None,
                   help="read only this many images, sampled at random")
    q.add_argument("--seed", type=SEED, default=0, help="seed of the --limit sample")
    q.add_argument("--workers", type=WORKERS, default=None, help="reader threads (default min(8, CPUs))")
    q.set_defaults(func=_run_data_stats)

    q = verbs.add_parser("pack", help="pack a manifest into memory-mappable grayscale shards",
                         description="Decode, grayscale and downscale (short side at most S) every image of "
                                     "a manifest into a few large shard files plus an index.")
    q.add_argument("manifest", help="manifest file written by `unip data infmix`")
    q.add_argument("--out", required=True, metavar="DIR", help="pack folder to write (replaced atomically)")
    q.add_argument("--short-side", type=integer(1, 65_535).option(), default=512,
                   help="largest short side kept, in pixels (default 512: a 20%%-area crop still has >= 224 px)")
    q.add_argument("--shard-mb", type=integer(1, 1 << 20).option(), default=1024,
                   help="largest shard file in MiB (default 1024)")
    q.add_argument("--workers", type=WORKERS, default=None, help="reader threads (default min(8, CPUs))")
    q.set_defaults(func=_run_data_pack)

    q = verbs.add_parser("synth", help="write procedurally generated thermal scenes in the real layouts",
                         description="Unlabeled: <out>/<name>/thermal/*.jpg (InfMix layout). With --labeled: "
                                     "SODA layout (JPEGImages/, SegmentationClassPNG/, train_infrared.txt, "
                                     "test_infrared.txt) with a subset of SODA's classes.")
    q.add_argument("--out", required=True, metavar="ROOT", help="folder to write into")
    q.add_argument("--num", type=integer(1, 10_000_000).option(), default=100, help="images per set (default 100)")
    q.add_argument("--name", action="append", default=None,
                   help="unlabeled: set name, repeatable (default: synth)")
    q.add_argument("--labeled", action="store_true", help="write a labeled set in SODA's layout instead")
    q.add_argument("--num-test", type=integer(1, 10_000_000).option(), default=None,
                   help="labeled: test images out of --num (default num/4, at least 1)")
    q.add_argument("--size", default="640x512", help="WIDTHxHEIGHT (default 640x512)")
    q.add_argument("--seed", type=SEED, default=0, help="random seed (same seed, same images)")
    q.add_argument("--bit-depth", type=int, choices=(8, 16), default=None,
                   help="unlabeled: 8 (JPEG, default) or 16 (raw-count PNG)")
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
    q.add_argument("--workers", type=WORKERS, default=None, help="reader threads (default min(8, CPUs))")
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
    q.add_argument("--workers", type=WORKERS, default=None, help="reader threads (default min(8, CPUs))")
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

    from unip.data.stats import compute_stats, format_summary, output_paths, write_stats

    stem = os.path.normpath(args.input) if os.path.isdir(args.input) else os.path.splitext(args.input)[0]
    prefix = args.out or stem + ".stats"
    if os.path.isdir(prefix):  # a folder: the files go inside it
        prefix = os.path.join(prefix, os.path.basename(stem) + ".stats")
    output_paths(prefix)  # before reading any image
    stats = compute_stats(args.input, limit=args.limit, seed=args.seed, workers=args.workers)
    print(format_summary(stats))
    json_path, png_path = write_stats(stats, prefix)
    print(f"wrote {json_path} and {png_path}")
    return 0


def _run_data_pack(args: argparse.Namespace) -> int:
    from unip.data.packed import pack_manifest
    from unip.text import byte_size

    result = pack_manifest(args.manifest, args.out, short_side=args.short_side,
                           shard_bytes=args.shard_mb << 20, workers=args.workers)
    print(f"packed {result.count:,} images ({byte_size(result.total_bytes)}) into "
          f"{len(result.shards)} shard(s) in {result.out}; skipped {len(result.skipped)}")
    for entry in result.skipped:
        print(f"  skipped {entry['path']}: {entry['reason']}")
    return 0


def _synth_options_apply(args: argparse.Namespace) -> None:
    """Refuse the options that the chosen kind of set (labeled or not) would otherwise ignore."""
    from unip.errors import ConfigError

    ignored = ([("--name", args.name, "a labeled set is written straight into --out"),
                ("--bit-depth", args.bit_depth, "SODA's layout holds 8-bit JPEGs")] if args.labeled else
               [("--num-test", args.num_test, "only a labeled set has a test split")])
    for option, value, why in ignored:
        if value is not None:
            kind = "with" if args.labeled else "without"
            raise ConfigError(f"{option} does not apply {kind} --labeled ({why}); drop {option}")


def _run_data_synth(args: argparse.Namespace) -> int:
    from unip.data.synth import parse_size, write_soda, write_unlabeled
    from unip.outputs import plain_name

    _synth_options_apply(args)
    size = parse_size(args.size)
    if args.labeled:
        num_test = max(1, args.num // 4) if args.num_test is None else args.num_test
        labeled = write_soda(args.out, args.num - num_test, num_test, size=size, seed=args.seed)
        print(f"wrote {args.num} labeled images in SODA layout to {args.out} "
              f"(train {len(labeled.splits['train'])}, test {len(labeled.splits['test'])})")
        print("classes (SODA id: name): " + ", ".join(f"{i}: {n}" for i, n in labeled.classes.items()))
        return 0
    names = [plain_name(name, "--name") for name in args.name or ["synth"]]  # all checked before writing
    for name in names:
        write_unlabeled(args.out, args.num, name=name, size=size, seed=args.seed, bit_depth=args.bit_depth or 8)
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
    p.add_argument("--images", required=True, metavar="DIR", action=_Once,
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
    "teacher_precision": "run.teacher_precision", "teacher_gelu": "run.teacher_gelu",
}


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="NMI-HAD: distil a teacher's hybrid-layer attention into a UNIP student",
                       description="Distil the attention logits of a frozen teacher's block into the last "
                                   "block of a UNIP student. Settings come from a preset (configs/pretrain/"
                                   "<name>.yaml or a YAML file), then the options below, then --set. "
                                   "Multi-GPU: torchrun --nproc_per_node=N -m unip.cli pretrain ...")
    p.add_argument("preset", nargs="?",
                   help=f"preset name ({', '.join(list_presets('pretrain'))}) or a YAML file")
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
    p.add_argument("--compile", dest="compile", action="store_const", const=True,
                   help="torch.compile teacher, student and loss (default: on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False, help="run eagerly")
    p.add_argument("--teacher-precision", choices=["auto", "fp32", "bf16", "fp8"],
                   help="teacher weights: auto (bf16 in bf16 runs), fp32, bf16, or fp8 (torchao, Ada/Hopper GPUs)")
    p.add_argument("--teacher-gelu", choices=["exact", "tanh"],
                   help="the teacher's GELU: exact (default) or the tanh approximation, which a bf16 teacher on "
                        "CUDA computes inside its fc1 products (logits move 40x less than bf16 storage moves them)")
    _add_training_options(p, "auto: bf16 (else fp16) autocast on CUDA, fp32 on CPU; bf16 is honoured on CPUs too "
                             "(fast with AVX512-BF16/AMX); fp16 on a CPU runs fp32, with a warning",
                          "optim.clip_grad=1.0")
    p.set_defaults(func=_run_pretrain)


def _add_training_options(p: argparse.ArgumentParser, precision_help: str, set_example: str) -> None:
    """Options every training verb has: device, precision, resume, seed, workers, --set, --print-config."""
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help=precision_help)
    p.add_argument("--resume", metavar="PATH|auto", help="training state to continue from; auto = latest in --out")
    p.add_argument("--seed", type=SEED)
    p.add_argument("--workers", type=integer(0, 256).option(), help="data-loader worker processes per rank")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any setting, e.g. --set {set_example} (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")


def _option_values(args: argparse.Namespace, options: Dict[str, str]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """``(config values, where each came from)`` of the CLI options in ``options`` (option → dotted key)."""
    values = {key: getattr(args, name) for name, key in options.items() if getattr(args, name) is not None}
    origins = {key: "--" + name.replace("_", "-") for name, key in options.items()}
    return values, origins


def _check_run_folder(folder: str, defaults: Dict[str, Any], files: Dict[str, Callable[[str], bool]],
                      resume: Optional[str]) -> None:
    """A training run folder may be new or one unip wrote: its config.yaml, log.jsonl and ``files`` (name →
    recogniser) must be unip's, so a rerun never overwrites or appends to a user's file, and its checkpoints/ and
    tb/ must be folders (or absent), so that the run does not fail once training has started. A new run (no
    ``resume``) may not start over another run's training states, nor over a finished run (its final model, the
    first of ``files``, and its log: ``refuse_other_run``)."""
    import os

    from unip.engine.logging import LOG_FILE, RECORD_KEYS
    from unip.engine.trainer import CONFIG_FILE, RUN_FOLDERS, refuse_other_run
    from unip.errors import ConfigError
    from unip.outputs import claim, is_our_jsonl, is_our_yaml, out_folder

    out_folder(folder, "--out")
    config_file = os.path.join(folder, CONFIG_FILE)
    missing = _sections_missing_from_run_config(config_file, defaults)
    if missing:
        raise ConfigError(f"{folder}: holds another kind of unip run (its {CONFIG_FILE} has no {', '.join(missing)} "
                          "section); choose another --out")
    claim([config_file], is_our_yaml(list(defaults)), "--out")
    claim([os.path.join(folder, LOG_FILE)], is_our_jsonl(RECORD_KEYS), "--out")
    for name, recognise in files.items():
        claim([os.path.join(folder, name)], recognise, "--out")
    for name in RUN_FOLDERS:
        path = os.path.join(folder, name)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ConfigError(f"{path}: is a file where unip keeps the run's {name}/ folder; move it away or "
                              "choose another --out")
    if not resume:
        refuse_other_run(folder, next(iter(files), None))


def _sections_missing_from_run_config(path: str, defaults: Dict[str, Any]) -> List[str]:
    """The sections of ``defaults`` that ``path`` lacks when it is another verb's run config (a YAML mapping
    with ``run`` and ``optim`` sections: ``unip finetune``'s in a ``unip pretrain`` folder, or the reverse);
    ``[]`` otherwise (no such file, this verb's config, or not a run config at all)."""
    from unip.engine.config import read_yaml

    try:
        document = read_yaml(path)
    except Exception:  # absent, unreadable or not YAML: ``claim`` reports it
        return []
    if not isinstance(document, dict) or not {"run", "optim"} <= set(document):
        return []
    return sorted(set(defaults) - set(document))


def _layer_arg(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block number (1 = first) or auto, got {text!r}") from None


def _run_pretrain(args: argparse.Namespace) -> int:
    from unip.distill.train import DEFAULTS, STUDENT_FILE, make_config, train
    from unip.engine.config import dump_config
    from unip.outputs import is_our_checkpoint

    values, origins = _option_values(args, _PRETRAIN_OPTIONS)
    if args.compile is not None:
        values["run.compile"] = args.compile
    origins["run.compile"] = "--compile/--no-compile"
    config = make_config(args.preset, tuple(args.overrides), values, origins=origins)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    _check_run_folder(config["run"]["output"], DEFAULTS, {STUDENT_FILE: is_our_checkpoint}, config["run"]["resume"])
    result = train(config)
    if result.is_main:  # under torchrun: one line, not one per rank
        print(f"pre-training finished after {result.steps} steps (loss {result.last_loss:.4g}); "
              f"student: {result.student}")
    return 0


# ------------------------------------------------------------------------------------- finetune
#: CLI options of ``unip finetune`` and the config keys they set (``--set`` reaches every other key).
_FINETUNE_OPTIONS = {
    "pretrained": "model.pretrained", "data": "data.path", "dataset": "data.dataset", "out": "run.output",
    "probe_layer": "model.probe_layer", "iterations": "optim.iterations", "batch_size": "optim.batch_size",
    "device": "run.device", "precision": "run.precision", "resume": "run.resume", "seed": "run.seed",
    "workers": "data.num_workers",
}


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a backbone for segmentation (LL-FPN + UperNet), or probe it",
                       description="Fine-tune a pre-trained ViT with LL-FPN + UperNet (+ FCN auxiliary head) on a "
                                   "segmentation data set with the release's recipe, or train a linear probe on "
                                   "its frozen features (--probe linear, --probe-layer N). Evaluates every "
                                   "run.eval_every steps by sliding windows, keeps checkpoints/best.safetensors by "
                                   "val mIoU, writes segmentor.safetensors (final) and metrics.json (best model on "
                                   "the test split). Settings: preset (configs/finetune/<name>.yaml, or "
                                   "configs/linprobe/ with --probe; or a YAML file), then the options, then --set. "
                                   "Multi-GPU: torchrun --nproc_per_node=N -m unip.cli finetune ...")
    p.add_argument("preset", nargs="?", help=f"preset ({', '.join(list_presets('finetune'))}; with --probe: "
                                             f"{', '.join(list_presets('linprobe'))}) or a YAML file (default: the "
                                             "SODA / UNIP-S recipe)")
    p.add_argument("--pretrained", metavar="SOURCE",
                   help="backbone: our pretrain output, a release/MAE/DINO/iBOT/DeiT checkpoint, timm:NAME[@FILE], "
                        "or none (random initialisation of the preset's model.backbone)")
    p.add_argument("--data", metavar="ROOT", help="data set root (see unip data check-seg)")
    p.add_argument("--dataset", choices=["auto", "soda", "mfnet", "scut", "folder"],
                   help="layout of --data (default: the preset's)")
    p.add_argument("--out", metavar="DIR", help="run folder: checkpoints/, log.jsonl, tb/, segmentor.safetensors, "
                                                "metrics.json")
    p.add_argument("--probe", choices=["linear"], help="linear probing: frozen backbone, blocks 4/6/8/12 → 1×1 conv "
                                                       "(presets from configs/linprobe/)")
    p.add_argument("--probe-layer", metavar="N", type=integer(1, 256).option(),
                   help="layer-wise linear probing: block N alone (implies --probe linear)")
    p.add_argument("--iterations", type=integer(1).option(), help="optimiser steps (optim.iterations)")
    p.add_argument("--batch-size", type=integer(1).option(), help="images per GPU and micro-batch")
    p.add_argument("--check-data", action="store_true",
                   help="decode every image and label of train/val/test first and list every problem")
    _add_training_options(p, "auto: bf16 (else fp16) autocast on CUDA (the recipe: fp16), fp32 on CPU; bf16 is "
                             "honoured on CPUs too", "model.last_block_heads=default")
    p.set_defaults(func=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from unip.engine.config import dump_config
    from unip.errors import ConfigError
    from unip.outputs import is_our_checkpoint, is_our_json
    from unip.seg.results import METRICS_FILE, metrics_writer
    from unip.seg.train import DEFAULTS, SEGMENTOR_FILE, finetune, make_config

    values, origins = _option_values(args, _FINETUNE_OPTIONS)
    probe = args.probe or ("linear" if args.probe_layer is not None else None)
    if probe:
        values["model.head"], origins["model.head"] = probe, "--probe"
    if args.check_data:
        values["data.check"], origins["data.check"] = True, "--check-data"
    config = make_config(args.preset, tuple(args.overrides), values, origins=origins,
                         kind="linprobe" if probe else "finetune")
    if probe and config["model"]["head"] != probe:
        raise ConfigError(f"--{'probe' if args.probe else 'probe-layer'} trains a {probe} probe, but --set "
                          f"model.head={config['model']['head']} asks for another head; drop one of them")
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    metrics = os.path.join(config["run"]["output"], METRICS_FILE)
    if metrics_writer(metrics) == "evaluate":
        raise ConfigError(f"{metrics}: holds the report of unip evaluate, which finetune would replace; choose "
                          "another --out")
    _check_run_folder(config["run"]["output"], DEFAULTS, {SEGMENTOR_FILE: is_our_checkpoint,
                                                           METRICS_FILE: is_our_json(["format", "mIoU"])},
                      config["run"]["resume"])
    result = finetune(config)
    if result.is_main:
        print(result.table)
        best = f"best val {result.best['metric']} {result.best['value']:.2f} at step {result.best['step']}; " \
            if result.best else "no evaluation chose a best model; "
        tested = "the best model" if result.best else "the final model"
        print(f"{config['model']['head'] == 'linear' and 'probing' or 'fine-tuning'} finished after {result.steps} "
              f"steps; {best}final model: {result.segmentor}; test metrics of {tested}: {result.metrics_file}")
    return 0


# ------------------------------------------------------------------------------------- evaluate
def _scales_arg(text: str) -> List[float]:
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected scale factors like 0.75,1.0,1.25, got {text!r}") from None
    if not scales or any(not 0 < s <= 8 for s in scales):
        raise argparse.ArgumentTypeError(f"each scale must be in (0, 8], got {text!r}")
    return scales


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="mIoU / mAcc / aAcc and per-class IoU / Acc of a segmentor on a split",
                       description="Evaluate a segmentor checkpoint (unip finetune's, or the release's fine-tuned "
                                   "mmsegmentation .pth) by sliding windows (crop/stride of the checkpoint, the "
                                   "recipe's 512/341) on a split of a data set: prints a per-class table, writes "
                                   "metrics.json, confusion.png (row-normalised) and overlays/ of a few images to "
                                   "--out. Multi-GPU: torchrun --nproc_per_node=N -m unip.cli evaluate ...")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="segmentor .safetensors or release .pth")
    p.add_argument("--data", required=True, metavar="ROOT", help="data set root")
    p.add_argument("--dataset", choices=["auto", "soda", "mfnet", "scut", "folder"], default="auto",
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


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="label maps, colour masks, overlays and class areas for images, folders "
                                       "and videos",
                       description="Run a fine-tuned segmentor (ours or the release's mmseg checkpoint) with the "
                                   "recipe's test pipeline (fit into 2048x512, normalise, sliding window) on "
                                   "images, folders (recursive) and videos. Writes under --out: label/ (class "
                                   "ids), color/, overlay/ (with a legend), video/ (annotated videos), areas.csv "
                                   "and areas.json. Unreadable inputs are listed at the end (exit code 1).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder of images/videos, or video file")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="our fine-tuned .safetensors segmentor or the release's fine-tuned mmseg .pth")
    p.add_argument("--out", default="predictions", metavar="DIR", help="output folder (default predictions)")
    p.add_argument("--dataset", choices=("soda", "mfnet", "scut"),
                   help="class names and palette of this data set (default: the checkpoint's, else ids)")
    p.add_argument("--format", dest="formats", type=_formats, default=None, metavar="LIST",
                   help="what to write, comma-separated: label,color,overlay,video (default: all)")
    p.add_argument("--every", type=integer(1).option(), default=1, metavar="N",
                   help="videos: predict every N-th frame (default 1)")
    p.add_argument("--batch-size", type=integer(1, 4096).option(), default=4,
                   help="images per forward (all their windows at once; default 4)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                   help="autocast dtype (auto: bf16 on CUDA, else fp16); on a CPU bf16 runs bf16 autocast, "
                        "fp16 and auto fp32")
    p.add_argument("--alpha", type=number(ge=0, le=1).option(float), default=0.5,
                   help="weight of the colour mask in overlays (default 0.5)")
    p.add_argument("--workers", type=WORKERS, default=None, help="image reading/writing threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from unip.seg.predict_run import FORMATS, PredictOptions, predict_files
    from unip.text import printable

    options = PredictOptions(out=args.out, dataset=args.dataset, formats=args.formats or list(FORMATS),
                             every=args.every, batch_size=args.batch_size, device=args.device,
                             precision=args.precision, alpha=args.alpha, workers=args.workers,
                             progress=not args.no_progress)
    result = predict_files(args.checkpoint, args.inputs, options)
    print(result.summary())
    if not result.failed:
        return 0
    for failure in result.failed:
        where = printable(failure.input) + ("" if failure.frame is None else f" (frame {failure.frame})")
        print(f"  failed {where}: {printable(failure.reason)}")
    print(f"unip predict: error: {len(result.failed)} input(s) could not be read (listed above); the rest were "
          "done", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------------- export
_SIDE = integer(1, 65_536).option()


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a segmentor as ONNX (checked with onnxruntime), a backbone for timm",
                       description="--format onnx: the whole segmentor as one ONNX graph, normalised image "
                                   "[B, 3, H, W] -> logits [B, classes, H, W] (the decode head's, resized to the "
                                   "input), run through onnxruntime right after export: the logits must match "
                                   "PyTorch's within 1e-4 or the export fails and nothing is written. "
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
    from unip.errors import ConfigError

    if args.format == "timm":
        from unip.deploy.timm_export import export_timm

        if args.size or args.dynamic or args.opset is not None or args.batch != 1:
            raise ConfigError("--size, --dynamic, --batch and --opset are options of --format onnx")
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
    result = export_onnx(segmentor, out, size=tuple(args.size) if args.size else None, batch=args.batch,
                         dynamic=args.dynamic, opset=args.opset)
    print(result.summary())
    return 0


# ---------------------------------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency, throughput, parameters and GFLOPs of a segmentor on this machine",
                       description="Time a segmentor (one forward: normalised image -> logits at the input size) "
                                   "in PyTorch eager, torch.compile and ONNX Runtime on this machine, and count "
                                   "its parameters and GFLOPs per part (backbone, neck, decode head). Prints a "
                                   "table; --out also writes it as JSON.")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a fine-tuned segmentor (ours or the release's)")
    p.add_argument("--size", nargs=2, type=_SIDE, metavar=("H", "W"),
                   help="input height and width, multiples of 16 (default the crop size, 512 512)")
    p.add_argument("--batch", type=integer(1, 4096).option(), default=1, help="images per call (default 1)")
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
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from unip.deploy.bench import RUNTIMES, benchmark, write_json
    from unip.outputs import is_our_json, out_file
    from unip.seg.checkpoint import load_segmentor

    if args.out is not None:  # an empty --out is refused here too, not skipped after the timing
        out_file(args.out, "--out", is_ours=is_our_json(["format", "rows", "parts"]))
    skip = {"compile": args.no_compile, "onnx": args.no_onnx}
    runtimes = [r for r in RUNTIMES if not skip.get(r, False)]
    segmentor = load_segmentor(args.checkpoint)
    result = benchmark(segmentor, args.checkpoint, size=tuple(args.size) if args.size else None, batch=args.batch,
                       device=args.device, precision=args.precision, warmup=args.warmup, iters=args.iters,
                       runtimes=runtimes, compile_backend=args.compile_backend)
    print(result.table())
    if args.out:
        print(f"wrote {write_json(result, args.out)}")
    if result.failed:
        print(f"unip bench: error: {', '.join(r.label for r in result.failed)} failed on this machine (reason in "
              "the table)", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------- sweep
def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="the paper's benchmark: fine-tune and probe a grid of backbones; its table "
                                     "and figures",
                       description="Run a sweep file (configs/sweeps/: paper, tiny, or your own): backbones × data "
                                   "sets × protocols (ft, lp, layer-wise lp) × seeds, one unip finetune run per "
                                   "cell, resumable; then report the paper's table and figures. See docs/sweep.md.")
    verbs = p.add_subparsers(dest="sweep_verb", metavar="ACTION", required=True)

    q = verbs.add_parser("run", help="run (or resume) every cell of a sweep file",
                         description="Each cell is `unip finetune` in its own folder <out>/cells/<backbone>/<dataset>/"
                                     "<protocol>-seed<S>, run as a subprocess with --resume auto: finished cells "
                                     "(a valid metrics.json) are skipped, a killed cell continues from its own "
                                     "checkpoint, a failed cell is listed at the end (exit 1) and the others go on. "
                                     "With the layer-wise protocol, unip analyze profiles each backbone's NMI. "
                                     "State: <out>/sweep.json.")
    q.add_argument("sweep", metavar="SWEEP", help="sweep file (.yaml) or the name of a shipped one: paper, tiny")
    q.add_argument("--out", required=True, metavar="DIR", help="sweep folder (new, empty, or an earlier sweep's)")
    q.add_argument("--dry-run", action="store_true",
                   help="list the cells, what is finished or changed and the estimated cost, then make the run's "
                        "checks (exit 2 where it would stop); run nothing")
    q.add_argument("--gpus", type=integer(1, 4096).option(), metavar="N",
                   help="run N cells at a time, one per GPU (cuda:0 ... cuda:N-1)")
    q.add_argument("--devices", metavar="LIST", help="device slots, comma-separated: cuda:0,cuda:3 or cpu,cpu "
                                                    "(one cell on each at a time; default: one cell at a time, auto)")
    q.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run only the jobs whose id matches this shell pattern, e.g. '*/soda/ft-*' (repeatable)")
    q.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="value of ${NAME} in the sweep file, e.g. --var data=/data (repeatable)")
    q.set_defaults(func=_run_sweep_run)

    q = verbs.add_parser("report", help="the paper's table (CSV, Markdown), figures (PNG) and an HTML report",
                         description="Read every finished cell's metrics.json and each backbone's NMI profile: "
                                     "mIoU per data set and average for FT and LP, parameters and GFLOPs (backbone "
                                     "and heads, 512 px), mIoU per GFLOP; average mIoU against backbone GFLOPs per "
                                     "family with the paper's points; layer-wise LP curves next to NMI.")
    q.add_argument("sweep_dir", metavar="DIR", help="a sweep folder (unip sweep run --out)")
    q.add_argument("--out", metavar="DIR", help="report folder (default: DIR/report)")
    q.set_defaults(func=_run_sweep_report)


def _run_sweep_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unip.sweep import parse_devices, parse_variables, plan_sweep, plan_table, read_sweep, run_sweep
    from unip.sweep.run import cell_jobs, check_sweep

    devices = parse_devices(args.gpus, args.devices)
    given = f"--gpus {args.gpus}" if args.gpus is not None else f"--devices {args.devices}"
    sweep = read_sweep(args.sweep, parse_variables(args.var), allow_unset=args.dry_run)
    if args.dry_run:
        cells = cell_jobs(sweep, Path(args.out))
        print(plan_table(plan_sweep(sweep, Path(args.out), args.only, cells)))
        if sweep.unset:
            print("not set yet: " + ", ".join(f"--var {name}=..." for name in sweep.unset))
        # then the run's checks: the dry run stops (exit 2) where the run would
        check_sweep(sweep, Path(args.out), devices, args.only, cells, devices_option=given)
        return 0
    result = run_sweep(sweep, Path(args.out), devices, args.only, devices_option=given)
    done = sum(1 for status in result.status.values() if status == "done")
    print(f"sweep {sweep.name}: {done} of {len(result.jobs)} job(s) finished ({len(result.ran)} run now, "
          f"{len(result.skipped)} before); state {result.out / 'sweep.json'}")
    for job_id, error in result.failed:
        print(f"  FAILED {job_id}: {error}")
    if result.failed:
        print(f"unip sweep run: {len(result.failed)} job(s) failed (listed above; logs in their folders); run the "
              "same command again to retry them", file=sys.stderr)
        return 1
    print(f"next: unip sweep report {args.out}")
    return 0


def _run_sweep_report(args: argparse.Namespace) -> int:
    from unip.sweep.report import write_report

    report = write_report(args.sweep_dir, args.out)
    print(report.markdown)
    print(f"wrote {', '.join(sorted(p.name for p in report.files))} to {report.out}")
    return 0


VERBS: List[Callable[[argparse._SubParsersAction], None]] = [
    _add_info, _add_data, _add_analyze, _add_pretrain, _add_finetune, _add_evaluate, _add_predict, _add_export,
    _add_bench, _add_sweep, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unip",
        description="UNIP: attention-pattern analysis, NMI-HAD pre-training and infrared segmentation.")
    parser.add_argument("--version", action="version", version=f"unip {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


class _ConsoleHandler(logging.Handler):
    """Log lines of the ``unip`` loggers: warnings on stderr as one line ``unip VERB: warning: ...`` (as Python
    warnings and errors are), the rest on stdout as they are; whatever ``sys.stdout``/``sys.stderr`` are when a
    line is logged (tests swap them)."""

    verb = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno == logging.WARNING:
                print(f"{' '.join(filter(None, ['unip', self.verb]))}: warning: {one_line(text)}", file=sys.stderr,
                      flush=True)
            else:
                print(text, file=sys.stdout, flush=True)
        except Exception:  # logging's rule: a failed log line never ends the program
            self.handleError(record)


def _configure_logging(verb: str = "") -> None:
    """Library code logs through ``logging`` (loggers under ``unip``); the CLI shows INFO and up: warnings on
    stderr, prefixed with ``verb``, the rest on stdout."""
    log = logging.getLogger("unip")
    handler = next((handler for handler in log.handlers if isinstance(handler, _ConsoleHandler)), None)
    if handler is None:
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    handler.verb = verb
    log.setLevel(logging.INFO)


def run(argv: List[str]) -> int:
    """Parse ``argv`` and run the verb, letting its exceptions through (for callers with their own error
    boundary, e.g. ``unip demo`` running its stages); returns the verb's exit code."""
    args = build_parser().parse_args(argv)
    if not getattr(args, "func", None):
        raise UnipError(f"no verb in {argv}")
    return int(args.func(args) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code (module docstring)."""
    _tolerate_odd_text()
    _configure_logging()
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the verb's own parser: "unip predict: error: ... (see unip predict --help)"
            _verb_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    except _UsageError:
        return 2
    if not getattr(args, "func", None):
        print("unip: error: no verb given (see unip --help for the list)", file=sys.stderr)
        return 2
    verb = " ".join(filter(None, [args.verb, getattr(args, f"{args.verb}_verb", None)]))  # e.g. "data pack"
    _configure_logging(verb)
    try:
        with warnings.catch_warnings(), _closed_pipes_are_not_errors():
            warnings.showwarning = partial(_print_warning, verb)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"unip {verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the one boundary: every failure becomes one line and an exit code
        code, line = _describe_failure(err)
        if os.environ.get("UNIP_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"unip {verb}: {line}", file=sys.stderr)
        return code


def _verb_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the verb (and action: ``data pack``) that ``args`` were parsed by; ``parser`` without one."""
    names = [getattr(args, "verb", None)]
    names.append(getattr(args, f"{names[0]}_verb", None))
    for name in names:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
        if name not in choices:
            break
        parser = choices[name]
    return parser


class _PipeSafeStream:
    """A text stream whose reader may go away (``unip ... | head -1``): once a write or flush meets a closed
    pipe, the file descriptor is pointed at the null device and the verb goes on, its output discarded."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (e.g. a test's capture)
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)  # what is still buffered, and later output, goes nowhere instead of failing
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _closed_pipes_are_not_errors():
    """While a verb runs, stdout and stderr are :class:`_PipeSafeStream`; the last flush is checked too."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (_PipeSafeStream(stream) for stream in streams)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


def _describe_failure(err: BaseException) -> tuple:
    """``(exit code, one-line text)`` for an exception that ended a verb."""
    if isinstance(err, UnipError):
        return 2, f"error: {one_line(_original_message(str(err)))}"
    if _is_out_of_memory(err):
        return 1, (f"error: out of memory ({one_line(err)[:200]}); lower the sizes or batch size "
                   "given on the command line")
    if isinstance(err, OSError):
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        reason = err.strerror or str(err)
        return 2, f"error: {one_line(f'{where}: {reason}' if where else reason)}"
    return 1, (f"internal error: {type(err).__name__}: {one_line(err)[:300]}; rerun with UNIP_DEBUG=1 "
               "for the traceback")


def _original_message(text: str) -> str:
    """The error's own message when ``text`` is a DataLoader worker's re-raise ("Caught DataError in DataLoader
    worker process 0. Original Traceback (most recent call last): ... unip.errors.DataError: MESSAGE"):
    MESSAGE, without the worker's traceback; ``text`` otherwise."""
    if "Original Traceback" not in text:
        return text
    last = next((line for line in reversed(text.splitlines()) if line.strip()), text)
    return re.sub(r"^[\w.]+: ", "", last.strip(), count=1)


def _print_warning(verb: str, message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (from unip or a library) as one line each, like errors."""
    print(f"unip {verb}: warning: {one_line(message)}", file=sys.stderr)


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _tolerate_odd_text() -> None:
    """File names with undecodable bytes print as escapes instead of failing the print."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


if __name__ == "__main__":
    sys.exit(main())
