"""Frozen fp32 linears through oneDNN on a CPU: same products as nn.Linear, the usual path wherever a call needs
more (gradients, autocast, tracing), switched only when asked or when timing says so, and undone by the context."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unip.analysis.profile import profile_model
from unip.distill import Teacher
from unip.errors import ConfigError
from unip.models import create_model
from unip.models import cpu_linear
from unip.models.cpu_linear import OneDnnLinear, onednn_linears, use_onednn_linears

pytestmark = pytest.mark.skipif(not cpu_linear.onednn_linear_available(), reason="this torch has no oneDNN linear op")


def _vit():
    torch.manual_seed(0)
    return create_model("vit_small_patch16", depth=3, embed_dim=64, num_heads=4, img_size=32).eval()


def _classes(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_computes_what_nn_linear_does(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias)
    x = torch.randn(shape)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.__class__ = OneDnnLinear
    with torch.no_grad():
        out = layer(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_calls_that_need_more_than_a_plain_product_take_the_usual_path(monkeypatch):
    torch.manual_seed(0)
    reference = nn.Linear(16, 8)
    layer = nn.Linear(16, 8)
    layer.load_state_dict(reference.state_dict())
    layer.__class__ = OneDnnLinear
    calls = []
    monkeypatch.setattr(cpu_linear, "_onednn_linear", lambda *a: calls.append(1) or F.linear(*a))
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).square().sum().backward()  # autograd: the weight trains
    reference(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.detach()).dtype is torch.bfloat16  # autocast casts as for nn.Linear
    assert layer.double()(x.detach().double()).dtype is torch.float64
    assert calls == []
    with torch.no_grad():
        layer.float()(x)
    assert calls == [1]


def test_a_trainable_bias_alone_still_gets_its_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    layer.weight.requires_grad_(False)
    layer.__class__ = OneDnnLinear
    layer(torch.randn(4, 16)).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((8,), 4.0))


def test_the_decision_follows_the_timing_rule(monkeypatch):
    cpu_linear.onednn_is_faster.cache_clear()
    monkeypatch.setattr(cpu_linear, "_median_seconds", lambda runs, repeats: [1.0, 0.94])
    assert cpu_linear.onednn_is_faster(32, 48, 1, rows=4, repeats=1)
    monkeypatch.setattr(cpu_linear, "_median_seconds", lambda runs, repeats: [1.0, 0.97])
    assert not cpu_linear.onednn_is_faster(32, 48, 2, rows=4, repeats=1)  # within 5 %: keep the default
    cpu_linear.onednn_is_faster.cache_clear()


def test_forcing_onednn_without_the_op_says_so(monkeypatch, caplog):
    model = _vit()
    monkeypatch.setattr(cpu_linear, "onednn_linear_available", lambda: False)
    assert use_onednn_linears(model, "onednn") == [] and set(_classes(model)) == {nn.Linear}
    assert "no oneDNN linear op" in caplog.text


def test_choice_switches_and_restores_keeping_the_weights():
    model = _vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    count = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len(use_onednn_linears(model, "onednn")) == count
    assert set(_classes(model)) == {OneDnnLinear}
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert use_onednn_linears(model, "onednn") == []  # nothing left to switch
    assert use_onednn_linears(model, "default") == []
    assert set(_classes(model)) == {nn.Linear}
    with pytest.raises(ConfigError, match="UNIP_CPU_LINEAR='fast': choose one of auto, onednn, default"):
        use_onednn_linears(model, "fast")


def test_the_environment_sets_the_choice(monkeypatch):
    model = _vit()
    monkeypatch.setenv("UNIP_CPU_LINEAR", "onednn")
    assert len(use_onednn_linears(model)) == 12
    with onednn_linears(model, "default") as switched:
        assert switched == 0 and set(_classes(model)) == {nn.Linear}
    assert set(_classes(model)) == {OneDnnLinear}  # the context gives every layer its earlier kind back
    monkeypatch.setenv("UNIP_CPU_LINEAR", "default")
    assert use_onednn_linears(model) == [] and set(_classes(model)) == {nn.Linear}


def test_auto_leaves_small_layers_alone_and_follows_the_timing(monkeypatch):
    model = _vit()
    timed = []
    monkeypatch.setattr(cpu_linear, "onednn_is_faster", lambda *shape: timed.append(shape) or True)
    assert use_onednn_linears(model) == [] and timed == []  # 64-wide layers: below MIN_WEIGHTS, never timed
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHTS", 1)
    assert use_onednn_linears(model) and timed == [(64, 256, torch.get_num_threads())]  # the largest (fc1) is timed
    monkeypatch.setattr(cpu_linear, "onednn_is_faster", lambda *shape: False)
    use_onednn_linears(model)
    assert set(_classes(model)) == {nn.Linear}


def test_bf16_models_are_left_alone():
    model = _vit().to(torch.bfloat16)
    assert use_onednn_linears(model, "onednn") == []


def test_timing_decision_is_cached_per_shape(monkeypatch):
    cpu_linear.onednn_is_faster.cache_clear()
    timings = []
    monkeypatch.setattr(cpu_linear, "_median_seconds", lambda runs, repeats: timings.append(1) or [1.0, 0.5])
    assert cpu_linear.onednn_is_faster(32, 48, 1, rows=16, repeats=1)
    assert cpu_linear.onednn_is_faster(32, 48, 1, rows=16, repeats=1) and len(timings) == 1
    assert cpu_linear.onednn_is_faster(32, 48, 2, rows=16, repeats=1) and len(timings) == 2  # other thread count
    cpu_linear.onednn_is_faster.cache_clear()


def test_both_kernels_are_timed_in_turn():
    calls = []
    medians = cpu_linear._median_seconds([lambda: calls.append("a"), lambda: calls.append("b")], repeats=3)
    assert calls == ["a", "b"] * 4 and len(medians) == 2  # one warm-up round, then three timed rounds


def test_context_restores_the_callers_model_and_profiles_give_the_same_numbers(monkeypatch):
    model = _vit()
    images = [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    reference = profile_model(model, images, batch_size=2, progress=False)
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHTS", 1)
    monkeypatch.setattr(cpu_linear, "onednn_is_faster", lambda *shape: True)
    with onednn_linears(model) as switched:
        assert switched == 12 and set(_classes(model)) == {OneDnnLinear}
    assert set(_classes(model)) == {nn.Linear}
    calls = []
    kernel = cpu_linear._onednn_linear
    monkeypatch.setattr(cpu_linear, "_onednn_linear", lambda *a: calls.append(1) or kernel(*a))
    profile = profile_model(model, images, batch_size=2, progress=False)
    assert len(calls) == 2 * 12  # two batches through every layer
    assert set(_classes(model)) == {nn.Linear}
    for ours, expected in zip(profile.layers, reference.layers):
        for metric, values in expected.mean.items():
            torch.testing.assert_close(torch.tensor(ours.mean[metric]), torch.tensor(values), rtol=1e-4, atol=1e-5)


def test_fp32_cpu_teacher_gives_the_same_logits_through_onednn(monkeypatch):
    images = torch.randn(2, 3, 32, 32)
    reference = Teacher(_vit(), layer=2).set_precision("fp32")
    assert set(_classes(reference)) == {nn.Linear}  # small layers: auto keeps the default kernel
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHTS", 1)
    monkeypatch.setattr(cpu_linear, "onednn_is_faster", lambda *shape: True)
    teacher = Teacher(_vit(), layer=2).set_precision("fp32")
    assert set(_classes(teacher)) == {OneDnnLinear}
    torch.testing.assert_close(teacher(images), reference(images), rtol=1e-5, atol=1e-5)
    assert set(_classes(teacher.set_precision("bf16"))) == {OneDnnLinear}  # bf16 calls take the usual path
    torch.testing.assert_close(teacher(images.bfloat16()).float(), reference(images), rtol=0.1, atol=0.1)


def test_flop_counter_counts_the_onednn_product_like_addmm():
    from torch.utils.flop_counter import FlopCounterMode

    layer = nn.Linear(48, 80)
    x = torch.randn(2, 7, 48)
    counts = []
    for kind in (nn.Linear, OneDnnLinear):
        layer.__class__ = kind
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            layer(x)
        counts.append(counter.get_total_flops())
    assert counts == [2 * 14 * 48 * 80] * 2
