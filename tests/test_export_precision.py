"""``unip export --precision fp16|int8`` on a tiny segmentor: the graphs (QDQ pairs, float16 weights, float32 input
and output), their metadata, the label agreement each states against one computed here another way, the refusal
below --min-agreement (nothing written), and the calibration folder: frames spread over it, windows of the export
size, unreadable files skipped and counted, an empty or unreadable folder refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from unip.cli import main
from unip.deploy.calibration import export_windows, folder_frames, generated_frames, spread
from unip.deploy.precision import float_nodes, label_agreement
from unip.seg import load_segmentor, save_segmentor
from unip.seg.pipeline import InferencePipeline

from test_predict import scene, tiny_segmentor

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

META = {"crop_size": 64, "stride": 42, "test_scale": [96, 64], "class_names": ["a", "b", "c"]}


@pytest.fixture(scope="module")
def segmentor_file(tmp_path_factory) -> str:
    return str(save_segmentor(tiny_segmentor(meta=META), tmp_path_factory.mktemp("seg") / "seg.safetensors"))


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> str:
    """Three 64x96 frames (one 16-bit), a file that is not an image though named .png, and a text file."""
    root = tmp_path_factory.mktemp("calibration") / "frames"
    (root / "night").mkdir(parents=True)
    Image.fromarray(scene(64, 96, 1)).save(root / "a.png")
    Image.fromarray(scene(64, 96, 2)).save(root / "b.png")
    Image.fromarray(scene(64, 96, 3).astype(np.uint16) * 40 + 7000).save(root / "night" / "c.png")
    (root / "broken.png").write_bytes(b"not a png")
    (root / "notes.txt").write_text("not an image")
    return str(root)


def export(capsys, *argv):
    code = main(["export", "--format", "onnx", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def agreement_here(segmentor_file, path, inputs) -> float:
    """The label agreement computed here: PyTorch's whole-image logits against onnxruntime's, pixel by pixel."""
    from unip.seg.inference import whole_inference

    segmentor = load_segmentor(segmentor_file).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    same = total = 0
    for x in inputs:
        with torch.no_grad():
            expected = whole_inference(segmentor, torch.from_numpy(x)).argmax(1).numpy()
        got = session.run(None, {"image": x})[0].argmax(1)
        same, total = same + (expected == got).sum(), total + expected.size
    return 100.0 * same / total


def test_int8_export_is_quantized_calibrated_on_the_folder_and_states_its_agreement(segmentor_file, frames, tmp_path,
                                                                                   capsys):
    path = tmp_path / "seg-int8.onnx"
    code, out, err = export(capsys, "--checkpoint", segmentor_file, "--size", "64", "96", "--precision", "int8",
                            "--calibrate", frames, "--min-agreement", "90", "--out", str(path))
    assert code == 0 and err == "", err
    assert os.listdir(tmp_path) == ["seg-int8.onnx"]  # the fp32 graph it was made from is not left behind
    assert "(int8, opset 18, input 1 x 3 x 64 x 96)" in out and "(1 unreadable file skipped)" in out
    model = onnx.load(str(path))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") > 5 and ops.count("DequantizeLinear") > 5
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    softmax_inputs = [producers.get(node.input[0]) for node in model.graph.node if node.op_type == "Softmax"]
    assert softmax_inputs and "DequantizeLinear" not in softmax_inputs  # the attention stays in float
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    meta = metadata(path)
    assert meta["unip.precision"] == "int8" and json.loads(meta["unip.classes"]) == ["a", "b", "c"]
    quantization = json.loads(meta["unip.quantization"])
    assert quantization["format"] == "QDQ" and quantization["float"] == ["attention"]
    assert "3 frames of" in quantization["calibration"]
    recorded = json.loads(meta["unip.agreement"])
    pipeline = InferencePipeline.of(load_segmentor(segmentor_file))
    inputs = folder_frames(frames, pipeline, (64, 96)).inputs
    assert len(inputs) == 3
    assert recorded["percent"] == pytest.approx(agreement_here(segmentor_file, path, inputs), abs=1e-3)
    assert f"label agreement with the fp32 PyTorch model {np.floor(recorded['percent'] * 100) / 100:.2f} %" in out


def test_fp16_export_has_float16_weights_and_float32_input_and_output(segmentor_file, tmp_path, capsys):
    path = tmp_path / "seg-fp16.onnx"
    code, out, err = export(capsys, "--checkpoint", segmentor_file, "--size", "64", "96", "--precision", "fp16",
                            "--out", str(path))
    assert code == 0 and err == "", err
    assert "8 generated thermal scenes" in out
    model = onnx.load(str(path))
    types = {t.data_type for t in model.graph.initializer if len(t.dims) == 4}  # conv kernels (and a bool mask)
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types
    assert [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]] == [1, 1]
    assert metadata(path)["unip.precision"] == "fp16" and "float16 inside" in metadata(path)["unip.input"]
    x = generated_frames(InferencePipeline.of(load_segmentor(segmentor_file)), (64, 96), count=1).inputs[0]
    from unip.deploy.onnx_export import SegmentorLogits
    with torch.no_grad():
        expected = SegmentorLogits(load_segmentor(segmentor_file).eval())(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert got.dtype == np.float32 and np.abs(got - expected).max() < 2e-2


def test_an_export_below_the_agreement_threshold_is_refused_and_nothing_is_written(segmentor_file, tmp_path, capsys):
    """The tiny random model's int8 labels agree on about 97 % of the generated scenes' pixels: below 99 %."""
    path = tmp_path / "seg.onnx"
    code, out, err = export(capsys, "--checkpoint", segmentor_file, "--size", "64", "96", "--precision", "int8",
                            "--out", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "below --min-agreement 99 %; the export was removed" in err and "--keep-float" in err
    number = float(err.split("the fp32 PyTorch model's on ")[1].split(" %")[0])
    assert 50 < number < 99
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content, message", [
    ({}, "no image file"),
    ({"a.png": b"garbage", "b.jpg": b""}, "2 image file(s), none readable"),
    ({"notes.txt": b"text"}, "no image file"),
])
def test_calibration_folders_without_a_readable_frame_are_refused(segmentor_file, tmp_path, capsys, content, message):
    folder = tmp_path / "frames"
    folder.mkdir()
    for name, data in content.items():
        (folder / name).write_bytes(data)
    code, _, err = export(capsys, "--checkpoint", segmentor_file, "--precision", "int8", "--calibrate", str(folder),
                          "--out", str(tmp_path / "x.onnx"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and str(folder) in err, err
    assert not (tmp_path / "x.onnx").exists()


def test_frames_are_spread_over_the_folder_and_cut_into_windows_of_the_export_size(frames):
    assert spread(list("abcdefghij"), 4) == ["a", "d", "g", "j"] and spread(list("abc"), 5) == list("abc")
    x = torch.arange(3 * 64 * 160, dtype=torch.float32).reshape(3, 64, 160)
    windows = export_windows(x, (64, 96))  # stride 64: windows at 0 and 64 across the width
    assert [tuple(w.shape) for w in windows] == [(3, 64, 96)] * 2
    assert torch.equal(windows[1], x[:, :, 64:160])
    padded = export_windows(x[:, :40, :80], (64, 96))
    assert len(padded) == 1 and torch.equal(padded[0][:, :40, :80], x[:, :40, :80]) and padded[0][:, 40:].eq(0).all()
    pipeline = InferencePipeline.from_meta(META)
    got = folder_frames(frames, pipeline, (64, 96), batch=2, limit=2)
    assert got.frames == 2 and got.skipped == 0 and [i.shape for i in got.inputs] == [(2, 3, 64, 96)]
    everything = folder_frames(frames, pipeline, (64, 96))
    assert (everything.frames, everything.skipped) == (3, 1) and everything.skipped_names[0].endswith("broken.png")
    generated = generated_frames(pipeline, (64, 96), count=3).inputs
    assert len(generated) == 3 and abs(float(np.mean(generated[0]))) < 3  # normalised


def test_float_groups_name_the_attention_and_the_classifier(segmentor_file, tmp_path):
    from unip.deploy.onnx_export import export_onnx

    path = tmp_path / "seg.onnx"
    export_onnx(load_segmentor(segmentor_file), str(path), size=(64, 96))
    graph = onnx.load(str(path)).graph
    kinds = {node.name: node.op_type for node in graph.node}
    attention = float_nodes(graph, ["attention"])
    assert sorted(kinds[n] for n in attention) == ["MatMul"] * 4 + ["Softmax"] * 2  # 2 blocks: q·kᵀ, attn·v
    convs = [node.name for node in graph.node if node.op_type == "Conv"]
    assert float_nodes(graph, ["classifier"]) == convs[-1:]
    assert label_agreement(lambda x: x, lambda x: x[:, ::-1], [np.array([[[[1.0]], [[0.0]]]])]) == 0.0
