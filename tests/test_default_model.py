"""The default model, ImageNet-pretrained EfficientNet-Lite0, through the whole pipeline on
real images: `melanoma train` with no --model/--weights, evaluate, predict, Grad-CAM and
ONNX export. The other tests use the small CNN, which is quicker to train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from melanoma.data.archive import open_archive, read_rows
from melanoma.modeling.explain import GradCam
from melanoma.modeling.export import export_model
from melanoma.modeling.predict import Predictor

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


@pytest.fixture(scope="module")
def lite0_run(small_ham_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One head-only epoch of the default model, trained through the CLI as a user would."""
    from typer.testing import CliRunner

    from melanoma.cli import app

    work = tmp_path_factory.mktemp("lite0")
    run_dir = work / "run"
    result = CliRunner().invoke(app, ["train", "--archive", str(small_ham_archive), "--epochs", "1",
                                      "--freeze-epochs", "1", "--run-dir", str(run_dir)],
                                env={"MELANOMA_WEIGHTS_DIR": str(work / "weights")})
    assert result.exit_code == 0, result.output
    return run_dir


def test_default_training_starts_from_converted_imagenet_weights(lite0_run: Path) -> None:
    meta = json.loads((lite0_run / "run.json").read_text())
    assert meta["model"] == "efficientnet-lite0" and meta["training"]["weights"] == "imagenet"
    assert meta["status"] == "complete"
    assert (lite0_run.parent / "weights").is_dir()  # converted on first use, into the configured folder


def test_default_model_predicts_explains_and_exports(lite0_run: Path, small_ham_archive: Path) -> None:
    archive = open_archive(small_ham_archive)
    images = read_rows(archive.images, archive.indices("test")[:16])
    keras_predictor = Predictor.from_run(lite0_run)
    probabilities = keras_predictor.predict_arrays(images)
    assert probabilities.shape == (16, len(archive.classes))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)

    heatmaps = GradCam(keras_predictor.model)(images[:2], probabilities[:2].argmax(axis=1))
    assert heatmaps.shape == (2, 64, 64) and heatmaps.max() == pytest.approx(1) and heatmaps.std() > 0

    export_model(lite0_run, "onnx")
    onnx_probabilities = Predictor.from_run(lite0_run, engine="onnx").predict_arrays(images)
    assert np.abs(onnx_probabilities - probabilities).max() < 1e-4
