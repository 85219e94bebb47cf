"""The default model, ImageNet-pretrained EfficientNet-Lite0, through the whole pipeline on
real images: `melanoma train` with no --model/--weights, evaluate, predict, Grad-CAM and
ONNX export. The other tests use the small CNN, which is quicker to train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from melanoma.data.archive import open_archive, read_rows
from melanoma.data.outliers import SYNTHETIC_KINDS, rejection_set
from melanoma.modeling.explain import GradCam
from melanoma.modeling.export import export_model
from melanoma.modeling.predict import Predictor

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


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
    onnx_predictor = Predictor.from_run(lite0_run, engine="onnx")
    onnx_prediction = onnx_predictor.analyse_arrays(images)
    # The ONNX engine applies the same temperature and scores with the same gate.
    assert onnx_predictor.temperature == keras_predictor.temperature != 1
    assert np.abs(onnx_prediction.probabilities - probabilities).max() < 1e-4
    np.testing.assert_allclose(onnx_prediction.ood_score, keras_predictor.analyse_arrays(images).ood_score, atol=1e-4)


def test_the_default_models_gate_flags_synthetic_junk_and_passes_lesions(lite0_run: Path,
                                                                         small_ham_archive: Path) -> None:
    predictor = Predictor.from_run(lite0_run)
    archive = open_archive(small_ham_archive)
    inside = predictor.analyse_arrays(read_rows(archive.images, archive.indices("test"))).in_distribution
    assert inside.mean() >= 0.85  # 5% of the validation images are flagged by construction
    for kind in SYNTHETIC_KINDS:
        junk = np.stack([predictor.preprocess(image) for image in rejection_set(kind, n=20, seed=0)])
        assert (~predictor.analyse_arrays(junk).in_distribution).mean() >= 0.9, kind
