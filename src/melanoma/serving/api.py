"""The REST API: request and response schemas, the dependencies that hand the routes the
model service and the settings, the routes, and the error handlers that turn every error
into a JSON :class:`~melanoma.serving.responses.ErrorBody`.

:func:`melanoma.serving.app.create_app` puts the ``router`` and the handlers into an app
(as FastAPI's project template splits the routes from the app).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from melanoma.config import Settings
from melanoma.errors import ImageError, MelanomaError, ModelError
from melanoma.serving.limits import ACCEPTED_TYPES, Busy, Upload, UploadRejected
from melanoma.serving.metrics import IMAGE_HASHES, REQUEST_ID
from melanoma.serving.responses import ErrorBody, error_response
from melanoma.serving.service import ImagePrediction, ModelCard, ModelService

log = logging.getLogger("melanoma.serving")

UI_PATH = "/ui"
# Most images in one /v1/predict request (the body size is bounded separately).
MAX_FILES_PER_REQUEST = 64


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
