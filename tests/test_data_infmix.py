"""Scanning image trees into a manifest: checks, duplicates, symlinks, 16-bit frames, incremental rescans."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from unip.data import infmix
from unip.data.images import read_gray, resized_shape, stretch_to_uint8
from unip.data.infmix import build_manifest, read_manifest, report_path
from unip.data.synth import write_unlabeled
from unip.errors import DataError

SIZE = (64, 48)


@pytest.fixture()
def tree(tmp_path):
    """An infrared root with good images and one file of every kind of trouble; returns (root, good, bad)."""
    root = tmp_path / "ir"
    good = write_unlabeled(str(root), 4, name="A", size=SIZE, seed=1)
    good += write_unlabeled(str(root), 3, name="B", size=SIZE, seed=1)
    good += write_unlabeled(str(root), 2, name="C", size=SIZE, seed=1, bit_depth=16)
    a = root / "A" / "thermal"
    data = open(good[0], "rb").read()
    (a / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (a / "zero.png").write_bytes(b"")
    (a / "text.png").write_text("not an image\n")
    (a / "notes.txt").write_text("calibration notes\n")
    (root / "B" / "thermal" / "copy.jpg").write_bytes(open(good[1], "rb").read())
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(open(good[2], "rb").read())
    os.symlink(outside, a / "escape.jpg")
    os.symlink(tmp_path, root / "B" / "thermal" / "escape_dir")
    bad = {"truncated.jpg": "truncated", "zero.png": "empty", "text.png": "not-an-image",
           "notes.txt": "unsupported-type", "copy.jpg": "duplicate", "escape.jpg": "outside-root",
           "escape_dir": "outside-root"}
    return root, good, bad


def test_manifest_holds_exactly_the_good_images_and_report_names_each_bad_one(tree, tmp_path):
    root, good, bad = tree
    out = str(tmp_path / "m" / "infmix.jsonl")
    result = build_manifest(out, infrared=str(root), workers=2)
    records = read_manifest(out)
    assert sorted(r["path"] for r in records) == sorted(os.path.abspath(p) for p in good)
    report = json.load(open(report_path(out)))
    reasons = {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}
    assert reasons == bad
    dup = next(s for s in report["skipped"] if s["reason"] == "duplicate")
    assert good[1] in dup["detail"]
    assert {k: v["images"] for k, v in result.counts.items()} == {"A": 4, "B": 3, "C": 2}
    assert result.counts["A"]["skipped"] == 5 and result.counts["B"]["duplicates"] == 1
    assert "total" in result.table() and "A" in result.table()


def test_records_describe_the_files(tree, tmp_path):
    root, good, _ = tree
    out = str(tmp_path / "infmix.jsonl")
    build_manifest(out, infrared=str(root), workers=1)
    by_path = {r["path"]: r for r in read_manifest(out)}
    rec = by_path[os.path.abspath(good[-1])]
    assert (rec["width"], rec["height"], rec["source"], rec["kind"]) == (64, 48, "C", "infrared")
    assert rec["mode"].startswith("I;16") and rec["bytes"] == os.path.getsize(good[-1])
    assert len({r["hash"] for r in by_path.values()}) == len(by_path)


def test_rescan_reads_only_new_or_changed_files_and_drops_deleted_ones(tree, tmp_path):
    root, good, _ = tree
    out = str(tmp_path / "infmix.jsonl")
    first = build_manifest(out, infrared=str(root), workers=2)
    assert first.read == len(good) + 5 and first.reused == 0  # 5 bad files are read, 2 refused unread
    again = build_manifest(out, infrared=str(root), workers=2)
    assert again.read == 0 and again.reused == len(good) + 5
    Image.fromarray(np.full((10, 20), 7, np.uint8)).save(good[0])
    os.utime(good[0], ns=(1, 1))
    os.remove(good[4])
    Image.fromarray(np.full((12, 16), 9, np.uint8)).save(root / "A" / "thermal" / "new.png")
    third = build_manifest(out, infrared=str(root), workers=2)
    assert third.read == 2 and third.reused == len(good) - 2 + 5
    records = {r["path"]: r for r in read_manifest(out)}
    changed = records[os.path.abspath(good[0])]
    assert (changed["width"], changed["height"]) == (20, 10)
    assert os.path.abspath(good[4]) not in records and len(records) == len(good)


def test_symlinks_that_stay_inside_the_root_are_followed(tmp_path):
    root = tmp_path / "ir"
    files = write_unlabeled(str(root), 2, name="A", size=SIZE, seed=1)
    store = root / "store"
    store.mkdir()
    Image.fromarray(np.full((8, 8), 50, np.uint8)).save(store / "kept.png")
    os.symlink(store, root / "A" / "thermal" / "linked_dir")
    os.symlink(files[0], root / "A" / "thermal" / "z_alias.jpg")
    out = str(tmp_path / "m.jsonl")
    result = build_manifest(out, infrared=str(root))
    paths = sorted(os.path.basename(r["path"]) for r in read_manifest(out))
    assert paths == ["A_000000.jpg", "A_000001.jpg", "kept.png"]
    assert [(os.path.basename(s["path"]), s["reason"]) for s in result.skipped] == [("z_alias.jpg", "duplicate")]


def test_a_scan_that_finds_nothing_says_why(tmp_path):
    """A data set linked into the root from elsewhere (``root/A/thermal`` → a folder outside ``root``) is not read;
    the error says so, with the count per reason, rather than only pointing at the report."""
    store = tmp_path / "disk2"
    write_unlabeled(str(store), 2, name="A", size=SIZE, seed=1)
    (tmp_path / "ir" / "A").mkdir(parents=True)
    os.symlink(store / "A" / "thermal", tmp_path / "ir" / "A" / "thermal")
    with pytest.raises(DataError, match=r"2 file\(s\) skipped: 2 outside-root: a symlink is read only when its "
                                        r"real path stays inside the root .* pass the folders it points to"):
        build_manifest(str(tmp_path / "m.jsonl"), infrared=str(tmp_path / "ir"), workers=1)


def test_interrupted_scan_resumes_from_its_journal(tree, tmp_path, monkeypatch):
    root, good, _ = tree
    out = str(tmp_path / "infmix.jsonl")
    real = infmix.inspect_file
    calls = []

    def failing(cand):
        calls.append(cand.path)
        if len(calls) == 5:
            raise RuntimeError("power cut")
        return real(cand)

    monkeypatch.setattr(infmix, "inspect_file", failing)
    with pytest.raises(RuntimeError):
        build_manifest(out, infrared=str(root), workers=1)
    assert not os.path.exists(out)
    monkeypatch.setattr(infmix, "inspect_file", real)
    resumed = build_manifest(out, infrared=str(root), workers=1)
    assert resumed.reused == 4 and resumed.read == len(good) + 5 - 4
    assert not os.path.exists(out + ".journal")


def test_imagenet_first_k_per_class_coco_and_extra(tmp_path):
    imagenet = tmp_path / "imagenet"
    for cls in ("n01", "n02"):
        write_unlabeled(str(imagenet), 5, name=cls, size=SIZE, seed=2)
        for p in (imagenet / cls / "thermal").iterdir():
            p.rename(imagenet / cls / p.name)
        (imagenet / cls / "thermal").rmdir()
    write_unlabeled(str(tmp_path / "coco"), 3, name="train2017", size=SIZE, seed=3)
    os.rename(tmp_path / "coco" / "train2017" / "thermal", tmp_path / "coco" / "t")
    os.rmdir(tmp_path / "coco" / "train2017")
    os.rename(tmp_path / "coco" / "t", tmp_path / "coco" / "train2017")
    extra = write_unlabeled(str(tmp_path / "x"), 2, name="mine", size=SIZE, seed=4)
    out = str(tmp_path / "m.jsonl")
    result = build_manifest(out, imagenet=str(imagenet), per_class=3, coco=str(tmp_path / "coco"),
                            extra=[os.path.dirname(extra[0])])
    names = sorted(os.path.basename(r["path"]) for r in read_manifest(out) if r["source"] == "ImageNet")
    assert names == sorted(f"{c}_{i:06d}.jpg" for c in ("n01", "n02") for i in range(3))
    assert {k: v["images"] for k, v in result.counts.items()} == {"ImageNet": 6, "COCO": 3, "thermal": 2}


def test_bad_arguments_raise_data_error_naming_the_path(tmp_path):
    with pytest.raises(DataError, match="no source"):
        build_manifest(str(tmp_path / "m.jsonl"))
    with pytest.raises(DataError, match="nowhere"):
        build_manifest(str(tmp_path / "m.jsonl"), infrared=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="thermal"):
        build_manifest(str(tmp_path / "m.jsonl"), infrared=str(tmp_path / "empty"))
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"path": "a", "source": "s"}\n{oops\n')
    with pytest.raises(DataError, match="broken.jsonl:2"):
        read_manifest(str(bad))


def test_16bit_stretch_uses_robust_percentiles():
    rng = np.random.default_rng(0)
    raw = rng.integers(7000, 9000, (48, 64)).astype(np.uint16)
    raw[0, 0] = 65535  # one saturated pixel must not squash the range
    out = stretch_to_uint8(raw)
    lo, hi = np.percentile(raw, [1, 99])
    assert out.dtype == np.uint8 and out.shape == raw.shape
    assert out[raw <= lo].max() == 0 and out[raw >= hi].min() == 255
    mid = (raw > lo + 200) & (raw < hi - 200)
    assert 10 < out[mid].min() and out[mid].max() < 245
    assert np.all(np.diff(out.ravel()[np.argsort(raw.ravel(), kind="stable")].astype(int)) >= 0)
    assert not stretch_to_uint8(np.full((4, 4), 9000, np.uint16)).any()


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_read_gray_stretches_16bit_files_and_lumas_colour(tmp_path, suffix):
    raw = (np.arange(48 * 64).reshape(48, 64) * 5 + 6000).astype(np.uint16)
    path = str(tmp_path / f"raw{suffix}")
    Image.fromarray(raw).save(path)
    np.testing.assert_array_equal(read_gray(path), stretch_to_uint8(raw))
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(read_gray(str(tmp_path / "c.png")), expected)


def test_float_frames_with_nan_pixels_are_stretched_over_the_finite_ones(tmp_path):
    from unip.data.images import ImageReadError, read_rgb

    frame = np.linspace(20.0, 40.0, 48 * 64, dtype=np.float32).reshape(48, 64)  # degrees Celsius, say
    holed = frame.copy()
    holed[0, :5], holed[1, 0], holed[1, 1] = np.nan, np.inf, -np.inf
    out = stretch_to_uint8(holed)
    finite = np.isfinite(holed)
    lo, hi = np.percentile(holed[finite], [1, 99])
    expected = np.clip(np.rint((holed[finite] - lo) * 255 / (hi - lo)), 0, 255)
    np.testing.assert_array_equal(out[finite], expected)
    assert out[2:].std() > 50 and not out[0, :5].any() and out[1, 0] == 255 and out[1, 1] == 0
    Image.fromarray(holed).save(tmp_path / "holed.tif")
    np.testing.assert_array_equal(read_gray(str(tmp_path / "holed.tif")), out)
    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(tmp_path / "dead.tif")
    for read in (read_gray, read_rgb):
        with pytest.raises(ImageReadError, match="dead.tif.*finite"):
            read(str(tmp_path / "dead.tif"))


def test_resized_shape_keeps_aspect_and_never_upscales():
    assert resized_shape(1024, 2048, 512) == (512, 1024)
    assert resized_shape(2000, 1000, 512) == (1024, 512)
    assert resized_shape(480, 640, 512) == (480, 640)


def test_scan_skips_what_the_readers_would_refuse_and_survives_its_own_damaged_manifest(tmp_path):
    """An all-NaN float frame decodes but has no pixel to read: the scan skips it (``no-finite-pixels``) instead
    of passing it on to pack or to training; a damaged earlier manifest is only a cache (the rescan reads all)."""
    root = tmp_path / "ir"
    write_unlabeled(str(root), 3, name="A", size=SIZE, seed=1)
    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(root / "A" / "thermal" / "dead.tif")
    manifest = str(tmp_path / "m.jsonl")
    build_manifest(manifest, infrared=str(root), workers=1)
    assert len(read_manifest(manifest)) == 3
    skipped = json.loads(open(report_path(manifest)).read())["skipped"]
    assert [(os.path.basename(e["path"]), e["reason"]) for e in skipped] == [("dead.tif", "no-finite-pixels")]

    lines = open(manifest).read().splitlines()
    open(manifest, "w").write("\n".join(lines[:-1] + [lines[-1][:10]]) + "\n")  # a half-written last record
    with pytest.raises(DataError):
        read_manifest(manifest)
    build_manifest(manifest, infrared=str(root), workers=1)
    assert len(read_manifest(manifest)) == 3


def test_a_read_error_in_a_loader_worker_stays_a_data_error(tmp_path):
    """torch re-raises a worker's exception as ``type(msg)``: the error keeps its kind (exit 2, one line)."""
    from torch.utils.data import DataLoader

    from unip.data.images import ImageReadError
    from unip.data.packed import ManifestImages

    rebuilt = ImageReadError("x.jpg: cannot read (io-error)")
    assert isinstance(rebuilt, DataError) and str(rebuilt) == "x.jpg: cannot read (io-error)"
    root = tmp_path / "ir"
    paths = write_unlabeled(str(root), 2, name="A", size=SIZE, seed=1)
    manifest = str(tmp_path / "m.jsonl")
    build_manifest(manifest, infrared=str(root), workers=1)
    os.remove(paths[0])
    with pytest.raises(DataError, match=os.path.basename(paths[0])):
        list(DataLoader(ManifestImages(manifest), batch_size=2, num_workers=1))


def test_a_header_far_beyond_the_pixel_limit_is_too_large(tmp_path):
    import struct
    import zlib

    from unip.data.images import ImageReadError, decode

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    with pytest.raises(ImageReadError) as caught:
        decode(data, "huge.png")
    assert caught.value.reason == "too-large"


def _images(folder, n: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((16, 16), 40 * i + 10, np.uint8)).save(folder / f"{folder.name}_{i}.png")


def test_coco_root_without_train2017_is_refused_and_its_train_folder_or_a_plain_folder_is_read(tmp_path):
    coco = tmp_path / "coco"
    _images(coco / "val2017")
    (coco / "annotations").mkdir()
    out = str(tmp_path / "m.jsonl")
    with pytest.raises(DataError, match=r"coco: a COCO root without train2017/ \(it holds annotations/, val2017/\)"):
        build_manifest(out, coco=str(coco))
    assert not os.path.exists(out)
    _images(coco / "train2017", 3)
    assert build_manifest(out, coco=str(coco)).counts["COCO"]["images"] == 3  # the root, now with train2017/
    assert build_manifest(out, coco=str(coco / "train2017")).counts["COCO"]["images"] == 3  # train2017 itself
    assert build_manifest(out, coco=str(coco / "val2017")).counts["COCO"]["images"] == 2  # a plain folder


def test_imagenet_and_infrared_roots_of_another_shape_are_refused(tmp_path, caplog):
    imagenet = tmp_path / "imagenet"
    _images(imagenet / "train" / "n01440764")
    _images(imagenet / "val")
    out = str(tmp_path / "m.jsonl")
    with pytest.raises(DataError, match=r"holds train/, val/: an ImageNet root.* --imagenet .*imagenet/train$"):
        build_manifest(out, imagenet=str(imagenet))
    with pytest.raises(DataError, match="val: no class folder"):
        build_manifest(out, imagenet=str(imagenet / "val"))
    assert build_manifest(out, imagenet=str(imagenet / "train")).counts["ImageNet"]["images"] == 2
    ir = tmp_path / "ir"
    _images(ir / "SODA" / "thermal")
    (ir / "MFNet" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"SODA: is one data set's folder .*--infrared .*ir$"):
        build_manifest(out, infrared=str(ir / "SODA"))
    with caplog.at_level("WARNING", logger="unip"):
        assert build_manifest(out, infrared=str(ir)).counts["SODA"]["images"] == 2
    assert "skipped 1 folder(s) without a thermal/ subfolder: MFNet" in caplog.text
