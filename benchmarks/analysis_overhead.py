"""Cost of ``unip analyze``'s profile against a plain forward over the same images (goal: ≤ 1.2×).

Times, over the same in-memory batches (median of interleaved rounds, after a warm-up):

* ``forward``   – ``model(x)``: every block runs fused SDPA (what inference costs);
* ``maps``      – every block materialises its softmax attention map, no metric (the inherent cost of
                  looking at attention at all);
* ``profile``   – ``unip.analysis.profile_model``: maps plus NMI / distance / entropy and the streaming
                  statistics.
* ``profile_default_linear`` – on a CPU where ``profile_model`` chose oneDNN's fp32 linear kernel
                  (``unip.models.cpu_linear``): the profile again with PyTorch's default kernel
                  (``profile_model(cpu_linear="default")``), the ratio the kernel choice buys. The three rows
                  above all run with the chosen kernel.

Usage: ``python benchmarks/analysis_overhead.py [--model vit_small_patch16] [--num-images 64]
[--batch-size 16] [--img-size 224] [--device auto] [--rounds 3] [--threads N] [--layer-group K]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from unip.analysis.profile import attention_by_layer, profile_model
from unip.models import create_model
from unip.models.cpu_linear import linear_kernel, use_onednn_linears


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main(argv: List[str] | None = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch16")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--layer-group", type=int, default=None,
                        help="layers reduced together (default: profile_model's, 1 on CPU, 4 on GPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size).to(device).eval()
    images = torch.randn(args.num_images, 3, args.img_size, args.img_size)
    batches = [b.to(device) for b in images.split(args.batch_size)]
    layers = list(range(1, model.depth + 1))

    def forward() -> None:
        with torch.inference_mode():
            for x in batches:
                model(x)

    def maps() -> None:
        with torch.inference_mode():
            for x in batches:
                for _ in attention_by_layer(model, x, layers):
                    pass

    def profile(cpu_linear: Optional[str] = None) -> None:
        # the same device-resident images, so that host→device copies are not counted against the profile
        profile_model(model, (img for b in batches for img in b), args.batch_size, device, progress=False,
                      layer_group=args.layer_group, cpu_linear=cpu_linear)

    def profile_default_linear() -> None:
        profile("default")  # profile_model's choice lasts for the call; the model's kernels are restored after it

    switched = use_onednn_linears(model)  # the kernels profile_model chooses, for every row
    runs = {"forward": forward, "maps": maps, "profile": profile}
    if switched:
        runs["profile_default_linear"] = profile_default_linear
    for fn in runs.values():  # warm-up (allocator, kernels, distance table)
        fn()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(_timed(fn, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "model": args.model, "img_size": args.img_size, "images": args.num_images, "batch_size": args.batch_size,
        "layer_group": args.layer_group,
        **{f"{name}_s": round(value, 4) for name, value in median.items()},
        "images_per_s_profile": round(args.num_images / median["profile"], 1),
        "maps_over_forward": round(median["maps"] / median["forward"], 3),
        "profile_over_forward": round(median["profile"] / median["forward"], 3),
        "profile_over_maps": round(median["profile"] / median["maps"], 3),
        "cpu_linear": linear_kernel(model),
    }
    if switched:
        result["default_linear_over_onednn"] = round(median["profile_default_linear"] / median["profile"], 3)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
