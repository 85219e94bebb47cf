"""`melanoma serve` as a real server process on 127.0.0.1: it gets ready, answers as the
Predictor does, logs each request with its id, and stops cleanly when signalled."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import live_server

from melanoma.modeling.predict import Predictor

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_served_predictions_match_the_predictor(trained_run: Path, ham_images_by_class: dict[str, Path],
                                                tmp_path: Path) -> None:
    images = list(ham_images_by_class.values())
    with live_server(trained_run, tmp_path / "server.log") as server:
        response = httpx.post(f"{server.url}/v1/predict", timeout=60, headers={"X-Request-ID": "proxy-42"},
                              files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images])
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == "proxy-42"  # a proxy's id is kept
        served = np.array([[p["probabilities"][c] for c in p["probabilities"]] for p in response.json()["predictions"]])
        predictor = Predictor.from_run(trained_run)
        np.testing.assert_allclose(served, predictor.predict(images), atol=1e-5)
        assert httpx.get(f"{server.url}/v1/model").json()["run_id"] == predictor.run.run_id
        assert httpx.get(f"{server.url}/ui/").status_code == 200
        docs = httpx.get(f"{server.url}/docs").text  # its scripts come from the server, not a CDN
        scripts = re.findall(r'src="([^"]+)"', docs) + re.findall(r'href="([^"]+\.css)"', docs)
        assert scripts and all(s.startswith("/") and httpx.get(f"{server.url}{s}").status_code == 200 for s in scripts)
        code = server.stop()
    text = server.log.read_text()
    assert code == 0, text[-3000:]
    assert f"http://127.0.0.1:{server.port}/ui/" in text  # the URL printed for the user
    predict_line = next(r for r in server.request_log() if r["route"] == "/v1/predict")
    assert predict_line["status"] == 200 and predict_line["latency_ms"] > 0
    assert predict_line["request_id"] == "proxy-42"
    assert predict_line["images_sha256"] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in images]
