"""Whole-image and sliding-window inference against a direct, one-window-at-a-time re-computation of the
release's window rule (mmseg 0.x ``slide_inference``), test-time augmentation and the test resize."""

import pytest
import torch
import torch.nn.functional as F

from unip.models import Segmentor
from unip.seg import fit_size, predict_probabilities, slide_inference, whole_inference
from unip.seg.inference import window_spans


def _segmentor(width=32, depth=2, classes=3):
    torch.manual_seed(0)
    config = {"backbone": dict(img_size=64, embed_dim=width, depth=depth, num_heads=2, layer_scale=1.0),
              "feature_layers": [depth], "neck": "llfpn",
              "decode_head": {"type": "upernet", "channels": 16, "pool_scales": [1, 2, 3, 6], "dropout": 0.1},
              "auxiliary_head": None, "num_classes": classes}
    segmentor = Segmentor(config).eval()
    for module in segmentor.modules():  # non-trivial BN statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
    return segmentor


def reference_slide(segmentor, img, crop, stride):
    """mmseg 0.x EncoderDecoder.slide_inference, window by window."""
    batch, _, h_img, w_img = img.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds, count = None, img.new_zeros((batch, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            logit = F.interpolate(segmentor(crop_img), size=crop_img.shape[2:], mode="bilinear",
                                  align_corners=False)
            if preds is None:
                preds = img.new_zeros((batch, logit.shape[1], h_img, w_img))
            preds += F.pad(logit, (x1, w_img - x2, y1, h_img - y2))
            count[:, :, y1:y2, x1:x2] += 1
    assert (count == 0).sum() == 0
    return preds / count


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_one_window_equals_whole_image(size):
    segmentor = _segmentor()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        whole = F.interpolate(segmentor(x), size=size, mode="bilinear", align_corners=False)
    assert torch.equal(whole_inference(segmentor, x), whole)
    assert whole.shape == (2, 3, *size)
    crop = max(size)
    torch.testing.assert_close(slide_inference(segmentor, x, crop=crop, stride=crop * 2 // 3), whole)


@pytest.mark.parametrize("size, crop, stride", [((100, 70), 48, 32), ((112, 80), 48, 32), ((48, 130), 48, 20)])
def test_sliding_window_equals_the_window_rule(size, crop, stride):
    segmentor = _segmentor()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = reference_slide(segmentor, x, crop, stride)
    for kwargs in (dict(), dict(batch_windows=False), dict(max_batch=5)):
        torch.testing.assert_close(slide_inference(segmentor, x, crop, stride, **kwargs), expected,
                                   atol=1e-5, rtol=1e-5)


def test_release_window_on_a_700x520_image():
    segmentor = _segmentor(width=32, depth=1)
    x = torch.randn(1, 3, 700, 520)
    assert window_spans(700, 512, 341) == [(0, 512), (188, 700)]
    assert window_spans(520, 512, 341) == [(0, 512), (8, 520)]
    with torch.no_grad():
        expected = reference_slide(segmentor, x, 512, 341)
    logits = slide_inference(segmentor, x)
    assert logits.shape == (1, 3, 700, 520)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_window_spans_cover_every_pixel():
    for size in range(1, 200, 7):
        spans = window_spans(size, 48, 32)
        covered = torch.zeros(size)
        for start, end in spans:
            assert end - start == min(48, size)
            covered[start:end] += 1
        assert covered.min() >= 1


def test_whole_inference_pads_sides_that_are_not_patch_multiples():
    segmentor = _segmentor()
    x = torch.randn(1, 3, 70, 50)
    logits = whole_inference(segmentor, x)
    assert logits.shape == (1, 3, 70, 50)
    padded = F.pad(x, (0, 14, 0, 10))
    torch.testing.assert_close(logits, whole_inference(segmentor, padded)[..., :70, :50])


def test_inference_restores_training_mode():
    segmentor = _segmentor().train()
    slide_inference(segmentor, torch.randn(1, 3, 64, 64), crop=64, stride=32)
    assert segmentor.training


def test_test_time_augmentation_averages_softmax_of_each_view():
    segmentor = _segmentor()
    x = torch.randn(1, 3, 64, 96)
    plain = predict_probabilities(segmentor, x, crop=64, stride=32)
    torch.testing.assert_close(plain, slide_inference(segmentor, x, 64, 32).softmax(1))
    flipped = predict_probabilities(segmentor, x, crop=64, stride=32, flip=True, output_size=(32, 48))
    mirror = slide_inference(segmentor, x.flip(-1), 64, 32).flip(-1)
    expected = sum(F.interpolate(v, size=(32, 48), mode="bilinear", align_corners=False).softmax(1)
                   for v in (slide_inference(segmentor, x, 64, 32), mirror)) / 2
    torch.testing.assert_close(flipped, expected)
    scaled = predict_probabilities(segmentor, x, mode="whole", scales=(0.5, 1.0))
    half = F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False)
    expected = (F.interpolate(whole_inference(segmentor, half), size=(64, 96), mode="bilinear",
                              align_corners=False).softmax(1) + whole_inference(segmentor, x).softmax(1)) / 2
    torch.testing.assert_close(scaled, expected)
    torch.testing.assert_close(scaled.sum(1), torch.ones(1, 64, 96))


def test_fit_size_is_mmcv_rescale():
    assert fit_size(480, 640) == (512, 683)  # SODA / SCUT-Seg frames: short side 512
    assert fit_size(512, 640) == (512, 640)
    assert fit_size(1024, 4096) == (512, 2048)  # long side limited to 2048
    assert fit_size(300, 300) == (512, 512)
    assert fit_size(640, 480, scale=(512, 2048)) == (683, 512)
    # one rule: the test transform's resize (what evaluation and prediction feed the model)
    from unip.data.seg_transforms import rescale_size

    for size in [(3, 500), (500, 3), (7, 7), (1023, 97), (2049, 511)]:
        assert fit_size(*size) == rescale_size(*size, (2048, 512))


def test_window_spans_refuse_a_stride_above_the_crop():
    """Windows further apart than their size would leave pixels no window covers (NaN after averaging)."""
    assert window_spans(100, 48, 48)[-1] == (52, 100)
    with pytest.raises(ValueError, match="stride"):
        window_spans(100, 48, 49)


def test_write_overlays_decodes_each_image_once(tmp_path, monkeypatch):
    import unip.data.segmentation as segmentation
    from unip.data import open_segmentation_dataset, seg_test_transform
    from unip.data.synth import write_soda
    from unip.seg.evaluation import EvalSettings
    from unip.seg.pipeline import InferencePipeline
    from unip.seg.report import write_overlays

    write_soda(str(tmp_path / "soda"), 2, 2, size=(48, 40), seed=0)
    dataset = open_segmentation_dataset(str(tmp_path / "soda"), "soda", "test", seg_test_transform(scale=(128, 64)))
    decoded = []
    real = segmentation.load_sample
    monkeypatch.setattr(segmentation, "load_sample", lambda sample, *args: decoded.append(sample.name) or
                        real(sample, *args))
    paths = write_overlays(_segmentor(classes=21), dataset, 2, tmp_path / "overlays",
                           EvalSettings(InferencePipeline(crop=64, stride=42)), torch.device("cpu"))
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert sorted(decoded) == sorted(s.name for s in dataset.samples)


def test_sides_shorter_than_two_patches_are_padded():
    """A 12-px side (a 3 × 500 image after the test resize) would leave the LL-FPN's max-pool a 1 × 1 map:
    the input is padded to two patches (zeros) and the padding cropped off."""
    segmentor = _segmentor()
    x = torch.randn(1, 3, 12, 80)
    with torch.no_grad():
        padded = F.pad(x, (0, 0, 0, 20))
        expected = F.interpolate(segmentor(padded), size=(32, 80), mode="bilinear", align_corners=False)[..., :12, :]
    assert torch.equal(whole_inference(segmentor, x), expected)
    assert slide_inference(segmentor, x, crop=64, stride=42).isfinite().all()


def test_test_time_scales_never_shrink_an_image_to_nothing():
    """A small scale factor (``--scales 0.001``), or a thin image at 0.25, would round a side to 0 px (a crash
    in the resize): sides are kept at 1 px at least, and the window pads that to the model's minimum input."""
    from unip.seg.inference import scaled_size

    assert scaled_size(64, 64, 0.001) == (1, 1) and scaled_size(1, 500, 0.25) == (1, 125)
    assert scaled_size(480, 640, 0.75) == (360, 480)  # mmcv's rounding otherwise
    segmentor = _segmentor()
    for x, scales in ((torch.randn(1, 3, 64, 64), (0.001, 1.0)), (torch.randn(1, 3, 1, 200), (0.25, 0.5))):
        probabilities = predict_probabilities(segmentor, x, crop=64, stride=42, scales=scales, flip=True)
        assert probabilities.shape == (1, 3, *x.shape[-2:]) and probabilities.isfinite().all()
        torch.testing.assert_close(probabilities.sum(1), torch.ones(1, *x.shape[-2:]))


def test_another_class_naming_is_warned_without_inventing_more_classes(caplog):
    from types import SimpleNamespace

    from unip.seg.report import check_classes

    def warned(names, classes):
        segmentor = SimpleNamespace(num_classes=len(classes), meta={"class_names": names})
        dataset = SimpleNamespace(num_classes=len(classes), classes=tuple(classes), root="/d", layout="folder")
        caplog.clear()
        check_classes(segmentor, dataset, "m.safetensors")
        return caplog.text

    three = warned(["x", "y", "z"], ["a", "b", "c"])
    assert "names its classes x, y, z;" in three and "names a, b, c are used" in three and "..." not in three
    six = warned(list("uvwxyz"), list("abcdef"))
    assert "u, v, w, x, ... (6);" in six and "a, b, c, d, ... (6) are used" in six
    assert warned(["a", "b", "c"], ["a", "b", "c"]) == ""
