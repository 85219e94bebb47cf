"""Training-time augmentation: Keras preprocessing layers, plus two of our own (a
dermatoscope's vignette and a random illuminant), registered so that a saved trainer loads."""

from __future__ import annotations

import keras


def augmentation(seed: int, extra: bool = False, vignette: bool = False) -> keras.Sequential:
    """Random flips, rotations, zoom, brightness and contrast, for 0..255 images.

    Dermoscopic lesions have no natural orientation, hence flips both ways and any angle.
    ``extra`` adds what differs between clinics: aspect ratio (zoom per axis; some
    publishers squash images), hue, saturation and the illuminant (a random gain per channel).
    ``vignette`` darkens the corners of half the images, as many dermatoscopes do (the ISIC
    Archive's images have dark circular borders that HAM10000's lack).
    """
    from keras import layers

    zoom = (-0.2, 0.1)
    stages = [
        layers.RandomFlip("horizontal_and_vertical", seed=seed),
        layers.RandomRotation(0.5, fill_mode="reflect", seed=seed + 1),
        layers.RandomZoom(zoom, width_factor=zoom if extra else None, fill_mode="reflect", seed=seed + 2),
        layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 3),
        layers.RandomContrast(0.2, value_range=(0, 255), seed=seed + 4),
    ]
    if extra:
        stages += [
            layers.RandomHue(0.05, value_range=(0, 255), seed=seed + 5),
            layers.RandomSaturation((0.35, 0.65), value_range=(0, 255), seed=seed + 6),
            RandomIlluminant(0.1, seed=seed + 7),
        ]
    if vignette:
        stages.append(RandomVignette(0.5, seed=seed + 8))
    return keras.Sequential(stages, name="augmentation")


@keras.saving.register_keras_serializable(package="melanoma")
class RandomVignette(keras.layers.Layer):
    """Blackens, in a share ``probability`` of the training images, everything outside a
    centred circle whose radius is drawn between 0.45 and 0.72 of the side (0.71 reaches the
    corners), with a soft edge: the dark circular border of many dermatoscopes."""

    def __init__(self, probability: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.probability, self.seed = probability, seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        ops = keras.ops
        shape = ops.shape(images)
        ys = (ops.arange(shape[1], dtype="float32") + 0.5) / ops.cast(shape[1], "float32") - 0.5
        xs = (ops.arange(shape[2], dtype="float32") + 0.5) / ops.cast(shape[2], "float32") - 0.5
        distance = ops.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)[None, :, :, None]
        radius = keras.random.uniform((shape[0], 1, 1, 1), 0.45, 0.72, seed=self.generator)
        inside = ops.sigmoid((radius - distance) / 0.02)
        applied = ops.cast(keras.random.uniform((shape[0], 1, 1, 1), seed=self.generator) < self.probability, "float32")
        return images * (1 - applied * (1 - inside))

    def get_config(self):
        return {**super().get_config(), "probability": self.probability, "seed": self.seed}


@keras.saving.register_keras_serializable(package="melanoma")
class RandomIlluminant(keras.layers.Layer):
    """Multiplies each channel of each training image by a gain drawn from 1 ± ``delta``: the
    colour cast of another light or camera, which Shades of Gray only partly removes."""

    def __init__(self, delta: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.delta, self.seed = delta, seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        shape = (keras.ops.shape(images)[0], 1, 1, 3)
        gains = keras.random.uniform(shape, 1 - self.delta, 1 + self.delta, seed=self.generator)
        return keras.ops.clip(images * gains, 0, 255)

    def get_config(self):
        return {**super().get_config(), "delta": self.delta, "seed": self.seed}
