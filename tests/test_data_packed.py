"""Packing a manifest into shards, reading it back, augmentation, and disjoint shares for workers/ranks."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from unip.data.images import read_gray, resize_short_side
from unip.data.infmix import build_manifest, read_manifest
from unip.data.packed import ManifestImages, PackedImages, open_images, pack_manifest
from unip.engine.sharding import RankSampler, shard_indices
from unip.data.synth import write_unlabeled
from unip.data.transforms import INFMIX_MEAN, INFMIX_STD, normalize_batch, pretrain_transform
from unip.errors import DataError


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A manifest of 13 images of three sizes (one 16-bit set); returns its path."""
    root = tmp_path_factory.mktemp("ir")
    write_unlabeled(str(root), 6, name="wide", size=(96, 64), seed=5)
    write_unlabeled(str(root), 4, name="tall", size=(40, 72), seed=5)
    write_unlabeled(str(root), 3, name="raw", size=(32, 32), seed=5, bit_depth=16)
    out = str(root / "m.jsonl")
    build_manifest(out, infrared=str(root), workers=2)
    return out


@pytest.fixture(scope="module")
def pack(manifest, tmp_path_factory):
    """The manifest packed at short side 48 into shards of at most 8 KiB; returns the folder."""
    out = str(tmp_path_factory.mktemp("packs") / "p48")
    pack_manifest(manifest, out, short_side=48, shard_bytes=8192, workers=2)
    return out


def test_pack_gives_back_the_same_pixels_after_the_documented_resize(manifest, pack):
    records = read_manifest(manifest)
    data = PackedImages(pack, transform=None)
    assert len(data) == len(records) == 13
    assert len(data.meta["shards"]) > 1
    assert data.paths() == [r["path"] for r in records]
    for i, rec in enumerate(records):
        expected = resize_short_side(read_gray(rec["path"]), 48)
        assert min(expected.shape) == min(48, rec["width"], rec["height"])
        got = data[i]
        assert got.dtype == torch.uint8 and got.shape == (1, *expected.shape)
        np.testing.assert_array_equal(got[0].numpy(), expected)
        assert data.source(i) == rec["source"]


def test_manifest_dataset_has_the_same_api_and_pixels(manifest, tmp_path):
    full = str(tmp_path / "full")
    pack_manifest(manifest, full, short_side=512)
    packed, plain = open_images(full, transform=None), open_images(manifest, transform=None)
    assert isinstance(packed, PackedImages) and isinstance(plain, ManifestImages)
    assert len(packed) == len(plain)
    for i in range(len(plain)):
        assert torch.equal(packed[i], plain[i]) and packed.source(i) == plain.source(i)


def test_default_items_are_augmented_normalised_3_channel_crops(pack):
    data = PackedImages(pack)
    torch.manual_seed(0)
    x = data[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    lo, hi = (0 - INFMIX_MEAN) / INFMIX_STD, (1 - INFMIX_MEAN) / INFMIX_STD
    assert lo - 0.01 <= x.min() and x.max() <= hi + 0.01 and x.std() > 0.1
    torch.manual_seed(0)
    assert torch.equal(data[0], x)


def test_transform_of_a_constant_image_is_the_normalised_constant():
    value = 97
    out = pretrain_transform(size=32)(torch.full((1, 50, 60), value, dtype=torch.uint8))
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, torch.full_like(out, (value / 255 - INFMIX_MEAN) / INFMIX_STD))


def test_augmentation_matches_the_3_channel_torchvision_pipeline_draw_for_draw():
    from torchvision.transforms import v2

    release = v2.Compose([
        v2.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([INFMIX_MEAN] * 3, [INFMIX_STD] * 3),
    ])
    ours = pretrain_transform()
    gray = torch.randint(0, 256, (1, 120, 150), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for seed in range(12):
        torch.manual_seed(seed)
        expected = release(gray.expand(3, -1, -1).contiguous())
        torch.manual_seed(seed)
        got = ours(gray)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert pretrain_transform(channels=1)(gray).shape == (1, 224, 224)


def test_uint8_crops_normalised_per_batch_equal_the_full_transform(pack):
    full, crops = PackedImages(pack), PackedImages(pack, transform=pretrain_transform(normalize=False))
    torch.manual_seed(4)
    expected = torch.stack([full[i] for i in range(5)])
    torch.manual_seed(4)
    batch = torch.stack([crops[i] for i in range(5)])
    assert batch.dtype == torch.uint8 and batch.shape == (5, 1, 224, 224)
    torch.testing.assert_close(normalize_batch(batch), expected, atol=1e-5, rtol=0)


def _read_share(data, sampler, workers):
    loader = DataLoader(data, batch_size=None, sampler=sampler, num_workers=workers)
    return [(int(i), img) for img, i in loader]


@pytest.mark.parametrize("even", [False, True])
def test_two_ranks_with_two_workers_read_disjoint_complete_shares(pack, even):
    data = PackedImages(pack, transform=None, return_index=True)
    _ = data[0]  # map shards in the parent first: forked workers must not reuse these mappings
    expected = PackedImages(pack, transform=None)
    shares = []
    for rank in range(2):
        got = _read_share(data, RankSampler(len(data), rank, 2, seed=3, even=even), workers=2)
        for i, img in got:
            assert torch.equal(img, expected[i])
        shares.append([i for i, _ in got])
    assert not set(shares[0]) & set(shares[1])
    assert len(shares[0]) + len(shares[1]) == len(set(shares[0]) | set(shares[1]))
    union = set(shares[0]) | set(shares[1])
    if even:
        assert len(shares[0]) == len(shares[1]) == 6 and len(union) == 12
    else:
        assert union == set(range(13))


def test_shards_reshuffle_each_epoch_but_stay_a_partition():
    a = [shard_indices(10, r, 3, seed=1, epoch=0) for r in range(3)]
    b = [shard_indices(10, r, 3, seed=1, epoch=1) for r in range(3)]
    assert sorted(sum(a, [])) == sorted(sum(b, [])) == list(range(10))
    assert a != b
    sampler = RankSampler(10, 1, 3, seed=1, even=False)
    sampler.set_epoch(1)
    assert list(sampler) == b[1] and len(sampler) == len(b[1])


def test_dataset_pickles_without_its_mappings(pack):
    data = PackedImages(pack, transform=None)
    first = data[3]
    clone = pickle.loads(pickle.dumps(data))
    assert clone._maps == {} and torch.equal(clone[3], first)


def test_unreadable_files_at_pack_time_are_skipped_and_listed(manifest, tmp_path):
    records = read_manifest(manifest)
    broken = tmp_path / "gone.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(broken)
    recs = records[:2] + [{"path": str(broken), "source": "x"}] + records[2:4]
    broken.write_bytes(b"")
    result = pack_manifest(recs, str(tmp_path / "p"), short_side=64)
    assert result.count == 4 and [s["reason"] for s in result.skipped] == ["empty"]
    meta = json.load(open(tmp_path / "p" / "index.json"))
    assert meta["count"] == 4 and meta["skipped"][0]["path"] == str(broken)


def test_repack_replaces_the_folder_and_refuses_foreign_folders(manifest, tmp_path):
    out = tmp_path / "p"
    pack_manifest(manifest, str(out), short_side=16)
    pack_manifest(manifest, str(out), short_side=24)
    assert PackedImages(str(out), transform=None).meta["short_side"] == 24
    assert sorted(os.listdir(tmp_path)) == ["p"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not a pack"):
        pack_manifest(manifest, str(tmp_path / "other"))
    with pytest.raises(DataError, match="index.json"):
        PackedImages(str(tmp_path / "other"))


def test_a_killed_packs_partial_folder_is_cleaned_by_the_next_pack(manifest, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)  # that process has exited: its partial folder is stale
    stale = tmp_path / f"p.partial-{dead_pid}"
    stale.mkdir()
    (stale / "shard-00000.bin").write_bytes(b"half")
    alive = tmp_path / f"p.partial-{os.getpid()}x"  # not a pid suffix: left alone
    alive.mkdir()
    pack_manifest(manifest, str(tmp_path / "p"), short_side=16)
    assert sorted(os.listdir(tmp_path)) == ["p", alive.name]


def test_items_are_views_that_never_write_to_the_pack(pack):
    data = PackedImages(pack, transform=None)
    before = data.read(3).copy()
    item = data[3]
    assert item.shape == (1, *before.shape)
    item.fill_(7)  # copy-on-write mapping: this process's page changes, the shard file does not
    assert np.array_equal(PackedImages(pack, transform=None).read(3), before)
