"""Predict with a trained run: load the model once, then classify paths, bytes or arrays.

The images go through :func:`melanoma.data.preprocess.load_image` with the run's own
preprocessing parameters, so inference sees the same pixels as training did. Inference
never calls ``model.predict`` (10-250 ms of fixed overhead per call): the Keras engine uses
``predict_on_batch`` (a compiled function, traced at most twice: Keras then relaxes the
batch size), the ONNX engine an ONNX Runtime session on the run's ``model.onnx`` (see
:mod:`.export`).
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
from melanoma.errors import ImageError, MelanomaError, ModelError
from melanoma.modeling.runs import RunInfo, read_run

ENGINES = ("keras", "onnx")
ONNX_FILE = "model.onnx"
# Largest batch sent to the model at once: bounds memory, and is large enough that the
# per-call overhead is negligible.
_CHUNK = 128

ImageSource = str | Path | bytes | np.ndarray


def load_keras_model(path: Path) -> Any:
    """Load a ``.keras`` file for inference, with a clear error if it is corrupt."""
    import keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # keras raises many types (ValueError, BadZipFile, OSError ...)
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


@dataclass
class FilePredictions:
    """The result of :meth:`Predictor.predict_files`."""

    paths: list[Path]                 # the files that were predicted, in input order
    probabilities: np.ndarray         # (len(paths), C)
    skipped: list[tuple[Path, str]]   # (file, reason) for every file that could not be read


class Predictor:
    """A run's model, loaded once, behind a lock so that threads can share it."""

    def __init__(self, run: RunInfo, infer: Callable[[np.ndarray], np.ndarray], *, engine: str,
                 params: PreprocessParams, model: Any = None):
        self.run = run
        self.classes = list(run.classes)
        self.image_size = run.image_size
        self.params = params
        self.engine = engine
        self._infer = infer
        self._lock = threading.Lock()
        self.model = model  # the Keras model of the "keras" engine (Grad-CAM needs it)

    @classmethod
    def from_run(cls, run_dir: Path, *, engine: str = "keras", max_pixels: int | None = None) -> Predictor:
        """Load ``run_dir``'s model with ``engine`` ("keras" or "onnx")."""
        if engine not in ENGINES:
            raise ModelError(f"Unknown engine {engine!r}: choose one of {', '.join(ENGINES)}.")
        run = read_run(run_dir)
        params = run.preprocess
        if params.image_size != run.image_size:
            params = dataclasses.replace(params, image_size=run.image_size)
        if max_pixels is not None:
            params = dataclasses.replace(params, max_pixels=max_pixels)
        if engine == "keras":
            model = load_keras_model(run.model_path)
            _check_model_shape(run, run.model_path, model.input_shape, model.output_shape)
            return cls(run, lambda x: np.asarray(model.predict_on_batch(x)), engine=engine, params=params, model=model)
        return cls(run, _onnx_session(run), engine=engine, params=params)

    def preprocess(self, source: ImageSource) -> np.ndarray:
        """One image as the model sees it: uint8 RGB (S, S, 3)."""
        return load_image(source, self.params)

    def predict_arrays(self, images: np.ndarray, *, tta: bool = False) -> np.ndarray:
        """Class probabilities (N, C) for preprocessed images (N, S, S, 3): uint8, or float32
        holding the same 0..255 values."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ImageError(
                f"Expected images of shape (N, {self.image_size}, {self.image_size}, 3), got {images.shape}."
            )
        return tta_mean(self._run_batches, images) if tta else self._run_batches(images)

    def predict(self, sources: Sequence[ImageSource], *, tta: bool = False) -> np.ndarray:
        """Class probabilities (N, C) for paths, encoded bytes or RGB arrays (ImageError if one is bad)."""
        if not sources:
            return np.zeros((0, len(self.classes)), np.float32)
        return self.predict_arrays(np.stack([self.preprocess(s) for s in sources]), tta=tta)

    def predict_files(self, paths: Iterable[Path], *, tta: bool = False,
                      on_progress: Callable[[int], None] | None = None) -> FilePredictions:
        """Predict files in chunks; unreadable ones are skipped and reported with the reason.

        ``on_progress(n)`` is called after each chunk with the number of files handled.
        """
        kept: list[Path] = []
        skipped: list[tuple[Path, str]] = []
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
            if images:
                results.append(self.predict_arrays(np.stack(images), tta=tta))
            if on_progress is not None:
                on_progress(len(paths[start:start + _CHUNK]))
        probabilities = np.concatenate(results) if results else np.zeros((0, len(self.classes)), np.float32)
        return FilePredictions(kept, probabilities, skipped)

    def _run_batches(self, images: np.ndarray) -> np.ndarray:
        outputs = []
        with self._lock:
            for start in range(0, len(images), _CHUNK):
                batch = np.ascontiguousarray(images[start:start + _CHUNK], dtype=np.float32)
                outputs.append(self._infer(batch))
        if not outputs:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)


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


def _onnx_session(run: RunInfo) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    path = run.path / ONNX_FILE
    if not path.is_file():
        raise ModelError(f"{run.path} has no {ONNX_FILE}.", hint=f"Create it with `melanoma export --run {run.path}`.")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"ONNX model {path} cannot be loaded: {exc}") from None
    model_input = session.get_inputs()[0]
    _check_model_shape(run, path, model_input.shape, session.get_outputs()[0].shape)
    return lambda x: session.run(None, {model_input.name: x})[0]


def predictions_text(paths: Sequence[Path], probabilities: np.ndarray, classes: Sequence[str], fmt: str) -> str:
    """Predictions as ``csv`` (file, prediction, probability, one column per class), ``isic``
    (the ISIC 2019 submission format of :func:`melanoma.modeling.evaluate.submission_table`,
    the image id being the file name without suffix) or ``json`` (a list of records)."""
    import pandas as pd

    from melanoma.modeling.evaluate import submission_table

    if fmt == "isic":
        return submission_table([p.stem for p in paths], probabilities, list(classes)).to_csv(index=False)
    best = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, int)
    frame = pd.DataFrame({
        "file": [str(p) for p in paths],
        "prediction": [classes[i] for i in best],
        "probability": probabilities[np.arange(len(best)), best],
    })
    frame = pd.concat([frame, pd.DataFrame(probabilities, columns=list(classes))], axis=1)
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return json.dumps(frame.to_dict(orient="records"), indent=2)
    raise MelanomaError(f"Unknown output format {fmt!r}: choose one of table, csv, isic, json.")
