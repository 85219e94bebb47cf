"""The Gradio playground mounted at ``/ui``: upload (or pick) a dermoscopic image, see the
calibrated class probabilities (or a warning when the image does not look like the
training images, or is a poor input), explain them with Grad-CAM or LIME, read the model
card.

It only ever reads files uploaded to it (or its examples, which Gradio copies into the same
upload folder): a request naming any other path on the server is refused. Uploads that
are not images are deleted as soon as they arrive; the rest, and the explanations, are
deleted after ``ui_cache_seconds``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from melanoma.errors import MelanomaError
from melanoma.serving.limits import Busy, Upload, UploadRejected, sniff_media_type
from melanoma.serving.metrics import REQUEST_ID, log_request
from melanoma.serving.responses import error_response
from melanoma.serving.service import (
    ImagePrediction,
    ModelCard,
    ModelService,
    class_name,
)

if TYPE_CHECKING:
    import gradio as gr

DISCLAIMER = (
    "**Research tool, not a medical device.** It must not be used to diagnose, treat or rule out any "
    "disease, nor to make any clinical decision. Its probabilities come from a model trained on public "
    "dermoscopy data sets; they can be wrong, above all on images unlike its training data."
)
METHODS = {"Grad-CAM": "gradcam", "LIME": "lime"}
OOD_WARNING = "This does not look like a dermoscopic image like those the model was trained on"
OOD_LABEL = "Not recognised as a dermoscopic image"


def label_value(prediction: ImagePrediction) -> dict[str, float] | str:
    """What the label shows: the probabilities by full class name, or, when the
    out-of-distribution gate fires, a refusal instead of a confident top class."""
    if prediction.in_distribution is False:
        return OOD_LABEL
    return {class_name(code): p for code, p in prediction.probabilities.items()}


def warnings_markdown(prediction: ImagePrediction) -> str:
    """The out-of-distribution warning and the input-quality warnings, if any."""
    lines = []
    if prediction.in_distribution is False:
        lines.append(f"⚠️ **{OOD_WARNING}** (out-of-distribution score {prediction.ood_score:.3g}, above the "
                     f"threshold {prediction.ood_threshold:.3g}). The probabilities below are shown for the record: "
                     "do not trust them.")
    lines += [f"⚠️ **{w.code.replace('_', ' ').capitalize()}**: {w.message}" for w in prediction.warnings]
    return "\n\n".join(lines)


def probabilities_markdown(prediction: ImagePrediction) -> str:
    ordered = sorted(prediction.probabilities.items(), key=lambda item: -item[1])
    return "\n".join(["| class | probability |", "|---|---|"] + [f"| {class_name(c)} | {p:.3f} |" for c, p in ordered])


def decision_markdown(prediction: ImagePrediction) -> str:
    """The melanoma probability and where it stands against the run's operating point; for
    an out-of-distribution image, every probability as a table (nothing is hidden)."""
    calibrated = " (calibrated)" if prediction.temperature != 1 else ""
    if prediction.melanoma_probability is None:
        text = "This model has no melanoma class."
    else:
        text = f"Melanoma probability{calibrated} **{prediction.melanoma_probability:.3f}**"
        if prediction.melanoma_threshold is None:
            text += " (the run has no operating point evaluated for these probabilities: run `melanoma evaluate`)."
        else:
            side = "at or above" if prediction.melanoma_decision == "above_threshold" else "below"
            text += f": {side} the run's operating point ({prediction.melanoma_threshold:.3f})."
    if prediction.in_distribution is False:
        text += "\n\n" + probabilities_markdown(prediction)
    return text


CARD_METRICS = (("balanced accuracy", ("bma",)), ("accuracy", ("accuracy",)), ("melanoma ROC AUC", ("melanoma", "auc")),
                ("melanoma sensitivity", ("melanoma", "sensitivity")), ("melanoma specificity", ("melanoma", "specificity")),
                ("expected calibration error", ("ece",)), ("Brier score", ("brier",)))


def _metric(metrics: dict | None, path: tuple[str, ...]) -> str:
    value: Any = metrics or {}
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return "–" if value is None else f"{value:.3f}"


def card_markdown(card: ModelCard) -> str:
    lines = [
        f"**Run** `{card.run_id}` · model `{card.model}` · {card.image_size} px · trained {card.trained or 'unknown'}",
        f"**Classes** {', '.join(class_name(c) for c in card.classes)}",
        f"**Archive sha256** `{card.archive_sha256 or 'unknown'}`",
    ]
    if card.calibration:
        applied = "applied" if card.temperature != 1 else "not applied (calibration switched off)"
        lines.append(f"**Calibration** temperature {card.calibration['temperature']:.3f}, fitted on the validation "
                     f"split ({applied}): validation ECE {card.calibration['val_ece_before']:.3f} → "
                     f"{card.calibration['val_ece_after']:.3f}")
    if card.ood:
        lines.append(f"**Out-of-distribution gate** cosine distance of the model's features to the training images, "
                     f"threshold {card.ood['threshold']:.3g} (flags {card.ood['flag_fraction']:.0%} of validation images)")
    metrics = card.metrics
    if not metrics:
        lines.append("**Test metrics** none: this run has not been evaluated (`melanoma evaluate`).")
        return "\n\n".join(lines)
    columns = [f"this run's {metrics.get('split', 'test')} split (in distribution)"]
    if card.cross_site_metrics:
        columns.append(f"another clinic (run `{card.cross_site_run_id}`)")
    table = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, path in CARD_METRICS:
        values = [_metric(metrics, path)] + ([_metric(card.cross_site_metrics, path)] if card.cross_site_metrics else [])
        table.append(f"| {name} | " + " | ".join(values) + " |")
    lines.append("**Test metrics**\n\n" + "\n".join(table))
    operating = card.operating_point or {}
    if "threshold" in operating:
        lines.append(f"**Melanoma operating point** threshold {operating['threshold']:.3f}, chosen on the validation "
                     f"split for sensitivity {operating.get('target_sensitivity', 0):.3f}")
    return "\n\n".join(lines)


def log_event(route: str, upload: Upload, start: float) -> None:
    """The UI's events in the request log, in the API's format (their HTTP requests are
    Gradio's queue calls, which carry no image)."""
    latency_ms = round((time.perf_counter() - start) * 1000, 2)
    log_request({"route": route, "latency_ms": latency_ms, "images_sha256": [upload.sha256]})


def is_image_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        return sniff_media_type(handle.read(16)) is not None


class NonImageUploadsRefused:
    """ASGI middleware around the playground's upload route (``upload_path``): when a file
    Gradio has just written is not an image (by its bytes), every file of that upload is
    deleted and the client gets a 415, so that nothing but images stays on disk."""

    def __init__(self, app: ASGIApp, upload_path: str, upload_dir: Path) -> None:
        self.app = app
        self.upload_path = upload_path
        self.upload_dir = upload_dir

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(self.upload_path):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []

        async def hold(message: Message) -> None:
            messages.append(message)

        await self.app(scope, receive, hold)  # returns once Gradio has moved the files into place
        if messages and messages[0]["status"] == 200:
            body = b"".join(message.get("body", b"") for message in messages[1:])
            paths = [Path(p).resolve() for p in json.loads(body)]
            paths = [p for p in paths if p.is_relative_to(self.upload_dir)]
            refused = [p.name for p in paths if p.is_file() and not is_image_file(p)]
            if refused:
                for path in paths:
                    path.unlink(missing_ok=True)
                    with contextlib.suppress(OSError):  # Gradio's folder per upload, if now empty
                        path.parent.rmdir()
                response = error_response(415, "unsupported_media_type",
                                          f"{', '.join(refused)}: not a supported image; the upload was deleted.",
                                          request_id=scope.get("state", {}).get(REQUEST_ID), file=refused[0])
                await response(scope, receive, send)
                return
        for message in messages:
            await send(message)


def build_ui(service: ModelService, *, examples: Sequence[Path], lime_max_samples: int, upload_dir: Path,
             cache_seconds: int) -> gr.Blocks:
    """The Blocks; every model call goes through ``service`` (loaded by the app's lifespan).
    Only files in ``upload_dir`` (Gradio's upload folder) are read; Gradio deletes the
    uploads and results older than ``cache_seconds``, every ``cache_seconds``."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is first imported
    import gradio as gr

    def prepare(path: str) -> tuple[Upload, np.ndarray]:
        file = Path(path).resolve()
        if not file.is_relative_to(upload_dir):  # whatever Gradio checked, never read another file of the server
            raise gr.Error("Only images uploaded to this playground can be classified.")
        upload = Upload.of(file.name, file.read_bytes())
        try:
            with service.decodes.slot():
                return upload, service.prepare(upload)
        except (UploadRejected, MelanomaError) as exc:
            file.unlink(missing_ok=True)  # e.g. a non-image sent inline: it must not stay on disk
            raise gr.Error(str(exc)) from None
        except Busy as exc:
            raise gr.Error(str(exc)) from None

    def classify(path: str | None) -> tuple[dict[str, float] | str | None, str, str]:
        if path is None:
            return None, "", ""
        start = time.perf_counter()
        upload, image = prepare(path)
        prediction = service.describe(upload, service.predict_blocking(image[None]), image)
        log_event("ui:classify", upload, start)
        return label_value(prediction), decision_markdown(prediction), warnings_markdown(prediction)

    def explain(path: str | None, method: str, samples: float) -> tuple[Image.Image, str]:
        if path is None:
            raise gr.Error("Upload or pick an image first.")
        start = time.perf_counter()
        upload, image = prepare(path)
        timeout = service.settings.explain_timeout_seconds
        try:
            with service.explanations.slot():
                result = service.explain_blocking(image, method=METHODS[method], num_samples=int(samples), top_k=1,
                                                  deadline=time.monotonic() + timeout)
        except TimeoutError:
            raise gr.Error(f"The explanation took longer than {timeout:g} s: try fewer LIME samples.") from None
        except Busy as exc:
            raise gr.Error(str(exc)) from None
        log_event(f"ui:explain:{METHODS[method]}", upload, start)
        note = (f"{method} of **{result.explained_classes[0]}** in {result.seconds:.2f} s. "
                + ("Green superpixels push towards the class, red ones against it." if method == "LIME"
                   else "Warm colours mark the regions that raise the class score most."))
        return Image.open(io.BytesIO(result.overlay_png)), note

    with gr.Blocks(title="Melanoma research playground", analytics_enabled=False,
                   delete_cache=(cache_seconds, cache_seconds)) as ui:
        gr.Markdown("# Melanoma research playground")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Dermoscopic image", type="filepath", image_mode=None, sources=["upload"],
                                 elem_id="image")
                if examples:
                    gr.Examples(examples=[[str(p)] for p in examples], inputs=[image], label="Examples")
                method = gr.Radio(list(METHODS), value="Grad-CAM", label="Explanation method")
                samples = gr.Slider(10, lime_max_samples, value=lime_max_samples, step=10,
                                    label="LIME samples (fewer: faster, less steady)")
                explain_button = gr.Button("Explain", variant="primary")
            with gr.Column():
                warning = gr.Markdown(elem_id="warnings")
                probabilities = gr.Label(label="Class probabilities", elem_id="probabilities")
                decision = gr.Markdown(elem_id="decision")
                overlay = gr.Image(label="Explanation", type="pil", interactive=False, elem_id="overlay")
                overlay_note = gr.Markdown()
        with gr.Accordion("Model card", open=False):
            card = gr.Markdown()
        image.change(classify, inputs=image, outputs=[probabilities, decision, warning], concurrency_limit=None)
        explain_button.click(explain, inputs=[image, method, samples], outputs=[overlay, overlay_note])
        ui.load(lambda: card_markdown(service.card()), outputs=card)
    return ui
