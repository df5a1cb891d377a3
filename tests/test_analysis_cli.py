"""``unip analyze`` end to end on a random-weight ViT-S and a tiny image folder; image loading; bad input."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from unip.analysis.images import ImageFolder, list_images, load_image, parse_normalization
from unip.checkpoint import save_checkpoint
from unip.cli import main
from unip.errors import ConfigError, DataError
from unip.models import create_model

SIZE = 64  # ViT-S at 64 px (4x4 tokens) keeps the end-to-end tests fast


@pytest.fixture(scope="module")
def vit_s(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "vit_s_random.safetensors"
    save_checkpoint(create_model("vit_small_patch16", img_size=SIZE), path)
    return str(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 90 * 120).reshape(90, 120)
    Image.fromarray(rng.integers(0, 256, (80, 100), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(ramp.astype(np.uint8)).convert("RGB").save(folder / "b.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(folder / "c.bmp")
    Image.fromarray((ramp * 200 + 3000).astype(np.uint16)).save(folder / "d16.png")  # 16-bit thermal
    os.makedirs(folder / "sub")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(folder / "sub" / "e.tiff")
    (folder / "notes.txt").write_text("not an image")
    return str(folder)


def run_cli(capsys, *argv):
    code = main(["analyze", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_writes_every_file(vit_s, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "--model", vit_s, "--model", vit_s, "--images", image_dir,
                              "--out", str(out), "--query", "10,20", "--query", "40,40", "--no-progress",
                              "--compare-features", "--batch-size", "2")
    assert code == 0
    expected = {"profile.json", "profile.csv", "nmi.png", "distance.png", "attention_vit_s_random.png",
                "attention_vit_s_random-2.png", "features.png"}
    assert expected <= set(os.listdir(out))
    document = json.loads((out / "profile.json").read_text())
    assert [m["label"] for m in document["models"]] == ["vit_s_random", "vit_s_random-2"]
    first = document["models"][0]
    assert first["num_images"] == 5 and first["depth"] == 12 and first["grid"] == [4, 4]
    assert 1 <= first["selected_layer"] <= 12
    assert {layer["pattern"] for layer in first["layers"]} <= {"local", "hybrid", "global"}
    assert document["thresholds"] == {"nmi_local": 0.4, "nmi_global": 0.1, "local_distance": 0.3}
    with open(out / "profile.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 12 * 6
    assert list(rows[0])[:7] == ["model", "layer", "head", "nmi", "distance", "entropy", "pattern"]
    assert all(0.0 <= float(r["nmi"]) <= 1.0 and float(r["distance"]) > 0 for r in rows)
    assert f"selected layer for NMI-HAD: layer {first['selected_layer']} of 12" in stdout
    for name in expected - {"profile.json", "profile.csv"}:
        with Image.open(out / name) as img:
            assert img.size[0] > 100


def test_analyze_options_reach_the_report(vit_s, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "--model", vit_s, "--images", image_dir, "--out", str(out),
                              "--num-images", "2", "--size", "48,80", "--norm", "imagenet",
                              "--nmi-local", "0.5", "--nmi-global", "0.001", "--no-progress")
    assert code == 0
    document = json.loads((out / "profile.json").read_text())
    model = document["models"][0]
    assert model["num_images"] == 2 and model["grid"] == [3, 5] and model["input_size"] == [48, 80]
    assert document["images"]["normalization"]["mean"] == [0.485, 0.456, 0.406]
    # with the global threshold near 0 the random model's layers are hybrid: the deepest one is chosen
    assert model["selected_layer"] == 12 and model["selection_reason"] == "deepest hybrid layer"
    assert "12     6" in stdout and "hybrid  ← distil" in stdout


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("unip analyze: error: ")
    return lines[0]


def test_no_images_is_exit_2_with_one_line(vit_s, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "--model", vit_s, "--images", str(empty), "--out", str(tmp_path / "o"))
    assert code == 2 and "no images found" in _one_error_line(err)
    code, _, err = run_cli(capsys, "--model", vit_s, "--images", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in _one_error_line(err)
    (empty / "frame.png").write_bytes(b"")
    code, _, err = run_cli(capsys, "--model", vit_s, "--images", str(empty / "frame.png"))
    assert code == 2 and f"is a file, not a folder of images; pass the folder that holds it (--images {empty})" \
        in _one_error_line(err)


def test_unreadable_images_only_is_exit_2(vit_s, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"")
    (folder / "y.jpg").write_bytes(b"not a jpeg")
    code, _, err = run_cli(capsys, "--model", vit_s, "--images", str(folder), "--out", str(tmp_path / "o"),
                           "--no-progress")
    assert code == 2 and "none of the 2 image files could be read" in _one_error_line(err)


def test_unreadable_model_is_exit_2(image_dir, tmp_path, capsys):
    garbage = tmp_path / "model.pth"
    garbage.write_bytes(b"\x00 definitely not a checkpoint")
    code, _, err = run_cli(capsys, "--model", str(garbage), "--images", image_dir, "--out", str(tmp_path / "o"))
    assert code == 2 and str(garbage) in _one_error_line(err)
    code, _, err = run_cli(capsys, "--model", str(tmp_path / "nope.safetensors"), "--images", image_dir)
    assert code == 2 and "nope.safetensors" in _one_error_line(err)


@pytest.mark.parametrize("argv, message", [
    (["--query", "5"], "--query '5'"),
    (["--query", "500,5"], "outside the 64x64 model input"),
    (["--nmi-local", "0.05"], "NMI thresholds"),
    (["--norm", "sepia"], "--norm 'sepia'"),
    (["--size", "0"], "--size '0'"),
    (["--num-images", "-1"], "--num-images -1"),
    (["--batch-size", "0"], "batch size must be at least 1"),
    (["--device", "nonsense"], "--device 'nonsense'"),
])
def test_bad_options_are_exit_2(vit_s, image_dir, tmp_path, capsys, argv, message):
    code, _, err = run_cli(capsys, "--model", vit_s, "--images", image_dir, "--out", str(tmp_path / "o"),
                           "--no-progress", *(["--num-images", "1"] if "--num-images" not in argv else []), *argv)
    assert code == 2 and message in _one_error_line(err)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--model", "--images", "--num-images", "--out", "--query", "--norm", "--nmi-local",
                   "--nmi-global", "--local-distance", "--compare-features"):
        assert option in help_text


# ----------------------------------------------------------------------------------- images
def test_images_are_grayscale_x3_and_normalised(image_dir):
    paths = list_images(image_dir)
    assert [os.path.basename(p) for p in paths] == ["a.png", "b.jpg", "c.bmp", "d16.png", "e.tiff"]
    x = load_image(os.path.join(image_dir, "d16.png"), (32, 48))
    assert x.shape == (3, 32, 48) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    # the 16-bit ramp is stretched to the full 8-bit range, then normalised with InfMix mean/std
    assert x.min().item() == pytest.approx((0 - 0.3801) / 0.1871, abs=0.05)
    assert x.max().item() == pytest.approx((1 - 0.3801) / 0.1871, abs=0.05)
    raw = load_image(os.path.join(image_dir, "a.png"), (80, 100), parse_normalization("none"))
    expected = np.asarray(Image.open(os.path.join(image_dir, "a.png")), dtype=np.float32) / 255
    np.testing.assert_allclose(raw[0].numpy(), expected, atol=1e-6)
    assert parse_normalization("0.5,0.25").std == (0.25,) * 3
    with pytest.raises(ConfigError):
        parse_normalization("0.5,0")


def test_image_folder_skips_unreadable_files(tmp_path):
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    folder = ImageFolder.from_folder(str(tmp_path), (16, 16))
    with pytest.warns(UserWarning, match="broken.png"):
        loaded = list(folder)
    assert len(loaded) == 1 and [e.path for e in folder.skipped] == [str(tmp_path / "broken.png")]
    with pytest.raises(DataError):
        ImageFolder([str(tmp_path / "broken.png")], (16, 16)).first()


def test_a_rerun_into_an_out_folder_inside_the_images_does_not_analyse_its_own_figures(vit_s, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(frames / name)
    argv = ("--model", vit_s, "--images", str(frames), "--out", str(frames / "analysis"), "--no-progress")
    for _ in range(2):  # the second run finds the first one's PNG figures in frames/analysis
        code, out, _ = run_cli(capsys, *argv)
        assert code == 0 and "2 images" in out, out
    assert json.loads((frames / "analysis" / "profile.json").read_text())["models"][0]["num_images"] == 2


def test_linked_folders_of_frames_are_listed_once(tmp_path):
    """``--images frames`` where ``frames/cam`` links to the frames elsewhere (and a link loops back): each
    image once, not "no images found"."""
    store = tmp_path / "disk2"
    store.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(store / name)
    frames = tmp_path / "frames"
    frames.mkdir()
    os.symlink(store, frames / "cam")
    os.symlink(frames, store / "loop")
    assert list_images(str(frames)) == [str(frames / "cam" / "a.png"), str(frames / "cam" / "b.png")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_exit_2(vit_s, image_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", vit_s, "--images", image_dir, "--out", str(tmp_path / "o"),
                           "--device", "cuda")
    assert code == 2 and "CUDA is not available" in _one_error_line(err)


def test_a_single_patch_input_is_refused_with_one_line(tmp_path):
    """One patch has no attention pattern (its uniform-attention distance is 0): refused before any work."""
    import torch

    from unip.analysis.run import check_input_size
    from unip.errors import ConfigError
    from unip.models import create_model

    model = create_model("vit_small_patch16", depth=1, embed_dim=32, num_heads=2, img_size=32)
    with pytest.raises(ConfigError, match="at least two patches"):
        check_input_size(model, (16, 16), 1, torch.device("cpu"))
    check_input_size(model, (16, 32), 1, torch.device("cpu"))


def test_cpu_linear_kernel_choice_keeps_the_profile(vit_s, image_dir, tmp_path, capsys, monkeypatch):
    """``UNIP_CPU_LINEAR=onednn`` (the oneDNN fp32 kernel, chosen automatically where faster) profiles the same
    numbers as PyTorch's default kernel; a wrong value is one line, exit 2."""
    documents = []
    for choice in ("default", "onednn"):
        monkeypatch.setenv("UNIP_CPU_LINEAR", choice)
        out = tmp_path / choice
        code, _, _ = run_cli(capsys, "--model", vit_s, "--images", image_dir, "--out", str(out), "--no-progress")
        assert code == 0
        documents.append(json.loads((out / "profile.json").read_text())["models"][0])
    default, onednn = documents
    assert onednn["selected_layer"] == default["selected_layer"]
    for ours, reference in zip(onednn["layers"], default["layers"]):
        assert ours["pattern"] == reference["pattern"]
        assert ours["nmi"] == pytest.approx(reference["nmi"], rel=1e-4, abs=1e-6)
    monkeypatch.setenv("UNIP_CPU_LINEAR", "fastest")
    code, _, err = run_cli(capsys, "--model", vit_s, "--images", image_dir, "--out", str(tmp_path / "bad"))
    assert code == 2 and "UNIP_CPU_LINEAR='fastest': choose one of auto, onednn, default" in _one_error_line(err)
