"""Metrics against an independent numpy computation, the layer-decay lr scale and weight-decay groups of
the recipe per parameter (docs/recipe.md#layer-wise-lr-decay), and the mmseg 0.x cross-entropy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unip.engine.optim import param_groups
from unip.errors import DataError
from unip.models import Segmentor
from unip.seg import confusion_matrix, layer_decay_lr_scale, layer_id, segmentation_losses, segmentation_metrics


# ----------------------------------------------------------------------------------------------- metrics
def numpy_metrics(preds, labels, num_classes, ignore=255):
    """mmseg's ``eval_metrics``: per-class intersection / union / label areas over all images."""
    inter, union, label_area = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for pred, label in zip(preds, labels):
        keep = label != ignore
        pred, label = pred[keep], label[keep]
        for c in range(num_classes):
            inter[c] += np.sum((pred == c) & (label == c))
            union[c] += np.sum((pred == c) | (label == c))
            label_area[c] += np.sum(label == c)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union * 100, inter / label_area * 100
    return {"mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc), "aAcc": inter.sum() / label_area.sum() * 100,
            "IoU": iou, "Acc": acc}


def test_metrics_equal_numpy_with_ignore_pixels_and_absent_classes():
    rng = np.random.default_rng(0)
    classes = 6
    preds, labels = [], []
    for shape in [(7, 9), (12, 5), (4, 4)]:
        label = rng.integers(0, 4, size=shape)  # classes 4 and 5 never in the labels
        label[rng.random(shape) < 0.2] = 255
        pred = rng.integers(0, 5, size=shape)  # class 4 predicted only, class 5 nowhere
        preds.append(pred)
        labels.append(label)
    confusion = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), classes) for p, t in zip(preds, labels))
    assert confusion.shape == (classes, classes) and confusion.dtype == torch.int64
    assert int(confusion.sum()) == sum(int((t != 255).sum()) for t in labels)
    assert int(confusion[1, 2]) == sum(int(((t == 1) & (p == 2)).sum()) for p, t in zip(preds, labels))
    ours, expected = segmentation_metrics(confusion), numpy_metrics(preds, labels, classes)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-9)
    np.testing.assert_allclose(ours["IoU"], expected["IoU"], atol=1e-9)
    np.testing.assert_allclose(ours["Acc"], expected["Acc"], atol=1e-9)
    assert math.isnan(ours["IoU"][5]) and ours["IoU"][4] == 0.0  # absent: NaN; predicted only: 0 and counted
    assert math.isnan(ours["Acc"][4]) and math.isnan(ours["Acc"][5])


def test_perfect_prediction_and_bad_values():
    target = torch.tensor([[0, 1], [2, 255]])
    metrics = segmentation_metrics(confusion_matrix(target.clone().clamp(max=2), target, 3))
    assert metrics["mIoU"] == metrics["aAcc"] == metrics["mAcc"] == 100.0
    with pytest.raises(DataError, match="label value 7"):
        confusion_matrix(torch.zeros(2, 2), torch.full((2, 2), 7), 3)
    with pytest.raises(DataError, match="prediction value 3"):
        confusion_matrix(torch.full((2, 2), 3), torch.zeros(2, 2), 3)
    empty = segmentation_metrics(torch.zeros(2, 2, dtype=torch.int64))
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["aAcc"])


# ----------------------------------------------------------------------------------------------- layer decay
def _segmentor(depth=4):
    config = {"backbone": dict(img_size=32, embed_dim=32, depth=depth, num_heads=2, layer_scale=1.0),
              "feature_layers": [depth], "neck": "llfpn",
              "decode_head": {"type": "upernet", "channels": 16}, "auxiliary_head": {"type": "fcn", "channels": 8},
              "num_classes": 3}
    return Segmentor(config)


def expected_id(name, depth):
    """docs/recipe.md#layer-wise-lr-decay written out: cls_token, pos_embed, patch_embed → 0; blocks.i → i + 1;
    the rest depth + 1."""
    if name in ("backbone.cls_token", "backbone.pos_embed") or name.startswith("backbone.patch_embed"):
        return 0
    if name.startswith("backbone.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def test_layer_decay_scale_and_weight_decay_per_parameter():
    depth, rate = 4, 0.85
    segmentor = _segmentor(depth)
    groups = param_groups(segmentor, 0.05, layer_decay_lr_scale(depth, rate))
    seen = {}
    for group in groups:
        for name, param in zip(group["names"], group["params"]):
            seen[name] = (group["lr_scale"], group["weight_decay"], param)
    unused = ["backbone.norm.bias", "backbone.norm.weight"]  # LL-FPN reads the last block before the norm
    assert sorted(seen) == sorted(n for n, _ in segmentor.named_parameters() if n not in unused)
    for name, (scale, decay, param) in seen.items():
        assert scale == pytest.approx(rate ** (depth + 1 - expected_id(name, depth))), name
        no_decay = param.ndim == 1 or name.endswith(".bias") or name in ("backbone.pos_embed", "backbone.cls_token")
        assert decay == (0.0 if no_decay else 0.05), name
    assert seen["backbone.cls_token"][0] == pytest.approx(0.85 ** 5)
    assert seen["backbone.patch_embed.proj.weight"][0] == pytest.approx(0.85 ** 5)
    assert seen["backbone.blocks.0.attn.qkv.weight"][0] == pytest.approx(0.85 ** 4)
    assert seen["backbone.blocks.3.ls2.gamma"][:2] == (pytest.approx(0.85), 0.0)
    for head_param in ("neck.fpn1.0.weight", "decode_head.conv_seg.weight",
                       "auxiliary_head.convs.0.conv.weight"):
        assert seen[head_param][0] == 1.0
    assert seen["neck.fpn1.0.weight"][1] == 0.05 and seen["backbone.pos_embed"][1] == 0.0


def test_layer_id_ignores_wrapper_prefixes():
    assert layer_id("module.backbone.blocks.11.mlp.fc1.weight", 12) == 12
    assert layer_id("_orig_mod.backbone.pos_embed", 12) == 0
    assert layer_id("module.decode_head.conv_seg.bias", 12) == 13
    assert layer_id("backbone.norm.weight", 12) == 13
    assert layer_decay_lr_scale(12)("backbone.blocks.0.norm1.weight") == pytest.approx(0.85 ** 12)


# ----------------------------------------------------------------------------------------------- loss
def test_loss_is_mmseg_cross_entropy_over_all_pixels():
    torch.manual_seed(0)
    outputs = {"decode": torch.randn(2, 4, 8, 8), "aux": torch.randn(2, 4, 2, 2)}
    target = torch.randint(0, 4, (2, 32, 32))
    target[:, :5] = 255
    losses = segmentation_losses(outputs, target, {"decode": 1.0, "aux": 0.4})
    for name, weight in (("decode", 1.0), ("aux", 0.4)):
        logits = F.interpolate(outputs[name], size=(32, 32), mode="bilinear", align_corners=False)
        per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
        assert losses[name].item() == pytest.approx(weight * per_pixel.sum().item() / target.numel(), rel=1e-5)
    # half-precision logits (autocast) are cast to fp32 before the resize, as mmseg's force_fp32 loss
    half = {"decode": outputs["decode"].bfloat16()}
    resized = F.interpolate(half["decode"].float(), size=(32, 32), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(resized, target, ignore_index=255, reduction="none").mean()
    assert torch.equal(segmentation_losses(half, target, {"decode": 1.0})["decode"], expected)
    valid = segmentation_losses(outputs, target, {"decode": 1.0, "aux": 0.4}, average="valid")
    logits = F.interpolate(outputs["decode"], size=(32, 32), mode="bilinear", align_corners=False)
    assert valid["decode"].item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item(), rel=1e-5)
