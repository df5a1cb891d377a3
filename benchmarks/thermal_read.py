"""Frames per second of reading radiometric thermal files and mapping them to model input, on one core.

Writes 640x512 radiometric frames (generated scenes, a full calibration) in each FLIR format unip reads: a bare
FFF frame with a raw 16-bit raster, an R-JPEG whose raster is a byte-swapped 16-bit PNG (as FLIR One, E-series and
many handheld cameras write it), an R-JPEG with a raw raster (Zenmuse XT-R, AX8), a SEQ and a CSQ (JPEG-LS rasters)
of ``--frames`` frames each, and a plain 16-bit PNG of the raster (what ``exiftool -b -RawThermalImage`` gives, in
the right byte order: the byte-order check runs on it). It then times, per format, what every verb calls:
``unip.data.inputs.read_input`` / ``iter_inputs`` (counts and °C per pixel, the checks, and the mapping: the
per-frame percentile stretch; ``--window LOW:HIGH`` times the fixed °C window instead), after one warm-up pass so
that every file is in the page cache; ``--reader thermal`` times the bare reader (``read_thermal`` /
``iter_thermal`` then ``to_uint8``) instead, for the mapping's own cost. The process is pinned to one core
(``--core``); it prints, per format, the median over ``--rounds`` passes of frames per second of the process's CPU
time (what one core does when it has nothing else to do; robust to other load on a shared machine) and of wall
time, with the CPU's model name. The scenes' pixel noise (6 counts) is a real sensor's: the compressed rasters are
as large as real ones (a noisier scene compresses worse and decodes slower).

The files are written with the test suite's writer (``tests/thermal_files.py``), so run it from the repository:
``python benchmarks/thermal_read.py [--frames 100] [--rounds 5] [--core 0] [--window 20:40] [--reader thermal]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import thermal_files as writer  # noqa: E402  (the tests' FLIR writer)

from unip.data.inputs import InputMapping, iter_inputs, read_input  # noqa: E402
from unip.data.thermal import iter_thermal, read_thermal, to_uint8  # noqa: E402

HEIGHT, WIDTH = 512, 640


def write_files(folder: str, frames: int) -> Dict[str, Tuple[str, int]]:
    """Each format's file → (path, frames in it)."""
    scenes = [writer.scene(HEIGHT, WIDTH, seed=index, low=6000, high=11000, noise=6.0) for index in range(frames)]
    preview = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    preview[..., 0] = np.linspace(0, 255, WIDTH, dtype=np.uint8)
    files = {
        "FFF, raw raster": ("frame.fff", writer.frame(scenes[0], raster="raw"), 1),
        "R-JPEG, PNG raster": ("png.jpg", writer.flir_jpeg(writer.frame(scenes[0], raster="png", header_order=">"),
                                                           preview), 1),
        "R-JPEG, raw raster": ("raw.jpg", writer.flir_jpeg(writer.frame(scenes[0], raster="raw", header_order=">"),
                                                           preview), 1),
        f"SEQ, raw rasters ({frames} frames)": ("sequence.seq", b"".join(writer.frame(s) for s in scenes), frames),
        f"CSQ, JPEG-LS rasters ({frames} frames)": ("sequence.csq", b"".join(writer.frame(s, raster="jpegls")
                                                                             for s in scenes), frames),
        "16-bit PNG (no calibration)": ("raster.png", writer.png16(scenes[0]), 1),
    }
    written = {}
    for name, (file_name, data, count) in files.items():
        path = os.path.join(folder, file_name)
        with open(path, "wb") as handle:
            handle.write(data)
        written[name] = (path, count)
    return written


Reader = Callable[[str, int], Iterable[np.ndarray]]


def through_inputs(window: Optional[Tuple[float, float]]) -> Reader:
    """What the verbs call: ``read_input`` / ``iter_inputs`` with the mapping (the model images)."""
    mapping = InputMapping(thermal_range=window)

    def images(path: str, count: int) -> Iterable[np.ndarray]:
        items = iter_inputs(path, mapping) if count > 1 else [read_input(path, mapping)]
        return (item.image for item in items)
    return images


def through_reader(window: Optional[Tuple[float, float]]) -> Reader:
    """The bare reader: ``read_thermal`` / ``iter_thermal``, then ``to_uint8``."""
    def images(path: str, count: int) -> Iterable[np.ndarray]:
        frames = iter_thermal(path) if count > 1 else [read_thermal(path)]
        return (to_uint8(frame, window) for frame in frames)
    return images


def time_pass(path: str, count: int, repeat: int, read: Reader) -> Tuple[float, float]:
    """Frames per second of CPU time and of wall time of ``repeat`` reads of every frame of ``path``, each mapped
    to uint8."""
    done = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeat):
        for image in read(path, count):
            assert image.shape == (HEIGHT, WIDTH) and image.dtype == np.uint8
            done += 1
    return done / (time.process_time() - cpu), done / (time.perf_counter() - wall)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_window(text: Optional[str]) -> Optional[Tuple[float, float]]:
    if not text:
        return None
    low, high = text.split(":")
    return float(low), float(high)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100, help="frames in the SEQ and CSQ files (default 100)")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes per format; the median is printed")
    parser.add_argument("--core", type=int, default=0, help="the one core to run on (default 0)")
    parser.add_argument("--window", default=None, help="time the fixed window LOW:HIGH (°C) instead of the stretch")
    parser.add_argument("--reader", choices=("inputs", "thermal"), default="inputs",
                        help="inputs: what the verbs call (default); thermal: the bare reader and to_uint8")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    window = parse_window(args.window)
    read = (through_inputs if args.reader == "inputs" else through_reader)(window)
    print(f"CPU: {cpu_model()}, pinned to core {args.core}; {WIDTH}x{HEIGHT} frames; through "
          f"{'unip.data.inputs' if args.reader == 'inputs' else 'read_thermal + to_uint8'}; mapping: "
          f"{'window ' + args.window + ' °C' if window else 'percentile stretch 1-99 %'}")
    with tempfile.TemporaryDirectory() as folder:
        for name, (path, count) in write_files(folder, args.frames).items():
            if window is not None and path.endswith(".png"):
                continue  # no temperatures without --tlinear
            repeat = max(1, args.frames // count)
            time_pass(path, count, 1, read)  # warm-up: page cache, imports
            rates = [time_pass(path, count, repeat, read) for _ in range(args.rounds)]
            cpu = statistics.median(rate for rate, _ in rates)
            wall = statistics.median(rate for _, rate in rates)
            print(f"{name:<36} {cpu:7.1f} frames per CPU second ({1000 / cpu:5.2f} ms a frame), "
                  f"{wall:7.1f} frames/s wall")


if __name__ == "__main__":
    main()
