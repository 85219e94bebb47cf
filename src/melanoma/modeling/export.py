"""Export a run's model for other runtimes: ``model.onnx`` beside ``model.keras``.

ONNX Runtime then serves it without TensorFlow (``Predictor.from_run(..., engine="onnx")``).
The file describes itself in its ``metadata_props`` (ONNX Runtime:
``session.get_modelmeta().custom_metadata_map``): class order, input size, layout, value
range and normalisation, and the preprocessing that made the training images, so that it
can be used without this project (docs/architecture.md lists the keys).
The exported graph has two outputs, the probabilities and the pooled features, so that the
ONNX engine scores images with the run's out-of-distribution gate as the Keras one does.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from melanoma.data.card import preprocessing_text
from melanoma.errors import MelanomaError, ModelError
from melanoma.files import commit
from melanoma.modeling.predict import load_keras_model, with_features
from melanoma.modeling.runs import ONNX_FILE, RunInfo, read_run
from melanoma.provenance import git_state

EXPORT_FORMATS = ("onnx",)


def export_model(run_dir: Path, export_format: str = "onnx") -> Path:
    """Write the run's model in ``export_format`` into the run folder, atomically; returns its path."""
    if export_format not in EXPORT_FORMATS:
        raise MelanomaError(f"Unknown export format {export_format!r}: choose one of {', '.join(EXPORT_FORMATS)}.")
    run = read_run(run_dir)
    model = with_features(load_keras_model(run.model_path))
    model(np.zeros((1, run.image_size, run.image_size, 3), np.float32))  # export needs a built call graph
    target = run.path / ONNX_FILE
    # Keras writes the file itself (via tf2onnx), so export into a scratch folder beside the
    # target and move the finished file into place.
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=run.path))
    try:
        partial = scratch / ONNX_FILE
        try:
            with warnings.catch_warnings():  # tf2onnx's own NumPy deprecation warnings
                warnings.simplefilter("ignore", FutureWarning)
                model.export(str(partial), format="onnx", verbose=False)
        except Exception as exc:  # noqa: BLE001 - tf2onnx raises many types for unsupported operations
            raise ModelError(f"Model {run.model_path} cannot be exported to ONNX: {exc}") from None
        _add_metadata(partial, onnx_metadata(run))
        commit(partial, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def onnx_metadata(run: RunInfo) -> dict[str, str]:
    """What a user of ``model.onnx`` needs to know, as string metadata (values that are
    lists or objects are JSON)."""
    size = run.image_size
    git = run.meta.get("git") or git_state()
    return {
        "classes": json.dumps(run.classes),
        "image_size": str(size),
        "input": f"float32 tensor (N, {size}, {size}, 3), NHWC, RGB",
        "input_value_range": "0..255",
        "normalization": "none outside the model: feed RGB pixel values 0..255 as float32; the model "
                         "rescales and normalises them itself",
        "output": "float32 (N, classes): softmax probabilities in the order of 'classes'",
        "temperature": repr(run.temperature),
        "calibration": "calibrated probabilities = softmax(log(output) / temperature); temperature 1 means uncalibrated",
        "preprocess": json.dumps(run.preprocess.to_dict()),
        "preprocess_summary": preprocessing_text(run.preprocess.to_dict()),
        "model": str(run.meta.get("model")),
        "run_id": run.run_id,
        "training_data": str((run.meta.get("archive") or {}).get("source")),
        "git_commit": "unknown" if git is None else git["commit"] + (" (uncommitted changes)" if git["dirty"] else ""),
        "intended_use": "research on dermoscopic image classification only; not a medical device, not for diagnosis",
    }


def _add_metadata(path: Path, properties: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, properties)
    onnx.save(model, str(path))
