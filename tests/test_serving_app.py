"""The FastAPI app in-process (`with TestClient(app)`, so that its lifespan and Gradio's
run): every endpoint on real HAM10000 images, every error code, metrics and logs."""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import io
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from crafted_images import png_declaring
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from melanoma.config import Settings
from melanoma.errors import ModelError
from melanoma.modeling.predict import Predictor
from melanoma.serving.app import create_app

pytestmark = pytest.mark.realdata
LOOPBACK = "http://127.0.0.1"  # a trusted host (trusted_hosts setting), as a local browser calls it


class GatedPredictor:
    """The real predictor, except that once ``armed``, batches of several images (LIME's;
    the server's predictions here send one image) wait until ``gate`` opens. It makes a
    long explanation without depending on how fast the machine is."""

    def __init__(self, predictor: Predictor):
        self._predictor = predictor
        self.armed = False
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def predict_arrays(self, images: np.ndarray, **options: Any) -> np.ndarray:
        if self.armed and len(images) > 1:
            self.waiting.set()
            self.gate.wait()
        return self._predictor.predict_arrays(images, **options)


@pytest.fixture(scope="module")
def predictor(trained_run: Path) -> Predictor:
    return Predictor.from_run(trained_run)


@pytest.fixture(scope="module")
def images(ham_images_by_class: dict[str, Path]) -> list[Path]:
    return [ham_images_by_class[dx] for dx in ("mel", "nv", "bcc", "bkl")]


@pytest.fixture(scope="module")
def client(predictor: Predictor, images: list[Path]) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(), predictor=predictor, examples=images[:2]), base_url=LOOPBACK) as client:
        yield client


def client_with(predictor: Any, **settings: Any) -> TestClient:
    return TestClient(create_app(Settings(**settings), predictor=predictor), base_url=LOOPBACK,
                      raise_server_exceptions=False)


def upload(path: Path, field: str = "files") -> tuple[str, tuple[str, bytes, str]]:
    return (field, (path.name, path.read_bytes(), "image/jpeg"))


def metric(client: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# --------------------------------------------------------------------------- endpoints
def test_predict_matches_the_predictor(client: TestClient, predictor: Predictor, images: list[Path],
                                       trained_run: Path) -> None:
    response = client.post("/v1/predict", files=[upload(p) for p in images])
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predictor.predict(images)
    threshold = json.loads((trained_run / "metrics.json").read_text())["melanoma"]["threshold"]
    melanoma = predictor.classes.index("mel")
    assert body["run_id"] == predictor.run.run_id
    assert [p["file"] for p in body["predictions"]] == [p.name for p in images]
    for path, prediction, probabilities in zip(images, body["predictions"], expected):
        assert prediction["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        served = [prediction["probabilities"][c] for c in predictor.classes]
        np.testing.assert_allclose(served, probabilities, atol=1e-5)
        assert prediction["top_class"] == predictor.classes[int(np.argmax(probabilities))]
        assert prediction["melanoma_probability"] == pytest.approx(probabilities[melanoma], abs=1e-5)
        assert prediction["melanoma_threshold"] == pytest.approx(threshold)
        above = probabilities[melanoma] >= threshold
        assert prediction["melanoma_decision"] == ("above_threshold" if above else "below_threshold")


def test_no_operating_point_is_served_where_it_was_chosen_with_tta(predictor: Predictor, images: list[Path]) -> None:
    """The server predicts one view: a threshold chosen on 8-view averages does not apply."""
    with_tta = copy.copy(predictor)
    with_tta.run = dataclasses.replace(predictor.run, metrics={**predictor.run.metrics, "tta": True})
    with client_with(with_tta) as client:
        response = client.post("/v1/predict", files=[upload(images[0])])
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    assert prediction["melanoma_probability"] is not None
    assert prediction["melanoma_threshold"] is None and prediction["melanoma_decision"] is None


def test_explain_gradcam_returns_a_png_and_its_numbers(client: TestClient, predictor: Predictor,
                                                       images: list[Path]) -> None:
    response = client.post("/v1/explain", files=[upload(images[0], "file")])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "gradcam"
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"])))
    assert overlay.format == "PNG" and min(overlay.size) > 100
    expected = predictor.predict([images[0]])[0]
    assert body["explained_classes"] == [predictor.classes[int(np.argmax(expected))]]
    assert body["details"]["method"] == "gradcam"
    assert body["details"]["classes"][0]["probability"] == pytest.approx(expected.max(), abs=1e-5)


def test_explain_lime_uses_the_requested_samples_within_the_limit(client: TestClient, images: list[Path]) -> None:
    response = client.post("/v1/explain", files=[upload(images[1], "file")],
                           data={"method": "lime", "samples": "50", "top_k": "2"})
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    assert details["method"] == "lime" and details["num_samples"] == 50
    assert len(details["classes"]) == 2 and len(details["classes"][0]["weights"]) == details["n_superpixels"]

    too_many = client.post("/v1/explain", files=[upload(images[1], "file")],
                           data={"method": "lime", "samples": str(Settings().lime_max_samples + 1)})
    assert too_many.status_code == 422
    assert "lime_max_samples" in too_many.json()["detail"]


def test_lime_cuts_superpixels_as_the_settings_say(predictor: Predictor, images: list[Path]) -> None:
    # The server honours lime_segmentation and lime_superpixels, as `melanoma explain` does.
    with client_with(predictor, lime_segmentation="quickshift", lime_superpixels=20) as client:
        response = client.post("/v1/explain", files=[upload(images[1], "file")], data={"method": "lime", "samples": "20"})
    assert response.status_code == 200, response.text
    segmentation = response.json()["details"]["segmentation"]  # what the explanation was made with
    assert (segmentation["algorithm"], segmentation["n_segments"]) == ("quickshift", 20)


def test_model_card_describes_the_run(client: TestClient, trained_run: Path) -> None:
    card = client.get("/v1/model").json()
    meta = json.loads((trained_run / "run.json").read_text())
    assert card["run_id"] == meta["run_id"] and card["classes"] == meta["classes"]
    assert card["image_size"] == meta["image_size"] and card["model"] == meta["model"]
    assert card["archive_sha256"] == meta["archive"]["sha256"] and card["trained"] == meta["created"]
    assert card["metrics"] == json.loads((trained_run / "metrics.json").read_text())
    assert card["melanoma_class"] == "mel"


def test_health_readiness_and_the_ui(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive", "run_id": None}
    assert client.get("/readyz").status_code == 200
    assert client.get("/ui/").status_code == 200
    config = client.get("/ui/config").text
    assert "not a medical device" in config and "ISIC_" in config  # the disclaimer and the examples
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/predict", "/v1/explain", "/v1/model"}


def test_not_ready_before_start_up(predictor: Predictor) -> None:
    client = client_with(predictor)  # not entered: the lifespan has not run
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    assert client.get("/v1/model").json()["error"] == "service_unavailable"


def test_a_model_that_cannot_be_loaded_stops_start_up(trained_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-run"
    broken.mkdir()
    shutil.copy(trained_run / "run.json", broken)
    (broken / "model.keras").write_bytes(b"not a Keras file")
    with pytest.raises(ModelError, match="model.keras cannot be loaded"), TestClient(create_app(Settings(), run_dir=broken)):
        pass


def test_serve_refuses_a_folder_that_is_not_a_run(cli: Any, tmp_path: Path) -> None:
    result = cli("serve", "--run", tmp_path / "missing", "--port", "0")
    assert result.code == 2 and "missing does not exist" in result.stderr


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("name", "make", "status", "error"),
    [
        ("notes.jpg", lambda jpeg: b"these are notes, not an image\n" * 20, 415, "unsupported_media_type"),
        ("page.png", lambda jpeg: b"%PDF-1.7\n" + jpeg, 415, "unsupported_media_type"),
        ("cut.jpg", lambda jpeg: jpeg[: len(jpeg) // 2], 422, "invalid_image"),
        ("empty.jpg", lambda jpeg: b"", 422, "empty_file"),
        ("bomb.png", lambda jpeg: png_declaring(30_000, 30_000), 413, "too_many_pixels"),
    ],
)
def test_bad_uploads_get_clear_json_errors(client: TestClient, images: list[Path], name: str, make: Any,
                                           status: int, error: str) -> None:
    bad = ("files", (name, make(images[0].read_bytes()), "image/jpeg"))
    response = client.post("/v1/predict", files=[upload(images[1]), bad])
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.json()["file"] == name and name in response.json()["detail"]


def test_invalid_forms_are_422(client: TestClient, images: list[Path]) -> None:
    missing = client.post("/v1/predict", files=[upload(images[0], "image")])
    assert missing.status_code == 422 and "files" in missing.json()["detail"]
    method = client.post("/v1/explain", files=[upload(images[0], "file")], data={"method": "shap"})
    assert method.status_code == 422 and "method" in method.json()["detail"]
    top_k = client.post("/v1/explain", files=[upload(images[0], "file")], data={"top_k": "99"})
    assert top_k.status_code == 422 and "top_k" in top_k.json()["detail"]


def test_upload_size_and_pixel_limits_come_from_the_settings(predictor: Predictor, images: list[Path]) -> None:
    size = images[0].stat().st_size
    with client_with(predictor, max_upload_bytes=size - 1, serve_max_pixels=10_000) as client:
        too_big = client.post("/v1/predict", files=[upload(images[0])])
        assert too_big.status_code == 413 and "max_upload_bytes" in too_big.json()["detail"]
        # HAM images are 200x150 = 30,000 pixels; a JPEG under the size limit is refused by its header.
        small = Image.open(images[0]).copy()
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=20)
        assert buffer.tell() < size // 2  # well under the limit, with the multipart overhead
        too_many_pixels = client.post("/v1/predict", files=[("files", ("small.jpg", buffer.getvalue(), "image/jpeg"))])
        assert too_many_pixels.status_code == 413 and "serve_max_pixels" in too_many_pixels.json()["detail"]


# --------------------------------------------------------------------------- concurrency
def test_predictions_are_served_while_lime_runs(predictor: Predictor, images: list[Path]) -> None:
    gated = GatedPredictor(predictor)
    with client_with(gated) as client:
        gated.armed = True
        explanation: dict[str, Any] = {}
        lime = threading.Thread(target=lambda: explanation.update(response=client.post(
            "/v1/explain", files=[upload(images[0], "file")], data={"method": "lime", "samples": "200"})))
        lime.start()
        assert gated.waiting.wait(60), "LIME never reached the model"
        response = client.post("/v1/predict", files=[upload(images[1])])
        assert response.status_code == 200 and lime.is_alive()  # served while LIME is still running
        gated.gate.set()
        lime.join(60)
        assert explanation["response"].status_code == 200


def test_an_explanation_over_the_timeout_is_504(predictor: Predictor, images: list[Path]) -> None:
    gated = GatedPredictor(predictor)
    with client_with(gated, explain_timeout_seconds=0.5) as client:
        gated.armed = True
        response = client.post("/v1/explain", files=[upload(images[0], "file")], data={"method": "lime"})
        gated.gate.set()  # let the abandoned explanation stop at its deadline
        assert response.status_code == 504
        assert response.json()["error"] == "gateway_timeout" and "explain_timeout_seconds" in response.json()["detail"]
        assert client.get("/readyz").status_code == 200


# --------------------------------------------------------------------------- observability
def test_metrics_move_after_a_request(client: TestClient, predictor: Predictor, images: list[Path]) -> None:
    labels = {"method": "POST", "route": "/v1/predict", "status": "200"}
    top = predictor.classes[int(np.argmax(predictor.predict([images[0]])[0]))]
    before = metric(client, "melanoma_http_requests_total", **labels)
    predicted_before = metric(client, "melanoma_predictions_total", predicted_class=top)
    latency_before = metric(client, "melanoma_http_request_duration_seconds_count", **labels)
    assert client.post("/v1/predict", files=[upload(images[0])]).status_code == 200
    assert metric(client, "melanoma_http_requests_total", **labels) == before + 1
    assert metric(client, "melanoma_http_request_duration_seconds_count", **labels) == latency_before + 1
    assert metric(client, "melanoma_predictions_total", predicted_class=top) == predicted_before + 1
    assert metric(client, "melanoma_model_info", run_id=predictor.run.run_id, classes=",".join(predictor.classes)) == 1
    assert metric(client, "melanoma_http_requests_in_flight") == 1  # the /metrics request itself


def test_one_log_line_per_request_with_the_hash_never_the_image(client: TestClient, images: list[Path],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    data = images[2].read_bytes()
    with caplog.at_level(logging.INFO, logger="melanoma.serving.access"):
        client.post("/v1/predict", files=[upload(images[2])])
        client.post("/v1/predict", files=[("files", ("notes.jpg", b"not an image" * 10, "image/jpeg"))])
    records = [r.__dict__ for r in caplog.records if r.name == "melanoma.serving.access"]
    assert [(r["route"], r["status"]) for r in records] == [("/v1/predict", 200), ("/v1/predict", 415)]
    assert records[0]["images_sha256"] == [hashlib.sha256(data).hexdigest()]
    assert all(r["latency_ms"] > 0 for r in records)
    assert base64.b64encode(data[:30]).decode() not in caplog.text and len(caplog.text) < 2000


def test_root_path_behind_a_reverse_proxy(predictor: Predictor) -> None:
    # A proxy publishes the server under /melanoma; `serve --root-path /melanoma` makes
    # uvicorn put the prefix in front of each path, as the test client does here.
    with TestClient(create_app(Settings(), predictor=predictor), base_url=LOOPBACK, root_path="/melanoma") as client:
        assert client.get("/melanoma/", follow_redirects=False).headers["location"] == "/melanoma/ui/"
        assert client.get("/melanoma/readyz").status_code == 200
        assert client.get("/melanoma/ui/config").json()["root"] == "http://127.0.0.1/melanoma/ui"
        assert client.get("/melanoma/openapi.json").json()["servers"] == [{"url": "/melanoma"}]
