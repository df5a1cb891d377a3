"""The frozen teacher: cut at its block, grid matching for other patch sizes, register tokens dropped, the tanh
GELU (fused into fc1's product on CUDA)."""

import copy
import math

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


class TanhGelu(torch.nn.Module):
    """GELU's tanh approximation written out: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def test_tanh_gelu_teacher_computes_the_approximation_and_stays_close_to_exact():
    model = _vit()
    images = torch.randn(2, 3, 32, 32)
    exact = Teacher(copy.deepcopy(model), layer=3)(images)
    reference = copy.deepcopy(model)
    for block in reference.blocks:
        block.mlp.act = TanhGelu()
    with torch.no_grad():
        expected = reference.attention_logits(images, 3)
    teacher = Teacher(copy.deepcopy(model), layer=3).set_gelu("tanh")
    assert teacher.gelu == "tanh"
    torch.testing.assert_close(teacher(images), expected, rtol=1e-5, atol=1e-5)
    moved = float((expected - exact).norm() / exact.norm())
    assert 0 < moved < 1e-3  # another function, close to the exact one
    torch.testing.assert_close(teacher.set_gelu("exact")(images), exact, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="exact, tanh"):
        teacher.set_gelu("relu")


def test_only_a_bf16_teacher_with_the_tanh_gelu_uses_the_fused_epilogue():
    teacher = Teacher(_vit(), layer=3).set_gelu("tanh")
    mlps = [block.mlp for block in teacher.model.blocks]
    assert not any(mlp.gelu_epilogue for mlp in mlps)  # fp32 weights
    teacher.set_precision("bf16")
    assert all(mlp.gelu_epilogue for mlp in mlps)
    teacher.set_gelu("exact")
    assert not any(mlp.gelu_epilogue for mlp in mlps)
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # on a CPU the epilogue flag changes nothing
        plain = teacher.set_gelu("tanh")(images)
        for mlp in mlps:
            mlp.gelu_epilogue = False
        torch.testing.assert_close(teacher(images), plain, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_teacher_computes_the_tanh_gelu_in_the_fc1_epilogue(monkeypatch):
    """On CUDA each MLP's fc1 + GELU is one ``torch._addmm_activation`` (cuBLASLt's GELU epilogue), close to the
    same teacher computing fc1 and the tanh GELU apart."""
    torch.manual_seed(0)
    base = create_model("vit_base_patch16", depth=4, img_size=224)
    teacher = Teacher(base, 3).cuda().set_precision("bf16").set_gelu("tanh")
    images = torch.randn(8, 3, 224, 224, device="cuda")
    calls = []
    fused = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *args, **kw: calls.append(1) or fused(*args, **kw))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        epilogue = teacher(images).float()
        assert len(calls) == 2  # blocks 1 and 2; block 3 stops at its logits
        for block in teacher.model.blocks:
            block.mlp.gelu_epilogue = False
        apart = teacher(images).float()
    assert len(calls) == 2
    assert float((epilogue - apart).norm() / apart.norm()) < 1e-2
