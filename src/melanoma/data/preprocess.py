"""One way to turn an image into model pixels, shared by prepare, predict, explain and serve.

The pipeline, in this order (every step and constant is recorded by
:meth:`PreprocessParams.to_dict`, which the archive and each run store):

1. read the header (Pillow, lazy) and refuse empty, unknown, truncated, too large
   (``max_pixels``, before any pixels are decoded) and too small (``min_side``) images;
2. decode with OpenCV, honouring EXIF orientation; JPEGs much larger than the target are
   decoded at 1/2, 1/4 or 1/8 size in the DCT domain (``IMREAD_REDUCED_COLOR_*``); grey
   and 16-bit images become 8-bit RGB; an alpha channel is composited onto black, so that
   a transparent surround looks like a dermatoscope's dark vignette;
3. optionally crop the dark circular vignette of BCN-style images (no-op without one);
4. resize keeping the aspect ratio, then centre-crop (or pad with black) to a square;
5. optionally remove hair (DullRazor-style: black-hat, threshold, inpaint);
6. optionally apply Shades of Gray colour constancy (Minkowski norm p=6).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from melanoma.errors import ImageError, MelanomaError

# Bump when a change to the algorithm changes the output pixels: archives and runs made
# with another version must not be mixed with this one.
PIPELINE_VERSION = 1
SHADES_OF_GRAY_P = 6
# Vignette: grey levels at or below this are "dark"; a row/column belongs to the bright
# field when more than FIELD_FRACTION of its pixels are brighter.
VIGNETTE_DARK_LEVEL = 40
VIGNETTE_FIELD_FRACTION = 0.05
# Hair: cross-shaped black-hat kernel of about 1/25 of the image side, so that it spans
# a hair's width at any resolution; black-hat responses above the threshold are inpainted.
HAIR_KERNEL_FRACTION = 1 / 25
HAIR_THRESHOLD = 12
HAIR_INPAINT_RADIUS = 3

_REDUCED_FLAGS = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2, 1: cv2.IMREAD_COLOR}
_EXIF_ORIENTATION = 0x0112
JPEG_EOI = b"\xff\xd9"
# Pillow names camera JPEGs with extra frames (multi-picture format) "MPO".
JPEG_FORMATS = ("JPEG", "MPO")

Box = tuple[int, int, int, int]  # y0, y1, x0, x1
RESIZE_MODES = ("crop", "pad", "squash")


@dataclass(frozen=True)
class PreprocessParams:
    """Every parameter of :func:`load_image`; stored with each archive and run."""

    image_size: int
    crop_vignette: bool = True
    color_constancy: bool = True
    hair_removal: bool = False
    resize_mode: str = "crop"  # "crop" | "pad" | "squash"
    max_pixels: int = 50_000_000
    min_side: int = 8

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise MelanomaError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, not {self.resize_mode!r}.")
        if self.image_size < 1 or self.max_pixels < 1 or self.min_side < 1:
            raise MelanomaError(f"image_size, max_pixels and min_side must be positive: {self}.")

    def steps(self) -> list[str]:
        """The steps that run, in order."""
        optional = [
            ("crop_vignette", self.crop_vignette),
            (f"resize_{self.resize_mode}", True),
            ("hair_removal", self.hair_removal),
            ("color_constancy", self.color_constancy),
        ]
        return ["decode"] + [name for name, enabled in optional if enabled]

    def to_dict(self) -> dict[str, Any]:
        """The parameters plus the pipeline's version, steps and constants (JSON-ready)."""
        return {
            **asdict(self),
            "pipeline_version": PIPELINE_VERSION,
            "steps": self.steps(),
            "constants": {
                "shades_of_gray_p": SHADES_OF_GRAY_P,
                "vignette_dark_level": VIGNETTE_DARK_LEVEL,
                "vignette_field_fraction": VIGNETTE_FIELD_FRACTION,
                "hair_kernel_fraction": HAIR_KERNEL_FRACTION,
                "hair_threshold": HAIR_THRESHOLD,
                "hair_inpaint_radius": HAIR_INPAINT_RADIUS,
                "alpha": "composited onto black",
                "high_bit_depth": "scaled to 8 bits (>> 8)",
                "reduced_jpeg_decoding": "largest 1/2, 1/4, 1/8 keeping the side needed >= image_size",
                "resize": "INTER_AREA below 1/2, INTER_LINEAR to 1, INTER_CUBIC above",
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessParams:
        """Inverse of :meth:`to_dict`; refuses parameters made by another pipeline version."""
        version = data.get("pipeline_version", PIPELINE_VERSION)
        if version != PIPELINE_VERSION:
            raise MelanomaError(
                f"These images were preprocessed with pipeline version {version}; "
                f"this melanoma has version {PIPELINE_VERSION}: re-run `melanoma prepare`."
            )
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    @classmethod
    def from_settings(cls, settings: Any) -> PreprocessParams:
        """Take the fields of the same names from :class:`melanoma.config.Settings`."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class ImageHeader:
    """What the file says about itself, read without decoding the pixels."""

    width: int
    height: int
    format: str  # Pillow's format name: "JPEG", "PNG", ...
    has_alpha: bool
    orientation: int  # EXIF orientation, 1 = upright


def load_image(source: str | Path | bytes | np.ndarray, params: PreprocessParams, *, name: str | None = None) -> np.ndarray:
    """Decode and preprocess one image into a uint8 RGB array (image_size, image_size, 3).

    ``source`` is a file path, the encoded bytes of a file, or an already decoded RGB
    uint8 (H, W, 3) or grey (H, W) array. ``name`` labels the image in error messages
    (default: the path, or "image"). Raises :class:`ImageError` naming the image and the
    reason for anything that cannot be used.
    """
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb(source, name or "image array")
        _check_size(rgb.shape[1], rgb.shape[0], params, name or "image array")
        return preprocess_array(rgb, params)

    label = name or (str(source) if isinstance(source, (str, Path)) else "image")
    data = _read_bytes(source, label)
    header = read_header(data, label)
    _check_size(header.width, header.height, params, label)

    factor = reduction_factor(header, params)
    rgb = decode_image(data, header, factor, label)
    if params.crop_vignette and (box := find_vignette_box(rgb)) is not None:
        field_side = _side_needed(box[1] - box[0], box[3] - box[2], params)
        if factor > 1 and field_side < params.image_size:
            # The bright field is smaller than the target once cropped: decode more pixels.
            finer = _factor_for(field_side * factor, params.image_size)
            rgb = decode_image(data, header, finer, label)
            box = find_vignette_box(rgb) or _scale_box(box, factor / finer, rgb.shape)
        rgb = rgb[box[0] : box[1], box[2] : box[3]]
    return _square_and_enhance(rgb, params)


def preprocess_array(rgb: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Steps 3-6 on a decoded uint8 RGB image of any size."""
    if params.crop_vignette and (box := find_vignette_box(rgb)) is not None:
        rgb = rgb[box[0] : box[1], box[2] : box[3]]
    return _square_and_enhance(rgb, params)


def _square_and_enhance(rgb: np.ndarray, params: PreprocessParams) -> np.ndarray:
    square = resize_to_square(rgb, params.image_size, params.resize_mode)
    if params.hair_removal:
        square = remove_hair(square)
    if params.color_constancy:
        square = shades_of_gray(square)
    return square


# ----------------------------------------------------------------------------- decoding
def _read_bytes(source: str | Path | bytes, label: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{label}: file not found") from None
        except IsADirectoryError:
            raise ImageError(f"{label}: is a directory, not an image file") from None
        except OSError as exc:
            raise ImageError(f"{label}: cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise ImageError(f"{label}: empty file (0 bytes)")
    return data


def read_header(data: bytes, label: str = "image") -> ImageHeader:
    """Size, format, alpha and orientation from the header, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if has_alpha else 1
            header = ImageHeader(width, height, image.format or "unknown", has_alpha, orientation)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: too large, refused before decoding ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (unrecognised format, {len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: corrupt image header ({exc})") from None
    if header.format in JPEG_FORMATS and not jpeg_is_complete(data):
        raise ImageError(f"{label}: truncated JPEG (the end-of-image marker is missing)")
    return header


def jpeg_is_complete(data: bytes) -> bool:
    """True when an end-of-image marker follows the start of the first scan.

    libjpeg decodes a truncated file with its missing part filled with grey, so the
    truncation has to be caught here. Segments before the scan (EXIF thumbnails carry
    their own end marker) are skipped by their lengths.
    """
    pos = 2  # after the start-of-image marker
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:  # start of scan
            return data.rfind(JPEG_EOI) > pos
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def _check_size(width: int, height: int, params: PreprocessParams, label: str) -> None:
    if width * height > params.max_pixels:
        raise ImageError(
            f"{label}: too large ({width}x{height} = {width * height:,} pixels, the limit max_pixels is {params.max_pixels:,})"
        )
    if min(width, height) < params.min_side:
        raise ImageError(f"{label}: too small ({width}x{height}, the limit min_side is {params.min_side} pixels)")


def _side_needed(height: int, width: int, params: PreprocessParams) -> int:
    """The side that the resize maps onto image_size: the longer one to pad, else the shorter."""
    return max(height, width) if params.resize_mode == "pad" else min(height, width)


def _factor_for(side: int, target: int) -> int:
    """The largest JPEG reduction that keeps ``side`` at least ``target`` pixels."""
    return next(factor for factor in (8, 4, 2, 1) if side // factor >= target or factor == 1)


def reduction_factor(header: ImageHeader, params: PreprocessParams) -> int:
    """1, 2, 4 or 8: how much smaller to decode. Only JPEG decodes faster at reduced size
    (OpenCV resizes other formats after a full decode, with a cruder filter)."""
    if header.format not in JPEG_FORMATS:
        return 1
    return _factor_for(_side_needed(header.height, header.width, params), params.image_size)


def decode_image(data: bytes, header: ImageHeader, factor: int, label: str = "image") -> np.ndarray:
    """Decode into uint8 RGB (H, W, 3), at 1/factor size for JPEG, EXIF orientation applied."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    flags = cv2.IMREAD_UNCHANGED if header.has_alpha else _REDUCED_FLAGS[factor]
    try:
        image = cv2.imdecode(buffer, flags)
    except cv2.error as exc:
        raise ImageError(f"{label}: cannot be decoded ({exc.err or exc})") from None
    if image is None:
        raise ImageError(f"{label}: cannot be decoded (corrupt or unsupported {header.format} data)")
    if header.has_alpha:
        # IMREAD_UNCHANGED keeps the alpha channel but skips the EXIF rotation.
        return _apply_orientation(_array_to_rgb(_bgr_order_to_rgb(image), label), header.orientation)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _bgr_order_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def _array_to_rgb(array: np.ndarray, label: str) -> np.ndarray:
    """uint8 RGB from grey, grey+alpha, RGB or RGBA arrays of 8 or 16 bits."""
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(f"{label}: pixel type {array.dtype} is not supported (expected uint8 or uint16)")
    channels = 1 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else 0
    if channels not in (1, 2, 3, 4):
        raise ImageError(f"{label}: array of shape {array.shape} is not an image (expected (H, W), (H, W, 3) or (H, W, 4))")
    if channels in (2, 4):  # composite onto black: colour * alpha
        colour, alpha = array[..., :-1], array[..., -1:]
        array = (colour.astype(np.uint16) * alpha // 255).astype(np.uint8)
        channels -= 1
    if channels == 1:
        return cv2.cvtColor(array.reshape(array.shape[:2]), cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(array)


def _apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an image stored with EXIF orientation 2-8 upright."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    transform = transforms.get(orientation)
    return rgb if transform is None else np.ascontiguousarray(transform(rgb))


# ----------------------------------------------------------------------------- geometry
def find_vignette_box(rgb: np.ndarray) -> Box | None:
    """The bounding box (y0, y1, x0, x1) of the bright field inside a dark circular
    vignette, or None where the image has no vignette (its corners are not dark)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    height, width = grey.shape
    corner = max(1, min(height, width) // 16)
    corners = (grey[:corner, :corner], grey[:corner, -corner:], grey[-corner:, :corner], grey[-corner:, -corner:])
    if sum(patch.mean() <= VIGNETTE_DARK_LEVEL for patch in corners) < 3:
        return None
    bright = grey > VIGNETTE_DARK_LEVEL
    rows = np.flatnonzero(bright.mean(axis=1) > VIGNETTE_FIELD_FRACTION)
    cols = np.flatnonzero(bright.mean(axis=0) > VIGNETTE_FIELD_FRACTION)
    if rows.size == 0 or cols.size == 0:
        return None  # a dark image, not a vignette
    box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
    area = (box[1] - box[0]) * (box[3] - box[2])
    if area == height * width or area < 0.1 * height * width:
        return None  # nothing to crop, or too little left to be a dermatoscope's field
    return box


def _scale_box(box: Box, scale: float, shape: tuple[int, ...]) -> Box:
    height, width = shape[:2]
    y0, y1, x0, x1 = (int(round(v * scale)) for v in box)
    return (max(0, y0), min(height, y1), max(0, x0), min(width, x1))


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area averaging where shrinking by more than 2x (bilinear would alias), bilinear
    for milder shrinking (the usual case after reduced decoding, and 5x faster), bicubic
    for enlarging."""
    if (rgb.shape[1], rgb.shape[0]) == (width, height):
        return np.ascontiguousarray(rgb)
    scale = width / rgb.shape[1]
    interpolation = cv2.INTER_AREA if scale < 0.5 else cv2.INTER_LINEAR if scale <= 1 else cv2.INTER_CUBIC
    return cv2.resize(rgb, (width, height), interpolation=interpolation)


def resize_to_square(rgb: np.ndarray, size: int, mode: str = "crop") -> np.ndarray:
    """``crop`` takes the centred square of the shorter side, ``pad`` fits the longer side
    and pads the rest with black, centred (both keep the aspect ratio); ``squash`` resizes the
    whole image to the square, as ISIC Archive images squashed by their publisher already are."""
    height, width = rgb.shape[:2]
    if mode == "squash":
        return _resize(rgb, size, size)
    if mode == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return _resize(rgb[top : top + side, left : left + side], size, size)
    scale = size / max(height, width)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    fitted = _resize(rgb, new_width, new_height)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    return cv2.copyMakeBorder(
        fitted, top, size - new_height - top, left, size - new_width - left, cv2.BORDER_CONSTANT, value=(0, 0, 0)
    )


# ----------------------------------------------------------------------------- colour, hair
def shades_of_gray(rgb: np.ndarray, p: int = SHADES_OF_GRAY_P) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004): estimate the illuminant
    per channel with the Minkowski p-norm, then scale each channel so that it becomes grey.
    The gains are normalised so that a grey illuminant leaves the image unchanged.

    Computed on 256-bin histograms and applied with a lookup table: the same result as
    float arithmetic on every pixel, several times faster."""
    levels = np.arange(256, dtype=np.float64)
    histograms = np.stack([cv2.calcHist([rgb], [channel], None, [256], [0, 256]).ravel() for channel in range(3)])
    illuminant = np.power(histograms @ levels**p / histograms.sum(axis=1), 1.0 / p)
    illuminant = np.maximum(illuminant, 1e-6)
    illuminant /= np.linalg.norm(illuminant)
    gains = 1.0 / (illuminant * np.sqrt(3.0))
    table = np.clip(np.outer(levels, gains), 0, 255).round().astype(np.uint8)  # (256, 3)
    return cv2.LUT(rgb, table.reshape(256, 1, 3))


def remove_hair(rgb: np.ndarray) -> np.ndarray:
    """DullRazor-style hair removal: thin dark structures found by a black-hat with a
    cross-shaped kernel (longer than a hair is wide, in every direction), thresholded,
    then inpainted from their surroundings."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    size = max(3, int(round(min(grey.shape) * HAIR_KERNEL_FRACTION)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (size, size))
    black_hat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, kernel)
    _, mask = cv2.threshold(black_hat, HAIR_THRESHOLD, 255, cv2.THRESH_BINARY)
    mask = cv2.dilate(mask, np.ones((3, 3), np.uint8))
    return cv2.inpaint(rgb, mask, HAIR_INPAINT_RADIUS, cv2.INPAINT_TELEA)
