"""Procedural thermal-looking street scenes, deterministic by seed, written in the real on-disk layouts.

A scene has a cold sky with clouds, warm ground, a warmer road in perspective with lane markings,
buildings with windows, trees, and hot cars and people sized by their distance; then the camera: optical
blur, vignetting, fixed-pattern column stripes (constant per data set, like a real sensor), row and
temporal noise, and a per-frame gain/offset (AGC). Pixel values are "temperatures" in [0, 1] mapped to
8-bit, or to 16-bit raw counts when asked (to exercise the 16-bit stretch of :mod:`unip.data.images`).

Labels use SODA's class ids (:data:`SYNTH_CLASSES`); 255 marks a one-pixel band around people and cars.
Image ``i`` of a set depends only on ``(seed, set name, i)``, not on how many images are written.

Every file written is marked as unip's (JPEG comment, PNG ``Software`` text; see :mod:`unip.outputs`), and a
rerun replaces only marked files: a real data set in the same layout (SODA's ``JPEGImages/00000.jpg``) is
refused, never overwritten.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from unip.data.layouts import (IGNORE_INDEX, SODA_CLASSES, SODA_IMAGE_DIR, SODA_LABEL_DIR, SODA_SPLITS,
                               THERMAL_DIR)
from unip.atomic import remove_temporaries
from unip.errors import ConfigError, DataError
from unip.memory import require_memory
from unip.outputs import (claim, claim_folder, is_our_jpeg, is_our_png, out_folder, plain_name, save_jpeg,
                          save_png)

BACKGROUND, PERSON, BUILDING, TREE, ROAD, CAR, SKY = 0, 1, 2, 3, 4, 10, 18
#: The SODA classes the generator draws: SODA id → name.
SYNTH_CLASSES: Dict[int, str] = {i: SODA_CLASSES[i]
                                 for i in (BACKGROUND, PERSON, BUILDING, TREE, ROAD, CAR, SKY)}
#: Peak memory of rendering one image, per pixel (float32 canvases, noise, label, camera; measured ~43).
BYTES_PER_PIXEL = 48


# ------------------------------------------------------------------------------------- drawing
class _Canvas:
    """A temperature image and its label map, with shape painters working on bounding boxes."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = height, width, rng
        self.temp = np.zeros((height, width), np.float32)
        self.label = np.zeros((height, width), np.uint8)

    def _box(self, y0: float, y1: float, x0: float, x1: float):
        ya, yb = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.h)
        xa, xb = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.w)
        if ya >= yb or xa >= xb:
            return None
        yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32) + 0.5
        return (slice(ya, yb), slice(xa, xb)), yy, xx

    def fill(self, where, mask: np.ndarray, temp: float, cls: Optional[int], grain: float = 0.02) -> None:
        """Set ``temp`` (plus Gaussian grain) and class ``cls`` (None keeps the label) where ``mask``."""
        region = self.temp[where]
        region[mask] = temp + self.rng.normal(0.0, grain, int(mask.sum())).astype(np.float32)
        if cls is not None:
            self.label[where][mask] = cls

    def ellipse(self, cy: float, cx: float, ry: float, rx: float, temp: float, cls: Optional[int]) -> None:
        box = self._box(cy - ry, cy + ry, cx - rx, cx + rx)
        if box:
            where, yy, xx = box
            self.fill(where, ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0, temp, cls)

    def rect(self, y0: float, y1: float, x0: float, x1: float, temp: float, cls: Optional[int]) -> None:
        box = self._box(y0, y1, x0, x1)
        if box:
            where, yy, _ = box
            self.fill(where, np.ones(yy.shape, bool), temp, cls)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Return low-frequency noise float32 ``[height, width]`` in about [-1, 1]."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))


def _draw_background(c: _Canvas, horizon: float) -> Tuple[float, float, float]:
    """Sky, ground and road; returns the road's (vanishing x, bottom centre x, bottom half-width)."""
    rng, h, w = c.rng, c.h, c.w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    clouds = _smooth_noise(rng, h, w, 4)
    sky = yy < horizon
    c.temp[:] = np.where(sky, 0.06 + 0.14 * yy / horizon + 0.05 * clouds,
                         0.36 + 0.08 * _smooth_noise(rng, h, w, 6))
    c.label[:] = np.where(sky, SKY, BACKGROUND)
    vx = w * rng.uniform(0.35, 0.65)
    bx = vx + w * rng.uniform(-0.2, 0.2)
    half = w * rng.uniform(0.3, 0.6)
    t = np.clip((yy - horizon) / (h - horizon), 0, 1)
    centre = vx + (bx - vx) * t
    road = (yy >= horizon) & (np.abs(xx - centre) < half * t)
    c.fill((slice(None), slice(None)), road, rng.uniform(0.5, 0.6), ROAD, grain=0.015)
    depth = 1.0 / np.maximum(t, 0.02)
    lane = road & (np.abs(xx - centre) < 0.008 * w * t + 0.5) & (np.sin(depth * 3.0) > 0)
    c.temp[lane] -= 0.12
    return vx, bx, half


def _draw_building(c: _Canvas, horizon: float) -> None:
    rng = c.rng
    bw = c.w * rng.uniform(0.1, 0.3)
    x0 = rng.uniform(-0.1, 1.0) * c.w
    top = horizon - c.h * rng.uniform(0.1, 0.35)
    base = horizon + c.h * 0.02
    c.rect(top, base, x0, x0 + bw, rng.uniform(0.35, 0.5), BUILDING)
    win = max(bw / 10, 2.0)
    for wy in np.arange(top + win, base - 2 * win, 2 * win):
        for wx in np.arange(x0 + win, x0 + bw - win, 2 * win):
            c.rect(wy, wy + win, wx, wx + win * 0.9, rng.choice([0.3, 0.55, 0.62]), None)


def _draw_tree(c: _Canvas, foot_y: float, x: float, scale: float) -> None:
    rng = c.rng
    height = c.h * 0.5 * scale
    c.rect(foot_y - 0.4 * height, foot_y, x - 0.04 * height, x + 0.04 * height, 0.42, TREE)
    for _ in range(int(rng.integers(3, 6))):
        cy, cx = foot_y - height * rng.uniform(0.55, 0.8), x + height * rng.uniform(-0.2, 0.2)
        ry, rx = height * rng.uniform(0.15, 0.25), height * rng.uniform(0.15, 0.3)
        c.ellipse(cy, cx, ry, rx, rng.uniform(0.2, 0.28), TREE)


def _draw_car(c: _Canvas, foot_y: float, x: float, scale: float) -> None:
    rng = c.rng
    width = c.w * 0.28 * scale
    height = 0.55 * width
    body = rng.uniform(0.55, 0.68)
    c.rect(foot_y - 0.6 * height, foot_y - 0.12 * height, x - width / 2, x + width / 2, body, CAR)
    c.rect(foot_y - height, foot_y - 0.58 * height, x - 0.32 * width, x + 0.32 * width, body - 0.05, CAR)
    c.rect(foot_y - 0.92 * height, foot_y - 0.62 * height, x - 0.27 * width, x + 0.27 * width, 0.3, None)
    c.rect(foot_y - 0.3 * height, foot_y - 0.15 * height, x - 0.45 * width, x + 0.45 * width, 0.8, None)
    for side in (-0.32, 0.32):
        c.ellipse(foot_y - 0.14 * height, x + side * width, 0.14 * height, 0.1 * width, 0.85, CAR)


def _draw_person(c: _Canvas, foot_y: float, x: float, scale: float) -> None:
    rng = c.rng
    height = c.h * 0.4 * scale
    cloth, skin = rng.uniform(0.7, 0.8), rng.uniform(0.88, 0.97)
    leg_w = 0.07 * height
    for side in (-1, 1):
        leg_x = x + side * leg_w * 0.6
        c.rect(foot_y - 0.48 * height, foot_y, leg_x - leg_w / 2, leg_x + leg_w / 2, cloth - 0.05, PERSON)
    c.ellipse(foot_y - 0.66 * height, x, 0.2 * height, 0.12 * height, cloth, PERSON)
    for side in (-1, 1):
        c.rect(foot_y - 0.82 * height, foot_y - 0.5 * height, x + side * 0.15 * height - 0.03 * height,
               x + side * 0.15 * height + 0.03 * height, cloth, PERSON)
    c.ellipse(foot_y - 0.91 * height, x, 0.08 * height, 0.065 * height, skin, PERSON)


def _apply_camera(temp: np.ndarray, rng: np.random.Generator, sensor: np.random.Generator) -> np.ndarray:
    """Return the temperature image as the sensor sees it (blur, vignetting, stripes, noise, AGC)."""
    h, w = temp.shape
    padded = np.pad(temp, 1, mode="edge")
    blurred = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    blurred = (blurred[:, :-2] + 2 * blurred[:, 1:-1] + blurred[:, 2:]) / 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
    out = blurred * (1 - 0.12 * r2)
    out += sensor.normal(0, 0.012, (1, w)).astype(np.float32)  # fixed-pattern column stripes
    out += rng.normal(0, 0.004, (h, 1)).astype(np.float32)
    out += rng.normal(0, 0.01, (h, w)).astype(np.float32)
    return out * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)


def _ignore_edges(label: np.ndarray) -> np.ndarray:
    """Return ``label`` with 255 on the pixels of person/car regions that touch another class."""
    thing = np.isin(label, (PERSON, CAR))
    edge = np.zeros_like(thing)
    edge[1:] |= label[1:] != label[:-1]
    edge[:-1] |= label[:-1] != label[1:]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    out = label.copy()
    out[edge & thing] = IGNORE_INDEX
    return out


def render_scene(seed: int, index: int, height: int, width: int, name: str = "synth"
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Render scene ``index`` of set ``name``.

    Returns ``(temperature, label)``: float32 ``[height, width]`` roughly in [0, 1], and uint8
    ``[height, width]`` SODA class ids with 255 on person/car borders.
    """
    key = zlib.crc32(name.encode())
    rng = np.random.default_rng([seed, key, index])
    sensor = np.random.default_rng([seed, key])
    c = _Canvas(height, width, rng)
    horizon = height * rng.uniform(0.3, 0.5)
    vx, bx, half = _draw_background(c, horizon)
    for _ in range(int(rng.integers(0, 4))):
        _draw_building(c, horizon)
    things = []
    for _ in range(int(rng.integers(1, 5))):
        t = rng.uniform(0.05, 1.0)
        side = rng.choice([-1, 1])
        x = vx + (bx - vx) * t + side * (half * t + width * rng.uniform(0.02, 0.2) * t)
        things.append((horizon + t * (height - horizon), "tree", x, t))
    for _ in range(int(rng.integers(0, 3))):
        t = rng.uniform(0.15, 1.0)
        x = vx + (bx - vx) * t + rng.uniform(-0.6, 0.6) * half * t
        things.append((horizon + t * (height - horizon), "car", x, t))
    for _ in range(int(rng.integers(1, 5))):
        t = rng.uniform(0.1, 1.0)
        x = vx + (bx - vx) * t + rng.uniform(-1.3, 1.3) * half * t
        things.append((horizon + t * (height - horizon), "person", x, t))
    draw = {"tree": _draw_tree, "car": _draw_car, "person": _draw_person}
    for foot_y, kind, x, t in sorted(things, key=lambda thing: thing[0]):  # far to near
        draw[kind](c, foot_y, x, t)
    return _apply_camera(c.temp, rng, sensor), _ignore_edges(c.label)


def to_uint8(temp: np.ndarray) -> np.ndarray:
    """Return ``temp`` (about [0, 1]) as uint8 ``[H, W]``."""
    return np.clip(np.rint(temp * 255), 0, 255).astype(np.uint8)


def to_raw16(temp: np.ndarray) -> np.ndarray:
    """Return ``temp`` as uint16 raw counts ``[H, W]`` (a 14-bit-like range around 7000-13000)."""
    return np.clip(np.rint(7000 + temp * 6000), 0, 65535).astype(np.uint16)


# ------------------------------------------------------------------------------------- writing
def parse_size(text: str) -> Tuple[int, int]:
    """Parse ``"WxH"`` into ``(width, height)``, checked by :func:`check_size`."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DataError(f"size '{text}': expected WIDTHxHEIGHT, e.g. 640x512") from None
    if w < 16 or h < 16:
        raise DataError(f"size '{text}': width and height must be at least 16")
    return check_size((w, h))


def check_size(size: Tuple[int, int], option: str = "--size") -> Tuple[int, int]:
    """``size`` if an image of it can be rendered in the memory available and read back by unip (at most
    PIL's ``MAX_IMAGE_PIXELS``); raises ``ConfigError`` naming ``option`` otherwise."""
    width, height = size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ConfigError(f"{option} {width}x{height}: {width * height:,} pixels, more than the {limit:,} an image "
                          "may have to be read back (PIL's decompression-bomb limit); choose a smaller size")
    require_memory(width * height * BYTES_PER_PIXEL, f"{option} {width}x{height}", "choose a smaller size")
    return width, height


def _check_counts(num: int, seed: int) -> None:
    if num < 1:
        raise DataError(f"--num {num}: write at least one image")
    if seed < 0:
        raise DataError(f"--seed {seed}: seeds are non-negative integers")


def _save(pixels: np.ndarray, path: str) -> None:
    """Write ``pixels`` as a JPEG or PNG (by the suffix of ``path``), marked as unip's."""
    if path.lower().endswith((".jpg", ".jpeg")):
        save_jpeg(pixels, path)
    else:
        save_png(pixels, path)


def _is_our_image(path: str) -> bool:
    """True for an image :func:`_save` wrote (a marked JPEG or PNG)."""
    return is_our_jpeg(path) if path.lower().endswith((".jpg", ".jpeg")) else is_our_png(path)


def _remove_stale(folder: str, ours: "re.Pattern[str]", wanted: set) -> None:
    """Delete the files of an earlier, larger or other-depth set (all unip's: the folder was claimed)."""
    for stale in sorted(set(os.listdir(folder)) - wanted):
        if ours.match(stale):
            os.remove(os.path.join(folder, stale))


def write_unlabeled(root: str, num: int, name: str = "synth", size: Tuple[int, int] = (640, 512),
                    seed: int = 0, bit_depth: int = 8) -> List[str]:
    """Write ``num`` scenes to ``root/<name>/thermal/`` (JPEG, or 16-bit PNG if ``bit_depth == 16``).

    Returns the written paths in index order.
    """
    if bit_depth not in (8, 16):
        raise DataError(f"bit depth {bit_depth}: must be 8 or 16")
    _check_counts(num, seed)
    width, height = check_size(size)
    folder = os.path.join(out_folder(root), plain_name(name, "--name"), THERMAL_DIR)
    ours = re.compile(rf"^{re.escape(name)}_\d{{6}}\.(jpg|png)$")
    remove_temporaries(folder, ours.match)  # a killed run's: they would make the folder look foreign
    claim_folder(folder, ours, is_ours=_is_our_image)
    os.makedirs(folder, exist_ok=True)
    suffix = ".jpg" if bit_depth == 8 else ".png"
    _remove_stale(folder, ours, {f"{name}_{i:06d}{suffix}" for i in range(num)})
    paths = []
    for i in tqdm(range(num), desc=f"synth {name}", unit="img", disable=None):
        temp, _ = render_scene(seed, i, height, width, name)
        path = os.path.join(folder, f"{name}_{i:06d}{suffix}")
        _save(to_uint8(temp) if bit_depth == 8 else to_raw16(temp), path)
        paths.append(path)
    return paths


@dataclass
class LabeledSet:
    """What :func:`write_soda` wrote: the root, the ids of each split and the classes drawn (id → name)."""

    root: str
    splits: Dict[str, List[str]]
    classes: Dict[int, str]


def write_soda_sample(root: str, image_id: str, image: np.ndarray, label: np.ndarray) -> None:
    """Write one image/label pair into the SODA layout under ``root`` (JPEG image, PNG label ids)."""
    _save(image, os.path.join(root, SODA_IMAGE_DIR, f"{image_id}.jpg"))
    _save(label, os.path.join(root, SODA_LABEL_DIR, f"{image_id}.png"))


def _is_our_split_file(root: str, path: str) -> bool:
    """True for a split file of an earlier :func:`write_soda` into ``root``: one numeric id per line, each the
    id of a JPEG unip wrote in ``root/JPEGImages``, or of a removed one while unip's set is still there (an empty
    file holds nothing to lose)."""
    with open(path, "r", encoding="utf-8") as fh:
        ids = [line.strip() for line in fh if line.strip()]
    if not all(re.fullmatch(r"\d{5,}", i) for i in ids):
        return False
    folder = os.path.join(root, SODA_IMAGE_DIR)
    present = [path for path in (os.path.join(folder, f"{i}.jpg") for i in ids) if os.path.lexists(path)]
    # ids without their image: a rerun interrupted after removing a larger set's surplus; the set must still be
    # there (its images were all claimed as unip's before the split files are looked at)
    set_left = os.path.isdir(folder) and any(_is_our_image(os.path.join(folder, n)) for n in os.listdir(folder))
    return not ids or (set_left and all(_is_our_image(path) for path in present))


def write_split_files(root: str, splits: Dict[str, Sequence[str]]) -> None:
    """Write SODA's split files (one image id per line) for the given ``{"train": ids, "test": ids}``."""
    for split, ids in splits.items():
        with open(os.path.join(root, SODA_SPLITS[split]), "w", encoding="utf-8") as fh:
            fh.write("".join(f"{i}\n" for i in ids))


def write_soda(root: str, num_train: int, num_test: int, size: Tuple[int, int] = (640, 512),
               seed: int = 0, name: str = "soda-synth") -> LabeledSet:
    """Write a labeled set in SODA's layout: ``JPEGImages/``, ``SegmentationClassPNG/``, split files.

    Returns a :class:`LabeledSet`; labels use SODA ids (see :data:`SYNTH_CLASSES`), 255 = ignore. Both splits
    need an image (a SODA set with an empty split file is refused by its readers). ``root`` may be new or an
    earlier output of this function; any file of the layout that unip did not write raises ``ConfigError``.
    """
    if num_train < 1 or num_test < 1:
        raise DataError(f"{root}: a labeled set needs at least one training and one test image (got train "
                        f"{num_train}, test {num_test}); raise --num to 2 or more, or set --num-test between 1 "
                        "and --num minus 1")
    _check_counts(num_train + num_test, seed)
    width, height = check_size(size)
    out_folder(root)
    suffixes = {SODA_IMAGE_DIR: ".jpg", SODA_LABEL_DIR: ".png"}
    ours = {sub: re.compile(rf"^\d{{5,}}{re.escape(suffix)}$") for sub, suffix in suffixes.items()}
    for sub, pattern in ours.items():
        remove_temporaries(os.path.join(root, sub), pattern.match)  # a killed run's
        claim_folder(os.path.join(root, sub), pattern, is_ours=_is_our_image)
    claim([os.path.join(root, name) for name in SODA_SPLITS.values()], partial(_is_our_split_file, root))
    ids = [f"{i:05d}" for i in range(num_train + num_test)]
    for sub, suffix in suffixes.items():
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        _remove_stale(os.path.join(root, sub), ours[sub], {i + suffix for i in ids})
    for i in tqdm(range(len(ids)), desc="synth labeled", unit="img", disable=None):
        temp, label = render_scene(seed, i, height, width, name)
        write_soda_sample(root, ids[i], to_uint8(temp), label)
    splits = {"train": ids[:num_train], "test": ids[num_train:]}
    write_split_files(root, splits)
    return LabeledSet(root, splits, dict(SYNTH_CLASSES))
