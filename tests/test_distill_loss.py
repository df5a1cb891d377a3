"""NMI-HAD loss: exact values, the reduction axis, numerical safety and gradients."""

import pytest
import torch
import torch.nn.functional as F

from unip.distill import attention_distill_loss


def _logits(*shape, seed=0, dtype=torch.float32, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def _reference(student, teacher, kind, temperature):
    """float64 textbook formula, row by row."""
    s, t = student.double() / temperature, teacher.double() / temperature
    p = t.softmax(-1)
    if kind == "kl":
        per_row = (p * (p.log() - s.log_softmax(-1))).sum(-1)
    else:
        per_row = -(p * s.log_softmax(-1)).sum(-1)
    return per_row.mean()


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_zero_only_for_kl_on_equal_logits(kind):
    x = _logits(2, 3, 7, 7)
    loss = attention_distill_loss(x, x.clone(), kind=kind)
    if kind == "kl":
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
    else:  # soft cross-entropy of equal rows = the teacher's mean row entropy
        p = x.softmax(-1)
        assert loss.item() == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-5)


@pytest.mark.parametrize("kind,temperature", [("kl", 1.0), ("kl", 2.5), ("ce", 1.0), ("ce", 0.5)])
def test_matches_float64_reference(kind, temperature):
    s, t = _logits(2, 4, 9, 9, seed=1), _logits(2, 4, 9, 9, seed=2)
    got = attention_distill_loss(s, t, kind=kind, temperature=temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_reference(s, t, kind, temperature).item(), rel=1e-5)


def test_matches_torch_kl_div_and_reduces_over_keys():
    s, t = _logits(3, 2, 5, 5, seed=3), _logits(3, 2, 5, 5, seed=4)
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="none", log_target=True)
    expected = kl.sum(-1).mean()  # sum over keys, mean over (image, head, query)
    assert attention_distill_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-6)
    # the release's CE reduced over heads: transposing heads and keys must change our value
    swapped = attention_distill_loss(s.transpose(1, 3), t.transpose(1, 3)).item()
    assert swapped != pytest.approx(expected.item(), rel=1e-3)


def test_ce_and_kl_differ_by_teacher_entropy_and_share_gradients():
    s = _logits(2, 2, 6, 6, seed=5).requires_grad_()
    t = _logits(2, 2, 6, 6, seed=6)
    kl, ce = attention_distill_loss(s, t, "kl"), attention_distill_loss(s, t, "ce")
    p = t.softmax(-1)
    assert (ce - kl).item() == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-5)
    (g_kl,) = torch.autograd.grad(kl, s)
    (g_ce,) = torch.autograd.grad(ce, s)
    torch.testing.assert_close(g_kl, g_ce)


def test_finite_on_extreme_logits_and_half_precision_inputs():
    s = _logits(1, 2, 5, 5, seed=7, scale=1e6)
    t = _logits(1, 2, 5, 5, seed=8, scale=1e6)
    t[0, 0, 1] = float("-inf")            # a whole row masked
    t[0, 1, 2, :3] = float("-inf")        # some keys masked
    s[0, 0, 3] = float("-inf")
    s[0, 1, 4, 0] = float("inf")
    s = s.requires_grad_()
    for kind in ("kl", "ce"):
        loss = attention_distill_loss(s, t, kind)
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all()
    half = attention_distill_loss(s.detach().half().clamp(-6e4, 6e4), t.bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_nan_propagates_so_that_training_can_stop():
    s, t = _logits(1, 1, 4, 4), _logits(1, 1, 4, 4, seed=1)
    s[0, 0, 0, 0] = float("nan")
    assert torch.isnan(attention_distill_loss(s, t))


def test_gradcheck_float64():
    s = _logits(2, 2, 4, 4, seed=9, dtype=torch.float64).requires_grad_()
    t = _logits(2, 2, 4, 4, seed=10, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: attention_distill_loss(x, t, "kl", 1.7), (s,))
    assert torch.autograd.gradcheck(lambda x: attention_distill_loss(x, t, "ce"), (s,))


def test_rejects_bad_arguments():
    x = _logits(1, 2, 3, 3)
    with pytest.raises(ValueError, match="differ"):
        attention_distill_loss(x, _logits(1, 3, 3, 3))
    with pytest.raises(ValueError, match="kind"):
        attention_distill_loss(x, x, kind="mse")
    with pytest.raises(ValueError, match="temperature"):
        attention_distill_loss(x, x, temperature=0)
