"""`unip pretrain` end to end on a tiny teacher and generated images (CPU): learning, DDP equivalence,
exact resume after SIGKILL, the stop on a non-finite loss, the CLI surface."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unip import cli
from unip.analysis.metrics import nmi
from unip.checkpoint import open_model, save_checkpoint
from unip.data.synth import write_unlabeled
from unip.distill import attention_distill_loss, load_teacher
from unip.distill.data import build_transform, open_pretrain_images
from unip.distill.train import build_student, make_config, train
from unip.engine import checkpointing
from unip.models import create_model
from unip.models.cpu_linear import onednn_linear_available

from compile_modes import record_compile_modes
from killed_runs import kill_and_resume

BIN = Path(sys.executable).parent
TEACHER_LAYER, TEACHER_HEADS = 2, 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 3-block teacher (width 64, 4 heads) at 64 px and 32 generated thermal images."""
    root = tmp_path_factory.mktemp("pretrain")
    torch.manual_seed(0)
    teacher = create_model("vit_small_patch16", depth=3, embed_dim=64, num_heads=TEACHER_HEADS, img_size=64)
    save_checkpoint(teacher, root / "teacher.safetensors")
    write_unlabeled(str(root / "images"), 32, size=(80, 64), seed=0)
    return root


def _args(assets, out, *extra):
    """CLI arguments of a tiny run: 2-block student, 64 px, 8 images per step, 4 steps per epoch."""
    return ["pretrain", "toy", "--teacher", str(assets / "teacher.safetensors"), "--data", str(assets / "images"),
            "--out", str(out), "--device", "cpu", "--set", "student.depth=2", "--set", "student.embed_dim=64",
            "--set", "student.num_heads=2", "--set", "run.progress=false", *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _weights(path):
    return load_file(str(path))


def _eval_images(assets, n=16):
    data = open_pretrain_images(str(assets / "images"), build_transform(64, 0.3801, 0.1871, augment=False))
    return torch.stack([data[i] for i in range(n)])


def _student_nmi(student, images):
    with torch.no_grad():
        attn = student.attention_maps(images, [student.depth])[student.depth]
    return nmi(attn).mean().item()


def test_tiny_run_halves_the_loss_and_moves_nmi_towards_the_teacher(assets, tmp_path):
    config = make_config("toy", values={
        "teacher.source": str(assets / "teacher.safetensors"), "teacher.layer": "auto",
        "data.path": str(assets / "images"), "run.output": str(tmp_path / "run"), "run.progress": False,
        "student.depth": 2, "student.embed_dim": 64, "student.num_heads": 2, "optim.epochs": 8,
        "optim.blr": 0.05, "data.augment": False, "run.log_every": 1})
    result = train(config)
    loaded = open_model(result.student)
    student, meta = loaded.model, loaded.meta
    layer = meta["teacher_layer"]
    assert 1 <= layer <= 3 and meta["teacher_heads"] == TEACHER_HEADS
    assert student.heads_per_block == [2, TEACHER_HEADS] and student.config["pos_embed_type"] == "sincos"
    assert meta["normalization"]["mean"] == [0.3801] * 3 and result.steps == 32

    images = _eval_images(assets)
    teacher = load_teacher(str(assets / "teacher.safetensors"), layer, img_size=64)
    torch.manual_seed(1)
    untrained = build_student(config, TEACHER_HEADS, torch.device("cpu")).eval()
    with torch.no_grad():
        target = teacher(images)
        before = attention_distill_loss(untrained.attention_logits(images, 2), target).item()
        after = attention_distill_loss(student.attention_logits(images, 2), target).item()
    assert after <= 0.5 * before, (before, after)
    with torch.no_grad():
        teacher_nmi = nmi(teacher(images).softmax(-1)).mean().item()
    assert abs(_student_nmi(student, images) - teacher_nmi) < abs(_student_nmi(untrained, images) - teacher_nmi)
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) >= 32 and all(k in log[-1] for k in ("loss", "lr", "grad_norm", "images_per_s"))
    assert (tmp_path / "run" / "tb").is_dir()


needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN linear op")


@needs_onednn
def test_onednn_teacher_linears_give_the_same_run(assets, tmp_path, monkeypatch):
    """The teacher's fp32 linears through oneDNN (``UNIP_CPU_LINEAR``, docs/pretrain.md#throughput): the same
    losses as PyTorch's kernel up to summation order, and the run's record says which kernel ran."""
    losses = {}
    for kernel in ("default", "onednn"):
        monkeypatch.setenv("UNIP_CPU_LINEAR", kernel)
        out = tmp_path / kernel
        train(make_config("toy", values={
            "teacher.source": str(assets / "teacher.safetensors"), "teacher.layer": 2,
            "data.path": str(assets / "images"), "run.output": str(out), "run.progress": False,
            "student.depth": 2, "student.embed_dim": 64, "student.num_heads": 2, "optim.epochs": 1,
            "data.augment": False, "run.log_every": 1}))
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        setup = next(r for r in records if "teacher_layer" in r)
        assert setup["teacher_linear_kernel"] == kernel
        losses[kernel] = [r["loss"] for r in records if r.get("kind") == "train"]
    assert len(losses["onednn"]) == 4
    assert losses["onednn"] == pytest.approx(losses["default"], rel=1e-4)


@needs_onednn
def test_a_resumed_run_keeps_the_teacher_kernel_its_first_process_chose(assets, tmp_path, monkeypatch):
    """``UNIP_CPU_LINEAR`` unset: a resumed process reads the kernel from the run's log instead of timing anew,
    so its targets, and the weights it ends with, are those of the uninterrupted run."""
    from unip.models import cpu_linear

    monkeypatch.delenv("UNIP_CPU_LINEAR", raising=False)
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHTS", 1)
    monkeypatch.setattr(cpu_linear, "onednn_is_faster", lambda *shape: True)
    out = tmp_path / "run"
    values = {"teacher.source": str(assets / "teacher.safetensors"), "teacher.layer": 2,
              "data.path": str(assets / "images"), "run.output": str(out), "run.progress": False,
              "student.depth": 2, "student.embed_dim": 64, "student.num_heads": 2, "optim.epochs": 2,
              "run.save_every_steps": 2, "run.keep_checkpoints": 4, "run.log_every": 1}
    train(make_config("toy", values=values))
    uninterrupted = _weights(out / "student.safetensors")
    monkeypatch.setattr(cpu_linear, "onednn_is_faster", lambda *shape: False)  # a timing that now says otherwise
    state = out / "checkpoints" / "step-00000004.pt"
    train(make_config("toy", values={**values, "run.resume": str(state)}))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    resume = next(r for r in records if r.get("kind") == "resume")
    assert resume["step"] == 4 and resume["teacher_linear_kernel"] == "onednn"
    resumed = _weights(out / "student.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    monkeypatch.setenv("UNIP_CPU_LINEAR", "default")  # an explicit choice wins over the log
    train(make_config("toy", values={**values, "run.resume": str(state)}))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r for r in records if r.get("kind") == "resume"][-1]["teacher_linear_kernel"] == "default"


def test_every_rank_takes_rank_0s_kernel_choice(assets, monkeypatch):
    """Several processes on CPUs: only rank 0 times the kernels, the others take its choice through one
    all-reduce, so all ranks compute the same targets; a set ``UNIP_CPU_LINEAR`` needs no collective."""
    from unip.distill import train as distill_train
    from unip.engine.distributed import DistInfo
    from unip.engine.loop import Precision

    monkeypatch.delenv("UNIP_CPU_LINEAR", raising=False)
    model = create_model("vit_small_patch16", depth=3, embed_dim=64, num_heads=TEACHER_HEADS, img_size=64)
    config = make_config("toy")
    timed, reduced = [], []
    monkeypatch.setattr(distill_train, "decide", lambda m, choice: timed.append(choice) or "onednn")
    monkeypatch.setattr(distill_train, "all_reduce_sum", lambda t: reduced.append(float(t)) or t + 1)  # rank 0: 1
    worker = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    fp32 = Precision("cpu", None)
    assert distill_train.teacher_linear_kernel(model, config, worker, fp32) == "onednn"
    assert timed == [] and reduced == [0.0]  # rank 1 did not time, it contributed 0 and took rank 0's 1
    main = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(distill_train, "all_reduce_sum", lambda t: reduced.append(float(t)) or t)
    assert distill_train.teacher_linear_kernel(model, config, main, fp32) == "onednn"
    assert timed == ["auto"] and reduced == [0.0, 1.0]
    monkeypatch.setenv("UNIP_CPU_LINEAR", "default")
    assert distill_train.teacher_linear_kernel(model, config, worker, fp32) == "onednn"  # decide() is faked
    assert timed == ["auto", "default"] and len(reduced) == 2  # no collective
    assert distill_train.teacher_linear_kernel(model, config, worker, Precision("cpu", torch.bfloat16)) == "default"


@needs_onednn
def test_a_compiled_teacher_is_recorded_with_pytorchs_kernel(monkeypatch):
    """``run.compile`` traces ``F.linear`` (inductor picks its own kernels): the teacher's layers go back to
    ``nn.Linear`` so that the record, and a resume reading it, say what ran."""
    from unip.distill import Teacher
    from unip.distill.train import NmiHadTask, StudentLogits
    from unip.models.cpu_linear import linear_kernel, use_onednn_linears
    from unip.models.vit import VisionTransformer

    monkeypatch.setattr(VisionTransformer, "compile_blocks", lambda self, **options: None)
    task = NmiHadTask(make_config("toy"))
    task.teacher = Teacher(create_model("vit_small_patch16", depth=3, embed_dim=64, num_heads=4, img_size=64), 2)
    use_onednn_linears(task.teacher.model, "onednn")
    student = create_model("vit_small_patch16", depth=2, embed_dim=64, num_heads=2, img_size=64)
    task.compile(StudentLogits(student), student, {})
    assert linear_kernel(task.teacher) == "default"


def test_compile_mode_reaches_every_compiled_part(assets, tmp_path, monkeypatch):
    """``run.compile_mode`` (e.g. ``reduce-overhead``: CUDA graphs, docs/pretrain.md) is the mode of every
    ``torch.compile`` the run makes: the student's and the teacher's blocks and distilled logits, and the loss;
    another value is refused with the choices."""
    from unip.errors import ConfigError

    modes = record_compile_modes(monkeypatch)
    train(make_config("toy", values={
        "teacher.source": str(assets / "teacher.safetensors"), "teacher.layer": TEACHER_LAYER,
        "data.path": str(assets / "images"), "run.output": str(tmp_path / "run"), "run.progress": False,
        "student.depth": 2, "student.embed_dim": 64, "student.num_heads": 2, "optim.epochs": 1,
        "run.compile": True, "run.compile_mode": "reduce-overhead"}))
    # student: 2 blocks + logits; teacher: 2 blocks run (it stops at layer 2) + its logits; the loss
    assert len(modes) >= 7 and set(modes) == {"reduce-overhead"}
    with pytest.raises(ConfigError, match="run.compile_mode.*reduce-overhead"):
        make_config("toy", ("run.compile_mode=fast",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_give_the_compiled_runs_losses(assets, tmp_path):
    """``run.compile_mode=reduce-overhead`` on CUDA: the compiled graphs replay as CUDA graphs through a whole run
    (the loss gate's deferred reads, drop path, the optimiser), with the per-step losses of the default compiled
    run."""
    losses = {}
    for mode in ("default", "reduce-overhead"):
        out = tmp_path / mode
        train(make_config("toy", values={
            "teacher.source": str(assets / "teacher.safetensors"), "teacher.layer": TEACHER_LAYER,
            "data.path": str(assets / "images"), "run.output": str(out), "run.progress": False,
            "student.depth": 2, "student.embed_dim": 64, "student.num_heads": 2, "optim.epochs": 2,
            "data.augment": False, "run.log_every": 1, "run.device": "cuda", "run.precision": "bf16",
            "run.compile": True, "run.compile_mode": mode}))
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if r.get("kind") == "train"]
    assert len(losses["reduce-overhead"]) == len(losses["default"]) == 8
    for default, graphed in zip(losses["default"], losses["reduce-overhead"]):
        assert graphed == pytest.approx(default, rel=1e-2)


def test_bf16_on_a_cpu_follows_the_fp32_run(assets, tmp_path):
    """``--precision bf16`` on a CPU: bf16 autocast and a bf16 teacher (about 2x faster where the CPU has bf16
    instructions, docs/pretrain.md), here with the teacher's tanh GELU (``run.teacher_gelu``); the per-step
    losses stay close to the fp32 run's."""
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        train(make_config("toy", values={
            "teacher.source": str(assets / "teacher.safetensors"), "teacher.layer": 2,
            "data.path": str(assets / "images"), "run.output": str(out), "run.progress": False,
            "student.depth": 2, "student.embed_dim": 64, "student.num_heads": 2, "optim.epochs": 2,
            "data.augment": False, "run.log_every": 1, "run.precision": precision,
            "run.teacher_gelu": "tanh" if precision == "bf16" else "exact"}))
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        setup = next(r for r in records if "teacher_layer" in r)
        assert (setup["teacher_precision"], setup["teacher_gelu"]) == (precision, "tanh" if precision == "bf16" else
                                                                        "exact")
        losses[precision] = [r["loss"] for r in records if r.get("kind") == "train"]
    assert len(losses["bf16"]) == len(losses["fp32"]) == 8
    assert losses["bf16"] != losses["fp32"]  # it did compute in bf16
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"]):
        assert bf16 == pytest.approx(fp32, rel=0.1)


@pytest.mark.parametrize("fused", [False, True])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(assets, tmp_path, fused):
    """Also with fused AdamW (CUDA's default), whose loop reads each loss after queuing the next step."""
    common = ["--teacher-layer", "2", "--epochs", "2", "--set", "data.augment=false",
              "--set", "student.drop_path=0.0", "--set", f"optim.fused={str(fused).lower()}"]
    ddp = subprocess.Popen(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "unip.cli",
         *_args(assets, tmp_path / "ddp", "--batch-size", "4", *common)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert cli.main(_args(assets, tmp_path / "one", "--batch-size", "8", *common)) == 0
    output, _ = ddp.communicate(timeout=240)
    assert ddp.returncode == 0, output[-3000:]
    one, two = _weights(tmp_path / "one" / "student.safetensors"), _weights(tmp_path / "ddp" / "student.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)


def test_sigkill_and_resume_gives_bit_identical_weights(assets, tmp_path):
    common = ["--teacher-layer", "2", "--epochs", "2", "--set", "run.save_every_steps=3",
              "--set", "run.save_every_epochs=1", "--set", "student.drop_path=0.2", "--set", "student.depth=3"]
    victim_dir = tmp_path / "victim"
    latest = kill_and_resume(lambda out, *extra: _args(assets, out, *common, *extra), tmp_path / "ref", victim_dir,
                             final="student.safetensors")
    assert latest in ("step-00000003.pt", "step-00000004.pt")
    ref, res = _weights(tmp_path / "ref" / "student.safetensors"), _weights(victim_dir / "student.safetensors")
    assert ref.keys() == res.keys()
    assert all(torch.equal(ref[k], res[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], res[k])]


def test_nan_loss_stops_the_run_and_keeps_a_loadable_checkpoint(assets, tmp_path, capsys):
    out = tmp_path / "nan"
    code = cli.main(_args(assets, out, "--teacher-layer", "2", "--set", "run.save_every_steps=2",
                          "--set", "debug.nan_at_step=3"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss became nan at step 3" in err[0] and "last good checkpoint" in err[0]
    assert "step-00000002.pt" in err[0] and "--resume auto" in err[0]
    assert not (out / "student.safetensors").exists()
    latest = checkpointing.find_latest(out / "checkpoints")
    assert latest.name == "step-00000002.pt"
    config = make_config("toy", values={"student.depth": 2, "student.embed_dim": 64, "student.num_heads": 2})
    student = build_student(config, TEACHER_HEADS, torch.device("cpu"))
    state = checkpointing.load_state(latest, student)
    assert state["step"] == 2 and all(torch.isfinite(p).all() for p in student.parameters())


def test_nan_loss_before_any_saved_state_does_not_promise_a_checkpoint(assets, tmp_path, capsys):
    out = tmp_path / "nan_early"
    assert cli.main(_args(assets, out, "--teacher-layer", "2", "--set", "debug.nan_at_step=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss became nan at step 2" in err[0], err
    assert "checkpoint" not in err[0] and "no training state was saved" in err[0] and "run it again" in err[0]
    assert checkpointing.find_latest(out / "checkpoints") is None
    assert cli.main(_args(assets, out, "--teacher-layer", "2", "--epochs", "1")) == 0  # run again, as it says


def test_cli_config_and_errors(assets, tmp_path, capsys):
    assert cli.main(["pretrain", "mae-l_unip-s", "--print-config", "--set", "optim.blr=3e-4"]) == 0
    printed = capsys.readouterr().out
    assert "layer: 18" in printed and "blr: 0.0003" in printed and "effective_batch: 4096" in printed
    assert cli.main(["pretrain", "toy", "--set", "optim.bogus=1"]) == 2
    assert "optim.bogus" in capsys.readouterr().err
    assert cli.main(_args(assets, tmp_path / "x", "--data", str(tmp_path / "nowhere"))) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli.main(["pretrain", "toy", "--data", str(assets / "images"), "--out", str(tmp_path / "y")]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written on bad input


@pytest.mark.parametrize("name,layer,heads,student", [
    ("mae-l_unip-s", 18, 16, "unip_vit_small_patch16"), ("dino-b_unip-s", 9, 12, "unip_vit_small_patch16"),
    ("ibot-l_unip-s", 21, 16, "unip_vit_small_patch16"), ("mae-l_unip-b", 18, 16, "unip_vit_base_patch16"),
    ("mae-l_unip-t", 18, 16, "unip_vit_tiny_patch16")])
def test_release_presets(name, layer, heads, student):
    from unip.distill.train import batch_plan

    config = make_config(name)
    assert config["teacher"]["layer"] == layer and config["student"]["model"] == student
    optim = config["optim"]
    assert (optim["epochs"], optim["warmup_epochs"], optim["blr"]) == (100, 5.0, 1.5e-4)
    assert optim["betas"] == [0.9, 0.95] and optim["weight_decay"] == 0.05
    assert config["data"]["input_size"] == 224 and config["data"]["scale"] == [0.2, 1.0]
    assert (config["data"]["mean"], config["data"]["std"]) == (0.3801, 0.1871)
    assert batch_plan(optim, 2) == (8, 4096, pytest.approx(2.4e-3))
    assert batch_plan(optim, 8)[:2] == (2, 4096)
    teacher_depth = 24 if heads == 16 else 12
    assert layer <= teacher_depth


def test_data_sources_pack_manifest_and_folder_give_the_same_images(assets, tmp_path):
    from unip.data import build_manifest, pack_manifest

    manifest = str(tmp_path / "m.jsonl")
    build_manifest(manifest, extra=[str(assets / "images")], workers=1)
    pack_manifest(manifest, str(tmp_path / "pack"), workers=1)
    transform = build_transform(64, 0.3801, 0.1871, augment=False)
    sets = [open_pretrain_images(str(p), transform) for p in (assets / "images", manifest, tmp_path / "pack")]
    assert [len(s) for s in sets] == [32, 32, 32]
    first = sets[0][0]
    assert first.shape == (3, 64, 64) and first.dtype == torch.float32
    by_name = {Path(p).name: i for i, p in enumerate(sets[2].paths())}
    torch.testing.assert_close(sets[2][by_name[Path(sets[0].files[0]).name]], first)
    with pytest.raises(Exception, match="not found"):
        open_pretrain_images(str(tmp_path / "missing"), transform)


def test_accumulation_and_effective_batch_must_agree():
    from unip.distill.train import batch_plan
    from unip.errors import ConfigError

    optim = make_config("mae-l_unip-s")["optim"]
    assert optim["accum_iter"] is None and batch_plan(optim, 2)[0] == 8 and batch_plan(optim, 16)[0] == 1
    assert batch_plan(dict(optim, accum_iter=8), 2)[0] == 8
    assert batch_plan(dict(optim, accum_iter=1), 16)[0] == 1
    with pytest.raises(ConfigError, match="contradicts"):
        batch_plan(dict(optim, accum_iter=3), 2)
    assert batch_plan(dict(optim, accum_iter=1), 2)[0] == 8  # what old configs state: ignored with a warning
    assert make_config("toy")["optim"]["accum_iter"] == 1
    assert make_config("mae-l_unip-s", ("optim.effective_batch=null",))["optim"]["accum_iter"] == 1  # stated
    with pytest.raises(ConfigError, match="not a multiple"):
        batch_plan(dict(optim, batch_size=100), 2)
    assert batch_plan(dict(optim, effective_batch=None, accum_iter=3, batch_size=4), 1) == (3, 12, 1.5e-4 * 12 / 256)


def test_two_process_run_resumed_from_a_checkpoint_matches_the_uninterrupted_run(assets, tmp_path):
    """Drop-path masks depend only on (seed, rank, step), so multi-process resume is exact too."""
    common = ["--teacher-layer", "2", "--epochs", "2", "--batch-size", "4", "--set", "run.save_every_steps=3",
              "--set", "run.keep_checkpoints=10", "--set", "student.drop_path=0.3", "--set", "student.depth=3"]
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "unip.cli"]
    full = subprocess.run(torchrun + _args(assets, tmp_path / "full", *common), env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert full.stdout.count("pre-training finished") == 1  # rank 0 reports, not every rank
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "step-00000003.pt", tmp_path / "resumed" / "checkpoints")
    resumed = subprocess.run(torchrun + _args(assets, tmp_path / "resumed", *common, "--resume", "auto"),
                             env=_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    ref = _weights(tmp_path / "full" / "student.safetensors")
    res = _weights(tmp_path / "resumed" / "student.safetensors")
    assert all(torch.equal(ref[k], res[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], res[k])]


def test_a_training_state_reads_as_the_student_it_trains(assets, tmp_path, capsys):
    """``step-*.pt`` is read with its run's architecture (heads per block, sin-cos table: the header the run's model
    file has), not guessed from the weight shapes: ``info``, ``analyze`` and ``--teacher`` see the student itself.
    A state written before states carried that header is rebuilt from its settings and step plan."""
    from unip.checkpoint import load_model
    from unip.errors import CheckpointError

    out = tmp_path / "run"
    assert cli.main(_args(assets, out, "--teacher-layer", "2", "--epochs", "1")) == 0
    state_path = checkpointing.find_latest(out / "checkpoints")
    student = open_model(out / "student.safetensors").model
    loaded = open_model(state_path)
    assert loaded.model.heads_per_block == student.heads_per_block == [2, TEACHER_HEADS]
    assert loaded.model.config == student.config and loaded.meta["training_state"]["step"] == 4
    assert loaded.meta["teacher_layer"] == 2 and "training state at step 4" in loaded.architecture_from
    ours, theirs = loaded.model.state_dict(), student.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert load_teacher(str(state_path), 2, img_size=64).num_heads == TEACHER_HEADS

    assert cli.main(["info", str(state_path)]) == 0
    assert f"heads 2 (last block: {TEACHER_HEADS})" in capsys.readouterr().out

    state = torch.load(state_path, weights_only=True)
    del state["extra"][checkpointing.MODEL_HEADER_KEY]  # as written before states carried it
    torch.save(state, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    assert old.heads_per_block == [2, TEACHER_HEADS] and old.config == dict(student.config, drop_path_rate=0.0)
    assert all(torch.equal(old.state_dict()[k], theirs[k]) for k in theirs)

    state["extra"] = {"config": {"model": {"backbone": "unip_vit_small_patch16"}}}  # an old fine-tuning state
    torch.save(state, tmp_path / "seg.pt")
    with pytest.raises(CheckpointError, match="seg.pt.*step 4.*segmentor.safetensors"):
        load_model(tmp_path / "seg.pt")


def test_resuming_with_layer_auto_takes_the_runs_layer_without_profiling(assets, tmp_path, monkeypatch):
    """``--teacher-layer auto`` on a resume reuses the layer the run chose (its log.jsonl) instead of profiling the
    teacher again, so a changed setting is refused before any profiling, and the choice cannot change."""
    import unip.distill.train as distill_train
    from unip.engine.logging import read_records

    values = {"teacher.source": str(assets / "teacher.safetensors"), "teacher.layer": "auto",
              "data.path": str(assets / "images"), "run.output": str(tmp_path / "run"), "run.progress": False,
              "student.depth": 2, "student.embed_dim": 64, "student.num_heads": 2, "optim.epochs": 1}
    train(make_config("toy", values=values))
    chosen = [r["teacher_layer"] for r in read_records(tmp_path / "run" / "log.jsonl") if "teacher_layer" in r]

    def no_profiling(*args, **kwargs):
        raise AssertionError("the teacher was profiled again on a resume")

    monkeypatch.setattr(distill_train, "auto_layer", no_profiling)
    train(make_config("toy", values={**values, "run.resume": "auto"}))
    records = read_records(tmp_path / "run" / "log.jsonl")
    resumed = [r for r in records if "from" in r]
    assert len(chosen) == 1 and resumed[-1]["teacher_layer"] == chosen[0]
    assert "not profiled again" in resumed[-1]["teacher_layer_reason"]
    with pytest.raises(Exception, match="other settings.*optim.batch_size"):
        train(make_config("toy", values={**values, "run.resume": "auto", "optim.batch_size": 4}))


def test_pretrain_input_errors_say_what_to_pass(assets, tmp_path, capsys):
    image = next((assets / "images").rglob("*.png"), None) or next((assets / "images").rglob("*.jpg"))
    assert cli.main(_args(assets, tmp_path / "a", "--teacher-layer", "2", "--data", str(image))) == 2
    err = capsys.readouterr().err
    assert "an image file, not a data set" in err and f"--data {image.parent}" in err
    (tmp_path / "folder").mkdir()
    assert cli.main(["pretrain", str(tmp_path / "folder")]) == 2
    assert "is a folder, not a config file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    listed = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # argparse wraps after hyphens
    assert all(name in listed for name in ("demo", "toy", "mae-l_unip-s", "dino-b_unip-s"))


def test_the_student_drops_paths_at_the_release_rate_in_every_block():
    """The release's pre-training students apply drop path 0.1 in every block (models_unip.py); timm's rule (and
    the fine-tuning backbone's) rises from 0 in the first block, which student.drop_path_schedule=linear keeps."""
    config = make_config("mae-l_unip-s", values={"student.model": "unip_vit_tiny_patch16", "data.input_size": 32})
    student = build_student(config, 16, torch.device("cpu"))
    assert [b.drop_path1.drop_prob for b in student.blocks] == [0.1] * 12
    assert [b.drop_path2.keep_prob.item() for b in student.blocks] == pytest.approx([0.9] * 12)
    config = make_config("mae-l_unip-s", ["student.drop_path_schedule=linear"],
                         values={"student.model": "unip_vit_tiny_patch16", "data.input_size": 32})
    rates = [b.drop_path1.drop_prob for b in build_student(config, 16, torch.device("cpu")).blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    from unip.errors import ConfigError

    with pytest.raises(ConfigError, match="student.drop_path_schedule must be one of: linear, uniform"):
        make_config("toy", ["student.drop_path_schedule=cubic"])
