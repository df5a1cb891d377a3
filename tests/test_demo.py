"""`unip demo --fast` runs the whole pipeline end to end, offline, with an empty teacher cache, and its summary
holds exactly the numbers of the files the stages wrote; the teacher cache keys, stores, reuses and remakes."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from unip.checkpoint import open_model
from unip.cli import main
from unip.demo.cache import cache_root, entry_folder, find_teacher, store_teacher
from unip.demo.settings import FAST, FULL, TeacherRecipe
from unip.demo.summary import last_run_records
from unip.models import Segmentor
from unip.outputs import is_our_png
from unip.seg import save_segmentor


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    """One `unip demo --fast` run with a fresh cache: (output folder, cache folder, printed text)."""
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "out", root / "cache"
    patch = pytest.MonkeyPatch()
    patch.setenv("UNIP_CACHE", str(cache))
    try:
        import contextlib
        import io

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["demo", "--fast", "--out", str(out)]) == 0
    finally:
        patch.undo()
    return out, cache, printed.getvalue()


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_stage_runs_through_the_cli(fast_demo):
    out, cache, printed = fast_demo
    for command in ("$ unip data synth", "$ unip data pack", "$ unip finetune demo --pretrained", "$ unip analyze",
                    "$ unip pretrain demo", "--teacher-layer auto", "$ unip evaluate", "$ unip predict",
                    ">>> torch.manual_seed("):
        assert command in printed, command
    assert "making the demo teacher" in printed and "cached the teacher in" in printed
    for stage in range(1, 10):
        assert f"[{stage}/9]" in printed
    for name in ("pretrain/student.safetensors", "finetune_distilled/metrics.json", "finetune_random/metrics.json",
                 "evaluate/confusion.png", "predictions/areas.csv", "summary.md"):
        assert (out / name).exists(), name
    assert is_our_png(str(out / "summary.png"))
    assert len(list((out / "predictions" / "overlay").rglob("*.png"))) == FAST.predict_images


def test_summary_numbers_are_the_files_numbers(fast_demo):
    out, cache, printed = fast_demo
    summary = _json(out / "summary.json")
    assert summary["format"] == "unip-demo-summary" and summary["mode"] == "fast"

    # NMI per layer: the comparison profile of unip analyze, per model
    profile = {Path(m["source"]).resolve(): m for m in _json(out / "analysis" / "profile.json")["models"]}
    teacher = Path(summary["teacher"]["file"]).resolve()
    assert teacher.is_relative_to(cache.resolve())
    for key, source in (("teacher", teacher), ("student_before", out / "student_random.safetensors"),
                        ("student_after", out / "pretrain" / "student.safetensors")):
        assert summary["nmi"][key] == [layer["nmi"] for layer in profile[Path(source).resolve()]["layers"]], key
    assert len(summary["nmi"]["teacher"]) == FAST.teacher.depth
    assert len(summary["nmi"]["student_after"]) == FAST.student_depth

    # the chosen layer: unip analyze's, and what unip pretrain --teacher-layer auto logged
    chosen = _json(out / "analysis_teacher" / "profile.json")["models"][0]
    assert summary["layer"]["analyze"] == chosen["selected_layer"]
    records = [json.loads(line) for line in (out / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert summary["layer"]["pretrain"] == next(r["teacher_layer"] for r in records if "teacher_layer" in r)

    # distillation loss before (step 1: the random student) and after (mean over the last epoch) from the log
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))  # every step is logged
    assert summary["distillation"]["before"] == {"step": 1, "loss": train[0]["loss"]}
    last_epoch = [r["loss"] for r in train if r["epoch"] == FAST.pretrain_epochs - 1]
    after = summary["distillation"]["after"]
    assert after["steps"] == len(last_epoch) and after["loss"] == pytest.approx(sum(last_epoch) / len(last_epoch))
    assert after["loss"] < train[0]["loss"]  # the student learned the teacher's attention

    # mIoU: metrics.json of both fine-tuning runs; unip evaluate of the best model gives the same number
    ft = summary["finetune"]
    for key, run in (("distilled", "finetune_distilled"), ("random_init", "finetune_random")):
        metrics = _json(out / run / "metrics.json")
        assert ft[key]["mIoU"] == metrics["mIoU"] and ft[key]["aAcc"] == metrics["aAcc"]
        assert metrics["best"]["step"] == FAST.finetune_iterations
        for row in metrics["per_class"]:
            if row["label_pixels"]:
                assert ft[key]["IoU"][row["name"]] == row["IoU"]
    assert ft["gain"] == ft["distilled"]["mIoU"] - ft["random_init"]["mIoU"]
    assert summary["evaluate"]["mIoU"] == _json(out / "evaluate" / "metrics.json")["mIoU"]
    assert summary["evaluate"]["mIoU"] == pytest.approx(ft["distilled"]["mIoU"], abs=1e-6)
    assert summary["teacher"]["test_mIoU"] == _json(Path(summary["teacher"]["metrics"]))["mIoU"]

    # the verdict follows the sign of the gain; the printed table shows the same numbers
    assert ("NMI-HAD helped" in summary["verdict"]) == (ft["gain"] > 0)
    assert "--fast is too short" in summary["verdict"]
    for number in (ft["distilled"]["mIoU"], ft["random_init"]["mIoU"], summary["distillation"]["after"]["loss"]):
        assert f"{number:.2f}" in printed or f"{number:.4f}" in printed
    assert f"{ft['gain']:+.2f}" in printed
    assert "timm:vit_large_patch16_224.mae" in printed
    assert (out / "summary.md").read_text().startswith("# unip demo summary")


def test_baseline_is_the_distilled_students_starting_point(fast_demo):
    """Same architecture (last block with the teacher layer's heads), and the pre-training started from it."""
    out, _, _ = fast_demo
    summary = _json(out / "summary.json")
    random_init = open_model(out / "student_random.safetensors").model
    distilled = open_model(out / "pretrain" / "student.safetensors").model
    teacher = open_model(summary["teacher"]["file"]).model
    assert random_init.heads_per_block == distilled.heads_per_block
    assert distilled.heads_per_block[-1] == teacher.heads_per_block[summary["layer"]["pretrain"] - 1]
    # parts the distillation never trains (the last block's MLP) are still the random file's
    assert torch.equal(random_init.blocks[-1].mlp.fc1.weight, distilled.blocks[-1].mlp.fc1.weight)
    assert not torch.equal(random_init.blocks[0].attn.qkv.weight, distilled.blocks[0].attn.qkv.weight)
    assert f"init: {out / 'student_random.safetensors'}" in (out / "pretrain" / "config.yaml").read_text()
    for run, source in (("finetune_random", "student_random.safetensors"),
                        ("finetune_distilled", "pretrain/student.safetensors")):
        backbone = _json(out / run / "metrics.json")["model"]["backbone"]
        assert Path(backbone["pretrained"]).resolve() == (out / source).resolve()


# ------------------------------------------------------------------------------------------------ the cache
def _tiny_segmentor(path: Path) -> Path:
    save_segmentor(Segmentor({"backbone": dict(img_size=32, embed_dim=16, depth=1, num_heads=2, layer_scale=1.0),
                              "feature_layers": [1], "neck": "llfpn", "num_classes": 3, "auxiliary_head": None,
                              "decode_head": {"type": "upernet", "channels": 8, "pool_scales": [1, 2, 3, 6]}},
                             {"crop_size": 32, "stride": 21}), path)
    return path


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("UNIP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "unip"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "unip"
    monkeypatch.setenv("UNIP_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    # a cache that cannot be written (a shared, read-only one) is still where the teacher is looked for; the
    # demo keeps a teacher it makes in its run folder instead (get_teacher)
    (tmp_path / "mine").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if str(path) == str(tmp_path / "mine")
                        and mode & os.W_OK else real_access(path, mode, *a, **k))
    assert cache_root() == tmp_path / "mine"


def test_cache_key_changes_with_every_setting_that_makes_the_teacher():
    recipe = FULL.teacher
    keys = {recipe.key(FULL.image_size), recipe.key((96, 80)), FAST.teacher.key(FULL.image_size),
            TeacherRecipe(**{**vars(recipe), "iterations": recipe.iterations + 1}).key(FULL.image_size),
            TeacherRecipe(**{**vars(recipe), "data_seed": 7}).key(FULL.image_size)}
    assert len(keys) == 5
    assert recipe.key(FULL.image_size) == FULL.teacher.key(tuple(FULL.image_size))  # stable


def test_cache_stores_atomically_reuses_and_remakes_a_damaged_entry(tmp_path):
    made = _tiny_segmentor(tmp_path / "segmentor.safetensors")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"mIoU": 12.5}))
    root, key = tmp_path / "cache", FAST.teacher.key(FAST.image_size)
    assert find_teacher(root, key) == (None, "not cached yet")
    entry = store_teacher(root, key, FAST.teacher, FAST.image_size, made, metrics, 3.0)
    assert entry.folder == entry_folder(root, key) and entry.file.read_bytes() == made.read_bytes()
    assert [p.name for p in entry.folder.parent.iterdir()] == [entry.folder.name]  # no staging folder left
    found, _ = find_teacher(root, key)
    assert found is not None and found.record["recipe"]["iterations"] == FAST.teacher.iterations
    assert find_teacher(root, FULL.teacher.key(FULL.image_size))[0] is None  # another recipe: another entry

    entry.file.write_bytes(entry.file.read_bytes()[:100])  # damaged (e.g. a full disk): made again
    found, why = find_teacher(root, key)
    assert found is None and re.search("damaged", why)
    entry = store_teacher(root, key, FAST.teacher, FAST.image_size, made, metrics, 3.0)
    assert find_teacher(root, key)[0] is not None


def test_rerun_logs_are_read_from_the_last_setup_record(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in (
        {"kind": "setup", "step": 0}, {"kind": "train", "step": 5, "loss": 9.0},
        {"kind": "setup", "step": 0}, {"kind": "train", "step": 5, "loss": 1.0})) + "\n")
    assert [r.get("loss") for r in last_run_records(log)] == [None, 1.0]


def test_library_callers_get_the_tour_as_log_records(caplog):
    """Only the CLI prints (it passes ``say=print``); the library's default is the ``unip.demo`` logger."""
    from unip.demo.pipeline import Tour

    with caplog.at_level("INFO", logger="unip.demo"):
        tour = Tour()
        tour.stage("a stage")
        tour.note("a note")
    assert [r.name for r in caplog.records] == ["unip.demo", "unip.demo"]
    assert "[1/9] a stage" in caplog.records[0].getMessage() and caplog.records[1].getMessage() == "# a note"
    heard = []
    Tour(heard.append).python("x = 1")
    assert heard == [">>> x = 1"]


def test_a_rerun_into_the_same_folder_starts_its_training_stages_anew(fast_demo, tmp_path, monkeypatch, capsys):
    """`make demo` twice, or another --seed into the same --out: the stages' earlier runs are cleared (not refused
    as another run's states); a folder the demo does not recognise as a run of that verb is left alone."""
    import shutil

    from unip.demo.pipeline import Tour, clear_earlier_run

    out, cache, _ = fast_demo
    again = tmp_path / "out"
    shutil.copytree(out, again)
    monkeypatch.setenv("UNIP_CACHE", str(cache))
    assert main(["demo", "--fast", "--out", str(again), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    for stage in ("pretrain", "finetune_distilled", "finetune_random"):
        assert f"clearing the earlier run in {again / stage}/" in printed, stage
        records = [json.loads(line) for line in (again / stage / "log.jsonl").read_text().splitlines()]
        assert [r["kind"] for r in records].count("setup") == 1  # one run in the log, not two
    assert _json(again / "summary.json")["seed"] == 1

    user = tmp_path / "user_run"
    (user / "checkpoints").mkdir(parents=True)
    (user / "config.yaml").write_text("my: settings\n")
    (user / "checkpoints" / "step-00000001.pt").write_bytes(b"mine")
    shutil.copytree(out / "pretrain", tmp_path / "pretrain")
    for folder, verb in ((user, "finetune"), (tmp_path / "pretrain", "finetune")):  # not that verb's run: kept
        clear_earlier_run(Tour(), folder, verb)
        assert (folder / "checkpoints").is_dir()
