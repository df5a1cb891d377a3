"""Reading every supported checkpoint format safely, and writing self-describing checkpoints.

Sources that ``load_model`` accepts (``unip.checkpoint.sources``):

* our own ``.safetensors`` files (written by ``save_checkpoint``: weights + a JSON config in the header),
* PyTorch files (``.pth/.pt/.bin``) of the UNIP, MAE, DINO, iBOT, DeiT and timm releases,
* ``timm:<name>`` (weights downloaded by timm) or ``timm:<name>@<file>`` (timm reads a local file).

Nothing is ever executed from a file: pickles are read with ``torch.load(weights_only=True)`` and an
explicit allow-list (``SAFE_GLOBALS``); anything else is refused with a ``CheckpointError``.

Modules: ``reading`` (safe file reading, release containers and key names, what a file's header names),
``states`` (training states read as the model file of their run), ``architecture`` (plausibility bounds,
architecture from weight shapes), ``backbone`` (``load_weights``, building and describing a backbone,
``save_checkpoint``), ``timm_hub`` (``timm:`` sources), ``sources`` (``load_model``/``open_model`` of any
source, ``describe_backbone``). A fine-tuned segmentor file (header architecture ``Segmentor``) is rebuilt by
``unip.seg.load_segmentor``; ``load_model`` reads its backbone, and ``unip.checkpoint_kinds`` describes either
kind of file (``unip info``).
"""

from unip.checkpoint.architecture import (ARCHITECTURE_RULES, MAX_DEPTH, MAX_IMAGE_SIDE, MAX_PATCH, MAX_TOKENS,
                                          MAX_WIDTH, check_architecture, check_fits, expected_shapes,
                                          infer_architecture)
from unip.checkpoint.backbone import (DEFAULT_NORMALIZATION, LoadedModel, LoadReport, backbone_lines, load_weights,
                                      save_checkpoint)
from unip.checkpoint.reading import (CONFIG_METADATA_KEY, CONTAINER_KEYS, IGNORED_KEY, SAFE_GLOBALS,
                                     STRIP_PREFIXES, PathLike, architecture_of, extract_state_dict, is_our_checkpoint,
                                     normalize_keys, read_checkpoint)
from unip.checkpoint.sources import describe_backbone, load_model, open_model
from unip.checkpoint.timm_hub import config_from_timm
from unip.models.presets import create_model

__all__ = ["ARCHITECTURE_RULES", "CONFIG_METADATA_KEY", "CONTAINER_KEYS", "DEFAULT_NORMALIZATION", "IGNORED_KEY",
           "MAX_DEPTH", "MAX_IMAGE_SIDE", "MAX_PATCH", "MAX_TOKENS", "MAX_WIDTH", "SAFE_GLOBALS", "STRIP_PREFIXES",
           "LoadReport", "LoadedModel", "PathLike", "architecture_of", "backbone_lines", "check_architecture",
           "check_fits", "config_from_timm", "create_model", "describe_backbone", "expected_shapes",
           "extract_state_dict", "infer_architecture", "is_our_checkpoint", "load_model", "load_weights",
           "normalize_keys", "open_model", "read_checkpoint", "save_checkpoint"]
