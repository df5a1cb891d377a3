"""Extension points are tables: a new decode head and a new named data set are each one module (here: a class or a
layout written in this file) plus one table entry, and then appear in ``--help`` choices, config validation, the
sweep and training without any other edit."""

import json
import os
import shutil

import pytest
import torch.nn.functional as F
from torch import nn

from unip import cli
from unip.data.datasets import DATASETS, NamedDataset
from unip.data.layouts import SODA_CLASSES, SODA_PALETTE
from unip.data.segmentation import SegLayout
from unip.data.synth import write_soda
from unip.errors import ConfigError
from unip.models.heads import HEADS, HeadKind
from unip.seg import load_segmentor
from unip.seg.train import make_config
from unip.sweep.spec import plan_cells, read_sweep


# ------------------------------------------------------------------------------------------- the new head
class PointwiseHead(nn.Module):
    """Two 1x1 convolutions on the pyramid's stride-4 map: the smallest head that reads a pyramid."""

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, channels, kernel_size=1)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, maps):
        return self.conv_seg(F.relu(self.proj(maps[0])))


POINTWISE = HeadKind("pointwise", lambda config, in_channels, num_classes: PointwiseHead(
    in_channels[0], int(config["channels"]), num_classes),
    lambda width, channels: {"type": "pointwise", "channels": int(channels or width)},
    reads_pyramid=True, probe=False, mode="fine-tuning", description="two 1x1 convs on the stride-4 map")

# ------------------------------------------------------------------------------------- the new data set
#: "ThermSeg": frames/ and masks/ with .lst split files, SODA's classes.
THERMSEG = NamedDataset(
    "thermseg", "ThermSeg", SegLayout("thermseg", "frames", "masks", {"train": "train.lst", "val": "val.lst",
                                                                     "test": "val.lst"}, SODA_CLASSES, SODA_PALETTE),
    recognise=lambda root: os.path.isdir(os.path.join(root, "frames")) and os.path.isdir(os.path.join(root, "masks")))


def write_thermseg(root):
    """A generated labeled set in ThermSeg's layout (SODA's files, renamed)."""
    write_soda(str(root / "soda"), 6, 2, size=(80, 64), seed=0)
    (root / "thermseg").mkdir()
    shutil.move(str(root / "soda" / "JPEGImages"), str(root / "thermseg" / "frames"))
    shutil.move(str(root / "soda" / "SegmentationClassPNG"), str(root / "thermseg" / "masks"))
    shutil.copy(root / "soda" / "train_infrared.txt", root / "thermseg" / "train.lst")
    shutil.copy(root / "soda" / "test_infrared.txt", root / "thermseg" / "val.lst")
    return root / "thermseg"


@pytest.fixture
def extended(monkeypatch):
    monkeypatch.setitem(HEADS, "pointwise", POINTWISE)
    monkeypatch.setitem(DATASETS, "thermseg", THERMSEG)


def test_the_new_entries_are_choices_of_every_option_that_names_their_kind(extended, capsys):
    for argv, option, name in [(["finetune", "--help"], "--head", "pointwise"),
                               (["finetune", "--help"], "--dataset", "thermseg"),
                               (["evaluate", "--help"], "--dataset", "thermseg"),
                               (["predict", "--help"], "--dataset", "thermseg"),
                               (["data", "check-seg", "--help"], "--dataset", "thermseg")]:
        with pytest.raises(SystemExit):
            cli.main(argv)
        usage = capsys.readouterr().out.split("\n\n")[0]
        assert f"{option} {{" in usage and name in usage.split(f"{option} {{")[1].split("}")[0], argv


def test_the_new_entries_pass_config_validation_and_others_still_fail(extended):
    config = make_config("toy", values={"model.head": "pointwise", "data.dataset": "thermseg"})
    assert (config["model"]["head"], config["data"]["dataset"]) == ("pointwise", "thermseg")
    with pytest.raises(ConfigError, match=r"model\.head must be one of: upernet, linear, pointwise"):
        make_config("toy", values={"model.head": "segformer"})
    with pytest.raises(ConfigError, match=r"data\.dataset must be one of: auto, soda, mfnet, scut, folder, thermseg"):
        make_config("toy", values={"data.dataset": "thermseg2"})


def test_the_sweep_takes_the_new_head_and_data_set(extended, tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\npreset: toy\nbackbones: [{name: T, size: tiny, source: none}]\n"
                     f"datasets: [{{name: TS, root: {tmp_path}, layout: thermseg}}]\n"
                     "protocols: {ft: {head: pointwise}, lp: {}}\n")
    cells = plan_cells(read_sweep(str(sweep)))
    assert [cell.id for cell in cells] == ["t/ts/ft-seed0", "t/ts/lp-seed0"]
    assert cells[0].finetune_args("c")[2:4] == ["--head", "pointwise"] and "--probe" in cells[1].finetune_args("c")
    assert cells[0].config()["model"]["head"] == "pointwise" and cells[1].config()["model"]["head"] == "linear"
    sweep.write_text(sweep.read_text().replace("ft: {head: pointwise}", "ft: {head: linear}"))
    with pytest.raises(ConfigError, match=r"protocols\.ft\.head must be one of upernet, pointwise \(fine-tuning\)"):
        read_sweep(str(sweep))


def test_a_run_trains_the_new_head_on_the_new_data_set_found_by_detection(extended, tmp_path, capsys):
    root = write_thermseg(tmp_path)
    assert cli.main(["data", "check-seg", str(root)]) == 0
    assert "thermseg" in capsys.readouterr().out
    out = tmp_path / "run"
    assert cli.main(["finetune", "toy", "--head", "pointwise", "--pretrained", "none", "--data", str(root),
                     "--out", str(out), "--iterations", "2", "--device", "cpu", "--workers", "0",
                     "--set", "run.progress=false", "--set", "optim.warmup_iterations=1",
                     "--set", "run.eval_every=0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "thermseg" and metrics["model"]["head"] == "pointwise"
    segmentor = load_segmentor(out / "segmentor.safetensors")
    assert isinstance(segmentor.decode_head, PointwiseHead) and segmentor.meta["dataset"] == "thermseg"
