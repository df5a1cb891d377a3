"""docs/img/thermal_predict.png: ``unip predict`` on a real radiometric JPEG — its preview | its raster (the model's
8-bit image, with the °C its gray levels stand for) | the label map with each class's share and °C.

The segmentor: ``--segmentor FILE`` when given; else the demo's cached teacher segmentor where ``unip demo`` has
made one (``~/.cache/unip/demo/teacher-*/teacher.safetensors``); else (or with ``--train``) a small one made here:
``unip data synth --labeled`` (160 generated 160x128 scenes) and ``unip finetune demo --pretrained none`` (a
4-block ViT, ``--iterations``, 100 by default: about a minute on a free laptop CPU, several on a loaded one).
Generated scenes hold people, cars, buildings, trees, road and sky, so on a mug of hot coffee the classes are a
toy's guesses: the figure shows what predict writes (labels at the raster's size, °C per class), not a model's
quality. The script prints which segmentor it used.

Run from the repository with a real radiometric JPEG (the figure uses ``flir_example.jpg``, a FLIR One frame,
CC0)::

    python benchmarks/thermal_figure.py PATH/TO/flir_example.jpg --out docs/img/thermal_predict.png
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from typing import Optional

import numpy as np

from unip.cli import main as unip


def cached_teacher() -> Optional[str]:
    root = os.environ.get("UNIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "unip")
    found = sorted(glob.glob(os.path.join(root, "demo", "teacher-*", "teacher.safetensors")))
    return found[-1] if found else None


def make_segmentor(work: str, iterations: int) -> str:
    """A small segmentor fine-tuned on generated labeled scenes; returns its file."""
    data, run = os.path.join(work, "soda"), os.path.join(work, "finetune")
    assert unip(["data", "synth", "--labeled", "--out", data, "--num", "160", "--size", "160x128", "--seed", "0"]) == 0
    assert unip(["finetune", "demo", "--pretrained", "none", "--data", data, "--out", run, "--iterations",
                 str(iterations), "--set", "optim.lr=1e-3"]) == 0
    return os.path.join(run, "segmentor.safetensors")


def figure(path: str, prediction: str, out: str, source: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from PIL import Image

    from unip.data.inputs import read_input
    from unip.data.thermal import read_thermal
    from unip.outputs import save_figure

    document = json.load(open(os.path.join(prediction, "areas.json"), encoding="utf-8"))
    record = document["images"][0]
    labels = np.asarray(Image.open(os.path.join(prediction, record["files"]["label"])))
    item = read_input(path)
    preview = read_thermal(path).preview
    palette = np.asarray(document["palette"], dtype=np.uint8)
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 5.4), gridspec_kw={"width_ratios": [1, 1.12, 1]})
    axes[0].imshow(preview)
    axes[0].set_title(f"the JPEG's preview\n{preview.shape[1]} x {preview.shape[0]}, iron palette")
    shown = axes[1].imshow(item.image, cmap="gray", vmin=0, vmax=255)
    levels = [0, 64, 128, 191, 255]
    bar = fig.colorbar(shown, ax=axes[1], fraction=0.05, pad=0.02, ticks=levels)
    bar.ax.set_yticklabels([f"{value:.1f}" for value in item.celsius_at(levels)])
    bar.set_label("°C (the file's calibration)")
    axes[1].set_title(f"its raster, as the model reads it\n{item.image.shape[1]} x {item.image.shape[0]}, "
                      "counts stretched to 8 bits")
    axes[2].imshow(palette[labels])
    present = [i for i in np.argsort(record["pixels"])[::-1] if record["pixels"][i] > 0]
    handles = [Patch(color=palette[i] / 255.0, label=f"{document['classes'][i]} {record['percent'][i]:.1f}%: "
                                                    f"{record['celsius_mean'][i]:.1f} °C "
                                                    f"({record['celsius_min'][i]:.1f}-{record['celsius_max'][i]:.1f})")
               for i in present]
    axes[2].legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=8, frameon=False,
                   ncol=1 if len(handles) <= 3 else 2)
    axes[2].set_title("labels at the raster's size\nmean (min-max) °C per class")
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    fig.suptitle(f"unip predict on {os.path.basename(path)} (FLIR One); segmentor: {source}", fontsize=10, y=0.99)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(fig, out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a radiometric FLIR JPEG (flir_example.jpg)")
    parser.add_argument("--out", default="docs/img/thermal_predict.png")
    parser.add_argument("--segmentor", help="a segmentor file to use (default: the demo's cached teacher, else "
                                            "one made here)")
    parser.add_argument("--iterations", type=int, default=100, help="fine-tuning iterations of the one made here")
    parser.add_argument("--train", action="store_true", help="make a segmentor here even where the demo's is cached")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        segmentor = args.segmentor or (None if args.train else cached_teacher())
        source = "given" if args.segmentor else "the demo's cached teacher" if segmentor else None
        if segmentor is None:
            segmentor = make_segmentor(work, args.iterations)
            source = f"a toy fine-tuned for {args.iterations} iterations on generated scenes"
        print(f"segmentor: {segmentor} ({source}; {time.perf_counter() - started:.0f} s)")
        prediction = os.path.join(work, "predict")
        assert unip(["predict", "--checkpoint", segmentor, args.path, "--out", prediction, "--no-progress",
                     "--format", "label,overlay"]) == 0
        figure(args.path, prediction, args.out, source)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
