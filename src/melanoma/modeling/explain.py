"""Explanations of single predictions (LIME, Grad-CAM) and measures of their trustworthiness.

LIME (the ``lime`` package) fits a weighted linear model to the class probabilities of
perturbed copies of the image, in which random superpixels are replaced by their mean
colour. Two things make it fast and reproducible here: the perturbed images are built
with array operations and sent through the :class:`Predictor` in large batches (lime's
own loop copies the image per sample and calls the model 10 images at a time), and the
sampler is seeded by constructing the explainer with ``random_state=seed``.

Grad-CAM weights the last convolutional feature map by the gradient of the class score
(before the softmax) and is a single forward and backward pass (per member, averaged, for an ensemble).

How far these explanations can be trusted is measured in :mod:`melanoma.modeling.trust`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from melanoma import plots
from melanoma.errors import MelanomaError, ModelError
from melanoma.files import ensure_folder, write_json
from melanoma.modeling.ensemble import MeanGradCam, ensemble_members
from melanoma.modeling.predict import Predictor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHODS = ("lime", "gradcam")
SEGMENTATION_ALGORITHMS = ("slic", "quickshift")
_GRADCAMS: weakref.WeakKeyDictionary[Any, dict[str | None, GradCam | MeanGradCam]] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- superpixels
@dataclass(frozen=True)
class SegmentationParams:
    """How LIME cuts the image into superpixels.

    SLIC is the default: it gives about ``n_segments`` compact superpixels on any image in
    a few milliseconds. Quickshift follows colour edges more closely but is 10x slower;
    its ``kernel_size`` defaults to image_size / 64, which gives ~50 superpixels on
    dermoscopic images at 64-224 px (lime's fixed kernel_size=4 gives ~13 at 128 px).
    """

    algorithm: str = "slic"
    n_segments: int = 50          # slic
    compactness: float = 10.0     # slic
    kernel_size: float | None = None  # quickshift; None: image_size / 64
    max_dist: float = 20.0        # quickshift
    ratio: float = 0.5            # quickshift

    def __post_init__(self) -> None:
        if self.algorithm not in SEGMENTATION_ALGORITHMS:
            raise MelanomaError(
                f"Unknown segmentation {self.algorithm!r}: choose one of {', '.join(SEGMENTATION_ALGORITHMS)}."
            )
        if self.n_segments < 2:
            raise MelanomaError(f"Need at least 2 superpixels, got n_segments={self.n_segments}.")

    @classmethod
    def from_settings(cls, settings: Any) -> SegmentationParams:
        """The ``lime_segmentation`` and ``lime_superpixels`` of :class:`melanoma.config.Settings`."""
        return cls(algorithm=settings.lime_segmentation, n_segments=settings.lime_superpixels)

    def segment(self, image: np.ndarray, seed: int = 0) -> np.ndarray:
        """Superpixel labels 0..n-1 (lime's convention) for an RGB image."""
        from lime.wrappers.scikit_image import SegmentationAlgorithm

        if self.algorithm == "slic":
            segmenter = SegmentationAlgorithm(
                "slic", n_segments=self.n_segments, compactness=self.compactness, start_label=0
            )
        else:
            kernel = self.kernel_size or max(1.0, image.shape[0] / 64)
            segmenter = SegmentationAlgorithm(
                "quickshift", kernel_size=kernel, max_dist=self.max_dist, ratio=self.ratio, random_seed=seed
            )
        segments = segmenter(image)
        # Both algorithms may skip label values; lime indexes superpixels by label.
        return np.unique(segments, return_inverse=True)[1].reshape(segments.shape)


def superpixel_means(values: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """The mean of a per-pixel map inside each superpixel."""
    labels = segments.ravel()
    return np.bincount(labels, weights=values.ravel()) / np.bincount(labels)


# --------------------------------------------------------------------------- LIME
@dataclass
class ClassContribution:
    """LIME's local linear model for one class."""

    class_name: str
    class_index: int
    probability: float
    weights: np.ndarray      # one weight per superpixel: > 0 pushes towards the class
    intercept: float
    score: float             # R^2 of the local model on the weighted neighbourhood
    local_prediction: float  # the local model's prediction for the unperturbed image


@dataclass
class LimeExplanation:
    image: np.ndarray          # uint8 (S, S, 3), as the model saw it
    segments: np.ndarray       # int (S, S) superpixel labels
    classes: list[str]
    probabilities: np.ndarray  # (C,) for the unperturbed image
    contributions: list[ClassContribution]  # the top-k classes, most probable first
    num_samples: int
    seed: int
    segmentation: SegmentationParams

    def figure(self, title: str | None = None) -> Figure:
        """The image, then each top class's superpixels for (green) and against (red)."""
        panels = [(f"{c.class_name}  p = {c.probability:.2f}\nlocal R² = {c.score:.2f}", c.weights)
                  for c in self.contributions]
        return plots.superpixel_weights_figure(
            self.image, self.segments, panels,
            title=title or f"LIME, {self.num_samples} samples, seed {self.seed}",
            label="LIME weight (+ towards, − against)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "lime",
            "num_samples": self.num_samples,
            "seed": self.seed,
            "segmentation": asdict(self.segmentation),
            "n_superpixels": int(self.segments.max()) + 1,
            "superpixel_area": np.bincount(self.segments.ravel()).tolist(),
            "classes": [
                {
                    "class": c.class_name,
                    "probability": c.probability,
                    "intercept": c.intercept,
                    "score": c.score,
                    "local_prediction": c.local_prediction,
                    "weights": [float(w) for w in c.weights],
                }
                for c in self.contributions
            ],
        }


def perturb(image: np.ndarray, hidden: np.ndarray, segments: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Copies of ``image`` in which superpixels with ``keep[i, s] == 0`` show ``hidden``."""
    # Written into a C-ordered array (np.where would return a batch-innermost layout that
    # the model input then has to copy).
    copies = np.empty((len(keep), *image.shape), image.dtype)
    copies[:] = hidden
    np.copyto(copies, image, where=keep.astype(bool)[:, segments][..., None])
    return copies


def mean_colour_image(image: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Each superpixel painted in its mean colour: what LIME shows for a hidden superpixel."""
    from skimage.color import label2rgb

    return label2rgb(segments, image, kind="avg", bg_label=-1).astype(np.uint8)


def explain_lime(
    predictor: Predictor,
    image: np.ndarray,
    *,
    num_samples: int,
    seed: int,
    top_k: int,
    segmentation: SegmentationParams,
    segments: np.ndarray | None = None,
    batch_size: int = 128,
) -> LimeExplanation:
    """Explain ``predictor``'s prediction for a preprocessed uint8 image with LIME.

    Same ``seed``, same explanation. ``segments`` (from :meth:`SegmentationParams.segment`)
    can be passed in to compare several seeds or methods on the same superpixels.
    """
    from lime import lime_image
    from sklearn.metrics import pairwise_distances

    if num_samples < 2:
        raise MelanomaError(f"LIME needs at least 2 samples, got {num_samples}.")
    if segments is None:
        segments = segmentation.segment(image, seed)
    explainer = lime_image.LimeImageExplainer(random_state=seed)
    n_superpixels = int(segments.max()) + 1
    # Perturbed copies are built directly in the model's float32, which halves their cost.
    pixels = image.astype(np.float32)
    hidden = mean_colour_image(image, segments).astype(np.float32)

    # lime_image.explain_instance keeps the local model's R^2 of the last class only, so
    # its steps are done here with lime's own sampler, kernel and regression.
    keep = explainer.random_state.randint(0, 2, (num_samples, n_superpixels))
    keep[0] = 1  # the first sample is the image itself
    probabilities = np.concatenate([
        predictor.predict_arrays(perturb(pixels, hidden, segments, keep[start:start + batch_size]))
        for start in range(0, num_samples, batch_size)
    ])
    distances = pairwise_distances(keep, keep[:1], metric="cosine").ravel()

    top = np.argsort(probabilities[0])[::-1][:top_k]
    contributions = []
    for label in top:
        intercept, weights, score, local_pred = explainer.base.explain_instance_with_data(
            keep, probabilities, distances, int(label), n_superpixels, feature_selection=explainer.feature_selection
        )
        dense = np.zeros(n_superpixels)
        for superpixel, weight in weights:
            dense[superpixel] = weight
        contributions.append(ClassContribution(
            predictor.classes[label], int(label), float(probabilities[0, label]), dense,
            float(intercept), float(score), float(np.ravel(local_pred)[0]),
        ))
    return LimeExplanation(image, segments, predictor.classes, probabilities[0], contributions,
                           num_samples, seed, segmentation)


# --------------------------------------------------------------------------- Grad-CAM
def find_feature_layer(model: Any, name: str | None = None) -> Any:
    """The layer whose feature maps Grad-CAM weighs.

    By default the last top-level layer with a spatial (4-D) output that is neither the
    input nor a pooling layer: the rectified output of the last convolution in the small
    CNN, the ``backbone`` of a transfer model.
    """
    import keras

    if name is not None:
        try:
            return model.get_layer(name)
        except ValueError:
            top_level = ", ".join(layer.name for layer in model.layers)
            raise ModelError(
                f"the model has no top-level layer {name!r} for Grad-CAM (layers: {top_level})."
            ) from None
    skipped = (keras.layers.InputLayer, keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
    for layer in reversed(model.layers):
        if not isinstance(layer, skipped) and len(layer.output.shape) == 4:
            return layer
    raise ModelError("the model has no convolutional layer for Grad-CAM.")


class GradCam:
    """Grad-CAM for one model; build it once and reuse it (the graph is traced once)."""

    def __init__(self, model: Any, layer_name: str | None = None):
        import keras
        import tensorflow as tf

        if keras.backend.backend() != "tensorflow":  # the gradients below are TensorFlow's
            raise ModelError(f"Grad-CAM runs on the TensorFlow backend, not {keras.backend.backend()}.",
                             hint="Run it without --backend jax (any run loads on TensorFlow).")
        layer = find_feature_layer(model, layer_name)
        self.layer_name = layer.name
        head = model.layers[-1]
        # The class score before the softmax: the softmax saturates, and its gradient vanishes
        # for confident predictions.
        from_logits = isinstance(head, keras.layers.Dense) and head.activation is keras.activations.softmax
        grad_model = _features_and_scores(model, layer, from_logits)
        size = model.input_shape[1:3]

        @tf.function(input_signature=[
            tf.TensorSpec((None, *size, 3), tf.float32), tf.TensorSpec((None,), tf.int32)
        ])
        def heatmaps(images: tf.Tensor, class_indices: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                features, scores = grad_model(images, training=False)
                if from_logits:
                    scores = tf.matmul(scores, head.kernel) + head.bias
                else:
                    scores = tf.math.log(scores + 1e-7)
                class_scores = tf.gather(scores, class_indices, axis=1, batch_dims=1)
            grads = tape.gradient(class_scores, features)
            channel_weights = tf.reduce_mean(grads, axis=(1, 2))
            cams = tf.nn.relu(tf.einsum("bhwc,bc->bhw", features, channel_weights))
            cams = tf.image.resize(cams[..., None], size, method="bilinear")[..., 0]
            peak = tf.reduce_max(cams, axis=(1, 2), keepdims=True)
            return tf.math.divide_no_nan(cams, peak)

        self._heatmaps = heatmaps

    def __call__(self, images: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
        """Heat maps in [0, 1], shaped (N, S, S), for uint8 images (N, S, S, 3)."""
        return self._heatmaps(
            np.asarray(images, np.float32), np.asarray(class_indices, np.int32)
        ).numpy()


def _features_and_scores(model: Any, layer: Any, from_logits: bool) -> Any:
    """A model from the input to (``layer``'s feature maps, the softmax's input or output)."""
    import keras

    head = model.layers[-1]
    if not isinstance(model, keras.Sequential):
        try:
            return keras.Model(model.inputs, [layer.output, head.input if from_logits else model.output])
        except ValueError:
            pass  # a nested model's own output is not a tensor of this graph: chain the layers below
    # The layers of a Sequential model (or of a chain with a nested backbone) called on a
    # fresh input: in Keras 3 a Sequential model's layer outputs can belong to an earlier
    # build of its graph, whose gradients come back as None.
    inputs = keras.Input(model.input_shape[1:])
    x = inputs
    features = None
    for current in model.layers:
        if isinstance(current, keras.layers.InputLayer) or (from_logits and current is head):
            continue
        x = current(x)
        if current is layer:
            features = x
    return keras.Model(inputs, [features, x])


@dataclass
class GradCamExplanation:
    image: np.ndarray
    classes: list[str]
    probabilities: np.ndarray
    class_indices: list[int]   # the top-k classes, most probable first
    heatmaps: np.ndarray       # (k, S, S) in [0, 1]
    layer_name: str

    def figure(self, title: str | None = None) -> Figure:
        """The image, then a heat-map overlay for each top class."""
        panels = [(f"{self.classes[index]}  p = {self.probabilities[index]:.2f}", heatmap)
                  for index, heatmap in zip(self.class_indices, self.heatmaps)]
        return plots.heatmaps_figure(self.image, panels, title=title or f"Grad-CAM on layer {self.layer_name}",
                                     label="Grad-CAM relevance (normalised)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "gradcam",
            "layer": self.layer_name,
            "classes": [
                {"class": self.classes[i], "probability": float(self.probabilities[i]),
                 "heatmap_mean": float(h.mean()),
                 "peak_row_col": [int(v) for v in np.unravel_index(int(h.argmax()), h.shape)]}
                for i, h in zip(self.class_indices, self.heatmaps)
            ],
        }


def explain_gradcam(predictor: Predictor, gradcam: GradCam | MeanGradCam, image: np.ndarray, *,
                    top_k: int) -> GradCamExplanation:
    """Grad-CAM heat maps for the ``top_k`` most probable classes of one uint8 image."""
    probabilities = predictor.predict_arrays(image[None])[0]
    top = [int(i) for i in np.argsort(probabilities)[::-1][:top_k]]
    heatmaps = gradcam(np.repeat(image[None], len(top), axis=0), top)
    return GradCamExplanation(image, predictor.classes, probabilities, top, heatmaps, gradcam.layer_name)


# --------------------------------------------------------------------------- explain one file
def parse_methods(method: str) -> list[str]:
    """``lime``, ``gradcam`` or ``both`` -> the list of methods."""
    methods = list(METHODS) if method == "both" else [method]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MelanomaError(f"Unknown explanation method {unknown[0]!r}: choose lime, gradcam or both.")
    return methods


def explain_file(
    predictor: Predictor,
    source: str | Path | bytes | np.ndarray,
    *,
    methods: Sequence[str],
    out_dir: Path,
    name: str,
    num_samples: int,
    seed: int,
    top_k: int,
    segmentation: SegmentationParams,
    layer_name: str | None = None,
) -> dict[str, Path]:
    """Explain one image with ``methods``; write ``<name>_<method>.png`` and
    ``<name>_explanation.json`` into ``out_dir``. Returns the files written."""
    for method in methods:
        parse_methods(method)
    if not 1 <= top_k <= len(predictor.classes):
        raise MelanomaError(f"--top-k must be between 1 and {len(predictor.classes)}, got {top_k}.")
    ensure_folder(out_dir, "output folder")
    image = predictor.preprocess(source)
    probabilities = predictor.predict_arrays(image[None])[0]
    best = int(np.argmax(probabilities))
    report: dict[str, Any] = {
        "image": name,
        "run": str(predictor.run.path),
        "probabilities": dict(zip(predictor.classes, map(float, probabilities))),
        "prediction": {"class": predictor.classes[best], "probability": float(probabilities[best])},
    }
    written: dict[str, Path] = {}
    explanations: list[tuple[str, LimeExplanation | GradCamExplanation]] = []
    if "lime" in methods:
        lime = explain_lime(predictor, image, num_samples=num_samples, seed=seed, top_k=top_k,
                            segmentation=segmentation)
        explanations.append(("lime", lime))
    if "gradcam" in methods:
        cam = explain_gradcam(predictor, gradcam_for(predictor, layer_name), image, top_k=top_k)
        explanations.append(("gradcam", cam))
    for method, explanation in explanations:
        report[method] = explanation.to_dict()
        written[method] = plots.save_figure(explanation.figure(), out_dir / f"{name}_{method}.png")
    written["json"] = out_dir / f"{name}_explanation.json"
    write_json(written["json"], report)
    return written


def gradcam_for(predictor: Predictor, layer_name: str | None = None) -> GradCam | MeanGradCam:
    """The Grad-CAM of the predictor's model, built on first use and kept while the model lives."""
    if predictor.model is None:
        raise ModelError("Grad-CAM needs the Keras model: load the predictor with engine='keras'.")
    per_layer = _GRADCAMS.setdefault(predictor.model, {})
    if layer_name not in per_layer:
        try:
            members = ensemble_members(predictor.model)
            per_layer[layer_name] = GradCam(predictor.model, layer_name) if members is None else MeanGradCam(
                [(member.name, GradCam(member, layer_name)) for member in members])
        except ModelError as exc:
            raise ModelError(f"{predictor.run.model_path}: {exc}") from None
    return per_layer[layer_name]
