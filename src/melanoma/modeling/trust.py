"""How far explanations can be trusted (``melanoma explain-eval``).

:func:`evaluate_explanations` ranks the same superpixels by each method (LIME, Grad-CAM and
a random order as the baseline) and reports deletion/insertion AUC (faithfulness) and the
top-5 overlap of the rankings across seeds (stability).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from melanoma.data.archive import read_rows
from melanoma.errors import MelanomaError
from melanoma.files import write_json, write_text
from melanoma.modeling.explain import (
    SegmentationParams,
    explain_lime,
    gradcam_for,
    superpixel_means,
)
from melanoma.modeling.predict import Predictor

TRUST_METHODS = ("lime", "gradcam", "random")
STABILITY_TOP = 5  # superpixels compared across seeds

def blurred(image: np.ndarray) -> np.ndarray:
    """The image with its structure blurred away: what "removed" superpixels show."""
    import cv2

    return cv2.GaussianBlur(image, (0, 0), sigmaX=image.shape[0] / 8)


def perturbation_curves(
    predictor: Predictor, image: np.ndarray, segments: np.ndarray, ranking: np.ndarray, class_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class probability as superpixels are removed (deletion) or added (insertion) in the
    order of ``ranking`` (most important first). Returns (fraction of pixels changed,
    deletion curve, insertion curve), each with one point per superpixel plus the start."""
    baseline = blurred(image)
    rank_of = np.empty_like(ranking)
    rank_of[ranking] = np.arange(len(ranking))
    steps = np.arange(len(ranking) + 1)
    changed = rank_of[segments][None] < steps[:, None, None]   # (steps, S, S)
    deletion = np.where(changed[..., None], baseline, image)
    insertion = np.where(changed[..., None], image, baseline)
    probabilities = predictor.predict_arrays(np.concatenate([deletion, insertion]))[:, class_index]
    fraction = np.concatenate([[0.0], np.cumsum(np.bincount(segments.ravel())[ranking]) / segments.size])
    return fraction, probabilities[: len(steps)], probabilities[len(steps):]


def top_overlap(rankings: Sequence[np.ndarray], top: int = STABILITY_TOP) -> float:
    """Mean pairwise IoU of the ``top`` first superpixels of several rankings."""
    sets = [set(r[:top].tolist()) for r in rankings]
    return float(np.mean([len(a & b) / len(a | b) for a, b in combinations(sets, 2)]))


@dataclass
class TrustReport:
    """Faithfulness and stability of the explanation methods over a set of images."""

    rows: list[dict[str, Any]]            # one per method: mean/sd of each measure
    per_image: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def evaluate_explanations(
    predictor: Predictor,
    images: np.ndarray,
    *,
    image_ids: Sequence[str],
    num_samples: int,
    seed: int,
    segmentation: SegmentationParams,
    n_seeds: int = 5,
    on_progress: Callable[[int], None] | None = None,
) -> TrustReport:
    """Deletion/insertion AUC and top-5 stability of LIME, Grad-CAM and a random ranking.

    For each image, the predicted class is explained; all methods rank the same
    superpixels (LIME by weight, Grad-CAM by its mean inside the superpixel, random by a
    seeded permutation). Lower deletion AUC and higher insertion AUC are more faithful.
    Stability is the mean IoU of the top-5 superpixels over ``n_seeds`` seeds; Grad-CAM
    has no seed, so its ``n_seeds`` runs measure whether it repeats itself exactly.
    """
    gradcam = gradcam_for(predictor)
    rng = np.random.default_rng(seed)
    per_image = []
    for image_id, image in zip(image_ids, images):
        segments = segmentation.segment(image, seed)
        n_superpixels = int(segments.max()) + 1
        class_index = int(np.argmax(predictor.predict_arrays(image[None])[0]))
        lime_rankings = [
            np.argsort(-explain_lime(predictor, image, num_samples=num_samples, seed=s, top_k=1,
                                     segmentation=segmentation, segments=segments).contributions[0].weights,
                       kind="stable")
            for s in range(seed, seed + n_seeds)
        ]
        rankings = {
            "lime": lime_rankings,
            "gradcam": [np.argsort(-superpixel_means(gradcam(image[None], [class_index])[0], segments), kind="stable")
                        for _ in range(n_seeds)],
            "random": [rng.permutation(n_superpixels) for _ in range(n_seeds)],
        }
        record: dict[str, Any] = {"image_id": image_id, "class": predictor.classes[class_index],
                                  "n_superpixels": n_superpixels}
        for method, method_rankings in rankings.items():
            fraction, deletion, insertion = perturbation_curves(
                predictor, image, segments, method_rankings[0], class_index)
            record[f"{method}_deletion_auc"] = float(np.trapezoid(deletion, fraction))
            record[f"{method}_insertion_auc"] = float(np.trapezoid(insertion, fraction))
            record[f"{method}_stability_iou"] = top_overlap(method_rankings) if len(method_rankings) > 1 else 1.0
        per_image.append(record)
        if on_progress is not None:
            on_progress(1)

    rows = []
    for method in TRUST_METHODS:
        row: dict[str, Any] = {"method": method}
        for measure in ("deletion_auc", "insertion_auc", "stability_iou"):
            values = np.array([r[f"{method}_{measure}"] for r in per_image])
            row[f"{measure}_mean"] = float(values.mean())
            row[f"{measure}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    settings = {"n_images": len(per_image), "num_samples": num_samples, "seed": seed, "n_seeds": n_seeds,
                "stability_top": STABILITY_TOP, "segmentation": asdict(segmentation),
                "removed_superpixels_show": "Gaussian blur, sigma = image_size / 8",
                "gradcam_stability": f"Grad-CAM computed {n_seeds} times (it has no seed)"}
    return TrustReport(rows, per_image, settings)


def sample_images(archive: Any, split: str, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` images of an archive's ``split``, drawn with ``seed``, and their ids."""
    rows = archive.indices(split)
    if len(rows) == 0:
        raise MelanomaError(f"Archive {archive.path} has no images in the {split!r} split.")
    chosen = np.sort(np.random.default_rng(seed).choice(rows, size=min(n, len(rows)), replace=False))
    return read_rows(archive.images, chosen), archive.manifest["image_id"].iloc[chosen].astype(str).tolist()


def write_trust_report(report: TrustReport, out_dir: Path, name: str = "explain_eval") -> tuple[Path, Path]:
    """``<name>.json`` (summary, per-image numbers, settings) and ``<name>.csv`` (summary)."""
    import pandas as pd

    json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    write_json(json_path, asdict(report))
    write_text(csv_path, pd.DataFrame(report.rows).to_csv(index=False))
    return json_path, csv_path
