"""`melanoma ensemble`: one model averaging its members (after their temperatures), used like
any run by predict, evaluate, compare, explain (Grad-CAM averaged over members), ONNX export
and the server; clear errors for members that cannot be averaged."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from melanoma.modeling.ensemble import make_ensemble
from melanoma.modeling.predict import Predictor
from melanoma.modeling.runs import read_run

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

TEMPERATURE = 2.0


def edit_run_json(run_dir: Path, **changes: object) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    meta.update(changes)
    (run_dir / "run.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def tempered_member(trained_run_seed1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed-1 run with a temperature of 2 in its run.json, as calibration would leave it."""
    run = tmp_path_factory.mktemp("tempered") / "cnn-seed1-t2"
    shutil.copytree(trained_run_seed1, run)
    calibration = json.loads((run / "run.json").read_text()).get("calibration") or {}
    edit_run_json(run, calibration={**calibration, "temperature": TEMPERATURE})
    return run


@pytest.fixture(scope="module")
def ensemble_run(trained_run: Path, tempered_member: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensembles") / "ens"
    make_ensemble([trained_run, tempered_member], out)
    return out


@pytest.fixture(scope="module")
def ensemble_predictor(ensemble_run: Path) -> Predictor:
    return Predictor.from_run(ensemble_run)


@pytest.fixture(scope="module")
def test_images(small_ham_archive: Path) -> np.ndarray:
    from melanoma.data.archive import open_archive

    archive = open_archive(small_ham_archive)
    return np.asarray(archive.images[archive.indices("test")])


def softmax_with_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    scaled = np.exp(np.log(probabilities.astype(np.float64)) / temperature)
    return scaled / scaled.sum(axis=1, keepdims=True)


def test_ensemble_averages_its_members_after_their_temperature(ensemble_run: Path, ensemble_predictor: Predictor,
                                                               predictor: Predictor, tempered_member: Path,
                                                               test_images: np.ndarray) -> None:
    first_temperature = read_run(predictor.run.path).temperature  # fitted at the end of training
    raw = [Predictor.from_run(run, calibration=False).predict_arrays(test_images)
           for run in (predictor.run.path, tempered_member)]
    tempered = softmax_with_temperature(raw[1], TEMPERATURE)
    expected = (softmax_with_temperature(raw[0], first_temperature) + tempered) / 2
    np.testing.assert_allclose(ensemble_predictor.predict_arrays(test_images), expected, atol=1e-5)
    # The temperature changed the member's probabilities, so the check above means something.
    assert np.abs(tempered - raw[1]).max() > 0.01

    meta = json.loads((ensemble_run / "run.json").read_text())
    assert meta["model"] == "ensemble" and meta["status"] == "complete"
    assert [m["temperature"] for m in meta["ensemble"]["members"]] == pytest.approx([first_temperature, TEMPERATURE])
    assert [m["seed"] for m in meta["ensemble"]["members"]] == [0, 1]
    assert meta["classes"] == predictor.classes and meta["image_size"] == 64
    assert sorted(p.name for p in ensemble_run.iterdir()) == ["model.keras", "run.json", "split.csv"]
    assert not list(ensemble_run.parent.glob(".*partial"))


def test_evaluate_and_compare_an_ensemble(ensemble_run: Path, trained_run: Path, small_ham_archive: Path,
                                          tmp_path: Path) -> None:
    from melanoma.data.archive import open_archive
    from melanoma.modeling.compare import compare_runs, load_evaluated
    from melanoma.modeling.evaluate import evaluate_run

    run = tmp_path / "ens"
    shutil.copytree(ensemble_run, run)
    metrics = evaluate_run(run, open_archive(small_ham_archive), "test", target_sensitivity=0.741,
                           bootstrap_samples=20, seed=0)
    assert metrics["run_id"] == "ens" and 0 <= metrics["bma"] <= 1
    report = (run / "report.md").read_text()
    assert "Ensemble of 2 runs" in report and f"melanoma ensemble --out {run} --runs {trained_run.resolve()}" in report

    result = compare_runs([load_evaluated(trained_run), load_evaluated(run)], samples=20, seed=0, min_class_images=5)
    assert result["runs"][1]["run_id"] == "ens" and result["runs"][1]["seed"] is None
    assert result["seed_groups"] == []  # an ensemble is no seed replicate of a trained run


def test_gradcam_of_an_ensemble_is_the_mean_of_its_members(ensemble_predictor: Predictor, predictor: Predictor,
                                                           tempered_member: Path, test_images: np.ndarray) -> None:
    from melanoma.modeling.explain import GradCam, gradcam_for

    images = test_images[:4]
    classes = ensemble_predictor.predict_arrays(images).argmax(axis=1)
    cam = gradcam_for(ensemble_predictor)
    assert cam.layer_name.startswith("mean of member_0/") and ", member_1/" in cam.layer_name
    heatmaps = cam(images, classes)
    # The members' own models (the temperature does not change a normalised map).
    members = [GradCam(predictor.model)(images, classes), GradCam(Predictor.from_run(tempered_member).model)(images, classes)]
    mean = np.mean(members, axis=0)
    peak = mean.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(heatmaps, np.divide(mean, peak, out=np.zeros_like(mean), where=peak > 0), atol=1e-5)
    assert heatmaps.shape == (4, 64, 64) and heatmaps.max() == pytest.approx(1)


def test_cli_explains_an_ensemble(cli, ensemble_run: Path, ensemble_predictor: Predictor, ham_dir: Path,
                                  tmp_path: Path) -> None:
    image = ham_dir / "HAM10000_images_part_1" / "ISIC_0024306.jpg"
    result = cli("explain", "--run", ensemble_run, image, "--method", "both", "--samples", 60, "--top-k", 2,
                 "--out", tmp_path)
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "ISIC_0024306_explanation.json").read_text())
    probabilities = ensemble_predictor.predict([image])[0]
    np.testing.assert_allclose([report["probabilities"][c] for c in ensemble_predictor.classes], probabilities, atol=1e-5)
    # LIME explains the averaged classifier: its first sample is the image itself.
    assert report["lime"]["classes"][0]["probability"] == pytest.approx(probabilities.max(), abs=1e-5)
    assert report["gradcam"]["layer"].startswith("mean of member_0/")
    assert (tmp_path / "ISIC_0024306_gradcam.png").stat().st_size > 1000


def test_onnx_export_of_an_ensemble_agrees_with_keras(cli, ensemble_run: Path, ensemble_predictor: Predictor,
                                                      test_images: np.ndarray, tmp_path: Path) -> None:
    run = tmp_path / "ens"
    shutil.copytree(ensemble_run, run)
    result = cli("export", "--run", run, "--format", "onnx")
    assert result.code == 0, result.stderr
    onnx = Predictor.from_run(run, engine="onnx")
    difference = np.abs(onnx.predict_arrays(test_images) - ensemble_predictor.predict_arrays(test_images))
    assert difference.max() < 1e-4


@pytest.fixture(scope="module")
def served(ensemble_run: Path) -> Iterator:
    from fastapi.testclient import TestClient

    from melanoma.config import Settings
    from melanoma.serving.app import create_app

    with TestClient(create_app(Settings(), run_dir=ensemble_run, examples=[]), base_url="http://127.0.0.1") as client:
        yield client


def test_serve_an_ensemble(served, ensemble_predictor: Predictor, ham_images_by_class: dict[str, Path]) -> None:
    images = [ham_images_by_class[dx] for dx in ("mel", "nv")]
    response = served.post("/v1/predict", files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images])
    assert response.status_code == 200, response.text
    expected = ensemble_predictor.predict(images)
    for prediction, probabilities in zip(response.json()["predictions"], expected):
        np.testing.assert_allclose([prediction["probabilities"][c] for c in ensemble_predictor.classes], probabilities,
                                   atol=1e-5)
    explained = served.post("/v1/explain", files=[("file", (images[0].name, images[0].read_bytes(), "image/jpeg"))])
    assert explained.status_code == 200, explained.text
    assert explained.json()["details"]["layer"].startswith("mean of member_0/")
    card = served.get("/v1/model").json()
    assert card["model"] == "ensemble" and card["classes"] == ensemble_predictor.classes


def test_cli_ensemble_takes_runs_after_the_option(cli, trained_run: Path, trained_run_seed1: Path,
                                                  tmp_path: Path) -> None:
    result = cli("ensemble", "--runs", trained_run, trained_run_seed1, "--out", tmp_path / "ens")
    assert result.code == 0, result.stderr
    assert "member_1" in result.stdout and "melanoma evaluate --run" in result.stdout
    meta = json.loads((tmp_path / "ens" / "run.json").read_text())
    assert [m["run"] for m in meta["ensemble"]["members"]] == [str(trained_run.resolve()), str(trained_run_seed1.resolve())]


@pytest.mark.parametrize(("change", "message"), [
    ({"image_size": 96}, "take different image sizes (64 vs 96 px)"),
    ({"classes": ["mel", "nv"]}, "have different classes"),
    ({"archive": {"path": "data/other", "sha256": "0" * 64}}, "were trained on different archives"),
    ({"model": "ensemble"}, "is itself an ensemble"),
    ({"calibration": {"temperature": -1}}, "temperature must be a positive number, got -1"),
])
def test_cli_ensemble_refuses_members_it_cannot_average(cli, trained_run: Path, trained_run_seed1: Path,
                                                        tmp_path: Path, change: dict, message: str) -> None:
    other = tmp_path / "other"
    shutil.copytree(trained_run_seed1, other)
    edit_run_json(other, **change)
    result = cli("ensemble", "--runs", trained_run, other, "--out", tmp_path / "ens")
    assert result.code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_cli_ensemble_refuses_bad_run_lists_and_outputs(cli, trained_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    meta = json.loads((other / "run.json").read_text())
    meta["preprocess"]["color_constancy"] = not meta["preprocess"]["color_constancy"]
    (other / "run.json").write_text(json.dumps(meta))
    result = cli("ensemble", trained_run, other, "--out", tmp_path / "ens")
    assert result.code == 2 and "preprocess images differently (color_constancy" in result.stderr

    result = cli("ensemble", "--runs", trained_run, "--out", tmp_path / "ens")
    assert result.code == 2 and "needs at least two runs, got 1" in result.stderr
    result = cli("ensemble", "--runs", trained_run, trained_run, "--out", tmp_path / "ens")
    assert result.code == 2 and "is listed twice" in result.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    result = cli("ensemble", "--runs", trained_run, other, "--out", tmp_path / "taken")
    assert result.code == 2 and "exists and is not an empty folder" in result.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
