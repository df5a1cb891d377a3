"""Loading random-weight files written in each real release layout, safely, with reports."""

import argparse
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT

from unip.checkpoint import load_model, load_weights, open_model, read_checkpoint, save_checkpoint
from unip.checkpoint_kinds import describe_checkpoint
from unip.cli import main
from unip.errors import CheckpointError
from unip.models import create_model

IMAGE = torch.randn(1, 3, 64, 64)


def _tiny(**overrides):
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16", depth=2, img_size=64, **overrides).eval()


def _same_outputs(a, b):
    with torch.no_grad():
        return torch.equal(a(IMAGE), b(IMAGE))


def _fresh(**overrides):
    torch.manual_seed(123)  # different random init than _tiny()
    return create_model("vit_tiny_patch16", depth=2, img_size=64, **overrides).eval()


def test_mae_layout_drops_decoder_and_mask_token(tmp_path):
    source = _tiny()
    extra = {"mask_token": torch.zeros(1, 1, 128), "decoder_embed.weight": torch.zeros(128, 192),
             "decoder_blocks.0.attn.qkv.weight": torch.zeros(384, 128), "decoder_pred.bias": torch.zeros(768)}
    torch.save({"model": {**source.state_dict(), **extra}}, tmp_path / "mae.pth")
    target = _fresh()
    report = load_weights(target, tmp_path / "mae.pth")
    assert _same_outputs(source, target)
    assert set(report.ignored) == set(extra) and not report.missing and not report.unexpected


@pytest.mark.parametrize("zip_format", [True, False])
def test_pytorch_files_are_mapped_not_read_where_the_format_allows(tmp_path, zip_format):
    """torch.save's zip format is memory-mapped: a state's optimizer moments or a release's decoder are never
    read into memory; legacy (pre-1.6) files have no such layout and are read as before."""
    source = _tiny()
    path = tmp_path / "state.pth"
    torch.save({"model": source.state_dict(), "optimizer": {"exp_avg": torch.zeros(1000, 1000)}}, path,
               _use_new_zipfile_serialization=zip_format)
    content, _ = read_checkpoint(path)
    if os.path.exists("/proc/self/maps"):  # Linux: a mapped file is listed among the process's mappings
        with open("/proc/self/maps", encoding="utf-8") as maps:
            assert (str(path) in maps.read()) == zip_format
    target = _fresh()
    load_weights(target, path)
    assert _same_outputs(source, target)


def test_dino_raw_and_full_layouts_use_the_teacher(tmp_path):
    teacher, student = _tiny(), _fresh()
    torch.save(teacher.state_dict(), tmp_path / "dino_raw.pth")
    full = {"teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                        "head.mlp.0.weight": torch.zeros(8, 192)},
            "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
            "args": argparse.Namespace(arch="vit_tiny", patch_size=16, lr=0.0005)}
    torch.save(full, tmp_path / "dino_full.pth")
    for name in ("dino_raw.pth", "dino_full.pth"):
        target = _fresh()
        load_weights(target, tmp_path / name)
        assert _same_outputs(teacher, target), name


def test_deit_and_deit3_layouts(tmp_path):
    source = _tiny()
    torch.save({"model": {**source.state_dict(), "head.weight": torch.zeros(1000, 192),
                          "head.bias": torch.zeros(1000)}}, tmp_path / "deit.pth")
    target = _fresh()
    assert load_weights(target, tmp_path / "deit.pth").ignored == ["head.weight", "head.bias"]
    assert _same_outputs(source, target)

    scaled = _tiny(layer_scale=0.1)
    with torch.no_grad():
        for block in scaled.blocks:
            block.ls1.gamma.uniform_(0.5, 1.5)
            block.ls2.gamma.uniform_(0.5, 1.5)
    deit3 = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v
             for k, v in scaled.state_dict().items()}
    assert "blocks.0.gamma_1" in deit3
    torch.save({"model": deit3}, tmp_path / "deit3.pth")
    target = _fresh(layer_scale=1e-5)
    load_weights(target, tmp_path / "deit3.pth")
    assert _same_outputs(scaled, target)


def test_beit_split_qkv_bias_is_fused(tmp_path):
    source = _tiny()
    state = source.state_dict()
    for i in range(2):
        bias = state.pop(f"blocks.{i}.attn.qkv.bias")
        with torch.no_grad():
            bias[192:384] = 0  # BEiT has no key bias
        state[f"blocks.{i}.attn.q_bias"], state[f"blocks.{i}.attn.v_bias"] = bias[:192], bias[384:]
        source.blocks[i].attn.qkv.bias.data[192:384] = 0
    target = _fresh()
    load_weights(target, state)
    assert _same_outputs(source, target)


def test_timm_weights_by_name_and_through_timm(tmp_path):
    torch.manual_seed(0)
    reference = TimmViT(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=0).eval()
    save_file(reference.state_dict(), str(tmp_path / "timm.safetensors"))
    # a release-style file ({"model": ...} with MAE decoder keys) loads through the same path
    torch.save({"model": {**reference.state_dict(), "decoder_pred.weight": torch.zeros(4, 4)}}, tmp_path / "r.pth")
    image = torch.randn(1, 3, 224, 224)
    model = load_model(f"timm:vit_tiny_patch16_224@{tmp_path / 'timm.safetensors'}")
    from_release = load_model(f"timm:vit_tiny_patch16_224@{tmp_path / 'r.pth'}")
    ours = create_model("vit_tiny_patch16").eval()
    load_weights(ours, tmp_path / "timm.safetensors")
    with torch.no_grad():
        expected = reference.forward_features(image)
        assert (model(image) - expected).abs().max() <= 1e-4
        assert (from_release(image) - expected).abs().max() <= 1e-4
        assert (ours(image) - expected).abs().max() <= 1e-4


def _release_checkpoint(path):
    torch.manual_seed(0)
    student = create_model("unip_vit_small_patch16", last_heads=16).eval()
    args = argparse.Namespace(model="unip_vit_small_patch16", last_heads=16, intermediate=18,
                              teacher_model="mae_vit_large_patch16", batch_size=256, blr=1.5e-4,
                              input_size=224, output_dir="./output")
    torch.save({"model": student.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                "epoch": 99, "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args}, path)
    return student


def test_unip_release_checkpoint_rebuilds_last_heads_from_args(tmp_path):
    student = _release_checkpoint(tmp_path / "unip_release.pth")
    loaded = open_model(tmp_path / "unip_release.pth")
    assert loaded.model.heads_per_block == [6] * 11 + [16]
    assert "release args" in loaded.architecture_from
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.model.attention_logits(image, 12), student.attention_logits(image, 12))


def test_our_safetensors_round_trip_is_self_describing(tmp_path):
    model = create_model("unip_vit_tiny_patch16", last_heads=12, depth=3, img_size=64).eval()
    path = save_checkpoint(model, tmp_path / "student.safetensors", {"teacher": "mae-l", "teacher_layer": 18})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    loaded = open_model(path)
    assert loaded.model.heads_per_block == [3, 3, 12]
    assert loaded.meta["teacher_layer"] == 18 and loaded.meta["normalization"]["mean"][0] == 0.3801
    assert _same_outputs(model, loaded.model)
    text = describe_checkpoint(path)
    assert "heads 3 (last block: 12)" in text and "unip metadata" in text


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = _tiny()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError):
        save_checkpoint(_fresh(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_missing_block_is_refused_with_the_key_named(tmp_path):
    state = {k: v for k, v in _tiny().state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"missing blocks\.1\.") as info:
        load_weights(_fresh(), tmp_path / "short.pth")
    assert "short.pth" in str(info.value)
    report = load_weights(_fresh(), tmp_path / "short.pth", allow_partial=True)
    assert "blocks.1.attn.qkv.weight" in report.missing and "blocks.0.attn.qkv.weight" in report.loaded


def test_misshaped_weight_is_refused(tmp_path):
    state = _tiny().state_dict()
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 192)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight \(10, 192\) vs \(768, 192\)"):
        load_weights(_fresh(), state)


def test_position_table_is_resampled_to_another_grid(tmp_path):
    source = create_model("vit_tiny_patch16", depth=2).eval()  # 224 px: 14x14 grid
    torch.save({"model": source.state_dict()}, tmp_path / "w.pth")
    target = create_model("vit_tiny_patch16", depth=2, img_size=512).eval()
    report = load_weights(target, tmp_path / "w.pth")
    assert report.reshaped == ["pos_embed"] and target.pos_embed.shape == (1, 1 + 32 * 32, 192)
    image = torch.randn(1, 3, 512, 512)
    with torch.no_grad():  # the model resamples at run time exactly as the loader did
        assert (source(image) - target(image)).abs().max() <= 1e-4


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"model": _RunsCode(marker)}, handle)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_checkpoint(tmp_path / "evil.pth")
    assert main(["info", str(tmp_path / "evil.pth")]) == 2
    assert main(["info", f"timm:vit_tiny_patch16_224@{tmp_path / 'evil.pth'}"]) == 2
    assert not marker.exists()


def test_a_file_of_another_kind_is_not_taken_for_an_unsafe_pickle(tmp_path):
    """An image or a manifest passed as a checkpoint is named as not a checkpoint, without the advice to re-save a
    pickle that needs objects outside the allow-list (which is for real, unsafe pickles: test above)."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "frame.jpg")
    (tmp_path / "m.jsonl").write_text('{"path": "a.png"}\n')
    for name in ("frame.jpg", "m.jsonl"):
        with pytest.raises(CheckpointError, match=f"{name}: not a checkpoint") as raised:
            read_checkpoint(tmp_path / name)
        assert "trust" not in str(raised.value)


def test_unreadable_files_give_clear_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    for name in ("junk.pth", "junk.safetensors", "absent.pth"):
        with pytest.raises(CheckpointError, match=name):
            load_model(tmp_path / name)
    (tmp_path / "best.json").write_text('{"step": 60, "mIoU": 30.6}')  # the file beside best.safetensors
    for name in ("junk.pth", "best.json"):  # neither zip nor pickle: said so, not taken for unsafe code
        with pytest.raises(CheckpointError, match=r"not a checkpoint: neither") as caught:
            load_model(tmp_path / name)
        assert "run code" not in str(caught.value)
    torch.save({"epoch": 3}, tmp_path / "nostate.pth")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_model(tmp_path / "nostate.pth")


def test_unip_info_on_every_layout(tmp_path, capsys):
    _release_checkpoint(tmp_path / "release.pth")
    tiny = _tiny()
    torch.save({"model": {**tiny.state_dict(), "mask_token": torch.zeros(1, 1, 8)}}, tmp_path / "mae.pth")
    torch.save(tiny.state_dict(), tmp_path / "dino.pth")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in tiny.state_dict().items()}}, tmp_path / "dino_full.pth")
    save_file(tiny.state_dict(), str(tmp_path / "timm.safetensors"))
    save_checkpoint(tiny, tmp_path / "ours.safetensors")
    for name in ("release.pth", "mae.pth", "dino.pth", "dino_full.pth", "timm.safetensors", "ours.safetensors"):
        assert main(["info", str(tmp_path / name)]) == 0, name
        out = capsys.readouterr().out
        assert "architecture:" in out and "loaded" in out
    main(["info", str(tmp_path / "release.pth")])
    assert "heads 6 (last block: 16)" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "absent.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.pth" in err


def test_timm_source_offline_says_how_to_pass_a_file():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "unip.cli", "info", "timm:vit_tiny_patch16_224"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "timm:vit_tiny_patch16_224@" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_non_finite_weights_are_refused_naming_file_and_tensors(tmp_path, capsys):
    model = _tiny()
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[0, 0] = float("nan")
        model.norm.weight[3] = float("inf")
    path = save_checkpoint(model, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"nan\.safetensors: blocks\.1\.attn\.qkv\.weight, norm\.weight hold NaN"):
        load_model(path)  # what analyze, pretrain --teacher and finetune --pretrained read through
    with pytest.raises(CheckpointError, match="norm.weight"):
        load_weights(_fresh(), model.state_dict())
    assert main(["info", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "2 not finite (blocks.1.attn.qkv.weight, norm.weight)" in out
    assert err.strip().splitlines() == [f"unip info: error: {tmp_path / 'nan.safetensors'}: blocks.1.attn.qkv.weight, "
                                        "norm.weight hold NaN or infinite values (2 tensor(s)); the file is damaged "
                                        "or was saved after training diverged: use an earlier checkpoint of that run"]


def _refusal(source):
    with pytest.raises(CheckpointError) as refused:
        load_model(source)
    return str(refused.value)


def test_info_prints_its_report_and_exits_2_where_other_verbs_refuse(tmp_path, capsys):
    """A missing block, a mis-shaped weight, a file that holds another model: ``info`` reports, then exits 2 with
    the line every other verb gives."""
    deep = create_model("vit_tiny_patch16", depth=3, img_size=64).state_dict()
    torch.save({k: v for k, v in deep.items() if not k.startswith("blocks.1.")}, tmp_path / "gap.pth")
    shaped = dict(deep, **{"blocks.0.mlp.fc1.bias": torch.zeros(10)})
    save_file(shaped, str(tmp_path / "shape.safetensors"))
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), tmp_path / "cnn.pth")
    for source in (tmp_path / "gap.pth", tmp_path / "shape.safetensors",
                   f"timm:vit_tiny_patch16_224@{tmp_path / 'cnn.pth'}"):
        refusal = _refusal(source)
        assert main(["info", str(source)]) == 2, source
        out, err = capsys.readouterr()
        assert "weights:" in out and ("missing" in out or "mismatched" in out)
        assert err.strip().splitlines() == [f"unip info: error: {refusal}"]
    assert main(["info", str(tmp_path / "gap.pth")]) == 2 and "missing blocks.1." in capsys.readouterr().err


def test_file_errors_name_what_the_file_holds(tmp_path, capsys):
    model = _tiny()
    save_checkpoint(model, tmp_path / "m.safetensors").rename(tmp_path / "named.pth")  # read by its content
    assert _same_outputs(load_model(tmp_path / "named.pth"), model)
    narrow = create_model("vit_tiny_patch16", depth=2, embed_dim=96, num_heads=3, img_size=64)
    torch.save({"model": narrow.state_dict()}, tmp_path / "narrow.pth")
    refusal = _refusal(f"timm:vit_tiny_patch16_224@{tmp_path / 'narrow.pth'}")
    assert "pos_embed (1, 17, 96) vs (1, 197, 192)" in refusal  # the file's shape, not timm's resampled one
    args = argparse.Namespace(model="unip_vit_small_patch16", last_heads=16)
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "release.pth")
    assert main(["info", str(tmp_path / "release.pth")]) == 2
    err = capsys.readouterr().err
    assert "holds only 0" in err
    assert "shape mismatch patch_embed.proj.weight (192, 3, 16, 16) vs (384, 3, 16, 16)" in err
    assert main(["info", ""]) == 2
    assert "empty checkpoint path" in capsys.readouterr().err
