"""Synthetic thermal scenes: determinism, plausibility, and the on-disk layouts they are written in."""

import os

import numpy as np
import pytest
from PIL import Image

from unip.data.layouts import IGNORE_INDEX
from unip.data.synth import (CAR, PERSON, SKY, SYNTH_CLASSES, parse_size, render_scene, to_uint8, write_soda,
                             write_unlabeled)
from unip.errors import ConfigError, DataError


def test_scenes_are_deterministic_by_seed_name_and_index():
    a_img, a_lab = render_scene(7, 3, 64, 80)
    b_img, b_lab = render_scene(7, 3, 64, 80)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(render_scene(7, 4, 64, 80)[0], a_img)
    assert not np.array_equal(render_scene(8, 3, 64, 80)[0], a_img)
    assert not np.array_equal(render_scene(7, 3, 64, 80, name="other")[0], a_img)
    assert a_img.shape == a_lab.shape == (64, 80) and a_img.dtype == np.float32 and a_lab.dtype == np.uint8


def test_scenes_look_thermal_people_and_cars_hot_sky_cold():
    hot, cold = [], []
    for i in range(12):
        temp, label = render_scene(0, i, 96, 128)
        assert set(np.unique(label)) <= set(SYNTH_CLASSES) | {IGNORE_INDEX}
        assert (label == SKY).any() and (label == PERSON).any()
        hot.append(temp[np.isin(label, (PERSON, CAR))].mean())
        cold.append(temp[label == SKY].mean())
    assert min(hot) > max(cold) + 0.3


def test_unlabeled_layout_and_index_independent_of_count(tmp_path):
    few = write_unlabeled(str(tmp_path / "a"), 2, name="cam", size=(48, 32), seed=1)
    more = write_unlabeled(str(tmp_path / "b"), 3, name="cam", size=(48, 32), seed=1)
    assert [os.path.relpath(p, tmp_path / "a") for p in few] == ["cam/thermal/cam_000000.jpg",
                                                                   "cam/thermal/cam_000001.jpg"]
    assert open(few[1], "rb").read() == open(more[1], "rb").read()
    with Image.open(few[0]) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "L", (48, 32))
    raw = write_unlabeled(str(tmp_path), 1, name="raw", size=(48, 32), seed=1, bit_depth=16)
    with Image.open(raw[0]) as img:
        assert img.mode.startswith("I;16") and np.asarray(img).max() > 255


def test_soda_layout_images_labels_and_splits(tmp_path):
    labeled = write_soda(str(tmp_path), 3, 2, size=(48, 32), seed=2)
    assert labeled.splits == {"train": ["00000", "00001", "00002"], "test": ["00003", "00004"]}
    assert (tmp_path / "train_infrared.txt").read_text().split() == labeled.splits["train"]
    assert (tmp_path / "test_infrared.txt").read_text().split() == labeled.splits["test"]
    assert labeled.classes[10] == "car" and labeled.classes[18] == "sky"
    for image_id in labeled.splits["train"] + labeled.splits["test"]:
        with Image.open(tmp_path / "JPEGImages" / f"{image_id}.jpg") as img:
            assert img.size == (48, 32)
        with Image.open(tmp_path / "SegmentationClassPNG" / f"{image_id}.png") as lab:
            assert lab.mode == "L" and lab.size == (48, 32)
            assert set(np.unique(np.asarray(lab))) <= set(SYNTH_CLASSES) | {IGNORE_INDEX}
    temp, label = render_scene(2, 4, 32, 48, name="soda-synth")
    with Image.open(tmp_path / "SegmentationClassPNG" / "00004.png") as lab:
        assert np.array_equal(np.asarray(lab), label)
    assert to_uint8(temp).shape == (32, 48)


def test_parse_size_and_bad_arguments(tmp_path):
    assert parse_size("640x512") == (640, 512)
    for bad in ("640", "ax3", "8x8"):
        with pytest.raises(DataError):
            parse_size(bad)
    with pytest.raises(DataError):
        write_unlabeled(str(tmp_path), 1, bit_depth=12)


def test_a_rerun_leaves_only_the_new_set(tmp_path):
    """A smaller or other-depth rerun into the same folder removes the earlier frames (all unip's), so a scan
    never mixes two sets."""
    from unip.data.synth import write_unlabeled

    write_unlabeled(str(tmp_path), 5, name="s", size=(32, 32), seed=0)
    write_unlabeled(str(tmp_path), 2, name="s", size=(32, 32), seed=7)
    assert sorted(os.listdir(tmp_path / "s" / "thermal")) == ["s_000000.jpg", "s_000001.jpg"]
    write_unlabeled(str(tmp_path), 1, name="s", size=(32, 32), seed=7, bit_depth=16)
    assert sorted(os.listdir(tmp_path / "s" / "thermal")) == ["s_000000.png"]


def _snapshot(root) -> dict:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_real_soda_set_in_out_is_refused_and_left_as_it_was(tmp_path):
    """SODA names its files like the generator does (JPEGImages/00000.jpg): only content marks tell them apart."""
    real = tmp_path / "real"
    (real / "JPEGImages").mkdir(parents=True)
    (real / "SegmentationClassPNG").mkdir()
    Image.fromarray(np.full((32, 48), 90, np.uint8)).save(real / "JPEGImages" / "00000.jpg")
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(real / "SegmentationClassPNG" / "00000.png")
    (real / "train_infrared.txt").write_text("00000\n")
    before = _snapshot(real)
    with pytest.raises(ConfigError, match="JPEGImages: holds files unip did not write .*00000.jpg.*nothing was"):
        write_soda(str(real), 3, 1, size=(48, 32))
    (real / "JPEGImages" / "00000.jpg").unlink()  # a label folder alone, or a split file alone, is refused too
    del before[str(real / "JPEGImages" / "00000.jpg")]
    with pytest.raises(ConfigError, match="SegmentationClassPNG: holds files unip did not write"):
        write_soda(str(real), 3, 1, size=(48, 32))
    (real / "SegmentationClassPNG" / "00000.png").unlink()
    del before[str(real / "SegmentationClassPNG" / "00000.png")]
    with pytest.raises(ConfigError, match="train_infrared.txt: exists and was not written by unip"):
        write_soda(str(real), 3, 1, size=(48, 32))
    assert _snapshot(real) == before


def test_a_labeled_rerun_replaces_its_own_set_only(tmp_path):
    write_soda(str(tmp_path), 3, 2, size=(48, 32), seed=0)
    labeled = write_soda(str(tmp_path), 1, 1, size=(48, 32), seed=1)
    assert labeled.splits == {"train": ["00000"], "test": ["00001"]}
    assert sorted(os.listdir(tmp_path / "JPEGImages")) == ["00000.jpg", "00001.jpg"]
    assert sorted(os.listdir(tmp_path / "SegmentationClassPNG")) == ["00000.png", "00001.png"]
    with Image.open(tmp_path / "SegmentationClassPNG" / "00001.png") as lab:
        assert np.array_equal(np.asarray(lab), render_scene(1, 1, 32, 48, name="soda-synth")[1])


def test_a_rerun_after_a_killed_or_interrupted_run_goes_through(tmp_path):
    """A hard kill leaves an atomic write's temporary file; an interrupted smaller rerun leaves split files listing
    images it had already removed. Neither makes unip's own folder look foreign."""
    write_soda(str(tmp_path), 6, 2, size=(48, 32), seed=0)
    for i in (5, 6, 7):  # what a Ctrl-C of a --num 4 rerun leaves: surplus removed, old split files kept
        os.remove(tmp_path / "JPEGImages" / f"0000{i}.jpg")
        os.remove(tmp_path / "SegmentationClassPNG" / f"0000{i}.png")
    (tmp_path / "SegmentationClassPNG" / ".00001.png.tmp-999").write_bytes(b"half a png")
    assert write_soda(str(tmp_path), 3, 1, size=(48, 32), seed=0).splits["test"] == ["00003"]
    assert sorted(os.listdir(tmp_path / "SegmentationClassPNG")) == [f"0000{i}.png" for i in range(4)]
    thermal = tmp_path / "u" / "synth" / "thermal"
    write_unlabeled(str(tmp_path / "u"), 2, size=(32, 32))
    (thermal / ".synth_000001.jpg.tmp-999").write_bytes(b"half a jpeg")
    write_unlabeled(str(tmp_path / "u"), 2, size=(32, 32))
    assert sorted(os.listdir(thermal)) == ["synth_000000.jpg", "synth_000001.jpg"]


def test_unlabeled_frames_named_like_ours_but_not_ours_are_refused(tmp_path):
    folder = tmp_path / "synth" / "thermal"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(folder / "synth_000000.jpg")
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match="synth_000000.jpg.*without unip's mark: if an earlier unip version"):
        write_unlabeled(str(tmp_path), 2, size=(32, 32))
    assert _snapshot(tmp_path) == before


def test_a_labeled_set_needs_a_test_image(tmp_path):
    with pytest.raises(DataError, match="one training and one test image"):
        write_soda(str(tmp_path), 3, 0, size=(48, 32))
    assert not os.listdir(tmp_path)
