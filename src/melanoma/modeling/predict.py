"""Predict with a trained run: load the model once, then classify paths, bytes or arrays.

The images go through :func:`melanoma.data.preprocess.load_image` with the run's own
preprocessing parameters, so inference sees the same pixels as training did. Inference
never calls ``model.predict`` (10-250 ms of fixed overhead per call): the Keras engine uses
``predict_on_batch`` (a compiled function, traced at most twice: Keras then relaxes the
batch size), the ONNX engine an ONNX Runtime session on the run's ``model.onnx`` (see
:mod:`.export`).

Both engines return the probabilities and the pooled penultimate features. The predictor
applies the run's temperature (:mod:`.calibration`) to the probabilities unless asked not
to, and scores the features with the run's out-of-distribution gate (:mod:`.ood`).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from melanoma.data.preprocess import PreprocessParams, load_image
from melanoma.data.quality import (
    QualityLimits,
    QualityWarning,
    quality_warnings,
    source_size,
)
from melanoma.errors import ImageError, MelanomaError, ModelError
from melanoma.modeling.calibration import temperature_scale
from melanoma.modeling.ood import NeighbourGate
from melanoma.modeling.runs import ONNX_FILE, RunInfo, read_run

ENGINES = ("keras", "onnx")
# Largest batch sent to the model at once: bounds memory, and is large enough that the
# per-call overhead is negligible.
_CHUNK = 128
# The classifier's last layer in every model of .models: its input is the pooled feature vector.
HEAD_LAYER = "probabilities"

ImageSource = str | Path | bytes | np.ndarray
# images -> (probabilities (N, C), pooled features (N, D) or None where the model has no such output)
Infer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def load_keras_model(path: Path) -> Any:
    """Load a ``.keras`` file for inference, with a clear error if it is corrupt."""
    import keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - keras raises many types (ValueError, BadZipFile, OSError ...)
        raise ModelError(f"Model file {path} cannot be loaded (corrupt or not a Keras model): {exc}") from None


def tta_views(images: np.ndarray) -> np.ndarray:
    """The 8 flips/rotations of each image (the dihedral group), shaped (8, N, S, S, 3).

    Dermoscopic images have no canonical orientation, so every view is an equally
    valid picture of the lesion.
    """
    rotations = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    return np.stack(rotations + [r[:, :, ::-1] for r in rotations])


def tta_mean(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """``predict`` (images -> probabilities) averaged over the 8 views of each image."""
    views = tta_views(images)
    flat = predict(views.reshape(-1, *images.shape[1:]))
    return flat.reshape(len(views), len(images), -1).mean(axis=0)


def check_pixel_values(images: np.ndarray) -> None:
    """Refuse arrays that are not pixels as the model was trained on: uint8, or floats
    within 0..255 (no NaN or infinity). Anything else would still give confident,
    meaningless probabilities."""
    if images.dtype == np.uint8:
        return
    if not np.issubdtype(images.dtype, np.floating):
        raise ImageError(f"Expected uint8 pixels or floats in 0..255, got dtype {images.dtype}.")
    if images.size and not np.isfinite(images).all():
        raise ImageError("The images contain NaN or infinite values; expected pixels in 0..255.")
    if images.size and (images.min() < 0 or images.max() > 255):
        raise ImageError(f"Pixel values must lie in 0..255, got {images.min():g}..{images.max():g}.")


@dataclass
class Prediction:
    """What the model says about a batch of images; ``batch[a:b]`` is a smaller batch."""

    probabilities: np.ndarray            # (N, C), temperature-scaled when the predictor calibrates
    uncalibrated: np.ndarray             # (N, C), the model's own softmax
    ood_score: np.ndarray | None         # (N,), None where the run has no out-of-distribution gate
    in_distribution: np.ndarray | None   # (N,) bool: the score is at or below the gate's threshold

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, index: slice) -> Prediction:
        return Prediction(self.probabilities[index], self.uncalibrated[index],
                          None if self.ood_score is None else self.ood_score[index],
                          None if self.in_distribution is None else self.in_distribution[index])


@dataclass
class FilePredictions:
    """The result of :meth:`Predictor.predict_files`."""

    paths: list[Path]                 # the files that were predicted, in input order
    probabilities: np.ndarray         # (len(paths), C)
    skipped: list[tuple[Path, str]]   # (file, reason) for every file that could not be read
    ood_score: np.ndarray | None = None        # as in Prediction
    in_distribution: np.ndarray | None = None
    warnings: list[list[QualityWarning]] = dataclasses.field(default_factory=list)  # per file, when checked


class Predictor:
    """A run's model, loaded once, behind a lock so that threads can share it."""

    def __init__(self, run: RunInfo, infer: Infer, *, engine: str, params: PreprocessParams, model: Any = None,
                 temperature: float = 1.0, ood_gate: NeighbourGate | None = None):
        self.run = run
        self.classes = list(run.classes)
        self.image_size = run.image_size
        self.params = params
        self.engine = engine
        self.temperature = temperature  # applied to every probability; 1: the model's own
        self.ood_gate = ood_gate
        self._infer = infer
        self._lock = threading.Lock()
        self.model = model  # the Keras model of the "keras" engine (Grad-CAM needs it)

    @classmethod
    def from_run(cls, run_dir: Path, *, engine: str = "keras", max_pixels: int | None = None,
                 calibration: bool = True, ood: bool = True) -> Predictor:
        """Load ``run_dir``'s model with ``engine`` ("keras" or "onnx"), its temperature
        (unless ``calibration`` is False) and its out-of-distribution gate (unless ``ood``
        is False), where fitted."""
        if engine not in ENGINES:
            raise ModelError(f"Unknown engine {engine!r}: choose one of {', '.join(ENGINES)}.")
        run = read_run(run_dir)
        params = run.preprocess
        if params.image_size != run.image_size:
            params = dataclasses.replace(params, image_size=run.image_size)
        if max_pixels is not None:
            params = dataclasses.replace(params, max_pixels=max_pixels)
        gate_meta = run.ood if ood else None
        temperature = run.temperature if calibration else 1.0
        model = None
        if engine == "keras":
            model = load_keras_model(run.model_path)
            _check_model_shape(run, run.model_path, model.input_shape, model.output_shape)
            infer = _keras_infer(model)
        else:
            infer = _onnx_session(run, needs_features=gate_meta is not None)
        # After the model: a broken model is the error to report first.
        fitted_gate = NeighbourGate.load(run.path, gate_meta["threshold"]) if gate_meta else None
        return cls(run, infer, engine=engine, params=params, model=model, temperature=temperature, ood_gate=fitted_gate)

    def preprocess(self, source: ImageSource) -> np.ndarray:
        """One image as the model sees it: uint8 RGB (S, S, 3)."""
        return load_image(source, self.params)

    def predict_arrays(self, images: np.ndarray, *, tta: bool = False) -> np.ndarray:
        """Class probabilities (N, C) for preprocessed images (N, S, S, 3): uint8, or float32
        holding the same 0..255 values."""
        return temperature_scale(self.model_outputs(images, tta=tta)[0], self.temperature)

    def analyse_arrays(self, images: np.ndarray, *, tta: bool = False) -> Prediction:
        """Probabilities (calibrated and not) and the out-of-distribution score of
        preprocessed images. With ``tta`` the probabilities are averaged over the 8 views;
        the score is that of the image as given, as the gate's threshold was."""
        probabilities, features = self.model_outputs(images, tta=tta)
        scores = inside = None
        if self.ood_gate is not None:
            scores = self.ood_gate.score(features)
            inside = self.ood_gate.in_distribution(scores)
        return Prediction(temperature_scale(probabilities, self.temperature), probabilities, scores, inside)

    def model_outputs(self, images: np.ndarray, *, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The model's own probabilities (N, C), uncalibrated, and pooled features (N, D)
        (None where the model has no features output)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ImageError(
                f"Expected images of shape (N, {self.image_size}, {self.image_size}, 3), got {images.shape}."
            )
        check_pixel_values(images)
        if not tta:
            return self._run_batches(images)
        views = tta_views(images)
        probabilities, features = self._run_batches(views.reshape(-1, *images.shape[1:]))
        probabilities = probabilities.reshape(len(views), len(images), -1).mean(axis=0)
        return probabilities, None if features is None else features[:len(images)]  # view 0 is the image

    def predict(self, sources: Sequence[ImageSource], *, tta: bool = False) -> np.ndarray:
        """Class probabilities (N, C) for paths, encoded bytes or RGB arrays (ImageError if one is bad)."""
        if not sources:
            return np.zeros((0, len(self.classes)), np.float32)
        return self.predict_arrays(np.stack([self.preprocess(s) for s in sources]), tta=tta)

    def predict_files(self, paths: Iterable[Path], *, tta: bool = False,
                      on_progress: Callable[[int], None] | None = None,
                      quality: QualityLimits | None = None) -> FilePredictions:
        """Predict files in chunks; unreadable ones are skipped and reported with the reason.

        ``on_progress(n)`` is called after each chunk with the number of files handled.
        With ``quality``, each file's input-quality warnings are returned too.
        """
        kept: list[Path] = []
        skipped: list[tuple[Path, str]] = []
        warnings: list[list[QualityWarning]] = []
        results = []
        paths = [Path(p) for p in paths]
        for start in range(0, len(paths), _CHUNK):
            images = []
            for path in paths[start:start + _CHUNK]:
                try:
                    images.append(self.preprocess(path))
                    kept.append(path)
                except ImageError as exc:
                    skipped.append((path, str(exc)))
                    continue
                if quality is not None:
                    warnings.append(quality_warnings(source_size(path), images[-1], quality))
            if images:
                results.append(self.analyse_arrays(np.stack(images), tta=tta))
            if on_progress is not None:
                on_progress(len(paths[start:start + _CHUNK]))
        if not results:
            return FilePredictions(kept, np.zeros((0, len(self.classes)), np.float32), skipped, warnings=warnings)
        scores = None if self.ood_gate is None else np.concatenate([r.ood_score for r in results])
        return FilePredictions(kept, np.concatenate([r.probabilities for r in results]), skipped, scores,
                               None if scores is None else self.ood_gate.in_distribution(scores), warnings)

    def _run_batches(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        probabilities, features = [], []
        with self._lock:
            for start in range(0, len(images), _CHUNK):
                batch = np.ascontiguousarray(images[start:start + _CHUNK], dtype=np.float32)
                chunk_probabilities, chunk_features = self._infer(batch)
                probabilities.append(np.asarray(chunk_probabilities, np.float32))
                features.append(chunk_features)
        if not probabilities:
            return np.zeros((0, len(self.classes)), np.float32), None
        if any(f is None for f in features):
            return np.concatenate(probabilities), None
        return np.concatenate(probabilities), np.concatenate(features).astype(np.float32, copy=False)


def _check_model_shape(run: RunInfo, path: Path, input_shape: Sequence, output_shape: Sequence) -> None:
    """The model must take the run's image size and return one probability per class."""
    expected = (run.image_size, run.image_size, 3)
    if tuple(input_shape[1:]) != expected:
        raise ModelError(
            f"Model file {path} takes input of shape {tuple(input_shape[1:])}, but {run.path / 'run.json'} "
            f"says images are {expected}: the model belongs to another run or image size."
        )
    if output_shape[-1] != len(run.classes):
        raise ModelError(
            f"Model file {path} has {output_shape[-1]} outputs, but the run has {len(run.classes)} classes."
        )


def with_features(model: Any) -> Any:
    """The Keras model with a second output: the input of its last layer (the pooled
    features); the model itself where it has no such layer."""
    import keras

    try:
        head = model.get_layer(HEAD_LAYER)
    except ValueError:
        return model
    return keras.Model(model.inputs, [model.outputs[0], head.input], name=f"{model.name}_with_features")


def _keras_infer(model: Any) -> Infer:
    both = with_features(model)
    if both is model:
        return lambda x: (np.asarray(model.predict_on_batch(x)), None)

    def infer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities, features = both.predict_on_batch(x)
        return np.asarray(probabilities), np.asarray(features)

    return infer


def _onnx_session(run: RunInfo, *, needs_features: bool) -> Infer:
    import onnxruntime as ort

    path = run.path / ONNX_FILE
    if not path.is_file():
        raise ModelError(f"{run.path} has no {ONNX_FILE}.", hint=f"Create it with `melanoma export --run {run.path}`.")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
        raise ModelError(f"ONNX model {path} cannot be loaded: {exc}") from None
    model_input = session.get_inputs()[0]
    _check_model_shape(run, path, model_input.shape, session.get_outputs()[0].shape)
    if len(session.get_outputs()) < 2:
        if needs_features:
            raise ModelError(f"{path} was exported without the features output that the out-of-distribution "
                             "gate needs.", hint=f"Export it again with `melanoma export --run {run.path}`.")
        return lambda x: (session.run(None, {model_input.name: x})[0], None)
    return lambda x: tuple(session.run(None, {model_input.name: x})[:2])


def predictions_text(paths: Sequence[Path], probabilities: np.ndarray, classes: Sequence[str], fmt: str, *,
                     ood_score: np.ndarray | None = None, in_distribution: np.ndarray | None = None,
                     warnings: Sequence[Sequence[QualityWarning]] | None = None) -> str:
    """Predictions as ``csv`` (file, prediction, probability, one column per class, then
    ``ood_score``, ``in_distribution`` and ``warnings`` where given), ``isic`` (the ISIC 2019
    submission format of :func:`melanoma.modeling.isic.submission_table`, the image id
    being the file name without suffix) or ``json`` (a list of records)."""
    import pandas as pd

    from melanoma.modeling.isic import submission_table

    if fmt == "isic":
        return submission_table([p.stem for p in paths], probabilities, list(classes)).to_csv(index=False)
    best = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, int)
    frame = pd.DataFrame({
        "file": [str(p) for p in paths],
        "prediction": [classes[i] for i in best],
        "probability": probabilities[np.arange(len(best)), best],
    })
    frame = pd.concat([frame, pd.DataFrame(probabilities, columns=list(classes))], axis=1)
    if ood_score is not None:
        frame["ood_score"] = ood_score
        frame["in_distribution"] = in_distribution
    if warnings:
        frame["warnings"] = [";".join(w.code for w in found) for found in warnings]
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return json.dumps(frame.to_dict(orient="records"), indent=2)
    raise MelanomaError(f"Unknown output format {fmt!r}: choose one of table, csv, isic, json.")
