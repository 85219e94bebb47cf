"""Fit what makes a run's predictions know their limits: the temperature (on the
validation split) and the out-of-distribution gate (statistics of the training images,
threshold on the validation images). ``train`` calls :func:`fit_reliability` at the end of
a completed run; ``melanoma calibrate`` calls it for existing runs.

What it writes: ``run.json`` gains ``calibration`` (temperature, validation NLL and ECE
before/after) and ``ood`` (method, threshold, share flagged, image counts); ``ood.npz``
holds the gate's statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from melanoma.data.archive import read_rows
from melanoma.errors import ModelError
from melanoma.files import utc_now, write_json
from melanoma.modeling.calibration import (
    fit_temperature,
    negative_log_likelihood,
    temperature_scale,
)
from melanoma.modeling.feed import check_archive
from melanoma.modeling.metrics import expected_calibration_error
from melanoma.modeling.ood import METHOD, NeighbourGate
from melanoma.modeling.predict import HEAD_LAYER, Predictor
from melanoma.modeling.runs import OOD_FILE, RUN_FILE, read_run_meta

if TYPE_CHECKING:
    from melanoma.data.archive import Archive

# Archive rows read at once: bounds memory at large image sizes.
_ROWS_PER_READ = 512


def archive_outputs(predictor: Predictor, archive: Archive, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's uncalibrated probabilities (N, C) and pooled features (N, D) for archive rows."""
    probabilities, features = [], []
    for start in range(0, len(rows), _ROWS_PER_READ):
        chunk_probabilities, chunk_features = predictor.model_outputs(read_rows(archive.images, rows[start:start + _ROWS_PER_READ]))
        if chunk_features is None:
            raise ModelError(f"The model of {predictor.run.path} has no {HEAD_LAYER!r} layer whose input "
                             "would give the features of the out-of-distribution gate.")
        probabilities.append(chunk_probabilities)
        features.append(chunk_features)
    return np.concatenate(probabilities), np.concatenate(features)


def fit_reliability(run_dir: Path, archive: Archive, *, flag_fraction: float) -> dict[str, Any]:
    """Fit the run's temperature and out-of-distribution gate on ``archive`` (the one it
    was trained on) and record them in the run; returns run.json's new ``calibration``
    and ``ood`` entries."""
    run_dir = Path(run_dir)
    predictor = Predictor.from_run(run_dir, calibration=False, ood=False)  # refitted here
    check_archive(predictor.run.meta, archive)
    train_rows, val_rows = archive.indices("train"), archive.indices("val")
    val_labels = archive.labels[val_rows]
    val_probabilities, val_features = archive_outputs(predictor, archive, val_rows)
    temperature = fit_temperature(val_labels, val_probabilities)
    calibrated = temperature_scale(val_probabilities, temperature)
    fitted = utc_now()
    calibration = {
        "method": "temperature", "temperature": temperature, "fitted_on": "val", "n_images": len(val_rows),
        "val_nll_before": negative_log_likelihood(val_labels, val_probabilities),
        "val_nll_after": negative_log_likelihood(val_labels, val_probabilities, temperature),
        "val_ece_before": expected_calibration_error(val_labels, val_probabilities),
        "val_ece_after": expected_calibration_error(val_labels, calibrated),
        "fitted": fitted,
    }
    _, train_features = archive_outputs(predictor, archive, train_rows)
    gate = NeighbourGate.fit(train_features)
    gate = gate.with_threshold(gate.score(val_features), flag_fraction)
    gate.save(run_dir)
    ood = {
        "method": METHOD, "file": OOD_FILE, "features": f"input of the {HEAD_LAYER!r} layer (pooled)",
        "feature_size": int(train_features.shape[1]), "threshold": gate.threshold, "flag_fraction": flag_fraction,
        "k": gate.k, "fitted_on": {"reference": "train", "threshold": "val"}, "n_train": len(train_rows),
        "n_val": len(val_rows), "fitted": fitted,
    }
    meta = read_run_meta(run_dir)
    meta.update(calibration=calibration, ood=ood)
    write_json(run_dir / RUN_FILE, meta)
    return {"calibration": calibration, "ood": ood}
