"""Backbones (``vit``), named presets (``presets``), necks, heads and the segmentor built from them."""

from unip.models.heads import FCNHead, LinearHead, UperNetHead
from unip.models.necks import PyramidNeck, fpn, llfpn
from unip.models.presets import PRESETS, create_model, list_models, preset_config
from unip.models.segmentor import Segmentor
from unip.models.vit import VisionTransformer

__all__ = ["PRESETS", "FCNHead", "LinearHead", "PyramidNeck", "Segmentor", "UperNetHead", "VisionTransformer",
           "create_model", "fpn", "list_models", "llfpn", "preset_config"]
