"""Observability: Prometheus collectors (one registry per app, so that several apps can
live in one process, as in the tests) and an ASGI middleware that records every request
in them, gives it a request id and logs it as one line.

With several worker processes (``serve --workers N``), prometheus_client's multiprocess
mode keeps each process's values in files of one folder (``PROMETHEUS_MULTIPROC_DIR``, set
before the workers start), and ``/metrics`` adds them up, so that every worker answers a
scrape with the same figures.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from melanoma.serving.logs import current_request_id

access_log = logging.getLogger("melanoma.serving.access")

# Key under which endpoints leave the uploaded images' sha256 in the request state.
IMAGE_HASHES = "image_sha256"
# Key of the request id in the request state, and the header that carries it both ways.
REQUEST_ID = "request_id"
REQUEST_ID_HEADER = "x-request-id"
# A proxy's request id is kept if it is a plain token (it goes into logs and headers).
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Prediction latencies are milliseconds; explanations take seconds.
_LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The variable through which prometheus_client learns its multiprocess folder (read when it is imported).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
MODEL_INFO_LABELS = ("run_id", "model", "classes", "image_size", "engine", "archive_sha256")


class ServiceMetrics:
    """The app's collectors, in a registry of their own. ``multiprocess_dir``: the folder
    of prometheus_client's multiprocess mode, which this process was started with (None:
    one process, whose own values are served)."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "melanoma_http_requests", "HTTP requests served.", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "melanoma_http_request_duration_seconds",
            "Time from receiving a request to the end of its response.",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Gauges say how to add up the workers: requests in flight in the live ones.
        self.in_flight = Gauge("melanoma_http_requests_in_flight", "Requests being served now.",
                               multiprocess_mode="livesum", registry=self.registry)
        self.predictions = Counter(
            "melanoma_predictions", "Images classified, by top class.", ["predicted_class"], registry=self.registry
        )
        # An info metric as a gauge of 1 (prometheus_client's Info has no multiprocess mode).
        self.model = Gauge("melanoma_model_info", "The model being served.", list(MODEL_INFO_LABELS),
                           multiprocess_mode="livemax", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type: of all workers' values in
        multiprocess mode."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        # One scrape at a time across the workers: forgetting a dead worker removes files
        # that another worker's scrape may be reading.
        with open(Path(self.multiprocess_dir) / ".scrape.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            forget_dead_workers(self.multiprocess_dir)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(self.multiprocess_dir))
            return generate_latest(registry), CONTENT_TYPE_LATEST


def forget_dead_workers(multiprocess_dir: Path) -> None:
    """Drop the live gauges (requests in flight, model info) of worker processes that no
    longer run, as prometheus_client's ``mark_process_dead`` does: uvicorn, which replaces a
    dead worker, has no hook in which to call it. Counters and histograms of a dead worker
    are kept, so that totals never go down."""
    pids = {int(path.stem.rsplit("_", 1)[1]) for path in Path(multiprocess_dir).glob("gauge_live*_*.db")}
    for pid in pids:
        try:
            os.kill(pid, 0)  # signal 0: does the process exist?
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                mark_process_dead(pid, str(multiprocess_dir))
        except PermissionError:
            pass  # it exists, as another user's process


def log_request(fields: dict[str, Any]) -> None:
    """One line of the request log: ``fields`` (``route`` and ``latency_ms`` at least) as
    the record's extra fields, which the JSON format writes as keys; the text format shows
    the message."""
    words = " ".join(str(fields[key]) for key in ("method", "route", "status") if key in fields)
    access_log.info("%s %.2f ms", words, fields["latency_ms"], extra=fields)


def route_label(scope: Scope, root_path: str) -> str:
    """The matched route's template (``/v1/predict``, ``/ui/gradio_api/queue/join``),
    never the raw path, so that the number of label values stays bounded."""
    route = scope.get("route")
    if route is None or not hasattr(route, "path"):
        return "unmatched"
    # A mounted app (Gradio) extends root_path by its mount point before routing inside.
    mount = scope.get("root_path", root_path)[len(root_path):]
    return mount + route.path


def request_id_of(scope: Scope) -> str:
    """The id a proxy gave the request (``X-Request-ID``), if it is a plain token, else a new one."""
    given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
    return given if _VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class ObserveRequests:
    """ASGI middleware: gives each request an id (returned in ``X-Request-ID``); request
    count, latency and in-flight gauge; one log line per request with its id, route,
    status, latency and the images' sha256 (never the images)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        root_path = scope.get("root_path", "")
        state = scope.setdefault("state", {})
        state[REQUEST_ID] = request_id = request_id_of(scope)
        # Not reset at the end: uvicorn serves each request in a task of its own (with a copy
        # of the context), and the error handlers outside this middleware log with it too.
        current_request_id.set(request_id)
        status = 500  # what the client gets if the app fails before responding

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            self.metrics.in_flight.dec()
            latency = time.perf_counter() - start
            route = route_label(scope, root_path)
            labels = (scope["method"], route, str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(latency)
            fields: dict[str, Any] = {
                "request_id": request_id,  # also for handlers without the request-id filter
                "method": scope["method"],
                "route": route,
                "status": status,
                "latency_ms": round(latency * 1000, 2),
            }
            if state.get(IMAGE_HASHES):
                fields["images_sha256"] = state[IMAGE_HASHES]
            log_request(fields)
