"""A real `melanoma serve` on 127.0.0.1 under more explanations than it runs at once:
the surplus is refused at once (JSON 503 with Retry-After), health checks and predictions
are served meanwhile, and a shutdown while an explanation runs lets it finish with a
JSON answer, never a 500."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, live_server
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

EXPLANATIONS = 2
LIME_CLIENTS = 8


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(trained_run, tmp_path_factory.mktemp("log") / "server.log",
                     max_concurrent_explanations=EXPLANATIONS, explain_timeout_seconds=60) as server:
        yield server


def lime(server: LiveServer, image: Path) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/explain", timeout=120, data={"method": "lime", "samples": "1000"},
                      files=[("file", (image.name, image.read_bytes(), "image/jpeg"))])


def test_explanations_over_the_limit_are_refused_while_health_and_predictions_are_served(
        server: LiveServer, ham_images_by_class: dict[str, Path]) -> None:
    image = ham_images_by_class["bkl"]
    responses: list[httpx.Response] = []
    start = threading.Barrier(LIME_CLIENTS)

    def client() -> None:
        start.wait()
        responses.append(lime(server, image))

    threads = [threading.Thread(target=client) for _ in range(LIME_CLIENTS)]
    for thread in threads:
        thread.start()
    served_during: list[str] = []
    for _ in range(100):  # bounded: stops by itself once the explanations are done
        if not any(thread.is_alive() for thread in threads):
            break
        health = httpx.get(f"{server.url}/healthz", timeout=30)
        ready = httpx.get(f"{server.url}/readyz", timeout=30)
        predict = httpx.post(f"{server.url}/v1/predict", timeout=30,
                             files=[("files", (image.name, image.read_bytes(), "image/jpeg"))])
        assert (health.status_code, ready.status_code, predict.status_code) == (200, 200, 200), predict.text
        if any(thread.is_alive() for thread in threads):
            served_during.append("answered while explanations ran")
    for thread in threads:
        thread.join(180)
    statuses = sorted(r.status_code for r in responses)
    assert len(statuses) == LIME_CLIENTS and 500 not in statuses, statuses
    refused = [r for r in responses if r.status_code == 503]
    assert len(refused) >= LIME_CLIENTS - EXPLANATIONS, statuses  # all arrived while the first ones ran
    for response in refused:
        body = response.json()
        assert body["error"] == "busy" and int(response.headers["retry-after"]) >= 1
        assert body["request_id"] == response.headers["x-request-id"]
    assert served_during, "the explanations were over before any health check"


def test_a_shutdown_lets_a_running_explanation_finish(server: LiveServer, ham_images_by_class: dict[str, Path]
                                                      ) -> None:
    result: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: result.append(lime(server, ham_images_by_class["mel"])))
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and requests_in_flight(server) < 2:  # the explanation and this question
        time.sleep(0.1)
    code = server.stop()
    thread.join(120)
    assert code == 0, server.log.read_text()[-3000:]
    [response] = result
    assert response.status_code in (200, 504), response.text  # finished, or its own deadline: JSON either way
    assert response.headers["x-request-id"]
    if response.status_code == 504:
        assert response.json()["request_id"] == response.headers["x-request-id"]
    else:
        assert response.json()["method"] == "lime"
    assert "Exception in ASGI application" not in server.log.read_text()


def requests_in_flight(server: LiveServer) -> float:
    metrics = text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text)
    return next(f.samples[0].value for f in metrics if f.name == "melanoma_http_requests_in_flight")
