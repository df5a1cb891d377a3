"""unip.engine.trainer on a toy segmentation task (a conv + BatchNorm net on random 8×8 images, CPU):
iteration-based poly schedule, evaluation every N steps, the best model kept through pruning and resume,
named loss components, the evaluation loader over uneven rank shares (and in a real 2-process group),
SyncBatchNorm only where it belongs, non-finite states never saved, leftovers of killed saves removed,
resume with changed settings refused unless allowed; and `unip pretrain` diverging on a huge lr."""

import json
import math
import multiprocessing
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from unip.engine import checkpointing
from unip.engine.config import build_config
from unip.engine.data import build_eval_loader
from unip.engine.distributed import (DistInfo, all_reduce_sum, sync_batchnorm, unwrap_model,
                                     uses_sync_batchnorm)
from unip.engine.loop import NonFiniteLossError
from unip.engine.schedule import warmup_poly
from unip.engine.trainer import OPTIM_DEFAULTS, RUN_DEFAULTS, Task, Trainer, train_task
from unip.errors import CheckpointError, ConfigError

TOY_DEFAULTS = {
    "run": {**RUN_DEFAULTS, "device": "cpu", "progress": False, "log_every": 1, "save_every_epochs": 0,
            "eval_every": 4, "best_metric": "mIoU"},
    "optim": {**OPTIM_DEFAULTS, "iterations": 12, "warmup_iterations": 3, "schedule": "poly", "lr": 0.05,
              "batch_size": 4},
    "data": {"num_workers": 0},
    "debug": {"nan_at_step": None, "step_delay": 0.0},
}


def _config(out, **values):
    """Toy settings: 10 training images, batch 4 → 2 steps per epoch, 12 iterations, eval every 4."""
    return build_config(TOY_DEFAULTS, values={"run.output": str(out), **values})


class ToyNet(nn.Module):
    """conv-BN-ReLU stem, a decode head and an auxiliary head: ``forward`` → (decode, aux) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)
        self.aux = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        features = self.stem(x)
        return self.head(features), self.aux(features)


class SizedImages(Dataset):
    """Evaluation images of different sizes: item ``i`` = (image [3, h, w], label [h, w], i)."""

    def __init__(self, count: int = 11) -> None:
        generator = torch.Generator().manual_seed(7)
        self.items = []
        for index in range(count):
            size = 4 + 2 * (index % 3)
            image = torch.randn(3, size, size + 2, generator=generator)
            self.items.append((image, (image[0] > 0).long(), index))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class ToySegmentation(Task):
    """Label = (channel 0 > 0) per pixel; loss = decode CE + 0.4 aux CE; mIoU over ``SizedImages``."""

    name = "toy"

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(10, 3, 8, 8, generator=generator)
        self.train_set = TensorDataset(images, (images[:, 0] > 0).long())
        self.val_set = SizedImages()

    def build_model(self, ctx):
        return ToyNet().to(ctx.device)

    def lr_scale(self, name):
        return 0.5 if name.startswith("stem.") else 1.0

    def train_dataset(self, ctx):
        return self.train_set

    def loss(self, module, batch, ctx):
        images, labels = (t.to(ctx.device) for t in batch)
        decode, aux = module(images)
        loss_decode = nn.functional.cross_entropy(decode, labels, ignore_index=255)
        loss_aux = nn.functional.cross_entropy(aux, labels, ignore_index=255)
        return loss_decode + 0.4 * loss_aux, {"decode": loss_decode, "aux": loss_aux}

    def evaluate(self, model, ctx):
        return confusion_metrics(model, self.val_set, ctx.dist.rank, ctx.dist.world_size)


def confusion_metrics(model, dataset, rank, world_size):
    """mIoU of ``model`` on this rank's share of ``dataset``, reduced over ranks."""
    confusion = torch.zeros(2, 2, dtype=torch.int64)
    seen = torch.zeros(len(dataset), dtype=torch.int64)
    for images, labels, indices in build_eval_loader(dataset, 3, rank=rank, world_size=world_size):
        for image, label, index in zip(images, labels, indices):
            prediction = model(image[None])[0].argmax(1)[0]
            confusion += torch.bincount(label.flatten() * 2 + prediction.flatten(), minlength=4).view(2, 2)
            seen[index] += 1
    confusion, seen = all_reduce_sum(confusion), all_reduce_sum(seen)
    iou = confusion.diag() / (confusion.sum(0) + confusion.sum(1) - confusion.diag())
    return {"mIoU": 100 * iou.mean().item(), "IoU": (100 * iou).tolist(), "pixels": int(confusion.sum()),
            "seen": seen.tolist()}


class Scripted(ToySegmentation):
    """Evaluation returns mIoU = ``script[step]`` and remembers the weights it saw."""

    def __init__(self, script) -> None:
        super().__init__()
        self.script, self.seen = script, {}

    def evaluate(self, model, ctx):
        self.seen[ctx.step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"mIoU": self.script[ctx.step]}


def _records(out, kind):
    lines = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def _state_weights(path):
    return torch.load(path, weights_only=True)["model"]


# ------------------------------------------------------------------------------------------ schedule
def test_iteration_schedule_evaluates_every_n_steps_and_logs_named_components(tmp_path):
    result = train_task(ToySegmentation(), _config(tmp_path / "run"))
    assert result.steps == 12 and result.model_path == tmp_path / "run" / "model.safetensors"
    train = _records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == list(range(1, 13))
    for record in train:  # the lr of step s is the schedule's value after s - 1 steps
        assert record["lr"] == pytest.approx(warmup_poly(record["step"] - 1, 12, 3, 0.05))
        assert record["epoch"] == (record["step"] - 1) // 2  # 10 images, batch 4: 2 steps per epoch
        assert record["loss"] == pytest.approx(record["loss_decode"] + 0.4 * record["loss_aux"], rel=1e-5)
    assert train[0]["lr"] == pytest.approx(0.05 * 1e-6) and train[-1]["loss"] < train[0]["loss"]
    evals = _records(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert all(r["seen"] == [1] * 11 and r["pixels"] == sum(len(x[1].flatten()) for x in SizedImages().items)
               for r in evals)
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-00000012.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (12, 6, 0)
    assert state["extra"]["plan"]["optim.iterations"] == 12
    groups = {g["lr_scale"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    assert groups[0.5] == pytest.approx(0.5 * groups[1.0]) and groups[1.0] == pytest.approx(train[-1]["lr"])
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert best["value"] == max(r["mIoU"] for r in evals) and result.best == best
    assert set(load_file(str(result.model_path))) == set(ToyNet().state_dict())


def test_progress_off_a_terminal_is_a_line_per_logged_step_not_a_bar(tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with caplog.at_level("INFO", logger="unip"):
        train_task(ToySegmentation(), _config(tmp_path / "run", **{"run.progress": True, "run.log_every": 4}))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ") and "/12" in r.getMessage()]
    logged = [r["step"] for r in _records(tmp_path / "run", "train")]  # every 4 steps and each epoch end (2)
    assert [line.split(":")[0] for line in lines] == [f"step {s}/12 ({100 * s // 12}%)" for s in logged]
    assert all(re.search(r"loss=[\d.]+ lr=\S+ images_per_s=[\d.]+", line) for line in lines), lines
    assert re.search(r"ETA \d+:\d\d:\d\d$", lines[0]) and "ETA" not in lines[-1]
    assert "it/s" not in capsys.readouterr().err and "step/s" not in capsys.readouterr().err  # no tqdm bar


def test_epoch_based_run_and_settings_errors(tmp_path):
    config = _config(tmp_path / "run", **{"optim.iterations": None, "optim.epochs": 3, "optim.warmup_epochs": 1.0,
                                          "optim.schedule": "cosine", "run.eval_every": 0})
    result = train_task(ToySegmentation(), config)
    assert result.steps == 6
    assert [r["step"] for r in _records(tmp_path / "run", "eval")] == [6]  # only at the end
    lrs = [r["lr"] for r in _records(tmp_path / "run", "train")]
    assert lrs[:3] == pytest.approx([0.0, 0.025, 0.05])
    with pytest.raises(ConfigError, match="exactly one of optim.epochs"):
        train_task(ToySegmentation(), _config(tmp_path / "x", **{"optim.epochs": 3}))
    with pytest.raises(ConfigError, match="optim.schedule"):
        train_task(ToySegmentation(), _config(tmp_path / "y", **{"optim.schedule": "step"}))
    with pytest.raises(ConfigError, match="best_metric='mAcc'"):
        train_task(ToySegmentation(), _config(tmp_path / "z", **{"run.best_metric": "mAcc"}))


# ------------------------------------------------------------------------------------------ best + resume
@pytest.mark.parametrize("fused, nan_step", [(None, 10), (True, 9)])
def test_best_model_survives_pruning_and_resume_and_resume_is_exact(tmp_path, fused, nan_step):
    """Also with fused AdamW, whose loop reads a loss after queuing the next step: the NaN at step 9 is read
    after step 10 was queued (and skipped on the device); the run stops with step 8's state."""
    script = {4: 1.0, 8: 3.0, 12: 2.0}
    values = {"run.save_every_steps": 4, "run.keep_checkpoints": 1, "optim.fused": fused}
    reference = Scripted(script)
    train_task(reference, _config(tmp_path / "ref", **values))

    stopped = Scripted(script)
    with pytest.raises(NonFiniteLossError, match=f"at step {nan_step} "):
        train_task(stopped, _config(tmp_path / "run", **values, **{"debug.nan_at_step": nan_step}))
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpointing.list_states(folder)] == ["step-00000008.pt"]
    resumed = Scripted(script)
    result = train_task(resumed, _config(tmp_path / "run", **values, **{"run.resume": "auto"}))
    assert sorted(resumed.seen) == [12]  # only the evaluation after the resume point ran again
    assert [p.name for p in checkpointing.list_states(folder)] == ["step-00000012.pt"]  # step 8 pruned
    best = json.loads((folder / "best.json").read_text())
    assert (best["metric"], best["step"], best["value"], best["mode"]) == ("mIoU", 8, 3.0, "max")
    assert result.best["step"] == 8  # 2.0 at step 12 does not beat the 3.0 remembered from before the resume
    saved = load_file(str(folder / "best.safetensors"))
    assert all(torch.equal(saved[k], stopped.seen[8][k]) for k in saved)
    ref, res = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(result.model_path))
    assert all(torch.equal(ref[k], res[k]) for k in ref)  # BatchNorm statistics included


class Traced(ToySegmentation):
    """40 training images (10 steps per epoch); ``events`` gets ``queue N`` as step N's loss is computed."""

    def __init__(self, events) -> None:
        super().__init__()
        images = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        self.train_set = TensorDataset(images, (images[:, 0] > 0).long())
        self.events = events

    def loss(self, module, batch, ctx):
        self.events.append(f"queue {ctx.step + 1}")
        return super().loss(module, batch, ctx)


def test_with_fused_adamw_each_loss_is_read_after_the_next_step_is_queued(tmp_path, monkeypatch):
    """The device never waits for the host between steps, except where the trainer needs a step's own
    weights: an evaluation (4, 8, 12), an epoch end (10) and the last step; the losses logged are the same as
    when every step is read at once (foreach AdamW), to rounding."""
    events = []
    original = Trainer._after_step
    monkeypatch.setattr(Trainer, "_after_step",
                        lambda self, done, bar: events.append(f"read {done.step}") or original(self, done, bar))
    train_task(Traced(events), _config(tmp_path / "fused", **{"optim.fused": True}))
    order = " ".join(events)
    assert order == ("queue 1 queue 2 read 1 queue 3 read 2 queue 4 read 3 read 4 queue 5 queue 6 read 5 "
                     "queue 7 read 6 queue 8 read 7 read 8 queue 9 queue 10 read 9 read 10 queue 11 queue 12 "
                     "read 11 read 12"), order
    events.clear()
    train_task(Traced(events), _config(tmp_path / "foreach"))
    assert " ".join(events) == " ".join(f"queue {s} read {s}" for s in range(1, 13))
    fused, foreach = _records(tmp_path / "fused", "train"), _records(tmp_path / "foreach", "train")
    assert [r["step"] for r in fused] == list(range(1, 13))
    for name in ("loss", "loss_decode", "lr", "grad_norm", "epoch"):
        assert [r[name] for r in fused] == pytest.approx([r[name] for r in foreach], rel=1e-4), name


def test_loader_workers_persist_over_epochs_and_exit_with_the_run(tmp_path, monkeypatch):
    """Two workers serve all six epochs (no restart at each epoch boundary) and stop when training ends; the
    run equals one that loads in-process."""
    settings = {"optim.iterations": None, "optim.epochs": 6, "run.eval_every": 0}
    train_task(ToySegmentation(), _config(tmp_path / "inline", **settings))
    started = []
    start = multiprocessing.process.BaseProcess.start
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                        lambda self: started.append(self.name) or start(self))
    result = train_task(ToySegmentation(), _config(tmp_path / "workers", **settings, **{"data.num_workers": 2}))
    assert result.steps == 12 and len(started) == 2  # 6 epochs of 2 steps, one pair of workers
    assert not multiprocessing.active_children()
    inline = load_file(str(tmp_path / "inline" / "model.safetensors"))
    workers = load_file(str(result.model_path))
    assert all(torch.equal(inline[k], workers[k]) for k in inline)


# ------------------------------------------------------------------------------------------ evaluation data
def test_eval_loader_reads_every_index_once_over_uneven_ranks():
    dataset = SizedImages(11)
    shares = []
    for rank in range(2):
        batches = list(build_eval_loader(dataset, 3, rank=rank, world_size=2))
        images, labels, indices = batches[0]
        assert isinstance(images, list) and len({tuple(i.shape) for i in images}) == 3  # mixed sizes
        assert all(label.shape == image.shape[1:] for image, label in zip(images, labels))
        shares.append([i for batch in batches for i in batch[2]])
    assert shares == [list(range(0, 11, 2)), list(range(1, 11, 2))]  # 6 and 5: nothing dropped or repeated
    assert len(list(build_eval_loader(dataset, 4, rank=0, world_size=1))) == 3  # 4 + 4 + 3


def _two_rank_worker(rank, store, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        info = DistInfo(rank, 2, rank, torch.device("cpu"))
        torch.manual_seed(0)
        model = ToyNet().eval()
        wrapped = nn.parallel.DistributedDataParallel(model)
        metrics = confusion_metrics(model, SizedImages(), rank, 2)
        result = {"metrics": metrics, "sync": uses_sync_batchnorm(info),
                  "unwrapped": unwrap_model(torch.compile(wrapped)) is model and unwrap_model(wrapped) is model,
                  "bn": type(sync_batchnorm(model, info).stem[1]).__name__}
        torch.save(result, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_evaluation_reduced_over_two_gloo_ranks_equals_one_process(tmp_path):
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path / "result")), nprocs=2)
    torch.manual_seed(0)
    with torch.no_grad():
        single = confusion_metrics(ToyNet().eval(), SizedImages(), 0, 1)
    for rank in range(2):
        result = torch.load(tmp_path / f"result.{rank}", weights_only=False)
        assert result["metrics"] == single and single["seen"] == [1] * 11
        assert result["sync"] is False and result["bn"] == "BatchNorm2d" and result["unwrapped"]


def test_sync_batchnorm_only_under_multi_process_cuda_nccl():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert uses_sync_batchnorm(DistInfo(0, 2, 0, cuda), backend="nccl")
    assert not uses_sync_batchnorm(DistInfo(0, 1, 0, cuda), backend="nccl")
    assert not uses_sync_batchnorm(DistInfo(0, 2, 0, cpu), backend="gloo")
    assert not uses_sync_batchnorm(DistInfo(0, 1, 0, cpu))
    converted = sync_batchnorm(ToyNet(), DistInfo(0, 2, 0, cuda), backend="nccl")
    assert isinstance(converted.stem[1], nn.SyncBatchNorm)
    assert set(converted.state_dict()) == set(ToyNet().state_dict())
    plain = ToyNet()
    assert sync_batchnorm(plain, DistInfo(0, 1, 0, cpu)) is plain and isinstance(plain.stem[1], nn.BatchNorm2d)


# ------------------------------------------------------------------------------------------ hardening
class Bounded(ToySegmentation):
    """A linear model whose loss stays finite (tanh) while its weights blow up: the loss alone cannot
    tell that the run diverged."""

    def build_model(self, ctx):
        return nn.Linear(3, 1)

    def lr_scale(self, name):
        return 1.0

    def loss(self, module, batch, ctx):
        images, labels = batch
        pixels = images.permute(0, 2, 3, 1).reshape(-1, 3)
        return ((torch.tanh(module(pixels))[:, 0] - labels.flatten().float()) ** 2).mean()

    def evaluate(self, model, ctx):
        return None


def test_non_finite_weights_are_never_saved_and_resume_picks_the_last_finite_state(tmp_path):
    values = {"run.save_every_steps": 1, "run.keep_checkpoints": 10, "run.best_metric": None}
    with pytest.raises(checkpointing.NonFiniteStateError, match="non-finite by step 2.*step-00000001.pt"):
        train_task(Bounded(), _config(tmp_path / "run", **values, **{"optim.lr": 1e38}))
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpointing.list_states(folder)] == ["step-00000001.pt"]
    assert not checkpointing.non_finite_tensors(torch.load(folder / "step-00000001.pt", weights_only=True))

    # a diverged state written by something else is skipped by --resume auto, refused when named
    diverged = torch.load(folder / "step-00000001.pt", weights_only=True)
    diverged["model"]["weight"].fill_(math.inf)
    diverged["step"] = 5
    torch.save(diverged, folder / "step-00000005.pt")
    with pytest.raises(CheckpointError, match="step-00000005.pt: model.weight not finite"):
        checkpointing.find_resume_state(str(folder / "step-00000005.pt"), folder)
    result = train_task(Bounded(), _config(tmp_path / "run", **values, **{"optim.lr": 1e-3, "run.resume": "auto"}))
    assert result.steps == 12
    assert all(torch.isfinite(t).all() for t in load_file(str(result.model_path)).values())


def test_temporaries_of_killed_saves_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    ours = [out / "checkpoints" / ".step-00000004.pt.tmp-99999", out / "checkpoints" / ".best.safetensors.tmp-7",
            out / ".model.safetensors.tmp-12"]
    theirs = [out / ".notes.txt.tmp-3", out / "checkpoints" / "step-00000004.pt.tmp-99999"]
    for path in ours + theirs:
        path.write_bytes(b"partial")
    train_task(ToySegmentation(), _config(out, **{"optim.iterations": 2, "run.eval_every": 0}))
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


def test_resume_with_changed_schedule_settings_is_refused_unless_allowed(tmp_path):
    out = tmp_path / "run"
    train_task(ToySegmentation(), _config(out, **{"optim.iterations": 4}))
    with pytest.raises(ConfigError, match=r"optim\.batch_size 4 → 2.*run\.allow_changed_config=true"):
        train_task(ToySegmentation(), _config(out, **{"optim.iterations": 4, "optim.batch_size": 2,
                                                      "run.resume": "auto"}))
    with pytest.raises(ConfigError, match=r"optim\.iterations 4 → 8"):
        train_task(ToySegmentation(), _config(out, **{"optim.iterations": 8, "run.resume": "auto"}))
    with pytest.raises(ConfigError, match=r"run\.seed 0 → 1"):
        train_task(ToySegmentation(), _config(out, **{"optim.iterations": 4, "run.seed": 1, "run.resume": "auto"}))
    result = train_task(ToySegmentation(), _config(out, **{"optim.iterations": 8, "run.resume": "auto",
                                                           "run.allow_changed_config": True}))
    assert result.steps == 8 and [r["step"] for r in _records(out, "train")][-4:] == [5, 6, 7, 8]
    same = train_task(ToySegmentation(), _config(out, **{"optim.iterations": 8, "optim.lr": 0.01,
                                                         "run.resume": "auto"}))
    assert same.steps == 8  # the lr is not part of the step plan: a lower lr after a divergence is fine


def test_resume_auto_without_a_state_says_a_new_run_starts(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="unip"):
        result = train_task(ToySegmentation(), _config(out, **{"optim.iterations": 2, "run.eval_every": 0,
                                                              "run.resume": "auto"}))
    assert result.steps == 2 and not _records(out, "resume")
    said = [r.getMessage() for r in caplog.records if "no training state" in r.getMessage()]
    assert said == [f"--resume auto: no training state in {out / 'checkpoints'}; starting a new run"]
    caplog.clear()
    with caplog.at_level("INFO", logger="unip"):  # a state now exists: resumed, and nothing said about a new run
        train_task(ToySegmentation(), _config(out, **{"optim.iterations": 2, "run.eval_every": 0,
                                                     "run.resume": "auto"}))
    assert "no training state" not in caplog.text and "resumed from" in caplog.text


def test_a_new_run_into_another_runs_folder_is_refused_naming_the_fixes(tmp_path):
    out = tmp_path / "run"
    train_task(ToySegmentation(), _config(out, **{"optim.iterations": 4, "run.save_every_steps": 2}))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"run already holds an earlier run \(training states up to step 4 .*"
                       r"--resume auto to continue it, choose another --out, or delete .*checkpoints"):
        train_task(ToySegmentation(), _config(out, **{"optim.iterations": 4}))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing deleted
    for state in checkpointing.list_states(out / "checkpoints"):
        state.unlink()
    with pytest.raises(ConfigError, match=r"a best model \(best.json, best.safetensors\)"):
        train_task(ToySegmentation(), _config(out, **{"optim.iterations": 4}))


class Recorded(Scripted):
    """``Scripted`` that also remembers the steps it evaluated, in order."""

    def evaluate(self, model, ctx):
        self.steps = getattr(self, "steps", []) + [ctx.step]
        return super().evaluate(model, ctx)


def _scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_resume_from_an_explicit_earlier_state_drops_what_came_after_it_and_its_logs(tmp_path):
    """Backing off a divergence: --resume step-4 with another lr; states and best past 4 go, auto then continues
    the new trajectory; log readers and TensorBoard see one trajectory."""
    from unip.engine.logging import records_of_last_run

    out, values = tmp_path / "run", {"run.save_every_steps": 4, "run.keep_checkpoints": 10}
    train_task(Scripted({4: 1.0, 8: 2.0, 12: 3.0}), _config(out, **values))
    folder = out / "checkpoints"
    assert json.loads((folder / "best.json").read_text())["step"] == 12
    with pytest.raises(NonFiniteLossError):  # killed (here: a NaN) at step 6 of the new trajectory
        train_task(Scripted({4: 1.0, 8: 0.5, 12: 0.2}), _config(out, **values, **{
            "run.resume": str(folder / "step-00000004.pt"), "optim.lr": 0.01, "debug.nan_at_step": 6}))
    assert [p.name for p in checkpointing.list_states(folder)] == ["step-00000004.pt"]
    assert not (folder / "best.json").exists() and not (folder / "best.safetensors").exists()
    resumed = Recorded({4: 1.0, 8: 0.5, 12: 0.2})
    result = train_task(resumed, _config(out, **values, **{"run.resume": "auto", "optim.lr": 0.01}))
    assert resumed.steps == [8, 12] and result.best["step"] == 8  # not the old trajectory's 3.0 at step 12

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "resume"] == [4, 4]
    assert [r["kind"] for r in records].count("setup") == 0  # the toy task has no setup values
    last = records_of_last_run(records)
    assert [r["step"] for r in last if r["kind"] == "train"] == list(range(1, 13))
    assert [(r["step"], r["mIoU"]) for r in last if r["kind"] == "eval"] == [(4, 1.0), (8, 0.5), (12, 0.2)]
    assert [step for step, _ in _scalars(out, "eval/mIoU")] == [4, 8, 12]  # purged: no step twice
    assert [value for _, value in _scalars(out, "eval/mIoU")] == pytest.approx([1.0, 0.5, 0.2])
    assert [step for step, _ in _scalars(out, "train/loss")] == list(range(1, 13))


class DivergingEvaluated(Bounded):
    def evaluate(self, model, ctx):
        self.steps = getattr(self, "steps", []) + [ctx.step]
        return {"mIoU": 1.0}


def test_a_diverged_model_is_not_evaluated_at_a_step_that_also_saves(tmp_path):
    task = DivergingEvaluated()
    values = {"run.save_every_steps": 1, "run.eval_every": 1, "optim.lr": 1e38}
    with pytest.raises(checkpointing.NonFiniteStateError, match="non-finite by step 2"):
        train_task(task, _config(tmp_path / "run", **values))
    assert task.steps == [1] and [r["step"] for r in _records(tmp_path / "run", "eval")] == [1]


class Described(ToySegmentation):
    """``ToySegmentation`` whose ``resume_record`` names a data set."""

    def __init__(self, data: str) -> None:
        super().__init__()
        self.data = data

    def resume_record(self, ctx):
        return {"data set": self.data}


def test_resume_compares_what_the_task_trains_on(tmp_path, caplog):
    out = tmp_path / "run"
    train_task(Described("soda"), _config(out, **{"optim.iterations": 4}))
    assert torch.load(out / "checkpoints" / "step-00000004.pt", weights_only=True)["extra"]["plan"]["data set"] \
        == "soda"
    with pytest.raises(ConfigError, match=r"data set soda → mfnet.*run\.allow_changed_config=true"):
        train_task(Described("mfnet"), _config(out, **{"optim.iterations": 8, "run.resume": "auto",
                                                       "run.allow_changed_config": False}))
    with caplog.at_level("WARNING"):
        result = train_task(Described("mfnet"), _config(out, **{"optim.iterations": 4, "run.resume": "auto",
                                                                "run.allow_changed_config": True}))
    assert result.steps == 4 and "data set soda → mfnet" in caplog.text


class Legacy(Described):
    """Today's record names the data by a digest; states of older versions named it by ``data set``."""

    def __init__(self, data: str) -> None:
        super().__init__(data)

    def resume_record(self, ctx):
        return {"data digest": "d"}

    def legacy_resume_record(self, ctx):
        return {"data set": self.data}


def test_states_of_older_versions_are_checked_by_what_they_recorded(tmp_path):
    out = tmp_path / "run"
    train_task(Described("soda"), _config(out, **{"optim.iterations": 4}))  # an older version's state
    with pytest.raises(ConfigError, match=r"data set soda → mfnet"):
        train_task(Legacy("mfnet"), _config(out, **{"optim.iterations": 4, "run.resume": "auto"}))
    assert train_task(Legacy("soda"), _config(out, **{"optim.iterations": 4, "run.resume": "auto"})).steps == 4


def test_an_accum_iter_of_1_beside_effective_batch_is_what_old_configs_state(caplog):
    from unip.engine.trainer import batch_plan

    optim = {"batch_size": 4, "effective_batch": 16, "lr": 1e-3}
    with caplog.at_level("WARNING", logger="unip"):
        assert batch_plan(dict(optim, accum_iter=1), 1)[:2] == (4, 16)
    assert "optim.accum_iter=1 is not used" in caplog.text
    with pytest.raises(ConfigError, match="optim.accum_iter=2 contradicts"):
        batch_plan(dict(optim, accum_iter=2), 1)


# ------------------------------------------------------------------------------------------ unip pretrain
@pytest.fixture(scope="module")
def pretrain_assets(tmp_path_factory):
    from unip.checkpoint import save_checkpoint
    from unip.data.synth import write_unlabeled
    from unip.models import create_model

    root = tmp_path_factory.mktemp("diverge")
    torch.manual_seed(0)
    teacher = create_model("vit_small_patch16", depth=3, embed_dim=64, num_heads=4, img_size=64)
    save_checkpoint(teacher, root / "teacher.safetensors")
    write_unlabeled(str(root / "images"), 16, size=(80, 64), seed=0)
    return root


def test_pretrain_with_a_huge_lr_stops_with_exit_2_and_keeps_a_finite_state(pretrain_assets, tmp_path, capsys):
    from unip import cli
    from unip.cli.app import describe_failure
    from unip.distill.train import build_student, make_config

    out = tmp_path / "diverged"
    args = ["pretrain", "toy", "--teacher", str(pretrain_assets / "teacher.safetensors"), "--teacher-layer", "2",
            "--data", str(pretrain_assets / "images"), "--out", str(out), "--device", "cpu",
            "--set", "student.depth=2", "--set", "student.embed_dim=64", "--set", "student.num_heads=2",
            "--set", "run.progress=false", "--set", "run.save_every_steps=1", "--set", "run.keep_checkpoints=10",
            "--set", "data.augment=false"]
    # lr 1e4 is beyond what the settings schema lets the CLI through (optim.lr <= 1), so the run is started
    # from the Python API, and the CLI's error boundary is asked how it would report the failure
    from unip.distill.train import train
    from unip.errors import UnipError

    diverging = cli.build_parser().parse_args(args)
    values = {"teacher.source": diverging.teacher, "teacher.layer": 2, "data.path": diverging.data,
              "run.output": str(out), "run.device": "cpu"}
    config = make_config("toy", tuple(diverging.overrides), values)
    config["optim"]["lr"] = 1e4
    with pytest.raises(UnipError) as failure:
        train(config)
    code, line = describe_failure(failure.value)
    assert code == 2 and "weights became non-finite" in line and "\n" not in line, line
    states = checkpointing.list_states(out / "checkpoints")
    assert states and not (out / "student.safetensors").exists()
    config = make_config("toy", values={"student.depth": 2, "student.embed_dim": 64, "student.num_heads": 2})
    for path in states:
        student = build_student(config, 4, torch.device("cpu"))
        checkpointing.load_state(path, student)
        assert all(torch.isfinite(p).all() for p in student.parameters()), path
    # the newest finite state already took a step of lr 2500 (warm-up); the first one resumes fine
    assert cli.main(args + ["--set", "optim.lr=1e-3", "--resume", str(states[0])]) == 0
    assert "resumed from" in capsys.readouterr().out and (out / "student.safetensors").is_file()


def test_cli_shows_library_log_lines_on_stdout(pretrain_assets, tmp_path, capsys):
    """`print` left the library: the CLI's logging handler shows its lines."""
    from unip import cli

    assert cli.main(["pretrain", "toy", "--teacher", str(pretrain_assets / "teacher.safetensors"),
                     "--teacher-layer", "2", "--data", str(pretrain_assets / "images"), "--out", str(tmp_path / "r"),
                     "--device", "cpu", "--epochs", "1", "--set", "student.depth=2", "--set", "student.embed_dim=64",
                     "--set", "student.num_heads=2", "--set", "optim.warmup_epochs=0", "--set",
                     "run.progress=false"]) == 0
    captured = capsys.readouterr()
    assert "teacher layer 2 (given)" in captured.out and "saved the model to" in captured.out
    assert captured.err == ""



def test_pretrain_resume_with_another_teacher_layer_exits_2_naming_it(pretrain_assets, tmp_path, capsys,
                                                                      monkeypatch):
    from unip import cli

    args = ["pretrain", "toy", "--teacher", str(pretrain_assets / "teacher.safetensors"), "--data",
            str(pretrain_assets / "images"), "--out", str(tmp_path / "r"), "--device", "cpu", "--epochs", "1",
            "--set", "student.depth=2", "--set", "student.embed_dim=64", "--set", "student.num_heads=2",
            "--set", "optim.warmup_epochs=0", "--set", "run.progress=false"]
    assert cli.main(args + ["--teacher-layer", "2"]) == 0
    capsys.readouterr()
    assert cli.main(args + ["--teacher-layer", "1", "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(r"teacher layer 2 → 1.*allow_changed_config", err), err
    assert "teacher weights" not in err  # the same file: its digest does not depend on the layer or input size
    assert cli.main(args + ["--teacher-layer", "2", "--resume", "auto", "--set", "data.input_size=48"]) == 2
    err = capsys.readouterr().err
    assert "data.input_size 64 → 48" in err and "teacher weights" not in err, err
    with monkeypatch.context() as patch:  # a new run over the finished one: refused before any work
        patch.setattr("unip.distill.train.train_task", lambda task, config: pytest.fail("training started"))
        assert cli.main(args + ["--teacher-layer", "2"]) == 2
    assert "--resume auto to continue it" in capsys.readouterr().err
    assert cli.main(args + ["--teacher-layer", "2", "--resume", "auto"]) == 0  # the same settings continue


def test_pretrain_resumes_after_its_files_moved_but_not_with_other_weights(pretrain_assets, tmp_path, capsys):
    """Teacher and data are compared by content: a run whose files were moved (another disk, another node's
    mount) resumes without run.allow_changed_config; another teacher at the same path is refused."""
    import shutil

    from unip import cli
    from unip.checkpoint import save_checkpoint
    from unip.models import create_model

    moved = tmp_path / "moved disk"
    shutil.copytree(pretrain_assets / "images", moved / "images")
    shutil.copy(pretrain_assets / "teacher.safetensors", moved / "renamed_teacher.safetensors")

    def args(teacher, data):
        return ["pretrain", "toy", "--teacher", str(teacher), "--teacher-layer", "2", "--data", str(data),
                "--out", str(tmp_path / "r"), "--device", "cpu", "--epochs", "1", "--set", "student.depth=2",
                "--set", "student.embed_dim=64", "--set", "student.num_heads=2", "--set", "optim.warmup_epochs=0",
                "--set", "run.progress=false"]

    assert cli.main(args(pretrain_assets / "teacher.safetensors", pretrain_assets / "images")) == 0
    capsys.readouterr()
    assert cli.main(args(moved / "renamed_teacher.safetensors", moved / "images") + ["--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
    torch.manual_seed(1)
    save_checkpoint(create_model("vit_small_patch16", depth=3, embed_dim=64, num_heads=4, img_size=64),
                    moved / "renamed_teacher.safetensors")  # other weights, same architecture and path
    assert cli.main(args(moved / "renamed_teacher.safetensors", moved / "images") + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(r"teacher weights \(digest\) \w+ → \w+.*allow_changed_config", err), err
    first = sorted((moved / "images").rglob("*.jpg"))[0]
    first.rename(first.with_name("renamed_" + first.name))  # same count, another file list: another data set
    shutil.copy(pretrain_assets / "teacher.safetensors", moved / "renamed_teacher.safetensors")
    assert cli.main(args(moved / "renamed_teacher.safetensors", moved / "images") + ["--resume", "auto"]) == 2
    assert "training images (file list digest) 16 images" in capsys.readouterr().err
