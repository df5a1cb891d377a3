"""The run-folder policy belongs to the library: ``unip.distill.train.train`` and ``unip.seg.train.finetune`` refuse
an ``run.output`` that is not theirs before any work, as the CLI does (tests/test_hostile_inputs.py covers the CLI)."""

import json

import pytest

from unip.distill import train as distill_train
from unip.engine.config import dump_config
from unip.engine.run_folder import check_run_folder
from unip.errors import ConfigError
from unip.seg import train as seg_train
from unip.seg.results import METRICS_FORMAT


def _refuse_training(monkeypatch):
    fail = lambda *args, **kwargs: pytest.fail("training started")  # noqa: E731
    monkeypatch.setattr(distill_train, "train_task", fail)
    monkeypatch.setattr(seg_train, "SegmentationTask", fail)


def test_pretrain_library_refuses_a_users_log_before_any_work(tmp_path, monkeypatch):
    _refuse_training(monkeypatch)
    (tmp_path / "log.jsonl").write_text("my notes\n")
    config = distill_train.make_config("toy", values={"run.output": str(tmp_path), "teacher.source": "t.safetensors",
                                                      "data.path": str(tmp_path)})
    with pytest.raises(ConfigError, match="log.jsonl: exists and was not written by unip"):
        distill_train.train(config)
    assert (tmp_path / "log.jsonl").read_text() == "my notes\n"


def test_finetune_library_refuses_evaluates_report_and_a_pre_training_run(tmp_path, monkeypatch):
    _refuse_training(monkeypatch)
    config = seg_train.make_config("toy", values={"run.output": str(tmp_path), "model.pretrained": "none"})
    (tmp_path / "metrics.json").write_text(json.dumps({"format": METRICS_FORMAT, "mIoU": 1.0}))  # no "best"
    with pytest.raises(ConfigError, match="holds the report of unip evaluate"):
        seg_train.finetune(config)
    (tmp_path / "metrics.json").unlink()
    (tmp_path / "config.yaml").write_text(dump_config(distill_train.DEFAULTS))
    with pytest.raises(ConfigError, match=r"another kind of unip run \(its config.yaml has no eval, model section"):
        seg_train.finetune(config)


def test_check_run_folder_accepts_a_new_folder_and_refuses_a_file_where_a_folder_goes(tmp_path):
    check_run_folder(str(tmp_path / "new"), ["run", "optim"], {}, None)
    (tmp_path / "checkpoints").write_text("")
    with pytest.raises(ConfigError, match="checkpoints: is a file where unip keeps the run's checkpoints/ folder"):
        check_run_folder(str(tmp_path), ["run", "optim"], {}, None)
