"""Content fingerprints (what a resumed run compares): equal for the same weights or files wherever they lie,
different for other weights, other files or another order."""

import os

import torch

from unip.checkpoint import load_model, save_checkpoint
from unip.fingerprint import listing_fingerprint, weights_fingerprint
from unip.models import create_model


def _tiny(seed):
    torch.manual_seed(seed)
    return create_model("vit_small_patch16", depth=2, embed_dim=32, num_heads=2, img_size=32)


def test_weights_fingerprint_follows_the_values_not_the_file(tmp_path):
    model = _tiny(0)
    save_checkpoint(model, tmp_path / "a.safetensors")
    torch.save({"model": model.state_dict()}, tmp_path / "b.pth")  # another format, another name
    digests = {weights_fingerprint(load_model(tmp_path / name).state_dict()) for name in ("a.safetensors", "b.pth")}
    assert digests == {weights_fingerprint(model.state_dict())}
    assert weights_fingerprint(_tiny(1).state_dict()) not in digests
    shifted = {name: value + 1e-3 for name, value in model.state_dict().items()}  # a little training
    assert weights_fingerprint(shifted) not in digests
    renamed = {f"x.{name}": value for name, value in model.state_dict().items()}
    assert weights_fingerprint(renamed) not in digests


def test_weights_fingerprint_samples_large_tensors_quickly():
    state = {"w": torch.arange(10_000_000, dtype=torch.float32)}
    other = {"w": torch.arange(10_000_000, dtype=torch.float32).flip(0)}
    assert weights_fingerprint(state) != weights_fingerprint(other)
    assert len(weights_fingerprint(state)) == 16


def test_listing_fingerprint_survives_a_move_but_not_a_rename_or_reorder(tmp_path):
    names = ["a/x.png", "a/y.png", "b/z.png"]
    here = [str(tmp_path / "data" / n) for n in names]
    moved = [os.path.join("/elsewhere/disk", n) for n in names]
    assert listing_fingerprint(here) == listing_fingerprint(moved)
    assert listing_fingerprint(here) != listing_fingerprint(here[::-1])
    assert listing_fingerprint(here) != listing_fingerprint(here[:2] + [str(tmp_path / "data/b/w.png")])
    assert listing_fingerprint([here[0]]) == listing_fingerprint([moved[0]])
