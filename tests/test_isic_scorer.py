"""The ISIC challenge's own scorer (``isic-challenge-scoring``) on what `evaluate` writes:
it agrees with metrics.json to 1e-6.

isic-challenge-scoring 5.6 is the last release for Python < 3.13. Its CSV reader for
predictions (``load_csv.parse_csv``) calls ``DataFrame.applymap``, which pandas 3 removed, so
the predictions are read here the way it reads them (header row, ``image`` as index, float64
columns in [0, 1]); the ground truth goes through its own ``parse_truth_csv``, and every
number through its ``ClassificationScore`` and ``metrics`` functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring import metrics as isic_metrics
from isic_challenge_scoring.classification import (
    ClassificationMetric,
    ClassificationScore,
)
from isic_challenge_scoring.load_csv import parse_truth_csv, sort_rows, validate_rows

from melanoma.modeling.isic import isic_columns
from melanoma.modeling.metrics import TIE, classification_metrics, predicted_labels

TOLERANCE = 1e-6
# The scorer's own pandas deprecations (inplace=..., verify_integrity=...), not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:The inplace keyword"), pytest.mark.filterwarnings("ignore:The 'verify_integrity'")]


def read_predictions(path: Path, categories: pd.Index) -> pd.DataFrame:
    table = pd.read_csv(path, header=0, index_col=False).set_index("image")
    assert table.index.is_unique
    assert sorted(table.columns) == sorted(categories), "the scorer rejects missing and extra columns"
    table = table.reindex(categories, axis="columns")
    assert (table.dtypes == np.float64).all() and table.notna().all().all()
    assert ((table >= 0) & (table <= 1)).all().all()
    return table


def test_a_tie_for_the_top_probability_is_wrong_as_in_the_isic_scorer() -> None:
    classes = ["MEL", "NV", "BCC"]
    labels = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.array([
        [0.5, 0.5, 0.0],  # tie between the true class and another: wrong
        [0.7, 0.2, 0.1],
        [0.2, 0.6, 0.2],
        [0.4, 0.3, 0.3],
        [0.1, 0.1, 0.8],
        [0.3, 0.3, 0.4],
    ])
    assert predicted_labels(probabilities).tolist() == [TIE, 0, 1, 0, 2, 2]
    ours = classification_metrics(labels, probabilities, classes)
    truth = pd.DataFrame(np.eye(3)[labels], columns=classes)
    isic_bma = isic_metrics.balanced_multiclass_accuracy(truth, pd.DataFrame(probabilities, columns=classes),
                                                         pd.Series(np.ones(len(labels))))
    assert ours["bma"] == pytest.approx(isic_bma, abs=TOLERANCE) == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert ours["ties"] == 1 and ours["per_class"]["MEL"]["recall"] == 0.5
    assert ours["accuracy"] == pytest.approx(4 / 6)
    assert np.array(ours["confusion_matrix"]).sum() == 5  # the tied image has no predicted column


@pytest.mark.realdata
@pytest.mark.slow
def test_official_scorer_agrees_with_metrics_json(trained_run: Path) -> None:
    ours = json.loads((trained_run / "metrics.json").read_text())
    truth_path, predictions_path = trained_run / ours["ground_truth"], trained_run / ours["predictions"]
    assert truth_path.name == "ground_truth_test.csv" and predictions_path.name == "predictions_test.csv"

    with truth_path.open() as stream:
        truth, weights = parse_truth_csv(stream)
    assert list(truth.columns) == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]  # ISIC 2019
    assert len(truth) == ours["n_images"] and (truth.sum(axis="columns") == 1).all()
    predictions = read_predictions(predictions_path, truth.columns)
    validate_rows(truth, predictions)
    sort_rows(truth)
    sort_rows(predictions)
    weights = weights.sort_index()

    # The scorer's ROC AUC needs positives in every column: score the classes of this split
    # (HAM10000 has no SCC and no UNK; the model gives them 0.0, never the top probability).
    present = truth.columns[truth.sum(axis="index") > 0]
    absent = truth.columns.difference(present)
    assert len(present) == 7 and (predictions[absent] == 0).all().all()
    score = ClassificationScore(truth[present], predictions[present], weights, ClassificationMetric.BALANCED_ACCURACY)

    assert score.overall == pytest.approx(ours["bma"], abs=TOLERANCE)
    assert isic_metrics.balanced_multiclass_accuracy(truth, predictions, weights.score_weight) == pytest.approx(
        ours["bma"], abs=TOLERANCE)  # all 9 columns: the absent ones do not count
    column_of = dict(zip(ours["per_class"], isic_columns(list(ours["per_class"]))))
    for name, row in ours["per_class"].items():
        official = score.per_category.loc[column_of[name]]
        assert official["auc"] == pytest.approx(row["auc"], abs=TOLERANCE), name
        assert official["auc_sens_80"] == pytest.approx(row["pauc_80"], abs=TOLERANCE), name
        assert official["ap"] == pytest.approx(row["ap"], abs=TOLERANCE), name
    assert score.macro_average["ap"] == pytest.approx(ours["macro_ap"], abs=TOLERANCE)
    assert score.macro_average["auc"] == pytest.approx(ours["macro_auc"], abs=TOLERANCE)
    assert score.per_category.loc["MEL", "auc"] == pytest.approx(ours["melanoma"]["auc"], abs=TOLERANCE)
    assert score.per_category.loc["MEL", "auc_sens_80"] == pytest.approx(ours["melanoma"]["pauc_80"], abs=TOLERANCE)
