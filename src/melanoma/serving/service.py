"""The model behind the API and the UI: loaded once, warmed up, shared by all requests.

Every prediction goes through one worker thread that stacks the images of all requests
waiting at that moment into a single model call (a micro-batch): under load, one call
serves many clients, and a single client pays no waiting window. Decoding and explaining
run in threads of their own, a bounded number at once (beyond that a request is refused
at once, never queued without bound), so that predictions are served while a LIME
explanation runs and health checks never wait behind model work; one LIME explanation
runs at a time, and each stops at its deadline.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import numpy as np
from pydantic import BaseModel, Field

from melanoma.config import CLASS_NAMES, MELANOMA_LABELS, Settings
from melanoma.data.preprocess import load_image
from melanoma.data.quality import QualityLimits, quality_warnings, source_size
from melanoma.errors import ImageError, ModelError
from melanoma.serving.limits import (
    Gate,
    Upload,
    UploadRejected,
    check_upload,
    check_uploads,
)
from melanoma.serving.metrics import MODEL_INFO_LABELS, ServiceMetrics

if TYPE_CHECKING:
    from melanoma.modeling.explain import SegmentationParams

log = logging.getLogger("melanoma.serving")

# Largest number of images in one model call of the micro-batcher: bounds its memory
# while amortising the per-call overhead.
MAX_BATCH = 64
# Retry-After of a refused request: decoding takes milliseconds, an explanation seconds.
DECODE_RETRY_AFTER_SECONDS = 1
EXPLAIN_RETRY_AFTER_SECONDS = 5


def class_name(code: str) -> str:
    """A class code in words, with the code: "Melanoma (mel)"; the code alone where unknown."""
    name = CLASS_NAMES.get(code.lower())
    return f"{name} ({code})" if name else code


class InputWarning(BaseModel):
    """An input-quality problem found before the model ran."""

    code: Literal["too_small", "near_blank", "blurred", "extreme_aspect_ratio"]
    message: str


class ImagePrediction(BaseModel):
    """The model's answer for one image."""

    file: str = Field(description="The uploaded file's name (as sent by the client).")
    sha256: str = Field(description="SHA-256 of the uploaded bytes.")
    probabilities: dict[str, float] = Field(
        description="Probability of each class, in the run's class order (temperature-scaled when `temperature` is not 1)."
    )
    temperature: float = Field(description="The temperature applied to the model's probabilities (1: uncalibrated).")
    top_class: str
    top_class_name: str = Field(description='The top class in words, e.g. "Melanoma (mel)".')
    top_probability: float
    ood_score: float | None = Field(
        description="Out-of-distribution score (cosine distance of the model's features to the k-th nearest training "
        "image; None where the run has no gate)."
    )
    ood_threshold: float | None = Field(description="Scores above this are out of distribution.")
    in_distribution: bool | None = Field(
        description="False when the image does not look like the dermoscopic images the model was trained on: "
        "its probabilities are then not to be trusted."
    )
    warnings: list[InputWarning] = Field(description="Input-quality warnings (checked before the model ran).")
    melanoma_probability: float | None = Field(
        description="Probability of the melanoma class (None if the run has none)."
    )
    melanoma_threshold: float | None = Field(
        description="The run's melanoma operating point from its evaluation (None if it was not evaluated, or was "
                    "evaluated with another temperature or with TTA: a threshold chosen there does not apply here)."
    )
    melanoma_decision: Literal["above_threshold", "below_threshold"] | None = Field(
        description="Whether the melanoma probability reaches the operating point: a research signal, not a diagnosis."
    )


class ModelCard(BaseModel):
    """What is being served, and how well it did on its test split."""

    run_id: str
    model: str
    classes: list[str]
    image_size: int
    engine: str
    archive_sha256: str | None
    trained: str | None = Field(description="When the run was created (run.json `created`).")
    preprocess: dict[str, Any]
    melanoma_class: str | None
    operating_point: dict[str, Any] | None = Field(description="metrics.json `melanoma`: threshold, sensitivity ...")
    metrics: dict[str, Any] | None = Field(description="The run's metrics.json, if it has been evaluated.")
    temperature: float = Field(description="The temperature applied to probabilities (1: uncalibrated).")
    calibration: dict[str, Any] | None = Field(description="run.json `calibration`: the fitted temperature and its effect.")
    ood: dict[str, Any] | None = Field(description="run.json `ood`: the out-of-distribution gate.")
    cross_site_run_id: str | None = Field(None, description="The cross-clinic run of the same model, if configured.")
    cross_site_metrics: dict[str, Any] | None = Field(None, description="Its metrics.json (test on another clinic).")


@dataclass
class Explanation:
    """An explanation of one image's prediction: the overlay figure and its numbers."""

    method: str
    probabilities: dict[str, float]
    explained_classes: list[str]  # most probable first
    overlay_png: bytes
    details: dict[str, Any]       # explain's to_dict(): Grad-CAM layer / LIME local models
    seconds: float


class _UntilDeadline:
    """The predictor as LIME sees it, refusing to work past a deadline: an explanation
    whose request has timed out stops at its next batch instead of running on."""

    def __init__(self, predictor: Any, deadline: float):
        self.predictor = predictor
        self.classes = predictor.classes
        self.deadline = deadline

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        if time.monotonic() > self.deadline:
            raise TimeoutError("the explanation ran past its deadline")
        return self.predictor.predict_arrays(images)


@dataclass
class _Job:
    images: np.ndarray
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Runs ``predict`` in one worker thread on the images of every job waiting at once."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int = MAX_BATCH):
        self._predict = predict
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="melanoma-predict", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, images: np.ndarray) -> Future:
        """Queue uint8 images (N, S, S, 3); the future resolves to their probabilities (N, C)."""
        if self._thread is None:
            raise ModelError("The model is not loaded (the server is starting or stopping).")
        job = _Job(images)
        self._jobs.put(job)
        return job.future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            batch, size = [job], len(job.images)
            stopping = False
            while size < self._max_batch:
                try:
                    waiting = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stopping = True
                    break
                batch.append(waiting)
                size += len(waiting.images)
            self._run(batch)
            if stopping:
                return

    def _run(self, batch: list[_Job]) -> None:
        try:
            probabilities = self._predict(np.concatenate([job.images for job in batch]))
        except Exception as exc:  # noqa: BLE001 - hand the failure to every waiting request
            for job in batch:
                job.future.set_exception(exc)
            return
        start = 0
        for job in batch:
            job.future.set_result(probabilities[start : start + len(job.images)])
            start += len(job.images)


class ModelService:
    """The predictor of one run, with its micro-batcher, metrics and model card;
    ``segmentation``: how LIME explanations cut images into superpixels."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, *, segmentation: SegmentationParams,
                 run_dir: Path | None = None, predictor: Any = None):
        if run_dir is None and predictor is None:
            raise ModelError("The server needs a run folder (or a loaded Predictor) to serve.")
        self.settings = settings
        self.metrics = metrics
        self.segmentation = segmentation
        self._run_dir = run_dir
        self._predictor = predictor
        self._batcher = MicroBatcher(lambda images: self.predictor.analyse_arrays(images))
        self._cross_site: Any = None  # RunInfo of settings.cross_site_run, read at start
        self._lime_lock = threading.Lock()
        self.decodes = Gate("image decode", settings.max_concurrent_decodes, DECODE_RETRY_AFTER_SECONDS)
        self.explanations = Gate("explanation", settings.max_concurrent_explanations, EXPLAIN_RETRY_AFTER_SECONDS)
        self.ready = False

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Load the model (unless given), warm it up, start the batcher."""
        if self._predictor is None:
            from melanoma.modeling.predict import Predictor

            self._predictor = Predictor.from_run(self._run_dir, max_pixels=self.settings.serve_max_pixels,
                                                 calibration=self.settings.calibration)
        if self.settings.cross_site_run is not None:
            from melanoma.modeling.runs import read_run

            self._cross_site = read_run(self.settings.cross_site_run)
        predictor = self._predictor
        # The first calls build compiled functions and import LIME's libraries (seconds):
        # pay for them now, not on a user's request. (Figures are drawn by matplotlib.)
        blank = np.zeros((1, predictor.image_size, predictor.image_size, 3), np.uint8)
        predictor.predict_arrays(blank)
        try:
            from melanoma.modeling import explain

            explain.explain_lime(predictor, blank[0], num_samples=10, seed=0, top_k=1, segmentation=self.segmentation)
            if predictor.model is not None:  # Grad-CAM needs the Keras engine
                explain.gradcam_for(predictor)(blank, [0])
        except Exception as exc:  # noqa: BLE001 - predictions are still served; explain requests will say why
            log.warning("Explanations do not work with this model: %s", exc)
        self._batcher.start()
        card = self.card()
        info = {"run_id": card.run_id, "model": card.model, "classes": ",".join(card.classes),
                "image_size": str(card.image_size), "engine": card.engine, "archive_sha256": card.archive_sha256 or ""}
        self.metrics.model.labels(*(info[name] for name in MODEL_INFO_LABELS)).set(1)
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self._batcher.stop()

    @property
    def run_id(self) -> str:
        return self.predictor.run.run_id

    @property
    def predictor(self) -> Any:
        if self._predictor is None:
            raise ModelError("The model is not loaded yet.")
        return self._predictor

    # ------------------------------------------------------------------ prediction
    def prepare(self, upload: Upload) -> np.ndarray:
        """Check an upload (type, pixel count) and turn it into model pixels."""
        check_upload(upload, max_pixels=self.settings.serve_max_pixels)
        return self._decode(upload)

    def prepare_all(self, uploads: list[Upload]) -> np.ndarray:
        """The model pixels (N, S, S, 3) of a request's uploads, once all their headers
        have passed the per-image and per-request pixel limits."""
        check_uploads(uploads, max_pixels=self.settings.serve_max_pixels,
                      max_request_pixels=self.settings.max_request_pixels)
        return np.stack([self._decode(upload) for upload in uploads])

    async def decode(self, uploads: list[Upload]) -> np.ndarray:
        """:meth:`prepare_all` in a decode thread (:class:`Busy` if all are taken)."""
        return await self.decodes.run(self.prepare_all, uploads)

    def _decode(self, upload: Upload) -> np.ndarray:
        try:
            return load_image(upload.data, self.predictor.params, name=upload.name)
        except ImageError as exc:
            raise UploadRejected(422, "invalid_image", str(exc), upload.name) from None

    async def predict(self, images: np.ndarray) -> Any:
        """The :class:`~melanoma.modeling.predict.Prediction` of images (N, S, S, 3), computed
        by the batcher without blocking the event loop."""
        return await asyncio.wrap_future(self._batcher.submit(images))

    def predict_blocking(self, images: np.ndarray) -> Any:
        """The same, for callers in worker threads (the Gradio UI)."""
        return self._batcher.submit(images).result()

    def describe(self, upload: Upload, prediction: Any, image: np.ndarray) -> ImagePrediction:
        """One image's prediction (a Prediction of length 1) and input-quality warnings
        (from the upload's header and its model pixels ``image``) as the API reports
        them; counts its top class."""
        classes = self.predictor.classes
        probabilities = prediction.probabilities[0]
        top = int(np.argmax(probabilities))
        self.metrics.predictions.labels(classes[top]).inc()
        melanoma = self.melanoma_index()
        threshold = self.melanoma_threshold()
        melanoma_probability = None if melanoma is None else float(probabilities[melanoma])
        decision = None
        if melanoma_probability is not None and threshold is not None:
            decision = "above_threshold" if melanoma_probability >= threshold else "below_threshold"
        gate = self.predictor.ood_gate
        limits = QualityLimits.from_settings(self.settings, self.predictor.image_size)
        return ImagePrediction(
            file=upload.name,
            sha256=upload.sha256,
            probabilities={name: float(p) for name, p in zip(classes, probabilities)},
            temperature=self.predictor.temperature,
            top_class=classes[top],
            top_class_name=class_name(classes[top]),
            top_probability=float(probabilities[top]),
            ood_score=None if prediction.ood_score is None else float(prediction.ood_score[0]),
            ood_threshold=None if gate is None else gate.threshold,
            in_distribution=None if prediction.in_distribution is None else bool(prediction.in_distribution[0]),
            warnings=[InputWarning(**w.to_dict()) for w in quality_warnings(source_size(upload.data), image, limits)],
            melanoma_probability=melanoma_probability,
            melanoma_threshold=threshold,
            melanoma_decision=decision,
        )

    def melanoma_index(self) -> int | None:
        classes = self.predictor.classes
        return next((i for i, name in enumerate(classes) if name in MELANOMA_LABELS), None)

    def melanoma_threshold(self) -> float | None:
        """The run's melanoma operating point, where it was chosen on probabilities like the
        ones served: of the same temperature (a threshold on uncalibrated probabilities means
        nothing on calibrated ones, and the reverse) and without TTA (the server predicts
        one view; `evaluate --tta` chooses the threshold on averages over 8)."""
        metrics = self.predictor.run.metrics or {}
        threshold = (metrics.get("melanoma") or {}).get("threshold")
        if threshold is None or metrics.get("tta") or \
                not math.isclose(float(metrics.get("temperature", 1.0)), self.predictor.temperature):
            return None
        return float(threshold)

    # ------------------------------------------------------------------ model card
    def card(self) -> ModelCard:
        predictor = self.predictor
        run = predictor.run
        metrics = run.metrics
        melanoma = self.melanoma_index()
        return ModelCard(
            run_id=run.run_id,
            model=run.model,
            classes=list(predictor.classes),
            image_size=predictor.image_size,
            engine=predictor.engine,
            archive_sha256=run.archive_sha256,
            trained=run.meta.get("created"),
            preprocess=predictor.params.to_dict(),
            melanoma_class=None if melanoma is None else predictor.classes[melanoma],
            operating_point=(metrics or {}).get("melanoma"),
            metrics=metrics,
            temperature=predictor.temperature,
            calibration=run.calibration,
            ood=run.ood,
            cross_site_run_id=None if self._cross_site is None else self._cross_site.run_id,
            cross_site_metrics=None if self._cross_site is None else self._cross_site.metrics,
        )

    # ------------------------------------------------------------------ explanation
    async def explain(self, image: np.ndarray, *, method: str, num_samples: int, top_k: int) -> Explanation:
        """Explain one preprocessed image in an explanation thread (:class:`Busy` if all
        are taken); TimeoutError after ``explain_timeout_seconds`` (the thread then stops at
        its next model call)."""
        timeout = self.settings.explain_timeout_seconds
        deadline = time.monotonic() + timeout

        def work() -> Explanation:
            return self.explain_blocking(image, method=method, num_samples=num_samples, top_k=top_k,
                                         deadline=deadline)

        with anyio.fail_after(timeout):
            return await self.explanations.run(work)

    def explain_blocking(self, image: np.ndarray, *, method: str, num_samples: int, top_k: int,
                         deadline: float) -> Explanation:
        """Explain one preprocessed uint8 image with Grad-CAM or LIME (one LIME at a time);
        TimeoutError past ``deadline`` (a ``time.monotonic()`` value)."""
        from melanoma.modeling import explain

        predictor = self.predictor
        start = time.perf_counter()
        if method == "gradcam":
            result: Any = explain.explain_gradcam(predictor, explain.gradcam_for(predictor), image, top_k=top_k)
            figure = result.figure()
            explained = [predictor.classes[i] for i in result.class_indices]
        else:
            if not self._lime_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError("another LIME explanation kept the explainer busy until the deadline")
            try:
                result = explain.explain_lime(
                    _UntilDeadline(predictor, deadline), image, num_samples=num_samples, seed=self.settings.seed,
                    top_k=top_k, segmentation=self.segmentation,
                )
            finally:
                self._lime_lock.release()
            figure = result.figure()
            explained = [c.class_name for c in result.contributions]
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=100)
        return Explanation(
            method=method,
            probabilities={name: float(p) for name, p in zip(predictor.classes, result.probabilities)},
            explained_classes=explained,
            overlay_png=png.getvalue(),
            details=result.to_dict(),
            seconds=time.perf_counter() - start,
        )
