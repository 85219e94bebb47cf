"""Observability: Prometheus collectors (one registry per app, so that several apps can
live in one process, as in the tests) and an ASGI middleware that records every request
in them, gives it a request id and logs it as one JSON line."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class ServiceMetrics:
    """The app's collectors, in a registry of their own."""

    def __init__(self) -> None:
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
        self.in_flight = Gauge("melanoma_http_requests_in_flight", "Requests being served now.", registry=self.registry)
        self.predictions = Counter(
            "melanoma_predictions", "Images classified, by top class.", ["predicted_class"], registry=self.registry
        )
        self.model = Info("melanoma_model", "The model being served.", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


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
            record: dict[str, Any] = {
                "request_id": request_id,
                "method": scope["method"],
                "route": route,
                "status": status,
                "latency_ms": round(latency * 1000, 2),
            }
            if state.get(IMAGE_HASHES):
                record["images_sha256"] = state[IMAGE_HASHES]
            access_log.info(json.dumps(record))
