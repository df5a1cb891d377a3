"""``unip data``: pre-training sets (infmix, stats, pack, synth) and segmentation sets (prepare, check-seg)."""

from __future__ import annotations

import argparse
import os
import sys

from unip.cli.app import SEED, WORKERS, Once, TableChoices
from unip.engine.config import integer
from unip.errors import ConfigError
from unip.outputs import plain_name
from unip.text import byte_size


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="pre-training sets (build, check, pack); segmentation sets (prepare, check); "
                                    "synthetic data",
                       description="InfMix-style pre-training data: scan folders into a checked manifest, "
                                   "measure it, pack it for fast loading, or generate synthetic thermal scenes. "
                                   "Segmentation data: prepare the MFNet / SCUT-Seg downloads, check a data set.")
    verbs = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True)

    q = verbs.add_parser("infmix", help="scan image folders into a checked, de-duplicated JSONL manifest",
                         description="Scan <infrared>/<dataset>/thermal/, ImageNet class folders (first K per "
                                     "class), COCO train2017 and extra folders; every file is decoded as every "
                                     "verb reads it (FLIR R-JPEG, FFF, SEQ/CSQ frames and 16-bit images by their "
                                     "raster), bad files and duplicates are listed in <manifest>.report.json, and "
                                     "so are palette pictures and byte-swapped rasters. Rescans only read new or "
                                     "changed files; an interrupted scan resumes.")
    q.add_argument("--infrared", metavar="ROOT", action=Once,
                   help="root holding <dataset>/thermal/ folders (one root: put every data set's folder under it)")
    q.add_argument("--imagenet", metavar="DIR", action=Once, help="ImageNet train folder (one folder per class)")
    q.add_argument("--per-class", type=integer(1).option(), default=200,
                   help="images per ImageNet class (default 200)")
    q.add_argument("--coco", metavar="DIR", action=Once, help="COCO root (with train2017/) or the train2017 folder")
    q.add_argument("--extra", metavar="DIR", action="append", default=[], help="another folder (repeatable)")
    q.add_argument("--every", type=integer(1).option(), default=1, metavar="N",
                   help="FLIR .seq/.csq sequences: every N-th frame becomes an image (default 1: every frame)")
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
    q.add_argument("dataset", choices=TableChoices("unip.data.datasets:prepared_names"), help="which download RAW is")
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
    q.add_argument("--dataset", default="auto", choices=TableChoices("unip.data.datasets:DATASETS", "auto"),
                   help="layout of ROOT (default: detect it)")
    q.add_argument("--split", action="append", choices=("train", "val", "test"),
                   help="split to check, repeatable (default: all three)")
    q.add_argument("--workers", type=WORKERS, default=None, help="reader threads (default min(8, CPUs))")
    q.set_defaults(func=_run_data_check_seg)


def _run_data_infmix(args: argparse.Namespace) -> int:
    from unip.data.infmix import build_manifest, report_path

    result = build_manifest(args.out, infrared=args.infrared, imagenet=args.imagenet, per_class=args.per_class,
                            coco=args.coco, extra=args.extra, workers=args.workers, every=args.every)
    print(result.table())
    for line in result.issue_lines():
        print(f"note: {line}")
    print(f"read {result.read:,} files, reused {result.reused:,} unchanged; "
          f"manifest {result.manifest}, report {report_path(result.manifest)}")
    return 0


def _run_data_stats(args: argparse.Namespace) -> int:
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

    result = pack_manifest(args.manifest, args.out, short_side=args.short_side,
                           shard_bytes=args.shard_mb << 20, workers=args.workers)
    print(f"packed {result.count:,} images ({byte_size(result.total_bytes)}) into "
          f"{len(result.shards)} shard(s) in {result.out}; skipped {len(result.skipped)}")
    for entry in result.skipped:
        print(f"  skipped {entry['path']}: {entry['reason']}")
    return 0


def _synth_options_apply(args: argparse.Namespace) -> None:
    """Refuse the options that the chosen kind of set (labeled or not) would otherwise ignore."""
    ignored = ([("--name", args.name, "a labeled set is written straight into --out"),
                ("--bit-depth", args.bit_depth, "SODA's layout holds 8-bit JPEGs")] if args.labeled else
               [("--num-test", args.num_test, "only a labeled set has a test split")])
    for option, value, why in ignored:
        if value is not None:
            kind = "with" if args.labeled else "without"
            raise ConfigError(f"{option} does not apply {kind} --labeled ({why}); drop {option}")


def _run_data_synth(args: argparse.Namespace) -> int:
    from unip.data.synth import parse_size, write_soda, write_unlabeled

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
    from unip.data.datasets import prepare_dataset

    result = prepare_dataset(args.dataset, args.raw, args.out, workers=args.workers, progress=True)
    print(result.table())
    for entry in result.skipped:
        print(f"  skipped {entry['path']}: {entry['detail']} ({entry['reason']})")
    print(f"wrote the {args.dataset} layout to {result.out}; report {result.report}")
    return 0


def _run_data_check_seg(args: argparse.Namespace) -> int:
    from unip.data.seg_check import check_segmentation

    report = check_segmentation(args.root, args.dataset, args.split, workers=args.workers, progress=True)
    for line in report.note_lines():
        print(f"note: {line}")
    if not report.ok:
        print("\n".join(report.problem_lines()))
        print(f"unip data check-seg: error: {len(report.problems)} problem(s) in {report.root} ({report.layout} "
              "layout), listed above", file=sys.stderr)
        return 2
    print(report.summary())
    print("no problems found")
    return 0
