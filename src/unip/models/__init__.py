"""Backbones (``vit``), named presets (``presets``), necks, heads and the segmentor built from them."""

from unip.models.heads import HEADS, FCNHead, HeadKind, LinearHead, UperNetHead
from unip.models.necks import NECKS, NeckKind, PyramidNeck, build_neck
from unip.models.presets import PRESETS, create_model, list_models, preset_config
from unip.models.segmentor import Segmentor
from unip.models.vit import VisionTransformer

__all__ = ["HEADS", "NECKS", "PRESETS", "FCNHead", "HeadKind", "LinearHead", "NeckKind", "PyramidNeck", "Segmentor",
           "UperNetHead", "VisionTransformer", "build_neck", "create_model", "list_models", "preset_config"]
