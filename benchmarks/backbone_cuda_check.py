"""Check the backbone's accelerator paths and time them: bf16 autocast, fused SDPA, torch.compile.

    python benchmarks/backbone_cuda_check.py [--device cuda] [--batch-size 64] [--steps 20]

Prints one JSON object. On a CPU it still runs (fp32 only, no flash kernel), so the script itself is
exercised where no GPU is lent. Ratios compare runs made in this same process.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from unip.models import create_model


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    teacher = create_model("vit_large_patch16").to(device).eval()
    image = torch.randn(args.batch_size, 3, 224, 224, device=device)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "batch": args.batch_size}

    with torch.no_grad():
        reference = teacher.attention_logits(image[:4], 18).float()
        dtype = torch.bfloat16 if cuda else torch.float32
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            low = teacher.attention_logits(image[:4], 18).float()
        result["bf16_logits_rel_error"] = ((low - reference).norm() / reference.norm()).item()

        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
                flash = teacher(image[:4]).float()
            result["flash_attention_runs"] = True
            result["flash_vs_fp32_rel_error"] = ((flash - teacher(image[:4])).norm()
                                                 / flash.norm()).item()

        def forward_full():
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                return teacher(image)

        def forward_cut():
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                return teacher.attention_logits(image, 18)

        full, cut = timed(forward_full, args.steps, device), timed(forward_cut, args.steps, device)
        result["vit_l_forward_images_per_s"] = args.batch_size / full
        result["vit_l_cut_at_18_images_per_s"] = args.batch_size / cut
        result["cut_speedup"] = full / cut

        if not args.no_compile:
            compiled = torch.compile(teacher)
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                eager_out, compiled_out = teacher(image[:8]).float(), compiled(image[:8]).float()
            result["compile_rel_error"] = ((compiled_out - eager_out).norm() / eager_out.norm()).item()

            def forward_compiled():
                with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                    return compiled(image)
            result["vit_l_compiled_images_per_s"] = args.batch_size / timed(forward_compiled, args.steps, device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
