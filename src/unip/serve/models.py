"""The checkpoints a server serves, each loaded once: the segmentor as ``unip predict`` loads it (its predictor and
classes) and, for the attention tab, its backbone (the same module, not a second copy).

Without a checkpoint the server takes the demo's cached teacher segmentor (``unip demo`` makes it once, under
``$UNIP_CACHE``, ``$XDG_CACHE_HOME/unip`` or ``~/.cache/unip``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from unip.analysis.run import model_label
from unip.demo.cache import cache_root, find_teacher
from unip.demo.settings import FAST, FULL
from unip.errors import ConfigError
from unip.models.vit import VisionTransformer
from unip.seg.predict_run import PredictModel, PredictOptions
from unip.text import printable

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A served checkpoint: the ``name`` the page and the API call it by (the file's stem, made unique), the file,
    and the loaded segmentor (``predict``)."""

    name: str
    checkpoint: str
    predict: PredictModel

    @property
    def backbone(self) -> VisionTransformer:
        return self.predict.predictor.segmentor.backbone

    @property
    def input_size(self) -> Tuple[int, int]:
        """(height, width) the attention analysis resizes frames to: the backbone's image size, as ``unip analyze``
        does without ``--size``."""
        height, width = self.backbone.config["img_size"]
        return int(height), int(width)

    def describe(self) -> Dict[str, Any]:
        """What ``GET /api/models`` lists for this model."""
        classes = self.predict.classes
        backbone = self.backbone
        return {"name": self.name, "checkpoint": os.path.basename(self.checkpoint),
                "classes": list(classes.all_names), "palette": [list(c) for c in classes.palette],
                "depth": backbone.depth, "heads": list(backbone.heads_per_block), "patch_size": backbone.patch_size,
                "embed_dim": backbone.embed_dim, "input_size": list(self.input_size),
                "device": str(self.predict.predictor.device), "precision": self.predict.predictor.precision.name}


def load_models(checkpoints: Sequence[str], options: PredictOptions) -> List[ServedModel]:
    """Each checkpoint loaded once with ``unip predict``'s model options (``dataset``, ``device``, ``precision``,
    ``batch_size``); none: the demo's cached segmentor. Raises ``UnipError`` (``ConfigError`` without a model)."""
    sources = list(checkpoints) or [default_checkpoint()]
    models: List[ServedModel] = []
    for checkpoint in sources:
        name = model_label(checkpoint, [m.name for m in models])
        models.append(ServedModel(name, checkpoint, PredictModel.load(checkpoint, options)))
        log.info("loaded %s as %s", printable(checkpoint), name)
    return models


def default_checkpoint() -> str:
    """The demo's cached teacher segmentor (the full demo's, else the fast one's); ``ConfigError`` saying how to
    get a model when there is none."""
    root = cache_root()
    for settings in (FULL, FAST):
        found, _ = find_teacher(root, settings.teacher.key(settings.image_size))
        if found is not None:
            log.info("no --checkpoint: serving the demo's cached segmentor %s", printable(found.file))
            return str(found.file)
    raise ConfigError(f"no --checkpoint given and no demo model cached in {printable(root)}: give --checkpoint FILE "
                      "(a segmentor of unip finetune, or the release's fine-tuned .pth), or run unip demo --fast "
                      "once to make and cache one")
