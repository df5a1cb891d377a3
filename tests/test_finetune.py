"""`unip finetune` and `unip evaluate` end to end on a tiny backbone and generated SODA-layout data (CPU):
learning, metrics.json against `unip evaluate`, the optimiser groups the task builds, linear probing, exact
resume after SIGKILL, 2-process (gloo) runs against one process, the release's fine-tuned layout, presets."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unip import cli
from unip.checkpoint import save_checkpoint
from unip.data.synth import write_soda
from unip.engine import checkpointing
from unip.engine.config import PRESET_ROOTS, flatten
from unip.engine.distributed import init_distributed
from unip.engine.trainer import Trainer
from unip.errors import ConfigError
from unip.models import create_model
from unip.seg import build_segmentor, layer_id, load_segmentor
from unip.seg.pipeline import InferencePipeline
from unip.seg.evaluation import EvalSettings, evaluate_split
from unip.seg.results import read_metrics
from unip.seg.train import DEFAULTS, RULES, SegmentationTask, finetune, make_config

from compile_modes import record_compile_modes
from killed_runs import kill_and_resume

BIN = Path(sys.executable).parent
DEPTH, WIDTH = 4, 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 4-block backbone of width 64 (64 px) and 24 generated SODA-layout images of 96×80 (16 train, 8 test)."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    backbone = create_model("unip_vit_tiny_patch16", depth=DEPTH, embed_dim=WIDTH, num_heads=2, img_size=64)
    save_checkpoint(backbone, root / "backbone.safetensors")
    write_soda(str(root / "soda"), 16, 8, size=(96, 80), seed=0)
    return root


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(assets, out, *extra, preset="toy"):
    return ["finetune", preset, "--pretrained", str(assets / "backbone.safetensors"), "--data",
            str(assets / "soda"), "--out", str(out), "--device", "cpu", "--set", "run.progress=false", *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One toy fine-tuning run through the CLI (60 iterations, evaluation every 20)."""
    out = tmp_path_factory.mktemp("run") / "ft"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(_args(assets, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------------------------- learning
def test_short_fine_tune_raises_miou_well_above_its_start(assets, trained, one_thread):
    config = make_config("toy", values={"model.pretrained": str(assets / "backbone.safetensors"),
                                        "data.path": str(assets / "soda")})
    task = SegmentationTask(config)
    test_set = task.open_split("test")
    torch.manual_seed(0)
    untrained = build_segmentor(21, str(assets / "backbone.safetensors"), img_size=64, drop_path_rate=0.0)
    settings = EvalSettings(InferencePipeline(crop=64, stride=42))
    start = evaluate_split(untrained, test_set, settings, torch.device("cpu")).metrics["mIoU"]
    metrics = read_metrics(trained / "metrics.json")
    assert metrics["mIoU"] >= start + 15 and metrics["mIoU"] >= 2 * start, (start, metrics["mIoU"])
    # the run folder: final model, best model and record, logs with both loss components and evaluations
    assert load_segmentor(trained / "segmentor.safetensors").meta["step"] == 60
    best = json.loads((trained / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "mIoU" and best["step"] in (20, 40, 60) and metrics["step"] == best["step"]
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert all("loss_decode" in r and "loss_aux" in r for r in train)
    assert [r["step"] for r in evals] == [20, 40, 60] and len(evals[0]["IoU"]) == 21
    assert max(r["mIoU"] for r in evals) == pytest.approx(best["value"])
    assert (trained / "tb").is_dir()


def test_a_training_state_reads_as_the_segmentor_it_trains(trained, capsys):
    """``checkpoints/step-*.pt`` carries its run's segmentor header: ``load_segmentor`` rebuilds the segmentor and
    ``load_model`` its backbone (``unip analyze``, ``--teacher``, ``--pretrained``) as from segmentor.safetensors."""
    from unip.checkpoint import open_model

    state = checkpointing.find_latest(trained / "checkpoints")
    assert state.name == "step-00000060.pt"
    final, resumed = load_segmentor(trained / "segmentor.safetensors"), load_segmentor(state)
    assert resumed.config == final.config and resumed.meta["training_state"]["step"] == 60
    ours, theirs = resumed.state_dict(), final.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    backbone = open_model(state)
    assert "backbone of a segmentor" in backbone.architecture_from
    assert backbone.model.config == final.backbone.config
    assert cli.main(["info", str(state)]) == 0
    out = capsys.readouterr().out
    assert "classes:       21" in out and "training_state: {'step': 60, 'epoch': " in out


def test_metrics_json_equals_what_evaluate_reports(assets, trained, tmp_path, one_thread, capsys):
    metrics = read_metrics(trained / "metrics.json")
    assert metrics["format"] == "unip-segmentation-metrics" and metrics["split"] == "test"
    assert metrics["dataset"] == "soda" and metrics["images"] == 8 and len(metrics["classes"]) == 21
    assert metrics["model"]["mode"] == "fine-tuning" and not metrics["model"]["backbone"]["random_init"]
    assert metrics["model"]["backbone"]["pretrained"] == str(assets / "backbone.safetensors")
    assert metrics["IoU"][5] is None and metrics["per_class"][18]["name"] == "sky"  # absent class: null
    out = tmp_path / "eval"
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", metrics["checkpoint"], "--data", str(assets / "soda"), "--out",
                     str(out), "--device", "cpu", "--no-progress", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "sky" in printed and f"mIoU {metrics['mIoU']:.2f}" in printed
    evaluated = read_metrics(out / "metrics.json")
    for key in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "per_class", "confusion_matrix", "images", "classes",
                "step", "model", "test", "split", "split_file", "dataset", "checkpoint"):
        assert evaluated[key] == metrics[key], key
    assert "best" not in evaluated and metrics["best"]["split"] == "val"
    for png in [out / "confusion.png", *sorted((out / "overlays").glob("*.png"))]:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.info.get("Software") == "unip"
    assert len(list((out / "overlays").glob("*.png"))) == 4
    # test-time augmentation changes the numbers but keeps the document's shape; a tiny scale shrinks the image
    # to 1 px, not to nothing; the overlays of the earlier evaluation are replaced as a whole
    assert cli.main(["evaluate", "--checkpoint", metrics["checkpoint"], "--data", str(assets / "soda"), "--out",
                     str(out), "--device", "cpu", "--no-progress", "--flip", "--scales", "0.001,1.0",
                     "--one-window-at-a-time", "--overlays", "2", "--split", "train"]) == 0
    augmented = read_metrics(out / "metrics.json")
    assert augmented["test"]["flip"] and augmented["test"]["scales"] == [0.001, 1.0] and augmented["images"] == 16
    assert not augmented["test"]["batch_windows"] and augmented["mIoU"] is not None
    train_names = sorted(line.split()[0] for line in open(assets / "soda" / "train_infrared.txt"))
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"0000{i}_{train_names[i]}.png" for i in (0, 1)]
    assert cli.main(["evaluate", "--checkpoint", metrics["checkpoint"], "--data", str(assets / "soda"), "--out",
                     str(out), "--device", "cpu", "--no-progress", "--overlays", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "metrics.json"]
    # the run folder is not evaluate's to write: its metrics.json (the best model's test metrics) stays
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", metrics["checkpoint"], "--data", str(assets / "soda"), "--out",
                     str(trained), "--device", "cpu", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "metrics.json" in error and "finetune" in error and "--out" in error
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before
    assert not (trained / "overlays").exists() and not (trained / "confusion.png").exists()
    # and the reverse: a fine-tuning run does not replace the report of an evaluation
    assert cli.main(_args(assets, out)) == 2
    assert "unip evaluate" in capsys.readouterr().err and not (out / "config.yaml").exists()


# ----------------------------------------------------------------------------------------------- the task
def _trainer(assets, tmp_path, **values):
    config = make_config("toy", values={"model.pretrained": str(assets / "backbone.safetensors"),
                                        "data.path": str(assets / "soda"), "run.output": str(tmp_path / "t"),
                                        "run.device": "cpu", "run.progress": False, **values})
    return Trainer(SegmentationTask(config), config, init_distributed("cpu"))


def test_batch_settings_refuse_contradictions_and_advise_what_works(assets, tmp_path, caplog):
    """optim.effective_batch decides the accumulation: an optim.accum_iter that gives another total is refused
    (1, what configs written before accum_iter defaulted to null state, is ignored with a warning, no longer
    without a word); a training split too small for one step names a setting that fits it, and following the
    advice trains."""
    from unip.errors import ConfigError

    with pytest.raises(ConfigError, match=r"optim.accum_iter=3 contradicts optim.effective_batch=8.*gives 2"):
        _trainer(assets, tmp_path, **{"optim.effective_batch": 8, "optim.accum_iter": 3})
    with caplog.at_level("WARNING", logger="unip"):
        assert _trainer(assets, tmp_path, **{"optim.effective_batch": 8, "optim.accum_iter": 1}).ctx.plan.accum == 2
    assert "optim.accum_iter=1 is not used: optim.effective_batch=8 gives 2" in caplog.text
    trainer = _trainer(assets, tmp_path, **{"optim.effective_batch": 8, "optim.accum_iter": 2})
    assert (trainer.ctx.plan.accum, trainer.ctx.plan.effective_batch) == (2, 8)
    # 16 training images, batch 4: effective 32 needs 8 micro-batches, more than an epoch has
    with pytest.raises(ConfigError, match="16 samples are fewer than one step of 32") as refused:
        _trainer(assets, tmp_path, **{"optim.effective_batch": 32, "optim.batch_size": 4})
    message = str(refused.value)
    assert "optim.effective_batch to at most 16" in message and "lower optim.batch_size or" not in message
    assert _trainer(assets, tmp_path, **{"optim.effective_batch": 16, "optim.batch_size": 4}).ctx.plan.accum == 4
    with pytest.raises(ConfigError, match="optim.batch_size to at most 16 and optim.effective_batch"):
        _trainer(assets, tmp_path, **{"optim.effective_batch": 64, "optim.batch_size": 32})
    with pytest.raises(ConfigError, match="lower optim.batch_size or optim.accum_iter"):
        _trainer(assets, tmp_path, **{"optim.batch_size": 8, "optim.accum_iter": 3})


def test_layer_decay_and_no_decay_groups_as_the_task_builds_them(assets, tmp_path):
    trainer = _trainer(assets, tmp_path)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    seen = set()
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.add(name)
            assert group["lr_scale"] == pytest.approx(0.85 ** (DEPTH + 1 - layer_id(name, DEPTH))), name
            no_decay = param.ndim <= 1 or name.endswith(".bias") or name in ("backbone.pos_embed",
                                                                              "backbone.cls_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    expected_ids = {"backbone.cls_token": 0, "backbone.pos_embed": 0, "backbone.patch_embed.proj.weight": 0,
                    "backbone.blocks.0.attn.qkv.weight": 1, "backbone.blocks.3.ls2.gamma": 4,
                    "neck.fpn1.0.weight": 5, "decode_head.conv_seg.weight": 5, "auxiliary_head.conv_seg.bias": 5}
    assert all(layer_id(name, DEPTH) == i and name in seen for name, i in expected_ids.items())
    assert "backbone.norm.weight" not in seen  # the final norm is unused (no gradient): frozen
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.999)


def test_linear_probe_trains_only_the_head_and_keeps_the_backbone(assets, tmp_path, one_thread):
    trainer = _trainer(assets, tmp_path, **{"model.head": "linear"})
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    heads = {n for n, p in trainer.model.named_parameters() if id(p) in trained}
    assert heads == {"decode_head.conv_seg.weight", "decode_head.conv_seg.bias"}
    assert all(group["lr_scale"] == 1.0 for group in trainer.optimizer.param_groups)
    trainer.model.train()
    assert not trainer.model.backbone.training  # frozen backbone stays in eval mode (no drop path)
    out = tmp_path / "probe"
    assert cli.main(_args(assets, out, "--probe-layer", "3", "--iterations", "6", "--set", "run.eval_every=3")) == 0
    weights, pretrained = load_file(str(out / "segmentor.safetensors")), load_file(str(assets / "backbone.safetensors"))
    assert weights["decode_head.conv_seg.weight"].shape == (21, WIDTH, 1, 1)  # one block: width channels
    for key, value in pretrained.items():
        assert torch.equal(weights[f"backbone.{key}"], value), key
    metrics = read_metrics(out / "metrics.json")
    assert metrics["model"]["mode"] == "layer-wise probe" and metrics["model"]["feature_layers"] == [3]


def test_bf16_on_a_cpu_follows_the_fp32_run(assets, tmp_path, one_thread):
    """``--precision bf16`` on a CPU: bf16 autocast (about 1.85x faster for UNIP-S at 512 px on a CPU with bf16
    instructions, docs/segmentation.md); the per-step losses stay close to the fp32 run's."""
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert cli.main(_args(assets, out, "--precision", precision, "--iterations", "8",
                              "--set", "run.eval_every=8", "--set", "run.log_every=1")) == 0
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses[precision] = [r["loss"] for r in records if r.get("kind") == "train"]
        assert read_metrics(out / "metrics.json")["test"]["precision"] == precision  # evaluated under it too
    assert len(losses["bf16"]) == len(losses["fp32"]) == 8
    assert losses["bf16"] != losses["fp32"]  # it did compute in bf16
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"]):
        assert bf16 == pytest.approx(fp32, rel=0.1)


def test_compile_mode_reaches_the_compiled_backbone(assets, tmp_path, one_thread, monkeypatch, capsys):
    """``run.compile_mode`` is the ``torch.compile`` mode of the backbone's blocks; an unknown mode is refused."""
    modes = record_compile_modes(monkeypatch)
    assert cli.main(_args(assets, tmp_path / "run", "--iterations", "2", "--set", "run.eval_every=2",
                          "--set", "run.compile=true", "--set", "run.compile_mode=max-autotune-no-cudagraphs")) == 0
    assert len(modes) >= DEPTH and set(modes) == {"max-autotune-no-cudagraphs"}
    assert cli.main(_args(assets, tmp_path / "bad", "--set", "run.compile_mode=fast")) == 2
    assert "run.compile_mode" in capsys.readouterr().err
    # on a CPU run.compile=auto does not compile: the mode would be ignored, and the run says so
    assert cli.main(_args(assets, tmp_path / "eager", "--iterations", "2", "--set", "run.eval_every=2",
                          "--set", "run.compile_mode=reduce-overhead")) == 0
    assert modes == ["max-autotune-no-cudagraphs"] * len(modes)  # nothing more was compiled
    assert ("warning: run.compile_mode=reduce-overhead has no effect: this run is not compiled (run.compile=auto on "
            "cpu); add --set run.compile=true") in capsys.readouterr().err


def test_random_initialisation_is_said_clearly(assets, tmp_path, one_thread, capsys):
    out = tmp_path / "random"
    argv = _args(assets, out, "--iterations", "2", "--set", "run.eval_every=0", "--set", "optim.warmup_iterations=1")
    argv[argv.index("--pretrained") + 1] = "none"
    assert cli.main(argv + ["--probe", "linear"]) == 0
    stderr = capsys.readouterr().err
    assert "unip finetune: warning: backbone: RANDOM INITIALISATION of unip_vit_tiny_patch16" in stderr
    metrics = read_metrics(out / "metrics.json")
    assert metrics["model"]["backbone"]["random_init"] and metrics["model"]["backbone"]["depth"] == 12
    state = torch.load(next((out / "checkpoints").glob("step-*.pt")), weights_only=True)
    # random weights differ per rank (seed + rank): the state names the initialisation, which run.seed fixes
    assert state["extra"]["plan"]["backbone weights (digest)"] == "random initialisation"


def test_a_run_inside_the_warm_up_says_so(assets, tmp_path, one_thread, capsys):
    """--iterations at or below the preset's warm-up (e.g. soda_small --iterations 1000, warm-up 1500) trains at a
    rising lr to the end: one warning names both numbers and the setting; a shorter warm-up gives none."""
    common = ["--iterations", "2", "--set", "run.eval_every=0", "--probe", "linear"]
    assert cli.main(_args(assets, tmp_path / "inside", *common, "--set", "optim.warmup_iterations=2")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warm-up" in line]
    assert len(warnings) == 1 and warnings[0].startswith("unip finetune: warning: "), warnings
    assert "optim.warmup_iterations=2: 2 steps" in warnings[0] and "optim.iterations=2: 2 steps" in warnings[0]
    assert "--set optim.warmup_iterations=N" in warnings[0]
    assert cli.main(_args(assets, tmp_path / "after", *common, "--set", "optim.warmup_iterations=1")) == 0
    assert "warm-up" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- resume and DDP
def test_sigkill_and_resume_gives_bit_identical_weights(assets, tmp_path):
    common = ["--iterations", "12", "--set", "run.eval_every=4", "--set", "run.save_every_steps=3",
              "--set", "model.drop_path=0.2", "--set", "optim.warmup_iterations=3", "--workers", "0"]
    victim_dir = tmp_path / "victim"
    latest = kill_and_resume(lambda out, *extra: _args(assets, out, *common, *extra), tmp_path / "ref", victim_dir,
                             final="segmentor.safetensors")
    assert latest in ("step-00000003.pt", "step-00000006.pt")
    ref, res = load_file(str(tmp_path / "ref" / "segmentor.safetensors")), load_file(
        str(victim_dir / "segmentor.safetensors"))
    assert ref.keys() == res.keys()
    assert all(torch.equal(ref[k], res[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], res[k])]
    ref_metrics = read_metrics(tmp_path / "ref" / "metrics.json")
    res_metrics = read_metrics(victim_dir / "metrics.json")
    assert (ref_metrics["confusion_matrix"], ref_metrics["step"]) == (res_metrics["confusion_matrix"],
                                                                      res_metrics["step"])


def test_resume_after_the_files_moved_but_not_with_another_backbone(assets, tmp_path, one_thread, capsys):
    """Backbone and images are compared by content, not path: moved files resume, other weights are refused."""
    moved = tmp_path / "moved"
    shutil.copytree(assets / "soda", moved / "soda")
    shutil.copy(assets / "backbone.safetensors", moved / "renamed.safetensors")
    common = ["--iterations", "2", "--set", "run.eval_every=0", "--set", "optim.warmup_iterations=1"]
    assert cli.main(_args(assets, tmp_path / "r", *common)) == 0
    argv = _args(assets, tmp_path / "r", *common, "--resume", "auto")
    argv[argv.index("--pretrained") + 1] = str(moved / "renamed.safetensors")
    argv[argv.index("--data") + 1] = str(moved / "soda")
    capsys.readouterr()
    assert cli.main(argv) == 0 and "resumed from" in capsys.readouterr().out
    torch.manual_seed(1)
    other = create_model("unip_vit_tiny_patch16", depth=DEPTH, embed_dim=WIDTH, num_heads=2, img_size=64)
    save_checkpoint(other, moved / "renamed.safetensors")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "backbone weights (digest)" in err and "allow_changed_config" in err, err


def test_resume_refuses_another_architecture_on_the_same_weights(assets, trained, tmp_path, one_thread, capsys):
    """The last block's head count and the neck change the model without changing a weight's shape: a resume
    that changes them must be refused like any other change of what is trained, not continue silently."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for change, named in (("model.last_block_heads=4", "heads per block"), ("model.neck=fpn", "model.neck")):
        assert cli.main(_args(assets, run, "--resume", "auto", "--set", change)) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and named in err and "allow_changed_config" in err, err
    assert cli.main(_args(assets, run, "--resume", "auto")) == 0  # unchanged: continues (here: already done)


def test_two_process_runs_equal_one_process(assets, tmp_path, one_thread):
    """A linear probe (no BatchNorm: exact) on 2 gloo ranks × batch 2 equals 1 process × batch 4; a 2-rank
    fine-tuning run's test evaluation and a 2-rank `unip evaluate` (confusion matrices all-reduced) equal a
    1-process `unip evaluate` of its best model."""
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "unip.cli"]
    probe = ["--probe", "linear", "--iterations", "8", "--set", "run.eval_every=4", "--workers", "0"]
    ddp = subprocess.Popen(torchrun + _args(assets, tmp_path / "ddp", *probe, "--batch-size", "2"), env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert cli.main(_args(assets, tmp_path / "one", *probe, "--batch-size", "4")) == 0
    output, _ = ddp.communicate(timeout=240)
    assert ddp.returncode == 0, output[-3000:]
    one, two = load_file(str(tmp_path / "one" / "segmentor.safetensors")), load_file(
        str(tmp_path / "ddp" / "segmentor.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
    assert output.count("probing finished") == 1  # rank 0 reports

    finetune = ["--iterations", "4", "--set", "run.eval_every=2", "--set", "optim.warmup_iterations=1",
                "--batch-size", "2", "--workers", "0"]
    ddp = subprocess.run(torchrun + _args(assets, tmp_path / "ddp_ft", *finetune), env=_env(),
                         capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    metrics = read_metrics(tmp_path / "ddp_ft" / "metrics.json")
    assert metrics["images"] == 8
    evaluate = ["evaluate", "--checkpoint", metrics["checkpoint"], "--data", str(assets / "soda"), "--device", "cpu",
                "--no-progress", "--overlays", "1", "--workers", "0"]
    ddp = subprocess.run(torchrun + evaluate + ["--out", str(tmp_path / "eval_ddp")], env=_env(),
                         capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("mIoU") == 1  # rank 0 prints the table
    assert cli.main(evaluate + ["--out", str(tmp_path / "eval")]) == 0
    one, two = read_metrics(tmp_path / "eval" / "metrics.json"), read_metrics(tmp_path / "eval_ddp" / "metrics.json")
    assert one["confusion_matrix"] == two["confusion_matrix"] == metrics["confusion_matrix"]
    assert one["images"] == two["images"] == 8
    assert not list(tmp_path.rglob(".unip.lock"))  # rank 0 held each run folder's lock, and let go of it


# ----------------------------------------------------------------------------------------------- release files
def test_evaluate_runs_a_random_weight_checkpoint_in_the_release_fine_tuned_layout(assets, tmp_path, one_thread):
    from test_seg_model import release_state_dict, save_release

    path = save_release(tmp_path / "iter_14400.pth", release_state_dict(48, 2, 21, grid=32, channels=32,
                                                                         aux_channels=16))
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--checkpoint", str(path), "--data", str(assets / "soda"), "--dataset", "soda",
                     "--out", str(out), "--device", "cpu", "--no-progress", "--overlays", "1", "--workers", "0"]) == 0
    metrics = read_metrics(out / "metrics.json")
    assert metrics["classes"][1] == "person" and metrics["images"] == 8 and metrics["step"] is None
    assert metrics["test"]["crop"] == 512 and metrics["test"]["stride"] == 341
    assert metrics["model"]["backbone"]["heads_per_block"] == [1, 1]  # width / 64, as the release built them
    assert sum(map(sum, metrics["confusion_matrix"])) > 0 and len(list((out / "overlays").glob("*.png"))) == 1


# ----------------------------------------------------------------------------------------------- presets
RECIPE = {"soda": (14400, 1500, 800), "mfnet": (9800, 1000, 700), "scut": (16800, 1700, 800)}
SIZES = {"tiny": ("unip_vit_tiny_patch16", 4, 0.1), "small": ("unip_vit_small_patch16", 4, 0.1),
         "base": ("unip_vit_base_patch16", 4, 0.1), "large": ("vit_large_patch16", 2, 0.2)}


@pytest.mark.parametrize("kind", ["finetune", "linprobe"])
def test_presets_state_the_release_recipe(kind):
    assert set(RULES) == set(flatten(DEFAULTS))
    for dataset, (iterations, warmup, every) in RECIPE.items():
        for size, (backbone, batch, drop_path) in SIZES.items():
            config = make_config(f"{dataset}_{size}", kind=kind)
            optim, run, model, data = config["optim"], config["run"], config["model"], config["data"]
            assert (optim["iterations"], optim["warmup_iterations"], run["eval_every"]) == (iterations, warmup, every)
            assert (optim["batch_size"], optim["effective_batch"]) == (batch, 8)
            assert (optim["lr"], optim["weight_decay"], optim["betas"], optim["schedule"], optim["power"],
                    optim["warmup_start_factor"], optim["min_lr"]) == (1e-4, 0.05, [0.9, 0.999], "poly", 1.0, 1e-6, 0)
            assert (run["seed"], run["precision"], run["best_metric"]) == (0, "fp16", "mIoU")
            assert (data["dataset"], data["crop_size"], data["scale"], data["ratio_range"]) == \
                (dataset, 512, [2048, 512], [0.5, 2.0])
            assert (data["mean"], data["std"], config["eval"]["stride"]) == (96.9255, 47.8976, None)  # 2/3: 341
            assert model["backbone"] == backbone and model["last_block_heads"] == "pretrained"
            if kind == "finetune":
                assert (model["head"], model["neck"], model["layer_decay"], model["drop_path"]) == \
                    ("upernet", "llfpn", 0.85, drop_path) and model["auxiliary_head"]
            else:
                assert (model["head"], model["layer_decay"]) == ("linear", 1.0)
    shipped = {p.stem for p in (PRESET_ROOTS[0] / kind).glob("*.yaml") if not p.stem.startswith("_")}
    extra = {"toy", "demo"} if kind == "finetune" else {"toy"}  # the small presets of the tests and `unip demo`
    assert shipped == {f"{d}_{s}" for d in RECIPE for s in SIZES} | extra
    # the toy presets run on a laptop CPU: no recipe fp16 there (it would warn that fp16 is unused on a CPU)
    assert make_config("toy", kind=kind)["run"]["precision"] == "auto"


def test_a_run_without_a_best_model_says_it_tested_the_final_one(assets, tmp_path, one_thread, capsys):
    """Labels that are all 255 give no mIoU, so no evaluation chooses a best model: the test split is evaluated
    with the final model, and the closing line says so."""
    data = tmp_path / "soda"
    shutil.copytree(assets / "soda", data)
    for label in (data / "SegmentationClassPNG").iterdir():
        with Image.open(label) as image:
            size = image.size
        Image.new("L", size, 255).save(label)
    capsys.readouterr()
    assert cli.main(["finetune", "toy", "--pretrained", str(assets / "backbone.safetensors"), "--data", str(data),
                     "--out", str(tmp_path / "ft"), "--device", "cpu", "--set", "run.progress=false",
                     "--iterations", "2", "--set", "run.eval_every=1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "no evaluation chose a best model" in last and "test metrics of the final model" in last
    assert "best model:" not in last and read_metrics(tmp_path / "ft" / "metrics.json")["best"] is None


def test_print_config_and_probe_presets(capsys):
    assert cli.main(["finetune", "mfnet_base", "--probe-layer", "7", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "head: linear" in printed and "probe_layer: 7" in printed and "iterations: 9800" in printed
    assert cli.main(["finetune", "scut_large", "--print-config", "--set", "model.last_block_heads=default"]) == 0
    printed = capsys.readouterr().out
    assert "last_block_heads: default" in printed and "batch_size: 2" in printed and "drop_path: 0.2" in printed


def test_a_smaller_crop_takes_its_own_stride_and_a_stated_stride_over_it_is_refused(capsys):
    """The recipe presets leave eval.stride to the crop (2/3 of it), so sizing a run down with data.crop_size=64
    just works; a stride stated larger than the crop says what to set."""
    argv = ["finetune", "scut_small", "--print-config", "--set", "data.crop_size=64"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main([*argv, "--set", "eval.stride=341"]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval.stride=341" in err and "--set eval.stride=null" in err and "\n" not in err


def test_a_nan_loss_stops_cleanly_and_says_what_was_kept(assets, tmp_path, one_thread, capsys):
    """NaN at step 3 after the state of step 2: exit 2, one line naming that state; resuming with a lower lr
    finishes the run. NaN at step 1: no state exists, and the line must not claim one."""
    out = tmp_path / "nan"
    assert cli.main(_args(assets, out, "--iterations", "4", "--set", "run.save_every_steps=2",
                          "--set", "optim.warmup_iterations=1", "--set", "debug.nan_at_step=3")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "loss became nan at step 3" in err and "step-00000002.pt" in err
    assert [p.name for p in checkpointing.list_states(out / "checkpoints")] == ["step-00000002.pt"]
    assert not (out / "segmentor.safetensors").exists() and not (out / "metrics.json").exists()
    assert cli.main(_args(assets, out, "--iterations", "4", "--set", "run.save_every_steps=2",
                          "--set", "optim.warmup_iterations=1", "--set", "optim.lr=5e-4", "--resume", "auto")) == 0
    assert load_segmentor(out / "segmentor.safetensors").meta["step"] == 4
    capsys.readouterr()

    early = tmp_path / "early"
    assert cli.main(_args(assets, early, "--iterations", "4", "--set", "debug.nan_at_step=1")) == 2
    err = capsys.readouterr().err.strip()
    assert "loss became nan at step 1" in err and "no training state was saved" in err
    assert "checkpoint is kept" not in err
    assert checkpointing.find_latest(early / "checkpoints") is None
    assert cli.main(_args(assets, early, "--iterations", "2")) == 0  # the same folder takes the run again


@pytest.mark.parametrize("given, advised", [("optim.lr", "--set optim.lr=VALUE"), ("", "--set run.seed=VALUE")])
def test_a_set_without_a_value_advises_a_setting_finetune_has(given, advised, capsys):
    """The example must be a setting of this verb (pre-training's optim.blr is none of fine-tuning's)."""
    assert cli.main(["finetune", "toy", "--print-config", "--set", given]) == 2
    err = capsys.readouterr().err
    assert advised in err and "blr" not in err


def test_a_new_run_is_refused_over_a_finished_run_whose_states_were_deleted(assets, tmp_path, one_thread, capsys):
    """Deleting checkpoints/ after a run (the states are large) must not let the next run into the same --out
    replace its final model and metrics.json and append to its log."""
    out = tmp_path / "done"
    assert cli.main(_args(assets, out, "--iterations", "2")) == 0
    shutil.rmtree(out / "checkpoints")
    kept = {name: (out / name).read_bytes() for name in ("segmentor.safetensors", "metrics.json", "log.jsonl")}
    capsys.readouterr()
    assert cli.main(_args(assets, out, "--iterations", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a finished run" in err and "segmentor.safetensors" in err and "\n" not in err
    assert {name: (out / name).read_bytes() for name in kept} == kept
    config = make_config("toy", values={"model.pretrained": str(assets / "backbone.safetensors"),
                                        "data.path": str(assets / "soda"), "run.output": str(out),
                                        "run.device": "cpu", "run.progress": False})
    with pytest.raises(ConfigError, match="finished run"):  # the library entry point checks it too
        finetune(config)
    assert {name: (out / name).read_bytes() for name in kept} == kept


def test_a_pre_training_run_folder_as_out_is_refused_as_such(assets, tmp_path, capsys):
    """`--out runs/unip-s` (the pretrain run) must not be called a folder of files unip did not write."""
    from unip.distill.train import make_config as pretrain_config
    from unip.engine.config import dump_config

    out = tmp_path / "unip-s"
    out.mkdir()
    (out / "config.yaml").write_text(dump_config(pretrain_config("toy")))
    (out / "log.jsonl").write_text('{"step": 0, "time": 0.0, "kind": "setup"}\n')
    assert cli.main(_args(assets, out, "--iterations", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "another kind of unip run" in err and "not written by unip" not in err and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "log.jsonl"]


def test_resuming_a_pre_training_state_says_it_is_one(assets, trained, tmp_path, capsys):
    """`--resume runs/unip-s/checkpoints/step-*.pt` (a pretrain state, mistaken for --pretrained) must say what
    it is, not list a dozen changed settings and advise run.allow_changed_config."""
    from unip.distill.train import make_config as pretrain_config

    state = torch.load(checkpointing.find_latest(trained / "checkpoints"), map_location="cpu", weights_only=True)
    state["extra"]["config"] = pretrain_config("toy")
    foreign = tmp_path / "unip-s" / "checkpoints" / "step-00000004.pt"
    foreign.parent.mkdir(parents=True)
    torch.save(state, foreign)
    assert cli.main(_args(assets, tmp_path / "ft", "--resume", str(foreign))) == 2
    err = capsys.readouterr().err.strip()
    assert "another unip command" in err and "--pretrained" in err and "allow_changed_config" not in err, err
