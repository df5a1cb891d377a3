"""What ``unip demo`` runs: the sizes and schedules of its full and ``--fast`` versions.

The numbers were tuned on a 2-core CPU so that the full demo ends in a few minutes and its one comparison —
the distilled student against the same student fine-tuned from its random initial weights — shows a gap larger
than the seed-to-seed noise (docs/demo.md, "How the demo was tuned"). Both stages use the ``demo`` presets
(``configs/pretrain/demo.yaml``, ``configs/finetune/demo.yaml``: 128 px, UperNet at 32 channels, batch 8).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

#: Bump when the way the demo makes its teacher changes, so that cached teachers of the old way are not reused.
TEACHER_RECIPE_VERSION = 1


@dataclass(frozen=True)
class TeacherRecipe:
    """The demo's stand-in for an RGB-pretrained teacher: a ViT fine-tuned as a segmentor on generated labels
    (its backbone is the teacher; ``unip.checkpoint.load_model`` reads a segmentor file's backbone)."""

    embed_dim: int
    depth: int
    num_heads: int
    iterations: int          # fine-tuning iterations (preset ``demo``, lr below)
    lr: float
    train_images: int        # generated labeled images it learns from (a set of its own: seed below)
    test_images: int
    data_seed: int = 1
    init_seed: int = 0

    def key(self, image_size: Tuple[int, int]) -> str:
        """The cache key: a hash of everything that makes the teacher, the image size and the recipe version."""
        settings: Dict[str, Any] = {**asdict(self), "image_size": list(image_size), "version": TEACHER_RECIPE_VERSION}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        return (f"ViT width {self.embed_dim}, depth {self.depth}, {self.num_heads} heads, fine-tuned as a segmentor "
                f"for {self.iterations} iterations on {self.train_images} generated labeled images")


@dataclass(frozen=True)
class DemoSettings:
    """One version of the demo (``FULL`` or ``FAST``)."""

    name: str
    teacher: TeacherRecipe
    image_size: Tuple[int, int] = (160, 128)   # width, height of every generated image
    unlabeled_per_set: int = 256               # unlabeled images in each of the two sets (street, campus)
    labeled_train: int = 64                    # the student's labeled set (fine-tuning) ...
    labeled_test: int = 128                    # ... and its test split (a large one: less noise in mIoU)
    pretrain_epochs: int = 10
    finetune_iterations: int = 100
    analysis_images: int = 32
    predict_images: int = 4
    student_depth: int = 4                     # the student of the pretrain preset ``demo``
    student_width: int = 96
    student_heads: int = 3
    input_size: int = 128                      # pre-training input and fine-tuning crop


FULL = DemoSettings(
    name="full",
    teacher=TeacherRecipe(embed_dim=192, depth=6, num_heads=6, iterations=400, lr=1e-3, train_images=160,
                          test_images=32))

FAST = DemoSettings(
    name="fast",
    teacher=TeacherRecipe(embed_dim=96, depth=4, num_heads=3, iterations=60, lr=1e-3, train_images=48,
                          test_images=16),
    unlabeled_per_set=48, labeled_train=32, labeled_test=32, pretrain_epochs=3, finetune_iterations=30,
    analysis_images=16, predict_images=2)
