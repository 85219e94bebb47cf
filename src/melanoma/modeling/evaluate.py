"""Evaluation: a run scored on a split, with figures, a readable report and ISIC predictions.

The metrics are those of :mod:`.metrics` (scikit-learn's, and the ISIC challenge's balanced
multiclass accuracy and partial AUC above 80% sensitivity). ``evaluate`` writes the ground
truth of the evaluated split in the ISIC 2019 format (:mod:`.isic`) beside the predictions,
so the official scorer can be run on them (tests/test_isic_scorer.py does, and agrees with
``metrics.json``).

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from melanoma.data.sources import image_sources
from melanoma.errors import ModelError
from melanoma.files import utc_now, write_json, write_text
from melanoma.modeling.calibration import temperature_scale
from melanoma.modeling.cards import fmt, fmt_ci, reproduce_command, write_model_card
from melanoma.modeling.feed import check_archive, predict_rows
from melanoma.modeling.isic import submission_table, truth_table
from melanoma.modeling.metrics import (
    CI_LEVEL,
    ECE_BINS,
    bootstrap_intervals,
    calibration_scores,
    class_recalls,
    classification_metrics,
    excised_nevi,
    finite,
    lesion_resamples,
    melanoma_index,
    melanoma_metrics,
    nevus_index,
    normalised,
    one_vs_rest_auc,
    percentile_interval,
    reliability_bins,
    within_source_auc,
)
from melanoma.modeling.runs import (
    FIGURES_DIR,
    METRICS_FILE,
    REPORT_FILE,
    RunInfo,
    ground_truth_file,
    predictions_file,
    read_run,
)

if TYPE_CHECKING:
    from melanoma.data.archive import Archive


def subgroup_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], rows: pd.DataFrame, *,
                     samples: int, seed: int) -> dict[str, Any]:
    """``per_source`` (images, melanomas, BMA, melanoma AUC of each source, and the melanoma
    AUC within sources where two or more sources hold melanomas and other lesions) and
    ``melanoma_vs_nevi`` (the melanoma score's AUC against all nevi and against nevi
    confirmed by histopathology); intervals from ``samples`` lesion-bootstrap resamples.

    ``rows`` are the manifest rows of the evaluated images, in the order of ``labels``.
    A part is left out where the data cannot give it (no source column, no melanoma or
    nevus class, no ``dx_type``)."""
    result: dict[str, Any] = {}
    mel_index = melanoma_index(classes)
    named = image_sources(rows)
    if named is not None:
        column, sources = named[0], named[1].to_numpy()
        per_source = {}
        for name in sorted(set(sources)):
            chosen = sources == name
            recalls = class_recalls(labels[chosen], probabilities[chosen].argmax(axis=1), len(classes))
            per_source[name] = {
                "n_images": int(chosen.sum()),
                "melanomas": int((labels[chosen] == mel_index).sum()) if mel_index is not None else None,
                "bma": float(np.nanmean(recalls)),
                "melanoma_auc": finite(one_vs_rest_auc(labels[chosen] == mel_index, probabilities[chosen, mel_index]))
                if mel_index is not None else None,
            }
        result["per_source"] = {"column": column, "sources": per_source}
    if mel_index is None:
        return result
    groups = rows["group_id"].astype(str).to_numpy()
    if named is not None:
        within = _auc_with_interval(labels == mel_index, probabilities[:, mel_index], groups, samples=samples,
                                    seed=seed, strata=sources)
        if within["auc"] is not None:
            result["per_source"]["within_sources_melanoma_auc"] = within
    nv_index = nevus_index(classes)
    if nv_index is None:
        return result
    is_mel, is_nevus = labels == mel_index, labels == nv_index
    comparisons = {"all": is_nevus}
    if "dx_type" in rows.columns:
        comparisons["histopathology"] = excised_nevi(labels, classes, rows["dx_type"].to_numpy())
    versus = {}
    for name, nevi in comparisons.items():
        chosen = is_mel | nevi
        versus[name] = {"melanomas": int(is_mel.sum()), "nevi": int(nevi.sum()),
                        **_auc_with_interval(is_mel[chosen], probabilities[chosen, mel_index], groups[chosen],
                                             samples=samples, seed=seed)}
    result["melanoma_vs_nevi"] = versus
    return result


def _auc_with_interval(is_positive: np.ndarray, scores: np.ndarray, groups: np.ndarray, *, samples: int,
                       seed: int, strata: np.ndarray | None = None) -> dict[str, Any]:
    """``auc`` (within ``strata`` where given) and ``ci``, its lesion-bootstrap interval."""
    def auc(weight: np.ndarray | None = None) -> float:
        kept = slice(None) if weight is None else weight > 0
        kept_weight = None if weight is None else weight[kept]
        if strata is None:
            return one_vs_rest_auc(is_positive[kept], scores[kept], kept_weight)
        return within_source_auc(is_positive[kept], scores[kept], strata[kept], kept_weight)

    value = finite(auc())
    interval = None
    if value is not None and samples > 0:
        interval = percentile_interval([auc(weight) for weight in lesion_resamples(groups, samples, seed)], CI_LEVEL)
    return {"auc": value, "ci": interval}


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
        within = per_source.get("within_sources_melanoma_auc")
        if within:
            lines += ["", (f"Melanoma ROC AUC within sources: {fmt(within['auc'])} {fmt_ci(within['ci'])} (melanoma "
                           "and other lesions paired within each source only; the pooled AUC also rewards telling the "
                           "sources apart, which a clinic's own patients never need).")]
    versus = metrics.get("melanoma_vs_nevi")
    if versus:
        names = {"all": "all nevi", "histopathology": "nevi confirmed by histopathology (`dx_type` histo)"}
        lines += ["", "## Melanoma vs nevi", "", "The melanoma probability's ROC AUC on the melanomas and the nevi only.",
                  "", "| melanoma vs | melanomas | nevi | ROC AUC | 95% CI (lesion bootstrap) |", "|---|---|---|---|---|"]
        for name, row in versus.items():
            lines.append(f"| {names[name]} | {row['melanomas']} | {row['nevi']} | {fmt(row['auc'])} | {fmt_ci(row['ci'])} |")
    return lines


def evaluate_run(run_dir: Path, archive: Archive, split: str = "test", *, target_sensitivity: float,
                 bootstrap_samples: int, seed: int, tta: bool = False, calibration: bool = True) -> dict[str, Any]:
    """Evaluate a run's best model on ``split``: write ``metrics.json``, ``figures/*.png``,
    ``report.md`` and ``predictions_<split>.csv`` into the run folder; return the metrics.
    ``tta`` averages every prediction, validation ones included, over 8 flips/rotations.
    ``calibration`` applies the run's temperature (where fitted) to every probability."""
    from melanoma import plots
    from melanoma.modeling.predict import (
        load_keras_model,  # clear ModelError for a damaged file
    )

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

    metrics: dict[str, Any] = {"split": split, "n_images": len(rows), "run_id": run.run_id,
                               "evaluated": utc_now(), "seed": seed,
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
    metrics["predictions"] = predictions_file(split)
    metrics["ground_truth"] = ground_truth_file(split)
    _write_csv(predictions, run_dir / metrics["predictions"])
    _write_csv(truth_table(predictions["image"].tolist(), labels, classes), run_dir / metrics["ground_truth"])
    metrics = _json_safe(metrics)
    write_json(run_dir / METRICS_FILE, metrics)
    write_text(run_dir / REPORT_FILE, render_report(run, metrics, archive))
    write_model_card(run_dir, archive.header)
    return metrics


def _operating_point(metrics: dict[str, Any]) -> tuple[float, float] | None:
    melanoma = metrics.get("melanoma")
    if not melanoma or melanoma["sensitivity"] is None or melanoma["specificity"] is None:
        return None
    return 1 - melanoma["specificity"], melanoma["sensitivity"]


def render_report(run: RunInfo, metrics: dict[str, Any], archive: Archive) -> str:
    """The evaluation as Markdown: summary, melanoma operating point, per-class table,
    confusion matrix, figures, and the commands that reproduce it."""
    run_dir = run.path
    ci = metrics.get("ci", {})
    split = metrics["split"]
    lines = [
        f"# Evaluation of run `{run.run_id}` on the {split} split",
        "",
        (f"{_model_summary(run)}. Archive `{archive.path}` "
         f"(sha256 {str(archive.header.get('sha256'))[:12]}…, split seed {archive.header.get('seed')}"
         f"{', test where ' + str(archive.header.get('test_where')) if archive.header.get('test_where') else ''}): "
         f"{metrics['n_images']} images in the {split} split"
         f"{', predictions averaged over 8 flips/rotations (TTA)' if metrics.get('tta') else ''}. "
         f"Evaluated {metrics['evaluated']}, bootstrap seed {metrics['seed']}."),
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
            (f"The threshold {melanoma['threshold']:.4f} was chosen on the validation split to reach a sensitivity of "
             f"{melanoma['target_sensitivity']:.3f}; on the {split} split it gives:"),
            "",
            "| sensitivity | specificity | specificity at the target sensitivity | partial AUC (sens. ≥ 0.8) | melanomas | others |",
            "|---|---|---|---|---|---|",
            (f"| {fmt(melanoma['sensitivity'])} | {fmt(melanoma['specificity'])} | {fmt(melanoma['specificity_at_target'])} "
             f"| {fmt(melanoma['pauc_80'])} | {melanoma['positives']} | {melanoma['negatives']} |"),
        ]
    lines += subgroup_report_lines(metrics)
    lines += ["", "## Per class", "",
              "| class | images | recall | precision | ROC AUC | partial AUC (sens. ≥ 0.8) | average precision |",
              "|---|---|---|---|---|---|---|"]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {row['support']} | {fmt(row['recall'])} | {fmt(row['precision'])} | "
                     f"{fmt(row['auc'])} | {fmt(row['pauc_80'])} | {fmt(row.get('ap'))} |")
    if metrics.get("ties"):
        lines += ["", (f"{metrics['ties']} image(s) had two classes tied for the top probability: counted as wrong "
                  "(as the ISIC scorer does) and left out of the confusion matrix.")]
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
        reproduce_command(run.meta, run_dir, archive.path),
        f"melanoma evaluate --run {run_dir} --split {split} --archive {archive.path}",
        "```",
        "",
        (f"Predictions in the ISIC submission format: [{metrics['predictions']}]({metrics['predictions']}); "
         f"the ground truth in the ISIC 2019 format: [{metrics['ground_truth']}]({metrics['ground_truth']})."),
        "",
    ]
    return "\n".join(lines)


def _model_summary(run: RunInfo) -> str:
    """The evaluated model in a phrase: what it is, its size and how it was trained or built."""
    ensemble = run.meta.get("ensemble")
    if ensemble:
        members = ensemble["members"]
        return (f"Ensemble of {len(members)} runs ({ensemble['combine']}): "
                + ", ".join(f"`{m['run_id']}` ({m['model']}, seed {m['seed']}, temperature {m['temperature']:g})"
                            for m in members) + f"; {run.image_size} px")
    return (f"Model `{run.model}` (weights: {run.meta.get('weights')}), {run.image_size} px, "
            f"{run.meta.get('epochs_done')} epoch(s) (best: epoch {run.best.get('epoch')}, val BMA {fmt(run.best.get('val_bma'))})")


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
