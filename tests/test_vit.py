"""The ViT backbone against timm's VisionTransformer and against plain reference computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT

from unip.models import VisionTransformer, create_model, list_models
from unip.models.pos_embed import sincos_pos_embed_2d
from unip.models.vit import PatchEmbed

CONFIGS = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
}


def _timm_pair(size, **extra):
    torch.manual_seed(0)
    reference = TimmViT(img_size=224, patch_size=16, num_classes=0, **CONFIGS[size], **extra).eval()
    ours = VisionTransformer(img_size=224, patch_size=16, **CONFIGS[size]).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def _timm_block_outputs_and_attention(reference, image):
    """Per-block outputs and post-softmax maps of timm's model, captured with hooks (unfused path)."""
    outputs, maps = [], []
    handles = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in reference.blocks]
    handles += [b.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o)) for b in reference.blocks]
    for block in reference.blocks:
        block.attn.fused_attn = False  # timm's explicit path runs attn_drop on the softmax map
    try:
        with torch.no_grad():
            final = reference.forward_features(image)
    finally:
        for handle in handles:
            handle.remove()
    return final, outputs, maps


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_features_and_attention_match_timm(size):
    reference, ours = _timm_pair(size)
    image = torch.randn(2, 3, 224, 224)
    final, block_outputs, timm_maps = _timm_block_outputs_and_attention(reference, image)
    with torch.no_grad():
        assert (ours(image) - final).abs().max() <= 1e-4
        indices = [2, 5, 11]
        for index, fmap in zip(indices, ours.forward_intermediates(image, indices)):
            expected = block_outputs[index][:, 1:].transpose(1, 2).reshape(2, -1, 14, 14)
            assert fmap.shape == (2, CONFIGS[size]["embed_dim"], 14, 14)
            assert (fmap - expected).abs().max() <= 1e-4
        maps = ours.attention_maps(image)
    assert sorted(maps) == list(range(1, 13))
    for layer, attention in maps.items():
        assert attention.shape == (2, CONFIGS[size]["num_heads"], 197, 197)
        assert (attention - timm_maps[layer - 1]).abs().max() <= 1e-4


def test_other_input_size_matches_timm_dynamic_size():
    reference, ours = _timm_pair("tiny", dynamic_img_size=True)
    image = torch.randn(1, 3, 320, 256)
    with torch.no_grad():
        assert (ours(image) - reference.forward_features(image)).abs().max() <= 1e-4
        assert ours.forward_intermediates(image, [11])[0].shape == (1, 192, 20, 16)


def _reference_logits(model, image, layer):
    """q·kᵀ/sqrt(d) of block ``layer`` written out from the weights, independent of the taps."""
    tokens = model.patch_embed.proj(image).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(len(image), -1, -1), tokens], 1) + model.pos_embed
    for block in model.blocks[: layer - 1]:
        tokens, _ = block(tokens)
    block = model.blocks[layer - 1]
    x = torch.nn.functional.layer_norm(tokens, (model.embed_dim,), block.norm1.weight, block.norm1.bias, 1e-6)
    qkv = x @ block.attn.qkv.weight.T + block.attn.qkv.bias
    heads = block.attn.num_heads
    head_dim = model.embed_dim // heads
    q, k, _ = qkv.reshape(len(image), -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    return q @ k.transpose(-1, -2) / math.sqrt(head_dim)


def test_attention_logits_match_reference_and_stop_at_the_layer():
    torch.manual_seed(0)
    model = create_model("unip_vit_small_patch16", last_heads=16, depth=6).eval()
    image = torch.randn(2, 3, 224, 224)
    called = []
    for index, block in enumerate(model.blocks, start=1):
        block.register_forward_hook(lambda m, i, o, index=index: called.append(f"block{index}"))
    target = model.blocks[3]
    target.attn.proj.register_forward_hook(lambda *a: called.append("proj"))
    target.mlp.register_forward_hook(lambda *a: called.append("mlp"))
    with torch.no_grad():
        logits = model.attention_logits(image, layer=4)
    assert called == ["block1", "block2", "block3"]
    with torch.no_grad():
        expected = _reference_logits(model, image, 4)
        assert logits.shape == (2, 6, 197, 197)
        assert (logits - expected).abs().max() <= 1e-4
        last = model.attention_logits(image, layer=6)
        assert last.shape == (2, 16, 197, 197)
        assert (last - _reference_logits(model, image, 6)).abs().max() <= 1e-4
        # softmax of the logits is the map the block uses
        assert (last.softmax(-1) - model.attention_maps(image, [6])[6]).abs().max() <= 1e-5


def test_fused_and_materialised_attention_agree():
    torch.manual_seed(0)
    block = create_model("vit_tiny_patch16", depth=1).blocks[0]
    tokens = torch.randn(2, 197, 192)
    fused, none = block(tokens)
    explicit, attention = block(tokens, return_attention=True)
    assert none is None and attention.shape == (2, 3, 197, 197)
    assert (fused - explicit).abs().max() <= 1e-5


def test_last_heads_changes_head_count_but_not_weight_shapes():
    model = create_model("unip_vit_small_patch16", last_heads=16)
    assert model.heads_per_block == [6] * 11 + [16]
    assert model.blocks[-1].attn.qkv.weight.shape == (1152, 384)
    assert model.blocks[-1].attn.head_dim == 24


def _mae_sincos_reference(dim, side):
    """The MAE release's recipe, written independently with numpy (x channels first, then y)."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    xs, ys = np.meshgrid(np.arange(side), np.arange(side))
    return np.concatenate([one_axis(dim // 2, xs), one_axis(dim // 2, ys)], axis=1)


def test_student_uses_fixed_sincos_table_with_zero_cls_row():
    model = create_model("unip_vit_small_patch16")
    table = model.pos_embed.detach()[0]
    assert not model.pos_embed.requires_grad
    assert torch.all(table[0] == 0)
    np.testing.assert_allclose(table[1:].numpy(), _mae_sincos_reference(384, 14), atol=1e-6)
    assert torch.equal(sincos_pos_embed_2d(384, (14, 14)), table[1:])


def test_presets_build_and_run():
    assert {"unip_vit_tiny_patch16", "vit_large_patch16", "vit_huge_patch14"} <= set(list_models())
    model = create_model("vit_small_patch14", depth=2).eval()
    with torch.no_grad():
        assert model.attention_logits(torch.randn(1, 3, 224, 224), 2).shape == (1, 6, 257, 257)
    assert create_model("vit_large_patch16").config["depth"] == 24


def test_layer_scale_registers_and_drop_path_is_train_only():
    model = create_model("vit_tiny_patch16", depth=2, layer_scale=1e-5, drop_path_rate=0.5)
    assert "blocks.0.ls1.gamma" in model.state_dict()
    image = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(image), model(image))
    model.train()
    torch.manual_seed(1)
    first = model(image)
    torch.manual_seed(2)
    assert not torch.equal(first, model(image))


def test_bad_sizes_and_layers_raise():
    model = create_model("vit_tiny_patch16", depth=2)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match="layers 1..2"):
        model.attention_logits(torch.randn(1, 3, 32, 32), 3)


def test_register_tokens_follow_timm_layout():
    torch.manual_seed(0)
    reference = TimmViT(img_size=64, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=0,
                        reg_tokens=4, no_embed_class=True, init_values=1e-5).eval()
    ours = VisionTransformer(img_size=64, patch_size=16, embed_dim=192, depth=2, num_heads=3,
                             num_reg_tokens=4, no_embed_class=True, layer_scale=1e-5).eval()
    ours.load_state_dict(reference.state_dict())
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(image) - reference.forward_features(image)).abs().max() <= 1e-4
        assert ours.forward_intermediates(image, 1)[0].shape == (1, 192, 4, 4)
        expected = reference.forward_intermediates(image, [0, 1], norm=True, intermediates_only=True)
        for mine, theirs in zip(ours.forward_intermediates(image, [0, 1], norm=True), expected):
            assert (mine - theirs).abs().max() <= 1e-4


@pytest.mark.skipif(not hasattr(TimmViT, "forward_intermediates"), reason="timm without forward_intermediates")
@pytest.mark.parametrize("kwargs", [
    dict(indices=None), dict(indices=2), dict(indices=[0, -1]), dict(indices=[3, 1, 1], norm=True),
    dict(indices=[1], output_fmt="NLC"), dict(indices=[2], intermediates_only=False),
    dict(indices=[0, 2], intermediates_only=False, stop_early=True, norm=True),
    dict(indices=[1, 3], return_prefix_tokens=True),
    dict(indices=[1], output_dict=True, return_prefix_tokens=True, intermediates_only=False),
])
def test_feature_api_equals_timm(kwargs):
    torch.manual_seed(0)
    reference = TimmViT(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2, num_classes=0,
                        dynamic_img_size=True).eval()
    ours = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    image = torch.randn(2, 3, 64, 48)
    kwargs = dict(kwargs)
    kwargs.setdefault("intermediates_only", True)
    with torch.no_grad():
        mine, theirs = ours.forward_intermediates(image, **kwargs), reference.forward_intermediates(image, **kwargs)
        assert (ours.forward_features(image) - reference.forward_features(image)).abs().max() <= 1e-5

    def flat(value):
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, dict):
            assert sorted(value) == sorted(theirs)
            return [t for key in sorted(value) for t in flat(value[key])]
        return [t for item in value for t in flat(item)]

    mine, theirs_flat = flat(mine), flat(theirs)
    assert len(mine) == len(theirs_flat) > 0
    for a, b in zip(mine, theirs_flat):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5


def test_intermediates_stop_after_deepest_block_and_reject_bad_indices():
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=4, num_heads=2).eval()
    called = []
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, i, o, index=index: called.append(index))
    maps = model.forward_intermediates(torch.randn(1, 3, 32, 32), [1, 0])
    assert called == [0, 1] and [m.shape for m in maps] == [(1, 64, 2, 2)] * 2
    for bad in ([4], [-5], 0, 5, []):
        with pytest.raises(ValueError, match="out of range"):
            model.forward_intermediates(torch.randn(1, 3, 32, 32), bad)


def test_drop_path_rate_and_scale_under_bf16_autocast_are_the_fp32_ones():
    """The mask is drawn from the fp32 keep probability whatever the activations' dtype: the same draws, the rate
    asked for (not bf16's 0.8984 for 0.9), and the fp32 scale to bf16's precision."""
    from unip.models.vit import DropPath

    layer = DropPath(0.1).train()
    x = torch.ones(200_000, 1, 1)
    torch.manual_seed(3)
    full = layer(x)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = layer(x.bfloat16())
    assert half.dtype == torch.bfloat16
    assert torch.equal(full == 0, half == 0)  # the same samples dropped
    assert (full == 0).float().mean().item() == pytest.approx(0.1, abs=0.003)
    assert torch.unique(full[full != 0]).tolist() == pytest.approx([1 / 0.9])
    assert torch.unique(half[half != 0].float()).tolist() == pytest.approx([1 / 0.9], rel=2 ** -8)


@pytest.mark.parametrize("patch, channels, size", [(16, 3, (224, 224)), (16, 1, (64, 96)), (14, 3, (28, 42))])
def test_patch_embedding_is_the_strided_convolution_with_its_gradients(patch, channels, size):
    """PatchEmbed computes its Conv2d as one matrix product over flattened patches: same tokens, grid and
    weight/bias gradients as the convolution itself (what timm and the release run)."""
    torch.manual_seed(0)
    embed = PatchEmbed(patch, channels, 32)
    images = torch.randn(2, channels, *size)
    tokens, grid = embed(images)
    expected = F.conv2d(images, embed.proj.weight, embed.proj.bias, stride=patch)
    assert grid == tuple(expected.shape[-2:])
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    target = torch.randn_like(tokens)
    weight_grad, bias_grad = torch.autograd.grad((tokens * target).sum(), [embed.proj.weight, embed.proj.bias])
    conv_grads = torch.autograd.grad((expected.flatten(2).transpose(1, 2) * target).sum(),
                                     [embed.proj.weight, embed.proj.bias])
    torch.testing.assert_close(weight_grad, conv_grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias_grad, conv_grads[1], rtol=1e-4, atol=1e-4)
