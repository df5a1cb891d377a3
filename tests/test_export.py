"""``unip export``: ONNX graphs of tiny segmentors against PyTorch in onnxruntime (fixed size, and dynamic at
sizes other than the traced one), a failed check leaves no file; timm folders that timm itself loads (offline)
and that give unip's features; the head-count rule for UNIP students; the rewrites that make sizes traceable."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from unip.checkpoint import save_checkpoint
from unip.cli import main
from unip.models import create_model
from unip.seg import save_segmentor

from test_predict import tiny_segmentor

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def segmentor_file(tmp_path_factory) -> str:
    meta = {"crop_size": 64, "stride": 42, "class_names": ["a", "b", "c"]}
    return str(save_segmentor(tiny_segmentor(meta=meta), tmp_path_factory.mktemp("seg") / "seg.safetensors"))


def export(capsys, *argv):
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def torch_logits(segmentor_file, image: np.ndarray) -> np.ndarray:
    from unip.deploy.onnx_export import SegmentorLogits
    from unip.seg import load_segmentor

    with torch.no_grad():
        return SegmentorLogits(load_segmentor(segmentor_file)).eval()(torch.from_numpy(image)).numpy()


# ============================================================================================ ONNX
def test_dynamic_onnx_matches_pytorch_at_other_sizes(segmentor_file, tmp_path, capsys):
    path = tmp_path / "seg.onnx"
    code, stdout, err = export(capsys, "--checkpoint", segmentor_file, "--format", "onnx", "--dynamic",
                               "--out", str(path))
    assert code == 0 and err == "", err
    assert "1x64x64" in stdout and "2x96x128" in stdout and os.listdir(tmp_path) == ["seg.onnx"]
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["unip.classes"]) == ["a", "b", "c"] and json.loads(meta["unip.mean"]) == [96.9255] * 3
    assert (meta["unip.crop"], meta["unip.stride"]) == ("64", "42")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for shape in [(1, 3, 64, 64), (3, 3, 48, 112), (2, 3, 192, 80)]:  # 192 px: the stride-32 map is 6 x 2
        image = rng.standard_normal(shape).astype(np.float32)
        logits = session.run(["logits"], {"image": image})[0]
        assert logits.shape == (shape[0], 3, *shape[2:])
        assert np.abs(logits - torch_logits(segmentor_file, image)).max() <= 1e-4


def test_fixed_onnx_and_a_failed_check_leaves_nothing(segmentor_file, tmp_path, capsys, monkeypatch):
    from unip.deploy import onnx_export

    path = tmp_path / "fixed.onnx"
    code, stdout, _ = export(capsys, "--checkpoint", segmentor_file, "--format", "onnx", "--size", "48", "80",
                             "--out", str(path))
    assert code == 0 and "1 x 3 x 48 x 80" in stdout
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 48, 80]

    real_session = onnx_export.onnx_session

    class Drifting:  # onnxruntime that is off by 1e-3
        def __init__(self, path):
            self.session = real_session(path)

        def run(self, names, feed):
            return [out + 1e-3 for out in self.session.run(names, feed)]
    monkeypatch.setattr(onnx_export, "onnx_session", Drifting)
    again = tmp_path / "drift.onnx"
    code, _, err = export(capsys, "--checkpoint", segmentor_file, "--format", "onnx", "--size", "48", "80",
                          "--out", str(again))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "differ from PyTorch's by 0.001" in err and "removed" in err
    assert sorted(os.listdir(tmp_path)) == ["fixed.onnx"]  # no file, no temporary folder


def test_averaging_pool_is_adaptive_average_pooling():
    from unip.deploy.onnx_export import AveragingPool2d

    x = torch.randn(2, 3, 13, 7)
    for bins in (1, 2, 3, 6):
        torch.testing.assert_close(AveragingPool2d(bins)(x), nn.AdaptiveAvgPool2d(bins)(x))


def test_traceable_sizes_computes_the_same_and_restores_the_model():
    from unip.deploy.onnx_export import SegmentorLogits, traceable_sizes

    segmentor = tiny_segmentor()
    before = [type(m).__name__ for m in segmentor.modules()]
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        expected = SegmentorLogits(segmentor)(x)
        with traceable_sizes(segmentor):
            assert segmentor.backbone.always_resample_pos_embed
            rewritten = SegmentorLogits(segmentor)(x)
    torch.testing.assert_close(rewritten, expected, atol=1e-5, rtol=1e-5)
    assert [type(m).__name__ for m in segmentor.modules()] == before
    assert not segmentor.backbone.always_resample_pos_embed


def test_onnx_export_refuses_backbones_and_bad_sizes(segmentor_file, tmp_path, capsys):
    backbone = save_checkpoint(create_model("vit_tiny_patch16", depth=1, embed_dim=32, num_heads=2, img_size=32),
                               tmp_path / "backbone.safetensors")
    cases = [(["--checkpoint", str(backbone)], "not a segmentor"),
             (["--checkpoint", segmentor_file, "--size", "40", "64"], "multiples of the patch size 16"),
             (["--checkpoint", segmentor_file, "--opset", "9"], "--opset 9"),
             (["--checkpoint", segmentor_file, "--last-block-heads", "default"], "--format timm")]
    for argv, message in cases:
        code, _, err = export(capsys, *argv, "--format", "onnx", "--out", str(tmp_path / "x.onnx"))
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a folder nobody can write in (Linux /proc)")
@pytest.mark.parametrize("fmt", ["onnx", "timm"])
def test_an_out_that_cannot_be_written_is_named_as_given(segmentor_file, fmt, capsys):
    """The error names --out as given and its folder, not the hidden staging folder unip writes into first."""
    out = "/proc/self/seg.onnx" if fmt == "onnx" else "/proc/self/seg-timm"
    code, _, err = export(capsys, "--checkpoint", segmentor_file, "--format", fmt, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--out {out}: cannot write in /proc/self (" in err and ".tmp-" not in err, err


# ============================================================================================ timm
def _timm_from(folder: str, **overrides):
    import timm

    config = json.loads(open(os.path.join(folder, "config.json")).read())
    by_file = timm.create_model(config["architecture"], pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(
        file=os.path.join(folder, "model.safetensors"), num_classes=0), **config["model_args"], **overrides)
    by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
    return by_file.eval(), by_folder.eval()


def test_timm_loads_a_student_and_gives_the_same_features(tmp_path, capsys):
    torch.manual_seed(0)
    student = create_model("unip_vit_tiny_patch16", depth=2, img_size=64)  # width 192, 3 heads: vit_tiny
    path = save_checkpoint(student, tmp_path / "student.safetensors", {"teacher": "mae-l"})
    out = tmp_path / "student-timm"
    code, stdout, err = export(capsys, "--checkpoint", str(path), "--format", "timm", "--out", str(out))
    assert code == 0 and err == "", err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert "vit_tiny_patch16_224" in stdout and "pretrained_cfg_overlay" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0 and config["pretrained_cfg"]["mean"] == [0.3801] * 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = student.eval().forward_features(x)
        for model in _timm_from(str(out)):
            torch.testing.assert_close(model.forward_features(x), expected, atol=1e-5, rtol=1e-5)
            assert torch.equal(model.pos_embed.detach(), student.pos_embed.detach())  # the sin-cos table, as values
    # exporting again replaces its own files; a user's config.json is left alone
    assert export(capsys, "--checkpoint", str(path), "--format", "timm", "--out", str(out))[0] == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    code, _, err = export(capsys, "--checkpoint", str(path), "--format", "timm", "--out", str(mine))
    assert code == 2 and "config.json: exists and was not written by unip" in err
    assert (mine / "config.json").read_text() == '{"my": "settings"}' and os.listdir(mine) == ["config.json"]


def test_timm_export_of_a_unip_student_with_a_16_head_last_block(tmp_path, capsys):
    torch.manual_seed(0)
    student = create_model("unip_vit_tiny_patch16", depth=2, img_size=64, last_heads=16)
    path = save_checkpoint(student, tmp_path / "unip_t.safetensors")
    code, _, err = export(capsys, "--checkpoint", str(path), "--format", "timm", "--out", str(tmp_path / "t"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "last block has 16 heads, the others 3" in err and "--last-block-heads default" in err
    assert not (tmp_path / "t").exists()
    code, stdout, _ = export(capsys, "--checkpoint", str(path), "--format", "timm", "--out", str(tmp_path / "t"),
                             "--last-block-heads", "default")
    assert code == 0 and "note: the last block has 3 heads in the export, 16 in unip_t.safetensors" in stdout
    uniform = create_model("unip_vit_tiny_patch16", depth=2, img_size=64)
    uniform.load_state_dict(student.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = _timm_from(str(tmp_path / "t"))[1].forward_features(x)
        torch.testing.assert_close(features, uniform.eval().forward_features(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(features, student.eval().forward_features(x), atol=1e-3)  # what changes


def test_timm_loads_the_backbone_of_a_segmentor(segmentor_file, tmp_path, capsys):
    from unip.seg import load_segmentor

    out = tmp_path / "seg-timm"
    code, stdout, _ = export(capsys, "--checkpoint", segmentor_file, "--format", "timm", "--out", str(out))
    assert code == 0 and "a segmentor's backbone" in stdout and "init_values=1.0" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["img_size"] == [128, 128] and config["model_args"]["init_values"] == 1.0
    assert config["pretrained_cfg"]["mean"] == [pytest.approx(96.9255 / 255)] * 3
    backbone = load_segmentor(segmentor_file).backbone
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for model in _timm_from(str(out)):
            torch.testing.assert_close(model.forward_features(x), backbone.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.fixture
def offline_timm(monkeypatch):
    """``timm:NAME`` builds NAME with random weights (no hub here)."""
    from unip.checkpoint import timm_hub

    create = timm_hub._create_timm
    monkeypatch.setattr(timm_hub, "_create_timm", lambda name, pretrained: create(name, pretrained=False))


def test_timm_sources_export_to_a_plain_default_folder(tmp_path, capsys, monkeypatch, offline_timm):
    """Without --out, ``timm:NAME`` writes NAME-timm (no ``timm:`` colon, which Windows refuses) and
    ``timm:NAME@FILE`` FILE's stem-timm, as a file source does."""
    monkeypatch.chdir(tmp_path)
    code, _, err = export(capsys, "--checkpoint", "timm:vit_tiny_patch16_224.augreg_in21k", "--format", "timm")
    assert code == 0 and err == "", err
    assert os.listdir(tmp_path) == ["vit_tiny_patch16_224.augreg_in21k-timm"]
    torch.save({"model": create_model("vit_tiny_patch16").state_dict()}, tmp_path / "w.pth")
    assert export(capsys, "--checkpoint", "timm:vit_tiny_patch16_224@w.pth", "--format", "timm")[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["vit_tiny_patch16_224.augreg_in21k-timm", "w-timm", "w.pth"]


def test_timm_export_states_the_normalisation_the_weights_were_trained_with(tmp_path, capsys, offline_timm):
    """A ``timm:`` source: timm's pretrained_cfg mean/std (0.5 for augreg), not InfMix's; a release file that
    records none (MAE's {"model": ...}, pre-trained on ImageNet): ImageNet's, with a note."""
    out = tmp_path / "augreg"
    assert export(capsys, "--checkpoint", "timm:vit_tiny_patch16_224.augreg_in21k", "--format", "timm", "--out",
                  str(out))[0] == 0
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.5] * 3
    torch.manual_seed(0)
    vit = create_model("vit_tiny_patch16", depth=2, img_size=64)
    torch.save({"model": {**vit.state_dict(), "mask_token": torch.zeros(1, 1, 192)}}, tmp_path / "mae.pth")
    code, stdout, _ = export(capsys, "--checkpoint", str(tmp_path / "mae.pth"), "--format", "timm", "--out",
                             str(tmp_path / "mae-timm"))
    assert code == 0 and "note: the file records no input normalisation" in stdout
    cfg = json.loads((tmp_path / "mae-timm" / "config.json").read_text())["pretrained_cfg"]
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.229, 0.224, 0.225]


def test_the_documented_onnxruntime_snippet_gives_unip_predicts_labels(tmp_path, capsys, monkeypatch):
    """docs/inference.md's onnxruntime code, run as written on a dynamic export, labels a frame as
    ``unip predict`` does: exactly for a frame that is not resized (20 × 90: windows placed on the unpadded width,
    each padded to two patches); for frames the test scale shrinks (30 × 100 → 20 × 67) or enlarges (10 × 40 →
    20 × 80) its resize is unip's within one grey level (unlike PIL's antialiasing one) and the labels agree."""
    from PIL import Image

    from test_predict import scene
    from unip.data.images import read_rgb
    from unip.seg import load_segmentor
    from unip.seg.pipeline import InferencePipeline

    meta = {"crop_size": 64, "stride": 42, "class_names": ["a", "b", "c"], "test_scale": [200, 20]}
    checkpoint = str(save_segmentor(tiny_segmentor(meta=meta), tmp_path / "seg.safetensors"))
    monkeypatch.chdir(tmp_path)
    assert export(capsys, "--checkpoint", checkpoint, "--format", "onnx", "--dynamic", "--out", "seg.onnx")[0] == 0
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "inference.md"), encoding="utf-8").read()
    snippet = doc.split("**Running it**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    pipeline = InferencePipeline.of(load_segmentor(checkpoint))
    rng = np.random.default_rng(0)
    for size, resized in [((20, 90), (20, 90)), ((30, 100), (20, 67)), ((10, 40), (20, 80))]:
        noise = rng.integers(-20, 21, size)  # fine texture: where antialiasing would show
        Image.fromarray(np.clip(scene(*size, 4).astype(int) + noise, 0, 255).astype(np.uint8)).save("frame.png")
        assert main(["predict", "--checkpoint", checkpoint, "frame.png", "--out", "pred", "--format", "label",
                     "--no-progress"]) == 0
        namespace: dict = {}
        exec(compile(snippet, "docs/inference.md", "exec"), namespace)
        predicted = np.asarray(Image.open("pred/label/frame.png"))
        assert namespace["labels"].shape == predicted.shape == size and len(np.unique(predicted)) > 1
        unip_input = pipeline.preprocess(read_rgb("frame.png")).numpy()
        assert namespace["x"].shape[2:] == unip_input.shape[1:] == resized
        grey_levels = np.abs(namespace["x"][0] - unip_input) * np.array(pipeline.std)[:, None, None]
        assert grey_levels.max() < 1 + 1e-3 and (grey_levels > 0.5).mean() < 0.05
        if size == resized:
            assert np.array_equal(namespace["labels"], predicted) and grey_levels.max() < 1e-3
        else:
            assert (namespace["labels"] == predicted).mean() > 0.99
            shrunk = np.asarray(Image.open("frame.png").convert("RGB").resize(resized[::-1], Image.BILINEAR))
            unip_pixels = unip_input * np.array(pipeline.std)[:, None, None] + np.array(pipeline.mean)[:, None, None]
            pil_levels = np.abs(shrunk.transpose(2, 0, 1) - unip_pixels)
            assert size[0] < resized[0] or pil_levels.max() > 4  # PIL's bilinear antialiases when it shrinks
