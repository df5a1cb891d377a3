"""Backbones (``vit``), named presets (``presets``); necks, heads and the segmentor follow."""

from unip.models.presets import PRESETS, create_model, list_models, preset_config
from unip.models.vit import VisionTransformer

__all__ = ["PRESETS", "VisionTransformer", "create_model", "list_models", "preset_config"]
