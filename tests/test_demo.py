"""`unip demo` runs the whole pre-training half end to end, offline, and leaves every artefact."""

import json

from unip.checkpoint import open_model
from unip.cli import main


def test_demo_runs_every_stage(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for command in ("unip data synth", "unip data infmix", "unip data pack", "unip analyze", "unip pretrain"):
        assert command in printed
    for name in ("infmix.jsonl", "packed/index.json", "teacher.safetensors", "pretrain/student.safetensors",
                 "analysis_compare/nmi.png", "analysis_compare/profile.csv", "soda/train_infrared.txt"):
        assert (tmp_path / name).exists(), name
    student = open_model(tmp_path / "pretrain" / "student.safetensors")
    assert student.model.heads_per_block[-1] == 6  # the toy teacher's head count
    profile = json.loads((tmp_path / "analysis_compare" / "profile.json").read_text())
    assert len(profile["models"]) == 2
