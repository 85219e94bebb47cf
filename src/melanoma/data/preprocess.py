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
4. make a square: ``crop`` resizes keeping the aspect ratio and centre-crops, ``pad`` pads
   with black, ``squash`` resizes the whole image; ``lesion`` finds the lesion (the largest
   dark blob that does not lie along the border), grows its box by a margin, makes it
   square and resizes that, or squashes the whole image where no plausible lesion is found;
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
# Lesion: searched on a copy whose longer side is LESION_SEARCH_SIDE pixels (fast, and the
# same scale whatever the camera; the sizes below are in its pixels). Hair is erased by a
# grey closing with a disc of LESION_HAIR_KERNEL (wider than a hair, narrower than the
# smallest lesion kept), then blurred by LESION_BLUR_SIGMA; "dark" is below the Otsu
# threshold of the grey levels inside the field (the vignette's dark border left out),
# cleaned by an opening and a closing with a disc of LESION_CLEAN_KERNEL. A dark blob is a
# lesion if it covers LESION_MIN_AREA to LESION_MAX_AREA of the image, touches at most one
# of its sides (one touching two is a shadow, a corner, or a lesion larger than the frame,
# which the whole image frames best) and its centroid lies within LESION_MAX_OFFCENTRE of
# the centre (1 = the middle of a side): dermoscopy centres the lesion. Of those, the one
# with the most darkness below the threshold, weighted by closeness to the centre, wins.
# Its box grows by LESION_MARGIN of its size on each side, so that the lesion's border,
# where melanoma's signs are, keeps some skin around it.
LESION_SEARCH_SIDE = 128
LESION_HAIR_KERNEL = 7
LESION_BLUR_SIGMA = 2.0
LESION_CLEAN_KERNEL = 5
LESION_MIN_AREA = 0.02
LESION_MAX_AREA = 0.90
LESION_MAX_OFFCENTRE = 0.75
LESION_MARGIN = 0.25

_REDUCED_FLAGS = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2, 1: cv2.IMREAD_COLOR}
_EXIF_ORIENTATION = 0x0112
JPEG_EOI = b"\xff\xd9"
# Pillow names camera JPEGs with extra frames (multi-picture format) "MPO".
JPEG_FORMATS = ("JPEG", "MPO")

Box = tuple[int, int, int, int]  # y0, y1, x0, x1
RESIZE_MODES = ("crop", "pad", "squash", "lesion")


@dataclass(frozen=True)
class PreprocessParams:
    """Every parameter of :func:`load_image`; stored with each archive and run."""

    image_size: int
    crop_vignette: bool = True
    color_constancy: bool = True
    hair_removal: bool = False
    resize_mode: str = "crop"  # "crop" | "pad" | "squash" | "lesion"
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
                **({"lesion_search_side": LESION_SEARCH_SIDE, "lesion_hair_kernel": LESION_HAIR_KERNEL,
                    "lesion_blur_sigma": LESION_BLUR_SIGMA, "lesion_clean_kernel": LESION_CLEAN_KERNEL,
                    "lesion_min_area": LESION_MIN_AREA, "lesion_max_area": LESION_MAX_AREA,
                    "lesion_max_offcentre": LESION_MAX_OFFCENTRE, "lesion_margin": LESION_MARGIN,
                    "lesion_fallback": "squash the whole image"} if self.resize_mode == "lesion" else {}),
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
    if params.resize_mode == "lesion":
        region = lesion_region(rgb, params.crop_vignette)
        side = min(region[1] - region[0], region[3] - region[2])
        if factor > 1 and side < params.image_size:
            # The lesion fills a small part of the image: decode more pixels, same region.
            finer = _factor_for(side * factor, params.image_size)
            rgb = decode_image(data, header, finer, label)
            region = _scale_box(region, factor / finer, rgb.shape)
        return _enhance(_resize(rgb[region[0] : region[1], region[2] : region[3]], params.image_size, params.image_size), params)
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
    return _enhance(resize_to_square(rgb, params.image_size, params.resize_mode), params)


def _enhance(square: np.ndarray, params: PreprocessParams) -> np.ndarray:
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
    y0, y1, x0, x1 = (round(v * scale) for v in box)
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
    whole image to the square, as ISIC Archive images squashed by their publisher already are;
    ``lesion`` resizes :func:`find_lesion_square`'s square, or squashes the whole image
    where it finds no lesion."""
    height, width = rgb.shape[:2]
    if mode == "lesion":
        y0, y1, x0, x1 = find_lesion_square(rgb) or (0, height, 0, width)
        return _resize(rgb[y0:y1, x0:x1], size, size)
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


# ----------------------------------------------------------------------------- lesion
def find_lesion_box(rgb: np.ndarray) -> Box | None:
    """The bounding box (y0, y1, x0, x1) of the lesion: the darkest, most central dark blob
    that is neither tiny, nor nearly the whole image, nor lying along its border; None
    where there is no such blob (a blank image, a lesion filling the frame)."""
    height, width = rgb.shape[:2]
    scale = LESION_SEARCH_SIDE / max(height, width)
    small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
    grey = cv2.cvtColor(_resize(rgb, small_w, small_h), cv2.COLOR_RGB2GRAY)
    field = _field_mask(grey)
    if not field.any():
        return None  # a black image
    grey[~field] = np.median(grey[field])  # so that filtering does not spread the border's black into the field
    grey = cv2.morphologyEx(grey, cv2.MORPH_CLOSE, _disc(LESION_HAIR_KERNEL))
    grey = _flatten_lighting(cv2.GaussianBlur(grey, (0, 0), LESION_BLUR_SIGMA).astype(np.float64), field)
    values = np.clip(grey[field], 0, 255).astype(np.uint8)
    if values.min() == values.max():
        return None  # nothing to tell apart: a blank image
    threshold, _ = cv2.threshold(values.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = ((grey <= threshold) & field).astype(np.uint8)
    clean = _disc(LESION_CLEAN_KERNEL)
    dark = cv2.morphologyEx(cv2.morphologyEx(dark, cv2.MORPH_OPEN, clean), cv2.MORPH_CLOSE, clean)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(dark, connectivity=8)
    ys, xs = np.mgrid[0:small_h, 0:small_w]
    offcentre = np.hypot((ys + 0.5) / small_h * 2 - 1, (xs + 0.5) / small_w * 2 - 1)
    weights = np.clip(1 - offcentre, 0, None) * (threshold - grey)
    scores = np.bincount(labels.ravel(), weights=weights.ravel(), minlength=count)
    x, y, w, h, area = (stats[:, column] for column in range(5))
    sides = (x == 0).astype(int) + (y == 0) + (x + w == small_w) + (y + h == small_h)
    centre_distance = np.hypot(centroids[:, 0] / small_w * 2 - 1, centroids[:, 1] / small_h * 2 - 1)
    plausible = ((area >= LESION_MIN_AREA * small_w * small_h) & (area <= LESION_MAX_AREA * small_w * small_h)
                 & (sides <= 1) & (centre_distance <= LESION_MAX_OFFCENTRE))
    plausible[0] = False  # the background
    if not plausible.any():
        return None
    best = int(np.argmax(np.where(plausible, scores, -np.inf)))
    return _scale_box((y[best], y[best] + h[best], x[best], x[best] + w[best]), 1 / scale, rgb.shape)


def _flatten_lighting(grey: np.ndarray, field: np.ndarray) -> np.ndarray:
    """``grey`` minus the linear gradient of its skin (the brighter half of the field),
    so that uneven lighting does not split the image into a dark and a bright half."""
    ys, xs = np.indices(grey.shape, dtype=np.float64)
    ys -= ys.mean()
    xs -= xs.mean()
    skin = field & (grey >= np.median(grey[field]))
    design = np.stack([np.ones(int(skin.sum())), xs[skin], ys[skin]])
    # Least squares by its normal equations: a 3x3 solve (lstsq's SVD is 20x slower here).
    _, slope_x, slope_y = np.linalg.solve(design @ design.T + 1e-9 * np.eye(3), design @ grey[skin])
    return grey - slope_x * xs - slope_y * ys


def _disc(diameter: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (diameter, diameter))


def _field_mask(grey: np.ndarray) -> np.ndarray:
    """Pixels outside the dermatoscope's dark border: dark regions connected to the
    image's edge are the vignette (a lesion is rarely that dark)."""
    dark = (grey <= VIGNETTE_DARK_LEVEL).astype(np.uint8)
    _, labels = cv2.connectedComponents(dark, connectivity=8)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ~np.isin(labels, edge[edge > 0])


def find_lesion_square(rgb: np.ndarray) -> Box | None:
    """:func:`find_lesion_box` grown by LESION_MARGIN per side, made square (the longer
    side) around the box's centre and moved inside the image; where the square is larger
    than the image in one direction, the image's whole extent in that direction."""
    box = find_lesion_box(rgb)
    if box is None:
        return None
    height, width = rgb.shape[:2]
    y0, y1, x0, x1 = box
    side = round(max(y1 - y0, x1 - x0) * (1 + 2 * LESION_MARGIN))
    return (*_centred_span((y0 + y1) / 2, side, height), *_centred_span((x0 + x1) / 2, side, width))


def _centred_span(centre: float, side: int, limit: int) -> tuple[int, int]:
    """[start, start + side) centred on ``centre``, moved inside [0, limit) (or all of it)."""
    if side >= limit:
        return 0, limit
    start = min(max(0, round(centre - side / 2)), limit - side)
    return start, start + side


def lesion_region(rgb: np.ndarray, crop_vignette: bool) -> Box:
    """What ``lesion`` mode resizes to the square, in ``rgb``'s coordinates: the lesion's
    square inside the vignette's field, or the whole field where no lesion is found."""
    height, width = rgb.shape[:2]
    fy0, fy1, fx0, fx1 = (find_vignette_box(rgb) if crop_vignette else None) or (0, height, 0, width)
    field = rgb[fy0:fy1, fx0:fx1]
    y0, y1, x0, x1 = find_lesion_square(field) or (0, fy1 - fy0, 0, fx1 - fx0)
    return (fy0 + y0, fy0 + y1, fx0 + x0, fx0 + x1)


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
    size = max(3, round(min(grey.shape) * HAIR_KERNEL_FRACTION) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (size, size))
    black_hat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, kernel)
    _, mask = cv2.threshold(black_hat, HAIR_THRESHOLD, 255, cv2.THRESH_BINARY)
    mask = cv2.dilate(mask, np.ones((3, 3), np.uint8))
    return cv2.inpaint(rgb, mask, HAIR_INPAINT_RADIUS, cv2.INPAINT_TELEA)
