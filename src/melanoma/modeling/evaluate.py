"""Evaluation: the metrics the field reports, figures, a readable report, ISIC predictions.

The metrics are scikit-learn's where it has them. Two come from the ISIC challenge's own
definitions (``isic-challenge-scoring``): balanced multiclass accuracy (the mean recall of
the classes present) and the partial AUC above 80% sensitivity, which is the area under
the ROC curve over the part where sensitivity is at least 0.8, *without* the McClish
standardisation that ``roc_auc_score(max_fpr=...)`` applies. As in the ISIC scorer, an image
whose top probability is shared by two classes (an exact tie) has no predicted class: it
counts as wrong. ``evaluate`` writes the ground truth of the evaluated split in the ISIC 2019
format beside the predictions, so the official scorer can be run on them
(tests/test_isic_scorer.py does, and agrees with ``metrics.json``).

The melanoma operating point is chosen on the validation split (the threshold that
reaches the target sensitivity there) and then applied, unchanged, to the evaluated split,
so that the reported sensitivity and specificity are honest estimates.

Where the archive says where each image comes from, the metrics are also broken down by
source (clinic, data set), and the melanoma score is measured against the nevi alone, all
of them and those confirmed by histopathology: the nevi atypical enough to be excised are
what a model trained on one clinic confuses with melanoma in another.

Probabilities are temperature-scaled with the run's fitted temperature (see
:mod:`.calibration`) unless calibration is switched off; the report gives ECE, Brier score
and NLL before and after, with a reliability diagram of each.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

from melanoma.config import ISIC2019_CLASSES, MELANOMA_LABELS, NEVUS_LABELS
from melanoma.errors import ModelError
from melanoma.files import write_json, write_text
from melanoma.modeling.calibration import temperature_scale
from melanoma.modeling.cards import fmt, fmt_ci, train_command, write_model_card
from melanoma.modeling.runs import METRICS_FILE, read_run

if TYPE_CHECKING:
    from melanoma.data.archive import Archive

ECE_BINS = 15
PARTIAL_AUC_SENSITIVITY = 0.8
CI_LEVEL = 0.95
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
# HAM10000's diagnosis codes -> the ISIC 2019 submission columns.
HAM_TO_ISIC = {"mel": "MEL", "nv": "NV", "bcc": "BCC", "akiec": "AK", "bkl": "BKL", "df": "DF", "vasc": "VASC", "scc": "SCC"}
ISIC_COLUMNS = [*ISIC2019_CLASSES, "UNK"]
# The manifest column naming each image's source: `source` (one per data set or clinic),
# else HAM10000's `dataset` site.
SOURCE_COLUMNS = ("source", "dataset")
HISTOPATHOLOGY = "histo"  # HAM10000 dx_type of a diagnosis confirmed by histopathology
UNKNOWN_SOURCE = "unknown"
TIE = -1  # the predicted "class" of an image whose top probability is shared (ISIC: "undecided")


def melanoma_index(classes: list[str]) -> int | None:
    """The index of the melanoma class in ``classes``, or None if there is none."""
    for index, name in enumerate(classes):
        if name in MELANOMA_LABELS:
            return index
    return None


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
            "auc": _finite(one_vs_rest_auc(is_class, probabilities[:, index])),
            "pauc_80": _finite(partial_auc_above_sensitivity(is_class, probabilities[:, index])),
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
        "auc": _finite(one_vs_rest_auc(is_mel, scores)),
        "pauc_80": _finite(partial_auc_above_sensitivity(is_mel, scores)),
        "target_sensitivity": target_sensitivity,
        "threshold": threshold,
        "sensitivity": float(flagged[is_mel].mean()) if is_mel.any() else None,
        "specificity": float((~flagged[~is_mel]).mean()) if (~is_mel).any() else None,
        "specificity_at_target": _finite(specificity_at_sensitivity(is_mel, scores, target_sensitivity)),
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


def source_column(manifest: pd.DataFrame) -> str | None:
    """The manifest column that names each image's source, or None where there is none."""
    return next((column for column in SOURCE_COLUMNS if column in manifest.columns), None)


def nevus_index(classes: list[str]) -> int | None:
    """The index of the nevus class in ``classes``, or None if there is none."""
    return next((index for index, name in enumerate(classes) if name in NEVUS_LABELS), None)


def subgroup_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], rows: pd.DataFrame, *,
                     samples: int, seed: int) -> dict[str, Any]:
    """``per_source`` (images, melanomas, BMA, melanoma AUC of each source) and
    ``melanoma_vs_nevi`` (the melanoma score's AUC against all nevi and against nevi
    confirmed by histopathology, with lesion-bootstrap intervals of ``samples`` resamples).

    ``rows`` are the manifest rows of the evaluated images, in the order of ``labels``.
    A part is left out where the data cannot give it (no source column, no melanoma or
    nevus class, no ``dx_type``)."""
    result: dict[str, Any] = {}
    mel_index = melanoma_index(classes)
    column = source_column(rows)
    if column is not None:
        sources = rows[column].fillna(UNKNOWN_SOURCE).astype(str).to_numpy()
        per_source = {}
        for name in sorted(set(sources)):
            chosen = sources == name
            recalls = class_recalls(labels[chosen], probabilities[chosen].argmax(axis=1), len(classes))
            per_source[name] = {
                "n_images": int(chosen.sum()),
                "melanomas": int((labels[chosen] == mel_index).sum()) if mel_index is not None else None,
                "bma": float(np.nanmean(recalls)),
                "melanoma_auc": _finite(one_vs_rest_auc(labels[chosen] == mel_index, probabilities[chosen, mel_index]))
                if mel_index is not None else None,
            }
        result["per_source"] = {"column": column, "sources": per_source}
    nv_index = nevus_index(classes)
    if mel_index is None or nv_index is None:
        return result
    groups = rows["group_id"].astype(str).to_numpy()
    is_mel, is_nevus = labels == mel_index, labels == nv_index
    comparisons = {"all": is_nevus}
    if "dx_type" in rows.columns:
        comparisons["histopathology"] = is_nevus & (rows["dx_type"].astype(str).str.strip() == HISTOPATHOLOGY).to_numpy()
    versus = {}
    for name, nevi in comparisons.items():
        chosen = is_mel | nevi
        versus[name] = _auc_with_interval(is_mel[chosen], probabilities[chosen, mel_index], groups[chosen],
                                          samples=samples, seed=seed)
    result["melanoma_vs_nevi"] = versus
    return result


def _auc_with_interval(is_positive: np.ndarray, scores: np.ndarray, groups: np.ndarray, *, samples: int,
                       seed: int) -> dict[str, Any]:
    value = _finite(one_vs_rest_auc(is_positive, scores))
    interval = None
    if value is not None and samples > 0:
        interval = percentile_interval([
            one_vs_rest_auc(is_positive[weight > 0], scores[weight > 0], weight[weight > 0])
            for weight in lesion_resamples(groups, samples, seed)
        ], CI_LEVEL)
    return {"melanomas": int(is_positive.sum()), "nevi": int((~is_positive).sum()), "auc": value, "ci": interval}


def subgroup_report_lines(metrics: dict[str, Any]) -> list[str]:
    """The per-source and melanoma-vs-nevi sections of the evaluation report (Markdown)."""
    lines: list[str] = []
    per_source = metrics.get("per_source")
    if per_source:
        lines += ["", f"## By source (manifest column `{per_source['column']}`)", "",
                  "Each source's BMA is the mean recall of the classes present in it.", "",
                  "| source | images | melanomas | BMA | melanoma ROC AUC |", "|---|---|---|---|---|"]
        for name, row in per_source["sources"].items():
            lines.append(f"| {name} | {row['n_images']} | {_fmt_count(row['melanomas'])} | {fmt(row['bma'])} | "
                         f"{fmt(row['melanoma_auc'])} |")
    versus = metrics.get("melanoma_vs_nevi")
    if versus:
        names = {"all": "all nevi", "histopathology": "nevi confirmed by histopathology (`dx_type` histo)"}
        lines += ["", "## Melanoma vs nevi", "", "The melanoma probability's ROC AUC on the melanomas and the nevi only.",
                  "", "| melanoma vs | melanomas | nevi | ROC AUC | 95% CI (lesion bootstrap) |", "|---|---|---|---|---|"]
        for name, row in versus.items():
            lines.append(f"| {names[name]} | {row['melanomas']} | {row['nevi']} | {fmt(row['auc'])} | {fmt_ci(row['ci'])} |")
    return lines


def isic_columns(classes: list[str]) -> list[str] | None:
    """The ISIC 2019 column of each class, or None if the classes are not ISIC/HAM ones."""
    mapped = [name if name in ISIC2019_CLASSES else HAM_TO_ISIC.get(name) for name in classes]
    return None if None in mapped or len(set(mapped)) != len(mapped) else mapped


def truth_table(image_ids: list[str], labels: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """The ground truth in the ISIC 2019 format (``ISIC_2019_Training_GroundTruth.csv``):
    ``image`` then a 1.0/0.0 column per class, with the columns of :func:`submission_table`."""
    return submission_table(image_ids, np.eye(len(classes))[labels], classes)


def submission_table(image_ids: list[str], probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Predictions in the ISIC submission format: ``image`` then one probability column per
    class (``MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK`` where the classes map to ISIC 2019, with
    0.0 for the classes the model does not know; otherwise the archive's own classes)."""
    columns = isic_columns(classes)
    table = pd.DataFrame({"image": list(image_ids)})
    if columns is None:
        for index, name in enumerate(classes):
            table[name] = probabilities[:, index].astype(np.float64)
        return table
    for name in ISIC_COLUMNS:
        table[name] = probabilities[:, columns.index(name)].astype(np.float64) if name in columns else 0.0
    return table


def predict_rows(model: Any, archive: Archive, rows: np.ndarray, batch_size: int = 64, *, tta: bool = False) -> np.ndarray:
    """Class probabilities of archive rows, read batch by batch from the memory map;
    ``tta`` averages them over the 8 flips/rotations of each image."""
    from melanoma.modeling.predict import tta_mean
    from melanoma.modeling.train import ArchiveFeed

    feed = ArchiveFeed(archive.images, archive.labels, rows, batch_size=batch_size)
    if not tta:
        return normalised(model.predict(feed, verbose=0))
    return normalised(np.concatenate([tta_mean(model.predict_on_batch, feed[index][0]) for index in range(len(feed))]))


def evaluate_run(run_dir: Path, archive: Archive, split: str = "test", *, target_sensitivity: float,
                 bootstrap_samples: int, seed: int, tta: bool = False, calibration: bool = True) -> dict[str, Any]:
    """Evaluate a run's best model on ``split``: write ``metrics.json``, ``figures/*.png``,
    ``report.md`` and ``predictions_<split>.csv`` into the run folder; return the metrics.
    ``tta`` averages every prediction, validation ones included, over 8 flips/rotations.
    ``calibration`` applies the run's temperature (where fitted) to every probability."""
    from melanoma import plots
    from melanoma.modeling.predict import load_keras_model  # clear ModelError for a damaged file

    run = read_run(run_dir)
    check_archive(run.meta, archive)
    rows, val_rows = archive.indices(split), archive.indices("val")
    if len(rows) == 0:
        raise ModelError(f"The archive {archive.path} has no images in its {split!r} split.")
    model = load_keras_model(run.model_path)
    temperature = run.temperature if calibration else 1.0

    def predict(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw = predict_rows(model, archive, rows, tta=tta)
        return normalised(temperature_scale(raw, temperature)), raw

    probabilities, uncalibrated = predict(rows)
    labels = archive.labels[rows]
    classes = run.classes
    mel_index = melanoma_index(classes)

    metrics: dict[str, Any] = {"split": split, "n_images": int(len(rows)), "run_id": run.run_id,
                               "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": seed,
                               "tta": tta, "temperature": temperature}
    metrics.update(classification_metrics(labels, probabilities, classes))
    metrics["calibration"] = {"temperature": temperature, "fitted_temperature": run.temperature,
                              "before": calibration_scores(labels, uncalibrated),
                              "after": calibration_scores(labels, probabilities)}
    if mel_index is not None:
        val_probabilities = probabilities if split == "val" else predict(val_rows)[0]
        metrics["melanoma"] = {"class": classes[mel_index], **melanoma_metrics(
            labels, probabilities, archive.labels[val_rows], val_probabilities, mel_index, target_sensitivity)}
    groups = archive.manifest["group_id"].to_numpy()[rows]
    metrics["ci"] = bootstrap_intervals(labels, probabilities, groups, mel_index, samples=bootstrap_samples, seed=seed)
    metrics.update(subgroup_metrics(labels, probabilities, classes, archive.manifest.iloc[rows],
                                    samples=bootstrap_samples, seed=seed))

    run_dir = Path(run_dir)
    figures = run_dir / FIGURES_DIR
    figures.mkdir(exist_ok=True)
    metrics["figures"] = {
        "confusion_matrix": plots.confusion_matrix_figure(np.array(metrics["confusion_matrix"]), classes,
                                                          figures / f"confusion_matrix_{split}.png"),
        "roc": plots.roc_figure(labels, probabilities, classes, figures / f"roc_{split}.png", highlight=mel_index,
                                operating_point=_operating_point(metrics)),
        "reliability": plots.reliability_figure(reliability_bins(labels, probabilities), metrics["ece"],
                                                figures / f"reliability_{split}.png",
                                                title=f"temperature {temperature:.3g}" if temperature != 1 else None),
    }
    if temperature != 1:
        metrics["figures"]["reliability_uncalibrated"] = plots.reliability_figure(
            reliability_bins(labels, uncalibrated), metrics["calibration"]["before"]["ece"],
            figures / f"reliability_{split}_uncalibrated.png", title="uncalibrated")
    metrics["figures"] = {name: str(path.relative_to(run_dir)) for name, path in metrics["figures"].items()}
    predictions = submission_table(archive.manifest["image_id"].to_numpy()[rows].tolist(), probabilities, classes)
    metrics["predictions"] = f"predictions_{split}.csv"
    metrics["ground_truth"] = f"ground_truth_{split}.csv"
    _write_csv(predictions, run_dir / metrics["predictions"])
    _write_csv(truth_table(predictions["image"].tolist(), labels, classes), run_dir / metrics["ground_truth"])
    metrics = _json_safe(metrics)
    write_json(run_dir / METRICS_FILE, metrics)
    write_text(run_dir / REPORT_FILE, render_report(run.meta, metrics, archive, run_dir))
    write_model_card(run_dir, archive.header)
    return metrics


def _operating_point(metrics: dict[str, Any]) -> tuple[float, float] | None:
    melanoma = metrics.get("melanoma")
    if not melanoma or melanoma["sensitivity"] is None or melanoma["specificity"] is None:
        return None
    return 1 - melanoma["specificity"], melanoma["sensitivity"]


def render_report(meta: dict[str, Any], metrics: dict[str, Any], archive: Archive, run_dir: Path) -> str:
    """The evaluation as Markdown: summary, melanoma operating point, per-class table,
    confusion matrix, figures, and the commands that reproduce it."""
    ci = metrics.get("ci", {})
    split = metrics["split"]
    lines = [
        f"# Evaluation of run `{meta.get('run_id')}` on the {split} split",
        "",
        f"{_model_summary(meta)}. Archive `{archive.path}` "
        f"(sha256 {str(archive.header.get('sha256'))[:12]}…, split seed {archive.header.get('seed')}"
        f"{', test where ' + str(archive.header.get('test_where')) if archive.header.get('test_where') else ''}): "
        f"{metrics['n_images']} images in the {split} split"
        f"{', predictions averaged over 8 flips/rotations (TTA)' if metrics.get('tta') else ''}. "
        f"Evaluated {metrics['evaluated']}, bootstrap seed {metrics['seed']}.",
        "",
        "## Summary",
        "",
        "| metric | value | 95% CI (lesion bootstrap) |",
        "|---|---|---|",
        f"| balanced multiclass accuracy | {fmt(metrics['bma'])} | {fmt_ci(ci.get('bma'))} |",
        f"| accuracy | {fmt(metrics['accuracy'])} | |",
        f"| macro ROC AUC | {fmt(metrics['macro_auc'])} | |",
        f"| macro average precision | {fmt(metrics.get('macro_ap'))} | |",
    ]
    melanoma = metrics.get("melanoma")
    if melanoma:
        lines.append(f"| melanoma ROC AUC | {fmt(melanoma['auc'])} | {fmt_ci(ci.get('melanoma_auc'))} |")
    lines += [
        f"| expected calibration error ({ECE_BINS} bins) | {fmt(metrics['ece'])} | |",
        f"| Brier score (multiclass, 0..2) | {fmt(metrics['brier'])} | |",
        f"| log loss | {fmt(metrics['log_loss'])} | |",
    ]
    calibration = metrics.get("calibration")
    if calibration:
        before, after = calibration["before"], calibration["after"]
        applied = (f"temperature {calibration['temperature']:.3f}, fitted on the validation split by NLL"
                   if calibration["temperature"] != 1 else
                   "none applied" + (" (calibration switched off)" if calibration["fitted_temperature"] != 1
                                     else " (the run has no fitted temperature: `melanoma calibrate`)"))
        lines += [
            "",
            f"## Calibration ({applied})",
            "",
            "| | ECE | Brier | NLL |",
            "|---|---|---|---|",
            f"| uncalibrated | {fmt(before['ece'])} | {fmt(before['brier'])} | {fmt(before['nll'])} |",
            f"| as reported | {fmt(after['ece'])} | {fmt(after['brier'])} | {fmt(after['nll'])} |",
        ]
    if melanoma:
        lines += [
            "",
            f"## Melanoma ({melanoma['class']} vs rest)",
            "",
            f"The threshold {melanoma['threshold']:.4f} was chosen on the validation split to reach a sensitivity of "
            f"{melanoma['target_sensitivity']:.3f}; on the {split} split it gives:",
            "",
            "| sensitivity | specificity | specificity at the target sensitivity | partial AUC (sens. ≥ 0.8) | melanomas | others |",
            "|---|---|---|---|---|---|",
            f"| {fmt(melanoma['sensitivity'])} | {fmt(melanoma['specificity'])} | {fmt(melanoma['specificity_at_target'])} "
            f"| {fmt(melanoma['pauc_80'])} | {melanoma['positives']} | {melanoma['negatives']} |",
        ]
    lines += subgroup_report_lines(metrics)
    lines += ["", "## Per class", "",
              "| class | images | recall | precision | ROC AUC | partial AUC (sens. ≥ 0.8) | average precision |",
              "|---|---|---|---|---|---|---|"]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {row['support']} | {fmt(row['recall'])} | {fmt(row['precision'])} | "
                     f"{fmt(row['auc'])} | {fmt(row['pauc_80'])} | {fmt(row.get('ap'))} |")
    if metrics.get("ties"):
        lines += ["", f"{metrics['ties']} image(s) had two classes tied for the top probability: counted as wrong "
                  "(as the ISIC scorer does) and left out of the confusion matrix."]
    classes = list(metrics["per_class"])
    lines += ["", "## Confusion matrix (rows: true class, columns: predicted)", "",
              "| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for name, counts in zip(classes, metrics["confusion_matrix"]):
        lines.append(f"| **{name}** | " + " | ".join(str(count) for count in counts) + " |")
    lines += ["", "## Figures", ""]
    lines += [f"![{name.replace('_', ' ')}]({path})" for name, path in metrics["figures"].items()]
    lines += [
        "",
        "## Reproduce",
        "",
        "```",
        f"melanoma ensemble --out {run_dir} --runs " + " ".join(m["run"] for m in meta["ensemble"]["members"])
        if "ensemble" in meta else
        train_command(meta, archive.path),
        f"melanoma evaluate --run {run_dir} --split {split} --archive {archive.path}",
        "```",
        "",
        f"Predictions in the ISIC submission format: [{metrics['predictions']}]({metrics['predictions']}); "
        f"the ground truth in the ISIC 2019 format: [{metrics['ground_truth']}]({metrics['ground_truth']}).",
        "",
    ]
    return "\n".join(lines)


def _model_summary(meta: dict[str, Any]) -> str:
    """The evaluated model in a phrase: what it is, its size and how it was trained or built."""
    if "ensemble" in meta:
        members = meta["ensemble"]["members"]
        return (f"Ensemble of {len(members)} runs ({meta['ensemble']['combine']}): "
                + ", ".join(f"`{m['run_id']}` ({m['model']}, seed {m['seed']}, temperature {m['temperature']:g})"
                            for m in members) + f"; {meta.get('image_size')} px")
    best = meta.get("best") or {}
    return (f"Model `{meta.get('model')}` (weights: {meta.get('weights')}), {meta.get('image_size')} px, "
            f"{meta.get('epochs_done')} epoch(s) (best: epoch {best.get('epoch')}, val BMA {fmt(best.get('val_bma'))})")


def check_archive(meta: dict[str, Any], archive: Archive) -> None:
    recorded = (meta.get("archive") or {}).get("sha256")
    if recorded and recorded != archive.header.get("sha256"):
        raise ModelError(f"The archive {archive.path} is not the one run {meta.get('run_id')} was trained on "
                         f"({meta['archive'].get('path')}): its splits may differ.",
                         hint=f"Pass --archive {meta['archive'].get('path')}.")
    if list(archive.classes) != list(meta.get("classes", [])):
        raise ModelError(f"The archive {archive.path} has classes {archive.classes}, the run has {meta.get('classes')}.")


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _json_safe(value: Any) -> Any:
    """NaN -> None (JSON has no NaN) and NumPy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _fmt_count(value: int | None) -> str:
    return "–" if value is None else str(value)


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    # Every probability is written as a float ("0.0", not "0"), as the ISIC scorer requires, and
    # in full (shortest round-trip form), so that scoring the file reproduces metrics.json.
    write_text(path, table.to_csv(index=False))
