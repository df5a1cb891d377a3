"""Images per second of the packed loader against decoding the original files, same augmentation and cores.

Builds a temporary InfMix-style folder of synthetic 8-bit JPEG thermal frames (640x512 by default;
``--rgb`` stores them as 3-channel JPEGs, as COCO, ImageNet and many thermal sets are), scans
it, packs it, then times one DataLoader pass (after one warm-up pass, so both read from the page cache)
over each of the loaders below. It prints the median of a few interleaved passes of wall-clock images/s
and of CPU milliseconds per image (main process + workers), the latter being robust to other load on a
shared machine:

* ``release``  – decode the JPEG with PIL, RGB→L→RGB as the release does, augment the 3-channel image
                 (RandomResizedCrop 0.2–1 bicubic to 224, flip, to float, normalise);
* ``manifest`` – :class:`unip.data.ManifestImages`: decode, grayscale, augment one channel, repeat;
* ``packed``   – :class:`unip.data.PackedImages`: memory-mapped uint8, augment one channel, repeat;
* ``packed-1ch`` – the packed loader emitting normalised 1-channel batches that the consumer repeats to
                 3 channels as a view: workers stack and ship a third of the bytes;
* ``packed-u8``  – the packed loader emitting uint8 crops; the consumer runs ``normalize_batch`` (here on
                 the CPU, counted; in training on the GPU): workers ship 1 byte per pixel instead of 12.

Usage: ``python benchmarks/data_throughput.py [--num 300] [--workers 2] [--batch 64] [--size 640x512]
[--rounds 3] [--rgb]``
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import statistics
import tempfile
import time
from typing import Dict, List, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from unip.data import (INFMIX_MEAN, INFMIX_STD, ManifestImages, PackedImages, build_manifest, normalize_batch,
                       pack_manifest, pretrain_transform)
from unip.data.transforms import repeat_channels
from unip.data.synth import parse_size, write_unlabeled


class ReleaseStyleImages(Dataset):
    """The release's loader: PIL decode → ``convert("L").convert("RGB")`` → 3-channel augmentation."""

    def __init__(self, files) -> None:
        self.files = list(files)
        self.transform = v2.Compose([
            v2.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([INFMIX_MEAN] * 3, [INFMIX_STD] * 3),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as img:
            rgb = img.convert("L").convert("RGB")
        return self.transform(rgb)


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    """Return a batch as the model's float32 ``[B, 3, H, W]`` input (what a training step does on device)."""
    if x.dtype == torch.uint8:
        return normalize_batch(x)
    return repeat_channels(x) if x.shape[1] == 1 else x


def cpu_seconds() -> float:
    """Return user + system CPU seconds of this process and its live children (the DataLoader workers).

    Reads ``/proc`` (Linux); elsewhere only this process and reaped children are counted.
    """
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # fields[1] is the parent pid; utime, stime are fields 11, 12
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def timed_pass(loader: DataLoader) -> Tuple[float, float]:
    """Return ``(images/s of wall time, CPU milliseconds per image)`` of one pass over ``loader``."""
    wall, cpu, seen = time.perf_counter(), cpu_seconds(), 0
    for x in loader:
        x = to_model_input(x)
        assert x.shape[1:] == (3, 224, 224)
        seen += len(x)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return seen / wall, 1000.0 * cpu / seen


def compare(datasets: Dict[str, Dataset], workers: int, batch: int,
            rounds: int) -> Dict[str, Tuple[float, float]]:
    """Return the median ``(images/s, CPU ms/image)`` of each data set over ``rounds`` passes after a warm-up.

    Passes alternate between the loaders so that background load on a shared machine hits all alike.
    """
    loaders = {name: DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers,
                                persistent_workers=workers > 0) for name, data in datasets.items()}
    for loader in loaders.values():
        timed_pass(loader)
    runs: Dict[str, List[Tuple[float, float]]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, loader in loaders.items():
            runs[name].append(timed_pass(loader))
    return {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for name, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=300, help="images to generate (default 300)")
    parser.add_argument("--size", default="640x512", help="WIDTHxHEIGHT of the frames (default 640x512)")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers for every loader (default 2)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--rgb", action="store_true",
                        help="store frames as 3-channel JPEGs (as COCO, ImageNet and many thermal sets are)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per loader; the median is shown")
    parser.add_argument("--dir", help="work folder to keep (default: a temporary one, deleted)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.dir or tmp
        root = os.path.join(work, "ir")
        if not os.path.isdir(os.path.join(root, "bench")):
            paths = write_unlabeled(root, args.num, name="bench", size=parse_size(args.size), seed=0)
            for path in paths if args.rgb else ():
                with Image.open(path) as img:
                    rgb = img.convert("RGB")
                rgb.save(path, quality=92)
        manifest = os.path.join(work, "bench.jsonl")
        records = build_manifest(manifest, infrared=root).records
        pack_manifest(manifest, os.path.join(work, "pack"))
        loaders: Dict[str, Dataset] = {
            "release": ReleaseStyleImages(r["path"] for r in records),
            "manifest": ManifestImages(manifest),
            "packed": PackedImages(os.path.join(work, "pack")),
            "packed-1ch": PackedImages(os.path.join(work, "pack"), transform=pretrain_transform(channels=1)),
            "packed-u8": PackedImages(os.path.join(work, "pack"),
                                      transform=pretrain_transform(normalize=False)),
        }
        rates = compare(loaders, args.workers, args.batch, args.rounds)
    print(f"{len(records)} {'RGB' if args.rgb else 'grayscale'} JPEGs {args.size}, {args.workers} workers, "
          f"batch {args.batch}, "
          f"median of {args.rounds} passes, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    base_rate, base_cpu = rates["release"]
    print(f"{'loader':<13} {'images/s':>9} {'x':>6}   {'CPU ms/img':>10} {'x':>6}")
    for name, (rate, cpu) in rates.items():
        print(f"{name:<13} {rate:9.1f} {rate / base_rate:5.2f}x   {cpu:10.2f} {base_cpu / cpu:5.2f}x")

if __name__ == "__main__":
    main()
