"""`melanoma compare`: paired differences on the same images with lesion-bootstrap intervals,
checked against scikit-learn by hand; seed summaries; clear errors for runs that cannot be paired."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from melanoma.data.preprocess import PreprocessParams
from melanoma.errors import MelanomaError, ModelError
from melanoma.modeling.compare import (
    EvaluatedRun,
    compare_runs,
    run_scores,
    write_comparison,
)
from melanoma.modeling.metrics import within_source_auc
from melanoma.modeling.runs import RunInfo

# A resample can leave out every image of a class that is still predicted: scikit-learn says so.
pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
MEL = HAM_CLASSES.index("mel")


def evaluated(run_id: str, probabilities: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, seed: int = 0,
              epochs: int = 1, ids: np.ndarray | None = None, excised: np.ndarray | None = None,
              sources: np.ndarray | None = None) -> EvaluatedRun:
    meta = {"run_id": run_id, "model": "cnn", "classes": HAM_CLASSES, "image_size": 64, "preprocess": {},
            "archive": {"sha256": "abc"}, "training": {"model": "cnn", "epochs": epochs, "seed": seed}}
    run = RunInfo(Path(run_id), meta, HAM_CLASSES, 64, PreprocessParams(image_size=64), Path(run_id) / "model.keras",
                  None)
    ids = np.array([f"ISIC_{i:07d}" for i in range(len(labels))]) if ids is None else ids
    return EvaluatedRun(run, "test", ids, probabilities, labels, groups, excised, sources, tta=False)


def fake_predictions(labels: np.ndarray, skill: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), len(HAM_CLASSES))) + skill * np.eye(len(HAM_CLASSES))[labels]
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def truth() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    # Classes of very different sizes, as in HAM10000: vasc and df below 30 images.
    counts = {"akiec": 40, "bcc": 50, "bkl": 60, "df": 12, "mel": 70, "nv": 250, "vasc": 8}
    labels = rng.permutation(np.concatenate([np.full(n, HAM_CLASSES.index(c)) for c, n in counts.items()]))
    groups = np.array([f"HAM_{i // 2}" for i in range(len(labels))])  # two images per lesion
    return labels, groups


@pytest.fixture(scope="module")
def excised(truth: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Every third nevus confirmed by histopathology."""
    labels, _ = truth
    nevi = np.flatnonzero(labels == HAM_CLASSES.index("nv"))
    return np.isin(np.arange(len(labels)), nevi[::3])


@pytest.fixture(scope="module")
def sources(truth: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Two clinics, each lesion in one of them."""
    _, groups = truth
    return np.where(np.unique(groups, return_inverse=True)[1] % 3 == 0, "rosendahl", "vidir_modern")


def pairs_won(is_positive: np.ndarray, scores: np.ndarray, sources: np.ndarray, weight: np.ndarray) -> float:
    """AUC as the weighted share of (positive, negative) pairs from the same source that the
    positive wins (ties half), counted pair by pair."""
    wins = pairs = 0.0
    for i in np.flatnonzero(is_positive & (weight > 0)):
        rivals = ~is_positive & (weight > 0) & (sources == sources[i])
        pair_weight = weight[i] * weight[rivals]
        wins += (pair_weight * ((scores[i] > scores[rivals]) + 0.5 * (scores[i] == scores[rivals]))).sum()
        pairs += pair_weight.sum()
    return wins / pairs


def by_hand(labels: np.ndarray, probabilities: np.ndarray, weight: np.ndarray, excised: np.ndarray,
            sources: np.ndarray) -> dict[str, float]:
    """The five figures with scikit-learn (the within-source AUC pair by pair), the images of
    a resample repeated ``weight`` times."""
    kept = weight > 0
    predicted = probabilities.argmax(axis=1)
    common = [c for c in range(len(HAM_CLASSES)) if (labels == c).sum() >= 30]
    in_common = kept & np.isin(labels, common)
    versus = kept & ((labels == MEL) | excised)
    return {
        "melanoma_auc": roc_auc_score(labels[kept] == MEL, probabilities[kept, MEL], sample_weight=weight[kept]),
        "melanoma_auc_within_sources": pairs_won(labels == MEL, probabilities[:, MEL], sources, weight),
        "melanoma_vs_excised_nevi_auc": roc_auc_score(labels[versus] == MEL, probabilities[versus, MEL],
                                                      sample_weight=weight[versus]),
        "bma": balanced_accuracy_score(labels[kept], predicted[kept], sample_weight=weight[kept]),
        "bma_common": balanced_accuracy_score(labels[in_common], predicted[in_common], sample_weight=weight[in_common]),
    }


def test_run_scores_equal_scikit_learn_with_weights(truth: tuple[np.ndarray, np.ndarray], excised: np.ndarray,
                                                    sources: np.ndarray) -> None:
    labels, _ = truth
    probabilities = fake_predictions(labels, 1.0, seed=1)
    weight = np.random.default_rng(0).integers(0, 3, len(labels))
    common = np.bincount(labels, minlength=len(HAM_CLASSES)) >= 30
    scores = run_scores(labels, probabilities, MEL, weight.astype(float), common, excised, sources)
    for metric, value in by_hand(labels, probabilities, weight, excised, sources).items():
        assert scores[metric] == pytest.approx(value, abs=1e-12), metric
    # Without dx_type (the ISIC Archive images) there are no excised nevi to compare with;
    # without sources, or with one, no within-source AUC (with one it is the pooled AUC).
    alone = run_scores(labels, probabilities, MEL, weight.astype(float), common)
    assert np.isnan(alone["melanoma_vs_excised_nevi_auc"]) and np.isnan(alone["melanoma_auc_within_sources"])
    one_clinic = np.full(len(labels), "rosendahl")
    assert np.isnan(run_scores(labels, probabilities, MEL, weight.astype(float), common, excised,
                               one_clinic)["melanoma_auc_within_sources"])


def test_the_within_source_auc_does_not_reward_telling_sources_apart(truth: tuple[np.ndarray, np.ndarray],
                                                                      sources: np.ndarray) -> None:
    """A score that only knows the clinic (as a device shortcut would) ranks melanomas above
    other lesions in the pool, where one clinic has more melanomas, but not within a clinic."""
    labels, _ = truth
    is_mel = labels == MEL
    clinic = np.where(is_mel, np.arange(len(labels)) % 4 != 0, np.arange(len(labels)) % 4 == 0)
    clinic_names = np.where(clinic, "vidir_modern", "vidir_molemax")
    shortcut = clinic.astype(float)
    assert roc_auc_score(is_mel, shortcut) > 0.7
    assert within_source_auc(is_mel, shortcut, clinic_names) == pytest.approx(0.5)
    scores = fake_predictions(labels, 1.0, seed=4)[:, MEL]
    weight = np.random.default_rng(1).integers(1, 3, len(labels)).astype(float)
    assert within_source_auc(is_mel, scores, sources, weight) == pytest.approx(pairs_won(is_mel, scores, sources, weight))


def test_paired_differences_and_intervals_match_a_computation_by_hand(truth: tuple[np.ndarray, np.ndarray],
                                                                     excised: np.ndarray, sources: np.ndarray) -> None:
    labels, groups = truth
    first, second = fake_predictions(labels, 1.0, seed=1), fake_predictions(labels, 1.6, seed=2)
    result = compare_runs([evaluated("a", first, labels, groups, excised=excised, sources=sources),
                           evaluated("b", second, labels, groups, seed=1, excised=excised, sources=sources)],
                          samples=60, seed=3, min_class_images=30)
    assert result["common_classes"] == ["akiec", "bcc", "bkl", "mel", "nv"]
    assert result["n_images"] == len(labels) and result["n_lesions"] == len(labels) // 2

    # The documented resampling: whole lesions, with replacement, the same draws for both runs.
    lesion_of_image = np.unique(groups, return_inverse=True)[1]
    rng = np.random.default_rng(3)
    differences: dict[str, list[float]] = {
        metric: [] for metric in ("melanoma_auc", "melanoma_auc_within_sources", "melanoma_vs_excised_nevi_auc", "bma",
                                  "bma_common")}
    for _ in range(60):
        drawn = rng.integers(0, lesion_of_image.max() + 1, lesion_of_image.max() + 1)
        weight = np.bincount(drawn, minlength=lesion_of_image.max() + 1)[lesion_of_image]
        a, b = by_hand(labels, first, weight, excised, sources), by_hand(labels, second, weight, excised, sources)
        for metric, values in differences.items():
            values.append(b[metric] - a[metric])
    full = np.ones(len(labels))
    a, b = by_hand(labels, first, full, excised, sources), by_hand(labels, second, full, excised, sources)
    row = result["runs"][1]
    for metric, values in differences.items():
        assert row["difference"][metric]["value"] == pytest.approx(b[metric] - a[metric], abs=1e-12)
        assert row["difference"][metric]["ci"] == pytest.approx(np.percentile(values, [2.5, 97.5]), abs=1e-12)
        assert row[metric]["value"] == pytest.approx(b[metric], abs=1e-12)
    # A much better model: every difference is positive and resolved by the test set.
    assert all(row["difference"][m]["ci"][0] > 0 for m in differences)
    assert "difference" not in result["runs"][0] and result["baseline"] == "a"


def test_a_run_against_itself_differs_by_exactly_zero(truth: tuple[np.ndarray, np.ndarray], excised: np.ndarray,
                                                      sources: np.ndarray) -> None:
    labels, groups = truth
    probabilities = fake_predictions(labels, 1.0, seed=1)
    result = compare_runs([evaluated("a", probabilities, labels, groups, excised=excised, sources=sources),
                           evaluated("b", probabilities, labels, groups, excised=excised, sources=sources)],
                          samples=50, seed=0, min_class_images=30)
    for estimate in result["runs"][1]["difference"].values():
        assert estimate["value"] == 0 and estimate["ci"] == [0, 0]


def test_seed_summary_groups_runs_that_differ_only_by_seed(truth: tuple[np.ndarray, np.ndarray]) -> None:
    labels, groups = truth
    runs = [evaluated(f"seed{seed}", fake_predictions(labels, 1.0, seed), labels, groups, seed=seed) for seed in (0, 1, 2)]
    runs.append(evaluated("longer", fake_predictions(labels, 1.0, 3), labels, groups, seed=0, epochs=5))
    result = compare_runs(runs, samples=0, seed=0, min_class_images=30)
    assert len(result["seed_groups"]) == 1
    group = result["seed_groups"][0]
    assert group["runs"] == ["seed0", "seed1", "seed2"] and group["seeds"] == [0, 1, 2] and group["n"] == 3
    bmas = [balanced_accuracy_score(labels, run.probabilities.argmax(axis=1)) for run in runs[:3]]
    assert group["bma"]["mean"] == pytest.approx(np.mean(bmas)) and group["bma"]["sd"] == pytest.approx(np.std(bmas, ddof=1))
    assert result["runs"][1]["difference"]["bma"]["ci"] is None  # no resamples, no interval


def test_a_run_recorded_before_an_option_existed_shares_the_recipe_of_one_without_it(
        truth: tuple[np.ndarray, np.ndarray]) -> None:
    labels, groups = truth
    old = evaluated("old", fake_predictions(labels, 1.0, 0), labels, groups, seed=0)
    new, with_vignette = (evaluated(name, fake_predictions(labels, 1.0, seed), labels, groups, seed=seed)
                          for name, seed in (("new", 1), ("vignette", 2)))
    new.run.meta["training"]["vignette_augment"] = False  # what the old run did, unrecorded
    with_vignette.run.meta["training"]["vignette_augment"] = True
    result = compare_runs([old, new, with_vignette], samples=0, seed=0, min_class_images=30)
    assert [group["runs"] for group in result["seed_groups"]] == [["old", "new"]]


def test_runs_on_different_images_cannot_be_paired(truth: tuple[np.ndarray, np.ndarray]) -> None:
    labels, groups = truth
    probabilities = fake_predictions(labels, 1.0, seed=1)
    other_ids = np.array([f"ISIC_{i + 1:07d}" for i in range(len(labels))])
    runs = [evaluated("a", probabilities, labels, groups), evaluated("b", probabilities, labels, groups, ids=other_ids)]
    with pytest.raises(ModelError, match=r"not evaluated on the same test images: .* 1 only in the second and 1 only"):
        compare_runs(runs, samples=10, seed=0, min_class_images=30)
    with pytest.raises(MelanomaError, match="at least two runs"):
        compare_runs(runs[:1], samples=10, seed=0, min_class_images=30)


def test_comparison_files(truth: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    labels, groups = truth
    result = compare_runs([evaluated("a", fake_predictions(labels, 1.0, 1), labels, groups),
                           evaluated("b", fake_predictions(labels, 1.0, 2), labels, groups, seed=1)],
                          samples=20, seed=0, min_class_images=30)
    assert json.loads(write_comparison(result, tmp_path / "c.json").read_text()) == json.loads(json.dumps(result))
    markdown = write_comparison(result, tmp_path / "c.md").read_text()
    difference = result["runs"][1]["difference"]["melanoma_auc"]
    assert f"{difference['value']:+.3f} [{difference['ci'][0]:+.3f}, {difference['ci'][1]:+.3f}]" in markdown
    assert "## Over seeds (mean ± sd)" in markdown and "BMA (classes with ≥ 30 images)" in markdown
    with pytest.raises(MelanomaError, match=r"use a \.json or \.md file"):
        write_comparison(result, tmp_path / "c.txt")
    assert not (tmp_path / "c.txt").exists()


# ----------------------------------------------------------------------------- two real trained runs
@pytest.mark.realdata
@pytest.mark.slow
def test_cli_compare_two_seeds_of_a_trained_run(cli, trained_run: Path, trained_run_seed1: Path,
                                                small_ham_archive: Path, tmp_path: Path) -> None:
    from melanoma.data.archive import open_archive

    out = tmp_path / "comparison.json"
    result = cli("compare", trained_run, trained_run_seed1, "--bootstrap", 100, "--out", out)
    assert result.code == 0, result.stderr
    assert "Paired comparison" in result.stdout and "Over seeds" in result.stdout
    comparison = json.loads(out.read_text())

    # By hand: the ISIC-format predictions both runs wrote, and the archive's labels.
    archive = open_archive(small_ham_archive)
    truth = archive.manifest.assign(label=archive.labels).set_index("image_id")["label"]
    aucs = []
    for run in (trained_run, trained_run_seed1):
        predictions = pd.read_csv(run / "predictions_test.csv").set_index("image")
        aucs.append(roc_auc_score(truth.loc[predictions.index] == MEL, predictions["MEL"]))
    difference = comparison["runs"][1]["difference"]["melanoma_auc"]
    assert difference["value"] == pytest.approx(aucs[1] - aucs[0], abs=1e-5)  # CSV holds 6 decimals
    assert difference["ci"][0] <= difference["value"] <= difference["ci"][1]
    assert comparison["n_images"] == len(archive.indices("test"))
    assert comparison["seed_groups"][0]["seeds"] == [0, 1]


@pytest.mark.realdata
@pytest.mark.slow
def test_cli_compare_refuses_runs_it_cannot_pair(cli, trained_run: Path, tmp_path: Path) -> None:
    fewer = tmp_path / "fewer"
    shutil.copytree(trained_run, fewer)
    predictions = pd.read_csv(fewer / "predictions_test.csv")
    predictions.iloc[1:].to_csv(fewer / "predictions_test.csv", index=False)
    result = cli("compare", trained_run, fewer)
    assert result.code == 2 and "were not evaluated on the same test images" in result.stderr
    assert "Traceback" not in result.stderr

    result = cli("compare", trained_run, fewer, "--split", "val")
    assert result.code == 2 and "predictions_val.csv: it has not been evaluated on the val split" in result.stderr
    assert "melanoma evaluate --run" in result.stderr

    result = cli("compare", trained_run, fewer, "--out", tmp_path / "comparison.txt")
    assert result.code == 2 and "use a .json or .md file" in result.stderr
