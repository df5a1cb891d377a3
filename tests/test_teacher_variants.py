"""timm's ViT variants as teachers (random weights, offline): q/k norm, SwiGLU MLPs (packed and split), the MLP's
norm and activation, registers and layer scale load from timm-saved files and from timm models, and compute timm's
own attention logits and features; a weight the model has no place for is never dropped."""

import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.layers import SwiGLU, SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer as TimmViT

from unip import cli
from unip.checkpoint import (check_architecture, config_from_timm, infer_architecture, load_model, load_weights,
                             open_model, save_checkpoint)
from unip.checkpoint.reading import CONFIG_METADATA_KEY
from unip.data.synth import write_unlabeled
from unip.deploy.timm_export import export_timm, packed_swiglu
from unip.distill import Teacher
from unip.errors import CheckpointError
from unip.models import VisionTransformer, create_model
from unip.models.vit import mlp_ratio_of

#: timm arguments of each variant (as timm's own model definitions pass them) and what unip reads off the weights.
VARIANTS = {
    "qk_norm": (dict(qk_norm=True), dict(qk_norm=True)),
    "swiglu_packed": (dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2.66667 * 2),
                      dict(mlp_layer="swiglu_packed", act_layer="silu")),
    "swiglu": (dict(mlp_layer=SwiGLU, act_layer="silu", mlp_ratio=8 / 3, scale_mlp_norm=True),
               dict(mlp_layer="swiglu", act_layer="silu", scale_mlp_norm=True)),
    "qk_norm_swiglu_registers_layer_scale": (
        dict(qk_norm=True, mlp_layer=SwiGLUPacked, act_layer="silu", reg_tokens=4, no_embed_class=True,
             init_values=1e-5),
        dict(qk_norm=True, mlp_layer="swiglu_packed", act_layer="silu", num_reg_tokens=4, no_embed_class=True)),
}
WIDTH = 192
IMAGE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def timm_vit(num_heads=3, **kwargs):
    """A ViT-T-wide timm model (4 blocks, 64 px) whose norms and layer scales are random too, so that a weight
    dropped or misplaced shows."""
    torch.manual_seed(0)
    model = TimmViT(img_size=64, patch_size=16, embed_dim=WIDTH, depth=3, num_heads=num_heads, num_classes=0,
                    **kwargs).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "gamma" in name:
                param.copy_(torch.rand_like(param) + 0.5 if name.endswith(("weight", "gamma"))
                            else torch.randn_like(param))
    return model


def timm_logits(model, image, layer):
    """timm's own pre-softmax scaled q·kᵀ of block ``layer`` (1-based): its modules' qkv, head split, q_norm/k_norm
    and scale, on the block's normed input captured from timm's forward (which stops after that block)."""
    captured = []
    block = model.blocks[layer - 1]
    handle = block.norm1.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model.forward_intermediates(image, indices=[layer - 1], intermediates_only=True)
        handle.remove()
        x = captured[0]
        attn = block.attn
        qkv = attn.qkv(x).reshape(x.shape[0], x.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        query, key, _ = qkv.unbind(0)
        query, key = attn.q_norm(query), attn.k_norm(key)
        return (query * attn.scale) @ key.transpose(-2, -1)


def assert_computes_like_timm(ours, reference):
    with torch.no_grad():
        assert (ours.forward_features(IMAGE) - reference.forward_features(IMAGE)).abs().max() <= 1e-5
        for layer in (1, 3):
            logits = ours.attention_logits(IMAGE, layer)
            expected = timm_logits(reference, IMAGE, layer)
            assert logits.shape == expected.shape
            assert (logits - expected).abs().max() <= 1e-5, layer


@pytest.mark.parametrize("variant, suffix", [("qk_norm", ".pth"), ("swiglu_packed", ".safetensors"), ("swiglu", ".pth"),
                                             ("qk_norm_swiglu_registers_layer_scale", ".safetensors")])
def test_a_timm_saved_file_builds_the_variant_and_computes_timms_logits(variant, suffix, tmp_path):
    timm_args, expected = VARIANTS[variant]
    reference = timm_vit(**timm_args)
    path = tmp_path / f"timm{suffix}"
    if suffix == ".pth":
        torch.save({"model": reference.state_dict()}, path)
    else:
        save_file(reference.state_dict(), str(path))
    loaded = open_model(path)
    assert loaded.problem is None and not loaded.report.unexpected and not loaded.report.missing
    assert {key: loaded.model.config.get(key) for key in expected} == expected
    assert_computes_like_timm(loaded.model, reference)


@pytest.mark.parametrize("variant", ["swiglu", "qk_norm_swiglu_registers_layer_scale"])
def test_a_timm_model_gives_its_config_and_weights(variant):
    reference = timm_vit(**VARIANTS[variant][0])
    ours = VisionTransformer(**config_from_timm(reference, "timm model"))
    report = load_weights(ours, reference.state_dict())
    assert report.ok and not report.unexpected
    assert_computes_like_timm(ours.eval(), reference)


def test_head_counts_come_from_the_width_of_the_q_k_norm(tmp_path):
    """Without q/k norm a 192-wide file is given ViT-T's 3 heads; the norm's width says it has 6 (32 channels)."""
    reference = timm_vit(num_heads=6, qk_norm=True)
    torch.save(reference.state_dict(), tmp_path / "six.pth")
    model = load_model(tmp_path / "six.pth")
    assert model.heads_per_block == [6] * 3
    assert_computes_like_timm(model, reference)


def test_timms_dinov2_giant_definition_loads_with_its_swiglu_packed_mlp():
    """timm's own model definition (SwiGLUPacked, SiLU, layer scale, mlp_ratio 2.66667 * 2), shrunk."""
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, num_classes=0, img_size=56,
                                  embed_dim=96, depth=2, num_heads=4).eval()
    config = config_from_timm(reference, "vit_giant_patch14_dinov2")
    assert config["mlp_layer"] == "swiglu_packed" and config["act_layer"] == "silu" and config["layer_scale"]
    ours = VisionTransformer(**config)
    load_weights(ours, reference.state_dict())
    image = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert (ours.eval()(image) - reference.forward_features(image)).abs().max() <= 1e-5


def test_a_timm_reg4_dinov2_source_reads_a_file_through_timm(tmp_path):
    """``timm:NAME@FILE`` of timm's DINOv2 ViT-S/14 with registers and layer scale, at its 518 px (one block)."""
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0).eval()
    save_file(reference.state_dict(), str(tmp_path / "reg4.safetensors"))
    loaded = open_model(f"timm:vit_small_patch14_reg4_dinov2@{tmp_path / 'reg4.safetensors'}")
    config = loaded.model.config
    assert config["num_reg_tokens"] == 4 and config["no_embed_class"] and config["layer_scale"]
    image = torch.randn(1, 3, 518, 518)
    with torch.no_grad():  # block 2's logits: block 1 with its layer scales on registers, CLS and patches
        assert (loaded.model.attention_logits(image, 2) - timm_logits(reference, image, 2)).abs().max() <= 1e-4


def test_dinov2_release_layout_registers_and_packed_swiglu_are_brought_to_timms(tmp_path):
    """The DINOv2 release names the packed SwiGLU ``mlp.w12/w3`` and keeps registers in ``register_tokens``, with
    the CLS token's position as row 0 of ``pos_embed`` (what timm's own conversion undoes)."""
    reference = timm_vit(mlp_layer=SwiGLUPacked, act_layer="silu", reg_tokens=4, no_embed_class=True,
                         init_values=1e-5)
    release = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v
               for k, v in reference.state_dict().items()}
    cls_position = torch.randn(1, 1, WIDTH)
    release["register_tokens"] = release.pop("reg_token")
    release["pos_embed"] = torch.cat([cls_position, release["pos_embed"]], 1)
    release["cls_token"] = release["cls_token"] - cls_position
    release["mask_token"] = torch.zeros(1, WIDTH)
    torch.save(release, tmp_path / "dinov2_release.pth")
    loaded = open_model(tmp_path / "dinov2_release.pth")
    assert loaded.report.ignored == ["mask_token"] and loaded.model.config["num_reg_tokens"] == 4
    with torch.no_grad():
        assert (loaded.model(IMAGE) - reference.forward_features(IMAGE)).abs().max() <= 1e-5


# ============================================================================================ never dropped
def test_q_norm_weights_never_load_silently_into_a_model_without_them(tmp_path):
    reference = timm_vit(qk_norm=True)
    path = tmp_path / "qk.pth"
    torch.save(reference.state_dict(), path)
    plain = create_model("vit_tiny_patch16", depth=3, img_size=64)
    with pytest.raises(CheckpointError, match=r"qk\.pth: does not fit the model: no place for blocks\.0\.attn\.q_norm"):
        load_weights(plain, path)
    with pytest.raises(CheckpointError, match=r"qk\.pth.*no place for blocks\.0\.attn\.q_norm\.weight"):
        load_model(f"timm:vit_tiny_patch16_224@{path}", img_size=64)
    report = load_weights(plain, path, allow_partial=True)  # what `unip info` shows before it exits 2
    assert len(report.unexpected) == 12 and not report.ok and "q_norm" in report.problem

    # a header that describes no q/k norm, over tensors that have it
    header = {"architecture": "VisionTransformer", "model": dict(plain.config)}
    save_file(reference.state_dict(), str(tmp_path / "lying.safetensors"),
              metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(header)})
    with pytest.raises(CheckpointError, match=r"lying\.safetensors: does not fit the architecture it describes: "
                                              r"no place for blocks\.0\.attn\.k_norm\.bias"):
        load_model(tmp_path / "lying.safetensors")


@pytest.mark.parametrize("key, shape", [("norm_pre.weight", (WIDTH,)), ("dist_token", (1, 1, WIDTH)),
                                        ("blocks.0.attn.relative_position_bias_table", (49, 3)),
                                        ("blocks.0.attn.norm.weight", (WIDTH,))])
def test_any_weight_outside_the_allow_list_is_refused(key, shape, tmp_path):
    state = timm_vit().state_dict()
    torch.save({**state, key: torch.ones(shape)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=rf"extra\.pth: .*no place for {key}"):
        load_model(tmp_path / "extra.pth")
    allowed = {"head.weight": torch.ones(10, WIDTH), "fc_norm.weight": torch.ones(WIDTH),
               "attn_pool.latent": torch.ones(1, 1, WIDTH), "masked_embed": torch.ones(1, WIDTH),
               "mask_token": torch.ones(1, 1, WIDTH), "decoder_pred.bias": torch.ones(4)}
    torch.save({**state, **allowed}, tmp_path / "heads.pth")
    assert sorted(open_model(tmp_path / "heads.pth").report.ignored) == sorted(allowed)


def test_cli_info_names_the_variants_and_refuses_what_does_not_fit(tmp_path, capsys):
    reference = timm_vit(qk_norm=True, mlp_layer=SwiGLU, act_layer="silu")
    torch.save(reference.state_dict(), tmp_path / "qk.pth")
    assert cli.main(["info", str(tmp_path / "qk.pth")]) == 0
    out = capsys.readouterr().out
    assert "q/k norm, SwiGLU MLP (fc1_g, fc1_x), MLP activation silu" in out
    assert f"weights:       {len(reference.state_dict())} loaded\n" in out
    assert cli.main(["info", f"timm:vit_tiny_patch16_224@{tmp_path / 'qk.pth'}"]) == 2
    out, err = capsys.readouterr()
    assert "unexpected" in out and len(err.strip().splitlines()) == 1 and "no place for" in err


# ============================================================================================ our files
def test_our_header_round_trips_the_variants_and_plain_headers_are_unchanged(tmp_path):
    model = VisionTransformer(img_size=64, embed_dim=96, depth=2, num_heads=4, qk_norm=True, mlp_layer="swiglu",
                              act_layer="gelu_tanh", scale_mlp_norm=True, last_heads=8).eval()
    loaded = open_model(save_checkpoint(model, tmp_path / "v.safetensors"))
    assert loaded.architecture_from == "unip metadata" and loaded.model.config == model.config
    assert loaded.model.heads_per_block == [4, 8]
    with torch.no_grad():
        assert torch.equal(loaded.model.attention_logits(IMAGE, 2), model.attention_logits(IMAGE, 2))
    plain = VisionTransformer(img_size=64, embed_dim=96, depth=2, num_heads=4)
    assert not {"qk_norm", "mlp_layer", "act_layer", "scale_mlp_norm"} & set(plain.config)
    assert plain.blocks[0].attn.q_norm is None and plain.blocks[0].mlp.norm is None


def test_a_plain_block_runs_no_operation_of_the_variants():
    """The variants that are off add no call: a plain block runs its two LayerNorms, a q/k-norm block four."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LayerNorms(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += "layer_norm" in str(func)
            return func(*args, **(kwargs or {}))

    tokens = torch.randn(1, 5, 96)
    for qk_norm, expected in ((False, 2), (True, 4)):
        block = VisionTransformer(embed_dim=96, depth=1, num_heads=4, qk_norm=qk_norm).blocks[0]
        with torch.no_grad(), LayerNorms() as calls:
            block(tokens)
        assert calls.count == expected


def test_implausible_variant_settings_are_refused():
    with pytest.raises(CheckpointError, match="mlp_layer must be one of"):
        check_architecture({"mlp_layer": "moe"}, "x")
    with pytest.raises(CheckpointError, match="odd fc1 width 7"):
        check_architecture({"embed_dim": 4, "num_heads": 1, "mlp_ratio": 1.75, "mlp_layer": "swiglu_packed"}, "x")


def test_mlp_ratio_of_gives_the_width_back_where_floating_point_rounds_below():
    assert int(11 * (15 / 11)) == 14  # why: the plain ratio loses a channel
    for hidden, width in ((15, 11), (1024, 384), (4304, 1152), (8192, 1536)):
        assert int(width * mlp_ratio_of(hidden, width)) == hidden
    state = VisionTransformer(img_size=32, embed_dim=11, num_heads=1, depth=1, mlp_ratio=mlp_ratio_of(15, 11))
    assert infer_architecture(state.state_dict())["mlp_ratio"] == mlp_ratio_of(15, 11)


# ============================================================================================ as teachers
def test_the_teacher_keeps_gated_and_silu_mlps_under_the_tanh_gelu():
    model = VisionTransformer(img_size=64, embed_dim=96, depth=3, num_heads=4, qk_norm=True,
                              mlp_layer="swiglu_packed", act_layer="silu").eval()
    plain_silu = VisionTransformer(img_size=64, embed_dim=96, depth=3, num_heads=4, act_layer="silu").eval()
    for vit in (model, plain_silu):
        with torch.no_grad():
            expected = vit.attention_logits(IMAGE, 3)
        teacher = Teacher(vit, layer=3, student_patch=16).set_gelu("tanh")
        assert torch.equal(teacher(IMAGE), expected)


def test_a_q_k_norm_swiglu_timm_file_teaches_a_student(tmp_path, capsys):
    torch.manual_seed(0)
    reference = TimmViT(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=0, qk_norm=True,
                        mlp_layer=SwiGLUPacked, act_layer="silu").eval()
    torch.save(reference.state_dict(), tmp_path / "teacher.pth")
    write_unlabeled(str(tmp_path / "images"), 8, size=(80, 64), seed=0)
    code = cli.main(["pretrain", "toy", "--teacher", str(tmp_path / "teacher.pth"), "--data", str(tmp_path / "images"),
                     "--out", str(tmp_path / "run"), "--device", "cpu", "--teacher-layer", "2", "--set",
                     "student.depth=2", "--set", "student.embed_dim=64", "--set", "student.num_heads=2", "--set",
                     "run.progress=false", "--set", "optim.epochs=2", "--set", "optim.warmup_epochs=0.5"])
    assert code == 0, capsys.readouterr().err
    student = open_model(tmp_path / "run" / "student.safetensors")
    assert student.model.heads_per_block == [2, 4] and student.meta["teacher_layer"] == 2
    assert all(math.isfinite(json.loads(line).get("loss", 0.0))
               for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines())


# ============================================================================================ export
def test_export_writes_q_k_norm_and_swiglu_backbones_that_timm_loads(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, embed_dim=96, depth=2, num_heads=4, qk_norm=True, mlp_layer="swiglu",
                              act_layer="silu", mlp_ratio=8 / 3).eval()
    with torch.no_grad():
        packed = packed_swiglu(model)
        assert packed.config["mlp_layer"] == "swiglu_packed"
        assert (packed(IMAGE) - model(IMAGE)).abs().max() <= 1e-6
    result = export_timm(str(save_checkpoint(model, tmp_path / "v.safetensors")), str(tmp_path / "out"))
    assert result.architecture == "vit_giant_patch14_dinov2" and result.model_args["qk_norm"]
    assert result.model_args["act_layer"] == "silu" and result.model_args["init_values"] == 0.0
    assert set(result.differences) >= {"pretrained_cfg_overlay"} and max(result.differences.values()) <= 1e-4
    assert "SwiGLUPacked" in result.notes[0]
    back = load_model(tmp_path / "out" / "model.safetensors")  # and unip reads the export back
    with torch.no_grad():
        assert (back(IMAGE) - model(IMAGE)).abs().max() <= 1e-5
