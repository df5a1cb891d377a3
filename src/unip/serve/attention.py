"""The attention tab: the backbone's per-layer profile over uploaded frames (``unip analyze``'s own code, with its
defaults: the model's input size, the pre-training normalisation, its thresholds) and the attention map of one
query patch for a layer and a head (``unip.analysis.queries.query_attention``)."""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional

import numpy as np

from unip.analysis.images import load_image, to_display
from unip.analysis.run import AnalyzeOptions, profile_images
from unip.data.inputs import InputMapping
from unip.analysis.queries import query_attention
from unip.serve.jobs import Job
from unip.serve.models import ServedModel
from unip.serve.uploads import Upload
from unip.outputs import save_png

#: What ``POST /api/analyze`` takes (``unip analyze`` reads images).
ANALYZE_KINDS = {"image": "images (PNG, JPEG including FLIR radiometric JPEGs, TIFF, BMP, WebP; 8 or 16 bit)",
                 "thermal": "FLIR FFF frames (a SEQ/CSQ by its first frame)"}


def analyze_uploads(model: ServedModel, uploads: List[Upload], job: Job,
                    mapping: Optional[InputMapping] = None) -> Dict[str, Any]:
    """The work of an analyze job: the answer of ``POST /api/analyze`` (docs/serve.md). The frames as the model
    sees them are registered in ``job.files`` (``frame-<i>.png``); ``job.kept["paths"]`` keeps where the readable
    uploads are, for :func:`attention_map`."""
    options = AnalyzeOptions(progress=False, mapping=mapping or InputMapping())
    device = model.predict.predictor.device
    paths = [upload.path for upload in uploads]
    names = {upload.path: upload.name for upload in uploads}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unreadable frames are listed in the answer
        result, images = profile_images(model.backbone, model.name, model.checkpoint, paths, options, device)
    skipped = {err.path for err in images.skipped}
    readable = [path for path in paths if path not in skipped]
    frames = []
    for index, path in enumerate(readable):
        key = f"frame-{index}.png"
        shown = to_display(load_image(path, result.size, options.norm, options.mapping))
        job.files[key] = save_png((shown * 255).round().astype(np.uint8), os.path.join(job.folder, key))
        frames.append({"index": index, "name": names[path], "image_url": f"/api/jobs/{job.id}/files/{key}"})
    job.kept["paths"] = readable
    profile = result.profile.to_dict()
    return {"job": job.id, "checkpoint": model.name, "num_images": profile["num_images"],
            "input_size": list(result.size), "patch_size": profile["patch_size"], "grid": profile["grid"],
            "depth": profile["depth"], "uniform_distance": profile["uniform_distance"],
            "thresholds": {"nmi_local": options.thresholds.nmi_local, "nmi_global": options.thresholds.nmi_global,
                           "local_distance": options.thresholds.local_distance},
            "selected_layer": result.selection.layer, "selected_pattern": result.selection.pattern,
            "selection_reason": result.selection.reason, "layers": profile["layers"], "frames": frames,
            "skipped": [names[err.path] for err in images.skipped],
            "attention_url": f"/api/jobs/{job.id}/attention"}


def attention_map(model: ServedModel, path: str, layer: int, head: Optional[int], x: int, y: int,
                  mapping: Optional[InputMapping] = None) -> Dict[str, Any]:
    """Where the patch at pixel ``(x, y)`` of the model input looks in ``layer`` (1-based), for head ``head`` (from
    0) or the mean of the heads (None): ``values`` (row-major, ``rows`` x ``cols`` patches, summing to 1) and the
    query's ``row`` and ``col``. Raises ``ConfigError`` for a point, layer or head out of range."""
    options = AnalyzeOptions()
    image = load_image(path, model.input_size, options.norm, mapping)
    maps = query_attention(model.backbone, image, [(x, y)], [layer], head=head)[0, 0]
    patch = model.backbone.patch_size
    rows, cols = maps.shape
    return {"layer": layer, "head": head, "x": x, "y": y, "row": y // patch, "col": x // patch, "rows": rows,
            "cols": cols, "values": [float(v) for v in maps.reshape(-1)]}
