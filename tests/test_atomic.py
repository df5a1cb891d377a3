"""Atomic writes: the target appears whole or not at all, with the mode a plain write would give it."""

import os
import stat

import pytest

from unip.atomic import atomic_path, atomic_write_text, file_mode, replace_folder, temporary_path
from unip.checkpoint import save_checkpoint
from unip.models import create_model


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_umask_mode_even_from_writers_that_restrict_it(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert file_mode() == _mode(plain)
    save_checkpoint(create_model("vit_small_patch16", depth=1, embed_dim=32, num_heads=2, img_size=32),
                    tmp_path / "model.safetensors")  # safetensors creates its files 0600
    with atomic_path(tmp_path / "private") as tmp:
        tmp.write_text("y")
        os.chmod(tmp, 0o600)
    assert _mode(tmp_path / "model.safetensors") == _mode(tmp_path / "private") == _mode(plain)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["notes.txt"]


def test_replace_folder_swaps_a_whole_folder_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "overlays"
    target.mkdir()
    (target / "00000_old.png").write_text("old")
    (target / "00003_old.png").write_text("old")
    staging = temporary_path(target)
    staging.mkdir()
    (staging / "00000_new.png").write_text("new")
    assert replace_folder(staging, target) == target
    assert sorted(p.name for p in target.iterdir()) == ["00000_new.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlays"]  # no staging or old folder left
    fresh = tmp_path / "fresh"
    (tmp_path / ".fresh.tmp-1").mkdir()
    replace_folder(tmp_path / ".fresh.tmp-1", fresh)
    assert fresh.is_dir() and not (tmp_path / ".fresh.tmp-1").exists()
