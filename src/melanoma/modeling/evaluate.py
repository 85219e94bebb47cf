"""Evaluation: the metrics the field reports, figures, a readable report, ISIC predictions.

The metrics are scikit-learn's where it has them. Two come from the ISIC challenge's own
definitions (``isic-challenge-scoring``): balanced multiclass accuracy (the mean recall of
the classes present) and the partial AUC above 80% sensitivity, which is the area under
the ROC curve over the part where sensitivity is at least 0.8, *without* the McClish
standardisation that ``roc_auc_score(max_fpr=...)`` applies.

The melanoma operating point is chosen on the validation split (the threshold that
reaches the target sensitivity there) and then applied, unchanged, to the evaluated split,
so that the reported sensitivity and specificity are honest estimates.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    auc,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from melanoma.config import ISIC2019_CLASSES, MELANOMA_LABELS
from melanoma.errors import ModelError
from melanoma.files import write_json, write_text
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


def one_vs_rest_auc(is_positive: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """ROC AUC, or NaN where it is undefined (only one class present)."""
    if is_positive.all() or not is_positive.any():
        return math.nan
    return float(roc_auc_score(is_positive, scores, sample_weight=sample_weight))


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


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """BMA, accuracy, per-class recall/precision/AUC/partial AUC, macro AUC, confusion matrix,
    ECE and Brier score."""
    num_classes = len(classes)
    predicted = probabilities.argmax(axis=1)
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
        }
    aucs = [row["auc"] for row in per_class.values() if row["auc"] is not None]
    present_recalls = [row["recall"] for row in per_class.values() if row["recall"] is not None]
    return {
        # The ISIC definition: the mean recall of the classes present (= balanced_accuracy_score).
        "bma": float(np.mean(present_recalls)),
        "accuracy": float((predicted == labels).mean()),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, predicted, labels=range(num_classes)).tolist(),
        "ece": expected_calibration_error(labels, probabilities),
        "brier": float(brier_score_loss(labels, probabilities, labels=range(num_classes))),
        "log_loss": float(log_loss(labels, probabilities, labels=range(num_classes))),
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


def bootstrap_intervals(labels: np.ndarray, probabilities: np.ndarray, groups: np.ndarray, mel_index: int | None, *,
                        samples: int, seed: int, level: float = CI_LEVEL) -> dict[str, Any]:
    """Percentile intervals for BMA and melanoma AUC, resampling lesion groups with
    replacement (images of one lesion are not independent)."""
    if samples <= 0:
        return {}
    _, group_of_row = np.unique(groups, return_inverse=True)
    n_groups = group_of_row.max() + 1
    rng = np.random.default_rng(seed)
    predicted = probabilities.argmax(axis=1)
    bmas, mel_aucs = [], []
    for _ in range(samples):
        weight = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[group_of_row]
        kept = weight > 0
        bmas.append(balanced_accuracy_score(labels[kept], predicted[kept], sample_weight=weight[kept]))
        if mel_index is not None:
            mel_aucs.append(one_vs_rest_auc(labels[kept] == mel_index, probabilities[kept, mel_index], weight[kept]))
    tail = (1 - level) / 2 * 100
    result: dict[str, Any] = {"level": level, "samples": samples, "resampled": "lesion groups",
                              "bma": np.percentile(bmas, [tail, 100 - tail]).tolist()}
    finite = [value for value in mel_aucs if not math.isnan(value)]
    if finite:
        result["melanoma_auc"] = np.percentile(finite, [tail, 100 - tail]).tolist()
    return result


def isic_columns(classes: list[str]) -> list[str] | None:
    """The ISIC 2019 column of each class, or None if the classes are not ISIC/HAM ones."""
    mapped = [name if name in ISIC2019_CLASSES else HAM_TO_ISIC.get(name) for name in classes]
    return None if None in mapped or len(set(mapped)) != len(mapped) else mapped


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
                 bootstrap_samples: int, seed: int, tta: bool = False) -> dict[str, Any]:
    """Evaluate a run's best model on ``split``: write ``metrics.json``, ``figures/*.png``,
    ``report.md`` and ``predictions_<split>.csv`` into the run folder; return the metrics.
    ``tta`` averages every prediction, validation ones included, over 8 flips/rotations."""
    from melanoma import plots
    from melanoma.modeling.predict import load_keras_model  # clear ModelError for a damaged file

    run = read_run(run_dir)
    _check_archive(run.meta, archive)
    rows, val_rows = archive.indices(split), archive.indices("val")
    if len(rows) == 0:
        raise ModelError(f"The archive {archive.path} has no images in its {split!r} split.")
    model = load_keras_model(run.model_path)
    probabilities = predict_rows(model, archive, rows, tta=tta)
    labels = archive.labels[rows]
    classes = run.classes
    mel_index = melanoma_index(classes)

    metrics: dict[str, Any] = {"split": split, "n_images": int(len(rows)), "run_id": run.run_id,
                               "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": seed,
                               "tta": tta}
    metrics.update(classification_metrics(labels, probabilities, classes))
    if mel_index is not None:
        val_probabilities = probabilities if split == "val" else predict_rows(model, archive, val_rows, tta=tta)
        metrics["melanoma"] = {"class": classes[mel_index], **melanoma_metrics(
            labels, probabilities, archive.labels[val_rows], val_probabilities, mel_index, target_sensitivity)}
    groups = archive.manifest["group_id"].to_numpy()[rows]
    metrics["ci"] = bootstrap_intervals(labels, probabilities, groups, mel_index, samples=bootstrap_samples, seed=seed)

    run_dir = Path(run_dir)
    figures = run_dir / FIGURES_DIR
    figures.mkdir(exist_ok=True)
    metrics["figures"] = {
        "confusion_matrix": plots.confusion_matrix_figure(np.array(metrics["confusion_matrix"]), classes,
                                                          figures / f"confusion_matrix_{split}.png"),
        "roc": plots.roc_figure(labels, probabilities, classes, figures / f"roc_{split}.png", highlight=mel_index,
                                operating_point=_operating_point(metrics)),
        "reliability": plots.reliability_figure(reliability_bins(labels, probabilities), metrics["ece"],
                                                figures / f"reliability_{split}.png"),
    }
    metrics["figures"] = {name: str(path.relative_to(run_dir)) for name, path in metrics["figures"].items()}
    predictions = submission_table(archive.manifest["image_id"].to_numpy()[rows].tolist(), probabilities, classes)
    metrics["predictions"] = f"predictions_{split}.csv"
    _write_csv(predictions, run_dir / metrics["predictions"])
    metrics = _json_safe(metrics)
    write_json(run_dir / METRICS_FILE, metrics)
    write_text(run_dir / REPORT_FILE, render_report(run.meta, metrics, archive, run_dir))
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
    training = meta.get("training", {})
    lines = [
        f"# Evaluation of run `{meta.get('run_id')}` on the {split} split",
        "",
        f"Model `{meta.get('model')}` (weights: {meta.get('weights')}), {meta.get('image_size')} px, "
        f"{meta.get('epochs_done')} epoch(s) (best: epoch {(meta.get('best') or {}).get('epoch')}, "
        f"val BMA {_fmt((meta.get('best') or {}).get('val_bma'))}). Archive `{archive.path}` "
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
        f"| balanced multiclass accuracy | {_fmt(metrics['bma'])} | {_fmt_ci(ci.get('bma'))} |",
        f"| accuracy | {_fmt(metrics['accuracy'])} | |",
        f"| macro ROC AUC | {_fmt(metrics['macro_auc'])} | |",
    ]
    melanoma = metrics.get("melanoma")
    if melanoma:
        lines.append(f"| melanoma ROC AUC | {_fmt(melanoma['auc'])} | {_fmt_ci(ci.get('melanoma_auc'))} |")
    lines += [
        f"| expected calibration error ({ECE_BINS} bins) | {_fmt(metrics['ece'])} | |",
        f"| Brier score (multiclass, 0..2) | {_fmt(metrics['brier'])} | |",
        f"| log loss | {_fmt(metrics['log_loss'])} | |",
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
            f"| {_fmt(melanoma['sensitivity'])} | {_fmt(melanoma['specificity'])} | {_fmt(melanoma['specificity_at_target'])} "
            f"| {_fmt(melanoma['pauc_80'])} | {melanoma['positives']} | {melanoma['negatives']} |",
        ]
    lines += ["", "## Per class", "", "| class | images | recall | precision | ROC AUC | partial AUC (sens. ≥ 0.8) |",
              "|---|---|---|---|---|---|"]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {row['support']} | {_fmt(row['recall'])} | {_fmt(row['precision'])} | "
                     f"{_fmt(row['auc'])} | {_fmt(row['pauc_80'])} |")
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
        f"melanoma train --archive {archive.path} --model {meta.get('model')} --weights {meta.get('weights')} "
        f"--epochs {training.get('epochs')} --batch-size {training.get('batch_size')} --lr {training.get('learning_rate')} "
        f"--seed {training.get('seed')} --class-balance {training.get('class_balance')}"
        f"{'' if training.get('augment', True) else ' --no-augment'}"
        f"{' --time-limit ' + str(training.get('time_limit_minutes')) if training.get('time_limit_minutes') else ''}"
        f"{' --freeze-epochs ' + str(training.get('freeze_epochs')) if training.get('freeze_epochs') else ''}",
        f"melanoma evaluate --run {run_dir} --split {split} --archive {archive.path}",
        "```",
        "",
        f"Predictions in the ISIC submission format: [{metrics['predictions']}]({metrics['predictions']}).",
        "",
    ]
    return "\n".join(lines)


def _check_archive(meta: dict[str, Any], archive: Archive) -> None:
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


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _fmt_ci(interval: list[float] | None) -> str:
    return "–" if not interval else f"{interval[0]:.3f} – {interval[1]:.3f}"


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    # Every probability is written as a float ("0.0", not "0"), as the ISIC scorer requires.
    write_text(path, table.to_csv(index=False, float_format="%.6f"))
