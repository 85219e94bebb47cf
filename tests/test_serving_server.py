"""`melanoma serve` as a real server process on 127.0.0.1: it gets ready, answers as the
Predictor does, logs each request, and stops cleanly when signalled."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from melanoma.modeling.predict import Predictor

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(base_url: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with code {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.kill()
    pytest.fail(f"the server was not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def test_served_predictions_match_the_predictor(trained_run: Path, ham_images_by_class: dict[str, Path],
                                                tmp_path: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "melanoma", "serve", "--run", str(trained_run), "--port", str(port)],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_until_ready(base_url, process, log)
        images = list(ham_images_by_class.values())
        response = httpx.post(f"{base_url}/v1/predict", timeout=60,
                              files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images])
        assert response.status_code == 200, response.text
        served = np.array([[p["probabilities"][c] for c in p["probabilities"]] for p in response.json()["predictions"]])
        predictor = Predictor.from_run(trained_run)
        np.testing.assert_allclose(served, predictor.predict(images), atol=1e-5)
        assert httpx.get(f"{base_url}/v1/model").json()["run_id"] == predictor.run.run_id
        assert httpx.get(f"{base_url}/ui/").status_code == 200
    finally:
        process.send_signal(signal.SIGINT)  # stopped by its pid, as Ctrl+C would
        code = process.wait(60)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert f"http://127.0.0.1:{port}/ui/" in text  # the URL printed for the user
    request_lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    predict_line = next(r for r in request_lines if r["route"] == "/v1/predict")
    assert predict_line["status"] == 200 and predict_line["latency_ms"] > 0
    assert predict_line["images_sha256"] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in images]
