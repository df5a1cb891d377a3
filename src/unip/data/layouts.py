"""Names of the on-disk layouts UNIP reads and writes.

Kept in one place so that the InfMix scanner, the synthetic generator and the segmentation data sets agree
on folder names, split files and class ids.
"""

from __future__ import annotations

from typing import Tuple

#: File suffixes treated as images (lower case, with the dot).
IMAGE_SUFFIXES: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: FLIR files read by content (``unip.data.thermal``): ``.fff`` holds one frame, ``.seq`` and ``.csq`` many.
THERMAL_SUFFIXES: Tuple[str, ...] = (".fff", ".seq", ".csq")
#: Thermal files that hold a sequence of frames (``unip predict`` treats them like videos).
SEQUENCE_SUFFIXES: Tuple[str, ...] = (".seq", ".csq")
#: Files that hold one frame: images and FLIR ``.fff`` frames (what segmentation data sets may hold).
FRAME_SUFFIXES: Tuple[str, ...] = IMAGE_SUFFIXES + (".fff",)

#: File suffixes treated as videos by ``unip predict`` (read with OpenCV).
VIDEO_SUFFIXES: Tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")

#: In the InfMix release every infrared data set keeps its unlabeled frames in ``<root>/<name>/thermal/``.
THERMAL_DIR = "thermal"

#: COCO's training images live in ``<coco>/train2017/``.
COCO_TRAIN_DIR = "train2017"
#: The other folders of a COCO download (a COCO root holding these but no ``train2017/`` is refused).
COCO_OTHER_DIRS: Tuple[str, ...] = ("val2017", "test2017", "unlabeled2017", "annotations", "train2014", "val2014",
                                    "test2014", "test2015")
#: Split folders of an ImageNet download: ``--imagenet`` takes the train folder (one folder per class), not its root.
IMAGENET_SPLIT_DIRS: Tuple[str, ...] = ("train", "val", "test")

IGNORE_INDEX = 255

#: Split names every segmentation layout answers to.
SPLIT_NAMES: Tuple[str, ...] = ("train", "val", "test")

# SODA (VOC-style layout; the release reads it from ``SODA/InfraredSemanticLabel/``).
SODA_SUBDIR = "InfraredSemanticLabel"
SODA_IMAGE_DIR = "JPEGImages"
SODA_LABEL_DIR = "SegmentationClassPNG"
SODA_SPLITS = {"train": "train_infrared.txt", "val": "test_infrared.txt", "test": "test_infrared.txt"}

#: SODA's 21 classes; the position in this tuple is the id stored in label PNGs (255 = ignore).
SODA_CLASSES: Tuple[str, ...] = (
    "background", "person", "building", "tree", "road", "pole", "grass", "door", "table", "chair",
    "car", "bicycle", "lamp", "monitor", "trafficCone", "trash can", "animal", "fence", "sky", "river",
    "sidewalk",
)

# MFNet, thermal channel only (the release's layout; `unip data prepare mfnet` writes it from the download).
MFNET_IMAGE_DIR = "thermal_imgs"
MFNET_LABEL_DIR = "labels"
MFNET_SPLITS = {"train": "train.txt", "val": "val_test.txt", "test": "test.txt"}
MFNET_CLASSES: Tuple[str, ...] = (
    "background", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump",
)
#: The original MFNet download: 4-channel RGB-T PNGs (thermal = 4th channel) in ``images/``, ids in ``labels/``.
MFNET_RAW_IMAGE_DIR = "images"
MFNET_RAW_LABEL_DIR = "labels"

# SCUT-Seg (the release's layout; `unip data prepare scut` writes it from the download).
SCUT_IMAGE_DIR = "images"
SCUT_LABEL_DIR = "labels"
SCUT_SPLITS = {"train": "train.txt", "val": "val.txt", "test": "val.txt"}
SCUT_CLASSES: Tuple[str, ...] = (
    "background", "road", "person", "rider", "car", "truck", "fence", "tree", "bus", "pole",
)
#: Cityscapes-style ids of the original ``*_labelIds.png`` files, in the order of :data:`SCUT_CLASSES`.
SCUT_RAW_IDS: Tuple[int, ...] = (0, 7, 24, 25, 26, 27, 13, 21, 28, 17)
SCUT_RAW_LABEL_SUFFIX = "_labelIds.png"
#: Split files of the original download: one ``IMAGE [LABEL]`` pair of relative paths per line.
SCUT_RAW_SPLITS = {"train": "scut_train.txt", "val": "scut_val.txt"}

# Generic folder layout (any modality: thermal, RGB, depth).
FOLDER_IMAGE_DIR = "images"
FOLDER_LABEL_DIR = "labels"
FOLDER_SPLITS = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
#: Class names (and optional palette / split files) of a folder data set; ``.yml`` is accepted too.
FOLDER_CLASSES_FILE = "classes.yaml"


def voc_palette(num_classes: int) -> Tuple[Tuple[int, int, int], ...]:
    """Return the PASCAL VOC colour map for ids ``0 .. num_classes-1`` (id 0 black); deterministic.

    It is the palette labelme writes into VOC-style label PNGs (SODA's ``SegmentationClassPNG``).
    """
    colours = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


#: SODA: the VOC colour map of its labelme-made PNGs.
SODA_PALETTE = voc_palette(len(SODA_CLASSES))
#: MFNet: the colours of the MFNet / RTFNet visualisations.
MFNET_PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (0, 0, 0), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 192), (128, 128, 0), (64, 64, 128),
    (192, 128, 128), (192, 64, 0),
)
#: SCUT-Seg: the Cityscapes colours of its classes, as RGB (the data set's README lists them as BGR).
SCUT_PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (0, 0, 0), (128, 64, 128), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (190, 153, 153),
    (107, 142, 35), (0, 60, 100), (153, 153, 153),
)
