"""Segmentation data: layouts, bad input, the whole-set check, the recipe's transforms, preparation, CLI."""

import colorsys
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from unip.cli import main
from unip.data.images import stretch_to_uint8
from unip.data.layouts import (MFNET_CLASSES, MFNET_PALETTE, SCUT_CLASSES, SCUT_PALETTE, SCUT_RAW_IDS, SODA_CLASSES,
                               voc_palette)
from unip.data.seg_check import check_segmentation
from unip.data.seg_prepare import scut_lookup
from unip.data.seg_transforms import (CatMaxRatioCrop, KeepRatioResize, PadToSize, PhotoMetricDistortion,
                                      SegmentationTransform, crop_is_acceptable, hsv_to_rgb_u8, normalize_steps,
                                      rescale_size, rgb_to_hsv_u8, seg_test_transform, seg_train_transform)
from unip.data.datasets import check_structure, detect_dataset, open_segmentation_dataset, prepare_dataset
from unip.data.synth import write_soda
from unip.engine.data import SeededDataset
from unip.errors import DataError


# ------------------------------------------------------------------------------------- helpers
def _save(path, pixels, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, **kw)


def _lines(path, names):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("".join(f"{n}\n" for n in names))


def _gray_pair(seed, shape=(24, 32), classes=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, classes, shape, dtype=np.uint8)


def _folder_set(root, names=("a", "b", "c"), classes=("bg", "road", "car"), palette=None, splits=None):
    """A clean folder data set: gray PNG images, PNG labels, train = all, val = test = the last one."""
    for i, name in enumerate(names):
        image, label = _gray_pair(i, classes=len(classes))
        _save(f"{root}/images/{name}.png", image)
        _save(f"{root}/labels/{name}.png", label)
    _lines(f"{root}/train.txt", names)
    _lines(f"{root}/val.txt", names[-1:])
    _lines(f"{root}/test.txt", names[-1:])
    meta = {"classes": list(classes)}
    if palette is not None:
        meta["palette"] = palette
    if splits is not None:
        meta["splits"] = splits
    with open(f"{root}/classes.yaml", "w") as fh:
        json.dump(meta, fh)  # JSON is valid YAML
    return root


# ------------------------------------------------------------------------------------- layouts
def test_soda_reader_reads_synth_labeled_output(tmp_path):
    root = str(tmp_path / "soda")
    labeled = write_soda(root, 3, 2, size=(48, 32), seed=1)
    assert detect_dataset(root) == "soda"
    train = open_segmentation_dataset(root, "auto", "train")
    val, test = open_segmentation_dataset(root, "soda", "val"), open_segmentation_dataset(root, "soda", "test")
    assert [s.name for s in train.samples] == labeled.splits["train"]
    assert [s.name for s in val.samples] == [s.name for s in test.samples] == labeled.splits["test"]
    assert train.classes == SODA_CLASSES and train.num_classes == 21 and train.ignore_index == 255
    assert train.palette == voc_palette(21) and train.palette[1] == (128, 0, 0) and train.layout == "soda"
    item = train[1]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 48)
    assert item["label"].dtype == torch.uint8 and item["label"].shape == (32, 48)
    jpg = np.asarray(Image.open(f"{root}/JPEGImages/00001.jpg"))
    assert all(np.array_equal(item["image"][c].numpy(), jpg) for c in range(3))
    assert np.array_equal(item["label"].numpy(), np.asarray(Image.open(f"{root}/SegmentationClassPNG/00001.png")))
    assert item["name"] == "00001" and item["index"] == 1 and item["path"].endswith("00001.jpg")
    # the release's data_root is SODA/InfraredSemanticLabel: the parent folder works too
    os.makedirs(tmp_path / "SODA")
    os.rename(root, tmp_path / "SODA" / "InfraredSemanticLabel")
    assert len(open_segmentation_dataset(str(tmp_path / "SODA"), "auto", "train")) == 3


def test_mfnet_and_scut_layouts_map_splits_like_the_release(tmp_path):
    mfnet = tmp_path / "mfnet"
    for name in ("00001D", "00002N", "00003D"):
        image, label = _gray_pair(len(name), classes=9)
        _save(f"{mfnet}/thermal_imgs/{name}.png", image)
        _save(f"{mfnet}/labels/{name}.png", label)
    _lines(f"{mfnet}/train.txt", ["00001D"])
    _lines(f"{mfnet}/val_test.txt", ["00002N", "00003D"])
    _lines(f"{mfnet}/test.txt", ["00003D"])
    assert detect_dataset(str(mfnet)) == "mfnet"
    val = open_segmentation_dataset(str(mfnet), "auto", "val")
    assert [s.name for s in val.samples] == ["00002N", "00003D"]
    assert [s.name for s in open_segmentation_dataset(str(mfnet), "mfnet", "test").samples] == ["00003D"]
    assert val.classes == MFNET_CLASSES and val.palette == MFNET_PALETTE and val.num_classes == 9

    scut = tmp_path / "scut"
    for name in ("x1", "x2"):
        image, label = _gray_pair(len(name), classes=10)
        _save(f"{scut}/images/{name}.jpg", image, quality=95)
        _save(f"{scut}/labels/{name}.png", label)
    _lines(f"{scut}/train.txt", ["x1"])
    _lines(f"{scut}/val.txt", ["x2.jpg"])  # an image suffix in a split file is dropped
    assert detect_dataset(str(scut)) == "scut"
    test = open_segmentation_dataset(str(scut), "auto", "test")
    assert [s.name for s in test.samples] == ["x2"] and test.classes == SCUT_CLASSES
    assert test.palette == SCUT_PALETTE and test.palette[2] == (220, 20, 60) and test[0]["image"].shape == (3, 24, 32)


def test_folder_layout_reads_rgb_16bit_and_its_classes_yaml(tmp_path):
    root = tmp_path / "rgbd"
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    depth = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 90 + 1000)
    _save(f"{root}/images/rgb.png", rgb)
    _save(f"{root}/images/depth.png", depth)
    for name in ("rgb", "depth"):
        _save(f"{root}/labels/{name}.png", np.full((20, 30), 1, np.uint8))
    _lines(f"{root}/train.txt", ["rgb", "depth"])
    _lines(f"{root}/val.txt", ["depth"])
    with open(f"{root}/classes.yaml", "w") as fh:
        fh.write("classes: [wall, floor]\npalette: [[1, 2, 3], [4, 5, 6]]\n"
                 "splits: {val: val.txt, test: val.txt}\n")
    ds = open_segmentation_dataset(str(root), "auto", "train")
    assert ds.layout == "folder" and ds.classes == ("wall", "floor") and ds.palette == ((1, 2, 3), (4, 5, 6))
    luma = np.asarray(Image.fromarray(rgb).convert("L"))  # colour images are read as their luma (docs/thermal.md)
    assert all(np.array_equal(ds[0]["image"][c].numpy(), luma) for c in range(3))
    stretched = stretch_to_uint8(depth)
    assert all(np.array_equal(ds[1]["image"][c].numpy(), stretched) for c in range(3))
    assert [s.name for s in open_segmentation_dataset(str(root), "folder", "test").samples] == ["depth"]
    # without a palette: the deterministic VOC colour map
    plain = _folder_set(str(tmp_path / "plain"))
    assert open_segmentation_dataset(plain, "folder").palette == voc_palette(3)
    with open(f"{plain}/classes.yaml", "w") as fh:
        fh.write("classes: [a, b]\npalette: [[0, 0, 0]]\n")
    with pytest.raises(DataError, match="classes.yaml.*palette"):
        open_segmentation_dataset(plain, "folder")


# ------------------------------------------------------------------------------------- bad input
def _break(root, case):
    if case == "missing-split":
        os.remove(f"{root}/train.txt")
        return f"{root}/train.txt"
    if case == "missing-image":
        os.remove(f"{root}/images/a.png")
        return f"{root}/images/a.*"
    if case == "size":
        _save(f"{root}/labels/a.png", np.zeros((10, 10), np.uint8))
        return f"{root}/labels/a.png"
    if case == "value":
        label = np.zeros((24, 32), np.uint8)
        label[3, 3] = 7
        _save(f"{root}/labels/a.png", label)
        return f"{root}/labels/a.png"
    if case == "unreadable":
        with open(f"{root}/images/a.png", "wb") as fh:
            fh.write(b"\x89PNG\r\n\x1a\n garbage")
        return f"{root}/images/a.png"
    if case == "colour-label":
        _save(f"{root}/labels/a.png", np.random.default_rng(0).integers(0, 3, (24, 32, 3), dtype=np.uint8))
        return f"{root}/labels/a.png"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing-split", "missing-image", "size", "value", "unreadable", "colour-label"])
def test_bad_input_raises_data_error_naming_the_file(tmp_path, case):
    root = _folder_set(str(tmp_path / "set"))
    culprit = _break(root, case)
    with pytest.raises(DataError) as err:
        open_segmentation_dataset(root, "folder", "train")[0]
    assert culprit in str(err.value) and "\n" not in str(err.value)
    if case == "value":
        assert "7" in str(err.value) and "0..2" in str(err.value)
    if case != "missing-split" and case != "missing-image":  # read errors: removing the file alone would not do
        assert f"drop 'a' from {root}/train.txt" in str(err.value) and "remove the file" not in str(err.value)


def test_the_check_seg_command_advised_reads_the_layout_that_was_asked_for(tmp_path, capsys):
    """A SODA set opened as MFNet lacks its folders; the command the error advises must read it as MFNet too (plain
    `unip data check-seg ROOT` would detect SODA and find nothing wrong)."""
    root = str(tmp_path / "my set")
    write_soda(root, 3, 2, size=(32, 24), seed=0)
    with pytest.raises(DataError) as err:
        open_segmentation_dataset(root, "mfnet", "train")
    assert f"`unip data check-seg '{root}' --dataset mfnet`" in str(err.value)
    with pytest.raises(DataError) as err:
        check_structure(root, "mfnet", ["train"])
    assert f"`unip data check-seg '{root}' --dataset mfnet`" in str(err.value)
    os.remove(f"{root}/JPEGImages/00000.jpg")
    os.remove(f"{root}/JPEGImages/00001.jpg")
    with pytest.raises(DataError) as err:
        open_segmentation_dataset(root, "auto", "train")
    assert f"`unip data check-seg '{root}'`" in str(err.value)
    assert main(["data", "check-seg", root, "--dataset", "mfnet"]) == 2  # what the advised command finds
    assert "thermal_imgs" in capsys.readouterr().out


def test_unknown_layout_and_raw_downloads_are_refused_with_a_hint(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_segmentation_dataset(str(tmp_path / "nothing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="not a known segmentation layout"):
        open_segmentation_dataset(str(tmp_path / "empty"))
    raw = _fake_mfnet_download(tmp_path / "raw")
    with pytest.raises(DataError, match="prepare mfnet"):
        open_segmentation_dataset(raw, "auto")
    with pytest.raises(DataError, match="prepare mfnet"):
        open_segmentation_dataset(raw, "mfnet")
    with pytest.raises(DataError, match="must be one of"):
        open_segmentation_dataset(raw, "cityscapes")


def test_check_structure_looks_at_folders_and_split_files_only(tmp_path):
    """The quick look before a long job (unip sweep run): the layout resolves, its folders and split files are
    there; a missing image is not looked for (opening the split finds it)."""
    root = tmp_path / "soda"
    write_soda(str(root), 3, 2, size=(32, 24), seed=0)
    assert check_structure(str(root), "soda")[1].name == "soda" and check_structure(str(root))[1].name == "soda"
    first = (root / "train_infrared.txt").read_text().split()[0]
    next((root / "JPEGImages").glob(first + ".*")).unlink()
    check_structure(str(root), "soda")
    with pytest.raises(DataError, match="image listed in .* not found"):
        open_segmentation_dataset(str(root), "soda", "train")
    (root / "test_infrared.txt").unlink()
    with pytest.raises(DataError, match="test_infrared.txt: split file of 'val' not found \\(not a soda data set\\?"):
        check_structure(str(root), "soda")
    check_structure(str(root), "soda", ["train"])
    with pytest.raises(DataError, match="JPEGImages/JPEGImages: folder not found"):
        check_structure(str(tmp_path / "soda" / "JPEGImages"), "soda")
    with pytest.raises(DataError, match="data set folder not found"):
        check_structure(str(tmp_path / "nothing"), "soda")
    with pytest.raises(DataError, match="not a known segmentation layout"):
        check_structure(str(tmp_path / "soda" / "JPEGImages"))


def test_check_seg_lists_every_problem_at_once(tmp_path):
    root = _folder_set(str(tmp_path / "set"), names=("a", "b", "c", "d", "e"))
    expected = {"missing-image": _break(root, "missing-image"), "unreadable-image": f"{root}/images/b.png",
                "size-mismatch": f"{root}/labels/c.png", "bad-label-value": f"{root}/labels/d.png",
                "missing-split-file": f"{root}/test.txt"}
    with open(f"{root}/images/b.png", "wb") as fh:
        fh.write(b"")
    _save(f"{root}/labels/c.png", np.zeros((5, 5), np.uint8))
    _save(f"{root}/labels/d.png", np.full((24, 32), 9, np.uint8))
    os.remove(f"{root}/test.txt")
    report = check_segmentation(root, "folder")
    assert not report.ok
    assert {p.code: p.path for p in report.problems} == expected
    assert len(report.problems) == 5 and all(p.path in line for p, line in zip(report.problems, report.problem_lines()))


def test_check_seg_counts_pixels_per_class_of_a_clean_set(tmp_path):
    root = str(tmp_path / "soda")
    write_soda(root, 3, 2, size=(40, 32), seed=4)
    report = check_segmentation(root)
    assert report.ok and report.layout == "soda" and [s.split for s in report.splits] == ["train", "val", "test"]
    for summary in report.splits:
        ds = open_segmentation_dataset(root, "soda", summary.split)
        expected = sum(np.bincount(ds[i]["label"].numpy().ravel(), minlength=256) for i in range(len(ds)))
        assert np.array_equal(summary.pixels, expected) and summary.images == len(ds)
    text = report.summary()
    assert "person" in text and "(ignore)" in text and "train_infrared.txt" in text


# ------------------------------------------------------------------------------------- transforms
def test_rescale_size_is_mmcv_keep_ratio_rule():
    assert rescale_size(512, 640, (2048, 512)) == (512, 640)
    assert rescale_size(480, 640, (2048, 512)) == (512, 683)     # short side 512 (683 = 640·512/480 rounded)
    assert rescale_size(3000, 4000, (2048, 512)) == (512, 683)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)   # long side bound wins
    resize = KeepRatioResize((2048, 512), (0.5, 2.0))
    image = torch.zeros(3, 480, 640, dtype=torch.uint8)
    torch.manual_seed(0)
    ratios = []
    for _ in range(50):
        params = resize.make_params([image])
        ratio = params["ratio"]
        ratios.append(ratio)
        assert 0.5 <= ratio < 2.0 and params["scale"] == (int(2048 * ratio), int(512 * ratio))
        factor = min(max(params["scale"]) / 640, min(params["scale"]) / 480)
        assert params["size"] == (int(480 * factor + 0.5), int(640 * factor + 0.5))
    assert min(ratios) < 0.7 and max(ratios) > 1.8


def test_thin_images_keep_a_pixel_through_the_train_and_test_resize():
    """A 1 × 500 px image (legal: check-seg finds nothing wrong) shrunk by the toy scale (256, 64) × a ratio
    below 1 would round its height to 0 px; it keeps 1 px, and the crop and pad make the usual crop of it."""
    assert rescale_size(1, 500, (int(256 * 0.6), int(64 * 0.6))) == (1, 153)
    assert rescale_size(500, 1, (16, 16)) == (16, 1) and rescale_size(1, 1, (0, 0)) == (1, 1)
    image = torch.arange(500, dtype=torch.uint8).expand(3, 1, 500).clone()
    label = (torch.arange(500) >= 250).to(torch.uint8)[None]
    train = seg_train_transform(scale=(256, 64), ratio_range=(0.5, 0.9), crop_size=64)
    for seed in range(10):
        torch.manual_seed(seed)
        out = train({"image": image, "label": label})
        assert out["image"].shape == (3, 64, 64) and out["label"].shape == (64, 64)
        assert set(out["label"][1:].unique().tolist()) == {255}  # padding
        assert set(out["label"][0].unique().tolist()) <= {0, 1, 255}
    tested = seg_test_transform(scale=(64, 16))({"image": image, "label": label})
    assert tested["image"].shape == (3, 1, 64) and tested["label"].shape == (1, 500)


def _pattern(height=96, width=128):
    """Asymmetric blocks: label = block id (0..15), gray image = 10 + 15 · label; 255 in one corner."""
    yy, xx = np.mgrid[0:height, 0:width]
    label = (yy * 4 // height) * 4 + (xx * 4 // width)
    label[:8, :8] = 255
    image = np.where(label == 255, 0, 10 + 15 * label).astype(np.uint8)
    return {"image": torch.from_numpy(np.repeat(image[None], 3, 0)), "label": torch.from_numpy(label.astype(np.uint8))}


def _misaligned(image, label, radius=2, tol=1):
    """Pixels whose gray value is not their label's, among labelled pixels ``radius`` px inside their
    region (bilinear ramps at region borders aside); returns (misaligned, checked)."""
    lab = label.to(torch.float32)[None, None]
    window = 2 * radius + 1
    high = torch.nn.functional.max_pool2d(lab, window, stride=1, padding=radius)
    low = -torch.nn.functional.max_pool2d(-lab, window, stride=1, padding=radius)
    inner = ((high == low) & (lab != 255))[0, 0]
    values = image[0].to(torch.float32)[inner]
    return int(((values - (10 + 15 * label[inner].to(torch.float32))).abs() > tol).sum()), int(inner.sum())


def test_train_steps_keep_image_and_label_aligned_after_every_random_step():
    pipeline = seg_train_transform(crop_size=64, photometric=False, mean=0.0, std=1.0).steps
    for seed in range(12):
        torch.manual_seed(seed)
        sample = _pattern()
        data = {"image": tv_tensors.Image(sample["image"]), "label": tv_tensors.Mask(sample["label"])}
        for step in pipeline:
            data = step(data)
            if isinstance(step, KeepRatioResize):  # a bilinear ramp spans the upscale factor
                radius = int(np.ceil(data["label"].shape[0] / 96 / 2)) + 1
            bad, checked = _misaligned(data["image"], data["label"], radius)
            assert bad == 0 and checked > 200, (seed, step, bad, checked)
    # the check has teeth: flipping the label alone breaks it
    sample = _pattern()
    assert _misaligned(sample["image"], sample["label"].flip(-1))[0] > 1000


def test_photometric_distortion_moves_no_pixel_and_keeps_gray_gray():
    sample = _pattern()
    distort = PhotoMetricDistortion()
    label = sample["label"].numpy()
    for seed in range(20):
        torch.manual_seed(seed)
        out = distort({"image": tv_tensors.Image(sample["image"]), "label": tv_tensors.Mask(sample["label"])})
        image = out["image"].numpy()
        assert torch.equal(out["label"], sample["label"])
        assert (image[0] == image[1]).all() and (image[1] == image[2]).all()
        for value in np.unique(label):  # a pointwise map of the pixel value: each region stays flat
            assert np.unique(image[0][label == value]).size == 1


def test_transforms_never_invent_label_values():
    rng = np.random.default_rng(0)
    values = np.array([0, 3, 7, 255], np.uint8)
    label = torch.from_numpy(values[rng.integers(0, 4, (37, 53))])
    image = torch.from_numpy(rng.integers(0, 256, (3, 37, 53), dtype=np.uint8))
    transform = seg_train_transform(crop_size=48)
    for seed in range(30):
        torch.manual_seed(seed)
        out = transform({"image": image, "label": label})
        assert set(out["label"].unique().tolist()) <= {0, 3, 7, 255}
        assert out["label"].dtype == torch.int64 and out["image"].dtype == torch.float32
        assert out["image"].shape == (3, 48, 48) and out["label"].shape == (48, 48)


def test_crop_is_acceptable_follows_cat_max_ratio():
    def label(counts):
        return torch.cat([torch.full((n,), v, dtype=torch.uint8) for v, n in counts.items()]).reshape(1, -1)
    assert not crop_is_acceptable(label({1: 100}), 0.75)
    assert not crop_is_acceptable(label({1: 50, 255: 50}), 0.75)          # one label, ignore aside
    assert crop_is_acceptable(label({1: 74, 2: 26}), 0.75)
    assert not crop_is_acceptable(label({1: 75, 2: 25}), 0.75)            # strictly below the ratio
    assert not crop_is_acceptable(label({1: 60, 2: 20, 255: 20}), 0.75)   # 60 / 80 of labelled pixels


class _RecordingCrop(CatMaxRatioCrop):
    def random_box(self, height, width):
        box = super().random_box(height, width)
        self.drawn.append(box)
        return box


def test_crop_retries_until_acceptable_then_takes_the_next_draw_like_mmseg():
    # 16 x 80 label, class 1 in columns 70..79: only offsets 59..64 (of 65) give an acceptable 16 x 16 crop
    label = torch.zeros(16, 80, dtype=torch.uint8)
    label[:, 70:] = 1
    inputs = [tv_tensors.Image(torch.zeros(3, 16, 80, dtype=torch.uint8)), tv_tensors.Mask(label)]
    accepted = fallback = 0
    for seed in range(60):
        crop = _RecordingCrop(16, cat_max_ratio=0.75, max_tries=10)
        crop.drawn = []
        torch.manual_seed(seed)
        box = crop.make_params(inputs)["box"]
        ok = [crop_is_acceptable(label[t:t + h, s:s + w], 0.75) for t, s, h, w in crop.drawn]
        assert len(crop.drawn) <= 11
        if any(ok[:10]):
            assert box == crop.drawn[ok.index(True)] and len(crop.drawn) == ok.index(True) + 1
            accepted += 1
        else:
            assert len(crop.drawn) == 11 and box == crop.drawn[10]
            fallback += 1
    assert accepted > 10 and fallback > 5


def _constant(value, shape=(3, 4, 4)):
    return torch.full(shape, value, dtype=torch.uint8)


def _distort_many(distort, image, n=300):
    outs = []
    for seed in range(n):
        torch.manual_seed(seed)
        outs.append(distort(tv_tensors.Image(image)).as_subclass(torch.Tensor))
    return outs


def test_photometric_brightness_and_contrast_ranges_and_probability():
    bright = _distort_many(PhotoMetricDistortion(32, (1.0, 1.0), (1.0, 1.0), 0), _constant(100))
    values = np.array([int(o[0, 0, 0]) for o in bright])
    assert values.min() >= 68 and values.max() <= 132 and values.min() < 80 and values.max() > 120
    assert 0.35 < np.mean(values == 100) < 0.65                     # applied with probability 0.5
    contrast = _distort_many(PhotoMetricDistortion(0, (0.5, 1.5), (1.0, 1.0), 0), _constant(100))
    values = np.array([int(o[0, 0, 0]) for o in contrast])
    assert values.min() >= 50 and values.max() <= 150 and values.min() < 60 and values.max() > 140
    assert 0.35 < np.mean(values == 100) < 0.65
    clipped = _distort_many(PhotoMetricDistortion(32, (1.0, 1.0), (1.0, 1.0), 0), _constant(250), 60)
    assert max(int(o.max()) for o in clipped) == 255               # clipped, never wrapped


def test_hsv_conversions_match_colorsys_and_hue_saturation_act_on_colour_only():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 1, 500), dtype=np.uint8)
    hsv = rgb_to_hsv_u8(torch.from_numpy(rgb)).numpy().astype(np.int64)
    for i in range(500):
        h, s, v = colorsys.rgb_to_hsv(*(rgb[:, 0, i] / 255.0))
        assert abs(hsv[2, 0, i] - round(v * 255)) == 0 and abs(hsv[1, 0, i] - s * 255) <= 0.51
        assert min(abs(hsv[0, 0, i] - h * 180), 180 - abs(hsv[0, 0, i] - h * 180)) <= 0.51
    back = hsv_to_rgb_u8(torch.from_numpy(hsv.astype(np.uint8))).numpy().astype(np.int64)
    for i in range(500):
        expected = np.array(colorsys.hsv_to_rgb(hsv[0, 0, i] / 180, hsv[1, 0, i] / 255, hsv[2, 0, i] / 255)) * 255
        assert np.abs(back[:, 0, i] - expected).max() <= 0.51
    # hue only: a pure red shifted by h steps of 2 degrees; brightness and contrast off
    red = torch.zeros(3, 2, 2, dtype=torch.uint8)
    red[0] = 255
    shifted = _distort_many(PhotoMetricDistortion(0, (1.0, 1.0), (1.0, 1.0), 18), red, 100)
    hues = set()
    for out in shifted:
        h = int(rgb_to_hsv_u8(out)[0, 0, 0])
        hues.add(h)
        assert int(out.max()) == 255 and (h <= 17 or h >= 162)     # |shift| ≤ 18 steps (36°), V kept
    assert len(hues) > 10
    # saturation only: V (max channel) kept, gray untouched
    sat = _distort_many(PhotoMetricDistortion(0, (1.0, 1.0), (0.5, 1.5), 0), torch.tensor([200, 100, 50],
                        dtype=torch.uint8).reshape(3, 1, 1), 100)
    assert all(int(o.max()) == 200 for o in sat) and len({tuple(o.flatten().tolist()) for o in sat}) > 10
    gray = _distort_many(PhotoMetricDistortion(), _constant(77), 50)
    assert all((o[0] == o[1]).all() and (o[1] == o[2]).all() for o in gray)


def test_normalise_pad_and_output_types():
    sample = {"image": _constant(100, (3, 16, 24)), "label": torch.ones(16, 24, dtype=torch.uint8), "name": "x"}
    transform = SegmentationTransform([KeepRatioResize((40, 20))] + normalize_steps() + [PadToSize(32)])
    out = transform(sample)
    assert out["name"] == "x" and out["image"].shape == (3, 32, 32) and out["label"].shape == (32, 32)
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.int64
    assert torch.allclose(out["image"][:, :20, :30], torch.tensor((100 - 96.9255) / 47.8976))
    assert (out["image"][:, 20:] == 0).all() and (out["image"][:, :, 30:] == 0).all()
    assert (out["label"][20:] == 255).all() and (out["label"][:, 30:] == 255).all()
    assert (out["label"][:20, :30] == 1).all()


def test_test_transform_resizes_image_only_and_train_transform_is_seeded(tmp_path):
    root = str(tmp_path / "soda")
    write_soda(root, 2, 1, size=(64, 48), seed=0)
    ds = open_segmentation_dataset(root, "soda", "test", transform=seg_test_transform())
    item = ds[0]
    assert item["image"].shape == (3, 512, 683) and item["image"].dtype == torch.float32
    assert item["label"].shape == (48, 64) and item["label"].dtype == torch.int64
    train = SeededDataset(open_segmentation_dataset(root, "soda", "train", transform=seg_train_transform()), seed=0)
    a, b = train[1], train[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].shape == (3, 512, 512) and a["label"].dtype == torch.int64
    train.set_epoch(1)
    assert not torch.equal(train[1]["image"], a["image"])


# ------------------------------------------------------------------------------------- prepare
def _fake_mfnet_download(raw):
    """ir_seg_dataset-like: 4-channel PNGs, ids 0..8; a: ok, b: bad label value, c/d: ok, e: RGB, x: missing."""
    raw = str(raw)
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c", "d", "e"):
        rgbt = rng.integers(0, 256, (12, 16, 4), dtype=np.uint8)
        _save(f"{raw}/images/{name}.png", rgbt[:, :, :3] if name == "e" else rgbt)
        label = rng.integers(0, 9, (12, 16), dtype=np.uint8)
        if name == "b":
            label[0, 0] = 12
        _save(f"{raw}/labels/{name}.png", label)
    _lines(f"{raw}/train.txt", ["a", "b", "x"])
    _lines(f"{raw}/val.txt", ["c"])
    _lines(f"{raw}/test.txt", ["d", "e"])
    return raw


def test_prepare_mfnet_extracts_the_thermal_channel_and_resumes(tmp_path):
    raw, out = _fake_mfnet_download(tmp_path / "ir_seg_dataset"), str(tmp_path / "MFNet")
    result = prepare_dataset("mfnet", raw, out)
    rgbt = np.asarray(Image.open(f"{raw}/images/a.png"))
    assert np.array_equal(np.asarray(Image.open(f"{out}/thermal_imgs/a.png")), rgbt[:, :, 3])
    assert np.array_equal(np.asarray(Image.open(f"{out}/labels/a.png")), np.asarray(Image.open(f"{raw}/labels/a.png")))
    assert open(f"{out}/train.txt").read().split() == ["a"]
    assert open(f"{out}/val_test.txt").read().split() == ["c", "d"]
    assert open(f"{out}/test.txt").read().split() == ["d"]
    assert result.converted == 3 and result.reused == 0
    assert {s["name"]: s["reason"] for s in result.skipped} == {"b": "bad-label-value", "x": "missing",
                                                                 "e": "not-rgbt"}
    report = json.load(open(f"{out}/prepare-report.json"))
    assert report["status"] == "done" and report["splits"]["train.txt"] == {"listed": 3, "written": 1}
    val = open_segmentation_dataset(out, "auto", "val")
    assert val.layout == "mfnet" and [s.name for s in val.samples] == ["c", "d"]
    # rerun: nothing converted again, nothing rewritten
    mtime = os.stat(f"{out}/thermal_imgs/a.png").st_mtime_ns
    again = prepare_dataset("mfnet", raw, out)
    assert again.converted == 0 and again.reused == 3 and os.stat(f"{out}/thermal_imgs/a.png").st_mtime_ns == mtime
    # a lost output (e.g. a kill) or a changed source is redone, and only that
    os.remove(f"{out}/labels/c.png")
    _save(f"{raw}/labels/d.png", np.zeros((12, 16), np.uint8))
    os.utime(f"{raw}/labels/d.png", ns=(1, 1))
    third = prepare_dataset("mfnet", raw, out)
    assert third.converted == 2 and third.reused == 1 and not np.asarray(Image.open(f"{out}/labels/d.png")).any()
    assert os.path.isfile(f"{raw}/images/e.png")  # nothing of the user's is touched


def test_prepare_mfnet_refuses_split_names_that_leave_its_folders(tmp_path):
    raw, out = _fake_mfnet_download(tmp_path / "ir_seg_dataset"), tmp_path / "MFNet"
    _lines(f"{raw}/test.txt", ["d", "../../escaped"])
    with pytest.raises(DataError, match=r"test\.txt, line 2: '\.\./\.\./escaped' leads out of it through '\.\.'"):
        prepare_dataset("mfnet", raw, str(out))
    _lines(f"{raw}/test.txt", ["d", "sub/d"])  # inside, but MFNet's names are plain file names
    with pytest.raises(DataError, match=r"test\.txt: lists 'sub/d', which is not a plain file name"):
        prepare_dataset("mfnet", raw, str(out))
    assert not (tmp_path / "escaped.png").exists() and not out.exists()


@pytest.mark.parametrize("entry, normal", [("a", "a"), ("a/./b/../c", os.path.join("a", "c")), ("sub/../a", "a"),
                                           ("../x", None), ("a/../../x", None), ("/abs/x", None), (".", None),
                                           ("a/..", None), ("..", None)])
def test_listed_entries_are_relative_paths_that_stay_inside(entry, normal):
    from unip.data.listed import ListedPathError, relative_entry

    if normal is not None:
        assert relative_entry(entry, "ROOT", "f.txt, line 1") == normal
        return
    with pytest.raises(ListedPathError, match=r"^f\.txt, line 1: .* entries are paths relative to ROOT that stay "
                                              r"inside it: fix the line$") as caught:
        relative_entry(entry, "ROOT", "f.txt, line 1")
    assert caught.value.where == "f.txt, line 1"


def test_split_names_are_read_inside_the_data_set_and_linked_folders_are_the_owners_choice(tmp_path):
    """``sub/../b`` is ``b``; a split line that leaves the data set is refused (check-seg lists it as a problem
    naming the line); an image folder that is a link to another place is read like any folder."""
    root = _folder_set(str(tmp_path / "set"))
    _lines(f"{root}/train.txt", ["a", "sub/../b"])
    assert [s.name for s in open_segmentation_dataset(root, "folder", "train").samples] == ["a", "b"]
    _lines(f"{root}/train.txt", ["a", "../../elsewhere/b"])
    with pytest.raises(DataError, match=r"train\.txt, line 2: '\.\./\.\./elsewhere/b' leads out"):
        open_segmentation_dataset(root, "folder", "train")
    report = check_segmentation(root, "folder")
    assert [(p.path, p.code) for p in report.problems] == [(f"{root}/train.txt, line 2", "entry-outside")]
    store = tmp_path / "store"
    os.rename(f"{root}/images", store)
    os.symlink(store, f"{root}/images")
    _lines(f"{root}/train.txt", ["a", "b"])
    dataset = open_segmentation_dataset(root, "folder", "train")
    assert dataset.load(1)["image"].shape[1:] == (24, 32)


def test_prepare_treats_damaged_state_lines_as_absent(tmp_path):
    """Valid JSON lines of another shape in .prepare-state.jsonl (a list, a number, an entry without its
    outputs, a non-UTF-8 byte) are ignored: those images are converted again, the others reused."""
    raw, out = _fake_mfnet_download(tmp_path / "raw"), str(tmp_path / "MFNet")
    assert prepare_dataset("mfnet", raw, out).converted == 3
    state = f"{out}/.prepare-state.jsonl"
    entries = [json.loads(line) for line in open(state)]
    assert sorted(e["name"] for e in entries) == ["a", "c", "d"]
    by_name = {e["name"]: e for e in entries}
    damaged = [json.dumps(by_name["a"]), "[1, 2]", "7", json.dumps({"name": "c", "sources": 3}), '"d"',
               json.dumps({**by_name["d"], "ignored_ids": ["x"]})]
    with open(state, "wb") as fh:
        fh.write(("\n".join(damaged) + "\n").encode() + b'{"name": "\xff"}\n')
    again = prepare_dataset("mfnet", raw, out)
    assert again.reused == 1 and again.converted == 2
    assert sorted(json.loads(line)["name"] for line in open(state)) == ["a", "c", "d"]


def test_prepare_refuses_unsafe_output_folders(tmp_path):
    raw = _fake_mfnet_download(tmp_path / "raw")
    with pytest.raises(DataError, match="differ"):
        prepare_dataset("mfnet", raw, raw)
    os.makedirs(tmp_path / "busy")
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare_dataset("mfnet", raw, str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(DataError, match="scut_train.txt"):
        prepare_dataset("scut", raw, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def _fake_scut_download(raw):
    """SCUT-Seg-like: nested JPEGs, *_labelIds.png with Cityscapes ids, scut_train/val.txt."""
    raw = str(raw)
    ids = np.array(list(SCUT_RAW_IDS) + [33, 1, 255], np.uint8)
    rng = np.random.default_rng(2)
    for name, size in (("set01_V000_I00001", (16, 20)), ("set02_V001_I00002", (16, 20)), ("set03_bad", (16, 20))):
        sub = name[:5]
        _save(f"{raw}/images/{sub}/{name}.jpg", rng.integers(0, 256, size, dtype=np.uint8), quality=90)
        label_size = (8, 8) if name == "set03_bad" else size
        _save(f"{raw}/gt_instance/{sub}/{name}_labelIds.png", ids[rng.integers(0, len(ids), label_size)])
    # a same-named JPEG beside the labels (a visualisation) must not make the image lookup ambiguous
    _save(f"{raw}/gt_instance/set02/set02_V001_I00002.jpg", np.zeros((16, 20, 3), np.uint8))
    with open(f"{raw}/scut_train.txt", "w") as fh:
        fh.write("images/set01/set01_V000_I00001.jpg gt_instance/set01/set01_V000_I00001_labelIds.png\n"
                 "set03_bad.jpg\n")
    with open(f"{raw}/scut_val.txt", "w") as fh:
        fh.write("set02_V001_I00002.jpg\n")   # bare names are found anywhere in the download
    return raw


def test_prepare_scut_remaps_cityscapes_ids(tmp_path):
    raw, out = _fake_scut_download(tmp_path / "SCUT-SEG"), str(tmp_path / "SCUT_seg")
    result = prepare_dataset("scut", raw, out)
    name = "set01_V000_I00001"
    original = np.asarray(Image.open(f"{raw}/gt_instance/set01/{name}_labelIds.png"))
    remapped = np.asarray(Image.open(f"{out}/labels/{name}.png"))
    expected = np.full_like(original, 255)
    for new, old in enumerate(SCUT_RAW_IDS):
        expected[original == old] = new
    assert np.array_equal(remapped, expected) and np.array_equal(scut_lookup()[original], expected)
    assert set(np.unique(remapped)) <= set(range(10)) | {255}
    assert open(f"{out}/images/{name}.jpg", "rb").read() == open(f"{raw}/images/set01/{name}.jpg", "rb").read()
    assert open(f"{out}/train.txt").read().split() == [name]
    assert open(f"{out}/val.txt").read().split() == ["set02_V001_I00002"]
    assert [s["reason"] for s in result.skipped] == ["size-mismatch"]
    assert set(result.ignored_ids) == {"1", "33"}
    test = open_segmentation_dataset(out, "auto", "test")
    assert test.layout == "scut" and [s.name for s in test.samples] == ["set02_V001_I00002"]
    assert check_segmentation(out).ok


def test_prepare_scut_names_images_of_one_name_by_their_sub_folder(tmp_path):
    """images/a/x.jpg and images/b/x.jpg (sub-folders are allowed) are two images: both are written, as a_x and
    b_x, each with its own label, however they are listed; names that would still collide are refused."""
    raw, out = tmp_path / "raw", str(tmp_path / "out")
    for sub, raw_id in (("a", 7), ("b", 24), ("c", 26)):
        _save(f"{raw}/images/{sub}/x.jpg", np.full((16, 20), 9 * raw_id, np.uint8), quality=95)
        _save(f"{raw}/gt/{sub}/x_labelIds.png", np.full((16, 20), raw_id, np.uint8))
    _save(f"{raw}/images/y.jpg", np.zeros((16, 20), np.uint8))
    _save(f"{raw}/gt/y_labelIds.png", np.zeros((16, 20), np.uint8))
    (raw / "scut_train.txt").write_text("images/a/x.jpg gt/a/x_labelIds.png\nimages/b/x.jpg gt/b/x_labelIds.png\n"
                                        "y.jpg\n")
    (raw / "scut_val.txt").write_text("images/c/x.jpg\nimages/b/x.jpg gt/b/x_labelIds.png\n")  # c's label by name
    result = prepare_dataset("scut", str(raw), out)
    assert open(f"{out}/train.txt").read().split() == ["a_x", "b_x", "y"]
    assert open(f"{out}/val.txt").read().split() == ["c_x", "b_x"]
    assert result.converted == 4 and not result.skipped
    for name, class_id in (("a_x", 1), ("b_x", 2), ("c_x", 4), ("y", 0)):  # road, person, car, background
        assert set(np.unique(np.asarray(Image.open(f"{out}/labels/{name}.png")))) == {class_id}
    assert open(f"{out}/images/b_x.jpg", "rb").read() == open(f"{raw}/images/b/x.jpg", "rb").read()
    assert check_segmentation(out).ok
    _save(f"{raw}/images/a_x.jpg", np.zeros((16, 20), np.uint8))  # a_x: taken by images/a/x.jpg
    (raw / "scut_val.txt").write_text("a_x.jpg\n")
    with pytest.raises(DataError, match="a_x.jpg.*'a_x'|'a_x'.*a_x.jpg"):
        prepare_dataset("scut", str(raw), str(tmp_path / "out2"))
    assert not os.path.exists(tmp_path / "out2")


def test_prepare_removes_the_temporary_files_a_killed_run_left(tmp_path):
    raw, out = _fake_mfnet_download(tmp_path / "raw"), tmp_path / "MFNet"
    prepare_dataset("mfnet", raw, str(out))
    left = [out / "labels" / ".a.png.tmp-30010", out / "thermal_imgs" / ".c.png.tmp-7", out / ".train.txt.tmp-7",
            out / "..prepare-state.jsonl.tmp-7"]
    foreign = [out / "labels" / ".notes.png.tmp-30010", out / "labels" / ".a.png.tmp-x"]  # not its names
    for path in left + foreign:
        path.write_bytes(b"half")
    again = prepare_dataset("mfnet", raw, str(out))
    assert again.reused == 3 and [p for p in left if p.exists()] == [] and all(p.exists() for p in foreign)


# ------------------------------------------------------------------------------------- CLI
def test_cli_prepare_and_check_seg(tmp_path, capsys):
    raw, out = _fake_mfnet_download(tmp_path / "raw"), str(tmp_path / "mfnet")
    assert main(["data", "prepare", "mfnet", raw, out]) == 0
    captured = capsys.readouterr()
    assert "converted 3" in captured.out and "not-rgbt" in captured.out
    assert main(["data", "check-seg", out, "--dataset", "mfnet"]) == 0
    captured = capsys.readouterr()
    assert "no problems found" in captured.out and "color_cone" in captured.out and captured.err == ""
    os.remove(f"{out}/thermal_imgs/a.png")
    _save(f"{out}/labels/c.png", np.full((12, 16), 40, np.uint8))
    assert main(["data", "check-seg", out, "--split", "train", "--split", "val"]) == 2
    captured = capsys.readouterr()
    assert f"{out}/thermal_imgs/a.png" in captured.out and f"{out}/labels/c.png" in captured.out
    assert captured.err.count("\n") == 1 and "2 problem(s)" in captured.err


@pytest.mark.parametrize("argv", [["data", "prepare", "scut", "{tmp}/missing", "{tmp}/out"],
                                  ["data", "check-seg", "{tmp}/missing"],
                                  ["data", "check-seg", "{tmp}", "--dataset", "soda"]])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "error" in captured.err and "Traceback" not in captured.err


def test_read_label_holds_every_kind_of_label_image_to_max_id(tmp_path):
    from unip.data.images import ImageReadError, read_label

    ids = np.full((4, 6), 200, np.uint8)
    for mode in ("L", "RGB"):  # 8-bit gray (palette images take the same path) and equal-channel colour
        path = str(tmp_path / f"{mode}.png")
        Image.fromarray(ids).convert(mode).save(path)
        assert read_label(path).max() == 200
        with pytest.raises(ImageReadError, match="up to 200 are not ids in 0..100"):
            read_label(path, max_id=100)
