"""`unip pretrain --data FOLDER`: every image is decode-checked once; bad files are skipped and listed."""

import pytest

from unip.data.synth import write_unlabeled
from unip.distill.data import crop_transform, describe_skipped, open_pretrain_images
from unip.errors import DataError


def test_unreadable_files_in_a_data_folder_are_skipped_and_listed(tmp_path):
    good = write_unlabeled(str(tmp_path), 5, size=(48, 32), seed=0)
    folder = tmp_path / "synth" / "thermal"
    (folder / "broken.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    data = open_pretrain_images(str(tmp_path), crop_transform(32, augment=False))
    assert sorted(data.files) == sorted(good)
    assert {e["path"].rsplit("/", 1)[-1]: e["reason"] for e in data.skipped} == \
        {"broken.jpg": "not-an-image", "empty.png": "empty"}
    assert data[0].shape == (1, 32, 32)
    assert "skipped 2 file(s)" in describe_skipped(data)


def test_a_folder_without_readable_images_is_an_error(tmp_path):
    (tmp_path / "a.png").write_text("text")
    with pytest.raises(DataError, match=r"no readable images found \(1 file\(s\) skipped: 1 not-an-image\)"):
        open_pretrain_images(str(tmp_path), crop_transform(32, augment=False))


def test_teacher_layer_auto_sees_the_frames_unip_analyze_sees(tmp_path):
    """``--teacher-layer auto`` prepares its images as ``unip analyze`` does (the whole non-square frame
    resized, not a centre crop), so both profile the same inputs and pick the same layer."""
    import torch

    from unip.analysis.images import ImageFolder, list_images
    from unip.analysis.run import AnalyzeOptions, analyze
    from unip.checkpoint import save_checkpoint
    from unip.distill.data import frame_transform
    from unip.distill.train import auto_layer, make_config
    from unip.engine.loop import Precision
    from unip.models import create_model

    write_unlabeled(str(tmp_path / "data"), 6, size=(64, 32), seed=0, bit_depth=16)
    folder = str(tmp_path / "data")
    frames = open_pretrain_images(folder, frame_transform(32, 0.3801, 0.1871))
    analysed = ImageFolder(list_images(folder), (32, 32))
    by_path = dict(zip(analysed.paths, analysed))
    for index, path in enumerate(frames.files):
        torch.testing.assert_close(frames[index], by_path[path], rtol=0, atol=0)

    torch.manual_seed(0)
    model = create_model("vit_small_patch16", depth=3, embed_dim=64, num_heads=4, img_size=32)
    save_checkpoint(model, tmp_path / "teacher.safetensors")
    config = make_config("toy", values={"teacher.auto_images": 6})
    layer, why = auto_layer(model, config, folder, Precision("cpu", None), progress=False)
    result = analyze([str(tmp_path / "teacher.safetensors")], folder,
                     AnalyzeOptions(out=str(tmp_path / "analysis"), progress=False))
    assert layer == result.models[0].selection.layer and "over 6 images" in why
