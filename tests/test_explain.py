"""LIME, Grad-CAM and their trust measures, `melanoma explain` and `melanoma explain-eval`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melanoma.errors import MelanomaError, ModelError
from melanoma.modeling.explain import (
    GradCam,
    SegmentationParams,
    explain_gradcam,
    explain_lime,
    gradcam_for,
    parse_methods,
    superpixel_means,
)
from melanoma.modeling.predict import Predictor
from melanoma.modeling.runs import read_run
from melanoma.modeling.trust import perturbation_curves, top_overlap

pytestmark = pytest.mark.realdata
SAMPLES = 100


@pytest.fixture(scope="module")
def image(small_ham_archive: Path) -> np.ndarray:
    from melanoma.data.archive import open_archive

    archive = open_archive(small_ham_archive)
    return np.asarray(archive.images[archive.indices("test")[0]])


@pytest.fixture(scope="module")
def left_half_predictor(trained_run: Path, image: np.ndarray) -> Predictor:
    """A model whose class "textured" depends only on the edges in the image's left half.

    (LIME hides a superpixel by painting it in its mean colour, so it is texture, not
    brightness, that hiding removes.)"""
    import keras

    size = image.shape[0]
    laplacian = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
    kernel = np.stack([laplacian, -laplacian], axis=-1)[:, :, None, :].repeat(3, axis=2) / 3
    inputs = keras.Input((size, size, 3))
    edges = keras.layers.Conv2D(2, 3, padding="same", activation="relu", use_bias=False)
    left = keras.layers.Cropping2D(((0, 0), (0, size // 2)))(edges(inputs))
    energy = keras.layers.GlobalAveragePooling2D()(left)
    head = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, head(energy))
    edges.set_weights([kernel])
    image_energy = float(keras.Model(inputs, energy)(image[None].astype(np.float32)).numpy().sum())
    # logit("textured") - logit("flat") = 2 * energy / image_energy - 1: about 1 for the image itself.
    head.set_weights([np.array([[0.0, 1.0]] * 2) / image_energy, np.array([0.0, -1.0])])
    run = read_run(trained_run)
    fake_run = type(run)(run.path, run.meta, ["flat", "textured"], size, run.preprocess, run.model_path, None)
    return Predictor(fake_run, lambda x: (np.asarray(model.predict_on_batch(x)), None), engine="keras",
                     params=run.preprocess)


def test_lime_finds_the_region_the_model_looks_at(left_half_predictor: Predictor, image: np.ndarray) -> None:
    explanation = explain_lime(left_half_predictor, image, num_samples=300, seed=0, top_k=2,
                               segmentation=SegmentationParams(n_segments=30))
    textured = next(c for c in explanation.contributions if c.class_name == "textured")
    columns = np.indices(explanation.segments.shape)[1]
    share_left = superpixel_means((columns < image.shape[1] // 2).astype(float), explanation.segments)
    left_only, right_only = textured.weights[share_left == 1], textured.weights[share_left == 0]
    assert len(left_only) and len(right_only)
    assert left_only.mean() > 0 and np.abs(right_only).mean() < 0.2 * left_only.mean()
    assert textured.score > 0.5  # the local linear model explains the neighbourhood well


def test_lime_same_seed_same_explanation(predictor: Predictor, image: np.ndarray) -> None:
    params = SegmentationParams()
    first, again, other = (explain_lime(predictor, image, num_samples=SAMPLES, seed=s, top_k=3, segmentation=params)
                           for s in (7, 7, 8))
    for a, b in zip(first.contributions, again.contributions):
        np.testing.assert_array_equal(a.weights, b.weights)
        assert a.intercept == b.intercept and a.score == b.score
    assert not np.array_equal(first.contributions[0].weights, other.contributions[0].weights)


def test_lime_explains_the_top_classes_with_numbers(predictor: Predictor, image: np.ndarray) -> None:
    explanation = explain_lime(predictor, image, num_samples=SAMPLES, seed=0, top_k=3,
                               segmentation=SegmentationParams(algorithm="quickshift"))
    probabilities = predictor.predict_arrays(image[None])[0]
    np.testing.assert_allclose(explanation.probabilities, probabilities, atol=1e-6)
    top = [c.class_index for c in explanation.contributions]
    assert top == list(np.argsort(probabilities)[::-1][:3])
    n_superpixels = explanation.segments.max() + 1
    assert set(np.unique(explanation.segments)) == set(range(n_superpixels)) and n_superpixels >= 10
    for contribution in explanation.contributions:
        assert contribution.weights.shape == (n_superpixels,)
        assert contribution.score <= 1 and np.isfinite(contribution.intercept)
    record = explanation.to_dict()
    assert record["n_superpixels"] == n_superpixels and sum(record["superpixel_area"]) == 64 * 64
    assert len(record["classes"][0]["weights"]) == n_superpixels


def test_segmentation_suits_the_image_size(image: np.ndarray) -> None:
    for params in (SegmentationParams(), SegmentationParams(algorithm="quickshift")):
        assert 15 <= params.segment(image).max() + 1 <= 120
    assert SegmentationParams(n_segments=10).segment(image).max() + 1 <= 20
    with pytest.raises(MelanomaError, match="Unknown segmentation 'watershed'"):
        SegmentationParams(algorithm="watershed")


def test_gradcam_heatmaps(predictor: Predictor, image: np.ndarray) -> None:
    import keras

    gradcam = gradcam_for(predictor)
    assert gradcam_for(predictor) is gradcam  # built once per model
    assert isinstance(predictor.model.get_layer(gradcam.layer_name), keras.layers.ReLU)
    explanation = explain_gradcam(predictor, gradcam, image, top_k=2)
    assert explanation.heatmaps.shape == (2, 64, 64)
    assert explanation.heatmaps.min() >= 0 and explanation.heatmaps.max() == pytest.approx(1)
    np.testing.assert_array_equal(gradcam(image[None], [explanation.class_indices[0]])[0], explanation.heatmaps[0])
    first_conv = next(layer.name for layer in predictor.model.layers if isinstance(layer, keras.layers.Conv2D))
    assert GradCam(predictor.model, first_conv)(image[None], [0]).shape == (1, 64, 64)
    with pytest.raises(ModelError, match="no top-level layer 'nope'"):
        gradcam_for(predictor, "nope")


def test_perturbation_curves_run_from_image_to_blur(predictor: Predictor, image: np.ndarray) -> None:
    from melanoma.modeling.trust import blurred

    segments = SegmentationParams().segment(image)
    ranking = np.arange(segments.max() + 1)
    fraction, deletion, insertion = perturbation_curves(predictor, image, segments, ranking, 0)
    original, blur = predictor.predict_arrays(np.stack([image, blurred(image)]))[:, 0]
    assert fraction[0] == 0 and fraction[-1] == pytest.approx(1) and np.all(np.diff(fraction) > 0)
    assert deletion[0] == pytest.approx(original, abs=1e-6) and deletion[-1] == pytest.approx(blur, abs=1e-6)
    assert insertion[0] == pytest.approx(blur, abs=1e-6) and insertion[-1] == pytest.approx(original, abs=1e-6)


def test_top_overlap() -> None:
    a = np.arange(10)
    assert top_overlap([a, a, a]) == 1
    assert top_overlap([a, a[::-1]]) == 0
    assert top_overlap([a, np.array([0, 1, 2, 3, 9])]) == pytest.approx(4 / 6)


def test_unknown_method() -> None:
    assert parse_methods("both") == ["lime", "gradcam"]
    with pytest.raises(MelanomaError, match="Unknown explanation method 'shap'"):
        parse_methods("shap")


# ----------------------------------------------------------------------------- CLI
def test_cli_explain_writes_figures_and_numbers(cli, trained_run: Path, ham_dir: Path, tmp_path: Path) -> None:
    image = ham_dir / "HAM10000_images_part_1" / "ISIC_0024306.jpg"
    result = cli("explain", "--run", trained_run, image, "--samples", SAMPLES, "--top-k", 2, "--out", tmp_path)
    assert result.code == 0, result.stderr
    for suffix in ("lime.png", "gradcam.png"):
        assert (tmp_path / f"ISIC_0024306_{suffix}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "ISIC_0024306_explanation.json").read_text())
    assert report["prediction"]["class"] == report["lime"]["classes"][0]["class"]
    assert sum(report["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert report["lime"]["num_samples"] == SAMPLES and len(report["lime"]["classes"]) == 2
    assert len(report["lime"]["classes"][0]["weights"]) == report["lime"]["n_superpixels"]
    assert report["gradcam"]["layer"] and len(report["gradcam"]["classes"]) == 2


@pytest.mark.parametrize(("args", "message"), [
    (("--method", "shap"), "'shap' is not one of 'lime',"),
    (("--top-k", "9"), "--top-k must be between 1 and 7"),
    (("--segmentation", "watershed"), "'watershed' is not one of"),
])
def test_cli_explain_refuses_bad_options(cli, trained_run: Path, ham_dir: Path, args: tuple[str, ...],
                                         message: str) -> None:
    image = ham_dir / "HAM10000_images_part_1" / "ISIC_0024306.jpg"
    result = cli("explain", "--run", trained_run, image, *args)
    assert result.code == 2 and message in result.stderr


def test_cli_explain_out_must_be_a_folder(cli, trained_run: Path, ham_dir: Path, tmp_path: Path) -> None:
    image = ham_dir / "HAM10000_images_part_1" / "ISIC_0024306.jpg"
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    result = cli("explain", "--run", trained_run, image, "--method", "gradcam", "--out", taken)
    assert result.code == 2 and f"The output folder {taken} exists and is not a folder" in result.stderr
    assert taken.read_text() == "keep me"


def test_cli_explain_bad_images(cli, trained_run: Path, tmp_path: Path) -> None:
    import cv2

    tiny, broken = tmp_path / "tiny.png", tmp_path / "broken.jpg"
    cv2.imwrite(str(tiny), np.zeros((1, 1, 3), np.uint8))
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    for path, message in ((tiny, "too small"), (broken, "broken.jpg"), (tmp_path / "absent.jpg", "not found")):
        result = cli("explain", "--run", trained_run, path, "--method", "gradcam")
        assert result.code == 2 and message in result.stderr


@pytest.mark.slow
def test_cli_explain_eval_table(cli, trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"  # a copy: the shared run fixture stays as it is
    shutil.copytree(trained_run, run)
    # No --archive: the archive the run was trained on.
    result = cli("explain-eval", "--run", run, "--n", 2, "--samples", 30, "--superpixels", 20)
    assert result.code == 0, result.stderr
    summary = pd.read_csv(run / "explain_eval.csv").set_index("method")
    assert list(summary.index) == ["lime", "gradcam", "random"]
    # Measured over 5 runs each: Grad-CAM has no seed and must repeat itself exactly.
    report = json.loads((run / "explain_eval.json").read_text())
    assert [image["gradcam_stability_iou"] for image in report["per_image"]] == [1.0, 1.0]
    assert "deletion AUC" in result.stdout and "1.000 ± 0.000" in result.stdout
    assert summary.loc["random", "stability_iou_mean"] < 1  # the measure does tell rankings apart
    assert ((summary.filter(like="_mean") >= 0) & (summary.filter(like="_mean") <= 1)).all().all()
    assert len(report["per_image"]) == 2 and report["settings"]["num_samples"] == 30
