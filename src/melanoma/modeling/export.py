"""Export a run's model for other runtimes: ``model.onnx`` beside ``model.keras``.

ONNX Runtime then serves it without TensorFlow (``Predictor.from_run(..., engine="onnx")``).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from melanoma.errors import MelanomaError, ModelError
from melanoma.files import commit
from melanoma.modeling.predict import ONNX_FILE, load_keras_model
from melanoma.modeling.runs import read_run

EXPORT_FORMATS = ("onnx",)


def export_model(run_dir: Path, export_format: str = "onnx") -> Path:
    """Write the run's model in ``export_format`` into the run folder, atomically; returns its path."""
    if export_format not in EXPORT_FORMATS:
        raise MelanomaError(f"Unknown export format {export_format!r}: choose one of {', '.join(EXPORT_FORMATS)}.")
    run = read_run(run_dir)
    model = load_keras_model(run.model_path)
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
        except Exception as exc:  # tf2onnx raises many types for unsupported operations
            raise ModelError(f"Model {run.model_path} cannot be exported to ONNX: {exc}") from None
        commit(partial, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
