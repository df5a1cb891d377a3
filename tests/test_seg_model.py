"""Segmentor, necks and heads against a direct re-computation of the release's formulas
(mmsegmentation 0.x's UPerHead / FCNHead and the release's LL-FPN, docs/segmentation.md), written here with
torch.nn.functional only; loading the release's fine-tuned mmseg layout; building from pre-trained sources; saving
and reloading."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unip.checkpoint import save_checkpoint
from unip.errors import CheckpointError, ConfigError
from unip.models import Segmentor, VisionTransformer, build_neck, create_model
from unip.seg import build_segmentor, load_segmentor, save_segmentor
from unip.seg.build import default_drop_path

# ----------------------------------------------------------------------------------------------- reference
POOL_SCALES = (1, 2, 3, 6)


def _bn(x, sd, name):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=False, eps=1e-5)


def _cbr(x, sd, name):
    """mmcv ConvModule: conv without bias → BN → ReLU."""
    weight = sd[f"{name}.conv.weight"]
    return F.relu(_bn(F.conv2d(x, weight, padding=weight.shape[-1] // 2), sd, f"{name}.bn"))


def _up(x, like):
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def ref_last_block_map(sd, x, heads):
    """Patch embed, + CLS, + pos_embed, blocks with gamma_1/gamma_2, last block's tokens without CLS and
    without the final norm → [B, D, H/16, W/16]."""
    p = "backbone."
    w = sd[p + "patch_embed.proj.weight"]
    t = F.conv2d(x, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1])
    batch, dim, rows, cols = t.shape
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd[p + "cls_token"].expand(batch, -1, -1), t], 1) + sd[p + "pos_embed"]
    n = t.shape[1]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(p + "blocks."))
    for i in range(depth):
        b = f"{p}blocks.{i}."
        y = F.layer_norm(t, (dim,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        q, k, v = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(
            batch, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(-1)
        o = F.linear((attn @ v).transpose(1, 2).reshape(batch, n, dim), sd[b + "attn.proj.weight"],
                     sd[b + "attn.proj.bias"])
        t = t + sd[b + "gamma_1"] * o
        y = F.layer_norm(t, (dim,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + sd[b + "gamma_2"] * y
    return t[:, 1:].transpose(1, 2).reshape(batch, dim, rows, cols)


def ref_llfpn(sd, f, p="backbone."):
    a = F.conv_transpose2d(f, sd[p + "fpn1.0.weight"], sd[p + "fpn1.0.bias"], stride=2)
    a = F.gelu(_bn(a, sd, p + "fpn1.1"))
    a = F.conv_transpose2d(a, sd[p + "fpn1.3.weight"], sd[p + "fpn1.3.bias"], stride=2)
    b = F.conv_transpose2d(f, sd[p + "fpn2.0.weight"], sd[p + "fpn2.0.bias"], stride=2)
    return [a, b, f, F.max_pool2d(f, 2)]


def ref_upernet(sd, maps, p="decode_head."):
    x = maps[3]
    pooled = [_up(_cbr(F.adaptive_avg_pool2d(x, s), sd, f"{p}psp_modules.{i}.1"), x)
              for i, s in enumerate(POOL_SCALES)]
    laterals = [_cbr(maps[level], sd, f"{p}lateral_convs.{level}") for level in range(3)]
    laterals.append(_cbr(torch.cat([x] + pooled, 1), sd, p + "bottleneck"))
    for i in (3, 2, 1):
        laterals[i - 1] = laterals[i - 1] + _up(laterals[i], laterals[i - 1])
    outs = [_cbr(laterals[level], sd, f"{p}fpn_convs.{level}") for level in range(3)] + [laterals[3]]
    fused = _cbr(torch.cat([_up(o, outs[0]) for o in outs], 1), sd, p + "fpn_bottleneck")
    return F.conv2d(fused, sd[p + "conv_seg.weight"], sd[p + "conv_seg.bias"])


def ref_fcn(sd, maps, p="auxiliary_head."):
    return F.conv2d(_cbr(maps[2], sd, p + "convs.0"), sd[p + "conv_seg.weight"], sd[p + "conv_seg.bias"])


# ----------------------------------------------------------------------------------------------- release file
def release_state_dict(width, depth, classes, grid, channels=None, aux_channels=256, seed=0, empty=False):
    """A state dict with exactly the keys and shapes of the release's fine-tuned LL-FPN + UperNet + FCN
    checkpoint (random values; ``empty`` gives zeros, for shape-only tests: uninitialised memory may hold NaN, which
    loading refuses)."""
    gen = torch.Generator().manual_seed(seed)
    channels = channels or width
    sd = {}

    def put(key, *shape, std=None, positive=False, around_one=False):
        if empty:
            sd[key] = torch.zeros(shape)
            return
        value = torch.randn(shape, generator=gen)
        if std is None:
            fan_in = max(1, torch.Size(shape[1:]).numel())
            std = fan_in ** -0.5
        value = value * std
        if positive:
            value = 0.5 + torch.rand(shape, generator=gen)
        if around_one:
            value = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        sd[key] = value

    def bn(name, dim):
        put(f"{name}.weight", dim, around_one=True)
        put(f"{name}.bias", dim, std=0.1)
        put(f"{name}.running_mean", dim, std=0.1)
        put(f"{name}.running_var", dim, positive=True)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(100)

    def conv_module(name, cin, cout, k):
        put(f"{name}.conv.weight", cout, cin, k, k)
        bn(f"{name}.bn", cout)

    b = "backbone."
    put(b + "cls_token", 1, 1, width, std=0.02)
    put(b + "pos_embed", 1, grid * grid + 1, width, std=0.02)
    put(b + "patch_embed.proj.weight", width, 3, 16, 16)
    put(b + "patch_embed.proj.bias", width, std=0.02)
    for i in range(depth):
        k = f"{b}blocks.{i}."
        put(k + "gamma_1", width, around_one=True)
        put(k + "gamma_2", width, around_one=True)
        for norm in ("norm1", "norm2"):
            put(k + norm + ".weight", width, around_one=True)
            put(k + norm + ".bias", width, std=0.02)
        for name, (rows, cols) in {"attn.qkv": (3 * width, width), "attn.proj": (width, width),
                                   "mlp.fc1": (4 * width, width), "mlp.fc2": (width, 4 * width)}.items():
            put(k + name + ".weight", rows, cols)
            put(k + name + ".bias", rows, std=0.02)
    put(b + "norm.weight", width, around_one=True)
    put(b + "norm.bias", width, std=0.02)
    put(b + "fpn1.0.weight", width, width, 2, 2)
    put(b + "fpn1.0.bias", width, std=0.02)
    bn(b + "fpn1.1", width)
    put(b + "fpn1.3.weight", width, width, 2, 2)
    put(b + "fpn1.3.bias", width, std=0.02)
    put(b + "fpn2.0.weight", width, width, 2, 2)
    put(b + "fpn2.0.bias", width, std=0.02)
    d = "decode_head."
    for s in range(4):
        conv_module(f"{d}psp_modules.{s}.1", width, channels, 1)
    conv_module(d + "bottleneck", width + 4 * channels, channels, 3)
    for level in range(3):
        conv_module(f"{d}lateral_convs.{level}", width, channels, 1)
        conv_module(f"{d}fpn_convs.{level}", channels, channels, 3)
    conv_module(d + "fpn_bottleneck", 4 * channels, channels, 3)
    put(d + "conv_seg.weight", classes, channels, 1, 1)
    put(d + "conv_seg.bias", classes, std=0.1)
    conv_module("auxiliary_head.convs.0", width, aux_channels, 3)
    put("auxiliary_head.conv_seg.weight", classes, aux_channels, 1, 1)
    put("auxiliary_head.conv_seg.bias", classes, std=0.1)
    return sd


def our_key(release_key):
    return (release_key.replace("backbone.fpn", "neck.fpn").replace(".gamma_1", ".ls1.gamma")
            .replace(".gamma_2", ".ls2.gamma"))


def save_release(path, sd, classes=None):
    meta = {"iter": 14400, "mmseg_version": "0.11.0", "config": "model = dict(...)"}
    if classes:
        meta["CLASSES"] = tuple(classes)
        meta["PALETTE"] = [[i, 2 * i, 3 * i] for i in range(len(classes))]
    torch.save({"meta": meta, "state_dict": sd}, path)
    return path


def test_release_finetuned_checkpoint_loads_every_key_and_computes_the_release_formulas(tmp_path):
    width, depth, classes = 128, 3, 5
    sd = release_state_dict(width, depth, classes, grid=4)
    names = [f"class{i}" for i in range(classes)]
    segmentor = load_segmentor(save_release(tmp_path / "iter_14400.pth", sd, names))
    assert not segmentor.training
    assert segmentor.backbone.heads_per_block == [2] * depth  # width / 64 in every block
    assert segmentor.meta["class_names"] == names and segmentor.meta["palette"][2] == [2, 4, 6]
    ours = segmentor.state_dict()
    assert len(ours) == len(sd)
    for key, value in sd.items():
        assert torch.equal(ours[our_key(key)], value), key

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feature = ref_last_block_map(sd, x, heads=2)
        expected_maps = ref_llfpn(sd, feature)
        maps = segmentor.pyramid(x)
        assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
        for mine, theirs in zip(maps, expected_maps):
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
        logits = segmentor(x)
        assert logits.shape == (2, classes, 16, 16)
        torch.testing.assert_close(logits, ref_upernet(sd, expected_maps), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(segmentor.auxiliary_head(maps), ref_fcn(sd, expected_maps), atol=1e-4, rtol=1e-4)


def test_release_layout_of_unip_small_on_soda_loads_with_its_exact_shapes(tmp_path):
    sd = release_state_dict(384, 12, 21, grid=32, empty=True)
    assert sd["backbone.pos_embed"].shape == (1, 1025, 384)
    assert sd["decode_head.bottleneck.conv.weight"].shape == (384, 1920, 3, 3)
    assert sd["decode_head.fpn_bottleneck.conv.weight"].shape == (384, 1536, 3, 3)
    segmentor = load_segmentor(save_release(tmp_path / "best_mIoU_iter_12000.pth", sd))
    config = segmentor.config
    assert config["backbone"]["embed_dim"] == 384 and config["backbone"]["depth"] == 12
    assert config["backbone"]["img_size"] == [512, 512] and segmentor.backbone.grid_size == (32, 32)
    assert segmentor.backbone.heads_per_block == [6] * 12
    assert config["num_classes"] == 21 and config["neck"] == "llfpn" and config["feature_layers"] == [12]
    assert config["decode_head"]["channels"] == 384 and config["auxiliary_head"]["channels"] == 256
    assert "class_names" not in segmentor.meta and segmentor.meta["stride"] == 341
    assert sorted(segmentor.state_dict()) == sorted(our_key(k) for k in sd)


def test_release_class_names_of_another_count_are_left_out_with_one_warning(tmp_path, caplog):
    """mmseg's meta.CLASSES (and PALETTE) of the data set class, not of the trained head: 3 names for 5 classes
    are not used, and a warning names the file and both counts."""
    path = save_release(tmp_path / "iter_100.pth", release_state_dict(64, 2, 5, grid=2), ["a", "b", "c"])
    with caplog.at_level("WARNING", logger="unip"):
        segmentor = load_segmentor(path)
    assert "class_names" not in segmentor.meta and "palette" not in segmentor.meta
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert str(path) in warnings[0] and "meta.CLASSES lists 3 names" in warnings[0] and "5 classes" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="unip"):  # names that fit: used, no warning
        fitting = load_segmentor(save_release(tmp_path / "iter_200.pth", release_state_dict(64, 2, 3, grid=2),
                                              ["a", "b", "c"]))
    assert fitting.meta["class_names"] == ["a", "b", "c"] and not caplog.records


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_release_file_that_does_not_fit_names_the_file_and_keys(tmp_path, change):
    sd = release_state_dict(64, 2, 3, grid=2)
    if change == "missing":
        del sd["decode_head.fpn_convs.1.conv.weight"]
        key = "decode_head.fpn_convs.1.conv.weight"
    elif change == "unexpected":
        sd["backbone.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 1)
        key = "relative_position_bias_table"
    else:
        sd["decode_head.lateral_convs.0.conv.weight"] = torch.zeros(64, 32, 1, 1)
        key = "decode_head.lateral_convs.0.conv.weight"
    path = save_release(tmp_path / "broken.pth", sd)
    with pytest.raises(CheckpointError, match=key) as info:
        load_segmentor(path)
    assert "broken.pth" in str(info.value)


def test_files_that_are_not_segmentors_are_refused(tmp_path):
    backbone = create_model("vit_tiny_patch16", depth=1, embed_dim=64, num_heads=1)
    save_checkpoint(backbone, tmp_path / "backbone.safetensors")
    with pytest.raises(CheckpointError, match="not a segmentor"):
        load_segmentor(tmp_path / "backbone.safetensors")
    torch.save({"model": backbone.state_dict()}, tmp_path / "backbone.pth")
    with pytest.raises(CheckpointError, match="not a segmentation checkpoint"):
        load_segmentor(tmp_path / "backbone.pth")
    with pytest.raises(CheckpointError, match="no such"):
        load_segmentor(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------- modules
def test_llfpn_strides_and_widths():
    neck = build_neck("llfpn", 48).eval()
    x = torch.randn(2, 48, 6, 10)
    maps = neck([x])
    assert [tuple(m.shape) for m in maps] == [(2, 48, 24, 40), (2, 48, 12, 20), (2, 48, 6, 10), (2, 48, 3, 5)]
    assert torch.equal(maps[2], x)
    assert sorted(k for k in neck.state_dict() if k.endswith("weight")) == \
        ["fpn1.0.weight", "fpn1.1.weight", "fpn1.3.weight", "fpn2.0.weight"]


def test_fpn_level_i_reads_map_i():
    neck = build_neck("fpn", 8).eval()
    maps = [torch.randn(1, 8, 4, 4) for _ in range(4)]
    out = neck(maps)
    assert torch.equal(out[2], maps[2]) and torch.equal(out[3], F.max_pool2d(maps[3], 2))
    with torch.no_grad():
        assert torch.equal(out[1], neck.fpn2(maps[1]))
    with pytest.raises(ValueError, match="reads 4"):
        neck(maps[:1])


def _tiny_config(**changes):
    config = {"backbone": dict(img_size=64, embed_dim=64, depth=4, num_heads=2, layer_scale=1.0),
              "feature_layers": [4], "neck": "llfpn",
              "decode_head": {"type": "upernet", "channels": 32, "pool_scales": [1, 2, 3, 6], "dropout": 0.1},
              "auxiliary_head": {"type": "fcn", "channels": 16, "in_index": 2, "dropout": 0.1, "loss_weight": 0.4},
              "num_classes": 3}
    config.update(changes)
    return config


def test_segmentor_contract_in_train_and_eval_mode():
    torch.manual_seed(0)
    segmentor = Segmentor(_tiny_config())
    x = torch.randn(2, 3, 64, 96)
    segmentor.train()
    outputs = segmentor(x)
    assert sorted(outputs) == ["aux", "decode"]
    assert outputs["decode"].shape == (2, 3, 16, 24) and outputs["aux"].shape == (2, 3, 4, 6)
    assert segmentor.loss_weights == {"decode": 1.0, "aux": 0.4}
    segmentor.eval()
    assert segmentor(x).shape == (2, 3, 16, 24) and segmentor.output_stride == 4
    assert [m.shape[-2:] for m in segmentor.pyramid(x)] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert segmentor.no_weight_decay() == {"backbone.pos_embed", "backbone.cls_token", "backbone.reg_token"}
    # every trainable parameter gets a gradient from the training outputs (DDP needs no unused-parameter search)
    segmentor.train()
    outputs = segmentor(x)
    (outputs["decode"].sum() + outputs["aux"].sum()).backward()
    trainable = [n for n, p in segmentor.named_parameters() if p.requires_grad]
    assert "backbone.norm.weight" not in trainable and "backbone.blocks.3.ls2.gamma" in trainable
    assert [n for n, p in segmentor.named_parameters() if p.requires_grad and p.grad is None] == []


def test_uperhead_with_other_widths_matches_reference():
    """UperNet channels ≠ backbone width, FPN neck over four blocks: still the release's formulas."""
    torch.manual_seed(0)
    segmentor = Segmentor(_tiny_config(feature_layers=[1, 2, 3, 4], neck="fpn")).eval()
    for module in segmentor.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    sd = {("backbone." + k[5:] if k.startswith("neck.") else k): v for k, v in segmentor.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = segmentor.pyramid(x)
        blocks = segmentor.backbone.forward_intermediates(x, [0, 1, 2, 3])
        expected = ref_llfpn(sd, blocks[0])[:1] + ref_llfpn(sd, blocks[1])[1:2]
        expected += [blocks[2], F.max_pool2d(blocks[3], 2)]
        for mine, theirs in zip(maps, expected):
            torch.testing.assert_close(mine, theirs)
        torch.testing.assert_close(segmentor(x), ref_upernet(sd, maps), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(segmentor.auxiliary_head(maps), ref_fcn(sd, maps), atol=1e-5, rtol=1e-4)


def test_inconsistent_configs_raise_config_error():
    with pytest.raises(ConfigError, match="reads 1 block"):
        Segmentor(_tiny_config(feature_layers=[2, 4]))
    with pytest.raises(ConfigError, match=r"upernet.*it reads a neck.s pyramid; add one \(llfpn, fpn\)"):
        Segmentor(_tiny_config(neck=None, auxiliary_head=None))
    with pytest.raises(ConfigError, match="out of range"):
        Segmentor(_tiny_config(feature_layers=[5]))
    with pytest.raises(ConfigError, match="unknown neck"):
        Segmentor(_tiny_config(neck="bifpn"))


# ----------------------------------------------------------------------------------------------- building
def _pretrained_file(tmp_path, last_heads=4):
    torch.manual_seed(1)
    model = create_model("unip_vit_tiny_patch16", embed_dim=64, depth=4, num_heads=2, last_heads=last_heads,
                         img_size=64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    return model, save_checkpoint(model, tmp_path / "student.safetensors", {"teacher": "mae-l"})


def test_fine_tuning_backbone_follows_the_recipe(tmp_path):
    source, path = _pretrained_file(tmp_path)
    segmentor = build_segmentor(4, str(path), img_size=128)
    backbone = segmentor.backbone
    assert segmentor.training and backbone.heads_per_block == [2, 2, 2, 4]  # pre-trained count kept
    # trainable position table, resampled once (plain bicubic, as MAE/BEiT's interpolate_pos_embed) to 8x8
    table = source.pos_embed.detach()
    grid = table[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert backbone.pos_embed.requires_grad and backbone.pos_embed.shape == (1, 65, 64)
    torch.testing.assert_close(backbone.pos_embed.detach()[:, 1:], expected.reshape(1, 64, 64))
    assert torch.equal(backbone.pos_embed.detach()[:, :1], table[:, :1])
    # layer scale created at 1.0 and trainable in every block; drop path 0.1 on the last block
    gammas = [p for n, p in backbone.named_parameters() if n.endswith("gamma")]
    assert len(gammas) == 8 and all(g.requires_grad and torch.all(g == 1.0) for g in gammas)
    assert backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    # every pre-trained weight carried over
    theirs = source.state_dict()
    for key, value in backbone.state_dict().items():
        if key != "pos_embed" and "gamma" not in key:
            assert torch.equal(value, theirs[key]), key
    assert segmentor.config["feature_layers"] == [4] and segmentor.config["neck"] == "llfpn"
    assert segmentor.config["decode_head"]["channels"] == 64
    assert segmentor.meta["pretrained"] == str(path) and segmentor.meta["crop_size"] == 128
    assert segmentor.meta["stride"] == 85
    assert default_drop_path({"embed_dim": 1024}) == 0.2 and default_drop_path({"embed_dim": 768}) == 0.1


@pytest.mark.parametrize("choice, heads", [(None, 4), ("pretrained", 4), ("default", 2), (8, 8), ("16", 16)])
def test_last_block_heads_options(tmp_path, choice, heads):
    _, path = _pretrained_file(tmp_path)
    segmentor = build_segmentor(3, str(path), img_size=32, last_block_heads=choice)
    assert segmentor.backbone.heads_per_block == [2, 2, 2, heads]


def test_bad_last_block_heads_and_names_raise(tmp_path):
    _, path = _pretrained_file(tmp_path)
    with pytest.raises(ConfigError, match="does not divide"):
        build_segmentor(3, str(path), img_size=32, last_block_heads=5)
    with pytest.raises(ConfigError, match="last_block_heads"):
        build_segmentor(3, str(path), img_size=32, last_block_heads="teacher")
    with pytest.raises(ConfigError, match="unknown head"):
        build_segmentor(3, str(path), head="segformer")
    with pytest.raises(CheckpointError, match="no such"):
        build_segmentor(3, str(tmp_path / "nope.pth"))


def test_release_pretrained_checkpoint_keeps_its_last_heads(tmp_path):
    torch.manual_seed(0)
    student = create_model("unip_vit_tiny_patch16", last_heads=16, depth=12)
    args = argparse.Namespace(model="unip_vit_tiny_patch16", last_heads=16, teacher_model="vit_large_patch16",
                              intermediate=18)
    torch.save({"model": student.state_dict(), "epoch": 99, "args": args}, tmp_path / "unip_tiny.pth")
    segmentor = build_segmentor(21, str(tmp_path / "unip_tiny.pth"), img_size=64)
    assert segmentor.backbone.heads_per_block == [3] * 11 + [16]
    assert segmentor.meta["pretrained_meta"]["last_heads"] == 16
    release_like = build_segmentor(21, str(tmp_path / "unip_tiny.pth"), img_size=64, last_block_heads="default")
    assert release_like.backbone.heads_per_block == [3] * 12


def test_linear_probe_freezes_the_backbone_and_is_one_conv(tmp_path):
    _, path = _pretrained_file(tmp_path)
    segmentor = build_segmentor(5, str(path), head="linear", img_size=64)
    assert segmentor.config["feature_layers"] == [1, 2, 3, 4] and segmentor.auxiliary_head is None
    assert all(not p.requires_grad for p in segmentor.backbone.parameters())
    assert [n for n, p in segmentor.named_parameters() if p.requires_grad] == \
        ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
    assert segmentor.decode_head.conv_seg.weight.shape == (5, 256, 1, 1)
    assert "blocks.0.ls1.gamma" not in segmentor.backbone.state_dict()  # no layer scale added for probing
    segmentor.train()
    assert not any(m.training for m in segmentor.backbone.modules()) and segmentor.decode_head.training
    x = torch.randn(2, 3, 64, 48)
    outputs = segmentor(x)
    assert sorted(outputs) == ["decode"] and outputs["decode"].shape == (2, 5, 4, 3)
    with torch.no_grad():
        blocks = segmentor.backbone.forward_intermediates(x, [0, 1, 2, 3])
        expected = F.conv2d(torch.cat(blocks, 1), segmentor.decode_head.conv_seg.weight,
                            segmentor.decode_head.conv_seg.bias)
    torch.testing.assert_close(outputs["decode"], expected)
    assert segmentor.eval().output_stride == 16

    layerwise = build_segmentor(5, str(path), head="linear", probe_layers=[2], img_size=64)
    assert layerwise.decode_head.conv_seg.weight.shape == (5, 64, 1, 1)
    with torch.no_grad():
        blocks = layerwise.backbone.forward_intermediates(x, [1])
        expected = F.conv2d(blocks[0], layerwise.decode_head.conv_seg.weight, layerwise.decode_head.conv_seg.bias)
        torch.testing.assert_close(layerwise.eval()(x), expected)


def test_random_preset_backbone_and_fpn_neck():
    segmentor = build_segmentor(2, "unip_vit_tiny_patch16", neck="fpn", img_size=64)
    assert segmentor.config["feature_layers"] == [4, 6, 8, 12]
    assert segmentor.meta["pretrained"] is None and segmentor.backbone.pos_embed.requires_grad
    assert segmentor.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2, 16, 16)


def test_save_and_load_give_identical_logits(tmp_path):
    _, path = _pretrained_file(tmp_path)
    segmentor = build_segmentor(3, str(path), img_size=64, meta={"class_names": ["a", "b", "c"]})
    for module in segmentor.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
    saved = save_segmentor(segmentor, tmp_path / "seg.safetensors", {"best_mIoU": 12.5})
    loaded = load_segmentor(saved)
    assert loaded.config == segmentor.config
    assert loaded.meta["class_names"] == ["a", "b", "c"] and loaded.meta["best_mIoU"] == 12.5
    assert loaded.backbone.heads_per_block == [2, 2, 2, 4]
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(loaded(x), segmentor.eval()(x))
    with pytest.raises(CheckpointError, match="safetensors"):
        save_segmentor(segmentor, tmp_path / "seg.pth")

    with safe_open(str(saved), framework="pt") as handle:
        header = handle.metadata()
    tensors = load_file(str(saved))
    del tensors["decode_head.bottleneck.bn.running_var"]
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=header)
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*missing decode_head\.bottleneck\.bn\.running_var"):
        load_segmentor(tmp_path / "cut.safetensors")


def test_segmentor_backbone_is_a_vision_transformer():
    segmentor = Segmentor(_tiny_config())
    assert isinstance(segmentor.backbone, VisionTransformer)
    assert segmentor.backbone.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 17, 64)
