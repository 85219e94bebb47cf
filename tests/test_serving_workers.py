"""`melanoma serve --workers 2` and the server's log format, as real server processes on
127.0.0.1: /metrics gives the totals of all workers whichever answers (Prometheus
multiprocess mode), also after a worker dies in the middle of a request; every line on
stderr is JSON (the app's, uvicorn's, from every process), or text when asked for."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer, live_server
from prometheus_client.parser import text_string_to_metric_families

from melanoma.config import Settings

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

PREDICTIONS = 10
# The workers load TensorFlow and the model side by side on a busy machine.
STARTUP_SECONDS = 600


def metric_total(exposition: str, name: str, **labels: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(exposition) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def wait_for(what: str, server: LiveServer, found: Any, timeout: float = 60) -> Any:
    """The first truthy ``found(json log lines)``, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := found(server.json_log()):
            return result
        time.sleep(0.2)
    pytest.fail(f"no {what} in the log after {timeout:.0f} s:\n{server.stderr.read_text()[-3000:]}")


def pid_serving(server: LiveServer, request_id: str) -> int:
    """The worker that served the request, from its line in the request log."""
    return wait_for(f"request {request_id}", server,
                    lambda lines: next((r["pid"] for r in lines if r.get("request_id") == request_id
                                        and r["logger"] == "melanoma.serving.access"), None))


def ready_workers(lines: list[dict[str, Any]]) -> set[int]:
    return {r["pid"] for r in lines if r["logger"] == "melanoma.serving" and r["message"].endswith("ready.")}


def connection_to_each_worker(server: LiveServer, workers: set[int]) -> dict[int, httpx.Client]:
    """A kept-alive connection to each worker: the kernel gives a new connection to
    whichever worker accepts first, so connect until each one has taken one."""
    clients: dict[int, httpx.Client] = {}
    for attempt in range(200):
        client = httpx.Client(base_url=server.url, timeout=60)
        request_id = f"connect-{attempt}"
        assert client.get("/healthz", headers={"X-Request-ID": request_id}).status_code == 200
        pid = pid_serving(server, request_id)
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
        if clients.keys() == workers:
            return clients
    pytest.fail(f"200 connections all went to workers {sorted(clients)} of {sorted(workers)}")


def worker_environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def test_two_workers_give_one_set_of_metrics_and_one_log_format(trained_run: Path, tmp_path: Path,
                                                                 ham_images_by_class: dict[str, Path]) -> None:
    with live_server(trained_run, tmp_path / "stdout.log", stderr=tmp_path / "stderr.log", args=("--workers", "2"),
                     ready_timeout=STARTUP_SECONDS, keep_alive_seconds=600, body_timeout_seconds=600) as server:
        wait_for("two ready workers", server, lambda lines: len(ready_workers(lines)) == 2, STARTUP_SECONDS)
        workers = ready_workers(server.json_log())
        # The workers share a private, fresh folder for their metrics.
        [folder] = {worker_environment(pid).get("PROMETHEUS_MULTIPROC_DIR") for pid in workers}
        assert folder is not None and Path(folder).name.startswith("melanoma-metrics-")

        clients = connection_to_each_worker(server, workers)
        first, second = sorted(clients)
        jpeg = ham_images_by_class["nv"].read_bytes()
        for i in range(PREDICTIONS):  # both workers predict
            response = clients[(first, second)[i % 2]].post("/v1/predict", headers={"X-Request-ID": f"predict-{i}"},
                                                            files=[("files", ("nv.jpg", jpeg, "image/jpeg"))])
            assert response.status_code == 200, response.text

        def scrape(client: httpx.Client) -> str:
            response = client.get("/metrics")
            assert response.status_code == 200, response.text
            return response.text

        for pid in (first, second) * 3:  # the same totals whichever worker answers
            exposition = scrape(clients[pid])
            assert metric_total(exposition, "melanoma_predictions_total") == PREDICTIONS
            assert metric_total(exposition, "melanoma_http_requests_total", route="/v1/predict",
                                status="200") == PREDICTIONS
            assert metric_total(exposition, "melanoma_http_request_duration_seconds_count",
                                route="/v1/predict") == PREDICTIONS
            assert metric_total(exposition, "melanoma_http_requests_in_flight") == 1  # the scrape itself
            assert metric_total(exposition, "melanoma_model_info") == 1  # one model, served by both

        # A request in flight on the first worker (its body never ends) when the worker dies.
        release = threading.Event()

        def stalled_body() -> Iterator[bytes]:
            yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
            release.wait(300)

        def send_stalled() -> None:
            # It fails, one way or another: the worker dies, then the body ends short
            # (h11's LocalProtocolError, which httpx lets through).
            with contextlib.suppress(Exception):
                clients[first].post("/v1/predict", content=stalled_body(),
                                    headers={"Content-Type": "multipart/form-data; boundary=x", "Content-Length": "99999"})

        stalled = threading.Thread(target=send_stalled)
        stalled.start()
        deadline = time.monotonic() + 60
        while metric_total(scrape(clients[second]), "melanoma_http_requests_in_flight") != 2:
            assert time.monotonic() < deadline, "the stalled request never counted as in flight"
            time.sleep(0.2)
        os.kill(first, signal.SIGKILL)
        # uvicorn notices once its health check of the worker times out (worker_healthcheck_seconds).
        wait_for("the supervisor noticing the dead worker", server,
                 lambda lines: any(r["message"] == f"Child process [{first}] died" for r in lines),
                 3 * Settings().worker_healthcheck_seconds)
        exposition = scrape(clients[second])
        assert metric_total(exposition, "melanoma_http_requests_in_flight") == 1  # the dead worker's request is gone
        assert metric_total(exposition, "melanoma_predictions_total") == PREDICTIONS  # its counts are not
        release.set()
        stalled.join(60)
        # uvicorn replaces the dead worker; once it is ready, the totals are still the same.
        wait_for("the replacement worker ready", server, lambda lines: len(ready_workers(lines)) == 3, STARTUP_SECONDS)
        exposition = scrape(httpx.Client(base_url=server.url, timeout=60))
        assert metric_total(exposition, "melanoma_predictions_total") == PREDICTIONS
        assert metric_total(exposition, "melanoma_model_info") == 1
        for client in clients.values():
            client.close()
        assert server.stop() == 0, server.stderr.read_text()[-3000:]
    assert not Path(folder).exists()  # removed at shutdown

    # Every line on stderr is JSON, from the parent and every worker.
    lines = [json.loads(line) for line in server.stderr.read_text().splitlines()]
    for line in lines:
        assert {"time", "level", "logger", "pid", "message"} <= line.keys(), line
        assert datetime.fromisoformat(line["time"]).utcoffset() == timedelta(0)
    parent = next(r["pid"] for r in lines if r["message"].startswith("Started parent process"))
    assert {r["pid"] for r in lines} == {parent} | ready_workers(lines)
    messages = {(r["logger"], r["message"]) for r in lines}
    assert ("uvicorn.error", "Application startup complete.") in messages  # the workers' uvicorn lines
    assert ("uvicorn.error", f"Stopping parent process [{parent}]") in messages
    [request] = [r for r in lines if r.get("request_id") == "predict-3"]  # the id the client sent
    assert request["logger"] == "melanoma.serving.access" and request["pid"] == second
    assert (request["route"], request["status"]) == ("/v1/predict", 200)
    assert request["message"].startswith("POST /v1/predict 200 ")
    assert "request_id" not in next(r for r in lines if r["message"] == "Application startup complete.")


def test_text_logs_for_a_terminal(trained_run: Path, ham_images_by_class: dict[str, Path], tmp_path: Path) -> None:
    image = ham_images_by_class["bcc"]
    with live_server(trained_run, tmp_path / "stdout.log", stderr=tmp_path / "stderr.log",
                     args=("--log-format", "text")) as server:
        response = httpx.post(f"{server.url}/v1/predict", headers={"X-Request-ID": "terminal-1"}, timeout=60,
                              files=[("files", (image.name, image.read_bytes(), "image/jpeg"))])
        assert response.status_code == 200, response.text
        assert server.stop() == 0
    lines = server.stderr.read_text().splitlines()
    assert lines and not any(line.startswith("{") for line in lines)
    assert any(" INFO uvicorn.error[" in line and line.endswith("Application startup complete.") for line in lines)
    [request] = [line for line in lines if "[request terminal-1]" in line]
    assert " INFO melanoma.serving.access[" in request and "POST /v1/predict 200 " in request
