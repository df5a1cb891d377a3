"""ONNX Runtime fp32 against int8 for UNIP-S (LL-FPN + UperNet, 21 classes) on a camera frame (512×640), on this
CPU: latency in the same process with the same threads (timed alternately), and the label agreement of each int8
variant with the fp32 PyTorch model on the two real FLIR frames of the thermal test data (found beside the
repository, as the tests find them) and on generated scenes.

The model: ``--state`` (a training state of a short ``unip finetune`` of UNIP-S on generated data, the default
source of the numbers in docs/inference.md; its architecture is given by ``--crop``), ``--checkpoint`` (a segmentor
file), or random weights (speed does not depend on them; agreement of a random model means little). The export is
the whole frame as one fixed 1×3×512×640 graph (``unip export --size 512 640``), checked against PyTorch; each
int8 variant is quantized from that one fp32 graph as ``unip export --precision int8`` does
(``unip.deploy.precision.quantize_int8``: static QDQ, per-channel int8 weights, uint8 activations, MinMax),
calibrated on ``--calibration`` generated scenes (other seeds than the ones measured), leaving ``--variants``
groups in float.

Real frames: each FLIR file's raw counts mapped to 8 bits as unip maps a thermal frame (``unip.data.thermal``'s
``to_uint8`` where present; else the same percentile stretch, ``unip.data.images.stretch_to_uint8``, on the
counts stored beside the file), gray repeated to three channels, resized bilinearly to 512×640 where it is not
that size (the 240×320 FLIR One frame: its aspect changes), normalised with the segmentor's mean / std.

Usage: ``python benchmarks/onnx_precision.py [--state FILE --crop 128 | --checkpoint FILE] [--threads 2]
[--iters 5] [--calibration 8] [--variants attention,none,attention+layernorm,attention+classifier] [--json FILE]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from common import write_json
from unip.data.images import stretch_to_uint8
from unip.data.synth import render_scene, to_uint8
from unip.deploy.calibration import generated_frames
from unip.deploy.onnx_export import SegmentorLogits, export_onnx, onnx_session
from unip.deploy.precision import label_agreement, quantize_int8
from unip.seg import build_segmentor, load_segmentor
from unip.seg.pipeline import InferencePipeline

THERMAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thermal"
SIZE = (512, 640)


def load_model(args: argparse.Namespace) -> Tuple[torch.nn.Module, str]:
    if args.checkpoint:
        return load_segmentor(args.checkpoint).eval(), f"segmentor file {args.checkpoint}"
    torch.manual_seed(0)
    segmentor = build_segmentor(21, "unip_vit_small_patch16", img_size=args.crop, drop_path_rate=0.0)
    if args.state:
        from unip.engine.checkpointing import load_state

        step = load_state(args.state, segmentor, restore_rng_states=False)["step"]
        return segmentor.eval(), f"UNIP-S fine-tuned {step} steps on generated data ({args.state})"
    return segmentor.eval(), "UNIP-S, random weights"


def thermal_frames() -> Dict[str, np.ndarray]:
    """The real FLIR frames as uint8 [512, 640] (module docstring); empty when the folder is absent."""
    try:
        from unip.data.thermal import read_thermal, to_uint8 as thermal_to_uint8
    except ImportError:
        read_thermal = None
    frames = {}
    for path in sorted(THERMAL.glob("*.jpg")):
        if read_thermal is not None:
            gray = thermal_to_uint8(read_thermal(str(path)))
        else:
            gray = stretch_to_uint8(np.load(str(path) + ".counts.npy"))
        if gray.shape != SIZE:
            resized = F.interpolate(torch.from_numpy(gray)[None, None].float(), size=SIZE, mode="bilinear",
                                    align_corners=False)
            gray = resized[0, 0].round().clamp(0, 255).byte().numpy()
        frames[path.name] = gray
    return frames


def normalised(gray: np.ndarray, pipeline: InferencePipeline) -> np.ndarray:
    mean = np.array(pipeline.mean, np.float32)[:, None, None]
    std = np.array(pipeline.std, np.float32)[:, None, None]
    return ((np.repeat(gray[None].astype(np.float32), 3, 0) - mean) / std)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", help="a unip finetune training state (checkpoints/step-*.pt) of UNIP-S")
    parser.add_argument("--crop", type=int, default=512, help="the crop that --state was trained at (its backbone)")
    parser.add_argument("--checkpoint", help="a segmentor file instead")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--calibration", type=int, default=8, help="generated scenes that calibrate int8")
    parser.add_argument("--generated", type=int, default=8, help="generated scenes the agreement is measured on")
    parser.add_argument("--variants", default="attention,none,attention+layernorm,attention+classifier",
                        help="int8 variants: groups left in float, + joined; none = everything quantized")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    segmentor, source = load_model(args)
    pipeline = InferencePipeline.of(segmentor)
    model = SegmentorLogits(segmentor).eval()
    evaluation = {name: normalised(gray, pipeline) for name, gray in thermal_frames().items()}
    for index in range(args.generated):
        temperature, _ = render_scene(1, index, *SIZE, name="evaluation")
        evaluation[f"generated {index}"] = normalised(to_uint8(temperature), pipeline)
    calibration = generated_frames(pipeline, SIZE, 1, args.calibration)

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    expected = {name: reference(x) for name, x in evaluation.items()}
    folder = tempfile.mkdtemp(prefix="onnx-precision-")
    fp32 = os.path.join(folder, "fp32.onnx")
    start = time.perf_counter()
    export = export_onnx(segmentor, fp32, size=SIZE, frames=calibration)
    print(f"{source}; fp32 export {time.perf_counter() - start:.0f} s: {export.summary()}", flush=True)
    sessions = {"fp32": onnx_session(fp32, threads=args.threads)}
    agreements: Dict[str, Dict[str, float]] = {}
    for variant in args.variants.split(","):
        groups = [] if variant == "none" else variant.split("+")
        path = os.path.join(folder, f"int8-{variant}.onnx")
        start = time.perf_counter()
        quantize_int8(fp32, path, calibration.inputs, {}, groups)
        seconds = time.perf_counter() - start
        session = onnx_session(path, threads=args.threads)
        sessions[f"int8 ({variant})"] = session
        agreements[variant] = per_frame = {}
        for name, x in evaluation.items():
            per_frame[name] = label_agreement(lambda _: expected[name],
                                              lambda y: session.run(["logits"], {"image": y})[0], [x])
        real = [v for k, v in per_frame.items() if not k.startswith("generated")]
        generated = [v for k, v in per_frame.items() if k.startswith("generated")]
        print(f"int8, float: {variant:<24} quantized in {seconds:.0f} s; agreement on real frames "
              f"{', '.join(f'{v:.2f}' for v in real)} %, generated mean {np.mean(generated):.2f} % "
              f"(min {np.min(generated):.2f})", flush=True)
    timings = time_alternately(sessions, evaluation[next(iter(evaluation))], args.iters)
    for name, seconds in timings.items():
        print(f"{name:<34} median {1000 * statistics.median(seconds):8.0f} ms   "
              f"(calls {', '.join(f'{1000 * s:.0f}' for s in seconds)})")
    base = statistics.median(timings["fp32"])
    for name, seconds in timings.items():
        print(f"  {name}: {base / statistics.median(seconds):.2f}x fp32 ONNX Runtime")
    environment = describe_machine(args.threads)
    print(environment)
    write_json({"source": source, "size": SIZE, "threads": args.threads, "agreement": agreements,
                "latency_ms": {k: [1000 * s for s in v] for k, v in timings.items()}, "machine": environment},
               args.json)


def time_alternately(sessions: Dict[str, object], x: np.ndarray, iters: int) -> Dict[str, List[float]]:
    """Seconds per call of every session, timed in turns (one warm-up call each first): load on a shared machine
    then hits all of them alike."""
    for session in sessions.values():
        session.run(["logits"], {"image": x})
    seconds: Dict[str, List[float]] = {name: [] for name in sessions}
    for _ in range(iters):
        for name, session in sessions.items():
            begin = time.perf_counter()
            session.run(["logits"], {"image": x})
            seconds[name].append(time.perf_counter() - begin)
    return seconds


def describe_machine(threads: int) -> str:
    import onnxruntime

    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU {model}, {os.cpu_count()} cores, {threads} threads, load average {load:.1f}; python "
            f"{sys.version.split()[0]}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")


if __name__ == "__main__":
    main()
