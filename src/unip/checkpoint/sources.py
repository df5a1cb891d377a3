"""A backbone from any source UNIP reads, and its description.

Sources that ``load_model`` and ``open_model`` accept:

* our own ``.safetensors`` files (written by ``save_checkpoint``: weights + a JSON config in the header), and the
  backbone of our segmentor files,
* PyTorch files (``.pth/.pt/.bin``) of the UNIP, MAE, DINO, iBOT, DeiT and timm releases, and training states
  (``checkpoints/step-*.pt``, read as their run's model file),
* ``timm:<name>`` (weights downloaded by timm) or ``timm:<name>@<file>`` (timm reads a local file).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import Tensor

from unip.checkpoint.architecture import check_architecture, check_fits, infer_architecture
from unip.checkpoint.backbone import LoadedModel, backbone_lines, build_backbone, load_weights
from unip.checkpoint.reading import (CONFIG_METADATA_KEY, PathLike, _brief, extract_state_dict, normalize_keys,
                                     read_checkpoint)
from unip.checkpoint.timm_hub import _open_timm
from unip.errors import CheckpointError
from unip.models.presets import PRESETS
from unip.models.vit import VisionTransformer


def load_model(source: PathLike, allow_partial: bool = False, **overrides: Any) -> VisionTransformer:
    """Rebuild a backbone from ``source`` with its weights (see the module docstring for sources).

    The architecture comes from our metadata, a release's ``args`` (``args.model``, ``args.last_heads``),
    timm, or, failing those, the shapes of the weights (heads then assume 64 channels per head, or the
    standard ViT size of that width). ``overrides`` are ``VisionTransformer`` arguments
    (e.g. ``last_heads=16``, ``img_size=512``). Returns the model in eval mode."""
    return open_model(source, allow_partial=allow_partial, **overrides).model


def open_model(source: PathLike, allow_partial: bool = False, **overrides: Any) -> LoadedModel:
    """Like ``load_model`` but returns a ``LoadedModel`` with the report and metadata (and, with
    ``allow_partial``, the ``problem`` a strict open would raise).

    The architecture a file describes is checked (``check_architecture``, ``check_fits``) before the model
    is allocated, so a small file cannot make it allocate a huge one."""
    text = str(source)
    if text.startswith("timm:"):
        loaded = _open_timm(text[len("timm:"):], allow_partial, overrides)
    else:
        content, metadata = read_checkpoint(source)
        state_dict = extract_state_dict(content, text)
        config, architecture_from, meta = _architecture(content, metadata, state_dict, text)
        if meta.get("architecture") == "Segmentor":  # a fine-tuned segmentor: its backbone only
            state_dict = {key: value for key, value in state_dict.items() if key.startswith("backbone.")}
            architecture_from += " (the backbone of a segmentor)"
        config.update(overrides)
        check_architecture(config, text)
        misfit = check_fits(config, normalize_keys(state_dict, text)[0], text, allow_partial)
        model = build_backbone(config, text)
        report = load_weights(model, state_dict, allow_partial=allow_partial, name=text)
        loaded = LoadedModel(model, report, architecture_from, meta, misfit or report.problem)
    loaded.model.eval()
    return loaded


def _architecture(content: Any, metadata: Mapping[str, str], state_dict: Mapping[str, Tensor],
                  source: str) -> Tuple[Dict[str, Any], str, Dict[str, Any]]:
    """Returns ``(VisionTransformer kwargs, where they came from, extra metadata)``."""
    if CONFIG_METADATA_KEY in metadata:
        try:
            meta = json.loads(metadata[CONFIG_METADATA_KEY])
            config = dict(meta.pop("model"))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{source}: corrupt '{CONFIG_METADATA_KEY}' metadata ({_brief(err)}); "
                                  "the file was damaged after it was written") from err
        config.pop("heads_per_block", None)
        state = meta.get("training_state")
        if isinstance(state, dict):  # unip.checkpoint.states
            return config, f"training state at step {state.get('step')} (its run's model header)", meta
        return config, "unip metadata", meta
    args = content.get("args") if isinstance(content, Mapping) else None
    if isinstance(args, argparse.Namespace) and getattr(args, "model", None) in PRESETS:
        config = dict(PRESETS[args.model])
        last_heads = getattr(args, "last_heads", None)
        if last_heads:
            if isinstance(last_heads, bool) or not isinstance(last_heads, (int, str)) or not str(last_heads).isdigit():
                raise CheckpointError(f"{source}: args.last_heads={last_heads!r} is not a head count")
            config["last_heads"] = int(last_heads)
        config["drop_path_rate"] = 0.0
        meta = {k: v for k, v in vars(args).items() if k in ("model", "last_heads", "teacher_model",
                                                            "intermediate", "input_size")}
        return config, f"release args (model={args.model}, last_heads={config.get('last_heads')})", meta
    return infer_architecture(state_dict, source), "inferred from weight shapes", {}


def describe_backbone(source: PathLike, allow_partial: bool = True) -> Tuple[str, Optional[str]]:
    """``(summary, problem)`` of a backbone source for ``unip info``: its architecture, where that came from, the
    load report and metadata; and why a strict open refuses it (``LoadedModel.problem``), ``None`` when it loads."""
    loaded = open_model(source, allow_partial=allow_partial)
    lines = [f"source:        {source}", *backbone_lines(loaded.model),
             f"from:          {loaded.architecture_from}",
             f"weights:       {loaded.report.summary()}"]
    lines += [f"{key + ':':<14} {value}" for key, value in loaded.meta.items() if key != "architecture"]
    return "\n".join(lines), loaded.problem
