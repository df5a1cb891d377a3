"""Pre-training data: InfMix manifests with checks, statistics, packed shards, and synthetic thermal scenes.

Modules: :mod:`~unip.data.images` (safe decoding, 16-bit stretch), :mod:`~unip.data.infmix` (scan →
manifest + report), :mod:`~unip.data.stats`, :mod:`~unip.data.packed` (shards and data sets),
:mod:`~unip.data.sharding` (rank shares), :mod:`~unip.data.transforms` (pre-training augmentation),
:mod:`~unip.data.synth` (generated scenes), :mod:`~unip.data.layouts` (folder names, SODA classes).
"""

from unip.data.images import ImageReadError, read_gray, resize_short_side, stretch_to_uint8
from unip.data.infmix import ScanResult, build_manifest, read_manifest, report_path
from unip.data.layouts import SODA_CLASSES
from unip.data.packed import (DEFAULT_SHORT_SIDE, GrayImages, ManifestImages, PackedImages, PackResult,
                              open_images, pack_manifest)
from unip.data.sharding import RankSampler, shard_indices
from unip.data.stats import compute_stats, write_stats
from unip.data.synth import SYNTH_CLASSES, LabeledSet, render_scene, write_soda, write_unlabeled
from unip.data.transforms import INFMIX_MEAN, INFMIX_STD, normalize_batch, pretrain_transform

__all__ = [
    "DEFAULT_SHORT_SIDE", "GrayImages", "INFMIX_MEAN", "INFMIX_STD", "ImageReadError", "LabeledSet",
    "ManifestImages", "PackResult", "PackedImages", "RankSampler", "SODA_CLASSES", "SYNTH_CLASSES",
    "normalize_batch",
    "ScanResult", "build_manifest", "compute_stats", "open_images", "pack_manifest", "pretrain_transform",
    "read_gray", "read_manifest", "render_scene", "report_path", "resize_short_side", "shard_indices",
    "stretch_to_uint8", "write_soda", "write_stats", "write_unlabeled",
]
