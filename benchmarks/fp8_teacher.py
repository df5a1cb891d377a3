"""How far an FP8 teacher (``--teacher-precision fp8``) moves NMI-HAD's targets and loss from a bf16 one.

1. Per layer: the teacher's attention logits of every block with bf16 weights and with FP8 linears
   (torchao, per-row dynamic scaling), both against an fp32 reference on the same images: relative error
   ‖a − ref‖ / ‖ref‖ of the logits, and the mean KL(softmax(ref) ‖ softmax(a)) over rows (what the
   distillation loss sees).
2. A short run: two students from the same initialisation trained for ``--steps`` steps on the same
   batches, one against the bf16 teacher and one against the FP8 teacher; both are then scored against
   the bf16 teacher on held-out images (the loss a bf16 run would report).

Images are generated thermal scenes (``unip.data.synth``), grayscale, normalised with InfMix's constants.
The teacher is a randomly initialised ViT (no weights can be downloaded here): rerun with
``--teacher-file`` on real MAE-L weights to see the numbers that matter for a real run.

Usage: ``python benchmarks/fp8_teacher.py [--teacher vit_large_patch16] [--layer 18] [--teacher-file F]
[--images 256] [--batch-size 64] [--steps 60] [--json FILE]`` (CUDA with compute capability >= 8.9).
"""

from __future__ import annotations

import argparse
import copy
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

from common import write_json
from pretrain_throughput import our_step
from unip.data.synth import render_scene
from unip.data.transforms import normalize_batch
from unip.distill.loss import attention_distill_loss
from unip.distill.teacher import Teacher
from unip.engine.loop import Precision
from unip.models import create_model
from unip.models.quantize import fp8_unavailable_reason, quantize_linear_fp8
from unip.models.vit import VisionTransformer


def thermal_images(count: int, size: int, seed: int = 0) -> Tensor:
    """``count`` generated thermal scenes as normalised float32 ``[count, 3, size, size]``."""
    frames = [render_scene(seed, i, size, size, "fp8")[0] for i in range(count)]
    pixels = torch.from_numpy(np.clip(np.rint(np.stack(frames) * 255), 0, 255).astype(np.uint8))
    return normalize_batch(pixels.unsqueeze(1))


@torch.no_grad()
def every_layer_logits(model: VisionTransformer, images: Tensor) -> List[Tensor]:
    """The scaled q·kᵀ of every block, fp32 ``[B, heads, N, N]``, from one forward pass (each block's q and k
    come from its own ``qkv`` module, so quantised linears run as they would in training)."""
    out: List[Tensor] = []
    low_precision = model.patch_embed.proj.weight.dtype != torch.float32  # run as training does: autocast
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=low_precision):
        tokens, _ = model.embed(images)
        for index, block in enumerate(model.blocks, start=1):
            attn = block.attn
            hidden = block.norm1(tokens)
            batch, count, _ = hidden.shape
            projected = attn.qkv(hidden)  # q, k (and v, unless a ``Teacher`` cut this last block to q·kᵀ)
            parts = projected.shape[-1] // (attn.num_heads * attn.head_dim)
            qk = projected.reshape(batch, count, parts, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            out.append(((qk[0] @ qk[1].transpose(-2, -1)) * attn.scale).float())
            if index < len(model.blocks):
                tokens, _ = block(tokens)
    return out


def layer_errors(reference: List[Tensor], other: List[Tensor]) -> List[Dict[str, float]]:
    rows = []
    for ref, value in zip(reference, other):
        rel = float((value - ref).norm() / ref.norm())
        kl = float(attention_distill_loss(value, ref))  # KL(softmax(ref) ‖ softmax(value)), mean over rows
        rows.append({"relative_error": rel, "kl": kl})
    return rows


def short_run(student: VisionTransformer, teacher: Teacher, images: Tensor, batch: int, steps: int) -> float:
    precision = Precision(images.device.type, torch.bfloat16)
    step = our_step(student, teacher, precision, compiled=False)
    generator = torch.Generator().manual_seed(0)
    loss = float("nan")
    for _ in range(steps):
        index = torch.randint(len(images), (batch,), generator=generator)
        torch.manual_seed(0)  # same drop-path masks for both students
        loss = step(images[index])
    return loss


@torch.no_grad()
def held_out_loss(student: VisionTransformer, teacher: Teacher, images: Tensor) -> float:
    student.eval()
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        value = attention_distill_loss(student.attention_logits(images, student.depth), teacher(images))
    student.train()
    return float(value)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="vit_large_patch16")
    parser.add_argument("--teacher-file", default=None, help="real teacher weights (any supported format)")
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--student", default="unip_vit_small_patch16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256, help="generated training images of the short run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    reason = fp8_unavailable_reason(device)
    if reason:
        raise SystemExit(reason)
    torch.manual_seed(0)
    if args.teacher_file:
        from unip.checkpoint import load_model

        base = load_model(args.teacher_file, img_size=args.img_size)
    else:
        base = create_model(args.teacher, img_size=args.img_size)
    base = base.eval().requires_grad_(False)
    images = thermal_images(args.images + args.batch_size, args.img_size).to(device)
    train_images, test_images = images[: args.images], images[args.images:]

    probe = test_images[:32]
    fp32 = copy.deepcopy(base).to(device)
    reference = every_layer_logits(fp32, probe)
    del fp32
    bf16 = copy.deepcopy(base).to(device).to(torch.bfloat16)
    bf16_rows = layer_errors(reference, every_layer_logits(bf16, probe))
    del bf16
    fp8 = quantize_linear_fp8(copy.deepcopy(base).to(device))
    fp8_rows = layer_errors(reference, every_layer_logits(fp8, probe))
    del fp8, reference

    teachers = {name: Teacher(copy.deepcopy(base), args.layer).to(device).set_precision(name)
                for name in ("bf16", "fp8")}
    student_ref = create_model(args.student, last_heads=teachers["bf16"].num_heads, img_size=args.img_size)
    run: Dict[str, Dict[str, float]] = {}
    for name, teacher in teachers.items():
        student = copy.deepcopy(student_ref).to(device).train()
        before = held_out_loss(student, teachers["bf16"], test_images)
        last = short_run(student, teacher, train_images, args.batch_size, args.steps)
        run[name] = {"held_out_loss_before": before, "last_train_loss": last,
                     "held_out_loss_vs_bf16_teacher": held_out_loss(student, teachers["bf16"], test_images)}

    per_layer = [{"layer": i + 1, "bf16": b, "fp8": f} for i, (b, f) in enumerate(zip(bf16_rows, fp8_rows))]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "teacher": args.teacher_file or f"{args.teacher} (random init)",
              "layer": args.layer, "per_layer": per_layer,
              "short_run": run, "steps": args.steps, "batch_size": args.batch_size}
    print(f"{'layer':>5}{'bf16 rel.err':>14}{'fp8 rel.err':>13}{'bf16 KL':>11}{'fp8 KL':>11}")
    for row in result["per_layer"]:
        print(f"{row['layer']:>5}{row['bf16']['relative_error']:>14.2e}{row['fp8']['relative_error']:>13.2e}"
              f"{row['bf16']['kl']:>11.2e}{row['fp8']['kl']:>11.2e}")
    for name, values in run.items():
        print(f"short run, {name} teacher: " + ", ".join(f"{k} {v:.5f}" for k, v in values.items()))
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
