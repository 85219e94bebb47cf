"""Predictions that know their limits: temperature scaling, the out-of-distribution gate and
the input-quality checks, in the library, `melanoma predict`/`calibrate`/`evaluate` and the API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from melanoma.data.outliers import corrupted, synthetic_images
from melanoma.data.quality import QualityLimits, quality_warnings
from melanoma.errors import ModelError
from melanoma.modeling.calibration import (
    fit_temperature,
    negative_log_likelihood,
    temperature_scale,
)
from melanoma.modeling.ood import NeighbourGate
from melanoma.modeling.runs import OOD_FILE

LIMITS = QualityLimits(min_side=64, max_aspect_ratio=3.0, min_contrast=4.0, min_sharpness=12.0)


# --------------------------------------------------------------------------- calibration (no model)
def overconfident(n: int = 2000, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and the probabilities of a model that is right ~60% of the time but claims
    ~99%: informative logits, multiplied by 6."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), labels] += 1.2
    scaled = np.exp(6 * logits - (6 * logits).max(axis=1, keepdims=True))
    return labels, scaled / scaled.sum(axis=1, keepdims=True)


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model() -> None:
    labels, probabilities = overconfident()
    temperature = fit_temperature(labels, probabilities)
    assert 4 < temperature < 8  # the logits were multiplied by 6
    before, after = negative_log_likelihood(labels, probabilities), negative_log_likelihood(labels, probabilities, temperature)
    assert after < 0.6 * before
    calibrated = temperature_scale(probabilities, temperature)
    np.testing.assert_array_equal(calibrated.argmax(axis=1), probabilities.argmax(axis=1))  # same decisions
    np.testing.assert_allclose(calibrated.sum(axis=1), 1, atol=1e-5)
    assert calibrated.max(axis=1).mean() < probabilities.max(axis=1).mean() - 0.2
    # A well-calibrated model keeps a temperature near 1.
    honest = temperature_scale(probabilities, temperature)
    assert fit_temperature(labels, honest) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ModelError, match="no validation images"):
        fit_temperature(np.zeros(0, int), np.zeros((0, 5)))


def test_the_gate_flags_the_chosen_share_and_far_away_points(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    means = rng.normal(0, 5, (3, 20))
    labels = rng.integers(0, 3, 3000)
    features = means[labels] + rng.normal(0, 1, (3000, 20))
    gate = NeighbourGate.fit(features[:2000])
    gate = gate.with_threshold(gate.score(features[2000:]), 0.05)
    assert np.mean(~gate.in_distribution(gate.score(features[2000:]))) == pytest.approx(0.05, abs=0.002)
    far = rng.normal(0, 1, (100, 20)) - 30
    assert not gate.in_distribution(gate.score(far)).any()
    gate.save(tmp_path)
    loaded = NeighbourGate.load(tmp_path, gate.threshold)
    np.testing.assert_allclose(loaded.score(features[:50]), gate.score(features[:50]), rtol=1e-5)
    with pytest.raises(ModelError, match="features of size 20"):
        gate.score(features[:, :10])
    (tmp_path / OOD_FILE).write_bytes(b"garbage")
    with pytest.raises(ModelError, match="corrupt"):
        NeighbourGate.load(tmp_path, 1.0)


# --------------------------------------------------------------------------- input quality
def test_quality_warnings_name_each_problem(ham_images_by_class: dict[str, Path]) -> None:
    from melanoma.data.preprocess import PreprocessParams, load_image

    params = PreprocessParams(image_size=64)
    lesion = cv2.cvtColor(cv2.imread(str(ham_images_by_class["mel"])), cv2.COLOR_BGR2RGB)

    def codes(image: np.ndarray) -> list[str]:
        return [w.code for w in quality_warnings((image.shape[1], image.shape[0]), load_image(image, params), LIMITS)]

    assert codes(lesion) == []
    assert codes(synthetic_images("blank", 1, seed=0)[0]) == ["near_blank"]
    assert codes(corrupted([lesion], "heavy_blur")[0]) == ["blurred"]
    assert codes(cv2.resize(lesion, (40, 30))) == ["too_small"]
    assert codes(np.ascontiguousarray(np.tile(lesion, (1, 3, 1)))) == ["extreme_aspect_ratio"]
    blank = synthetic_images("blank", 1, seed=1)[0]
    assert [w.code for w in quality_warnings(None, load_image(blank, params), LIMITS)] == ["near_blank"]


# --------------------------------------------------------------------------- with the trained fixture run
@pytest.fixture(scope="module")
def archive(small_ham_archive: Path):
    from melanoma.data.archive import open_archive

    return open_archive(small_ham_archive)


@pytest.mark.realdata
def test_training_fits_and_records_the_temperature_and_the_gate(trained_run: Path, predictor, archive) -> None:
    meta = json.loads((trained_run / "run.json").read_text())
    calibration, ood = meta["calibration"], meta["ood"]
    assert calibration["temperature"] == predictor.temperature != 1
    assert calibration["val_nll_after"] <= calibration["val_nll_before"]
    assert ood["method"] == "knn-cosine" and (trained_run / OOD_FILE).is_file()
    assert ood["n_train"] == len(archive.indices("train")) and ood["flag_fraction"] == 0.05
    images = np.asarray(archive.images[archive.indices("val")])
    prediction = predictor.analyse_arrays(images)
    assert np.mean(~prediction.in_distribution) == pytest.approx(0.05, abs=1.5 / len(images))
    # The temperature is applied to the model's own probabilities; calibration=False keeps them.
    raw = np.asarray(predictor.model(images.astype(np.float32), training=False))
    np.testing.assert_allclose(prediction.uncalibrated, raw, atol=1e-5)
    np.testing.assert_allclose(prediction.probabilities, temperature_scale(raw, predictor.temperature), atol=1e-5)
    np.testing.assert_allclose(predictor.predict_arrays(images), prediction.probabilities, atol=1e-6)
    from melanoma.modeling.predict import Predictor

    uncalibrated = Predictor.from_run(trained_run, calibration=False)
    assert uncalibrated.temperature == 1
    np.testing.assert_allclose(uncalibrated.predict_arrays(images), raw, atol=1e-5)


@pytest.mark.realdata
def test_predict_reports_ood_and_quality_warnings(cli, trained_run: Path, ham_images_by_class: dict[str, Path],
                                                  tmp_path: Path) -> None:
    lesion = ham_images_by_class["nv"]
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), synthetic_images("blank", 1, seed=0)[0])
    out = tmp_path / "predictions.csv"
    result = cli("predict", "--run", trained_run, lesion, blank, "--out", out)
    assert result.code == 0, result.stderr
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns[-3:]) == ["ood_score", "in_distribution", "warnings"]
    threshold = json.loads((trained_run / "run.json").read_text())["ood"]["threshold"]
    assert table["in_distribution"].tolist() == (table["ood_score"] <= threshold).tolist()
    assert table["warnings"].tolist() == ["", "near_blank"]
    assert "Warning (near_blank)" in result.stderr and str(blank) in result.stderr
    shown = cli("predict", "--run", trained_run, blank)
    assert shown.code == 0 and "OOD score" in shown.stdout and "near_blank" in shown.stdout
    raw = tmp_path / "raw.json"
    assert cli("predict", "--run", trained_run, lesion, "--no-calibration", "--out", raw).code == 0
    calibrated = pd.read_csv(out).iloc[0]
    uncalibrated = json.loads(raw.read_text())[0]
    assert uncalibrated["prediction"] == calibrated["prediction"]
    assert uncalibrated["probability"] != pytest.approx(calibrated["probability"], abs=1e-4)


@pytest.mark.realdata
def test_calibrate_and_evaluate_an_existing_run(cli, trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    meta = json.loads((run / "run.json").read_text())
    del meta["calibration"], meta["ood"]  # as a run trained before calibration existed
    (run / "run.json").write_text(json.dumps(meta))
    (run / OOD_FILE).unlink()
    result = cli("calibrate", "--run", run, "--flag-fraction", "0.1")
    assert result.code == 0, result.stderr
    assert "Temperature" in result.stdout and "flags 10% of validation images" in result.stdout
    meta = json.loads((run / "run.json").read_text())
    assert meta["ood"]["flag_fraction"] == 0.1 and (run / OOD_FILE).is_file()
    temperature = meta["calibration"]["temperature"]

    result = cli("evaluate", "--run", run, "--bootstrap", "0")
    assert result.code == 0, result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["temperature"] == temperature
    assert set(metrics["calibration"]["before"]) == {"ece", "brier", "nll"}
    assert metrics["calibration"]["after"]["nll"] == pytest.approx(metrics["log_loss"])
    assert (run / metrics["figures"]["reliability_uncalibrated"]).is_file()
    report = (run / "report.md").read_text()
    assert f"## Calibration (temperature {temperature:.3f}" in report and "| uncalibrated |" in report
    assert "NLL (log loss)" in result.stdout and "uncalibrated" in result.stdout

    assert cli("evaluate", "--run", run, "--bootstrap", "0", "--no-calibration").code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["temperature"] == 1
    assert metrics["calibration"]["before"] == pytest.approx(metrics["calibration"]["after"], rel=1e-6)


@pytest.mark.realdata
def test_the_api_returns_ood_and_warnings(predictor, ham_images_by_class: dict[str, Path]) -> None:
    from fastapi.testclient import TestClient

    from melanoma.config import Settings
    from melanoma.serving.app import create_app

    _, blank = cv2.imencode(".png", synthetic_images("blank", 1, seed=0)[0])
    files = [("files", ("lesion.jpg", ham_images_by_class["bcc"].read_bytes(), "image/jpeg")),
             ("files", ("blank.png", blank.tobytes(), "image/png"))]
    with TestClient(create_app(Settings(), predictor=predictor), base_url="http://127.0.0.1") as client:
        response = client.post("/v1/predict", files=files)
        card = client.get("/v1/model").json()
    assert response.status_code == 200, response.text
    lesion, junk = response.json()["predictions"]
    assert lesion["warnings"] == []
    for answer in (lesion, junk):
        assert answer["in_distribution"] == (answer["ood_score"] <= answer["ood_threshold"])
    assert [w["code"] for w in junk["warnings"]] == ["near_blank"]
    assert lesion["temperature"] == predictor.temperature and "(" in lesion["top_class_name"]
    assert sum(junk["probabilities"].values()) == pytest.approx(1, abs=1e-4)  # nothing is hidden
    assert card["calibration"]["temperature"] == predictor.temperature and card["ood"]["method"] == "knn-cosine"
