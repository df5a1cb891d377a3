"""`unip info` and `load_model` on segmentor files (ours and the release's mmseg layout), and release files that
keep numpy arrays in their metadata."""

import numpy as np
import torch

from test_seg_model import release_state_dict
from unip import cli
from unip.checkpoint import architecture_of, load_model, read_checkpoint
from unip.seg import build_segmentor, load_segmentor, save_segmentor


def test_info_describes_our_segmentor_and_load_model_reads_its_backbone(tmp_path, capsys):
    segmentor = build_segmentor(3, "unip_vit_tiny_patch16", img_size=64, meta={"class_names": ["a", "b", "c"]})
    path = save_segmentor(segmentor, tmp_path / "seg.safetensors")
    assert architecture_of(path) == "Segmentor"
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "neck llfpn" in out and "upernet" in out and "classes:       3 (a, b, c)" in out
    backbone = load_model(path)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, segmentor.backbone.state_dict()[key]), key


def test_info_reads_a_release_file_with_numpy_metadata(tmp_path, capsys):
    state = release_state_dict(width=64, depth=2, classes=4, grid=4)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    torch.save({"meta": {"CLASSES": ("bg", "x", "y", "z"), "PALETTE": palette, "iter": np.int64(7)},
                "state_dict": state}, tmp_path / "iter_7.pth")
    content, _ = read_checkpoint(tmp_path / "iter_7.pth")
    assert np.array_equal(content["meta"]["PALETTE"], palette)
    assert architecture_of(tmp_path / "iter_7.pth") == "Segmentor"
    assert cli.main(["info", str(tmp_path / "iter_7.pth")]) == 0
    out = capsys.readouterr().out
    assert "classes:       4 (bg, x, y, z)" in out and "mmsegmentation" in out
    segmentor = load_segmentor(tmp_path / "iter_7.pth")
    assert segmentor.num_classes == 4 and segmentor.meta["palette"] == palette.tolist()
