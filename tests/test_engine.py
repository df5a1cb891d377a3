"""unip.engine: config overrides, lr schedules, optimiser groups, training-state round trips, data order,
the train step (accumulation and the non-finite stop)."""

import logging
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from unip.engine import checkpointing
from unip.engine.config import build_config, load_yaml, parse_override
from unip.engine.sharding import RankSampler
from unip.engine.data import SeededDataset, build_loader, set_loader_epoch
from unip.engine.loop import LossGate, NonFiniteLossError, StepResult, resolve_precision, train_step
from unip.engine.optim import build_adamw, param_groups
from unip.engine.schedule import set_lr, warmup_cosine, warmup_poly
from unip.errors import CheckpointError, ConfigError
from unip.models import create_model

DEFAULTS = {"optim": {"lr": 1e-3, "epochs": 10, "betas": [0.9, 0.999], "clip": None, "amp": False},
            "teacher": {"layer": "auto"}}


# ------------------------------------------------------------------------------------------ config
def test_overrides_parse_yaml_scalars_and_check_kinds(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 2\n  epochs: 3\n")
    config = build_config(DEFAULTS, str(preset), ["optim.clip=1.0", "optim.betas=[0.8, 0.9]",
                                                  "optim.amp=true", "teacher.layer=18"])
    assert config["optim"] == {"lr": 2.0, "epochs": 3, "betas": [0.8, 0.9], "clip": 1.0, "amp": True}
    assert config["teacher"]["layer"] == 18 and DEFAULTS["optim"]["lr"] == 1e-3
    assert parse_override("a.b=1.5e-4") == ("a.b", 1.5e-4)
    assert build_config(DEFAULTS, None, ["optim.lr=3e-4"])["optim"]["lr"] == 3e-4  # YAML 1.1: a string
    assert parse_override("a=null") == ("a", None)


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1", "optim.lrr"), ("nothing.here=1", "nothing.here"), ("optim.epochs=abc", "number"),
    ("optim.amp=1", "true or false"), ("optim.betas=0.9", "list"), ("optim", "key=value"),
    ("optim=3", "section")])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        build_config(DEFAULTS, None, [override])


def test_unknown_key_in_a_preset_names_the_file(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.learning_rate"):
        build_config(DEFAULTS, str(preset))
    with pytest.raises(ConfigError, match="unknown pretrain preset"):
        build_config(DEFAULTS, "no-such-preset")


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    """Plain YAML keeps the last of two equal keys silently; every YAML file unip reads refuses them."""
    from unip.sweep.spec import read_sweep

    preset = tmp_path / "twice.yaml"
    preset.write_text("optim:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: key 'lr' is given twice in one mapping \(lines 2 and 4\)"):
        build_config(DEFAULTS, str(preset))
    preset.write_text("optim:\n  lr: 0.1\nteacher:\n  layer: 3\noptim:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"key 'optim' is given twice.*lines 1 and 5"):
        build_config(DEFAULTS, str(preset))
    with pytest.raises(ConfigError, match="given twice"):
        build_config(DEFAULTS, None, ["optim={lr: 1, lr: 2}"])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nseeds: [0]\nseeds: [1]\n")
    with pytest.raises(ConfigError, match=r"sweep\.yaml: key 'seeds' is given twice"):
        read_sweep(str(sweep))
    preset.write_text("base: &b {lr: 0.1, epochs: 3}\noptim:\n  <<: *b\n  lr: 0.2\n")  # a merge is no duplicate
    assert load_yaml(preset.read_text())["optim"] == {"lr": 0.2, "epochs": 3}


def test_a_preset_builds_on_its_bases_and_every_value_says_where_it_came_from(tmp_path):
    """``_base_``: bases apply in order, the preset's own settings over them; a base of a base too; names beside
    the file, KIND/NAME and relative files; ``dump_config`` with sources names each value's origin and reads back."""
    from unip.engine.config import dump_config

    (tmp_path / "sub").mkdir()
    (tmp_path / "_lr.yaml").write_text("optim: {lr: 0.5, epochs: 4}\n")
    (tmp_path / "sub" / "_amp.yaml").write_text("_base_: ../_lr.yaml\noptim: {amp: true, epochs: 5}\n")
    preset = tmp_path / "p.yaml"
    preset.write_text("_base_: [_lr, sub/_amp.yaml]\noptim: {epochs: 6}\n")
    sources = {}
    config = build_config(DEFAULTS, str(preset), ["teacher.layer=3"], sources=sources)
    assert config["optim"] == {"lr": 0.5, "epochs": 6, "betas": [0.9, 0.999], "clip": None, "amp": True}
    assert sources["optim.lr"].endswith("_lr.yaml") and sources["optim.amp"].endswith("_amp.yaml")
    assert sources["optim.epochs"] == str(preset) and sources["teacher.layer"] == "--set teacher.layer=3"
    text = dump_config(config, sources, DEFAULTS)
    assert "  amp: true" in text and text.count("# default") == 2  # optim.betas and optim.clip
    assert [line for line in text.splitlines() if "epochs" in line][0].endswith(f"# {preset}")
    assert load_yaml(text) == config


@pytest.mark.parametrize("base,match", [
    ("p", r"go round in a circle \(.*p\.yaml → .*p\.yaml\)"), ("missing.yaml", "'missing.yaml' does not exist"),
    ("nope", "unknown pretrain preset 'nope'"), ("[1, 2]", "must be a preset name or YAML file"),
    ("finetune/nope", "unknown finetune preset 'nope'")])
def test_bad_bases_name_the_preset(tmp_path, base, match):
    preset = tmp_path / "p.yaml"
    preset.write_text(f"_base_: {base}\noptim: {{lr: 1}}\n")
    with pytest.raises(ConfigError, match=match):
        build_config(DEFAULTS, str(preset))


def test_the_shipped_presets_state_only_what_differs_from_their_bases():
    """Every key of a shipped preset changes what its bases (or the defaults) give — a base (``_soda.yaml``) may
    state a default, as a data set's schedule it describes; bases are not listed as presets; the whole set of
    shipped presets stays small."""
    from unip.distill.train import DEFAULTS as PRETRAIN
    from unip.engine.config import PRESET_ROOTS, flatten, list_presets, read_preset, read_yaml
    from unip.seg.train import DEFAULTS as FINETUNE

    root = PRESET_ROOTS[0]
    for kind, defaults in (("pretrain", PRETRAIN), ("finetune", FINETUNE), ("linprobe", FINETUNE)):
        assert list_presets(kind) and not any(name.startswith("_") for name in list_presets(kind))
        for path in sorted((root / kind).glob("*.yaml")):
            own = dict(read_yaml(path))
            bases = own.pop("_base_", [])
            inherited = {} if path.stem.startswith("_") else flatten(defaults)
            for base in [bases] if isinstance(bases, str) else bases:
                base_kind, _, name = base.rpartition("/")
                inherited.update({k: v for k, (v, _) in read_preset(name, base_kind or kind).items()})
            restated = [key for key, value in flatten(own).items() if key in inherited and inherited[key] == value]
            assert not restated, f"{path.name} restates {restated}"
    lines = sum(len(path.read_text().splitlines()) for path in root.glob("*/*.yaml"))
    assert lines <= 792, lines  # half of the 1,585 lines the presets had when each restated the whole recipe


def test_a_folder_or_a_missing_file_as_preset_says_which(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match=r"runs: is a folder, not a config file.*demo.*toy"):
        build_config(DEFAULTS, str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="config file does not exist"):
        build_config(DEFAULTS, str(tmp_path / "absent.yaml"))


# ------------------------------------------------------------------------------------------ schedules
def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 100, 10, 1.0, 0.1) for s in range(101)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5) and lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_warmup_poly_starts_at_the_factor_and_decays_linearly():
    assert warmup_poly(0, 1000, 100, 1e-4, warmup_start_factor=1e-6) == pytest.approx(1e-10)
    assert warmup_poly(100, 1000, 100, 1e-4) == pytest.approx(0.9e-4)
    assert warmup_poly(500, 1000, 100, 1e-4) == pytest.approx(0.5e-4)
    assert warmup_poly(1000, 1000, 100, 1e-4) == 0.0


# ------------------------------------------------------------------------------------------ optimiser
def test_param_groups_split_decay_and_apply_lr_scale():
    model = create_model("unip_vit_tiny_patch16", depth=2, embed_dim=64, num_heads=2, img_size=32)
    model.cls_token.requires_grad_(True)
    groups = param_groups(model, 0.05, lr_scale_fn=lambda n: 0.5 if n.startswith("blocks.0.") else 1.0)
    names = {(g["weight_decay"], g["lr_scale"]): set(g["names"]) for g in groups}
    decayed = set().union(*(v for (wd, _), v in names.items() if wd))
    assert decayed == {n for n, p in model.named_parameters()
                       if p.ndim > 1 and n not in ("cls_token", "pos_embed") and p.requires_grad}
    assert "pos_embed" not in set().union(*names.values())  # fixed sin-cos table: frozen, not optimised
    assert "blocks.0.attn.qkv.weight" in names[(0.05, 0.5)] and "blocks.1.norm1.weight" in names[(0.0, 1.0)]
    optimizer = build_adamw(model, 1e-3, 0.05, (0.9, 0.95), lr_scale_fn=lambda n: 0.5)
    set_lr(optimizer, 2e-3)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    # betas as YAML gives them for --set optim.betas=[0, 0.95]: an int next to a float
    optimizer = build_adamw(model, 1e-3, 0.05, [0, 0.95])
    assert optimizer.defaults["betas"] == (0.0, 0.95)


# ------------------------------------------------------------------------------------------ state files
def test_training_state_round_trip_restores_everything(tmp_path):
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = checkpointing.save_state(tmp_path, 7, model, optimizer, epoch=1, step_in_epoch=3,
                                    extra={"note": "x"})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.zero_()
    other = torch.optim.AdamW(model.parameters(), lr=0.5)
    state = checkpointing.load_state(path, model, other)
    assert (state["step"], state["epoch"], state["step_in_epoch"], state["extra"]) == (7, 1, 3, {"note": "x"})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert other.param_groups[0]["lr"] == 0.1 and other.state_dict()["state"][0]["step"] == 1
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_latest_and_pruning_and_resume_resolution(tmp_path):
    model, optimizer = nn.Linear(2, 2), None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (2, 4, 6):
        checkpointing.save_state(tmp_path, step, model, optimizer, epoch=0, step_in_epoch=step, keep=2)
    assert [p.name for p in checkpointing.list_states(tmp_path)] == ["step-00000004.pt", "step-00000006.pt"]
    assert checkpointing.resolve_resume("auto", tmp_path).name == "step-00000006.pt"
    assert checkpointing.resolve_resume("auto", tmp_path / "new") is None
    assert checkpointing.resolve_resume(None, tmp_path) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpointing.resolve_resume(str(tmp_path / "missing.pt"), tmp_path)
    bad = tmp_path / "step-00000009.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        checkpointing.load_state(bad, model)


def test_state_files_refuse_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "step-00000001.pt"
    torch.save({"model": {}, "rng": Evil()}, path)
    with pytest.raises(CheckpointError):
        checkpointing.load_state(path, nn.Linear(1, 1))


def test_a_file_that_is_not_a_state_is_called_so_and_never_to_be_deleted(tmp_path):
    """``--resume mkckpt.py``: the user's file is not a unip state, and is not unip's to delete; a damaged file
    named like unip's states is. PyTorch's paragraph about weights_only (which suggests running the file's code)
    is not repeated."""
    script = tmp_path / "mkckpt.py"
    script.write_text("import torch\nprint('a script')\n")
    garbage = tmp_path / "mine.pt"
    torch.save({"x": torch.zeros(1), "fn": print}, garbage)  # loads only by running code: weights_only refuses
    for path in (script, garbage):
        with pytest.raises(CheckpointError, match="not a unip training state") as err:
            checkpointing.read_state(path)
        message = str(err.value).replace(str(path), "FILE")
        assert "delete" not in message and "weights_only" not in message and len(message) < 250, message
    damaged = tmp_path / "step-00000003.pt"
    damaged.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="cannot read the training state.*delete it"):
        checkpointing.read_state(damaged)


# ------------------------------------------------------------------------------------------ data order
class _Noise(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.rand(()) + index * 0  # the value depends on the RNG only


def test_seeded_samples_depend_on_seed_epoch_index_only():
    data = SeededDataset(_Noise(), seed=5)
    torch.manual_seed(0)
    first = [float(data[i]) for i in range(4)]
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)  # the caller's RNG was not touched
    torch.manual_seed(123)
    assert [float(data[i]) for i in range(4)] == first
    data.set_epoch(1)
    assert [float(data[i]) for i in range(4)] != first


def test_sampler_resumes_mid_epoch_and_shards_ranks():
    full = RankSampler(20, rank=0, world_size=1, seed=3)
    full.set_epoch(2)
    order = list(full)
    full.set_epoch(2, start=6)
    assert list(full) == order[6:] and len(full) == 14
    shares = []
    for rank in range(2):
        s = RankSampler(20, rank=rank, world_size=2, seed=3)
        s.set_epoch(2)
        shares.append(list(s))
    assert shares[0] == order[0::2] and shares[1] == order[1::2]
    loader = build_loader(_Noise(), 2, seed=1)
    set_loader_epoch(loader, 0, start_batch=3)
    assert len(list(loader)) == 2  # 5 batches, 3 skipped


# ------------------------------------------------------------------------------------------ train step
def _toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    data = torch.randn(8, 3), torch.randn(8, 1)
    return model, data


def test_accumulation_equals_one_big_batch():
    precision = resolve_precision("auto", torch.device("cpu"))
    results = []
    for chunks in (1, 4):
        model, (x, y) = _toy()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        micro = list(zip(x.chunk(chunks), y.chunk(chunks)))
        result = train_step(model, lambda b: ((model(b[0]) - b[1]) ** 2).mean(), micro, optimizer,
                            precision.grad_scaler(), precision, clip_grad=0.5)
        results.append((result, [p.detach().clone() for p in model.parameters()]))
    (r1, w1), (r4, w4) = results
    assert r1.loss == pytest.approx(r4.loss, rel=1e-6) and float(r1.grad_norm) > 0
    for a, b in zip(w1, w4):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_non_finite_loss_stops_before_the_update():
    precision = resolve_precision("fp32", torch.device("cpu"))
    model, (x, y) = _toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match="nan at step 3") as stopped:
        train_step(model, lambda b: (model(b[0]) * math.nan).mean(), [(x, y)], optimizer,
                   precision.grad_scaler(), precision, where="at step 3")
    assert "fp16" not in str(stopped.value) and "bf16" not in str(stopped.value)  # an fp32 run: nothing wider
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert resolve_precision("bf16", torch.device("cpu")).dtype is torch.bfloat16  # asked for: CPU bf16 autocast
    assert resolve_precision("auto", torch.device("cpu")).dtype is None
    assert resolve_precision("fp16", torch.device("cpu")).dtype is None


def _adam_state(model, optimizer):
    return [p.detach().clone() for p in model.parameters()] + [
        value.clone() for state in optimizer.state.values() for value in state.values()]


def test_gated_step_reads_no_loss_and_keeps_the_weights_from_the_first_non_finite_loss_on(monkeypatch):
    """With a ``LossGate`` (fused AdamW) the step leaves the loss on the device; a NaN step and every step after
    it leave weights, moments and step counts as they were, and the NaN step's result raises when read."""
    precision = resolve_precision("fp32", torch.device("cpu"))
    reads = []
    original_read = StepResult.read
    monkeypatch.setattr(StepResult, "read", lambda self: reads.append(self) or original_read(self))
    runs = {}
    for gated in (False, True):
        model, (x, y) = _toy()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
        gate = LossGate() if gated else None
        reads.clear()
        results = [train_step(model, lambda b: ((model(b[0]) - b[1]) ** 2).mean(), [(x, y)], optimizer,
                              precision.grad_scaler(), precision, clip_grad=0.5, gate=gate) for _ in range(3)]
        assert len(reads) == (0 if gated else 3)  # the ungated step reads every loss before updating
        runs[gated] = (model, optimizer, gate, [r.loss for r in results])
    (plain, plain_opt, _, plain_losses), (model, optimizer, gate, losses) = runs[False], runs[True]
    assert losses == plain_losses  # the same arithmetic: found_inf = 0 changes nothing
    assert all(torch.equal(a, b) for a, b in zip(_adam_state(plain, plain_opt), _adam_state(model, optimizer)))

    before = _adam_state(model, optimizer)
    bad = train_step(model, lambda b: (model(b[0]) * math.nan).mean(), [(x, y)], optimizer,
                     precision.grad_scaler(), precision, where="at step 4", gate=gate)
    later = train_step(model, lambda b: ((model(b[0]) - b[1]) ** 2).mean(), [(x, y)], optimizer,
                       precision.grad_scaler(), precision, gate=gate)
    assert math.isfinite(later.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, _adam_state(model, optimizer)))
    for read in (bad.read, lambda: bad.loss):  # every read raises, not only the first
        with pytest.raises(NonFiniteLossError, match="nan at step 4"):
            read()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_cuda_gated_step_never_syncs_with_the_host(name):
    """The point of the gate: on CUDA a bf16 (or fp16, with its GradScaler) step with fused AdamW and clipping
    queues everything and reads nothing (CUDA's sync debug mode raises at any synchronising call)."""
    precision = resolve_precision(name, torch.device("cuda"))
    model, (x, y) = _toy()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    gate, scaler = LossGate(), precision.grad_scaler()
    train_step(model, lambda b: ((model(b[0]) - b[1]) ** 2).mean(), [(x, y)], optimizer, scaler,
               precision, clip_grad=0.5, gate=gate)  # warm-up: lazy state and kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = train_step(model, lambda b: ((model(b[0]) - b[1]) ** 2).mean(), [(x, y)], optimizer,
                            scaler, precision, clip_grad=0.5, gate=gate)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(result.loss)


def test_the_gate_applies_to_fused_adamw_only():
    model, _ = _toy()
    assert LossGate.applies(torch.optim.AdamW(model.parameters(), fused=True))
    assert not LossGate.applies(torch.optim.AdamW(model.parameters()))  # foreach: no found_inf input
    assert not LossGate.applies(torch.optim.SGD(model.parameters(), lr=0.1))


def test_gated_step_under_a_grad_scaler_skips_what_the_scaler_skips():
    """fp16's recipe: a GradScaler. A step with a finite loss and NaN gradients is skipped and the scale lowered,
    gated (found_inf from the gradient norm, ``scaler.update``) exactly as through ``scaler.step``."""
    precision = resolve_precision("fp32", torch.device("cpu"))  # the scaler is the point here, not autocast

    def losses(model):
        def mse(b):
            return ((model(b[0]) - b[1]) ** 2).mean()

        def nan_grads(b):  # sqrt'(0) = inf, times 0: NaN gradients, a finite (unchanged) loss
            return mse(b) + torch.sqrt(0 * model[0].weight.sum())
        return [mse, nan_grads, mse, mse]

    runs = []
    for gate in (None, LossGate()):
        model, (x, y) = _toy()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
        scales = []
        for loss_fn in losses(model):
            result = train_step(model, loss_fn, [(x, y)], optimizer, scaler, precision, clip_grad=0.5, gate=gate)
            assert math.isfinite(result.loss)
            scales.append(scaler.get_scale())
        runs.append((scales, _adam_state(model, optimizer)))
    (plain_scales, plain_state), (gated_scales, gated_state) = runs
    assert plain_scales == gated_scales == [2.0 ** 10, 2.0 ** 9, 2.0 ** 9, 2.0 ** 10]  # halved, then grown
    assert all(torch.equal(a, b) for a, b in zip(plain_state, gated_state))


def test_fp16_on_a_cpu_runs_fp32_and_says_so(caplog):
    """Every verb resolves its precision in ``resolve_precision``: fp16 asked for on a CPU is not silently fp32."""
    with caplog.at_level(logging.WARNING, logger="unip"):
        assert resolve_precision("fp16", torch.device("cpu")).dtype is None
    assert "precision fp16 is not used on cpu: it computes in fp32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unip"):
        resolve_precision("auto", torch.device("cpu"))
        resolve_precision("fp32", torch.device("cpu"))
    assert not caplog.records
    with pytest.raises(ConfigError):
        resolve_precision("fp8", torch.device("cpu"))


def test_divergence_advice_follows_the_runs_precision_and_clipping():
    from unip.engine.loop import Precision, divergence_advice

    fp32, bf16 = Precision("cpu", None), Precision("cpu", torch.bfloat16)
    fp16 = Precision("cuda", torch.float16)
    assert divergence_advice(fp32) == "Lower the lr or --set optim.clip_grad=1.0"
    assert divergence_advice(bf16, 1.0) == "Lower the lr, a lower optim.clip_grad than 1 or --precision fp32 instead " \
        "of bf16"
    assert divergence_advice(fp16).endswith("or --precision bf16 or fp32 instead of fp16")


def test_worker_count_does_not_change_the_batches_over_epochs():
    """One loader per worker count, three epochs (the last started mid-way): the workers persist from epoch
    to epoch, and each item still gets its own epoch's augmentation."""
    batches = []
    for workers in (0, 2):
        loader = build_loader(_Noise(), 2, seed=4, num_workers=workers)
        seen = []
        for epoch, start in ((3, 0), (4, 0), (5, 2)):
            set_loader_epoch(loader, epoch, start_batch=start)
            seen.append(torch.cat(list(loader)))
        batches.append(seen)
    for in_process, in_workers in zip(*batches):
        assert torch.equal(in_process, in_workers)
    assert not torch.equal(batches[0][0], batches[0][1])  # epochs differ
    assert len(batches[0][2]) == 2 * 3  # 5 batches, 2 skipped


class _WorkerPid(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.tensor(os.getpid())


def test_training_loader_workers_persist_over_epochs():
    loader = build_loader(_WorkerPid(), 2, num_workers=2)
    pids = []
    for epoch in range(2):
        set_loader_epoch(loader, epoch)
        pids.append(set(torch.cat(list(loader)).tolist()))
    assert pids[0] == pids[1] and len(pids[0]) == 2 and os.getpid() not in pids[0]


def test_device_names_are_checked():
    from unip.engine.distributed import resolve_device

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cpu_bf16_without_bf16_instructions_is_honoured_with_a_warning(monkeypatch, caplog):
    from unip.engine import loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="unip.engine.loop"):
        assert resolve_precision("bf16", torch.device("cpu")).dtype is torch.bfloat16
    assert "emulated" in caplog.text
    caplog.clear()
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    resolve_precision("bf16", torch.device("cpu"))
    assert caplog.text == ""


def test_an_option_may_set_a_word_where_the_preset_set_a_number():
    """The release presets fix ``teacher.layer: 18``; ``--teacher-layer auto`` must still be accepted (the kind of
    a setting comes from the defaults and its rule, not from the preset's value)."""
    from unip.distill.train import make_config

    config = make_config("mae-l_unip-s", values={"teacher.layer": "auto"}, origins={"teacher.layer": "--teacher-layer"})
    assert config["teacher"]["layer"] == "auto"
    assert make_config("mae-l_unip-s", ["teacher.layer=auto"])["teacher"]["layer"] == "auto"
    with pytest.raises(ConfigError, match="teacher.layer must be 'auto' or an integer"):
        make_config("mae-l_unip-s", ["teacher.layer=banana"])


def test_last_logged_reads_the_newest_runs_records(tmp_path):
    import json

    from unip.engine.logging import LOG_FILE, last_logged

    assert last_logged(tmp_path, "kernel") is None  # no log
    records = [{"step": 0, "time": 0, "kind": "setup", "kernel": "a"},
               {"step": 4, "time": 1, "kind": "resume", "kernel": "b"},
               {"step": 0, "time": 2, "kind": "setup", "other": 1}]  # a new run into the folder: no kernel
    (tmp_path / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    assert last_logged(tmp_path, "kernel") == "b"
    (tmp_path / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert last_logged(tmp_path, "kernel") is None
    (tmp_path / LOG_FILE).write_bytes(b"\xff{not json")
    assert last_logged(tmp_path, "kernel") is None
