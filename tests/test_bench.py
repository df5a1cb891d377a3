"""``unip bench`` on a tiny segmentor: every runtime row is printed per mode (sliding windows, whole frame) and
ONNX Runtime precision (fp32, int8 timed; torch.compile through a quick backend) with its label agreement, the
JSON file, and the parameters and FLOPs per part against counts made another way."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from unip.cli import main
from unip.deploy.bench import benchmark, model_costs
from unip.seg import save_segmentor

from test_predict import tiny_segmentor

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_bench_prints_every_row_and_writes_json(tmp_path, capsys):
    meta = {"crop_size": 64, "stride": 42, "test_scale": [96, 64]}
    path = save_segmentor(tiny_segmentor(meta=meta), tmp_path / "seg.safetensors")
    out = tmp_path / "bench.json"
    code = main(["bench", "--checkpoint", str(path), "--no-compile", "--iters", "2", "--warmup", "0", "--size", "64",
                 "96", "--onnx-precisions", "fp32,int8", "--threads", "1", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0 and err == "", err
    lines = stdout.splitlines()
    assert lines[0].endswith("input 1x3x64x96, cpu (1 CPU threads), fp32; slide: 2 window(s) of 64 (stride 42) per "
                             "frame")
    assert torch.get_num_threads() == 1
    for part in ("backbone", "neck", "decode head", "auxiliary head (training only)", "total (inference)"):
        assert any(line.startswith(part) for line in lines), part
    rows = [line.split() for line in lines if line.startswith(("PyTorch", "torch.", "ONNX"))]
    assert [(r[2], r[3]) for r in rows if "skipped:" not in r] == [
        ("fp32", "slide"), ("fp32", "slide"), ("int8", "slide"),
        ("fp32", "whole"), ("fp32", "whole"), ("int8", "whole")]
    eager = [r for r in rows if r[0] == "PyTorch"]
    assert all(r[-2:] == ["100.00", "%"] and float(r[-3]) > 0 for r in eager)  # frames/s, agreement with itself
    assert sum(1 for line in lines if line.startswith("torch.compile") and line.endswith("skipped: --no-compile")) == 2
    report = json.loads(out.read_text())
    assert report["format"] == "unip-bench" and report["version"] == 2 and report["size"] == [64, 96]
    assert [(r["runtime"], r["precision"], r["mode"], r["status"]) for r in report["rows"]] == [
        ("eager", "fp32", "slide", "ok"), ("compile", "fp32", "slide", "skipped"), ("onnx", "fp32", "slide", "ok"),
        ("onnx", "int8", "slide", "ok"), ("eager", "fp32", "whole", "ok"), ("compile", "fp32", "whole", "skipped"),
        ("onnx", "fp32", "whole", "ok"), ("onnx", "int8", "whole", "ok")]
    onnx_fp32 = [r for r in report["rows"] if r["runtime"] == "onnx" and r["precision"] == "fp32"]
    assert all(r["agreement"] == 100.0 and r["latency_ms"] > 0 for r in onnx_fp32)
    int8 = [r for r in report["rows"] if r["precision"] == "int8"]
    assert all(50 < r["agreement"] <= 100 and r["where"] == "CPUExecutionProvider" for r in int8)


def test_compile_row_and_a_runtime_that_fails_here(monkeypatch):
    segmentor = tiny_segmentor()
    result = benchmark(segmentor, size=(64, 64), runtimes=("eager", "compile"), compile_backend="eager", iters=1,
                       modes=("whole",))
    rows = {row.runtime: row for row in result.rows}
    assert rows["compile"].status == "ok" and rows["compile"].where == "cpu (eager)" and rows["compile"].latency_ms > 0
    assert rows["compile"].agreement == 100.0
    assert [r.status for r in result.rows if r.runtime == "onnx"] == ["skipped"] * 3

    import unip.deploy.bench as bench

    def broken(*args, **kwargs):
        raise RuntimeError("no ONNX here\nsecond line")
    monkeypatch.setattr(bench, "export_onnx", broken)
    result = benchmark(segmentor, size=(64, 64), runtimes=("eager", "onnx"), iters=1, modes=("whole",),
                       onnx_precisions=("fp32",))
    assert [r.status for r in result.rows] == ["ok", "skipped", "failed"]
    assert result.rows[2].detail == "RuntimeError: no ONNX here second line"
    assert "failed: RuntimeError" in result.table()


def test_latency_statistics_of_known_call_times(monkeypatch):
    """Calls of 1, 2, ..., 10 ms (in shuffled order): median 5.5 ms, 90th percentile 9 ms (nearest rank: 9 of the
    10 calls take at most that long), throughput batch / mean."""
    import unip.deploy.bench as bench
    from unip.deploy.bench import RuntimeRow

    clock = [0.0]
    durations = iter([0.5, 0.5] + [d / 1000 for d in (3, 7, 1, 10, 5, 2, 9, 4, 8, 6)])  # set-up, warm-up, timed

    def call():
        clock[0] += next(durations)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    row = RuntimeRow("eager", "PyTorch eager", "cpu")
    bench._time(call, row, 0.0, warmup=1, iters=10, batch=2)
    assert row.setup_s == pytest.approx(0.5)
    assert row.latency_ms == pytest.approx(5.5) and row.p90_ms == pytest.approx(9.0)
    assert row.images_per_s == pytest.approx(2 / 0.0055)


def test_parameters_and_flops_per_part():
    segmentor = tiny_segmentor()
    parts = {p.part: p for p in model_costs(segmentor, (96, 64))}
    x = torch.zeros(1, 3, 96, 64)

    def count(fn) -> float:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            fn()
        return counter.get_total_flops() / 1e9

    maps = segmentor.block_maps(x)
    pyramid = segmentor.neck(maps)
    assert parts["backbone"].gflops == pytest.approx(count(lambda: segmentor.backbone.forward_intermediates(x, [1])))
    assert parts["neck"].gflops == pytest.approx(count(lambda: segmentor.neck(maps)))
    assert parts["decode head"].gflops == pytest.approx(count(lambda: segmentor.decode_head(pyramid)))
    assert parts["auxiliary head (training only)"].gflops is None
    # by hand: the qkv projection of one block is 2·tokens·width·3·width FLOPs (tokens = 1 + 6·4 patches)
    assert parts["backbone"].gflops * 1e9 > 2 * 2 * 25 * 32 * 96
    total = sum(p.params_m for p in parts.values())
    assert total == pytest.approx(sum(p.numel() for p in segmentor.parameters()) / 1e6)


def test_bad_bench_options(tmp_path, capsys):
    path = save_segmentor(tiny_segmentor(), tmp_path / "seg.safetensors")
    for argv, message in [(["--size", "50", "64"], "multiples of the patch size"), (["--iters", "0"], "--iters"),
                          (["--batch", "0"], "--batch"), (["--device", "toaster"], "--device"),
                          (["--no-onnx", "--compile-backend", "bogus"], "--compile-backend bogus: torch.compile has "
                                                                        "no such backend; choose one of"),
                          (["--modes", "sideways"], "--modes sideways: choose from slide, whole"),
                          (["--onnx-precisions", "int4"], "--onnx-precisions int4: choose from fp32, fp16, int8"),
                          (["--calibrate", str(tmp_path / "none")], "--calibrate")]:
        code = main(["bench", "--checkpoint", str(path), *argv])
        out, err = capsys.readouterr()
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
        assert "PyTorch eager" not in out  # stopped before any timing
        if "--compile-backend" in argv:
            assert "inductor" in err
