"""Attention metrics against independent float64 references, the streaming profile, patterns, layer choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unip.analysis import (AttentionProfile, LayerStats, PatternThresholds, ProfileAccumulator,
                           attention_distance, attention_entropy, attention_metrics, classify,
                           classify_profile, explain_distill_layer, nmi, profile_model,
                           select_distill_layer, uniform_distance)
from unip.analysis.metrics import METRICS
from unip.errors import ConfigError, DataError
from unip.models import create_model


# ----------------------------------------------------------------------------------- references
def _patch_rows(attn: np.ndarray, prefix: int) -> np.ndarray:
    """Prefix dropped, rows renormalised (massless rows → uniform), float64 [B, H, Q, K]."""
    block = attn[..., prefix:, prefix:].astype(np.float64)
    mass = block.sum(-1, keepdims=True)
    uniform = np.full_like(block, 1.0 / block.shape[-1])
    return np.where(mass > 0, block / np.where(mass > 0, mass, 1.0), uniform)


def _plogp(p: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def reference_nmi(attn: np.ndarray, prefix: int = 1) -> np.ndarray:
    """Textbook NMI from the joint p(q, k) = p(k|q) / Q, in float64."""
    p = _patch_rows(attn, prefix)
    queries = p.shape[-2]
    joint = p / queries
    p_k = joint.sum(-2, keepdims=True)
    ratio = np.where(joint > 0, joint / (np.where(joint > 0, 1.0 / queries * p_k, 1.0)), 1.0)
    mutual = (joint * np.log(ratio)).sum((-2, -1))
    h_k = -_plogp(p_k).sum((-2, -1))
    return mutual / np.sqrt(math.log(queries) * h_k)


def reference_entropy(attn: np.ndarray, prefix: int = 1) -> np.ndarray:
    return -_plogp(_patch_rows(attn, prefix)).sum(-1).mean(-1)


def reference_distance(attn: np.ndarray, grid, patch: float, prefix: int = 1) -> np.ndarray:
    p = _patch_rows(attn, prefix)
    rows, cols = grid
    centres = [(r * patch, c * patch) for r in range(rows) for c in range(cols)]
    table = np.array([[math.dist(a, b) for b in centres] for a in centres])
    return (p * table).sum(-1).mean(-1)


def random_maps(batch=2, heads=3, tokens=17, seed=0, sharp=4.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, tokens, tokens, generator=generator, dtype=torch.float64)
    return (logits * sharp).softmax(-1)


# ----------------------------------------------------------------------------------- NMI
def test_nmi_is_zero_when_all_queries_share_one_distribution():
    generator = torch.Generator().manual_seed(1)
    patches = 16
    shared = torch.rand(patches, generator=generator, dtype=torch.float64).softmax(0)
    cls_mass = torch.rand(2, 3, patches + 1, 1, generator=generator, dtype=torch.float64) * 0.9
    # every query puts its own amount of mass on CLS; the rest follows the shared distribution
    attn = torch.cat([cls_mass, (1 - cls_mass) * shared], dim=-1)
    torch.testing.assert_close(nmi(attn), torch.zeros(2, 3, dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_nmi_is_one_for_a_permutation_map(prefix):
    patches = 25
    tokens = prefix + patches
    attn = torch.zeros(2, 4, tokens, tokens)
    attn[..., :prefix, 0] = 1.0
    perm = torch.randperm(patches, generator=torch.Generator().manual_seed(prefix))
    attn[..., prefix + torch.arange(patches), prefix + perm] = 1.0
    torch.testing.assert_close(nmi(attn, num_prefix_tokens=prefix), torch.ones(2, 4, dtype=torch.float64))
    assert torch.all(attention_entropy(attn, num_prefix_tokens=prefix) == 0)


@pytest.mark.parametrize("sharp", [0.1, 2.0, 30.0])
def test_nmi_matches_float64_reference(sharp):
    attn = random_maps(sharp=sharp, seed=int(sharp * 10))
    expected = reference_nmi(attn.numpy())
    np.testing.assert_allclose(nmi(attn).numpy(), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(nmi(attn.float()).numpy(), expected, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_metrics_are_safe_for_half_precision_maps(dtype):
    attn = random_maps(tokens=50, sharp=12.0)
    attn[..., 3:8] = 0.0  # exact zeros; sharp rows add fp16 underflow
    attn = attn.to(dtype)
    exact = attn.double().numpy()
    metrics = attention_metrics(attn, patch_size=16, grid=(7, 7))
    assert all(v.dtype == torch.float64 and torch.isfinite(v).all() for v in metrics.values())
    np.testing.assert_allclose(metrics["nmi"].numpy(), reference_nmi(exact), atol=1e-5)
    np.testing.assert_allclose(metrics["entropy"].numpy(), reference_entropy(exact), atol=1e-5)
    np.testing.assert_allclose(metrics["distance"].numpy(), reference_distance(exact, (7, 7), 16), rtol=1e-5)


def test_metrics_of_maps_from_a_model_with_trainable_weights():
    """docs/analysis.md's API example: ``maps = model.attention_maps(x); nmi(maps[9])`` on a freshly loaded model,
    whose maps carry autograd history; the metrics equal those of the detached maps."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16", depth=2, embed_dim=32, num_heads=2, img_size=32)
    attn = model.attention_maps(torch.randn(2, 3, 32, 32))[2]
    assert attn.requires_grad
    for metric in (nmi, attention_entropy, lambda a: attention_distance(a, patch_size=16, grid=(2, 2))):
        assert torch.equal(metric(attn), metric(attn.detach()))


def test_rows_with_all_mass_on_cls_count_as_uniform():
    attn = torch.zeros(1, 2, 10, 10)
    attn[..., 0] = 1.0  # every query attends only to CLS
    metrics = attention_metrics(attn, patch_size=16, grid=(3, 3))
    assert torch.all(metrics["nmi"] == 0)
    torch.testing.assert_close(metrics["entropy"], torch.full((1, 2), math.log(9), dtype=torch.float64))
    torch.testing.assert_close(metrics["distance"], torch.full((1, 2), uniform_distance((3, 3), 16),
                                                               dtype=torch.float64))


def test_entropy_matches_reference_and_bounds():
    attn = random_maps(sharp=3.0, seed=7)
    np.testing.assert_allclose(attention_entropy(attn).numpy(), reference_entropy(attn.numpy()), rtol=1e-10)
    uniform = torch.full((1, 1, 17, 17), 1 / 17)
    torch.testing.assert_close(attention_entropy(uniform), torch.full((1, 1), math.log(16), dtype=torch.float64))


# ----------------------------------------------------------------------------------- distance
def test_distance_is_zero_for_the_identity_map():
    attn = torch.eye(1 + 14 * 14).expand(2, 3, -1, -1)
    assert torch.all(attention_distance(attn, patch_size=16) == 0)


def test_distance_on_a_3x3_grid_by_hand():
    patch = 16.0
    # each query looks at its point reflection through the centre patch
    mirror = torch.zeros(1, 1, 9, 9)
    mirror[0, 0, torch.arange(9), 8 - torch.arange(9)] = 1.0
    corners, edges = 4 * 2 * patch * math.sqrt(2), 4 * 2 * patch
    expected = (corners + edges + 0.0) / 9
    assert attention_distance(mirror, patch, num_prefix_tokens=0).item() == pytest.approx(expected)
    # the centre query attends uniformly: 4 neighbours at 16 px, 4 diagonals at 16·√2, itself at 0
    centre = torch.eye(9).reshape(1, 1, 9, 9).clone()
    centre[0, 0, 4] = 1 / 9
    per_query = torch.zeros(9, dtype=torch.float64)
    per_query[4] = (4 * patch + 4 * patch * math.sqrt(2)) / 9
    assert attention_distance(centre, patch, num_prefix_tokens=0).item() == pytest.approx(per_query.mean().item())


def test_distance_on_a_non_square_grid_matches_reference():
    attn = random_maps(tokens=1 + 2 * 5, sharp=2.0, seed=3)
    got = attention_distance(attn, patch_size=8, grid=(2, 5))
    np.testing.assert_allclose(got.numpy(), reference_distance(attn.numpy(), (2, 5), 8), rtol=1e-10)
    with pytest.raises(ValueError, match="square"):
        attention_distance(attn, patch_size=8)
    with pytest.raises(ValueError, match="grid 3x3"):
        attention_distance(attn, patch_size=8, grid=(3, 3))


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, H, Q, K\]"):
        nmi(torch.rand(3, 5, 5))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        nmi(torch.rand(1, 1, 5, 5), num_prefix_tokens=5)


# ----------------------------------------------------------------------------------- profile
def test_accumulator_merges_uneven_batches_exactly():
    values = torch.rand(11, 4, len(METRICS), dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 100
    acc = ProfileAccumulator()
    for chunk in values.split([1, 4, 2, 4]):
        acc.update({3: chunk, 5: 2 * chunk})
    stats = {s.layer: s for s in acc.layer_stats()}
    assert acc.count == 11 and sorted(stats) == [3, 5]
    for i, metric in enumerate(METRICS):
        np.testing.assert_allclose(stats[3].mean[metric], values[..., i].mean(0).numpy(), rtol=1e-12)
        np.testing.assert_allclose(stats[5].std[metric], (2 * values[..., i]).std(0, correction=0).numpy(),
                                   rtol=1e-10)


@pytest.mark.parametrize("layer_group", [1, 2])
def test_streaming_profile_equals_all_at_once(layer_group):
    torch.manual_seed(0)
    # non-square 2x3 grid; the last block has its own head count as in UNIP students
    model = create_model("vit_small_patch16", depth=3, img_size=(32, 48), last_heads=4).eval()
    images = torch.randn(5, 3, 32, 48)
    profile = profile_model(model, list(images), batch_size=2, progress=False, layer_group=layer_group)
    with torch.inference_mode():
        maps = model.attention_maps(images)
    assert profile.num_images == 5 and profile.grid == (2, 3) and [s.layer for s in profile.layers] == [1, 2, 3]
    assert [s.heads for s in profile.layers] == [6, 6, 4]
    for stats in profile.layers:
        metrics = attention_metrics(maps[stats.layer], 16, (2, 3))
        for metric in METRICS:
            np.testing.assert_allclose(stats.mean[metric], metrics[metric].mean(0).numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(stats.std[metric], metrics[metric].std(0, correction=0).numpy(),
                                       rtol=1e-3, atol=1e-6)


def test_profile_subset_of_layers_round_trips_through_json_dict():
    model = create_model("vit_small_patch16", depth=4, img_size=32)
    profile = profile_model(model, [torch.randn(3, 32, 32) for _ in range(3)], batch_size=8,
                            layers=[4, 2], progress=False, source="tiny")
    assert [s.layer for s in profile.layers] == [2, 4]
    classify_profile(profile)
    again = AttentionProfile.from_dict(profile.to_dict())
    assert again.to_dict() == profile.to_dict()


def test_profile_under_bf16_autocast_is_close_to_fp32():
    model = create_model("vit_small_patch16", depth=2, img_size=32)
    images = [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    full = profile_model(model, images, batch_size=4, progress=False)
    half = profile_model(model, images, batch_size=4, progress=False, autocast_dtype=torch.bfloat16)
    np.testing.assert_allclose(half.values("nmi"), full.values("nmi"), atol=0.02)
    np.testing.assert_allclose(half.values("distance"), full.values("distance"), rtol=0.02)


def test_profile_of_no_images_is_an_error():
    with pytest.raises(DataError, match="no images"):
        profile_model(create_model("vit_small_patch16", depth=1, img_size=32), [], progress=False)


# ----------------------------------------------------------------------------------- patterns
def make_profile(nmis, relative_distances, heads=2) -> AttentionProfile:
    """A constructed profile on a 14x14 grid: every head of layer i has NMI nmis[i] and distance
    relative_distances[i] × the uniform-attention distance."""
    grid, patch = (14, 14), 16
    reference = uniform_distance(grid, patch)
    layers = [LayerStats(i, {"nmi": [n] * heads, "distance": [d * reference] * heads, "entropy": [1.0] * heads},
                         {m: [0.0] * heads for m in METRICS})
              for i, (n, d) in enumerate(zip(nmis, relative_distances), start=1)]
    return AttentionProfile("constructed", 10, len(layers), patch, grid, layers)


def test_classification_follows_the_documented_rule():
    t = PatternThresholds(nmi_local=0.4, nmi_global=0.1, local_distance=0.3)
    assert classify(0.40, 0.9, t) == "local"       # NMI at the local threshold
    assert classify(0.25, 0.30, t) == "local"      # hybrid NMI but short-range attention
    assert classify(0.25, 0.31, t) == "hybrid"
    assert classify(0.10, 0.9, t) == "global"      # NMI at the global threshold
    assert classify(0.05, 0.2, t) == "local"       # short distance wins over low NMI
    profile = make_profile([0.6, 0.3, 0.05], [0.2, 0.6, 0.9])
    assert classify_profile(profile, t) == ["local", "hybrid", "global"]
    assert [s.pattern for s in profile.layers] == ["local", "hybrid", "global"]


@pytest.mark.parametrize("patterns, expected", [
    # MAE-L: local/hybrid early, hybrid up to 18, the last six layers local again (pixel reconstruction)
    (["local"] * 4 + ["hybrid"] * 14 + ["local"] * 6, 18),
    # DINO-B: local early, hybrid in the middle, global at the end
    (["local"] * 3 + ["hybrid"] * 6 + ["global"] * 3, 9),
    # iBOT-L
    (["local"] * 5 + ["hybrid"] * 16 + ["global"] * 3, 21),
    # hybrid layers that are not contiguous: still the deepest one
    (["hybrid", "global", "hybrid", "global"], 3),
])
def test_select_distill_layer_picks_the_deepest_hybrid_layer(patterns, expected):
    values = {"local": (0.6, 0.2), "hybrid": (0.25, 0.6), "global": (0.03, 0.95)}
    profile = make_profile(*zip(*[values[p] for p in patterns]))
    selection = explain_distill_layer(profile)
    assert selection.layer == select_distill_layer(profile) == expected
    assert selection.pattern == "hybrid" and selection.reason == "deepest hybrid layer"
    assert selection.depth == len(patterns)


def test_select_distill_layer_falls_back_to_nmi_closest_to_the_hybrid_band():
    # all global (a random-weight model): the highest NMI is the closest to the band centre (0.25)
    profile = make_profile([0.02, 0.08, 0.05, 0.01], [0.95] * 4)
    selection = explain_distill_layer(profile)
    assert selection.layer == 2 and "no hybrid layer" in selection.reason
    # a tie between a local and a global layer goes to the deeper one
    assert select_distill_layer(make_profile([0.45, 0.05, 0.45, 0.05], [0.9] * 4)) == 4
    # thresholds change the answer: with a wider band the 0.45 layers become hybrid
    wide = PatternThresholds(nmi_local=0.5, nmi_global=0.1)
    assert select_distill_layer(make_profile([0.45, 0.05, 0.45, 0.05], [0.9] * 4), wide) == 3


@pytest.mark.parametrize("depth", [4, 6])
def test_depth_plot_of_a_shallow_model_has_whole_layer_ticks(depth, tmp_path, monkeypatch):
    from unip.analysis import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kwargs: figures.append(fig))
    profile = make_profile(np.linspace(0.6, 0.05, depth), np.linspace(0.2, 0.9, depth))
    plots.plot_metric_by_depth([plots.Curve("shallow", profile, selected=2)], "nmi", str(tmp_path / "nmi.png"))
    ax = figures[0].axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks == list(range(1, depth + 1))


@pytest.mark.parametrize("kwargs", [dict(nmi_local=0.1, nmi_global=0.2), dict(nmi_global=-0.1),
                                    dict(nmi_local=1.5), dict(local_distance=1.0)])
def test_invalid_thresholds_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        PatternThresholds(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_on_cuda_matches_cpu_even_with_tf32_and_autocast():
    model = create_model("vit_small_patch16", depth=3, img_size=48)
    images = [torch.randn(3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    cpu = profile_model(model, images, batch_size=4, device="cpu", progress=False)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what pre-training sets; the metrics must not care
    try:
        gpu = profile_model(model, images, batch_size=4, device="cuda", progress=False)
        bf16 = profile_model(model, images, batch_size=4, device="cuda", progress=False,
                             autocast_dtype=torch.bfloat16)
    finally:
        torch.set_float32_matmul_precision(previous)
    for metric in METRICS:
        np.testing.assert_allclose(gpu.values(metric), cpu.values(metric), rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(bf16.values(metric), cpu.values(metric), rtol=0.03, atol=0.02)
    maps = random_maps(tokens=50).float().cuda()
    np.testing.assert_allclose(nmi(maps).cpu().numpy(), reference_nmi(maps.double().cpu().numpy()), atol=1e-6)
