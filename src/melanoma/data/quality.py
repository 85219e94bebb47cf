"""Input-quality checks that run before the model: warnings, not refusals.

An image the model can read may still be a poor input: enlarged from a small picture,
near-blank, heavily blurred, or stretched to an extreme aspect ratio before the square
crop. Each check gives a named warning (a stable ``code`` and a sentence) that the CLI,
the API and the playground show beside the prediction.

Contrast and sharpness are measured on the model's own pixels (after preprocessing),
reduced to :data:`WORK_SIDE` pixels so that one threshold holds for every model size:
the variance of the Laplacian grows with resolution. Size and aspect ratio come from the
file's header (or the array's shape), read without decoding the pixels.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

# Side at which contrast and sharpness are measured (HAM10000 at 64 px: the variance of the
# Laplacian is 23 at the 0.5th percentile, and 10 at the 95th percentile once blurred with a
# Gaussian of sigma = 1/40 of the image side).
WORK_SIDE = 64


@dataclass(frozen=True)
class QualityLimits:
    """The thresholds of the checks (defaults in :class:`melanoma.config.Settings`)."""

    min_side: int
    max_aspect_ratio: float
    min_contrast: float
    min_sharpness: float

    @classmethod
    def from_settings(cls, settings: Any, image_size: int) -> QualityLimits:
        """The settings' ``quality_*`` values; ``min_side`` defaults to the model's input size."""
        return cls(min_side=settings.quality_min_side or image_size,
                   max_aspect_ratio=settings.quality_max_aspect_ratio,
                   min_contrast=settings.quality_min_contrast, min_sharpness=settings.quality_min_sharpness)


@dataclass(frozen=True)
class QualityWarning:
    code: str     # too_small | near_blank | blurred | extreme_aspect_ratio
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def source_size(source: str | Path | bytes | np.ndarray) -> tuple[int, int] | None:
    """(width, height) of an image file, encoded bytes or array, from the header only;
    None where it cannot be read (the model's own loading then says why)."""
    if isinstance(source, np.ndarray):
        return (int(source.shape[1]), int(source.shape[0])) if source.ndim >= 2 else None
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def contrast_and_sharpness(pixels: np.ndarray) -> tuple[float, float]:
    """Grey-level standard deviation and variance of the Laplacian of an RGB uint8 image,
    at :data:`WORK_SIDE` pixels."""
    grey = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
    if grey.shape != (WORK_SIDE, WORK_SIDE):
        grey = cv2.resize(grey, (WORK_SIDE, WORK_SIDE), interpolation=cv2.INTER_AREA)
    return float(grey.std()), float(cv2.Laplacian(grey, cv2.CV_64F).var())


def quality_warnings(size: tuple[int, int] | None, pixels: np.ndarray, limits: QualityLimits) -> list[QualityWarning]:
    """The warnings for an image of ``size`` (width, height; None: unknown) whose model
    pixels are ``pixels`` (uint8 RGB, square)."""
    warnings = []
    if size is not None:
        width, height = size
        if min(width, height) < limits.min_side:
            warnings.append(QualityWarning("too_small", f"The image is small ({width}x{height}): it is enlarged to "
                                           f"the model's input, which blurs details (minimum side {limits.min_side})."))
        ratio = max(width, height) / max(1, min(width, height))
        if ratio > limits.max_aspect_ratio:
            warnings.append(QualityWarning("extreme_aspect_ratio", f"The image is {ratio:.1f} times longer than wide: "
                                           f"most of it is cropped away (limit {limits.max_aspect_ratio:g})."))
    contrast, sharpness = contrast_and_sharpness(pixels)
    if contrast < limits.min_contrast:
        warnings.append(QualityWarning("near_blank", f"The image is nearly blank (grey-level spread {contrast:.1f}, "
                                       f"minimum {limits.min_contrast:g})."))
    elif sharpness < limits.min_sharpness:  # a blank image is also "blurred": one warning is enough
        warnings.append(QualityWarning("blurred", f"The image is heavily blurred (sharpness {sharpness:.1f}, "
                                       f"minimum {limits.min_sharpness:g})."))
    return warnings
