"""Evaluation metrics against scikit-learn and the ISIC definitions, and the written report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from melanoma.modeling.evaluate import subgroup_metrics, subgroup_report_lines
from melanoma.modeling.isic import ISIC_COLUMNS, submission_table
from melanoma.modeling.metrics import (
    bootstrap_intervals,
    classification_metrics,
    expected_calibration_error,
    partial_auc_above_sensitivity,
    specificity_at_sensitivity,
    threshold_for_sensitivity,
)

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def random_predictions(n: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probabilities


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bma_equals_sklearn_balanced_accuracy(seed: int) -> None:
    labels, probabilities = random_predictions(300, 7, seed)
    labels[labels == 6] = 0  # a class absent from the truth: ISIC and sklearn both ignore it
    metrics = classification_metrics(labels, probabilities, HAM_CLASSES)
    assert metrics["bma"] == pytest.approx(balanced_accuracy_score(labels, probabilities.argmax(axis=1)), abs=1e-12)
    assert metrics["per_class"]["vasc"]["recall"] is None


def test_majority_class_predictor_scores_one_over_the_number_of_classes() -> None:
    labels, _ = random_predictions(500, 7)
    always_nv = np.tile(np.eye(7)[HAM_CLASSES.index("nv")] * 0.9 + 0.1 / 7, (500, 1))
    assert classification_metrics(labels, always_nv, HAM_CLASSES)["bma"] == pytest.approx(1 / 7)


def test_partial_auc_is_the_isic_area_above_80_percent_sensitivity() -> None:
    # ROC points: (0,0) (0,.5) (.5,.5) (.5,1) (1,1); above TPR .8 lies the rectangle from FPR .5 to 1.
    truth = np.array([0, 0, 1, 1])
    assert partial_auc_above_sensitivity(truth, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.5)
    assert partial_auc_above_sensitivity(truth, np.array([0.1, 0.2, 0.7, 0.8])) == pytest.approx(1.0)
    labels, probabilities = random_predictions(400, 2, seed=3)
    partial = partial_auc_above_sensitivity(labels == 1, probabilities[:, 1])
    assert 0 < partial < roc_auc_score(labels == 1, probabilities[:, 1])
    # Not the McClish-standardised value that scikit-learn's max_fpr gives.
    assert partial != pytest.approx(roc_auc_score(labels == 0, 1 - probabilities[:, 1], max_fpr=0.2), abs=1e-3)


def test_threshold_from_one_split_reaches_the_target_sensitivity_there() -> None:
    labels, probabilities = random_predictions(1000, 2, seed=4)
    is_positive, scores = labels == 1, probabilities[:, 1]
    threshold = threshold_for_sensitivity(is_positive, scores, 0.741)
    sensitivity = (scores[is_positive] >= threshold).mean()
    assert 0.741 <= sensitivity < 0.741 + 2 / is_positive.sum()
    specificity = (scores[~is_positive] < threshold).mean()
    assert specificity_at_sensitivity(is_positive, scores, 0.741) == pytest.approx(specificity)


def test_ece_is_zero_when_calibrated_and_the_gap_when_overconfident() -> None:
    # Within each confidence level exactly that share of predictions is right.
    labels, probabilities = [], []
    for confidence in (0.55, 0.65, 0.75, 0.85, 0.95):
        n_right = round(confidence * 100)
        probabilities += [[confidence, 1 - confidence]] * 100
        labels += [0] * n_right + [1] * (100 - n_right)
    assert expected_calibration_error(np.array(labels), np.array(probabilities)) == pytest.approx(0, abs=1e-9)
    overconfident = np.tile([0.99, 0.01], (100, 1))
    assert expected_calibration_error(np.array([0, 1] * 50), overconfident) == pytest.approx(0.49)


def test_bootstrap_resamples_whole_lesions() -> None:
    labels, probabilities = random_predictions(300, 7, seed=5)
    labels[:50] = 4  # make sure melanoma is present
    groups = np.arange(300) // 3
    ci = bootstrap_intervals(labels, probabilities, groups, 4, samples=200, seed=0)
    bma = balanced_accuracy_score(labels, probabilities.argmax(axis=1))
    assert ci["bma"][0] < bma < ci["bma"][1] and ci["melanoma_auc"][0] < ci["melanoma_auc"][1]
    assert ci == bootstrap_intervals(labels, probabilities, groups, 4, samples=200, seed=0)
    one_lesion = bootstrap_intervals(labels, probabilities, np.zeros(300), 4, samples=20, seed=0)
    assert one_lesion["bma"][0] == pytest.approx(one_lesion["bma"][1])


def test_submission_maps_ham_classes_to_isic_columns_or_keeps_its_own() -> None:
    probabilities = np.full((2, 7), 1 / 7)
    table = submission_table(["ISIC_1", "ISIC_2"], probabilities, HAM_CLASSES)
    assert table.columns.tolist() == ["image", *ISIC_COLUMNS]
    assert (table["SCC"] == 0).all() and (table["UNK"] == 0).all() and table["MEL"].iloc[0] == pytest.approx(1 / 7)
    own = submission_table(["a"], np.array([[0.3, 0.7]]), ["benign", "malignant"])
    assert own.columns.tolist() == ["image", "benign", "malignant"]


def manifest_rows(labels: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """Manifest rows as a multi-source archive has them: HAM10000 sites in ``dataset``, a
    ``source`` column (with one image of unknown source), ``dx_type`` for HAM images only."""
    rng = np.random.default_rng(seed)
    source = rng.choice(["rosendahl", "vidir_modern", "isic-archive"], len(labels))
    rows = pd.DataFrame({"group_id": [f"L{i // 2}" for i in range(len(labels))], "source": source,
                         "dataset": np.where(source == "isic-archive", None, "vienna"),
                         "dx_type": np.where(source == "isic-archive", None, rng.choice(["histo", "follow_up"], len(labels)))})
    rows.loc[0, "source"] = None
    return rows


def test_metrics_by_source_and_melanoma_against_nevi() -> None:
    labels, probabilities = random_predictions(600, 7, seed=6)
    rows = manifest_rows(labels)
    result = subgroup_metrics(labels, probabilities, HAM_CLASSES, rows, samples=50, seed=0)
    per_source = result["per_source"]
    assert per_source["column"] == "source"  # `source` wins over HAM's `dataset`
    assert list(per_source["sources"]) == ["isic-archive", "rosendahl", "unknown", "vidir_modern"]
    assert per_source["sources"]["unknown"]["n_images"] == 1
    for name, row in per_source["sources"].items():
        chosen = rows["source"].fillna("unknown").to_numpy() == name
        assert row["n_images"] == chosen.sum() and row["melanomas"] == (labels[chosen] == 4).sum()
        if name != "unknown":  # one image: scikit-learn warns about it
            assert row["bma"] == pytest.approx(balanced_accuracy_score(labels[chosen], probabilities[chosen].argmax(axis=1)))
            assert row["melanoma_auc"] == pytest.approx(roc_auc_score(labels[chosen] == 4, probabilities[chosen, 4]))
    # Within sources: each source's AUC weighted by its melanoma x other-lesion pairs (the
    # one image of unknown source pairs with nothing).
    pairs = {name: row["melanomas"] * (row["n_images"] - row["melanomas"]) for name, row in per_source["sources"].items()}
    within = per_source["within_sources_melanoma_auc"]
    assert within["auc"] == pytest.approx(sum(per_source["sources"][name]["melanoma_auc"] * n for name, n in pairs.items()
                                              if n) / sum(pairs.values()))
    assert within["ci"][0] < within["auc"] < within["ci"][1]

    versus = result["melanoma_vs_nevi"]
    histo_nevi = (labels == 5) & (rows["dx_type"] == "histo").to_numpy()
    chosen = (labels == 4) | histo_nevi
    assert versus["histopathology"]["nevi"] == histo_nevi.sum() < versus["all"]["nevi"] == (labels == 5).sum()
    assert versus["histopathology"]["auc"] == pytest.approx(roc_auc_score(labels[chosen] == 4, probabilities[chosen, 4]))
    chosen = np.isin(labels, [4, 5])
    assert versus["all"]["auc"] == pytest.approx(roc_auc_score(labels[chosen] == 4, probabilities[chosen, 4]))
    assert versus["all"]["ci"][0] < versus["all"]["auc"] < versus["all"]["ci"][1]

    lines = "\n".join(subgroup_report_lines(result))
    assert "## By source (manifest column `source`)" in lines and "| rosendahl |" in lines
    assert f"Melanoma ROC AUC within sources: {within['auc']:.3f}" in lines
    assert "| nevi confirmed by histopathology (`dx_type` histo) |" in lines


def test_subgroups_fall_back_to_the_dataset_column_or_are_left_out() -> None:
    labels, probabilities = random_predictions(200, 7, seed=7)
    rows = manifest_rows(labels).drop(columns="source")
    result = subgroup_metrics(labels, probabilities, HAM_CLASSES, rows, samples=0, seed=0)
    assert result["per_source"]["column"] == "dataset" and result["melanoma_vs_nevi"]["all"]["ci"] is None
    assert list(result["per_source"]["sources"]) == ["unknown", "vienna"]
    bare = subgroup_metrics(labels, probabilities, HAM_CLASSES, rows[["group_id"]], samples=0, seed=0)
    assert list(bare) == ["melanoma_vs_nevi"] and list(bare["melanoma_vs_nevi"]) == ["all"]
    no_nevi = subgroup_metrics(labels % 2, probabilities[:, :2], ["benign", "melanoma"], rows, samples=0, seed=0)
    assert "melanoma_vs_nevi" not in no_nevi and no_nevi["per_source"]["sources"]["vienna"]["melanoma_auc"] is not None


@pytest.mark.realdata
def test_evaluation_files_follow_the_isic_scorer_rules(trained_run: Path, small_ham_archive: Path) -> None:
    from melanoma.data.archive import open_archive

    archive = open_archive(small_ham_archive)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    predictions = pd.read_csv(trained_run / metrics["predictions"], header=0, index_col=False)
    # The rules of isic-challenge-scoring's parse_csv: an image column, exactly the class
    # columns, float64 values in [0, 1], no missing value, one row per image.
    assert predictions.columns.tolist() == ["image", *ISIC_COLUMNS]
    values = predictions[ISIC_COLUMNS]
    assert (values.dtypes == np.float64).all() and not values.isna().any().any()
    assert ((values >= 0) & (values <= 1)).all().all()
    assert predictions["image"].is_unique
    assert sorted(predictions["image"]) == sorted(archive.manifest["image_id"][archive.indices("test")])
    np.testing.assert_allclose(values.sum(axis=1), 1, atol=1e-4)

    assert metrics["split"] == "test" and metrics["n_images"] == len(archive.indices("test"))
    assert {"bma", "accuracy", "per_class", "macro_auc", "confusion_matrix", "ece", "brier", "ci"} <= set(metrics)
    assert {"auc", "threshold", "sensitivity", "specificity", "specificity_at_target"} <= set(metrics["melanoma"])
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n_images"]
    report = (trained_run / "report.md").read_text()
    for path in metrics["figures"].values():
        assert (trained_run / path).stat().st_size > 1000 and f"]({path})" in report
    assert f"{metrics['bma']:.3f}" in report
    # HAM10000's sites (its `dataset` column, the archive's `source`) and its histopathology-confirmed nevi.
    sources = metrics["per_source"]["sources"]
    assert metrics["per_source"]["column"] == "source" and set(sources) <= {"rosendahl", "vidir_modern",
                                                                             "vidir_molemax", "vienna_dias"}
    assert sum(row["n_images"] for row in sources.values()) == metrics["n_images"]
    assert metrics["melanoma_vs_nevi"]["histopathology"]["nevi"] <= metrics["melanoma_vs_nevi"]["all"]["nevi"]
    assert "## By source (manifest column `source`)" in report and "## Melanoma vs nevi" in report
