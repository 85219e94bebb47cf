"""The app and its server: ``create_app(settings, run_dir=...)`` builds the FastAPI app
(the API of :mod:`melanoma.serving.api`, Prometheus metrics, the Gradio playground at
``/ui``); its lifespan loads the model once, warms it up, and only then reports ready.
``serve(settings, run_dir)`` runs it with uvicorn (``melanoma serve`` and ``melanoma demo``
call it), with time limits on every phase of a request, so that a slow or stalled client
cannot hold the server and a shutdown lets every request finish, and with one log format
(:mod:`melanoma.serving.logs`) for the app, uvicorn and Gradio.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from melanoma import __version__
from melanoma.config import Settings
from melanoma.errors import MelanomaError
from melanoma.modeling.explain import SegmentationParams
from melanoma.modeling.runs import find_examples, read_run
from melanoma.quiet import quiet_tensorflow
from melanoma.serving.api import (
    MAX_FILES_PER_REQUEST,
    UI_PATH,
    install_error_handlers,
    prometheus_metrics,
    router,
)
from melanoma.serving.limits import BodyLimits, H11WithHeaderTimeout
from melanoma.serving.logs import logging_config
from melanoma.serving.metrics import MULTIPROCESS_ENV, ObserveRequests, ServiceMetrics
from melanoma.serving.security import HostAndOriginGuard
from melanoma.serving.service import ModelService

log = logging.getLogger("melanoma.serving")

# How `serve` hands the settings to uvicorn's worker processes (they call the factory).
_SERVE_SPEC_ENV = "MELANOMA_SERVE_SPEC"
# Where Gradio keeps uploads (read by Gradio on each use).
_GRADIO_UPLOADS_ENV = "GRADIO_TEMP_DIR"
# A shutdown waits this much longer than the slowest request may take.
_DRAIN_MARGIN_SECONDS = 5


def create_app(
    settings: Settings,
    *,
    run_dir: Path | None = None,
    predictor: Any = None,
    examples: Sequence[Path] | None = None,
    metrics_dir: Path | None = None,
) -> FastAPI:
    """The API and the UI for the run in ``run_dir`` (loaded at start-up), or for an
    already loaded ``predictor``. ``examples``: images offered in the UI (default: the
    run folder's ``examples/``). ``metrics_dir``: the folder of Prometheus's multiprocess
    mode that this worker process was started with (``serve --workers N``), whose values
    of all workers ``/metrics`` serves; None: this process's own."""
    from melanoma.serving.ui import NonImageUploadsRefused, build_ui

    metrics = ServiceMetrics(metrics_dir)
    service = ModelService(settings, metrics, segmentation=SegmentationParams.from_settings(settings),
                           run_dir=run_dir, predictor=predictor)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await run_in_threadpool(service.start)
        except MelanomaError as exc:
            log.error("Cannot serve: %s", exc)
            raise
        log.info("Model %s loaded and warmed up: ready.", service.run_id)
        yield
        service.stop()

    options: dict[str, Any] = {
        "title": "Melanoma research playground",
        "description": "Dermoscopic lesion classification for research. **Not a medical device.**",
        "version": __version__,
        "lifespan": lifespan,
        "form_limits": {"max_files": MAX_FILES_PER_REQUEST},
    }
    # With docs: the OpenAPI pages load their scripts from the package, not from a CDN.
    app = (FastAPIOffline(**options) if settings.serve_docs
           else FastAPI(**options, docs_url=None, redoc_url=None, openapi_url=None))
    app.state.settings = settings
    app.state.service = service
    install_error_handlers(app)
    app.include_router(router)
    if settings.serve_metrics:
        app.add_api_route("/metrics", prometheus_metrics, methods=["GET"], include_in_schema=False)
    upload_dir = Path(gradio_upload_dir()).resolve()
    ui = build_ui(
        service,
        examples=find_examples(run_dir) if examples is None else list(examples),
        lime_max_samples=settings.lime_max_samples,
        upload_dir=upload_dir,
        cache_seconds=settings.ui_cache_seconds,
    )
    # Middleware, innermost first: each one added wraps those before it.
    app.add_middleware(NonImageUploadsRefused, upload_path=f"{UI_PATH}/gradio_api/upload", upload_dir=upload_dir)
    app.add_middleware(BodyLimits, max_bytes=settings.max_upload_bytes, timeout=settings.body_timeout_seconds)
    # CORS headers for allowed_origins only; Gradio's own CORS, which reflects any origin
    # when the Host is not loopback, stands aside when the parent app has this one.
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                       allow_headers=["*"])
    app.add_middleware(HostAndOriginGuard, trusted_hosts=settings.trusted_hosts,
                       allowed_origins=settings.allowed_origins)
    app.add_middleware(ObserveRequests, metrics=metrics)  # outermost: it gives the request id, and sees every refusal
    import gradio as gr  # after build_ui, which switches Gradio's analytics off

    gr.mount_gradio_app(
        app, ui, path=UI_PATH, max_file_size=settings.max_upload_bytes, footer_links=["api"], run_history=False
    )
    # Gradio checks that a file named in a request was uploaded (and not any path on the
    # server) only once it believes it has been launched, which a mounted app never is.
    ui.has_launched = True
    return app


def gradio_upload_dir() -> str:
    """Gradio's upload folder (GRADIO_TEMP_DIR, else <tmp>/gradio)."""
    from gradio.utils import get_upload_folder

    return get_upload_folder()


def app_from_environment() -> FastAPI:
    """uvicorn's factory in each worker process: the app described by ``serve``."""
    spec = json.loads(os.environ[_SERVE_SPEC_ENV])
    quiet_tensorflow(os.environ)  # a worker process imports TensorFlow afresh (the CLI's own filter stays behind)
    logging.captureWarnings(True)  # Python's warnings in the server's log format too
    metrics_dir = os.environ.get(MULTIPROCESS_ENV)  # as prometheus_client read it when imported here
    return create_app(
        Settings(**spec["settings"]),
        run_dir=Path(spec["run_dir"]),
        examples=[Path(p) for p in spec["examples"]] if spec["examples"] is not None else None,
        metrics_dir=None if metrics_dir is None else Path(metrics_dir),
    )


def ui_url(settings: Settings, root_path: str = "") -> str:
    """Where a browser on this machine finds the playground."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}{root_path}{UI_PATH}/"


@contextmanager
def _private_folder(variable: str, prefix: str) -> Iterator[str]:
    """A fresh folder, named in the environment variable ``variable`` (which the worker
    processes inherit), removed at the end; the variable is then restored."""
    previous = os.environ.get(variable)
    os.environ[variable] = folder = tempfile.mkdtemp(prefix=prefix)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if previous is None:
            del os.environ[variable]
        else:
            os.environ[variable] = previous


def serve(
    settings: Settings,
    run_dir: Path,
    *,
    workers: int = 1,
    examples: Sequence[Path] | None = None,
    root_path: str = "",
) -> None:
    """Serve the run with uvicorn on ``settings.host``:``settings.port`` until interrupted.

    The run folder is checked first, so that a wrong path is a clear error, not a failed
    worker. Each of the ``workers`` processes loads its own copy of the model; with more
    than one, their Prometheus metrics are kept in a private folder (multiprocess mode),
    deleted at the end, so that ``/metrics`` gives the same totals whichever worker
    answers. Uploads to the playground go to a private folder, deleted at the end, unless
    GRADIO_TEMP_DIR names one. Every process logs in ``settings.log_format``. A shutdown
    lets the requests in progress finish: it waits longer than the slowest may take
    (body, decoding and explanation deadlines).
    """
    import uvicorn

    read_run(run_dir)
    slowest_request = settings.body_timeout_seconds + settings.predict_timeout_seconds + settings.explain_timeout_seconds
    with ExitStack() as cleanup:
        if not os.environ.get(_GRADIO_UPLOADS_ENV):
            cleanup.enter_context(_private_folder(_GRADIO_UPLOADS_ENV, "melanoma-ui-"))
        if workers > 1:
            # Set before the workers start, and so before they import prometheus_client.
            cleanup.enter_context(_private_folder(MULTIPROCESS_ENV, "melanoma-metrics-"))
        os.environ[_SERVE_SPEC_ENV] = json.dumps({
            "settings": settings.model_dump(mode="json"),
            "run_dir": str(Path(run_dir).resolve()),
            "examples": None if examples is None else [str(Path(p).resolve()) for p in examples],
        })
        uvicorn.run(
            "melanoma.serving.app:app_from_environment",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            root_path=root_path,
            log_config=logging_config(settings.log_format),
            access_log=False,  # the request log replaces uvicorn's access log
            http=functools.partial(H11WithHeaderTimeout, header_timeout=settings.header_timeout_seconds),
            limit_concurrency=settings.limit_concurrency,
            timeout_keep_alive=settings.keep_alive_seconds,
            timeout_graceful_shutdown=math.ceil(slowest_request) + _DRAIN_MARGIN_SECONDS,
            timeout_worker_healthcheck=settings.worker_healthcheck_seconds,
        )
