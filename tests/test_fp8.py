"""The FP8 teacher (``--teacher-precision fp8``): refused with one line where it cannot run, close to the bf16
teacher where it can (CUDA, compute capability >= 8.9, torchao)."""

import copy

import pytest
import torch

from unip import cli
from unip.data.synth import write_unlabeled
from unip.distill.teacher import Teacher
from unip.errors import ConfigError
from unip.checkpoint import save_checkpoint
from unip.models import create_model
from unip.models.quantize import fp8_unavailable_reason, quantize_linear_fp8


def test_fp8_refused_on_cpu_with_one_line(tmp_path, capsys):
    teacher = create_model("vit_small_patch16", depth=2, embed_dim=64, num_heads=4, img_size=64)
    save_checkpoint(teacher, tmp_path / "teacher.safetensors")
    write_unlabeled(str(tmp_path / "images"), 8, size=(80, 64))
    code = cli.main(["pretrain", "toy", "--teacher", str(tmp_path / "teacher.safetensors"), "--teacher-layer", "2",
                     "--data", str(tmp_path / "images"), "--out", str(tmp_path / "run"), "--device", "cpu",
                     "--teacher-precision", "fp8", "--set", "run.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "fp8" in err[0] and "CUDA" in err[0]
    assert not (tmp_path / "run" / "student.safetensors").exists()


def test_quantize_refuses_cpu_models():
    assert "CUDA" in fp8_unavailable_reason(torch.device("cpu"))
    with pytest.raises(ConfigError, match="CUDA"):
        quantize_linear_fp8(torch.nn.Sequential(torch.nn.Linear(16, 16)))


needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or fp8_unavailable_reason(torch.device("cuda")),
                               reason="needs a CUDA GPU with compute capability >= 8.9 and torchao")


@needs_fp8
def test_fp8_teacher_logits_close_to_bf16():
    torch.manual_seed(0)
    base = create_model("vit_base_patch16", depth=4, img_size=224)
    teachers = {name: Teacher(copy.deepcopy(base), 3).cuda().set_precision(name) for name in ("bf16", "fp8")}
    images = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference, fp8 = teachers["bf16"](images).float(), teachers["fp8"](images).float()
    assert fp8.shape == reference.shape == (8, 12, 197, 197)
    assert float((fp8 - reference).norm() / reference.norm()) < 0.1
