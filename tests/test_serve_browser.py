"""``unip serve``'s page in a real browser (Debian's Chromium driven by Playwright's Python package; no browser is
downloaded): a generated frame, a real FLIR radiometric JPEG and a generated FLIR SEQ dropped on the Predict tab,
the class tables (°C columns included) read back and checked against ``unip predict``'s areas.json for the same
files, the sequence played back frame by frame, the opacity slider, a patch clicked on
the Attention tab, two models side by side with a label map on the Compare tab; screenshots of each tab. The page
loads nothing from another address and logs no error.

Where Chromium is installed (``.ci/run`` installs it and sets ``UNIP_REQUIRE_BROWSER=1``) this test must run: it
fails instead of skipping. ``UNIP_SCREENSHOTS=DIR`` keeps the screenshots there (docs/img/serve_*.png are made so).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")

from unip.cli import main  # noqa: E402
from unip.models import Segmentor  # noqa: E402
from unip.seg import save_segmentor  # noqa: E402
from unip.seg.predict_run import PredictOptions  # noqa: E402
from unip.serve.server import ServeOptions  # noqa: E402

import thermal_files as tf  # noqa: E402
from serve_client import running  # noqa: E402
from test_predict import scene  # noqa: E402

THERMAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "thermal"
CLASSES = ["background", "person", "car", "road"]


def _browser():
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def _playwright(browser):
    """Playwright's sync API, or a skip (a failure under ``UNIP_REQUIRE_BROWSER``) saying what is missing."""
    required = os.environ.get("UNIP_REQUIRE_BROWSER")
    if browser is None:
        if required:
            pytest.fail("UNIP_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no Chromium installed (apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("UNIP_REQUIRE_BROWSER is set but Playwright's Python package is missing "
                        "(pip install -e '.[dev]')")
        pytest.skip("Playwright's Python package is not installed (pip install -e '.[dev]')")
    return sync_playwright


def segmentor(seed: int) -> Segmentor:
    """Width 48, 6 blocks (a profile with some depth), 4 classes; crop 128."""
    torch.manual_seed(seed)
    config = {"backbone": dict(img_size=128, embed_dim=48, depth=6, num_heads=3, layer_scale=1.0),
              "feature_layers": [6], "neck": "llfpn", "num_classes": len(CLASSES), "auxiliary_head": None,
              "decode_head": {"type": "upernet", "channels": 16, "pool_scales": [1, 2, 3, 6]}}
    model = Segmentor(config, {"crop_size": 128, "stride": 85, "class_names": CLASSES}).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
    return model


CELSIUS = ("celsius_mean", "celsius_median", "celsius_min", "celsius_max")


def table_rows(card):
    """The class table of a result card: ``{class: (pixels, percent, *°C columns)}`` (None for an empty °C cell)."""
    head = card.locator("table.classes thead th").all_inner_texts()
    celsius_columns = [i for i, text in enumerate(head) if text.startswith("°C")]
    rows = card.locator("table.classes tbody tr")
    found = {}
    for i in range(rows.count()):
        cells = rows.nth(i).locator("td").all_inner_texts()
        celsius = tuple(float(cells[c]) if cells[c].strip() else None for c in celsius_columns)
        found[cells[1].strip()] = (int(cells[2]), float(cells[3])) + celsius
    return found


def expected_rows(record, classes):
    """``table_rows`` as ``unip predict``'s areas.json entry ``record`` has them."""
    columns = [record["pixels"], record["percent"]] + [record[key] for key in CELSIUS if key in record]
    return {name: tuple(column[i] for column in columns) for i, name in enumerate(classes)}


def test_the_page_in_a_browser(tmp_path):
    sync_playwright = _playwright(_browser())
    flir = THERMAL / "flir_example.jpg"
    if not flir.is_file():
        pytest.skip(f"the real FLIR radiometric JPEG is not here ({flir})")
    models = [str(save_segmentor(segmentor(seed), tmp_path / f"{name}.safetensors"))
              for seed, name in ((0, "unip_s_distilled"), (3, "unip_s_random"))]
    frame = tmp_path / "street.png"
    Image.fromarray(scene(256, 320, seed=7)).save(frame)
    sequence = tmp_path / "flight.seq"  # three FFF frames, a quarter of a second apart
    sequence.write_bytes(b"".join(tf.frame(tf.scene(96, 128, seed=s, low=3000 + 500 * s),
                                           time=(1_600_000_000, 250 * s, 0)) for s in range(3)))
    shots = Path(os.environ.get("UNIP_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)

    out = tmp_path / "predicted"
    assert main(["predict", "--no-progress", "--checkpoint", models[0], str(frame), str(flir), str(sequence),
                 "--out", str(out), "--format", "label"]) == 0
    report = json.loads((out / "areas.json").read_text())
    expected = {os.path.basename(r["input"]): expected_rows(r, report["classes"]) for r in report["images"]
                if not r["frame"]}  # images, and a sequence's first frame
    assert any(v[2] is not None for v in expected["flir_example.jpg"].values())  # its °C per class

    with running(ServeOptions(models, port=0, predict=PredictOptions())) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_browser(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        requests, problems = [], []
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(server.url)
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)

        # ---------------------------------------------------------------- Predict
        page.set_input_files("#predict-files", [str(sequence), str(frame), str(flir)])  # the last one on top
        for name in ("street.png", "flir_example.jpg", "flight.seq"):
            page.wait_for_selector(f"article.card[data-status=done]:has(h2:text-is('{name}'))", timeout=60_000)
        seq_card = page.locator("article.card:has(h2:text-is('flight.seq'))")
        assert "1 of 3" in seq_card.inner_text()  # played back frame by frame, the first one's table shown
        assert table_rows(seq_card) == expected["flight.seq"]
        for name in ("street.png", "flir_example.jpg"):
            card = page.locator(f"article.card:has(h2:text-is('{name}'))")
            assert table_rows(card) == expected[name], name
            mask = card.locator("img.mask")
            assert mask.evaluate("m => m.complete && m.naturalWidth > 0")
        flir_card = page.locator("article.card:has(h2:text-is('flir_example.jpg'))")
        assert flir_card.locator(".colorbar canvas").count() == 1
        assert "°C" in flir_card.locator(".colorbar").inner_text()
        assert page.locator("article.card:has(h2:text-is('street.png')) .colorbar").count() == 0
        page.fill("#opacity", "80")
        page.dispatch_event("#opacity", "input")
        assert flir_card.locator("img.mask").evaluate("m => m.style.opacity") == "0.8"
        legend = flir_card.locator("ul.legend li").all_inner_texts()
        assert legend and all(any(c in text for c in CLASSES) for text in legend)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / "serve_predict.png"), full_page=False)

        # ---------------------------------------------------------------- Attention
        page.click("nav button[data-tab=attention]")
        page.set_input_files("#attention-files", [str(frame), str(flir)])
        page.wait_for_selector("#attention-result:not([hidden]) #layers tbody tr", timeout=60_000)
        layers = page.locator("#layers tbody tr")
        assert layers.count() == 6
        assert page.locator("#profile-nmi circle.point").count() == 6
        assert page.locator("#profile-nmi .star").count() == 1
        assert "Layer to distil" in page.inner_text("#selection")
        page.select_option("#head", "1")
        page.click("#attention-image", position={"x": 300, "y": 120})
        page.wait_for_selector("#attention-frame[data-queried]", timeout=30_000)
        queried = page.get_attribute("#attention-frame", "data-queried")
        layer, head, row, col = queried.split(":")
        assert (head, row, col) == ("1", "2", "5")  # (300, 120) of 448 px shown = pixel (85, 34) of 128: patch (2, 5)
        assert "looks most at" in page.inner_text("#attention-info")
        page.screenshot(path=str(shots / "serve_attention.png"), full_page=False)

        # ---------------------------------------------------------------- Compare
        page.click("nav button[data-tab=compare]")
        label = tmp_path / "street_label.png"
        Image.open(out / report["images"][0]["files"]["label"]).save(label)
        page.set_input_files("#compare-labels", [str(label)])
        page.set_input_files("#compare-files", [str(frame)])
        page.locator("#compare-results [data-status=done]").nth(1).wait_for(timeout=60_000)  # both sides
        sides = page.locator("#compare-results .side")
        assert sides.nth(0).locator("h3").inner_text() == "unip_s_distilled"
        assert "mIoU 100.00 %" in sides.nth(0).locator(".scores").inner_text()  # its own labels
        assert "mIoU" in sides.nth(1).locator(".scores").inner_text()
        assert table_rows(sides.nth(0)) == expected["street.png"]
        page.screenshot(path=str(shots / "serve_compare.png"), full_page=False)
        browser.close()

    base = server.url.rstrip("/")
    assert all(url.startswith(base) or url.startswith("data:") for url in requests), [
        url for url in requests if not url.startswith(base)]
    assert problems == []
    for name in ("serve_predict.png", "serve_attention.png", "serve_compare.png"):
        assert np.asarray(Image.open(shots / name)).std() > 10  # a picture, not a blank page
