"""The models: shapes, built-in normalisation, the frozen-BatchNorm backbone, clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest

from melanoma.errors import ModelError
from melanoma.modeling.models import BACKBONE_LAYER, MODEL_NAMES, build_model, small_cnn

SIZE = 64


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_maps_0_255_images_to_probabilities(name: str) -> None:
    model = build_model(name, num_classes=7, image_size=SIZE)
    assert model.input_shape == (None, SIZE, SIZE, 3)
    probabilities = np.asarray(model(random_images(2), training=False))
    assert probabilities.shape == (2, 7)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    if name != "cnn":
        # The named backbone is the feature extractor whose pooled features the head classifies.
        backbone = model.get_layer(BACKBONE_LAYER)
        assert isinstance(backbone, keras.Model) and len(backbone.output.shape) == 4
        assert tuple(model.get_layer("probabilities").kernel.shape) == (backbone.output.shape[-1], 7)


def test_cnn_rescales_inside_and_is_configurable() -> None:
    model = small_cnn(num_classes=3, image_size=SIZE, depth=3, width=8, dropout=0.5)
    assert isinstance(model.layers[0], keras.layers.Rescaling)
    assert sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers) == 3
    assert model.get_layer(index=-2).rate == 0.5
    convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.filters for layer in convolutions] == [8, 8, 16, 16, 32, 32]
    assert convolutions[0].strides == (2, 2) and convolutions[1].strides == (1, 1)


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(ModelError, match="Unknown model 'resnet50'") as caught:
        build_model("resnet50", num_classes=7, image_size=SIZE)
    assert all(name in caught.value.hint for name in MODEL_NAMES)


@pytest.mark.slow
def test_pretrained_backbone_keeps_batchnorm_in_inference_mode(tmp_path: Path) -> None:
    """With pretrained weights the backbone runs with training=False: BatchNorm uses its
    stored statistics even while fitting, so training-mode output equals inference output
    (no dropout in the head here)."""
    weights = tmp_path / "mobilenet.weights.h5"
    build_model("mobilenetv3small", num_classes=7, image_size=SIZE).get_layer(BACKBONE_LAYER).save_weights(weights)
    pretrained = build_model("mobilenetv3small", num_classes=7, image_size=SIZE, weights=weights, dropout=0.0)
    images = random_images(4)
    np.testing.assert_allclose(np.asarray(pretrained(images, training=True)), np.asarray(pretrained(images, training=False)),
                               atol=1e-5)
    from_scratch = build_model("mobilenetv3small", num_classes=7, image_size=SIZE, dropout=0.0)
    assert not np.allclose(np.asarray(from_scratch(images, training=True)), np.asarray(from_scratch(images, training=False)),
                           atol=1e-5)


def test_weights_file_that_does_not_fit_names_the_file(tmp_path: Path) -> None:
    weights = tmp_path / "cnn.weights.h5"
    small_cnn(num_classes=7, image_size=SIZE).save_weights(weights)
    with pytest.raises(ModelError, match=re.escape(str(weights))):
        build_model("cnn", num_classes=5, image_size=SIZE, weights=weights)
    with pytest.raises(ModelError, match="does not exist"):
        build_model("cnn", num_classes=7, image_size=SIZE, weights=tmp_path / "absent.weights.h5")


def test_imagenet_download_failure_suggests_the_offline_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(**kwargs: object) -> keras.Model:
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")  # noqa: TRY002 - what Keras raises

    monkeypatch.setattr(keras.applications, "MobileNetV3Small", offline)
    with pytest.raises(ModelError, match="could not be downloaded") as caught:
        build_model("mobilenetv3small", num_classes=7, image_size=SIZE, weights="imagenet")
    assert "efficientnet-lite0" in caught.value.hint
    with pytest.raises(ModelError, match="no ImageNet weights"):
        build_model("cnn", num_classes=7, image_size=SIZE, weights="imagenet")
