"""Data: InfMix pre-training sets (manifests, statistics, packed shards), segmentation data sets, synthetic scenes.

Modules: :mod:`~unip.data.images` (safe decoding, 16-bit stretch), :mod:`~unip.data.infmix` (scan →
manifest + report), :mod:`~unip.data.stats`, :mod:`~unip.data.packed` (shards and data sets),
:mod:`~unip.data.transforms` (pre-training augmentation),
:mod:`~unip.data.synth` (generated scenes), :mod:`~unip.data.layouts` (folder names, classes, palettes),
:mod:`~unip.data.segmentation` (SODA / MFNet / SCUT-Seg / folder readers), :mod:`~unip.data.datasets` (the table
of named data sets: detection, opening and preparing by name), :mod:`~unip.data.seg_transforms`
(joint image + label transforms of the fine-tuning recipe), :mod:`~unip.data.seg_check` (whole-set check),
:mod:`~unip.data.seg_prepare` (MFNet / SCUT-Seg downloads → release layouts). ``RankSampler`` (rank shares) lives in
:mod:`~unip.engine.sharding` and is re-exported here.
"""

from unip.data.images import ImageReadError, read_gray, resize_short_side, stretch_to_uint8
from unip.data.infmix import ScanResult, build_manifest, read_manifest, report_path
from unip.data.layouts import IGNORE_INDEX, MFNET_CLASSES, SCUT_CLASSES, SODA_CLASSES
from unip.data.packed import (DEFAULT_SHORT_SIDE, GrayImages, ManifestImages, PackedImages, PackResult,
                              open_images, pack_manifest)
from unip.data.seg_check import SegCheckReport, check_segmentation
from unip.data.seg_prepare import PrepareResult
from unip.data.seg_transforms import SEG_MEAN, SEG_STD, seg_test_transform, seg_train_transform
from unip.data.datasets import DATASETS, NamedDataset, detect_dataset, open_segmentation_dataset, prepare_dataset
from unip.data.segmentation import Problem, SegmentationDataset
from unip.data.stats import compute_stats, write_stats
from unip.data.synth import SYNTH_CLASSES, LabeledSet, render_scene, write_soda, write_unlabeled
from unip.data.transforms import INFMIX_MEAN, INFMIX_STD, normalize_batch, pretrain_transform
from unip.engine.sharding import RankSampler, shard_indices  # data's users read rank shares with them

__all__ = [
    "DATASETS", "IGNORE_INDEX", "MFNET_CLASSES", "NamedDataset", "SCUT_CLASSES", "SEG_MEAN", "SEG_STD",
    "PrepareResult", "Problem",
    "SegCheckReport", "SegmentationDataset", "check_segmentation", "detect_dataset", "open_segmentation_dataset",
    "prepare_dataset", "seg_test_transform", "seg_train_transform",
    "DEFAULT_SHORT_SIDE", "GrayImages", "INFMIX_MEAN", "INFMIX_STD", "ImageReadError", "LabeledSet",
    "ManifestImages", "PackResult", "PackedImages", "RankSampler", "SODA_CLASSES", "SYNTH_CLASSES",
    "normalize_batch",
    "ScanResult", "build_manifest", "compute_stats", "open_images", "pack_manifest", "pretrain_transform",
    "read_gray", "read_manifest", "render_scene", "report_path", "resize_short_side", "shard_indices",
    "stretch_to_uint8", "write_soda", "write_stats", "write_unlabeled",
]
