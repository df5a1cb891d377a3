"""Names of the on-disk layouts UNIP reads and writes.

Kept in one place so that the InfMix scanner, the synthetic generator and the segmentation data sets agree
on folder names, split files and class ids.
"""

from __future__ import annotations

from typing import Tuple

#: File suffixes treated as images (lower case, with the dot).
IMAGE_SUFFIXES: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: In the InfMix release every infrared data set keeps its unlabeled frames in ``<root>/<name>/thermal/``.
THERMAL_DIR = "thermal"

#: COCO's training images live in ``<coco>/train2017/``.
COCO_TRAIN_DIR = "train2017"

# SODA (VOC-style layout).
SODA_IMAGE_DIR = "JPEGImages"
SODA_LABEL_DIR = "SegmentationClassPNG"
SODA_SPLITS = {"train": "train_infrared.txt", "test": "test_infrared.txt"}

#: SODA's 21 classes; the position in this tuple is the id stored in label PNGs (255 = ignore).
SODA_CLASSES: Tuple[str, ...] = (
    "background", "person", "building", "tree", "road", "pole", "grass", "door", "table", "chair",
    "car", "bicycle", "lamp", "monitor", "trafficCone", "trash can", "animal", "fence", "sky", "river",
    "sidewalk",
)

IGNORE_INDEX = 255
