"""``unip predict`` end to end on tiny random-weight segmentors (ours and the release's mmseg layout) and
generated images and videos: files written, labels equal to ``slide_inference`` on the same preprocessed
image, skipped inputs, videos, outputs never written over; and its building blocks (test pipeline, colours,
legend, areas)."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unip.cli import main
from unip.data.layouts import MFNET_CLASSES, MFNET_PALETTE, voc_palette
from unip.errors import CheckpointError, ConfigError
from unip.models import Segmentor
from unip.models.heads import resize_bilinear
from unip.seg import fit_size, load_segmentor, save_segmentor, slide_inference
from unip.seg.pipeline import InferencePipeline
from unip.seg.render import ClassInfo, class_areas, colorize, overlay

from test_seg_model import release_state_dict, save_release

cv2 = pytest.importorskip("cv2")

CLASSES = ["background", "person", "car"]


def tiny_segmentor(classes=3, seed=0, meta=None) -> Segmentor:
    """Width 32, 2 blocks, UperNet of 16 channels; crop 128 / stride 85 (the recipe's 2/3)."""
    torch.manual_seed(seed)
    config = {"backbone": dict(img_size=128, embed_dim=32, depth=2, num_heads=2, layer_scale=1.0),
              "feature_layers": [2], "neck": "llfpn",
              "decode_head": {"type": "upernet", "channels": 16, "pool_scales": [1, 2, 3, 6], "dropout": 0.1},
              "auxiliary_head": {"type": "fcn", "channels": 16, "in_index": 2, "dropout": 0.1, "loss_weight": 0.4},
              "num_classes": classes}
    segmentor = Segmentor(config, {"crop_size": 128, "stride": 85, **(meta or {})}).eval()
    for module in segmentor.modules():  # non-trivial BN statistics so that classes vary over the image
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
    return segmentor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "seg.safetensors"
    return str(save_segmentor(tiny_segmentor(meta={"class_names": CLASSES}), path))


def scene(height, width, seed=0) -> np.ndarray:
    """A smooth gray scene with a few warm blobs (uint8)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = 60 + 40 * np.sin(x / 9.0) + 30 * np.cos(y / 7.0)
    for _ in range(3):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        image += 120 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 60.0)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("frames") / "frames"
    os.makedirs(root / "night")
    Image.fromarray(scene(48, 64, 1)).save(root / "a.png")
    Image.fromarray(np.stack([scene(40, 72, 2)] * 3, axis=2)).save(root / "b.jpg", quality=95)
    raw = scene(36, 52, 3).astype(np.uint16) * 40 + 7000  # a 16-bit radiometric frame
    Image.fromarray(raw).save(root / "night" / "c.png")
    (root / "notes.txt").write_text("not an image")
    return str(root)


def write_video(path, frames=10, size=(48, 64)) -> str:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (size[1], size[0]))
    assert writer.isOpened()
    for i in range(frames):
        frame = np.roll(scene(*size, seed=4), 3 * i, axis=1)
        writer.write(np.repeat(frame[:, :, None], 3, axis=2))
    writer.release()
    return str(path)


def predict(capsys, *argv):
    code = main(["predict", "--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ============================================================================================ end to end
def test_folder_gives_one_file_of_each_kind_per_image(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "pred"
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, folder, "--out", str(out), "--batch-size", "2")
    assert code == 0 and err == "", err
    assert "predicted 3 image(s)" in stdout
    sizes = {"frames/a": (48, 64), "frames/b": (40, 72), "frames/night/c": (36, 52)}
    for name, size in sizes.items():
        label = np.array(Image.open(out / "label" / f"{name}.png"))
        assert label.shape == size and label.dtype == np.uint8 and label.max() < 3
        color = Image.open(out / "color" / f"{name}.png")
        shown = Image.open(out / "overlay" / f"{name}.png")
        assert color.size == shown.size == (size[1], size[0]) and color.mode == shown.mode == "RGB"
        assert np.array_equal(np.array(color), colorize(label, voc_palette(3)))  # ids → the palette's colours
    assert sorted(os.listdir(out)) == ["areas.csv", "areas.json", "color", "label", "overlay"]  # no video dir
    rows = read_csv(out / "areas.csv")
    assert len(rows) == 3 * 3 and {r["class_name"] for r in rows} == set(CLASSES)
    report = json.loads((out / "areas.json").read_text())
    assert report["format"] == "unip-predict" and report["classes"] == CLASSES and report["failed"] == []
    assert report["test_pipeline"] == {"scale": [2048, 512], "mean": [pytest.approx(96.9255)] * 3,
                                       "std": [pytest.approx(47.8976)] * 3, "crop": 128, "stride": 85}
    for record in report["images"]:
        label = np.array(Image.open(out / record["files"]["label"]))
        assert record["pixels"] == np.bincount(label.ravel(), minlength=3).tolist()
        assert sum(record["percent"]) == pytest.approx(100.0, abs=1e-3)


def test_a_broken_image_is_reported_and_the_rest_are_done(checkpoint, folder, tmp_path, capsys):
    broken = tmp_path / "in"
    os.makedirs(broken)
    Image.fromarray(scene(32, 48)).save(broken / "good.png")
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (broken / "empty.jpg").write_bytes(b"")
    out = tmp_path / "pred"
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, str(broken), folder, "--out", str(out),
                                "--format", "label")
    assert code == 1
    assert err.strip().splitlines() == ["unip predict: error: 2 input(s) could not be read (listed above); the "
                                        "rest were done"]
    assert "bad.png" in stdout and "empty.jpg" in stdout and "predicted 4 image(s)" in stdout
    assert sorted(os.listdir(out / "label" / "in")) == ["good.png"] and os.listdir(out) != []
    report = json.loads((out / "areas.json").read_text())
    assert sorted(os.path.basename(f["input"]) for f in report["failed"]) == ["bad.png", "empty.jpg"]
    assert len(report["images"]) == 4


def test_a_video_gives_a_result_per_frame_and_an_annotated_video(checkpoint, tmp_path, capsys):
    from unip.data.video import VideoReader, is_our_video

    video = write_video(tmp_path / "clip.mp4", frames=10)
    out = tmp_path / "pred"
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, video, "--out", str(out), "--batch-size", "3")
    assert code == 0 and err == "", err
    assert "10 frame(s) of 1 video(s)" in stdout
    for kind in ("label", "color", "overlay"):
        assert sorted(os.listdir(out / kind / "clip")) == [f"frame_{i:06d}.png" for i in range(10)]
    annotated = str(out / "video" / "clip.mp4")
    assert is_our_video(annotated) and not is_our_video(video)
    reader = VideoReader(annotated)
    frames = list(reader.frames())
    assert len(frames) == 10 and reader.size == (48, 64) and reader.fps == pytest.approx(10.0)
    first_overlay = np.array(Image.open(out / "overlay" / "clip" / "frame_000000.png"))
    assert np.abs(frames[0][1].astype(int) - first_overlay).mean() < 12  # the same picture, through a codec
    report = json.loads((out / "areas.json").read_text())
    assert [r["frame"] for r in report["images"]] == list(range(10))
    assert report["images"][3]["time_s"] == pytest.approx(0.3) and report["videos"] == ["video/clip.mp4"]
    assert len(read_csv(out / "areas.csv")) == 10 * 3

    # --every 4: frames 0, 4, 8 and a video at a quarter of the frame rate
    out4 = tmp_path / "every4"
    assert predict(capsys, "--checkpoint", checkpoint, video, "--out", str(out4), "--every", "4",
                   "--format", "label,video")[0] == 0
    assert sorted(os.listdir(out4 / "label" / "clip")) == ["frame_000000.png", "frame_000004.png", "frame_000008.png"]
    reader = VideoReader(str(out4 / "video" / "clip.mp4"))
    assert len(list(reader.frames())) == 3 and reader.fps == pytest.approx(2.5)
    # without annotated videos the summary still counts the video
    code, stdout, _ = predict(capsys, "--checkpoint", checkpoint, video, "--out", str(tmp_path / "labels"), "--every",
                              "4", "--format", "label")
    assert code == 0 and "predicted 0 image(s) and 3 frame(s) of 1 video(s)" in stdout


def test_release_checkpoint_gives_the_labels_of_slide_inference(tmp_path, capsys):
    """A random-weight file in the release's fine-tuned mmseg layout: the labels ``unip predict`` writes equal
    the arg-max of ``slide_inference`` (512 / 341) on the same preprocessed image, resized back; and the
    preprocessing is the recipe's resize + normalisation, recomputed here with torch."""
    sd = release_state_dict(64, 2, 5, grid=4)
    path = str(save_release(tmp_path / "iter_100.pth", sd))
    image = scene(96, 128, seed=5)
    Image.fromarray(image).save(tmp_path / "frame.png")
    out = tmp_path / "pred"
    code, _, err = predict(capsys, "--checkpoint", path, str(tmp_path / "frame.png"), "--out", str(out),
                           "--format", "label", "--batch-size", "1")
    assert code == 0, err
    written = np.array(Image.open(out / "label" / "frame.png"))

    segmentor = load_segmentor(path)
    pipeline = InferencePipeline.of(segmentor)
    assert (pipeline.crop, pipeline.stride, pipeline.scale) == (512, 341, (2048, 512))
    x = pipeline.preprocess(np.repeat(image[:, :, None], 3, axis=2))[None]
    assert tuple(x.shape[-2:]) == fit_size(96, 128) == (512, 683)
    with torch.no_grad():
        logits = slide_inference(segmentor, x, crop=512, stride=341)
    expected = resize_bilinear(logits, (96, 128)).argmax(1)[0].numpy()
    assert np.array_equal(written, expected)
    assert len(np.unique(written)) > 1
    # no class names in the file: areas.csv and areas.json name the ids as the overlay legends do
    ids = [f"class {i}" for i in range(5)]
    assert json.loads((out / "areas.json").read_text())["classes"] == ids
    assert [row["class_name"] for row in read_csv(out / "areas.csv")] == ids

    # the preprocessing, recomputed: bilinear resize of the uint8 image (no antialiasing, rounded to uint8
    # as mmcv's cv2.resize), then (x - 96.9255) / 47.8976
    gray = torch.from_numpy(image).float()[None, None]
    resized = F.interpolate(gray, size=(512, 683), mode="bilinear", align_corners=False).round().clamp(0, 255)
    reference = ((resized - 96.9255) / 47.8976).expand(1, 3, -1, -1)
    difference = (x - reference).abs() * 47.8976  # in gray levels
    assert difference.max() <= 1 + 1e-4 and difference.mean() < 0.3  # the uint8 resize's fixed-point rounding


def test_dataset_names_and_palette(tmp_path, capsys):
    segmentor = tiny_segmentor(classes=len(MFNET_CLASSES))
    path = str(save_segmentor(segmentor, tmp_path / "mfnet.safetensors"))
    Image.fromarray(scene(32, 48)).save(tmp_path / "a.png")
    out = tmp_path / "pred"
    assert predict(capsys, "--checkpoint", path, str(tmp_path / "a.png"), "--out", str(out), "--dataset",
                   "mfnet", "--format", "label,color")[0] == 0
    label = np.array(Image.open(out / "label" / "a.png"))
    assert np.array_equal(np.array(Image.open(out / "color" / "a.png")), colorize(label, MFNET_PALETTE))
    assert json.loads((out / "areas.json").read_text())["classes"] == list(MFNET_CLASSES)
    code, _, err = predict(capsys, "--checkpoint", path, str(tmp_path / "a.png"), "--out", str(out), "--dataset",
                           "soda")
    assert code == 2 and "21 classes" in err and "predicts 9" in err


def test_outputs_of_others_are_never_written_over(checkpoint, tmp_path, capsys):
    Image.fromarray(scene(32, 48)).save(tmp_path / "a.png")
    out = tmp_path / "pred"
    os.makedirs(out / "overlay")
    Image.fromarray(scene(8, 8)).save(out / "overlay" / "a.png")  # the user's own picture
    before = (out / "overlay" / "a.png").read_bytes()
    code, _, err = predict(capsys, "--checkpoint", checkpoint, str(tmp_path / "a.png"), "--out", str(out))
    assert code == 2 and "a.png: exists and was not written by unip" in err
    assert (out / "overlay" / "a.png").read_bytes() == before and not (out / "label").exists()
    # two inputs that would write the same files
    os.makedirs(tmp_path / "x")
    Image.fromarray(scene(32, 48)).save(tmp_path / "x" / "a.png")
    Image.fromarray(scene(32, 48)).save(tmp_path / "x" / "a.jpg")
    code, _, err = predict(capsys, "--checkpoint", checkpoint, str(tmp_path / "x"), "--out", str(tmp_path / "p2"))
    assert code == 2 and "would both write x/a.png" in err


def test_output_folder_inside_the_input_folder_is_not_read_back(checkpoint, tmp_path, capsys):
    """... and a second run replaces its own earlier files."""
    Image.fromarray(scene(32, 48)).save(tmp_path / "a.png")
    out = tmp_path / "pred"
    for _ in range(2):
        code, stdout, _ = predict(capsys, "--checkpoint", checkpoint, str(tmp_path), "--out", str(out))
        assert code == 0 and "predicted 1 image(s)" in stdout


def test_output_folder_that_is_the_input_folder_is_not_read_back(checkpoint, tmp_path, capsys):
    """``--out`` = an input folder: its label/, color/, overlay/ outputs are not inputs of the next run (the
    user's other subfolders still are)."""
    frames = tmp_path / "frames"
    os.makedirs(frames / "night")
    Image.fromarray(scene(32, 48)).save(frames / "a.png")
    Image.fromarray(scene(32, 48, 1)).save(frames / "night" / "b.png")
    for _ in range(2):
        code, stdout, _ = predict(capsys, "--checkpoint", checkpoint, str(frames), "--out", str(frames))
        assert code == 0 and "predicted 2 image(s)" in stdout, stdout
    assert sorted(p.relative_to(frames / "label").as_posix() for p in (frames / "label").rglob("*.png")) == \
        ["frames/a.png", "frames/night/b.png"]


def test_areas_reports_of_earlier_runs_in_an_input_folder_are_not_skipped_files(checkpoint, tmp_path, capsys):
    """An earlier run's areas.csv / areas.json (its --out the input folder, or a subfolder) are unip's own outputs,
    left out like its label/ maps, not counted as skipped files; the user's other files still are."""
    for folder, outs in (("same", ("", "")), ("sub", ("pred_a", "pred_b"))):
        frames = tmp_path / folder
        frames.mkdir()
        Image.fromarray(scene(32, 48)).save(frames / "a.png")
        (frames / "notes.txt").write_text("mine")
        for out in outs:
            code, stdout, _ = predict(capsys, "--checkpoint", checkpoint, str(frames), "--out", str(frames / out))
            assert code == 0 and "predicted 1 image(s)" in stdout, stdout
            assert "skipped 1 file(s) that are neither images nor videos" in stdout, stdout


def test_output_folders_of_earlier_runs_inside_the_input_folder_are_not_read(checkpoint, tmp_path, capsys):
    """Two runs on one folder, each with its own --out inside it (comparing checkpoints): the second does not
    predict the first one's label maps, colours and overlays, and says it skipped them; a folder that was its own
    --out keeps its other images."""
    frames = tmp_path / "frames"
    os.makedirs(frames / "night")
    Image.fromarray(scene(32, 48)).save(frames / "a.png")
    Image.fromarray(scene(32, 48, 1)).save(frames / "night" / "b.png")
    assert predict(capsys, "--checkpoint", checkpoint, str(frames / "night"), "--out", str(frames / "night"))[0] == 0
    for out in ("pred_a", "pred_b"):
        code, stdout, err = predict(capsys, "--checkpoint", checkpoint, str(frames), "--out", str(frames / out))
        assert code == 0 and err == "", err
        assert "predicted 2 image(s)" in stdout, stdout
    assert "skipped the label/, color/, overlay/, video/ outputs of 2 earlier unip predict run(s)" in stdout
    report = json.loads((frames / "pred_b" / "areas.json").read_text())
    assert [r["name"] for r in report["images"]] == ["frames/a", "frames/night/b"]
    code, stdout, _ = predict(capsys, "--checkpoint", checkpoint, str(frames / "pred_a" / "overlay"), "--out",
                              str(tmp_path / "again"), "--format", "label")  # named as an input: predicted
    assert code == 0 and "predicted 2 image(s)" in stdout


def test_linked_subfolders_are_searched_once_and_loops_end(checkpoint, tmp_path, capsys):
    """A subfolder that is a symbolic link (e.g. to a network share) is searched like any other, under its
    name in the folder; a link back up the tree (a loop) adds nothing and ends."""
    frames, share = tmp_path / "frames", tmp_path / "share" / "cam1"
    os.makedirs(frames / "day")
    os.makedirs(share)
    Image.fromarray(scene(32, 48)).save(frames / "day" / "a.png")
    Image.fromarray(scene(32, 48, 1)).save(share / "b.png")
    os.symlink(share, frames / "cam1", target_is_directory=True)
    os.symlink(frames, frames / "day" / "loop", target_is_directory=True)
    out = tmp_path / "pred"
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, str(frames), "--out", str(out), "--format",
                                "label")
    assert code == 0 and err == "", err
    assert "predicted 2 image(s)" in stdout
    assert sorted(p.relative_to(out / "label").as_posix() for p in (out / "label").rglob("*.png")) == \
        ["frames/cam1/b.png", "frames/day/a.png"]


def test_an_image_of_extreme_aspect_ratio_is_predicted(checkpoint, tmp_path, capsys):
    """3 × 500 px → 12 × 2048 after the test resize: fewer rows than two patches, predicted normally."""
    Image.fromarray(scene(3, 500)).save(tmp_path / "strip.png")
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, str(tmp_path / "strip.png"), "--out",
                                str(tmp_path / "pred"), "--format", "label")
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "pred" / "label" / "strip.png")).shape == (3, 500)


def test_label_maps_read_back_with_read_label_8_and_16_bit(checkpoint, tmp_path, capsys):
    """8-bit maps (up to 256 classes) read back with ``read_label``; 16-bit ones (beyond 256 classes) with
    ``read_label(path, max_id=65535)``, while plain ``read_label`` keeps refusing ids above 255 (training labels)
    and says how to read them."""
    from unip.data.images import ImageReadError, read_label, read_rgb
    from unip.seg.predict import Predictor

    Image.fromarray(scene(32, 48)).save(tmp_path / "a.png")
    wide = tiny_segmentor(classes=300)
    with torch.no_grad():  # ids 260 and 270 win everywhere; which of the two varies over the image
        wide.decode_head.conv_seg.bias[[260, 270]] += 50.0
    wide_path = str(save_segmentor(wide, tmp_path / "wide.safetensors"))
    for path, out, dtype in [(checkpoint, tmp_path / "p8", np.uint8), (wide_path, tmp_path / "p16", np.uint16)]:
        assert predict(capsys, "--checkpoint", path, str(tmp_path / "a.png"), "--out", str(out), "--format",
                       "label")[0] == 0
        expected = Predictor(load_segmentor(path), "cpu").predict([read_rgb(str(tmp_path / "a.png"))])[0]
        assert expected.dtype == dtype
        wide_read = read_label(str(out / "label" / "a.png"), max_id=65535)
        assert wide_read.dtype == np.uint16 and np.array_equal(wide_read, expected)
        if dtype == np.uint8:
            narrow = read_label(str(out / "label" / "a.png"))
            assert narrow.dtype == np.uint8 and np.array_equal(narrow, expected)
    assert set(np.unique(expected)) == {260, 270}
    with pytest.raises(ImageReadError, match=r"260\.\.270 are not ids in 0\.\.255.*max_id=65535"):
        read_label(str(tmp_path / "p16" / "label" / "a.png"))
    with pytest.raises(ImageReadError, match="not ids in 0..269"):
        read_label(str(tmp_path / "p16" / "label" / "a.png"), max_id=269)


def test_an_input_given_twice_is_predicted_once(checkpoint, tmp_path, capsys):
    """The same file named twice, by another spelling, or inside a folder given too (overlapping globs): one
    prediction, under the name of its first mention; different files with one output name still stop the run."""
    os.makedirs(tmp_path / "in")
    Image.fromarray(scene(32, 48)).save(tmp_path / "in" / "a.png")
    Image.fromarray(scene(32, 48, 1)).save(tmp_path / "in" / "b.png")
    a = str(tmp_path / "in" / "a.png")
    out = tmp_path / "pred"
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, a, a, str(tmp_path / "in" / ".." / "in" / "a.png"),
                                str(tmp_path / "in"), "--out", str(out), "--format", "label")
    assert code == 0 and err == "", err
    assert "3 input file(s) given more than once" in stdout and "predicted 2 image(s)" in stdout
    report = json.loads((out / "areas.json").read_text())
    assert [r["name"] for r in report["images"]] == ["a", "in/b"]
    assert sorted(p.relative_to(out / "label").as_posix() for p in (out / "label").rglob("*.png")) == \
        ["a.png", "in/b.png"]
    Image.fromarray(scene(32, 48)).save(tmp_path / "a.png")  # another file named a.png
    code, _, err = predict(capsys, "--checkpoint", checkpoint, a, str(tmp_path / "a.png"), "--out",
                           str(tmp_path / "p2"))
    assert code == 2 and "would both write a.png" in err


def test_an_interrupted_run_lists_what_it_wrote_and_a_rerun_says_what_it_leaves(checkpoint, tmp_path, capsys,
                                                                                 monkeypatch):
    """Ctrl-C after the first image: areas.csv / areas.json list exactly the files on disk (``complete``
    false); Ctrl-C before any image leaves an earlier report as it is; a rerun with fewer inputs into the same
    --out keeps the earlier files, says so, and lists its own."""
    from unip.seg.predict import Predictor

    for name, seed in [("a", 0), ("b", 1), ("c", 2)]:
        Image.fromarray(scene(32, 48, seed)).save(tmp_path / f"{name}.png")
    inputs = [str(tmp_path / f"{name}.png") for name in "abc"]
    out = tmp_path / "pred"
    real_predict = Predictor.predict
    calls = []

    def interrupted(self, images):
        calls.append(1)
        if len(calls) > stop_after:
            raise KeyboardInterrupt
        return real_predict(self, images)

    monkeypatch.setattr(Predictor, "predict", interrupted)
    stop_after = 1
    code, stdout, err = predict(capsys, "--checkpoint", checkpoint, *inputs, "--out", str(out), "--batch-size", "1")
    assert code == 130 and "interrupted" in err
    assert "unip predict: warning: stopped (KeyboardInterrupt) after 1 image(s)" in err
    report = json.loads((out / "areas.json").read_text())
    assert report["complete"] is False and [r["name"] for r in report["images"]] == ["a"]
    listed = sorted(path for r in report["images"] for path in r["files"].values())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert on_disk == listed == ["color/a.png", "label/a.png", "overlay/a.png"]
    assert [row["input"] for row in read_csv(out / "areas.csv")] == [inputs[0]] * 3

    before = (out / "areas.json").read_bytes()
    calls.clear()
    stop_after = 0  # interrupted before any image: nothing replaced, the earlier report still describes the folder
    assert predict(capsys, "--checkpoint", checkpoint, *inputs, "--out", str(out))[0] == 130
    assert (out / "areas.json").read_bytes() == before

    monkeypatch.setattr(Predictor, "predict", real_predict)
    assert predict(capsys, "--checkpoint", checkpoint, *inputs, "--out", str(out))[0] == 0
    assert json.loads((out / "areas.json").read_text())["complete"] is True
    code, _, stderr = predict(capsys, "--checkpoint", checkpoint, inputs[1], "--out", str(out))
    assert code == 0 and "unip predict: warning: " in stderr and "holds 6 file(s) of an earlier run" in stderr
    report = json.loads((out / "areas.json").read_text())
    assert [r["name"] for r in report["images"]] == ["b"] and (out / "label" / "a.png").exists()


@pytest.mark.parametrize("verb", ["predict", "bench", "evaluate"])
def test_precision_help_says_what_a_cpu_runs(verb, capsys):
    """``resolve_precision`` honours bf16 on CPUs (fp16 and auto give fp32 there): the help says so."""
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "CPU runs fp32" not in text and "on a CPU bf16 runs bf16 autocast, fp16 and auto fp32" in text


# ============================================================================================ pieces
def test_class_info_sources():
    assert ClassInfo.resolve(9, "mfnet").names == tuple(MFNET_CLASSES)
    meta = {"class_names": ["a", "b"], "palette": [[1, 2, 3], [4, 5, 6]]}
    info = ClassInfo.resolve(2, None, meta)
    assert info.names == ("a", "b") and info.palette == ((1, 2, 3), (4, 5, 6))
    ids_only = ClassInfo.resolve(4, None, {"class_names": ["too", "few"], "palette": "nonsense"})
    assert ids_only.names is None and ids_only.palette == voc_palette(4) and ids_only.name(3) == "class 3"
    with pytest.raises(ConfigError, match="10 classes"):
        ClassInfo.resolve(4, "scut")


def test_classes_without_names_have_one_name_everywhere():
    """Legends, areas.csv and areas.json all name an unnamed class ``class <id>`` (``ClassInfo.name``)."""
    from unip.seg.predict_run import areas_csv

    palette = ((0, 0, 0), (255, 0, 0), (0, 0, 255))
    unnamed = ClassInfo(None, palette)
    assert unnamed.all_names == ("class 0", "class 1", "class 2")
    assert ClassInfo(("x", "y", "z"), palette).all_names == ("x", "y", "z")
    labels = np.zeros((120, 160), np.uint8)
    labels[:, 100:] = 2
    image = np.full((120, 160, 3), 100, np.uint8)
    named = ClassInfo(unnamed.all_names, palette)
    assert np.array_equal(overlay(image, labels, unnamed), overlay(image, labels, named))
    text = areas_csv([{"input": "a.png", "frame": None, "time_s": None, "width": 160, "height": 120,
                       "pixels": [12000, 0, 7200], "percent": [62.5, 0.0, 37.5]}], unnamed)
    assert [row[6] for row in csv.reader(io.StringIO(text))][1:] == ["class 0", "class 1", "class 2"]


def test_colours_areas_and_overlay():
    labels = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    palette = ((0, 0, 0), (255, 0, 0), (0, 0, 255))
    assert colorize(labels, palette).tolist() == [[[0, 0, 0], [255, 0, 0]], [[0, 0, 255], [0, 0, 255]]]
    assert class_areas(labels, 4).tolist() == [1, 1, 2, 0]
    image = np.full((2, 2, 3), 100, np.uint8)
    blended = overlay(image, labels, ClassInfo(None, palette), alpha=0.25, legend=False)
    assert blended[0, 1].tolist() == [139, 75, 75]  # 0.75·100 + 0.25·255 = 138.75
    big = np.full((120, 160, 3), 100, np.uint8)
    big_labels = np.zeros((120, 160), np.uint8)
    big_labels[:, 100:] = 2
    shown = overlay(big, big_labels, ClassInfo(("bg", "a", "road"), palette))
    assert shown.shape == big.shape
    assert (shown[:10, :40] != overlay(big, big_labels, ClassInfo(None, palette), legend=False)[:10, :40]).any()
    assert np.array_equal(shown[100:, 120:], np.full((20, 40, 3), [50, 50, 178], np.uint8))  # no legend there


def test_colours_of_more_than_256_classes():
    """Beyond 256 classes (16-bit label maps) every id has its own palette colour, and id 255 is a class, not
    the ignore index (with fewer classes 255 keeps the image, as before)."""
    palette = voc_palette(300)
    labels = np.array([[255, 260], [299, 3]], dtype=np.uint16)
    assert colorize(labels, palette).tolist() == [[list(palette[255]), list(palette[260])],
                                                  [list(palette[299]), list(palette[3])]]
    image = np.full((2, 2, 3), 100, np.uint8)
    blended = overlay(image, labels, ClassInfo(None, tuple(palette)), alpha=1.0, legend=False)
    assert np.array_equal(blended, colorize(labels, palette))
    few = overlay(image[:1], np.array([[255, 1]], np.uint8), ClassInfo(None, ((0, 0, 0), (255, 0, 0))), alpha=1.0,
                  legend=False)
    assert few.tolist() == [[[100, 100, 100], [255, 0, 0]]]


def test_preprocess_keeps_16_bit_and_colour_frames_in_range():
    pipeline = InferencePipeline()
    x = pipeline.preprocess(np.full((240, 320, 3), 255, np.uint8))
    assert x.shape == (3, 512, 683) and torch.allclose(x, torch.full_like(x, (255 - 96.9255) / 47.8976))
    assert pipeline.windows(480, 640) == 2 and pipeline.windows(512, 2048) == 6


def test_unreadable_video_and_bad_options_stop_before_any_work(checkpoint, tmp_path, capsys):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    Image.fromarray(scene(32, 48)).save(tmp_path / "a.png")
    cases = [([str(junk)], "junk.mp4: OpenCV cannot read"),
             ([str(tmp_path / "a.png"), "--every", "0"], "--every"),
             ([str(tmp_path / "missing.png")], "missing.png: no such file"),
             ([str(tmp_path / "a.png"), "--format", "label,gif"], "--format")]
    for argv, message in cases:
        code, _, err = predict(capsys, "--checkpoint", checkpoint, *argv, "--out", str(tmp_path / "o"))
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()
    code, _, err = predict(capsys, "--checkpoint", str(tmp_path / "a.png"), str(tmp_path / "a.png"))
    assert code == 2 and "a.png" in err


@pytest.mark.parametrize("argv, verb", [(["predict", "--checkpoint", "x", "--formats", "label", "a.png"], "predict"),
                                        (["export", "--checkpoint", "x", "--format", "onnx", "--bogus"], "export"),
                                        (["bench", "--checkpoint", "x", "--bogus"], "bench"),
                                        (["sweep", "report", "d", "--bogus"], "sweep report")])
def test_an_unknown_option_is_named_by_its_verb(argv, verb, capsys):
    """A mistyped option (``--formats`` for ``--format``) gets the verb's one line and points to its help."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unip {verb}: error: unrecognized arguments: ") and err.rstrip().endswith(
        f"(see unip {verb} --help)") and len(err.strip().splitlines()) == 1, err


def test_video_bytes_written_by_others_are_not_ours(tmp_path):
    from unip.data.video import VideoWriter, is_our_video

    with VideoWriter(str(tmp_path / "v.mp4"), 5.0, (32, 48)) as writer:
        for _ in range(3):
            writer.write(np.zeros((32, 48, 3), np.uint8))
    assert is_our_video(str(tmp_path / "v.mp4")) and os.listdir(tmp_path) == ["v.mp4"]
    (tmp_path / "tiny.mp4").write_bytes(b"x")
    assert not is_our_video(str(tmp_path / "tiny.mp4"))
    with pytest.raises(RuntimeError):
        with VideoWriter(str(tmp_path / "w.mp4"), 5.0, (32, 48)):
            raise RuntimeError("stop")
    assert sorted(os.listdir(tmp_path)) == ["tiny.mp4", "v.mp4"]  # the partial video is gone


@pytest.mark.parametrize("size", [(33, 47), (32, 48)])
def test_videos_of_odd_sizes_keep_every_pixel(tmp_path, size):
    import cv2

    from unip.data.video import VideoWriter

    frame = np.zeros(size + (3,), np.uint8)
    frame[-8:, :] = 255  # bright bottom rows and right columns: what an odd-size writer used to cut
    frame[:, -8:] = 255
    with VideoWriter(str(tmp_path / "v.mp4"), 5.0, size) as writer:
        writer.write(frame)
    capture = cv2.VideoCapture(str(tmp_path / "v.mp4"))
    ok, read = capture.read()
    capture.release()
    assert ok and read.shape[:2] == (size[0] + size[0] % 2, size[1] + size[1] % 2)
    assert np.abs(read[: size[0], : size[1]].astype(int) - frame[:, :, ::-1]).mean() < 8  # mp4v is lossy
    assert read[-1, -1].min() > 200 and read[0, 0].max() < 50


def test_csv_quotes_odd_names():
    from unip.seg.predict_run import areas_csv

    text = areas_csv([{"input": "a,b\nc.png", "frame": None, "time_s": None, "width": 2, "height": 1,
                       "pixels": [2], "percent": [100.0]}], ClassInfo(("x",), ((0, 0, 0),)))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1][:2] == ["a,b\\nc.png", ""] and rows[1][6:9] == ["x", "2", "100.0"]
    assert rows[1][9:] == ["", "", "", ""]  # no temperatures: the °C columns are empty


def test_windows_per_forward_follow_free_memory(monkeypatch):
    from unip.seg.predict import Predictor, forward_bytes

    segmentor = tiny_segmentor()
    small = InferencePipeline(scale=(128, 64), crop=64, stride=32)  # 40 x 56 → 64 x 90: 2 windows an image
    predictor = Predictor(segmentor, "cpu", batch_size=2, pipeline=small)
    inputs, window = 2 * 2 * 3 * 64 * 128 * 4, forward_bytes(segmentor, 64, fused_attention=True)
    monkeypatch.setattr("unip.seg.predict.available_bytes", lambda device=None: inputs + 6 * window)
    predictor.plan_memory()
    assert predictor.max_windows == 3
    batch = torch.stack([predictor.pipeline.preprocess(np.repeat(scene(40, 56, s)[:, :, None], 3, axis=2))
                         for s in (1, 2)])
    with torch.no_grad():
        expected = slide_inference(segmentor, batch, crop=64, stride=32)
    torch.testing.assert_close(predictor.logits(batch), expected, atol=1e-5, rtol=1e-5)
    one_image = inputs // 2 + window  # batch 1 fits, batch 2 does not: the batch is to blame
    monkeypatch.setattr("unip.seg.predict.available_bytes", lambda device=None: one_image)
    monkeypatch.setattr("unip.memory.available_bytes", lambda device=None: one_image)
    with pytest.raises(ConfigError, match="--batch-size 2.*lower --batch-size"):
        predictor.plan_memory()
    monkeypatch.setattr("unip.memory.available_bytes", lambda device=None: one_image - 1)  # not even one image
    with pytest.raises(ConfigError, match=r"^one image under the checkpoint's test settings \(resized to fit 64x128 "
                                          r"pixels, windows of 64: its test_scale and crop_size\) needs"):
        predictor.plan_memory()


def test_predict_and_export_use_the_test_scale_the_model_was_evaluated_at():
    """A model fine-tuned with another ``data.scale`` (the toy and demo presets) records ``test_scale``; predict,
    export and evaluate all resize to it (and to the recipe's (2048, 512) without one)."""
    meta = {"test_scale": [512, 128], "crop_size": 128, "stride": 85}
    pipeline = InferencePipeline.of(tiny_segmentor(meta=meta))
    assert pipeline.scale == (512, 128) and pipeline.input_size(128, 160) == (128, 160)
    sample = InferencePipeline.from_meta(meta).transform()({"image": torch.zeros(3, 128, 160, dtype=torch.uint8),
                                                           "label": torch.zeros(128, 160, dtype=torch.uint8)})
    assert tuple(sample["image"].shape[-2:]) == pipeline.input_size(128, 160)
    assert InferencePipeline.from_meta({}).input_size(128, 160) == (512, 640)  # the recipe's scale


def test_one_test_pipeline_for_evaluate_predict_and_export(tmp_path, capsys):
    """A header with a crop and no stride: evaluate, predict and export all read the segmentor's one test pipeline
    and slide with two thirds of the crop (evaluate once fell back to the recipe's 341, predict derived it)."""
    from unip.data.synth import write_soda
    from unip.deploy.onnx_export import default_size, model_metadata

    segmentor = tiny_segmentor(classes=21)
    segmentor.meta = {"crop_size": 96, "test_scale": [256, 64]}
    path = str(save_segmentor(segmentor, tmp_path / "seg.safetensors"))
    loaded = load_segmentor(path)
    assert InferencePipeline.of(loaded).stride == 64 and "stride" not in loaded.meta
    assert model_metadata(loaded, dynamic=False)["unip.stride"] == "64" and default_size(loaded) == (96, 96)
    write_soda(str(tmp_path / "soda"), 2, 2, size=(48, 40), seed=0)
    assert main(["evaluate", "--checkpoint", path, "--data", str(tmp_path / "soda"), "--out",
                     str(tmp_path / "eval"), "--device", "cpu", "--no-progress", "--workers", "0",
                     "--overlays", "0"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (metrics["test"]["crop"], metrics["test"]["stride"]) == (96, 64)
    with pytest.raises(CheckpointError, match=r"seg2\.safetensors: the header's sliding window"):
        segmentor.meta = {"crop_size": 96, "stride": 97}
        load_segmentor(save_segmentor(segmentor, tmp_path / "seg2.safetensors"))


# ============================================================================================ --compile
def test_a_compiled_predictor_gives_the_eager_labels_and_compiles_once_per_shape():
    """``--compile``'s path (``torch.compile`` through the eager and aot_eager backends here: inductor's C++ build is
    minutes on a 2-core CPU): the same labels as eager, the segmentor behind the compiled module unchanged."""
    import torch._dynamo

    from unip.seg.predict import Predictor

    images = [np.repeat(scene(48, 64, seed)[..., None], 3, axis=2) for seed in range(3)] + \
        [np.repeat(scene(40, 40, 9)[..., None], 3, axis=2)]
    eager = Predictor(tiny_segmentor(), "cpu", batch_size=2).predict(images)
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        predictor = Predictor(tiny_segmentor(), "cpu", batch_size=2, compile_mode="default", compile_backend=backend)
        assert predictor.model is not predictor.segmentor and predictor.compile_mode == "default"
        labels = predictor.predict(images)
        assert all(np.array_equal(a, b) for a, b in zip(labels, eager)), backend
    torch._dynamo.reset()


def test_compile_modes_are_checked_before_any_work(checkpoint, tmp_path, capsys):
    from unip.seg.predict import compiled_for_inference

    with pytest.raises(ConfigError, match="--compile fast: choose one of default, reduce-overhead"):
        compiled_for_inference(tiny_segmentor(), "fast", torch.device("cpu"))
    Image.fromarray(scene(32, 32)).save(tmp_path / "frame.png")
    code, _, err = predict(capsys, "--checkpoint", checkpoint, str(tmp_path / "frame.png"), "--out",
                           str(tmp_path / "o"), "--compile", "reduce-overhead", "--device", "cpu")
    assert code == 2 and "--compile reduce-overhead: replays CUDA graphs, so it needs a CUDA device" in err
    assert not (tmp_path / "o").exists()


def test_the_memory_plan_counts_no_attention_matrix_for_fused_attention():
    """PyTorch's fused attention never holds tokens x tokens (a 4096-pixel window of a tiny model needs about 1 GB,
    not the 70 GB its attention matrices would); an exported ONNX graph does hold them."""
    from unip.seg.predict import forward_bytes

    segmentor = tiny_segmentor()
    backbone = segmentor.backbone
    tokens = (4096 // backbone.patch_size) ** 2 + backbone.num_prefix_tokens
    matrices = 4 * max(backbone.heads_per_block) * tokens * tokens * 2
    assert forward_bytes(segmentor, 4096) - forward_bytes(segmentor, 4096, fused_attention=True) == matrices
    assert forward_bytes(segmentor, 4096, fused_attention=True) < 2 << 30 < matrices
