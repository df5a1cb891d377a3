"""What a person looks at: colour masks, overlays with a legend, and per-class areas of label maps.

Palettes are lists of ``(r, g, b)`` per class id. ``ClassInfo`` resolves names and colours from a data set
name (SODA, MFNet, SCUT-Seg), a segmentor's meta, or, with neither, ids with the PASCAL VOC colour map
(deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unip.data.datasets import DATASETS, named_with_classes
from unip.data.layouts import IGNORE_INDEX, voc_palette
from unip.errors import ConfigError

Colour = Tuple[int, int, int]

#: Data sets whose class names and palettes ``--dataset`` supplies.


@dataclass(frozen=True)
class ClassInfo:
    """Class names (``None``: ids only) and one colour per class id."""

    names: Optional[Tuple[str, ...]]
    palette: Tuple[Colour, ...]

    @property
    def num_classes(self) -> int:
        return len(self.palette)

    def name(self, class_id: int) -> str:
        """The class's name, or ``class <id>`` without names (what legends, areas.csv and areas.json show)."""
        return self.names[class_id] if self.names else f"class {class_id}"

    @property
    def all_names(self) -> Tuple[str, ...]:
        """``name`` of every class id, in id order."""
        return tuple(self.name(i) for i in range(self.num_classes))

    @classmethod
    def resolve(cls, num_classes: int, dataset: Optional[str] = None,
                meta: Optional[Mapping[str, Any]] = None) -> "ClassInfo":
        """Names and palette for a segmentor with ``num_classes`` outputs: those of ``dataset`` (a named data set
        with a class list: ``unip.data.datasets.named_with_classes()``; its class count must match), else the ones
        stored in ``meta`` (our checkpoints, mmseg's ``CLASSES``/``PALETTE``), else ids with the VOC colour map.
        Raises ``ConfigError``."""
        if dataset is not None:
            if dataset not in named_with_classes():
                raise ConfigError(f"--dataset {dataset!r}: choose one of {', '.join(named_with_classes())}")
            layout = DATASETS[dataset].read_layout("")
            if len(layout.classes) != num_classes:
                raise ConfigError(f"--dataset {dataset}: {len(layout.classes)} classes, but the checkpoint predicts "
                                  f"{num_classes}; pick the data set it was fine-tuned on, or leave --dataset out")
            return cls(tuple(layout.classes), tuple(tuple(c) for c in layout.palette))
        meta = meta or {}
        names = meta.get("class_names")
        names = tuple(str(n) for n in names) if isinstance(names, (list, tuple)) and len(names) == num_classes else None
        palette = _palette(meta.get("palette"), num_classes) or voc_palette(num_classes)
        return cls(names, tuple(palette))


def _palette(value: Any, num_classes: int) -> Optional[List[Colour]]:
    """``value`` as one ``(r, g, b)`` per class, or ``None`` when it is not such a list."""
    if not isinstance(value, (list, tuple)) or len(value) != num_classes:
        return None
    try:
        colours = [tuple(int(c) for c in colour) for colour in value]
    except (TypeError, ValueError):
        return None
    if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colours):
        return None
    return colours  # type: ignore[return-value]


def colorize(labels: np.ndarray, palette: Sequence[Colour], ignore_colour: Colour = (0, 0, 0)) -> np.ndarray:
    """Label map ``[H, W]`` → RGB uint8 ``[H, W, 3]`` with each id's palette colour; ids past the palette
    (255 = ignore, with at most 255 classes) get ``ignore_colour``."""
    table = np.zeros((max(256, len(palette) + 1), 3), np.uint8)
    table[:] = ignore_colour
    table[:len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    return table[np.asarray(labels, np.int64).clip(0, len(table) - 1)]


def blend(image: np.ndarray, labels: np.ndarray, palette: Sequence[Colour], alpha: float = 0.5) -> np.ndarray:
    """``image [H, W, 3]`` uint8 with the colour mask of ``labels [H, W]`` blended in (weight ``alpha``, mmseg's
    ``opacity``); ignored pixels (255, when it is no class id) keep the image. Returns RGB uint8 ``[H, W, 3]``."""
    mask = colorize(labels, palette).astype(np.float32)
    blended = np.clip(np.rint(image.astype(np.float32) * (1.0 - alpha) + mask * alpha), 0, 255).astype(np.uint8)
    if len(palette) > IGNORE_INDEX:  # beyond 255 classes (16-bit label maps) 255 is a class
        return blended
    return np.where((np.asarray(labels) == IGNORE_INDEX)[..., None], image, blended)


def class_areas(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class id of a label map: int64 ``[num_classes]``."""
    return np.bincount(labels.reshape(-1).astype(np.int64), minlength=num_classes)[:num_classes]


def overlay(image: np.ndarray, labels: np.ndarray, classes: ClassInfo, alpha: float = 0.5,
            legend: bool = True, class_celsius: Optional[Sequence[float]] = None,
            scale: Optional[Sequence[Tuple[float, float]]] = None) -> np.ndarray:
    """The image (RGB uint8 ``[H, W, 3]``) blended with the colour mask (``alpha`` = mask weight, mmseg's
    ``opacity``), with a legend of the classes present (largest first, with their share of the image and, given
    ``class_celsius`` (one value per class, NaN: none), their temperature) in the top-left corner, and given
    ``scale`` (``(gray level, °C)`` pairs) a temperature bar at the right edge. Returns RGB uint8 ``[H, W, 3]``, the
    image's size."""
    out = blend(image, labels, classes.palette, alpha)
    if scale:
        out = draw_temperature_bar(out, scale)
    if not legend:
        return out
    areas = class_areas(labels, classes.num_classes)
    present = [int(i) for i in np.argsort(-areas, kind="stable") if areas[i] > 0]
    total = max(int(labels.size), 1)

    def text(i: int) -> str:
        degrees = "" if class_celsius is None or not np.isfinite(class_celsius[i]) else f" {class_celsius[i]:.1f}°C"
        return f"{classes.name(i)} {100.0 * areas[i] / total:.1f}%{degrees}"
    return draw_legend(out, [(classes.palette[i], text(i)) for i in present])


def draw_temperature_bar(image: np.ndarray, scale: Sequence[Tuple[float, float]]) -> np.ndarray:
    """``image`` (RGB uint8 ``[H, W, 3]``) with a vertical gray ramp at its right edge (white at the top, black at
    the bottom: the gray levels of the model's image) labelled with ``scale``'s ``(gray level, °C)`` pairs."""
    height, width = image.shape[:2]
    size = max(8, min(20, height // 32))
    font = _font(size)
    bar_w = max(4, min(16, width // 40))
    top, bottom = size + 8, max(size + 9, height - 6)
    right = width - 4
    left = right - bar_w
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas, "RGBA")
    labels = [(level, f"{value:.1f}") for level, value in scale if np.isfinite(value)]
    text_w = max([int(draw.textlength(t, font=font)) for _, t in labels] + [int(draw.textlength("°C", font=font))])
    draw.rectangle([left - text_w - 8, top - size - 6, width, bottom + 2], fill=(0, 0, 0, 150))
    span = max(bottom - top, 1)
    for row in range(top, bottom + 1):
        level = int(round(255 * (bottom - row) / span))
        draw.line([left, row, right, row], fill=(level, level, level))
    draw.rectangle([left, top, right, bottom], outline=(255, 255, 255))
    draw.text((right - draw.textlength("°C", font=font), top - size - 4), "°C", fill=(255, 255, 255), font=font)
    for level, text in labels:
        row = bottom - level / 255.0 * span
        draw.line([left - 3, row, left, row], fill=(255, 255, 255))
        draw.text((left - 5 - draw.textlength(text, font=font), row - size / 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def draw_legend(image: np.ndarray, entries: Sequence[Tuple[Colour, str]]) -> np.ndarray:
    """``image`` (RGB uint8 ``[H, W, 3]``) with a legend box in its top-left corner: one row per
    ``(colour, text)`` entry, as many as fit (then ``+N more``), font scaled to the image height."""
    height, width = image.shape[:2]
    size = max(8, min(24, height // 28))
    font = _font(size)
    row = size + 4
    fits = max(1, (height - 8) // row)
    if len(entries) > fits:
        entries = list(entries[: fits - 1]) + [((0, 0, 0), f"+{len(entries) - fits + 1} more")]
    if not entries:
        return image
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas, "RGBA")
    text_width = max(int(draw.textlength(text, font=font)) for _, text in entries)
    box_w = min(width, size + 12 + text_width)
    box_h = min(height, 4 + row * len(entries))
    draw.rectangle([0, 0, box_w, box_h], fill=(0, 0, 0, 150))
    for i, (colour, text) in enumerate(entries):
        top = 4 + i * row
        draw.rectangle([4, top, 4 + size, top + size], fill=tuple(colour), outline=(255, 255, 255))
        draw.text((size + 9, top), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)
