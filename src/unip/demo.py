"""``unip demo``: the whole pre-training half at toy scale, offline, on a CPU, through the real CLI.

Each stage prints the ``unip`` command it runs, so the demo doubles as a tour:
synthetic thermal data → InfMix manifest → packed shards → attention analysis of a teacher →
NMI-HAD pre-training of a tiny student → the student's checkpoint and attention profile.
No weights can be downloaded here, so the teacher is a small random-weight ViT whose q/k projections
are sharpened to give query-dependent attention; real runs use MAE-L, DINO-B or iBOT-L.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import List

import torch

from unip.checkpoint import save_checkpoint
from unip.errors import UnipError
from unip.models import create_model
from unip.outputs import claim, is_our_checkpoint, out_folder

TEACHER_SIZE = 64


def make_toy_teacher(path: Path) -> Path:
    """A 6-block ViT-S at 64 px with random weights; q/k rows scaled ×3 so attention depends on content."""
    torch.manual_seed(0)
    teacher = create_model("vit_small_patch16", depth=6, img_size=TEACHER_SIZE)
    with torch.no_grad():
        for block in teacher.blocks:
            block.attn.qkv.weight[: 2 * teacher.embed_dim] *= 3.0
    return save_checkpoint(teacher, path, {"note": "toy teacher for unip demo (random weights)"})


def _run(argv: List[str]) -> None:
    """Run one stage through the CLI; its errors propagate (the demo's own boundary reports them once)."""
    from unip.cli import run

    print(f"\n$ unip {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    start = time.perf_counter()
    if run(argv) != 0:
        raise UnipError(f"demo stage failed: unip {' '.join(argv)}")
    print(f"({time.perf_counter() - start:.1f} s)")


def run_demo(out: str = "demo_out", num_images: int = 96, epochs: int = 8) -> Path:
    """Run every stage into ``out``; returns the distilled student's path. Raises ``UnipError`` (e.g. a
    ``ConfigError`` when ``out`` is a file or holds files of the same names that unip did not write)."""
    root = Path(out_folder(out, "--out"))
    claim([str(root / "teacher.safetensors")], is_our_checkpoint)
    root.mkdir(parents=True, exist_ok=True)
    infrared, soda = root / "infrared", root / "soda"
    _run(["data", "synth", "--out", str(infrared), "--num", str(num_images // 2), "--name", "street",
          "--name", "campus", "--size", "160x128", "--seed", "0"])
    _run(["data", "synth", "--out", str(soda), "--labeled", "--num", "16", "--size", "160x128"])
    _run(["data", "infmix", "--infrared", str(infrared), "--out", str(root / "infmix.jsonl")])
    _run(["data", "stats", str(root / "infmix.jsonl"), "--out", str(root / "stats")])
    _run(["data", "pack", str(root / "infmix.jsonl"), "--out", str(root / "packed"), "--short-side", "96"])

    print(f"\n# toy teacher (random ViT-S, 6 blocks, {TEACHER_SIZE} px): {root / 'teacher.safetensors'}")
    teacher = make_toy_teacher(root / "teacher.safetensors")
    _run(["info", str(teacher)])
    _run(["analyze", "--model", str(teacher), "--images", str(infrared / "street" / "thermal"),
          "--num-images", "16", "--out", str(root / "analysis_teacher"), "--no-progress"])
    _run(["pretrain", "toy", "--teacher", str(teacher), "--teacher-layer", "auto", "--data",
          str(root / "packed"), "--out", str(root / "pretrain"), "--epochs", str(epochs), "--blr", "0.05",
          "--set", "data.augment=false"])
    student = root / "pretrain" / "student.safetensors"
    _run(["info", str(student)])
    _run(["analyze", "--model", str(teacher), "--model", str(student), "--images",
          str(infrared / "campus" / "thermal"), "--num-images", "16", "--out", str(root / "analysis_compare"),
          "--no-progress"])
    print(f"\ndemo finished: everything it wrote is in {root}/ (plots: {root}/analysis_compare/*.png)")
    return student
