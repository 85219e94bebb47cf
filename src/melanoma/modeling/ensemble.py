"""Ensembles of trained runs, as a run folder like any other.

:func:`make_ensemble` builds ONE Keras model: the members' own models nested as sub-models
``member_0``, ``member_1`` ..., all fed the same input, their probabilities averaged by an
``Average`` layer named ``ensemble_mean``. Saved as the new run's ``model.keras`` beside a
``run.json`` that lists the members, it goes through ``predict``, ``evaluate``, ``explain``
(LIME sees the averaged classifier; Grad-CAM finds the members with
:func:`ensemble_members` and averages their maps), ``export`` (one ONNX graph) and
``serve`` like any run. The folder is self-contained: the members' weights are copied
into it.

A member's temperature (``temperature`` in its ``run.json``, fitted on validation; 1 where
absent) is applied before the average by dividing the kernel and bias of its softmax layer
by it: that is exactly softmax(logits / T), and the ensemble stays a model of built-in
Keras layers that loads anywhere without custom code.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from melanoma.errors import ModelError
from melanoma.files import sha256_file, utc_now, write_json
from melanoma.modeling.predict import load_keras_model
from melanoma.modeling.runs import (
    COMPLETE,
    MODEL_FILE,
    RUN_FILE,
    SPLIT_FILE,
    RunInfo,
    read_run,
)

if TYPE_CHECKING:
    import keras

ENSEMBLE_MODEL = "ensemble"
ENSEMBLE_OUTPUT = "ensemble_mean"
MEMBER_PREFIX = "member_"
COMBINE = "mean of the members' probabilities, each after its own temperature"


def member_temperature(run: RunInfo) -> float:
    """The run's fitted temperature (``run.json`` ``calibration.temperature``), 1.0 where it has none."""
    value = (run.meta.get("calibration") or {}).get("temperature")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ModelError(f"{run.path / RUN_FILE}: temperature must be a positive number, got {value!r}.")
    return float(value)


def check_members(runs: list[RunInfo]) -> None:
    """Members must be distinct finished single-model runs sharing classes, image size,
    preprocessing and (so that no member has trained on the others' test images) archive."""
    if len(runs) < 2:
        raise ModelError(f"An ensemble needs at least two runs, got {len(runs)}.")
    seen: dict[Path, Path] = {}
    for run in runs:
        resolved = run.path.resolve()
        if resolved in seen:
            raise ModelError(f"Run {run.path} is listed twice (also as {seen[resolved]}).")
        seen[resolved] = run.path
        if run.status == "running":
            raise ModelError(f"Run {run.path} is still training: its model.keras may still change.")
        if run.meta.get("model") == ENSEMBLE_MODEL:
            raise ModelError(f"Run {run.path} is itself an ensemble.", hint="List its members instead.")
    first = runs[0]
    first_archive = (first.meta.get("archive") or {}).get("sha256")
    for run in runs[1:]:
        if run.classes != first.classes:
            raise ModelError(f"Runs {first.path} and {run.path} have different classes "
                             f"({first.classes} vs {run.classes}): their probabilities cannot be averaged.")
        if run.image_size != first.image_size:
            raise ModelError(f"Runs {first.path} and {run.path} take different image sizes "
                             f"({first.image_size} vs {run.image_size} px).")
        if run.preprocess != first.preprocess:
            ours, theirs = asdict(first.preprocess), asdict(run.preprocess)
            differing = ", ".join(f"{key} {ours[key]!r} vs {theirs[key]!r}" for key in ours if ours[key] != theirs[key])
            raise ModelError(f"Runs {first.path} and {run.path} preprocess images differently ({differing}): "
                             "one input cannot serve both.")
        archive = (run.meta.get("archive") or {}).get("sha256")
        if archive != first_archive:
            raise ModelError(f"Runs {first.path} and {run.path} were trained on different archives "
                             f"({(first.meta.get('archive') or {}).get('path')} vs {(run.meta.get('archive') or {}).get('path')}): "
                             "evaluated on either, the ensemble would include images another member trained on.")


def apply_temperature(model: keras.Model, temperature: float, path: Path) -> None:
    """Divide the logits of ``model``'s softmax output layer by ``temperature``, in place."""
    import keras

    if temperature == 1.0:
        return
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense) or head.activation is not keras.activations.softmax:
        raise ModelError(f"{path}: the model does not end in a softmax Dense layer, so its temperature "
                         f"{temperature} cannot be applied.")
    head.kernel.assign(head.kernel / temperature)
    if head.use_bias:
        head.bias.assign(head.bias / temperature)


def build_ensemble(models: list[keras.Model]) -> keras.Model:
    """One model averaging the probabilities of ``models`` (renamed ``member_<i>`` in place,
    as a model's layer names must be unique)."""
    import keras

    for index, model in enumerate(models):
        model.name = f"{MEMBER_PREFIX}{index}"
    inputs = keras.Input(shape=models[0].input_shape[1:], name="image")
    outputs = keras.layers.Average(name=ENSEMBLE_OUTPUT)([model(inputs) for model in models])
    return keras.Model(inputs, outputs, name=ENSEMBLE_MODEL)


def ensemble_members(model: keras.Model) -> list[keras.Model] | None:
    """The member models of a model built by :func:`build_ensemble`, or None for any other model."""
    import keras

    layers = getattr(model, "layers", None)
    if not layers or layers[-1].name != ENSEMBLE_OUTPUT or not isinstance(layers[-1], keras.layers.Average):
        return None
    return [layer for layer in layers if isinstance(layer, keras.Model)]


class MeanGradCam:
    """Grad-CAM of an ensemble: the mean of its members' maps (``(name, GradCam)`` pairs),
    each scaled to a peak of 1 first so that every member counts equally, whatever the size
    of its gradients; then scaled to a peak of 1 again, like a single model's map."""

    def __init__(self, cams: list[tuple[str, Any]]):
        self._cams = [cam for _, cam in cams]
        self.layer_name = "mean of " + ", ".join(f"{name}/{cam.layer_name}" for name, cam in cams)

    def __call__(self, images: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
        """Heat maps in [0, 1], shaped (N, S, S), for uint8 images (N, S, S, 3)."""
        mean = np.mean([cam(images, class_indices) for cam in self._cams], axis=0)
        peak = mean.max(axis=(1, 2), keepdims=True)
        return np.divide(mean, peak, out=np.zeros_like(mean), where=peak > 0)


def make_ensemble(run_dirs: list[Path], out_dir: Path) -> RunInfo:
    """Make the run folder ``out_dir`` (new, or an empty folder) of the ensemble of
    ``run_dirs``; written in a scratch folder beside it and renamed into place, so that a
    failure leaves nothing behind."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelError(f"{out_dir} exists and is not an empty folder.", hint="Choose a new --out.")
    runs = [read_run(run_dir) for run_dir in run_dirs]
    check_members(runs)
    temperatures = [member_temperature(run) for run in runs]
    models = []
    for run, temperature in zip(runs, temperatures):
        model = load_keras_model(run.model_path)
        apply_temperature(model, temperature, run.model_path)
        models.append(model)
    ensemble = build_ensemble(models)

    first = runs[0]
    meta = {
        "run_id": out_dir.name, "model": ENSEMBLE_MODEL, "classes": first.classes, "image_size": first.image_size,
        "preprocess": first.meta["preprocess"], "archive": first.meta.get("archive"),
        "created": utc_now(), "status": COMPLETE,
        "ensemble": {"combine": COMBINE, "members": [
            {"name": f"{MEMBER_PREFIX}{index}", "run": str(run.path.resolve()), "run_id": run.run_id,
             "model": run.model, "weights": run.meta.get("weights"),
             "seed": run.training.seed if run.training else None, "temperature": temperature,
             "model_sha256": sha256_file(run.model_path)}
            for index, (run, temperature) in enumerate(zip(runs, temperatures))
        ]},
    }
    # A leftover of an interrupted run of this command is replaced.
    scratch = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        ensemble.save(scratch / MODEL_FILE)
        if (first.path / SPLIT_FILE).is_file():  # the members share the archive, hence the split
            shutil.copy2(first.path / SPLIT_FILE, scratch / SPLIT_FILE)
        write_json(scratch / RUN_FILE, meta)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above): the rename needs the name free
        os.replace(scratch, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return read_run(out_dir)
