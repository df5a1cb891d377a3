"""The frozen teacher: cut at its block, grid matching for other patch sizes, register tokens dropped."""

import pytest
import torch
import torch.nn.functional as F

from unip.checkpoint import save_checkpoint
from unip.distill import Teacher, drop_register_tokens, fit_to_grid, load_teacher
from unip.errors import ConfigError
from unip.models import create_model


def _vit(patch=16, regs=0, size=224):
    torch.manual_seed(0)
    return create_model(f"vit_small_patch{patch}", depth=3, embed_dim=64, num_heads=4, img_size=size,
                        num_reg_tokens=regs).eval()


def test_patch14_teacher_with_registers_sees_the_student_grid():
    model = _vit(patch=14, regs=4, size=56)
    images = torch.randn(2, 3, 64, 64)  # student: patch 16 → 4 × 4 grid
    with torch.no_grad():
        full = model.attention_logits(F.interpolate(images, size=(56, 56), mode="bicubic"), 2)
    teacher = Teacher(model, layer=2, student_patch=16)
    logits = teacher(images)
    assert logits.shape == (2, 4, 17, 17)
    keep = [0] + list(range(5, 21))
    torch.testing.assert_close(logits, full[:, :, keep][:, :, :, keep])
    assert drop_register_tokens(full, 1) is full


def test_teacher_is_cut_frozen_and_always_in_eval():
    teacher = Teacher(_vit(), layer=2)
    assert len(teacher.model.blocks) == 2 and teacher.num_heads == 4
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    assert not teacher(x).requires_grad
    with pytest.raises(ConfigError, match="layers 1..3"):
        Teacher(_vit(), layer=4)


def test_fit_to_grid_resamples_the_position_table_once(tmp_path):
    model = _vit(size=224)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dynamic = model.attention_logits(images, 3)  # resamples pos_embed on every call
    fitted = fit_to_grid(model, 64, 16)
    assert fitted.config["img_size"] == [64, 64] and fit_to_grid(fitted, 64, 16) is fitted
    path = save_checkpoint(model, tmp_path / "teacher.safetensors")
    teacher = load_teacher(str(path), layer=3, img_size=64)
    torch.testing.assert_close(teacher(images), dynamic, rtol=1e-5, atol=1e-5)
