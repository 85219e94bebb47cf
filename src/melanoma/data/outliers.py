"""A rejection test set, built offline: images a dermoscopy model should refuse.

Kinds (each a list of uint8 RGB arrays at their own resolution):

- ``natural``: the photographs shipped with installed packages (scikit-image's sample
  images, scikit-learn's two sample photos, Matplotlib's portrait of Grace Hopper), each
  with random crops, so that there are more than a handful;
- ``faces``: the 100 face photographs of scikit-image's LFW subset (skin, but not
  dermoscopy; 25x25 grey, so also too small);
- ``blank``, ``noise``, ``gradient``, ``text``: synthetic images;
- ``heavy_blur``, ``extreme_jpeg``: real lesion images (given by the caller) blurred with a
  Gaussian of sigma = 1/20 of their side, or saved as JPEG at quality 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from melanoma.errors import MelanomaError

SYNTHETIC_KINDS = ("blank", "noise", "gradient", "text")
CORRUPTIONS = ("heavy_blur", "extreme_jpeg")
KINDS = ("natural", "faces", *SYNTHETIC_KINDS, *CORRUPTIONS)
# scikit-image sample images that ship with the package (no download).
SKIMAGE_PHOTOS = ("astronaut", "camera", "cat", "coffee", "coins", "moon", "rocket", "hubble_deep_field", "retina",
                  "immunohistochemistry", "brick", "grass", "gravel", "page", "text", "clock", "cell", "colorwheel")
BLUR_SIGMA_FRACTION = 1 / 20
EXTREME_JPEG_QUALITY = 2
_WORDS = ("sample", "report", "invoice", "hello world", "lorem ipsum", "page 12", "total 42.00", "melanoma?")


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (255 * (image - image.min()) / max(float(np.ptp(image)), 1e-9)).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def natural_images(crops_per_image: int, seed: int) -> list[np.ndarray]:
    """The packaged photographs, each followed by ``crops_per_image`` random crops
    (a quarter to three quarters of its side)."""
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [_rgb(getattr(skimage.data, name)()) for name in SKIMAGE_PHOTOS]
    photos += [_rgb(image) for image in load_sample_images().images]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        photos.append(cv2.cvtColor(cv2.imdecode(np.frombuffer(handle.read(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    rng = np.random.default_rng(seed)
    images = []
    for photo in photos:
        images.append(photo)
        height, width = photo.shape[:2]
        for _ in range(crops_per_image):
            side = int(min(height, width) * rng.uniform(0.25, 0.75))
            y, x = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            images.append(np.ascontiguousarray(photo[y:y + side, x:x + side]))
    return images


def face_images() -> list[np.ndarray]:
    """The 100 faces of scikit-image's LFW subset (its first 100 images)."""
    import skimage.data

    return [_rgb(face) for face in skimage.data.lfw_subset()[:100]]


def synthetic_images(kind: str, n: int, seed: int, size: int = 256) -> list[np.ndarray]:
    """``n`` synthetic images of ``kind`` (blank, noise, gradient or text), ``size`` pixels square."""
    rng = np.random.default_rng([seed, SYNTHETIC_KINDS.index(kind) if kind in SYNTHETIC_KINDS else -1])
    images = []
    for _ in range(n):
        colour = rng.integers(0, 256, 3)
        if kind == "blank":  # one colour, with the faint noise of a real sensor
            image = np.clip(colour + rng.normal(0, 1.0, (size, size, 3)), 0, 255)
        elif kind == "noise":
            image = rng.integers(0, 256, (size, size, 3)) if rng.random() < 0.5 else \
                np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255)
        elif kind == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            ramp = np.cos(angle) * np.linspace(0, 1, size)[None, :] + np.sin(angle) * np.linspace(0, 1, size)[:, None]
            ramp = (ramp - ramp.min()) / np.ptp(ramp)
            image = colour + ramp[..., None] * (rng.integers(0, 256, 3) - colour)
        elif kind == "text":
            image = np.full((size, size, 3), colour, np.uint8)
            ink = tuple(int(c) for c in 255 - colour)
            for line in range(int(rng.integers(2, 7))):
                words = " ".join(rng.choice(_WORDS, 2))
                cv2.putText(image, words, (int(rng.integers(0, size // 4)), 30 + line * 36), cv2.FONT_HERSHEY_SIMPLEX,
                            float(rng.uniform(0.5, 1.0)), ink, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            raise MelanomaError(f"Unknown synthetic image kind {kind!r}: choose one of {', '.join(SYNTHETIC_KINDS)}.")
        images.append(np.asarray(image, np.uint8))
    return images


def corrupted(images: Sequence[np.ndarray], kind: str) -> list[np.ndarray]:
    """Real images made unusable: ``heavy_blur`` or ``extreme_jpeg``."""
    if kind == "heavy_blur":
        return [cv2.GaussianBlur(image, (0, 0), max(image.shape[:2]) * BLUR_SIGMA_FRACTION) for image in images]
    if kind == "extreme_jpeg":
        out = []
        for image in images:
            _, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, EXTREME_JPEG_QUALITY])
            out.append(cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
        return out
    raise MelanomaError(f"Unknown corruption {kind!r}: choose one of {', '.join(CORRUPTIONS)}.")


def rejection_set(kind: str, *, n: int, seed: int, lesions: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """Images of ``kind`` (one of :data:`KINDS`); ``n`` bounds the synthetic kinds' count,
    and ``lesions`` are the real images that the corruptions start from."""
    if kind == "natural":
        return natural_images(crops_per_image=3, seed=seed)
    if kind == "faces":
        return face_images()
    if kind in CORRUPTIONS:
        return corrupted(lesions, kind)
    return synthetic_images(kind, n, seed)
