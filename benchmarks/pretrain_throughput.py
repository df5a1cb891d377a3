"""Images/s of one NMI-HAD training step: ours against the release's own step, in one process.

Rows (each with its own copy of the same weights, timed alternately after warm-up in blocks of
``--consecutive`` steps, each loss read after the next step is queued; median per step):

* ``release``  – what users of the paper's release run today, reproduced faithfully: the teacher built to
                 stop at the distilled block (blocks 1..L-1 with fused attention, then block L's full qkv
                 projection and q·kᵀ), the student running fused attention in blocks 1..11 and the full qkv
                 projection + q·kᵀ of its last block, timm's ``Conv2d`` patch embedding (cuDNN), fp32
                 weights under fp16 autocast with a GradScaler on CUDA (fp32 on CPU), ``torch.optim.AdamW``
                 with its default (foreach) kernels, and the loss read back every step (``loss.item()``, as
                 MAE-style loops do, before the backward pass).
* ``ours``     – ``unip pretrain``'s step, assembled from the same pieces it uses (``Teacher`` with its
                 weight precision, ``StudentLogits`` with the unused parts frozen, ``build_adamw`` (fused on
                 CUDA), ``engine.loop.train_step`` with its non-finite check; with fused AdamW a ``LossGate``,
                 and each loss read after the next step is queued, as the trainer does): bf16 autocast and a
                 bf16 teacher on CUDA, fp32 on CPU (the teacher's linears through oneDNN where that kernel
                 times faster, ``unip.models.cpu_linear``; ``UNIP_CPU_LINEAR=default`` turns that off); only
                 the q/k rows of the last blocks are projected.
* ``ours+bf16`` – ours under bf16 autocast with a bf16 teacher also on a CPU (``--precision bf16``; the
                 default CPU rows include it where the CPU has bf16 instructions: AVX512-BF16 or AMX).
* ``ours+compile`` – the same with ``torch.compile`` of teacher, student and loss (``run.compile``).
* ``ours+compile+fp8`` – and the teacher's linear layers in FP8 (torchao; Ada/Hopper GPUs only).
* ``...+tanh`` (e.g. ``ours+compile+tanh``) – with the teacher's tanh GELU (``--teacher-gelu tanh``), which a
                 bf16 teacher on CUDA computes in its fc1 products' epilogue.
* ``naive`` (``--naive``) – both models through every block with the attention matrix materialised.

Model FLOPs per image are counted with ``torch.utils.flop_counter`` on one of our eager steps (teacher
forward to block L, student forward and backward, loss); on CUDA the achieved TFLOP/s and the share of
``--peak-tflops`` (the card's dense bf16 peak) are printed for every row, counted with these same model
FLOPs (the release's extra value-row work is not credited).

``--profile ROW`` then runs ``torch.profiler`` over a few more steps of that row and writes where the time
goes to ``--profile-out`` (``profile_<row>.txt``: the share of wall time the device was busy — low means the
host is the bottleneck, where CUDA graphs help — and the top operators and kernels by self device/CPU time,
matrix products grouped by input shape so the teacher's (width 1024) and the student's (384) can be told apart;
with ``--profile-trace``, ``trace_<row>.json``: a Chrome/Perfetto trace).

Usage: ``python benchmarks/pretrain_throughput.py [--device cpu|cuda] [--batch-size 8|256] [--steps 5]
[--consecutive 5|1] [--rows release,ours,ours+bf16,ours+compile,ours+compile+fp8] [--naive]
[--teacher vit_large_patch16] [--layer 18] [--student unip_vit_small_patch16] [--img-size 224]
[--peak-tflops 989] [--json FILE] [--compile-mode MODE] [--compile-static] [--fp8-compile] [--count-syncs]
[--profile ROW] [--profile-steps 3] [--profile-out DIR] [--profile-trace]``
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from common import add_common_options, apply_threads, run_block, write_json
from unip.distill.loss import attention_distill_loss
from unip.distill.teacher import Teacher
from unip.distill.train import StudentLogits, freeze_unused, mask_key_bias_grads
from unip.engine.loop import LossGate, Precision, cpu_has_native_bf16, train_step
from unip.engine.optim import build_adamw
from unip.engine.trainer import COMPILE_MODES, compile_options as run_compile_options
from unip.models import create_model
from unip.models.quantize import fp8_unavailable_reason
from unip.models.vit import PatchEmbed, VisionTransformer

#: One optimiser step: queues it and returns what reads its loss (a host sync where the step has not read it).
Step = Callable[[Tensor], Callable[[], float]]
ALL_ROWS = ("release", "ours", "ours+compile", "ours+compile+fp8")


# ------------------------------------------------------------------------------------------ release step
class ReleasePatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` as the release runs it: the stride-``patch`` ``Conv2d`` (cuDNN)."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


def as_release(model: VisionTransformer) -> VisionTransformer:
    model.patch_embed.__class__ = ReleasePatchEmbed
    return model


def release_logits(model: VisionTransformer, x: Tensor, layer: int) -> Tensor:
    """The release's cut forward: blocks 1..layer-1 as usual (fused attention), then block ``layer``'s
    full qkv projection and its scaled q·kᵀ ``[B, heads, N, N]``."""
    tokens, _ = model.embed(x)
    for block in model.blocks[: layer - 1]:
        tokens, _ = block(tokens)
    block = model.blocks[layer - 1]
    attn = block.attn
    hidden = block.norm1(tokens)
    batch, count, dim = hidden.shape
    qkv = attn.qkv(hidden).reshape(batch, count, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    query, key = qkv[0], qkv[1]
    return (query @ key.transpose(-2, -1)) * attn.scale


def release_step(student: VisionTransformer, teacher: VisionTransformer, layer: int, device: torch.device) -> Step:
    """One optimiser step as the release takes it (see the module docstring)."""
    student, teacher = as_release(student), as_release(teacher)
    amp = device.type == "cuda"
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step(images: Tensor) -> Callable[[], float]:
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            with torch.no_grad():
                target = release_logits(teacher, images, layer)
            loss = attention_distill_loss(release_logits(student, images, student.depth), target)
        loss_value = loss.item()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return lambda: loss_value

    return step


# ------------------------------------------------------------------------------------------ naive step
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


def naive_step(student: VisionTransformer, teacher: VisionTransformer, layer: int, precision: Precision) -> Step:
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def step(images: Tensor) -> Callable[[], float]:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            with torch.no_grad():
                target = explicit_forward(teacher, images, layer)
            loss = attention_distill_loss(explicit_forward(student, images, student.depth), target)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        return lambda: loss_value

    return step


# ------------------------------------------------------------------------------------------ our step
def our_step(student: VisionTransformer, teacher: Teacher, precision: Precision, compiled: bool,
             compile_options: Optional[Dict[str, object]] = None, compile_fp8: bool = False) -> Step:
    """``unip pretrain``'s step: ``train_step`` over ``StudentLogits`` and the cut ``Teacher``.
    ``compile_options`` (for ``torch.compile``) and ``compile_fp8`` (compile an FP8 teacher too, which
    ``unip pretrain`` keeps eager) are experiments for the GPU sessions."""
    freeze_unused(student)
    mask_key_bias_grads(student)
    optimizer = build_adamw(student, 1e-4, 0.05, (0.9, 0.95))
    scaler = precision.grad_scaler()
    gate = LossGate.for_optimizer(optimizer)
    model: nn.Module = StudentLogits(student)
    loss_fn = attention_distill_loss
    if compiled:  # as unip pretrain compiles: block by block (an FP8 teacher stays eager), and the loss
        options = compile_options or {}
        student.compile_blocks(**options)
        if teacher.precision != "fp8" or compile_fp8:
            teacher.model.compile_blocks(**options)
        loss_fn = torch.compile(attention_distill_loss, **options)

    def loss_of(images: Tensor) -> Tensor:
        return loss_fn(model(images), teacher(images))

    def step(images: Tensor) -> Callable[[], float]:
        result = train_step(model, loss_of, [images], optimizer, scaler, precision, gate=gate)
        return lambda: result.loss

    return step


# ------------------------------------------------------------------------------------------ measuring
def count_flops(step: Step, images: Tensor) -> int:
    """Model FLOPs of one call of ``step`` (``torch.utils.flop_counter``)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step(images)()
    return counter.get_total_flops()


def time_steps(steps: Dict[str, Step], images: Tensor, warmup: int, rounds: int,
               consecutive: int = 1) -> Dict[str, List[float]]:
    """Seconds per step of each variant, interleaved so that drift hits all alike: each round runs a block of
    ``consecutive`` steps of every row in turn (``run_block``: it ends with the block's last loss read, so
    the block's wall-clock time over ``consecutive`` is the time per step)."""
    for name, step in steps.items():
        start = time.perf_counter()
        run_block(step, warmup, images)
        print(f"  {name}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            run_block(step, consecutive, images)
            times[name].append((time.perf_counter() - start) / consecutive)
    return times


def host_syncs_per_step(step: Step, images: Tensor, count: int) -> float:
    """Host syncs per step over a block of ``count`` steps, counted by CUDA's sync debug mode (which warns at
    each synchronising call: a loss read, a blocking copy, a data-dependent shape)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_block(step, count, images)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught) / count


def allocator_retries(device: torch.device) -> int:
    """How often the CUDA caching allocator had to free its cache and retry a failed cudaMalloc (each retry
    synchronises the device): rows that alternate can make the allocator reshuffle memory between them (0 on
    a CPU)."""
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else 0


def profile_step(name: str, step: Step, images: Tensor, steps: int, out: str, trace: bool = False) -> float:
    """Profile ``steps`` calls of ``step`` (already warmed up); write ``profile_<name>.txt`` and
    (with ``trace``) ``trace_<name>.json`` to ``out``. Returns the share of wall time the device was busy (CPU: 0)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = images.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        run_block(step, steps, images)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    # device events are kernels and copies, plus annotations spanning them ("## Call CompiledFxGraph ... ##"),
    # which would count the same time twice
    kernels = [event for event in events if event.device_type == DeviceType.CUDA
               and not getattr(event, "is_user_annotation", False) and not event.key.startswith("## ")]
    busy = sum(event.self_device_time_total for event in kernels) / 1e6 / wall
    name_safe = name.replace("+", "_")
    os.makedirs(out, exist_ok=True)
    report = os.path.join(out, f"profile_{name_safe}.txt")
    with open(report, "w", encoding="utf-8") as handle:
        handle.write(f"{name}: {steps} steps, batch {images.shape[0]}, {wall / steps * 1e3:.1f} ms/step wall, "
                     f"device busy {100 * busy:.1f}% of wall\n\n")
        handle.write(events.table(sort_by=sort, row_limit=40, max_name_column_width=90) + "\n\n")
        handle.write("by input shape (matrix products first):\n")
        handle.write(prof.key_averages(group_by_input_shape=True).table(
            sort_by=sort, row_limit=40, max_name_column_width=60, max_shapes_column_width=70) + "\n")
    if trace:
        prof.export_chrome_trace(os.path.join(out, f"trace_{name_safe}.json"))
    print(f"  profile of {name}: {wall / steps * 1e3:.1f} ms/step, device busy {100 * busy:.1f}% -> {report}")
    return busy


def compile_options(args: argparse.Namespace) -> Dict[str, object]:
    options: Dict[str, object] = run_compile_options({"compile_mode": args.compile_mode})  # as unip pretrain's
    if args.compile_static:  # teacher and student blocks differ in width and heads: dynamo would go dynamic
        options["dynamic"] = False
    return options


def build_rows(args: argparse.Namespace, device: torch.device) -> Tuple[Dict[str, Step], Step]:
    """The steps of ``args.rows`` and an eager step of ours to count model FLOPs on (one of them if there)."""
    torch.manual_seed(0)
    teacher_ref = create_model(args.teacher, img_size=args.img_size).eval().requires_grad_(False)
    heads = teacher_ref.heads_per_block[args.layer - 1]
    student_ref = create_model(args.student, last_heads=heads, img_size=args.img_size)  # drop path 0.1
    ours_precision = Precision(device.type, torch.bfloat16 if device.type == "cuda" else None)

    def fresh_student() -> VisionTransformer:
        return copy.deepcopy(student_ref).to(device).train()

    def fresh_teacher(precision: str) -> Teacher:
        teacher = Teacher(copy.deepcopy(teacher_ref), args.layer, student_ref.patch_size).to(device)
        return teacher.set_precision(precision)

    steps: Dict[str, Step] = {}
    for row in args.rows:
        if row == "release":
            steps[row] = release_step(fresh_student(), copy.deepcopy(teacher_ref).to(device), args.layer, device)
        elif row == "naive":
            steps[row] = naive_step(fresh_student(), copy.deepcopy(teacher_ref).to(device), args.layer,
                                    ours_precision)
        elif row.startswith("ours"):
            fp8 = "+fp8" in row
            if fp8 and fp8_unavailable_reason(device):
                print(f"  skipping {row}: {fp8_unavailable_reason(device)}")
                continue
            precision = Precision(device.type, torch.bfloat16) if "+bf16" in row else ours_precision
            weights = "fp8" if fp8 else ("bf16" if precision.dtype is torch.bfloat16 else "fp32")
            teacher = fresh_teacher(weights).set_gelu("tanh" if "+tanh" in row else "exact")
            steps[row] = our_step(fresh_student(), teacher, precision, "compile" in row, compile_options(args),
                                  args.fp8_compile)
        else:
            raise SystemExit(f"unknown row {row!r}; choose from {', '.join(ALL_ROWS + ('ours+bf16', 'naive'))} "
                             "(+tanh after an ours row: the teacher's tanh GELU)")
    eager = steps.get("ours") or steps.get("ours+bf16") or our_step(
        fresh_student(), fresh_teacher("bf16" if device.type == "cuda" else "fp32"), ours_precision, False)
    return steps, eager


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 256 on CUDA (the recipe)")
    parser.add_argument("--steps", type=int, default=5, help="timed blocks of --consecutive steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row (compilation happens here)")
    parser.add_argument("--consecutive", type=int, default=None,
                        help="steps of a row in a row before the next row's, each loss read after the next step "
                             "is queued (default: 5 on CUDA, where that overlap matters; 1 on a CPU)")
    parser.add_argument("--rows", default=None, help="comma-separated rows (default: release,ours,ours+compile "
                                                     "and, where FP8 runs, ours+compile+fp8; CPU: release,ours and, "
                                                     "with bf16 instructions, ours+bf16)")
    parser.add_argument("--naive", action="store_true", help="add the every-block-materialised row")
    parser.add_argument("--teacher", default="vit_large_patch16")
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--student", default="unip_vit_small_patch16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile mode of the compiled rows, as run.compile_mode (reduce-overhead: CUDA "
                             "graphs)")
    parser.add_argument("--compile-static", action="store_true",
                        help="compile with dynamic=False (static shapes for teacher and student blocks)")
    parser.add_argument("--fp8-compile", action="store_true",
                        help="compile the FP8 teacher's blocks too (unip pretrain keeps an FP8 teacher eager)")
    parser.add_argument("--count-syncs", action="store_true",
                        help="CUDA: count each row's host syncs per step after timing (sync debug mode)")
    parser.add_argument("--profile", default=None, metavar="ROW", help="profile this row after timing")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-out", default="profile", help="folder for the profile's table and trace")
    parser.add_argument("--profile-trace", action="store_true", help="also write a Chrome trace (large)")
    add_common_options(parser, peak="bf16")
    args = parser.parse_args(argv)

    apply_threads(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 8)
    args.consecutive = args.consecutive or (5 if cuda else 1)
    cpu_rows = ["release", "ours"] + (["ours+bf16"] if cpu_has_native_bf16() else [])
    args.rows = args.rows.split(",") if args.rows else (list(ALL_ROWS) if cuda else cpu_rows)
    if args.naive:
        args.rows.append("naive")
    if args.profile and args.profile not in args.rows:
        raise SystemExit(f"--profile {args.profile}: not among --rows ({', '.join(args.rows)})")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    steps, eager = build_rows(args, device)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    flops = count_flops(eager, images) / args.batch_size
    del eager  # a step built only for counting frees its models
    retries_before = allocator_retries(device)
    times = time_steps(steps, images, args.warmup, args.steps, args.consecutive)

    result: Dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "batch_size": args.batch_size, "model_gflops_per_image": flops / 1e9,
        "consecutive": args.consecutive, "rows": {}}
    if cuda:
        result["allocator_retries"] = allocator_retries(device) - retries_before
    base = args.batch_size / statistics.median(times["release"]) if "release" in times else None
    for name, values in times.items():
        rate = args.batch_size / statistics.median(values)
        row = {"images_per_s": rate, "ms_per_step": 1e3 * statistics.median(values),
               "tflops": flops * rate / 1e12}
        if cuda:
            row["mfu_bf16_peak"] = row["tflops"] / args.peak_tflops
        if base:
            row["vs_release"] = rate / base
        result["rows"][name] = row
    if args.count_syncs and cuda:
        for name, step in steps.items():
            result["rows"][name]["host_syncs_per_step"] = host_syncs_per_step(step, images, args.consecutive)
    retries = f", {result['allocator_retries']} allocator retries while timing" if cuda else ""
    print(f"\n{result['device']}, torch {result['torch']}, batch {args.batch_size}, "
          f"{flops / 1e9:.1f} model GFLOP per image, {args.consecutive} consecutive step(s) per row{retries}")
    print(f"{'row':<20}{'images/s':>10}{'ms/step':>10}{'TFLOP/s':>10}{'MFU':>8}{'vs release':>12}"
          f"{'syncs/step':>12}")
    for name, row in result["rows"].items():
        mfu = f"{100 * row['mfu_bf16_peak']:.1f}%" if "mfu_bf16_peak" in row else "-"
        ratio = f"{row['vs_release']:.2f}x" if "vs_release" in row else "-"
        syncs = f"{row['host_syncs_per_step']:.1f}" if "host_syncs_per_step" in row else "-"
        print(f"{name:<20}{row['images_per_s']:>10.1f}{row['ms_per_step']:>10.1f}{row['tflops']:>10.1f}"
              f"{mfu:>8}{ratio:>12}{syncs:>12}")
    if args.profile:
        if args.profile not in steps:
            raise SystemExit(f"--profile {args.profile}: not a row of this run ({', '.join(steps)})")
        result["profile"] = {"row": args.profile, "device_busy_share": profile_step(
            args.profile, steps[args.profile], images, args.profile_steps, args.profile_out,
            args.profile_trace)}
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
