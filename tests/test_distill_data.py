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
    with pytest.raises(DataError, match="no readable images"):
        open_pretrain_images(str(tmp_path), crop_transform(32, augment=False))
