"""The metrics the field reports, as pure functions of labels and probabilities.

The metrics are scikit-learn's where it has them. Two come from the ISIC challenge's own
definitions (``isic-challenge-scoring``): balanced multiclass accuracy (the mean recall of
the classes present) and the partial AUC above 80% sensitivity, which is the area under
the ROC curve over the part where sensitivity is at least 0.8, *without* the McClish
standardisation that ``roc_auc_score(max_fpr=...)`` applies. As in the ISIC scorer, an image
whose top probability is shared by two classes (an exact tie) has no predicted class: it
counts as wrong. Confidence intervals come from a bootstrap over lesions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    auc,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from melanoma.config import MELANOMA_LABELS, NEVUS_LABELS
from melanoma.errors import ModelError

ECE_BINS = 15
PARTIAL_AUC_SENSITIVITY = 0.8
CI_LEVEL = 0.95
TIE = -1  # the predicted "class" of an image whose top probability is shared (ISIC: "undecided")
HISTOPATHOLOGY = "histo"  # HAM10000 dx_type of a diagnosis confirmed by histopathology


def melanoma_index(classes: list[str]) -> int | None:
    """The index of the melanoma class in ``classes``, or None if there is none."""
    for index, name in enumerate(classes):
        if name in MELANOMA_LABELS:
            return index
    return None


def nevus_index(classes: list[str]) -> int | None:
    """The index of the nevus class in ``classes``, or None if there is none."""
    return next((index for index, name in enumerate(classes) if name in NEVUS_LABELS), None)


def excised_nevi(labels: np.ndarray, classes: list[str], dx_type: np.ndarray | None) -> np.ndarray | None:
    """Which images are nevi confirmed by histopathology (``dx_type`` histo): the nevi atypical
    enough to be excised, the hard negatives for melanoma. None where the data cannot say
    (no nevus class, no ``dx_type``)."""
    nv_index = nevus_index(classes)
    if nv_index is None or dx_type is None:
        return None
    return (labels == nv_index) & (np.char.strip(np.asarray(dx_type, dtype=str)) == HISTOPATHOLOGY)


def normalised(probabilities: np.ndarray) -> np.ndarray:
    """float64 rows that sum to 1 (float32 softmax is off by ~1e-7, which scikit-learn flags)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def predicted_labels(probabilities: np.ndarray) -> np.ndarray:
    """The class with the highest probability, or ``TIE`` where several classes share it."""
    predicted = probabilities.argmax(axis=1)
    tied = (probabilities == probabilities.max(axis=1, keepdims=True)).sum(axis=1) > 1
    return np.where(tied, TIE, predicted)


def balanced_multiclass_accuracy(labels: np.ndarray, predicted: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """The ISIC definition: the mean recall of the classes present in ``labels``; a ``TIE``
    is wrong for whatever class the image is."""
    return float(recall_score(labels, predicted, labels=np.unique(labels), average="macro", sample_weight=sample_weight,
                              zero_division=0))


def one_vs_rest_auc(is_positive: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """ROC AUC, or NaN where it is undefined (only one class present)."""
    if is_positive.all() or not is_positive.any():
        return math.nan
    return float(roc_auc_score(is_positive, scores, sample_weight=sample_weight))


def within_source_auc(is_positive: np.ndarray, scores: np.ndarray, sources: np.ndarray,
                      sample_weight: np.ndarray | None = None) -> float:
    """ROC AUC over the (positive, negative) pairs from the same source only: each source's
    AUC weighted by its number of such pairs. A pooled AUC also rewards telling the sources
    apart (HAM10000's `vidir_molemax` images are 94% nevi), which no clinic's own patients
    need; this one cannot. NaN unless two or more sources hold both classes (with one, it
    is that source's AUC)."""
    weight = np.ones(len(scores)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    wins = pairs = 0.0
    contributing = 0
    for source in np.unique(sources):
        chosen = sources == source
        auc = one_vs_rest_auc(is_positive[chosen], scores[chosen], weight[chosen])
        if math.isnan(auc):
            continue
        source_pairs = weight[chosen & is_positive].sum() * weight[chosen & ~is_positive].sum()
        wins += auc * source_pairs
        pairs += source_pairs
        contributing += 1
    return wins / pairs if contributing >= 2 else math.nan


def class_recalls(labels: np.ndarray, predicted: np.ndarray, num_classes: int,
                  weight: np.ndarray | None = None) -> np.ndarray:
    """The recall of each class, with images counted ``weight`` times; NaN for a class
    without images. Their NaN-ignoring mean is the BMA (ISIC: the mean recall of the
    classes present)."""
    total = np.bincount(labels, weights=weight, minlength=num_classes)
    right = np.bincount(labels, weights=(predicted == labels) * (1.0 if weight is None else weight), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, right / total, np.nan)


def validation_scores(labels: np.ndarray, probabilities: np.ndarray, mel_index: int | None) -> dict[str, float]:
    """The per-epoch numbers: loss, accuracy, balanced accuracy and melanoma AUC."""
    predicted = probabilities.argmax(axis=1)
    num_classes = probabilities.shape[1]
    return {
        "loss": float(log_loss(labels, probabilities, labels=range(num_classes))),
        "accuracy": float((predicted == labels).mean()),
        "bma": float(balanced_accuracy_score(labels, predicted)),
        "mel_auc": one_vs_rest_auc(labels == mel_index, probabilities[:, mel_index]) if mel_index is not None else math.nan,
    }


def partial_auc_above_sensitivity(is_positive: np.ndarray, scores: np.ndarray, min_sensitivity: float = PARTIAL_AUC_SENSITIVITY) -> float:
    """ISIC's ``auc_sens_80``: the area under the ROC curve where sensitivity >= ``min_sensitivity``.

    No McClish correction: a perfect classifier scores 1, and the value is comparable
    with the ISIC 2019 leaderboard's. NaN where the ROC curve is undefined.
    """
    if is_positive.all() or not is_positive.any():
        return math.nan
    fpr, tpr, _ = roc_curve(is_positive, scores, drop_intermediate=False)
    first = int(np.searchsorted(tpr, min_sensitivity, side="left"))
    # The curve starts exactly at the minimum sensitivity, interpolated between the two
    # neighbouring ROC points (tpr[0] is 0, so first >= 1).
    fpr_at_min = float(np.interp(min_sensitivity, tpr[first - 1:first + 1], fpr[first - 1:first + 1]))
    return float(auc(np.r_[fpr_at_min, fpr[first:]], np.r_[min_sensitivity, tpr[first:]]))


def threshold_for_sensitivity(is_positive: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (score >= threshold) reaches ``target``."""
    if not is_positive.any():
        raise ModelError("Cannot choose a melanoma threshold: the validation split has no melanoma.")
    _, tpr, thresholds = roc_curve(is_positive, scores, drop_intermediate=False)
    return float(min(thresholds[np.argmax(tpr >= target)], 1.0))


def specificity_at_sensitivity(is_positive: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The best specificity among the ROC points whose sensitivity reaches ``target``."""
    if is_positive.all() or not is_positive.any():
        return math.nan
    fpr, tpr, _ = roc_curve(is_positive, scores, drop_intermediate=False)
    return float(1 - fpr[np.argmax(tpr >= target)])


def reliability_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Top-label calibration: per confidence bin, the count, mean confidence and accuracy."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table = pd.DataFrame({"bin": which, "confidence": confidence, "correct": correct})
    grouped = table.groupby("bin").agg(count=("correct", "size"), confidence=("confidence", "mean"), accuracy=("correct", "mean"))
    grouped = grouped.reindex(range(bins))
    grouped["count"] = grouped["count"].fillna(0).astype(int)
    grouped.insert(0, "low", edges[:-1])
    grouped.insert(1, "high", edges[1:])
    return grouped.reset_index(drop=True)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over ``bins`` bins."""
    table = reliability_bins(labels, probabilities, bins).dropna()
    return float((table["count"] * (table["accuracy"] - table["confidence"]).abs()).sum() / len(labels))


def calibration_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """ECE, multiclass Brier score and NLL (log loss)."""
    num_classes = probabilities.shape[1]
    return {
        "ece": expected_calibration_error(labels, probabilities),
        "brier": float(brier_score_loss(labels, probabilities, labels=range(num_classes))),
        "nll": float(log_loss(labels, probabilities, labels=range(num_classes))),
    }


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """BMA, accuracy, per-class recall/precision/AUC/partial AUC, macro AUC, confusion matrix,
    ECE and Brier score."""
    num_classes = len(classes)
    predicted = predicted_labels(probabilities)
    precision, recall, _, support = precision_recall_fscore_support(labels, predicted, labels=range(num_classes), zero_division=0)
    per_class = {}
    for index, name in enumerate(classes):
        is_class = labels == index
        per_class[name] = {
            "support": int(support[index]),
            "recall": float(recall[index]) if support[index] else None,
            "precision": float(precision[index]),
            "auc": finite(one_vs_rest_auc(is_class, probabilities[:, index])),
            "pauc_80": finite(partial_auc_above_sensitivity(is_class, probabilities[:, index])),
            "ap": float(average_precision_score(is_class, probabilities[:, index])) if is_class.any() else None,
        }
    aucs = [row["auc"] for row in per_class.values() if row["auc"] is not None]
    aps = [row["ap"] for row in per_class.values() if row["ap"] is not None]
    return {
        "bma": balanced_multiclass_accuracy(labels, predicted),
        "accuracy": float((predicted == labels).mean()),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "macro_ap": float(np.mean(aps)) if aps else None,
        "ties": int((predicted == TIE).sum()),  # images left out of the confusion matrix
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, predicted, labels=range(num_classes)).tolist(),
        **{("log_loss" if name == "nll" else name): value for name, value in calibration_scores(labels, probabilities).items()},
    }


def melanoma_metrics(labels: np.ndarray, probabilities: np.ndarray, val_labels: np.ndarray, val_probabilities: np.ndarray,
                     mel_index: int, target_sensitivity: float) -> dict[str, Any]:
    """Melanoma vs rest: AUC, and sensitivity/specificity at the threshold chosen on validation."""
    is_mel = labels == mel_index
    scores = probabilities[:, mel_index]
    threshold = threshold_for_sensitivity(val_labels == mel_index, val_probabilities[:, mel_index], target_sensitivity)
    flagged = scores >= threshold
    return {
        "auc": finite(one_vs_rest_auc(is_mel, scores)),
        "pauc_80": finite(partial_auc_above_sensitivity(is_mel, scores)),
        "target_sensitivity": target_sensitivity,
        "threshold": threshold,
        "sensitivity": float(flagged[is_mel].mean()) if is_mel.any() else None,
        "specificity": float((~flagged[~is_mel]).mean()) if (~is_mel).any() else None,
        "specificity_at_target": finite(specificity_at_sensitivity(is_mel, scores, target_sensitivity)),
        "positives": int(is_mel.sum()),
        "negatives": int((~is_mel).sum()),
    }


def lesion_resamples(groups: np.ndarray, samples: int, seed: int) -> Iterator[np.ndarray]:
    """``samples`` bootstrap resamples of whole lesion groups, drawn with replacement, each as
    the number of times every row was drawn (images of one lesion are not independent).
    The same ``seed`` gives the same resamples, so that several runs' predictions on the
    same images can be resampled together (paired)."""
    _, group_of_row = np.unique(groups, return_inverse=True)
    n_groups = group_of_row.max() + 1
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        yield np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[group_of_row]


def bootstrap_intervals(labels: np.ndarray, probabilities: np.ndarray, groups: np.ndarray, mel_index: int | None, *,
                        samples: int, seed: int, level: float = CI_LEVEL) -> dict[str, Any]:
    """Percentile intervals for BMA and melanoma AUC, resampling lesion groups with
    replacement (images of one lesion are not independent)."""
    if samples <= 0:
        return {}
    predicted = predicted_labels(probabilities)
    bmas, mel_aucs = [], []
    for weight in lesion_resamples(groups, samples, seed):
        kept = weight > 0
        bmas.append(balanced_multiclass_accuracy(labels[kept], predicted[kept], sample_weight=weight[kept]))
        if mel_index is not None:
            mel_aucs.append(one_vs_rest_auc(labels[kept] == mel_index, probabilities[kept, mel_index], weight[kept]))
    result: dict[str, Any] = {"level": level, "samples": samples, "resampled": "lesion groups",
                              "bma": percentile_interval(bmas, level)}
    mel_interval = percentile_interval(mel_aucs, level)
    if mel_interval:
        result["melanoma_auc"] = mel_interval
    return result


def percentile_interval(values: list[float], level: float = CI_LEVEL) -> list[float] | None:
    """The central ``level`` percentile interval of the finite ``values`` (a resample can
    leave an AUC undefined), or None where none is finite."""
    finite = [value for value in values if not math.isnan(value)]
    if not finite:
        return None
    tail = (1 - level) / 2 * 100
    return np.percentile(finite, [tail, 100 - tail]).tolist()


def finite(value: float) -> float | None:
    """The value as a float, or None for NaN (JSON has no NaN)."""
    return None if value is None or math.isnan(value) else float(value)
