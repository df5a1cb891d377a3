"""Images/s of one NMI-HAD training step: ours against a straightforward baseline, in one process.

* ``ours``     – ``unip.distill``: the teacher runs blocks 1..L-1 fused (SDPA) and only q·kᵀ of block L
                 (``Teacher``, later blocks dropped) under ``no_grad``; the student runs fused SDPA in
                 blocks 1..11 and only q·kᵀ of its last block (``StudentLogits``), unused parts frozen.
* ``baseline`` – what a direct port does: both models run every block fully with the attention matrix
                 materialised (q·kᵀ → softmax → ·v) in every block, the final norm included; the logits of
                 the teacher's block L and the student's last block are captured on the way.

Both: the same weights, ``attention_distill_loss``, AdamW, fp32 on CPU or bf16 autocast on CUDA. Steps
are timed alternately (ours, baseline, ours, ...) after warm-up; the median per step is reported. On
CUDA the achieved model TFLOP/s (analytic count: matmuls of the blocks that run, backward = 2 × forward
for the student) and its share of ``--peak-tflops`` are printed too.

Usage: ``python benchmarks/pretrain_throughput.py [--device cpu|cuda] [--batch-size 8|128] [--steps 3]
[--dtype fp32|bf16] [--teacher vit_large_patch16] [--layer 18] [--student unip_vit_small_patch16]
[--img-size 224] [--compile] [--peak-tflops 989] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unip.distill.loss import attention_distill_loss
from unip.distill.teacher import Teacher, drop_register_tokens
from unip.distill.train import StudentLogits, freeze_unused
from unip.engine.loop import Precision
from unip.models import create_model
from unip.models.vit import VisionTransformer


# ------------------------------------------------------------------------------------------ baseline
def explicit_forward(model: VisionTransformer, x: Tensor, capture: int) -> Tensor:
    """Every block in full with its attention matrix materialised; returns block ``capture``'s logits."""
    tokens, _ = model.embed(x)
    captured: Optional[Tensor] = None
    for index, block in enumerate(model.blocks, start=1):
        attn = block.attn
        h = block.norm1(tokens)
        batch, count, dim = h.shape
        q, k, v = attn.qkv(h).view(batch, count, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if index == capture:
            captured = logits
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, count, dim)
        tokens = tokens + block.drop_path1(block.ls1(attn.proj(out)))
        tokens = tokens + block.drop_path2(block.ls2(block.mlp(block.norm2(tokens))))
    model.norm(tokens)
    return captured


# ------------------------------------------------------------------------------------------ FLOPs
def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one full block (multiply-add = 2): qkv, q·kᵀ, ·v, proj, MLP."""
    return 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim) + 4 * tokens * tokens * dim


def logits_flops(tokens: int, dim: int) -> float:
    """Forward FLOPs of a block that stops at q·kᵀ: q and k projections and the product."""
    return 2 * tokens * dim * 2 * dim + 2 * tokens * tokens * dim


def step_flops(teacher: VisionTransformer, layer: int, student: VisionTransformer, img: int) -> float:
    """Model FLOPs per image of our step: teacher forward to block ``layer``; student forward + backward
    (2 × forward) to its last block's logits. Patch embeddings included."""
    patches = (img // student.patch_size) ** 2  # the teacher's input is resized to the student's grid

    def model_part(model: VisionTransformer, blocks: int) -> float:
        tokens = patches + model.num_prefix_tokens
        embed = 2 * patches * 3 * model.patch_size ** 2 * model.embed_dim
        return embed + (blocks - 1) * block_flops(tokens, model.embed_dim) + logits_flops(tokens, model.embed_dim)

    return model_part(teacher, layer) + 3 * model_part(student, student.depth)


# ------------------------------------------------------------------------------------------ steps
def make_step(student: nn.Module, student_logits: Callable[[Tensor], Tensor],
              teacher_logits: Callable[[Tensor], Tensor], precision: Precision) -> Callable[[Tensor], Tensor]:
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                  fused=params[0].is_cuda or None)

    def step(images: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            with torch.no_grad():
                target = teacher_logits(images)
            loss = attention_distill_loss(student_logits(images), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: Dict[str, Callable[[Tensor], Tensor]], images: Tensor, warmup: int,
               rounds: int) -> Dict[str, List[float]]:
    """Seconds per step of each variant, interleaved so that drift hits all alike."""
    for name, step in steps.items():
        for _ in range(warmup):
            step(images)
    _sync(images.device)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(images)
            _sync(images.device)
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 128 on CUDA")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--teacher", default="vit_large_patch16")
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--student", default="unip_vit_small_patch16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--compile", action="store_true", help="torch.compile our student and teacher")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the card's dense bf16 peak (H100 SXM: 989; H200: 989; A100: 312)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (128 if device.type == "cuda" else 8)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    precision = Precision(device.type, dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    teacher_model = create_model(args.teacher, img_size=args.img_size).to(device).eval()
    heads = teacher_model.heads_per_block[args.layer - 1]
    student = create_model(args.student, last_heads=heads, img_size=args.img_size, drop_path_rate=0.0).to(device)
    baseline_student = create_model(args.student, last_heads=heads, img_size=args.img_size,
                                    drop_path_rate=0.0).to(device)
    baseline_student.load_state_dict(student.state_dict())
    baseline_student.train()
    teacher_model.requires_grad_(False)
    flops = step_flops(teacher_model, args.layer, student, args.img_size)
    depth = student.depth

    def baseline_teacher(x: Tensor) -> Tensor:
        size = tuple(side // student.patch_size * teacher_model.patch_size for side in x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        logits = explicit_forward(teacher_model, x, args.layer)
        return drop_register_tokens(logits, teacher_model.num_prefix_tokens)

    steps: Dict[str, Callable[[Tensor], Tensor]] = {}
    if not args.skip_baseline:
        steps["baseline"] = make_step(baseline_student, lambda x: explicit_forward(baseline_student, x, depth),
                                      baseline_teacher, precision)
    # ours: copy the teacher (the cut drops its later blocks) and freeze the student's unused parts
    ours_teacher_model = create_model(args.teacher, img_size=args.img_size).to(device)
    ours_teacher_model.load_state_dict(teacher_model.state_dict())
    teacher = Teacher(ours_teacher_model, args.layer, student.patch_size)
    if dtype is torch.bfloat16:
        teacher.to(dtype)  # as unip.distill.train does: the frozen teacher is kept in bf16
    freeze_unused(student)
    student.train()
    student_logits: nn.Module = StudentLogits(student)
    teacher_fn: nn.Module = teacher
    if args.compile:
        student_logits, teacher_fn = torch.compile(student_logits), torch.compile(teacher)
    steps["ours"] = make_step(student, student_logits, teacher_fn, precision)

    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    times = time_steps(steps, images, args.warmup, args.steps)

    result: Dict[str, float] = {"batch_size": args.batch_size, "dtype": dtype_name,
                                "device": str(torch.cuda.get_device_name(device) if device.type == "cuda"
                                              else f"cpu ({torch.get_num_threads()} threads)"),
                                "model_gflops_per_image": flops / 1e9}
    for name, values in times.items():
        result[f"{name}_images_per_s"] = args.batch_size / statistics.median(values)
        print(f"{name:>9}: {result[f'{name}_images_per_s']:8.2f} images/s "
              f"(median {statistics.median(values) * 1e3:.0f} ms/step over {len(values)} steps)")
    if "baseline" in times:
        result["speedup"] = result["ours_images_per_s"] / result["baseline_images_per_s"]
        print(f"  speedup: {result['speedup']:.2f}x")
    achieved = flops * result["ours_images_per_s"] / 1e12
    result["ours_model_tflops"] = achieved
    print(f"    model: {flops / 1e9:.1f} GFLOP per image in our step; achieved {achieved:.2f} TFLOP/s")
    if device.type == "cuda" and dtype is not None:
        result["percent_of_peak"] = 100 * achieved / args.peak_tflops
        print(f"     peak: {result['percent_of_peak']:.1f} % of {args.peak_tflops:g} TFLOP/s ({dtype_name})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
