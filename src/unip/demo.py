"""``unip demo``: the pipeline at toy scale, offline, on a CPU.

Each stage prints what it ran. Stages are added as the library grows (analysis, pre-training,
fine-tuning); today it builds every student preset and round-trips a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unip.checkpoint import describe_checkpoint, load_model, save_checkpoint
from unip.models import create_model


def _stage(title: str) -> None:
    print(f"\n== {title}")


def demo_models(out: Path) -> None:
    """Build each UNIP student, check the attention taps, save and reload one checkpoint."""
    _stage("models: UNIP students (last block with 16 heads, as after distilling a ViT-L teacher)")
    image = torch.randn(1, 3, 224, 224)
    for name in ("unip_vit_tiny_patch16", "unip_vit_small_patch16", "unip_vit_base_patch16"):
        model = create_model(name, last_heads=16).eval()
        with torch.no_grad():
            logits = model.attention_logits(image, layer=model.depth)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:<24} {params:6.2f} M params, last-layer attention logits {tuple(logits.shape)}")
    path = save_checkpoint(model, out / "unip_vit_base_patch16.safetensors", {"preset": name})
    reloaded = load_model(path)
    with torch.no_grad():
        same = torch.equal(reloaded(image), model(image))
    print(f"saved and reloaded {path} (outputs identical: {same})")
    print(describe_checkpoint(path))


def run_demo(out: str = "demo_out") -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    demo_models(folder)
    print(f"\ndemo finished; files are in {folder}/")
