"""Images/s of segmentation fine-tuning and sliding-window inference for UNIP-S at 512 px, with model FLOPs.

The model is what ``unip finetune soda_small`` trains: ViT-S/16 at 512 px (layer scale, drop path 0.1) + LL-FPN
+ UperNet (384 channels) + FCN auxiliary head, 21 classes, random weights (speed does not depend on them).

* **train**: one optimiser step as ``unip finetune`` takes it (``engine.loop.train_step``: AdamW over the task's
  layer-decay groups, fused on CUDA; decode + 0.4 × aux cross-entropy; fp16 autocast with a GradScaler or bf16
  autocast on CUDA; fp32 and, where the CPU has bf16 instructions, bf16 autocast on a CPU, as ``--precision bf16``
  gives), on ``--batch-size`` random 512² crops, ``--train-block`` steps per timed call with each loss read after
  the next step is queued, as the trainer does with fused AdamW. ``+compile`` rows compile the backbone's
  blocks as ``run.compile`` does (CUDA).
* **slide**: ``unip.seg.slide_inference`` (crop 512, stride 341) on ``--eval-batch`` images of ``--image`` pixels
  (default 512×683: a 640×480 frame after the test resize; two windows each), the windows of all images in one
  forward (ours) against one window at a time (the release), timed alternately in this process.

Model FLOPs (``unip.seg.flops``: ``torch.utils.flop_counter``, with the CPU flash-attention kernel counted like
the CUDA ones) are given per 512² window for the backbone, the neck, the decode head and the auxiliary head
separately, and per training image (forward + backward). On CUDA every row also shows its share of
``--peak-tflops`` (the card's dense bf16/fp16 peak; H100 SXM 989) counted with these model FLOPs.

Usage: ``python benchmarks/seg_throughput.py [--device cpu|cuda] [--batch-size 2|8] [--steps 3]
[--precisions fp32,bf16,fp16] [--compile] [--train-block 4|1] [--eval-batch 1] [--image 512x683]
[--peak-tflops 989] [--json FILE]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from common import add_common_options, apply_threads, run_block, write_json
from unip.engine.loop import LossGate, Precision, cpu_has_native_bf16, resolve_precision, train_step
from unip.engine.optim import build_adamw
from unip.models.segmentor import Segmentor
from unip.seg import build_segmentor, layer_decay_lr_scale, segmentation_losses, slide_inference
from unip.seg.flops import PARTS, flop_counter, part_flops
from unip.seg.inference import window_spans

# ------------------------------------------------------------------------------------------ FLOPs
def model_flops(segmentor: Segmentor, size: int, device: torch.device, batch: int) -> Dict[str, float]:
    """GFLOPs per ``size``² window of each part and of the whole segmentor (forward in training mode, so that
    the auxiliary head runs; it is not part of inference), and per training image (forward + backward)."""
    model = copy.deepcopy(segmentor).train()
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, model.num_classes, (batch, size, size), device=device)
    counter = flop_counter()
    with counter, torch.no_grad():
        model(images)
    forward = {part: value / batch / 1e9 for part, value in part_flops(counter).items()}
    counter = flop_counter()
    with counter:
        losses = segmentation_losses(model(images), labels, model.loss_weights)
        sum(losses.values()).backward()
    return {**{part: forward[part] for part in PARTS},
            "window_forward": forward["total"] - forward["auxiliary_head"],
            "train_step_per_image": part_flops(counter)["total"] / batch / 1e9}


# ------------------------------------------------------------------------------------------ steps
def train_row(segmentor: Segmentor, precision: Precision, compiled: bool
              ) -> Callable[[Tensor, Tensor], Callable[[], float]]:
    """``unip finetune``'s optimiser step on a copy of ``segmentor`` (queues it; returns what reads its loss)."""
    model = copy.deepcopy(segmentor).train()
    optimizer = build_adamw(model, 1e-4, 0.05, (0.9, 0.999), layer_decay_lr_scale(model.backbone.depth, 0.85))
    scaler = precision.grad_scaler()
    gate = LossGate.for_optimizer(optimizer)
    if compiled:
        model.backbone.compile_blocks()

    def loss_of(batch: Tuple[Tensor, Tensor]):
        images, labels = batch
        losses = segmentation_losses(model(images), labels, model.loss_weights)
        return sum(losses.values()), losses

    def step(images: Tensor, labels: Tensor) -> Callable[[], float]:
        result = train_step(model, loss_of, [(images, labels)], optimizer, scaler, precision, gate=gate)
        return lambda: result.loss

    return step


def slide_row(segmentor: Segmentor, precision: Precision, batch_windows: bool, crop: int, stride: int
              ) -> Callable[[Tensor], Tensor]:
    def run(images: Tensor) -> Tensor:
        with torch.no_grad(), precision.autocast():
            out = slide_inference(segmentor, images, crop, stride, batch_windows=batch_windows)
        return out.argmax(1).cpu()  # a host copy, as an evaluation reads the prediction

    return run


def timed(rows: Dict[str, Callable[[], object]], warmup: int, rounds: int) -> Dict[str, List[float]]:
    """Seconds per call of each row, interleaved after ``warmup`` calls each."""
    for name, call in rows.items():
        start = time.perf_counter()
        for _ in range(warmup):
            call()
        print(f"  {name}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    times: Dict[str, List[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, call in rows.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------ main
def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="training crops per step (default: 2 on "
                                                                       "CPU, 8 on CUDA: the recipe's total batch)")
    parser.add_argument("--steps", type=int, default=3, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per row (compilation happens here)")
    parser.add_argument("--precisions", default=None, help="comma-separated: fp32, bf16, fp16 (default: fp16,bf16 "
                                                           "on CUDA; fp32 and, with bf16 instructions, bf16 on CPU)")
    parser.add_argument("--compile", action="store_true", help="also time training with compiled blocks")
    parser.add_argument("--train-block", type=int, default=None,
                        help="training steps per timed call, each loss read after the next step is queued as the "
                             "trainer does (default: 4 on CUDA, 1 on a CPU); ms/call is per step")
    parser.add_argument("--eval-batch", type=int, default=1, help="images per sliding-window call")
    parser.add_argument("--image", default="512x683", help="HxW of the evaluated images (after the test resize)")
    parser.add_argument("--size", type=int, default=512, help="crop and window size (the recipe: 512)")
    parser.add_argument("--backbone", default="unip_vit_small_patch16")
    parser.add_argument("--classes", type=int, default=21)
    add_common_options(parser, peak="bf16/fp16")
    args = parser.parse_args(argv)

    apply_threads(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (8 if cuda else 2)
    args.train_block = args.train_block or (4 if cuda else 1)
    cpu_default = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    precisions = args.precisions.split(",") if args.precisions else (["fp16", "bf16"] if cuda else cpu_default)
    height, width = (int(v) for v in args.image.lower().split("x"))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")

    torch.manual_seed(0)
    size, stride = args.size, args.size * 2 // 3
    segmentor = build_segmentor(args.classes, args.backbone, img_size=size).to(device)
    flops = model_flops(segmentor, size, device, batch)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, args.classes, (batch, size, size), device=device)
    frames = torch.randn(args.eval_batch, 3, height, width, device=device)
    windows = len(window_spans(height, args.size, stride)) * len(window_spans(width, args.size, stride))

    def synced(call: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            out = call()
            if cuda:
                torch.cuda.synchronize(device)
            return out
        return run

    train_rows: Dict[str, Callable[[], object]] = {}
    slide_rows: Dict[str, Callable[[], object]] = {}
    eval_model = copy.deepcopy(segmentor).eval()
    for name in precisions:
        precision = resolve_precision(name, device)  # as --precision NAME runs (on a CPU: fp16 gives fp32)
        for compiled in ([False, True] if args.compile else [False]):
            step = train_row(segmentor, precision, compiled)
            train_rows[f"train {name}{'+compile' if compiled else ''}"] = synced(
                lambda s=step: run_block(s, args.train_block, images, labels))
        for batched in (True, False):
            run = slide_row(eval_model, precision, batched, args.size, stride)
            slide_rows[f"slide {name} {'batched' if batched else 'one-at-a-time'}"] = synced(lambda r=run: r(frames))
    print(f"training: batch {batch} of {size}²; slide: {args.eval_batch} image(s) of {height}×{width} "
          f"({windows} windows each)", flush=True)
    train_times = timed(train_rows, args.warmup, args.steps)
    slide_times = timed(slide_rows, args.warmup, args.steps)

    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    result: Dict[str, object] = {"device": device_name, "torch": torch.__version__, "size": size, "batch_size": batch,
                                 "eval_images": args.eval_batch, "image": [height, width], "windows": windows,
                                 "gflops": flops, "rows": {}}
    rows: Dict[str, Dict[str, float]] = result["rows"]  # type: ignore[assignment]
    for name, values in train_times.items():
        rate = batch * args.train_block / statistics.median(values)
        rows[name] = {"images_per_s": rate, "ms_per_call": 1e3 * statistics.median(values) / args.train_block,
                      "tflops": rate * flops["train_step_per_image"] / 1e3}
    for name, values in slide_times.items():
        rate = args.eval_batch / statistics.median(values)
        rows[name] = {"images_per_s": rate, "ms_per_call": 1e3 * statistics.median(values),
                      "tflops": rate * windows * flops["window_forward"] / 1e3}
    for name in precisions:
        batched, single = rows[f"slide {name} batched"], rows[f"slide {name} one-at-a-time"]
        batched["vs_one_at_a_time"] = batched["images_per_s"] / single["images_per_s"]
    if cuda:
        for row in rows.values():
            row["mfu"] = row["tflops"] / args.peak_tflops

    print(f"\n{device_name}, torch {torch.__version__}")
    print(f"GFLOPs per {size}² window (forward): " + ", ".join(f"{part} {flops[part]:.1f}" for part in PARTS)
          + f"; whole segmentor {flops['window_forward']:.1f}; training step per image (fwd+bwd, with aux) "
          f"{flops['train_step_per_image']:.1f}")
    print(f"{'row':<32}{'images/s':>10}{'ms/call':>11}{'TFLOP/s':>10}{'MFU':>8}{'vs 1-at-a-time':>16}")
    for name, row in rows.items():
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
        ratio = f"{row['vs_one_at_a_time']:.2f}x" if "vs_one_at_a_time" in row else "-"
        print(f"{name:<32}{row['images_per_s']:>10.2f}{row['ms_per_call']:>11.1f}{row['tflops']:>10.3f}{mfu:>8}"
              f"{ratio:>16}")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
