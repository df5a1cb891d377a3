"""Statistics of a manifest or pack, and the `unip data` command line end to end."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from unip.cli import main
from unip.data.infmix import build_manifest, read_manifest
from unip.data.packed import PackedImages
from unip.data.stats import compute_stats, write_stats


def _two_constant_images(tmp_path):
    root = tmp_path / "ir"
    for name, value, shape in (("dark", 0, (10, 10)), ("bright", 255, (30, 40))):
        folder = root / name / "thermal"
        folder.mkdir(parents=True)
        Image.fromarray(np.full(shape, value, np.uint8)).save(folder / "x.png")
    out = str(tmp_path / "m.jsonl")
    build_manifest(out, infrared=str(root))
    return out


def test_stats_weight_images_equally_and_pixels_separately(tmp_path):
    stats = compute_stats(_two_constant_images(tmp_path))
    overall = stats["overall"]
    assert overall["images"] == 2
    assert overall["mean"] == pytest.approx(0.5) and overall["std"] == pytest.approx(0.5)
    assert overall["pixel_mean"] == pytest.approx(1200 / 1300)
    assert stats["sources"]["dark"]["mean"] == 0 and stats["sources"]["bright"]["std"] == pytest.approx(0)
    bright = stats["sources"]["bright"]
    assert bright["short_side_hist"][0] == 1 and bright["top_sizes"] == {"40x30": 1}
    json_path, png_path = write_stats(stats, str(tmp_path / "out" / "s"))
    assert json.load(open(json_path))["overall"]["images"] == 2
    with Image.open(png_path) as img:
        assert img.format == "PNG" and img.size[0] > 300


def test_stats_limit_samples_a_subset(tmp_path):
    stats = compute_stats(_two_constant_images(tmp_path), limit=1, seed=0)
    assert stats["sampled"] == 1 and stats["total"] == 2 and stats["overall"]["images"] == 1
    assert not math.isnan(stats["overall"]["mean"])


def test_cli_synth_infmix_stats_pack(tmp_path, capsys):
    ir, soda = str(tmp_path / "ir"), str(tmp_path / "soda")
    assert main(["data", "synth", "--out", ir, "--num", "4", "--name", "a", "--name", "b",
                 "--size", "40x32"]) == 0
    assert main(["data", "synth", "--out", soda, "--labeled", "--num", "4", "--size", "40x32"]) == 0
    assert "18: sky" in capsys.readouterr().out
    assert sorted(os.listdir(soda)) == ["JPEGImages", "SegmentationClassPNG", "test_infrared.txt",
                                        "train_infrared.txt"]
    (tmp_path / "ir" / "a" / "thermal" / "bad.jpg").write_bytes(b"\xff\xd8\xff")
    manifest = str(tmp_path / "m.jsonl")
    assert main(["data", "infmix", "--infrared", ir, "--extra", f"{soda}/JPEGImages", "--out", manifest]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "JPEGImages" in out and len(read_manifest(manifest)) == 12
    assert main(["data", "stats", manifest]) == 0
    assert os.path.isfile(str(tmp_path / "m.stats.json")) and os.path.isfile(str(tmp_path / "m.stats.png"))
    assert main(["data", "pack", manifest, "--out", str(tmp_path / "pack"), "--short-side", "16"]) == 0
    assert "packed 12 images" in capsys.readouterr().out
    assert min(PackedImages(str(tmp_path / "pack"), transform=None)[0].shape[1:]) == 16
    assert main(["data", "stats", str(tmp_path / "pack")]) == 0
    assert json.load(open(tmp_path / "pack.stats.json"))["overall"]["images"] == 12


@pytest.mark.parametrize("argv", [
    ["data", "pack", "missing.jsonl", "--out", "p"],
    ["data", "infmix", "--infrared", "missing-root", "--out", "m.jsonl"],
    ["data", "stats", "missing.jsonl"],
    ["data", "synth", "--out", "s", "--size", "big"],
    ["data", "infmix", "--extra", ".", "--out", "."],
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("unip data: error:")
