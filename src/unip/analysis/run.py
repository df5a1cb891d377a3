"""``unip analyze`` as a library call: profile one or more models on an image folder and write the report.

Files written to ``out``: ``profile.json`` (every model's per-layer and per-head statistics, patterns,
selected layer, thresholds), ``profile.csv`` (one row per model, layer and head), ``nmi.png`` and
``distance.png`` (metric against depth, one line per model), ``attention_<model>.png`` (query-token
attention over the first image) and, with ``compare_features``, ``features.png`` (PCA of the last-layer
features of every model on the first image).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from unip.analysis.features import last_layer_features, pca_rgb
from unip.analysis.images import NORMALIZATIONS, ImageFolder, Normalization, list_images, to_display
from unip.analysis.patterns import LayerSelection, PatternThresholds, explain_distill_layer
from unip.analysis.plots import Curve, plot_feature_pca, plot_metric_by_depth, plot_query_attention
from unip.analysis.profile import AttentionProfile, profile_model
from unip.analysis.queries import Point, default_layers, query_attention, query_token
from unip.analysis.report import CSV_COLUMNS, format_table, write_csv, write_json
from unip.checkpoint import load_model
from unip.data.inputs import InputMapping, NoTemperaturesError
from unip.engine.distributed import resolve_device
from unip.errors import ConfigError, DataError
from unip.memory import require_memory
from unip.models.vit import VisionTransformer
from unip.outputs import claim, is_our_json, is_our_png, out_folder, starts_with_line

#: Attention-map-sized buffers alive at once while one batch is profiled (logits, softmax, metric scratch;
#: accelerators reduce four layers' maps together, see ``profile_model``).
MAP_COPIES = {"cpu": 4}
MAP_COPIES_ACCELERATOR = 12


@dataclass
class AnalyzeOptions:
    """Everything ``analyze`` needs besides the model sources and the image folder."""

    out: str = "analysis_out"
    num_images: Optional[int] = 64
    batch_size: int = 32
    device: str = "auto"
    size: Optional[Tuple[int, int]] = None
    norm: Normalization = NORMALIZATIONS["infmix"]
    #: how image files become the model's 8-bit image (``unip.data.inputs``; ``--thermal-range`` and the rest)
    mapping: InputMapping = field(default_factory=InputMapping)
    queries: Sequence[Point] = ()
    thresholds: PatternThresholds = field(default_factory=PatternThresholds)
    compare_features: bool = False
    autocast_dtype: Optional[torch.dtype] = None
    progress: bool = True


@dataclass
class ModelResult:
    label: str
    source: str
    profile: AttentionProfile
    selection: LayerSelection
    size: Tuple[int, int]


@dataclass
class AnalyzeResult:
    """What ``analyze`` produced: per-model results, the files written, the printed text, skipped images."""

    models: List[ModelResult]
    files: List[str]
    text: str
    skipped: List[str]


def model_label(source: str, taken: Sequence[str] = ()) -> str:
    """A short, file-name-safe label for a model source (timm name or file stem), unique among ``taken``."""
    name = source[len("timm:"):].split("@")[0] if source.startswith("timm:") else os.path.basename(source)
    name = re.sub(r"\.(safetensors|pth|pt|bin|ckpt)$", "", name)
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"
    unique, n = label, 2
    while unique in taken:
        unique, n = f"{label}-{n}", n + 1
    return unique


def _input_size(model: VisionTransformer, size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    height, width = size or tuple(model.config["img_size"])
    return int(height), int(width)


def check_input_size(model: VisionTransformer, size: Tuple[int, int], batch: int, device: torch.device,
                     what: str = "--size") -> None:
    """Raise ``ConfigError`` when ``size`` (height, width) is not a multiple of the model's patch, or when
    profiling batches of ``batch`` such inputs needs more memory than ``device`` has. ``what`` names where
    the size came from in the message."""
    height, width = size
    patch = model.patch_size
    if height % patch or width % patch:
        raise ConfigError(f"{what} {height},{width}: height and width must be multiples of the patch size "
                          f"{patch}, e.g. {max(patch, height // patch * patch)},{max(patch, width // patch * patch)}")
    if (height // patch) * (width // patch) < 2:
        raise ConfigError(f"{what} {height},{width}: one patch of {patch} px gives no attention pattern to "
                          f"measure; use at least two patches, e.g. {patch},{2 * patch}")
    tokens = (height // patch) * (width // patch) + model.num_prefix_tokens
    copies = MAP_COPIES.get(device.type, MAP_COPIES_ACCELERATOR)
    needed = batch * (max(model.heads_per_block) * tokens ** 2 * 4 * copies + 4 * tokens * model.embed_dim * 4
                      + 2 * 3 * height * width * 4)
    require_memory(needed, f"{what} {height},{width} (attention maps of {tokens:,} tokens, batches of {batch})",
                   "lower --size or --batch-size", device)


def profile_images(model: VisionTransformer, label: str, source: str, paths: List[str],
                   options: AnalyzeOptions, device: torch.device) -> Tuple[ModelResult, ImageFolder]:
    """One model's profile over the image files ``paths`` (read as ``options`` say), its layers classified and the
    layer to distil chosen: what ``analyze`` reports for it (``unip serve`` calls it for uploaded frames). Returns
    the result and the images (``skipped`` lists the unreadable ones); raises ``ConfigError`` / ``DataError``."""
    size = _input_size(model, options.size)
    check_input_size(model, size, min(options.batch_size, len(paths)), device,
                     "--size" if options.size else f"{source}: input size")
    for point in options.queries:  # fail before the long part, not after it
        query_token(point, (size[0] // model.patch_size, size[1] // model.patch_size), model.patch_size)
    images = ImageFolder(paths, size, options.norm, options.mapping)
    try:
        profile = profile_model(model, images, options.batch_size, device, autocast_dtype=options.autocast_dtype,
                                progress=options.progress, source=source)
    except NoTemperaturesError:
        raise  # the option, not the files: one line saying so
    except DataError:
        first = images.skipped[0] if images.skipped else "no files"
        raise DataError(f"none of the {len(paths)} image files could be read ({first})") from None
    selection = explain_distill_layer(profile, options.thresholds)
    return ModelResult(label, source, profile, selection, size), images


def _query_figure(model: VisionTransformer, result: ModelResult, images: ImageFolder,
                  options: AnalyzeOptions) -> str:
    path, image = images.first()
    height, width = result.size
    points = list(options.queries) or [(width // 2, height // 2), (width // 4, height // 4)]
    layers = default_layers(model.depth, [result.selection.layer])
    attention = query_attention(model, image, points, layers)
    return plot_query_attention(to_display(image, options.norm), attention, points, layers,
                                os.path.join(options.out, f"attention_{result.label}.png"),
                                title=f"{result.label} on {os.path.basename(path)} (head mean)")


def analyze(sources: Sequence[str], image_dir: str, options: Optional[AnalyzeOptions] = None) -> AnalyzeResult:
    """Profile every model in ``sources`` (anything ``unip.checkpoint.load_model`` reads, or
    ``timm:<name>``) on the images of ``image_dir``, classify layers, choose the layer to distil, and write
    the files listed in the module docstring. Raises ``DataError`` / ``CheckpointError`` / ``ConfigError``."""
    options = options or AnalyzeOptions()
    if options.batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {options.batch_size}; change --batch-size")
    claim_outputs(sources, options)
    paths = list_images(image_dir, options.num_images, exclude=options.out)  # not our figures of an earlier run
    device = resolve_device(options.device)
    os.makedirs(options.out, exist_ok=True)
    results: List[ModelResult] = []
    files: List[str] = []
    features: List[Tuple[str, torch.Tensor]] = []
    skipped: Dict[str, str] = {}
    first_image = None
    for source in sources:
        model = load_model(source).to(device)
        label = model_label(source, [r.label for r in results])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skipped files are reported once, below
            result, images = profile_images(model, label, source, paths, options, device)
        skipped.update({err.path: err.reason for err in images.skipped})
        results.append(result)
        files.append(_query_figure(model, result, images, options))
        if options.compare_features:
            _, image = images.first()
            if first_image is None:
                first_image = to_display(image, options.norm)
            features.append((label, pca_rgb(last_layer_features(model, image))))
        del model
    curves = [Curve(r.label, r.profile, r.selection.layer) for r in results]
    for metric in ("nmi", "distance"):
        files.append(plot_metric_by_depth(curves, metric, os.path.join(options.out, f"{metric}.png"),
                                          options.thresholds))
    if features:
        files.append(plot_feature_pca(first_image, features, os.path.join(options.out, "features.png")))
    files.append(write_json(os.path.join(options.out, "profile.json"), _document(results, image_dir, options,
                                                                                skipped)))
    files.append(write_csv(os.path.join(options.out, "profile.csv"), [(r.label, r.profile) for r in results]))
    text = "\n\n".join(format_table(r.label, r.profile, r.selection) for r in results)
    return AnalyzeResult(results, files, text, sorted(skipped))


def claim_outputs(sources: Sequence[str], options: AnalyzeOptions) -> None:
    """Check, before any work, that ``options.out`` can be a folder and that every file ``analyze`` will
    write there is new or its own earlier output; raises ``ConfigError``."""
    out_folder(options.out, "--out")
    labels: List[str] = []
    for source in sources:
        labels.append(model_label(source, labels))
    figures = ["nmi.png", "distance.png"] + [f"attention_{label}.png" for label in labels]
    figures += ["features.png"] if options.compare_features else []
    claim([os.path.join(options.out, name) for name in figures], is_our_png)
    claim([os.path.join(options.out, "profile.json")], is_our_json(["images", "thresholds", "models"]))
    claim([os.path.join(options.out, "profile.csv")], starts_with_line(",".join(CSV_COLUMNS)))


def _document(results: Sequence[ModelResult], image_dir: str, options: AnalyzeOptions,
              skipped: Dict[str, str]) -> Dict:
    return {
        "images": {"folder": image_dir, "skipped": skipped,
                   "normalization": {"mean": list(options.norm.mean), "std": list(options.norm.std)}},
        "thresholds": {"nmi_local": options.thresholds.nmi_local, "nmi_global": options.thresholds.nmi_global,
                       "local_distance": options.thresholds.local_distance},
        "models": [{"label": r.label, "input_size": list(r.size), "selected_layer": r.selection.layer,
                    "selection_reason": r.selection.reason, **r.profile.to_dict()} for r in results],
    }
