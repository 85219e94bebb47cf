"""The out-of-distribution gate: is this image like the ones the model was trained on?

The score is the distance of the image's pooled penultimate features (the input of the
classifier's last layer), scaled to unit length, to its k-th nearest neighbour among the
training images' (Sun et al. 2022, "Out-of-distribution detection with deep nearest
neighbors"): 1 - cosine similarity, from 0 (the same direction as k training images) to 2.
The threshold is the quantile of the validation images' scores that flags a chosen share
of them (default 5%): an image above it is reported as not in distribution.

Why not the Mahalanobis distance to the class means (Lee et al. 2018), tried first: on an
ImageNet-pretrained EfficientNet-Lite0 the features of blank, noise and gradient images lie
*closer* to the class means than those of real lesions (AUROC 0.16-0.37 against HAM10000
test images), while the nearest-neighbour distance separates them completely (AUROC 1.0;
0.91 for heavy blur). Scaling to unit length is what removes the feature norm that
fooled the Mahalanobis distance.

The fitted statistics live in the run folder (``ood.npz``: the training images' unit
feature vectors, float16), the threshold in ``run.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from melanoma.errors import ModelError
from melanoma.files import commit
from melanoma.modeling.runs import OOD_FILE

METHOD = "knn-cosine"
NEIGHBOUR = 10  # the k of the k-th nearest neighbour
# Query images scored at once: bounds the (images x training images) similarity matrix.
_CHUNK = 256


def unit_rows(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class NeighbourGate:
    """The training images' unit feature vectors (N, D), k, and the threshold."""

    reference: np.ndarray
    k: int = NEIGHBOUR
    threshold: float = np.inf

    @classmethod
    def fit(cls, features: np.ndarray, k: int = NEIGHBOUR) -> NeighbourGate:
        """Keep the training images' features (N, D), scaled to unit length."""
        if len(features) < k:
            raise ModelError(f"Cannot fit the out-of-distribution gate: {len(features)} training images, "
                             f"fewer than k={k}.")
        # Rounded as ood.npz stores them, so that a loaded gate scores exactly as the fitted one.
        return cls(unit_rows(features).astype(np.float16).astype(np.float32), k)

    def score(self, features: np.ndarray) -> np.ndarray:
        """1 - cosine similarity to the k-th nearest training image, per image (N,)."""
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != self.reference.shape[1]:
            raise ModelError(f"The out-of-distribution gate expects features of size {self.reference.shape[1]}, "
                             f"got shape {features.shape}: {OOD_FILE} belongs to another model.")
        scores = []
        for start in range(0, len(features), _CHUNK):
            similarity = unit_rows(features[start:start + _CHUNK]) @ self.reference.T
            scores.append(1 - np.partition(similarity, -self.k, axis=1)[:, -self.k])
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)

    def with_threshold(self, validation_scores: np.ndarray, flag_fraction: float) -> NeighbourGate:
        """The same gate, with the threshold above which ``flag_fraction`` of the
        validation images lie."""
        if not 0 < flag_fraction < 1:
            raise ModelError(f"The share of flagged images must be between 0 and 1, not {flag_fraction}.")
        threshold = float(np.quantile(validation_scores, 1 - flag_fraction))
        return NeighbourGate(self.reference, self.k, threshold)

    def in_distribution(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) <= self.threshold

    def save(self, run_dir: Path) -> Path:
        """Write ``ood.npz`` into the run folder atomically (the threshold goes to run.json)."""
        path = Path(run_dir) / OOD_FILE
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, reference=self.reference.astype(np.float16), k=self.k)
        return commit(tmp, path)

    @classmethod
    def load(cls, run_dir: Path, threshold: float) -> NeighbourGate:
        path = Path(run_dir) / OOD_FILE
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["reference"].astype(np.float32), int(data["k"]), float(threshold))
        except FileNotFoundError:
            raise ModelError(f"{path} is missing, but {Path(run_dir) / 'run.json'} names it.",
                             hint=f"Fit it again with `melanoma calibrate --run {run_dir}`.") from None
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{path} is corrupt: {exc}", hint=f"Fit it again with `melanoma calibrate --run {run_dir}`.") from None
