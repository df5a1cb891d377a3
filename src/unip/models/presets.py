"""Named architectures: UNIP students and the ViT teachers they learn from.

``create_model(name, **overrides)`` builds any of them; overrides are ``VisionTransformer`` arguments
(e.g. ``last_heads=16``, ``img_size=512``, ``drop_path_rate=0.0``).
"""

from __future__ import annotations

from typing import Any, Dict, List

from unip.errors import ConfigError
from unip.models.vit import VisionTransformer

#: width, depth, heads of the standard ViT sizes
VIT_SIZES: Dict[str, Dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


def _presets() -> Dict[str, Dict[str, Any]]:
    presets: Dict[str, Dict[str, Any]] = {}
    for size in ("tiny", "small", "base"):
        # UNIP students (docs/recipe.md#students): fixed sin-cos position table, drop path 0.1, LayerNorm eps 1e-6.
        presets[f"unip_vit_{size}_patch16"] = dict(
            VIT_SIZES[size], patch_size=16, img_size=224, pos_embed_type="sincos", drop_path_rate=0.1)
    for size in VIT_SIZES:
        for patch in (16, 14):
            presets[f"vit_{size}_patch{patch}"] = dict(VIT_SIZES[size], patch_size=patch, img_size=224)
    return presets


PRESETS: Dict[str, Dict[str, Any]] = _presets()

#: The sizes the paper's benchmark compares backbones at, and the architecture each stands for (a sweep's
#: ``size:``: what ``source: none`` initialises at random and what its cost estimate assumes; the fine-tuning
#: presets' ``model.backbone`` of ``<dataset>_<size>``).
SIZE_PRESETS: Dict[str, str] = {"tiny": "unip_vit_tiny_patch16", "small": "unip_vit_small_patch16",
                                "base": "unip_vit_base_patch16", "large": "vit_large_patch16"}


def list_models() -> List[str]:
    """Names accepted by ``create_model``."""
    return sorted(PRESETS)


def preset_config(name: str) -> Dict[str, Any]:
    """The ``VisionTransformer`` arguments of a preset (a copy)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return dict(PRESETS[name])


def create_model(name: str, **overrides: Any) -> VisionTransformer:
    """Build the preset ``name`` with ``overrides`` applied; weights are randomly initialised."""
    config = preset_config(name)
    config.update(overrides)
    try:
        return VisionTransformer(**config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build {name!r} with {overrides}: {err}") from err
