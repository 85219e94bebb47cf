"""EfficientNet-Lite in Keras (functional API), from the published architecture.

EfficientNet-Lite (Tan & Le 2019, "EfficientNet-Lite" release of the TensorFlow TPU repo)
is EfficientNet-B0's block table with the parts that run badly on small devices removed:
no squeeze-and-excitation, ReLU6 instead of swish, and stem (32) and head (1280) widths
fixed for every variant; the first and last block stages are not repeated more either.

Layers are named after the PyTorch port's modules (``block{N}_...`` with N the running
block index), so that :mod:`melanoma.modeling.pretrained` can map its tensors one to one.
Batch-norm epsilon 1e-3 and momentum 0.99 are those of the original TensorFlow training
(the PyTorch port stores them as eps=1e-3, momentum=1-0.99).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from melanoma.errors import ModelError

if TYPE_CHECKING:
    import keras

STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
DROP_CONNECT_RATE = 0.2
# The input normalisation the weights were trained with, found by measurement: (x - 127) / 128
# (the TensorFlow Lite release's MEAN_RGB=127, STDDEV_RGB=128). On scikit-image's photographs
# at 224 px it gives P(cat classes | chelsea) 0.89 and P(espresso | coffee) 0.94, against
# 0.85 / 0.82 with ImageNet mean/std and 0.87 / 0.91 with x / 255 (all with the right top-1).
INPUT_OFFSET = 127.0
INPUT_SCALE = 128.0
FEATURES_LAYER = "top_relu6"  # the (h, w, 1280) feature map: the output of the headless model


@dataclass(frozen=True)
class Stage:
    """One row of the EfficientNet-B0 block table."""

    repeats: int
    kernel_size: int
    strides: int
    expand_ratio: int
    filters_in: int
    filters_out: int


# EfficientNet-B0's table (Tan & Le 2019, table 1), without the SE ratio.
B0_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class Variant:
    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS: dict[str, Variant] = {
    "efficientnet-lite0": Variant(1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": Variant(1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": Variant(1.1, 1.2, 260, 0.3),
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ModelError(f"Unknown EfficientNet-Lite variant {name!r}; choose one of {', '.join(VARIANTS)}.") from None


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a width and round it to a multiple of ``divisor``, never by more than 10% down."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def stage_plan(variant: Variant) -> list[Stage]:
    """The block table of a variant: widths scaled, repeats scaled except first and last stage."""
    plan = []
    for index, stage in enumerate(B0_STAGES):
        fixed = index in (0, len(B0_STAGES) - 1)
        plan.append(
            Stage(
                repeats=stage.repeats if fixed else math.ceil(stage.repeats * variant.depth),
                kernel_size=stage.kernel_size,
                strides=stage.strides,
                expand_ratio=stage.expand_ratio,
                # The stem is not scaled, so the first stage reads its 32 channels.
                filters_in=STEM_FILTERS if index == 0 else round_filters(stage.filters_in, variant.width),
                filters_out=round_filters(stage.filters_out, variant.width),
            )
        )
    return plan


def _conv_bn(x, filters: int, kernel_size: int, strides: int, name: str, *, relu6: bool):
    from keras import layers

    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if relu6 else x


def _mbconv(x, *, block: int, filters_in: int, filters_out: int, kernel_size: int, strides: int,
            expand_ratio: int, drop_rate: float):
    """Mobile inverted bottleneck without squeeze-and-excitation.

    Keras "same" padding equals the port's static "same" padding (extra pixel at the
    bottom/right for stride 2), which is TensorFlow's, the framework the weights come from.
    """
    from keras import layers

    name = f"block{block}"
    inputs = x
    expanded = filters_in * expand_ratio
    if expand_ratio != 1:
        x = _conv_bn(x, expanded, 1, 1, f"{name}_expand", relu6=True)
    x = layers.DepthwiseConv2D(kernel_size, strides=strides, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_dwconv_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_dwconv_relu6")(x)
    x = _conv_bn(x, filters_out, 1, 1, f"{name}_project", relu6=False)
    if strides == 1 and filters_in == filters_out:
        if drop_rate > 0:
            # Stochastic depth: drop the whole residual branch per sample while training.
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def efficientnet_lite(
    variant: str = "efficientnet-lite0",
    *,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    include_top: bool = True,
    classes: int = 1000,
    drop_connect_rate: float = DROP_CONNECT_RATE,
    name: str | None = None,
) -> keras.Model:
    """An untrained EfficientNet-Lite taking 0..255 RGB floats of any size.

    With ``include_top`` the output is softmax over ``classes`` (after global average
    pooling and dropout); without it, the (h, w, 1280) feature map of the head convolution.
    """
    import keras
    from keras import layers

    spec = get_variant(variant)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ModelError(f"EfficientNet-Lite needs RGB input of shape (height, width, 3), got {input_shape}.")
    plan = stage_plan(spec)
    n_blocks = sum(stage.repeats for stage in plan)

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / INPUT_SCALE, offset=-INPUT_OFFSET / INPUT_SCALE, name="normalize")(inputs)
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem", relu6=True)
    block = 0
    for stage in plan:
        for repeat in range(stage.repeats):
            x = _mbconv(
                x,
                block=block,
                filters_in=stage.filters_in if repeat == 0 else stage.filters_out,
                filters_out=stage.filters_out,
                kernel_size=stage.kernel_size,
                strides=stage.strides if repeat == 0 else 1,
                expand_ratio=stage.expand_ratio,
                drop_rate=drop_connect_rate * block / n_blocks,
            )
            block += 1
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "top", relu6=True)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(spec.dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name or variant)
