"""The Gradio playground mounted at ``/ui``: upload (or pick) a dermoscopic image, see the
class probabilities, explain them with Grad-CAM or LIME, read the model card."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from melanoma.errors import MelanomaError
from melanoma.serving.limits import Upload, UploadRejected
from melanoma.serving.metrics import access_log
from melanoma.serving.service import ImagePrediction, ModelCard, ModelService

if TYPE_CHECKING:
    import gradio as gr

DISCLAIMER = (
    "**Research tool, not a medical device.** It must not be used to diagnose, treat or rule out any "
    "disease, nor to make any clinical decision. Its probabilities come from a model trained on public "
    "dermoscopy data sets; they can be wrong, above all on images unlike its training data."
)
METHODS = {"Grad-CAM": "gradcam", "LIME": "lime"}


def decision_markdown(prediction: ImagePrediction) -> str:
    """The melanoma probability and where it stands against the run's operating point."""
    if prediction.melanoma_probability is None:
        return "This model has no melanoma class."
    text = f"Melanoma probability **{prediction.melanoma_probability:.3f}**"
    if prediction.melanoma_threshold is None:
        return text + " (the run has no evaluated operating point: run `melanoma evaluate`)."
    side = "at or above" if prediction.melanoma_decision == "above_threshold" else "below"
    return text + f": {side} the run's operating point ({prediction.melanoma_threshold:.3f})."


def card_markdown(card: ModelCard) -> str:
    lines = [
        f"**Run** `{card.run_id}` · model `{card.model}` · {card.image_size} px · trained {card.trained or 'unknown'}",
        f"**Classes** {', '.join(card.classes)}",
        f"**Archive sha256** `{card.archive_sha256 or 'unknown'}`",
    ]
    metrics = card.metrics
    if not metrics:
        lines.append("**Test metrics** none: this run has not been evaluated (`melanoma evaluate`).")
        return "\n\n".join(lines)
    summary = [f"balanced accuracy {metrics['bma']:.3f}"] if "bma" in metrics else []
    summary += [f"accuracy {metrics['accuracy']:.3f}"] if "accuracy" in metrics else []
    operating = card.operating_point or {}
    summary += [f"melanoma AUC {operating['auc']:.3f}"] if "auc" in operating else []
    lines.append(f"**Test metrics** ({metrics.get('split', 'test')} split): {', '.join(summary)}")
    if "threshold" in operating:
        at = ", ".join(f"{k} {operating[k]:.3f}" for k in ("sensitivity", "specificity") if k in operating)
        lines.append(f"**Melanoma operating point** threshold {operating['threshold']:.3f} ({at})")
    return "\n\n".join(lines)


def log_request(route: str, upload: Upload, start: float) -> None:
    """The UI's events in the request log, in the API's format (their HTTP requests are
    Gradio's queue calls, which carry no image)."""
    latency_ms = round((time.perf_counter() - start) * 1000, 2)
    access_log.info(json.dumps({"route": route, "latency_ms": latency_ms, "images_sha256": [upload.sha256]}))


def build_ui(service: ModelService, *, examples: Sequence[Path], lime_max_samples: int) -> gr.Blocks:
    """The Blocks; every model call goes through ``service`` (loaded by the app's lifespan)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is first imported
    import gradio as gr

    def prepare(path: str) -> tuple[Upload, np.ndarray]:
        upload = Upload.of(Path(path).name, Path(path).read_bytes())
        try:
            return upload, service.prepare(upload)
        except (UploadRejected, MelanomaError) as exc:
            raise gr.Error(str(exc)) from None

    def classify(path: str | None) -> tuple[dict[str, float] | None, str]:
        if path is None:
            return None, ""
        start = time.perf_counter()
        upload, image = prepare(path)
        prediction = service.describe(upload, service.predict_blocking(image[None])[0])
        log_request("ui:classify", upload, start)
        return prediction.probabilities, decision_markdown(prediction)

    def explain(path: str | None, method: str, samples: float) -> tuple[Image.Image, str]:
        if path is None:
            raise gr.Error("Upload or pick an image first.")
        start = time.perf_counter()
        upload, image = prepare(path)
        timeout = service.settings.explain_timeout_seconds
        try:
            result = service.explain_blocking(image, method=METHODS[method], num_samples=int(samples), top_k=1,
                                              deadline=time.monotonic() + timeout)
        except TimeoutError:
            raise gr.Error(f"The explanation took longer than {timeout:g} s: try fewer LIME samples.") from None
        log_request(f"ui:explain:{METHODS[method]}", upload, start)
        note = (f"{method} of **{result.explained_classes[0]}** in {result.seconds:.2f} s. "
                + ("Green superpixels push towards the class, red ones against it." if method == "LIME"
                   else "Warm colours mark the regions that raise the class score most."))
        return Image.open(io.BytesIO(result.overlay_png)), note

    with gr.Blocks(title="Melanoma research playground", analytics_enabled=False) as ui:
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
                probabilities = gr.Label(label="Class probabilities", elem_id="probabilities")
                decision = gr.Markdown(elem_id="decision")
                overlay = gr.Image(label="Explanation", type="pil", interactive=False, elem_id="overlay")
                overlay_note = gr.Markdown()
        with gr.Accordion("Model card", open=False):
            card = gr.Markdown()
        image.change(classify, inputs=image, outputs=[probabilities, decision], concurrency_limit=None)
        explain_button.click(explain, inputs=[image, method, samples], outputs=[overlay, overlay_note])
        ui.load(lambda: card_markdown(service.card()), outputs=card)
    return ui
