"""Statistics of a manifest or pack, and the `unip data` command line end to end."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unip.cli import main
from unip.data.infmix import build_manifest, read_manifest
from unip.data.packed import PackedImages
from unip.data.stats import compute_stats, write_stats
from unip.data.synth import write_unlabeled
from unip.errors import DataError


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


def test_stats_of_a_sample_say_so(tmp_path, capsys):
    manifest = _two_constant_images(tmp_path)
    assert main(["data", "stats", manifest, "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "a random sample of 1 of the 2 images (--limit): the numbers below estimate " \
                                  "the whole set"
    saved = json.load(open(tmp_path / "m.stats.json"))
    assert saved["sampled"] == 1 and saved["total"] == 2
    assert main(["data", "stats", manifest, "--limit", "5"]) == 0  # every image read: no sample
    assert "random sample" not in capsys.readouterr().out


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
    packed = PackedImages(str(tmp_path / "pack"), transform=None)
    pixels = sum(packed[i].numel() for i in range(len(packed)))  # 12 images of 16 x 20: 3,840 bytes
    assert f"packed 12 images ({round(pixels / 1024)} KiB)" in capsys.readouterr().out
    assert min(packed[0].shape[1:]) == 16
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
    assert len(err.splitlines()) == 1 and err.startswith(f"unip data {argv[1]}: error:")


def test_stats_names_the_unreadable_files_and_keeps_their_source(tmp_path, capsys):
    root = tmp_path / "ir"
    kept = write_unlabeled(str(root), 3, name="kept", size=(32, 32))
    gone = write_unlabeled(str(root), 2, name="gone", size=(32, 32))
    manifest = str(tmp_path / "m.jsonl")
    build_manifest(manifest, infrared=str(root), workers=1)
    for path in gone + kept[:1]:
        os.remove(path)
    capsys.readouterr()
    assert main(["data", "stats", manifest]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.match(r"overall +images +2 .* unreadable 3$", out[0])
    assert re.match(r"gone +images +0  no readable image  unreadable 2$", out[1])
    assert re.match(r"kept +images +2 .* unreadable 1$", out[2])
    assert out[3].startswith("skipped 3 unreadable file(s) (missing 3): ") and "`unip data infmix`" in out[3]
    assert all(path in out[3] for path in gone + kept[:1])
    stats = json.load(open(tmp_path / "m.stats.json"))
    assert stats["sources"]["gone"]["mean"] is None and len(stats["unreadable"]) == 3
    assert {e["source"] for e in stats["unreadable"]} == {"gone", "kept"}


@pytest.mark.parametrize("argv, match", [
    (["--labeled", "--bit-depth", "16"], "--bit-depth does not apply with --labeled"),
    (["--labeled", "--bit-depth", "8"], "--bit-depth does not apply with --labeled"),
    (["--labeled", "--name", "cam"], "--name does not apply with --labeled"),
    (["--num-test", "1"], "--num-test does not apply without --labeled"),
    (["--labeled", "--num", "1"], "one training and one test image"),
    (["--labeled", "--num", "4", "--num-test", "0"], "--num-test"),
])
def test_synth_refuses_options_it_would_ignore(tmp_path, capsys, argv, match):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--size", "32x32", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("unip data synth: error:") and match in err
    assert not os.path.exists(tmp_path / "s")


def test_a_small_labeled_set_has_a_test_image_and_passes_check_seg(tmp_path, capsys):
    root = str(tmp_path / "s")
    assert main(["data", "synth", "--labeled", "--out", root, "--num", "3", "--size", "32x32"]) == 0
    assert "(train 2, test 1)" in capsys.readouterr().out
    assert main(["data", "check-seg", root, "--workers", "1"]) == 0


def test_pack_says_what_it_was_given_instead_of_a_manifest(tmp_path, capsys):
    root = tmp_path / "ir"
    write_unlabeled(str(root), 2, name="a", size=(32, 32))
    manifest = str(tmp_path / "m.jsonl")
    build_manifest(manifest, infrared=str(root), workers=1)
    pack = str(tmp_path / "pack")
    assert main(["data", "pack", manifest, "--out", pack]) == 0
    cases = [(pack, f"is a pack folder .* pass the manifest it was made from \\({re.escape(manifest)}\\)"),
             (os.path.join(pack, "index.json"), f"is a pack's index, not a manifest; .* pass its folder {pack}"),
             (str(tmp_path / "m.report.json"), f"is the scan report .* \\({re.escape(manifest)}\\)"),
             (str(root), "is a folder, not a manifest file; scan it into one with `unip data infmix --extra")]
    for given, match in cases:
        capsys.readouterr()
        assert main(["data", "pack", given, "--out", str(tmp_path / "p2")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("unip data pack: error:"), err
        assert re.search(match, err), err
    assert main(["data", "stats", os.path.join(pack, "index.json")]) == 2
    assert "pass its folder" in capsys.readouterr().err
    assert main(["data", "stats", str(root)]) == 2  # a folder of images: scan it first (not "build the pack")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unip data infmix --extra {root} --out MANIFEST.jsonl" in err, err


def test_a_file_gone_since_the_scan_says_to_rescan(tmp_path):
    from unip.data.packed import ManifestImages

    paths = write_unlabeled(str(tmp_path / "ir"), 2, name="a", size=(32, 32))
    manifest = str(tmp_path / "m.jsonl")
    build_manifest(manifest, infrared=str(tmp_path / "ir"), workers=1)
    os.remove(paths[1])
    with pytest.raises(DataError, match=r"listed in .*m.jsonl but gone since the scan \(missing\); rescan with"):
        ManifestImages(manifest).read(1)


def _child_env() -> dict:
    """The environment of a `python -m unip.cli` child that imports the same unip as this test."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def test_a_closed_stdout_is_not_an_error(tmp_path):
    """`unip data stats m.jsonl | head -1`: the reader goes away; the verb still writes its files and exits 0."""
    write_unlabeled(str(tmp_path / "ir"), 2, name="a", size=(32, 32))
    manifest = str(tmp_path / "m.jsonl")
    build_manifest(manifest, infrared=str(tmp_path / "ir"), workers=1)
    process = subprocess.Popen([sys.executable, "-m", "unip.cli", "data", "stats", manifest],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env())
    process.stdout.close()  # before the first line: every write meets a closed pipe
    err = process.stderr.read().decode()
    assert process.wait() == 0 and err == ""
    assert os.path.isfile(tmp_path / "m.stats.json") and os.path.isfile(tmp_path / "m.stats.png")
    shell = subprocess.run(["bash", "-c", 'set -o pipefail; "$0" -m unip.cli data infmix --infrared "$1" --out "$2" '
                            '| head -1', sys.executable, str(tmp_path / "ir"), manifest],
                           capture_output=True, text=True, env=_child_env())
    assert shell.returncode == 0 and shell.stderr == "" and shell.stdout.startswith("source")


def test_a_stats_write_cut_short_keeps_the_earlier_file(tmp_path):
    """A disk that fills up while `data stats` writes its JSON (here: a file-size limit of 512 bytes in the child)
    fails that run, but the earlier stats file stays whole, so the next run recognises and replaces it."""
    import resource
    import signal

    write_unlabeled(str(tmp_path / "ir"), 2, name="a", size=(32, 32))
    manifest = str(tmp_path / "m.jsonl")
    build_manifest(manifest, infrared=str(tmp_path / "ir"), workers=1)
    assert main(["data", "stats", manifest]) == 0
    before = (tmp_path / "m.stats.json").read_bytes()
    assert len(before) > 512

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))

    child = subprocess.run([sys.executable, "-m", "unip.cli", "data", "stats", manifest], capture_output=True,
                           text=True, env=_child_env(), preexec_fn=small_disk)
    assert child.returncode == 2 and len(child.stderr.strip().splitlines()) == 1, child.stderr
    assert (tmp_path / "m.stats.json").read_bytes() == before
    assert main(["data", "stats", manifest]) == 0
