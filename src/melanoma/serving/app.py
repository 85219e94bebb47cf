"""The FastAPI app: a REST API over one training run, Prometheus metrics, and the Gradio
playground at ``/ui``.

``create_app(settings, run_dir=...)`` builds the app; its lifespan loads the model once,
warms it up, and only then reports ready. ``serve(settings, run_dir)`` runs it with
uvicorn (``melanoma serve`` and ``melanoma demo`` call it), with time limits on every
phase of a request, so that a slow or stalled client cannot hold the server and a
shutdown lets every request finish.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from melanoma import __version__
from melanoma.config import Settings
from melanoma.errors import ImageError, MelanomaError, ModelError
from melanoma.serving.limits import ACCEPTED_TYPES, BodyLimits, Busy, H11WithHeaderTimeout, Upload, UploadRejected
from melanoma.serving.metrics import IMAGE_HASHES, REQUEST_ID, ObserveRequests, ServiceMetrics, access_log
from melanoma.serving.responses import ErrorBody, error_response
from melanoma.serving.security import HostAndOriginGuard
from melanoma.serving.service import ImagePrediction, ModelCard, ModelService

log = logging.getLogger("melanoma.serving")

UI_PATH = "/ui"
# Most images in one /v1/predict request (the body size is bounded separately).
MAX_FILES_PER_REQUEST = 64
EXAMPLES_DIR = "examples"
EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")
# How `serve` hands the settings to uvicorn's worker processes (they call the factory).
_SERVE_SPEC_ENV = "MELANOMA_SERVE_SPEC"
# Where Gradio keeps uploads (read by Gradio on each use).
_GRADIO_UPLOADS_ENV = "GRADIO_TEMP_DIR"
# A shutdown waits this much longer than the slowest request may take.
_DRAIN_MARGIN_SECONDS = 5


# --------------------------------------------------------------------------- response models
class PredictResponse(BaseModel):
    run_id: str
    predictions: list[ImagePrediction]


class ExplainResponse(BaseModel):
    file: str
    sha256: str
    method: Literal["gradcam", "lime"]
    probabilities: dict[str, float]
    explained_classes: list[str] = Field(description="The classes explained, most probable first.")
    overlay_png_base64: str = Field(description="The overlay figure as a base64-encoded PNG.")
    details: dict[str, Any] = Field(
        description="Grad-CAM: layer and mean relevance per class. LIME: samples, seed, superpixels and, per "
        "class, its local linear model (a weight per superpixel, intercept, R^2)."
    )
    seconds: float


class Status(BaseModel):
    status: str
    run_id: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": description}
    for code, description in {
        408: "The request body did not arrive within body_timeout_seconds.",
        413: "Request body over max_upload_bytes, image over serve_max_pixels, or images over max_request_pixels.",
        415: f"Not an image: the bytes are none of {', '.join(ACCEPTED_TYPES)}.",
        422: "Corrupt or unusable image, or invalid form fields.",
        503: "The model is not loaded (starting or stopping), or the server is busy (see Retry-After).",
    }.items()
}


# --------------------------------------------------------------------------- dependencies
def get_service(request: Request) -> ModelService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_ready_service(service: Annotated[ModelService, Depends(get_service)]) -> ModelService:
    if not service.ready:
        raise HTTPException(503, "The model is not loaded (the server is starting or stopping).")
    return service


ReadyService = Annotated[ModelService, Depends(get_ready_service)]
CurrentSettings = Annotated[Settings, Depends(get_settings)]


async def read_uploads(request: Request, files: Sequence[UploadFile]) -> list[Upload]:
    """The uploaded files; their sha256 go to the request's log line."""
    uploads = [Upload.of(file.filename or f"file {i + 1}", await file.read()) for i, file in enumerate(files)]
    setattr(request.state, IMAGE_HASHES, [upload.sha256 for upload in uploads])
    return uploads


# --------------------------------------------------------------------------- routes
router = APIRouter()


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses={**ERROR_RESPONSES, 504: {"model": ErrorBody, "description": "Over predict_timeout_seconds."}},
    tags=["model"],
)
async def predict(
    request: Request,
    files: Annotated[list[UploadFile], File(description=f"One or more images: {', '.join(ACCEPTED_TYPES)}.")],
    service: ReadyService,
) -> PredictResponse:
    """Class probabilities (calibrated), top class, melanoma probability and the run's
    operating-point decision for each uploaded image, with its out-of-distribution score
    (``in_distribution``: false when it does not look like the training images) and
    input-quality warnings."""
    uploads = await read_uploads(request, files)
    timeout = service.settings.predict_timeout_seconds
    try:
        with anyio.fail_after(timeout):
            images = await service.decode(uploads)
            batch = await service.predict(images)
    except TimeoutError:
        raise HTTPException(504, f"The prediction took longer than predict_timeout_seconds={timeout:g} s.") from None
    return PredictResponse(
        run_id=service.run_id,
        predictions=[service.describe(upload, batch[i : i + 1], images[i]) for i, upload in enumerate(uploads)],
    )


@router.post(
    "/v1/explain",
    response_model=ExplainResponse,
    responses={**ERROR_RESPONSES, 504: {"model": ErrorBody, "description": "Over explain_timeout_seconds."}},
    tags=["model"],
)
async def explain(
    request: Request,
    file: Annotated[UploadFile, File(description="One dermoscopic image.")],
    service: ReadyService,
    settings: CurrentSettings,
    method: Annotated[Literal["gradcam", "lime"], Form(description="gradcam (milliseconds) or lime (seconds).")] = (
        "gradcam"
    ),
    samples: Annotated[
        int | None, Form(ge=10, description="LIME samples (default and maximum: the lime_max_samples setting).")
    ] = None,
    top_k: Annotated[int, Form(ge=1, description="Explain this many of the most probable classes.")] = 1,
) -> ExplainResponse:
    """Why the model predicts what it does for one image: the overlay (PNG, base64) and
    its numbers."""
    num_samples_limit = settings.lime_max_samples
    num_samples = num_samples_limit if samples is None else samples
    if num_samples > num_samples_limit:
        raise HTTPException(422, f"samples={num_samples} is over the limit lime_max_samples={num_samples_limit}.")
    if top_k > len(service.predictor.classes):
        raise HTTPException(422, f"top_k={top_k} is over the number of classes ({len(service.predictor.classes)}).")
    [upload] = await read_uploads(request, [file])
    try:
        with anyio.fail_after(settings.predict_timeout_seconds):
            [image] = await service.decode([upload])
    except TimeoutError:
        raise HTTPException(504, f"Decoding the image took longer than predict_timeout_seconds="
                                 f"{settings.predict_timeout_seconds:g} s.") from None
    try:
        result = await service.explain(image, method=method, num_samples=num_samples, top_k=top_k)
    except TimeoutError:
        raise HTTPException(
            504,
            f"The {method} explanation took longer than explain_timeout_seconds="
            f"{settings.explain_timeout_seconds:g} s; try fewer LIME samples, or Grad-CAM.",
        ) from None
    return ExplainResponse(
        file=upload.name,
        sha256=upload.sha256,
        method=method,
        probabilities=result.probabilities,
        explained_classes=result.explained_classes,
        overlay_png_base64=base64.b64encode(result.overlay_png).decode("ascii"),
        details=result.details,
        seconds=result.seconds,
    )


# The light endpoints are coroutines: they run on the event loop, never waiting for a
# thread behind model work.
@router.get("/v1/model", response_model=ModelCard, responses={503: ERROR_RESPONSES[503]}, tags=["model"])
async def model_card(service: ReadyService) -> ModelCard:
    """Classes, input size, model, run id, archive checksum, training date, test metrics."""
    return service.card()


@router.get("/healthz", response_model=Status, tags=["health"])
async def healthz() -> Status:
    """Liveness: the process answers."""
    return Status(status="alive")


@router.get("/readyz", response_model=Status, responses={503: {"model": Status}}, tags=["health"])
async def readyz(service: Annotated[ModelService, Depends(get_service)]) -> Response:
    """Readiness: the model is loaded and a warm-up prediction has been made."""
    if not service.ready:
        return JSONResponse(Status(status="not_ready").model_dump(), status_code=503)
    return JSONResponse(Status(status="ready", run_id=service.run_id).model_dump())


async def prometheus_metrics(service: Annotated[ModelService, Depends(get_service)]) -> Response:
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/", include_in_schema=False)
async def home(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{request.scope.get('root_path', '')}{UI_PATH}/")


# --------------------------------------------------------------------------- errors
def _error(request: Request, status: int, error: str, detail: str, file: str | None = None,
           headers: Any = None) -> JSONResponse:
    return error_response(status, error, detail, request_id=getattr(request.state, REQUEST_ID, None), file=file,
                          headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error is a JSON ErrorBody with the request's id; bad input is a 4xx, never a 500."""

    @app.exception_handler(UploadRejected)
    async def rejected(request: Request, exc: UploadRejected) -> JSONResponse:
        return _error(request, exc.status_code, exc.error, exc.detail, exc.file)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return _error(request, 503, "busy", str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ImageError)
    async def bad_image(request: Request, exc: ImageError) -> JSONResponse:
        return _error(request, 422, "invalid_image", str(exc))

    @app.exception_handler(ModelError)
    async def model_unavailable(request: Request, exc: ModelError) -> JSONResponse:
        return _error(request, 503, "service_unavailable", str(exc))  # not loaded, or cannot (Grad-CAM on ONNX)

    @app.exception_handler(MelanomaError)
    async def user_error(request: Request, exc: MelanomaError) -> JSONResponse:
        return _error(request, 422, "invalid_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only location and message: the offending input may be binary.
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(request, 422, "invalid_request", problems)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        return _error(request, exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("Unexpected error on %s %s", request.method, request.url.path)
        return _error(request, 500, "internal_error", "An unexpected error occurred; it has been logged.")


# --------------------------------------------------------------------------- the app
def find_examples(run_dir: Path | None) -> list[Path]:
    """Example images for the UI: the run folder's ``examples/`` images, if any."""
    folder = None if run_dir is None else Path(run_dir) / EXAMPLES_DIR
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES)


def add_examples(run_dir: Path, manifest: Any, *, split: str = "test", max_images: int = 4) -> list[Path]:
    """Copy one held-out source image per class (up to ``max_images``) into the run's
    ``examples/`` folder, so that the playground offers real images the model never saw."""
    folder = Path(run_dir) / EXAMPLES_DIR
    folder.mkdir(exist_ok=True)
    held_out = manifest[manifest["split"] == split]
    copied = []
    for _, row in held_out.groupby("label", sort=True).head(1).head(max_images).iterrows():
        source = Path(row["path"])
        target = folder / f"{row['label']}-{source.name}"
        shutil.copyfile(source, target)
        copied.append(target)
    return copied


def create_app(
    settings: Settings,
    *,
    run_dir: Path | None = None,
    predictor: Any = None,
    examples: Sequence[Path] | None = None,
) -> FastAPI:
    """The API and the UI for the run in ``run_dir`` (loaded at start-up), or for an
    already loaded ``predictor``. ``examples``: images offered in the UI (default: the
    run folder's ``examples/``)."""
    from melanoma.serving.ui import NonImageUploadsRefused, build_ui

    metrics = ServiceMetrics()
    service = ModelService(settings, metrics, run_dir=run_dir, predictor=predictor)

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

    options: dict[str, Any] = dict(
        title="Melanoma research playground",
        description="Dermoscopic lesion classification for research. **Not a medical device.**",
        version=__version__,
        lifespan=lifespan,
        form_limits={"max_files": MAX_FILES_PER_REQUEST},
    )
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
    return create_app(
        Settings(**spec["settings"]),
        run_dir=Path(spec["run_dir"]),
        examples=[Path(p) for p in spec["examples"]] if spec["examples"] is not None else None,
    )


def ui_url(settings: Settings, root_path: str = "") -> str:
    """Where a browser on this machine finds the playground."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}{root_path}{UI_PATH}/"


def logging_config() -> dict[str, Any]:
    """uvicorn's logging, plus the request log (one JSON line per request) on stderr."""
    from uvicorn.config import LOGGING_CONFIG

    config = json.loads(json.dumps(LOGGING_CONFIG))
    config["formatters"]["bare"] = {"format": "%(message)s"}
    config["handlers"]["requests"] = {
        "class": "logging.StreamHandler", "formatter": "bare", "stream": "ext://sys.stderr"
    }
    config["loggers"]["melanoma"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["loggers"][access_log.name] = {"handlers": ["requests"], "level": "INFO", "propagate": False}
    return config


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
    worker. Each of the ``workers`` processes loads its own copy of the model. Uploads to
    the playground go to a private folder, deleted at the end, unless GRADIO_TEMP_DIR names
    one. A shutdown lets the requests in progress finish: it waits longer than the
    slowest may take (body, decoding and explanation deadlines).
    """
    import uvicorn

    from melanoma.modeling.runs import read_run

    read_run(run_dir)
    private_uploads = None
    if not os.environ.get(_GRADIO_UPLOADS_ENV):
        private_uploads = os.environ[_GRADIO_UPLOADS_ENV] = tempfile.mkdtemp(prefix="melanoma-ui-")
    os.environ[_SERVE_SPEC_ENV] = json.dumps({
        "settings": settings.model_dump(mode="json"),
        "run_dir": str(Path(run_dir).resolve()),
        "examples": None if examples is None else [str(Path(p).resolve()) for p in examples],
    })
    slowest_request = settings.body_timeout_seconds + settings.predict_timeout_seconds + settings.explain_timeout_seconds
    try:
        uvicorn.run(
            "melanoma.serving.app:app_from_environment",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            root_path=root_path,
            log_config=logging_config(),
            access_log=False,  # the request log replaces uvicorn's access log
            http=functools.partial(H11WithHeaderTimeout, header_timeout=settings.header_timeout_seconds),
            limit_concurrency=settings.limit_concurrency,
            timeout_keep_alive=settings.keep_alive_seconds,
            timeout_graceful_shutdown=math.ceil(slowest_request) + _DRAIN_MARGIN_SECONDS,
        )
    finally:
        if private_uploads is not None:
            shutil.rmtree(private_uploads, ignore_errors=True)
            del os.environ[_GRADIO_UPLOADS_ENV]
