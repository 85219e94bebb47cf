"""The playground in a real browser: headless Chromium (Debian's package, driven by
Playwright) opens /ui, uploads a real image, sees the predicted class and an explanation,
and saves a screenshot to test-artifacts/. Skipped with a reason where Chromium is not
installed, except in CI, where it must run."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from melanoma.config import Settings
from melanoma.data.outliers import natural_images
from melanoma.modeling.predict import Predictor
from melanoma.serving.app import create_app
from melanoma.serving.service import class_name
from melanoma.serving.ui import OOD_LABEL, OOD_WARNING

pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]


def chromium_or_skip() -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the browser test, but `chromium` is not installed (make browser).")
        pytest.skip("headless Chromium is not installed (`make browser`, or apt-get install chromium)")
    return chromium


@pytest.fixture(scope="module")
def predictor(trained_run: Path) -> Predictor:
    return Predictor.from_run(trained_run)


@pytest.fixture(scope="module")
def live_url(predictor: Predictor, ham_images_by_class: dict[str, Path]) -> Iterator[str]:
    """The app served by uvicorn in a thread of this process, on a free loopback port."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    examples = [ham_images_by_class[dx] for dx in ("mel", "nv", "bkl")]
    app = create_app(Settings(), predictor=predictor, examples=examples)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def test_upload_shows_the_prediction_and_an_explanation(live_url: str, predictor: Predictor,
                                                        ham_images_by_class: dict[str, Path]) -> None:
    chromium = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    image = ham_images_by_class["bcc"]
    prediction = predictor.analyse_arrays(predictor.preprocess(image)[None])
    expected = (class_name(predictor.classes[int(np.argmax(prediction.probabilities[0]))])
                if prediction.in_distribution[0] else OOD_LABEL)
    hosts: set[str] = set()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda request: hosts.add(urlsplit(request.url).hostname or request.url))
            page.goto(f"{live_url}/ui/")
            expect(page.get_by_text("not a medical device")).to_be_visible(timeout=60_000)
            page.locator("#image input[type=file]").set_input_files(image)
            expect(page.locator("#probabilities")).to_contain_text(expected, timeout=60_000)
            expect(page.locator("#decision")).to_contain_text("Melanoma probability")
            page.get_by_role("button", name="Explain").click()
            expect(page.locator("#overlay img")).to_be_visible(timeout=60_000)
            page.get_by_text("Model card").click()
            expect(page.get_by_text(predictor.run.run_id)).to_be_visible()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=ARTIFACTS / "serving-ui.png", full_page=True)
        finally:
            browser.close()
    assert hosts <= {"127.0.0.1"}, f"the page called other hosts: {sorted(hosts - {'127.0.0.1'})}"


def test_a_non_dermoscopic_image_gets_the_warning_not_a_label(live_url: str, predictor: Predictor,
                                                              tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    import cv2
    from playwright.sync_api import expect, sync_playwright

    # A photograph from scikit-image's samples (or a crop of one) that the run's gate rejects.
    photos = natural_images(crops_per_image=3, seed=0)
    flagged = ~predictor.analyse_arrays(np.stack([predictor.preprocess(p) for p in photos])).in_distribution
    assert flagged.any(), "the gate passed every natural photograph"
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), cv2.cvtColor(photos[int(np.argmax(flagged))], cv2.COLOR_RGB2BGR))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{live_url}/ui/")
            page.locator("#image input[type=file]").set_input_files(photo)
            expect(page.locator("#warnings")).to_contain_text(OOD_WARNING, timeout=60_000)
            expect(page.locator("#probabilities")).to_contain_text(OOD_LABEL)
            expect(page.locator("#decision")).to_contain_text("probability")  # still shown, in a table
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=ARTIFACTS / "serving-ui-ood.png", full_page=True)
        finally:
            browser.close()
