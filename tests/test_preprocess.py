"""Each preprocessing step on small generated images, plus the decoding edge cases."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from crafted_images import encode, png_declaring
from PIL import Image, ImageOps

from melanoma.config import Settings
from melanoma.data.preprocess import (
    PreprocessParams,
    decode_image,
    find_lesion_box,
    find_lesion_square,
    find_vignette_box,
    load_image,
    preprocess_array,
    read_header,
    reduction_factor,
    remove_hair,
    resize_to_square,
    shades_of_gray,
)
from melanoma.errors import ImageError, MelanomaError

PLAIN = {"crop_vignette": False, "color_constancy": False, "hair_removal": False}


def lesion_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Skin-coloured background with a smooth brown blob and mild texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    blob = np.exp(-(((yy - height / 2) / (0.25 * height)) ** 2 + ((xx - width / 2) / (0.3 * width)) ** 2))
    skin, brown = np.array([220, 170, 150], np.float32), np.array([110, 60, 40], np.float32)
    image = skin * (1 - blob[..., None]) + brown * blob[..., None]
    image += cv2.GaussianBlur(rng.normal(0, 6, (height, width, 3)).astype(np.float32), (0, 0), 2)
    return np.clip(image, 0, 255).astype(np.uint8)


def with_vignette(rgb: np.ndarray, radius: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    mask = np.zeros((height, width), np.uint8)
    cv2.circle(mask, (width // 2, height // 2), radius, 255, -1)
    return np.where(mask[..., None] > 0, rgb, 3).astype(np.uint8)


# ----------------------------------------------------------------------------- parameters
def test_params_round_trip_and_record_every_step() -> None:
    params = PreprocessParams.from_settings(Settings(image_size=96, hair_removal=True, resize_mode="pad"))
    recorded = params.to_dict()
    assert PreprocessParams.from_dict(recorded) == params
    assert recorded["steps"] == ["decode", "crop_vignette", "resize_pad", "hair_removal", "color_constancy"]
    assert recorded["constants"]["shades_of_gray_p"] == 6


def test_params_refuse_bad_values_and_other_versions() -> None:
    with pytest.raises(MelanomaError, match="resize_mode"):
        PreprocessParams(64, resize_mode="stretch")
    with pytest.raises(MelanomaError, match="pipeline version 99"):
        PreprocessParams.from_dict({**PreprocessParams(64).to_dict(), "pipeline_version": 99})


# ----------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("height, width", [(60, 100), (100, 60), (80, 80), (20, 30)])
@pytest.mark.parametrize("mode", ["crop", "pad", "squash", "lesion"])
def test_resize_to_square_shapes(height: int, width: int, mode: str) -> None:
    square = resize_to_square(lesion_image(height, width), 48, mode)
    assert square.shape == (48, 48, 3) and square.dtype == np.uint8


def test_crop_keeps_the_centre_and_pad_keeps_everything() -> None:
    image = np.full((50, 150, 3), 200, np.uint8)
    image[:, :50] = (255, 0, 0)  # left third red, right third blue
    image[:, 100:] = (0, 0, 255)
    cropped = resize_to_square(image, 30, "crop")
    assert (np.abs(cropped.astype(int) - 200) <= 1).all()  # only the grey middle survives
    padded = resize_to_square(image, 30, "pad")
    assert padded[:10].max() == 0 and padded[-10:].max() == 0  # black bands above and below
    assert padded[15, 2, 0] > 200 and padded[15, -3, 2] > 200  # red left, blue right, kept
    squashed = resize_to_square(image, 30, "squash")
    assert (squashed[:, :9, 0] > 200).all() and (squashed[:, -9:, 2] > 200).all()  # every row keeps all three thirds
    assert (np.abs(squashed[:, 12:18].astype(int) - 200) <= 1).all()


# ----------------------------------------------------------------------------- lesion
def skin_with_blob(height: int, width: int, centre: tuple[int, int], radii: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Textured skin with one dark-brown elliptical blob (centre y, x; radii y, x)."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.float32)
    image[:] = (215, 165, 145)
    cv2.ellipse(image, (centre[1], centre[0]), (radii[1], radii[0]), 0, 0, 360, (95, 55, 40), -1)
    image += cv2.GaussianBlur(rng.normal(0, 8, (height, width, 3)).astype(np.float32), (0, 0), 1.5)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_params_record_the_lesion_mode_and_leave_the_others_unchanged() -> None:
    recorded = PreprocessParams(64, resize_mode="lesion").to_dict()
    assert recorded["steps"] == ["decode", "crop_vignette", "resize_lesion", "color_constancy"]
    assert recorded["constants"]["lesion_margin"] == 0.25 and recorded["constants"]["lesion_min_area"] == 0.02
    assert PreprocessParams.from_dict(recorded).resize_mode == "lesion"
    assert not any(key.startswith("lesion") for key in PreprocessParams(64).to_dict()["constants"])


def test_lesion_square_is_centred_on_an_off_centre_blob_and_holds_it_whole() -> None:
    image = skin_with_blob(300, 400, centre=(110, 250), radii=(30, 40))
    y0, y1, x0, x1 = find_lesion_box(image)
    assert abs(y0 - 80) <= 4 and abs(y1 - 140) <= 4 and abs(x0 - 210) <= 4 and abs(x1 - 290) <= 4
    y0, y1, x0, x1 = find_lesion_square(image)
    assert y1 - y0 == x1 - x0 == pytest.approx(80 * 1.5, abs=6)  # the longer side plus 25% per side
    assert abs((y0 + y1) / 2 - 110) <= 3 and abs((x0 + x1) / 2 - 250) <= 3
    square = resize_to_square(image, 64, "lesion")
    dark = square.mean(axis=2) < 120
    rows, cols = np.nonzero(dark)
    assert abs(rows.mean() - 31.5) <= 2 and abs(cols.mean() - 31.5) <= 2  # the blob in the middle ...
    assert not dark[[0, -1]].any() and not dark[:, [0, -1]].any()  # ... whole, with skin around it
    assert rows.max() - rows.min() == pytest.approx(64 * 60 / 120, abs=4)  # 60 px tall in a 120 px square


def test_lesion_square_stays_inside_the_image() -> None:
    image = skin_with_blob(200, 300, centre=(40, 100), radii=(30, 25))  # near the top
    y0, y1, x0, x1 = find_lesion_square(image)
    assert y0 == 0 and y1 - y0 == x1 - x0 == pytest.approx(90, abs=6)  # moved down, still square
    assert abs((x0 + x1) / 2 - 100) <= 3
    large = skin_with_blob(100, 300, centre=(50, 150), radii=(35, 60))  # square wider than the image is tall
    y0, y1, x0, x1 = find_lesion_square(large)
    assert (y0, y1) == (0, 100) and x1 - x0 == pytest.approx(180, abs=8)


@pytest.mark.parametrize("case", ["blank", "noise", "black", "tiny blob", "blob at the edge", "dark half"])
def test_lesion_mode_falls_back_to_the_whole_image(case: str) -> None:
    rng = np.random.default_rng(0)
    image = {
        "blank": np.full((120, 160, 3), (215, 165, 145), np.uint8),
        "noise": np.clip(rng.normal(180, 10, (120, 160, 3)), 0, 255).astype(np.uint8),
        "black": np.zeros((120, 160, 3), np.uint8),
        "tiny blob": skin_with_blob(120, 160, centre=(60, 80), radii=(4, 4)),
        "blob at the edge": skin_with_blob(120, 160, centre=(60, 8), radii=(20, 20)),
        "dark half": np.concatenate([np.full((120, 80, 3), 90, np.uint8), np.full((120, 80, 3), 210, np.uint8)], axis=1),
    }[case]
    assert find_lesion_box(image) is None and find_lesion_square(image) is None
    assert np.array_equal(resize_to_square(image, 48, "lesion"), resize_to_square(image, 48, "squash"))


def test_lesion_mode_ignores_a_vignette_and_is_shared_by_every_input() -> None:
    image = with_vignette(skin_with_blob(240, 240, centre=(100, 140), radii=(22, 22)), radius=125)
    params = PreprocessParams(64, resize_mode="lesion")
    from_array = load_image(image, params)
    assert np.array_equal(from_array, load_image(encode(image), params)) and np.array_equal(from_array, preprocess_array(image, params))
    # The dark corners are not the lesion: the square holds the blob (about 2/3 of it is skin).
    dark = from_array.mean(axis=2) < 100
    assert 0.1 < dark.mean() < 0.4 and not dark[[0, -1]].any()


def test_lesion_mode_decodes_finer_where_the_lesion_is_small() -> None:
    rgb = cv2.resize(skin_with_blob(256, 256, centre=(128, 128), radii=(24, 24)), (1024, 1024), interpolation=cv2.INTER_CUBIC)
    data = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    params = PreprocessParams(128, resize_mode="lesion", color_constancy=False)
    assert reduction_factor(read_header(data), params) == 8  # the square is 288 of 1024 px: 36 px at 1/8
    full = preprocess_array(cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), params)
    reduced = load_image(data, params)
    assert np.abs(reduced.astype(int) - full).mean() < 8.0  # the region, found at 1/8 size, moves by a pixel or two
    sharpness = [cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for image in (full, reduced)]
    assert sharpness[1] > 0.7 * sharpness[0]  # not an enlargement of a 36-pixel square


# ----------------------------------------------------------------------------- colour, hair
def test_shades_of_gray_balances_a_colour_cast() -> None:
    neutral = lesion_image(64, 64).astype(np.float32).mean(axis=2, keepdims=True)
    cast = np.clip(neutral * np.array([1.25, 1.0, 0.6]), 0, 255).astype(np.uint8)
    means_before = cast.reshape(-1, 3).mean(axis=0)
    means_after = shades_of_gray(cast).reshape(-1, 3).mean(axis=0)
    assert means_before.max() / means_before.min() > 1.8
    assert means_after.max() / means_after.min() < 1.05


def test_shades_of_gray_leaves_a_grey_image_unchanged() -> None:
    grey = np.repeat(lesion_image(32, 32).mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    assert np.abs(shades_of_gray(grey).astype(int) - grey).max() <= 1


def test_hair_removal_erases_dark_lines() -> None:
    clean = lesion_image(128, 128)
    hairy = clean.copy()
    for start, end in [((0, 10), (127, 100)), ((20, 127), (110, 0)), ((64, 0), (70, 127))]:
        cv2.line(hairy, start, end, (25, 20, 15), 2)
    lines = np.any(hairy != clean, axis=2)
    error_before = np.abs(hairy.astype(int) - clean)[lines].mean()
    error_after = np.abs(remove_hair(hairy).astype(int) - clean)[lines].mean()
    assert error_after < 0.25 * error_before
    # Away from the hairs the image is untouched (apart from the inpainting margin).
    far = cv2.dilate(lines.astype(np.uint8), np.ones((9, 9), np.uint8)) == 0
    assert np.abs(remove_hair(hairy).astype(int) - clean)[far].max() == 0


# ----------------------------------------------------------------------------- vignette
def test_vignette_crop_finds_the_bright_field() -> None:
    image = with_vignette(lesion_image(200, 240), radius=80)
    y0, y1, x0, x1 = find_vignette_box(image)
    assert abs(y0 - 20) <= 4 and abs(y1 - 180) <= 4 and abs(x0 - 40) <= 4 and abs(x1 - 200) <= 4


def test_vignette_crop_is_a_no_op_without_vignette() -> None:
    image = lesion_image(90, 120)
    assert find_vignette_box(image) is None
    params = PreprocessParams(64, **{**PLAIN, "crop_vignette": True})
    assert np.array_equal(preprocess_array(image, params), preprocess_array(image, PreprocessParams(64, **PLAIN)))


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("vignette", [False, True])
def test_reduced_decode_matches_full_decode(vignette: bool) -> None:
    rgb = cv2.resize(lesion_image(256, 256), (1024, 1024), interpolation=cv2.INTER_CUBIC)
    if vignette:  # a field of 700 px: at 1/4 size too small for 224 px, so decoded again at 1/2
        rgb = with_vignette(rgb, radius=350)
    data = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    params = PreprocessParams(224, crop_vignette=vignette, color_constancy=True)
    assert reduction_factor(read_header(data), params) == 4
    full = preprocess_array(cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), params)
    reduced = load_image(data, params)
    assert reduced.shape == full.shape == (224, 224, 3)
    assert np.abs(reduced.astype(int) - full).mean() < 2.0


def test_path_bytes_and_array_give_the_same_pixels(tmp_path: Path) -> None:
    rgb = lesion_image(90, 120)
    data = encode(rgb)
    (tmp_path / "a.png").write_bytes(data)
    params = PreprocessParams(64)
    from_path = load_image(tmp_path / "a.png", params)
    assert np.array_equal(from_path, load_image(data, params))
    assert np.array_equal(from_path, load_image(rgb, params))


@pytest.mark.parametrize("factor", [1, 2])
def test_exif_orientation_is_honoured_in_jpeg(factor: int) -> None:
    stored = lesion_image(200, 400)
    stored[:40, :40] = (255, 0, 0)  # red marker at the stored top-left
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif)
    data = buffer.getvalue()
    decoded = decode_image(data, read_header(data), factor)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert decoded.shape[:2] == (400 // factor, 200 // factor)
    assert decoded[2, -3, 0] > 200 and decoded[2, -3, 2] < 60  # marker now at top-right
    expected = cv2.resize(upright, decoded.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(decoded.astype(int) - expected).mean() < 3


def test_exif_orientation_is_honoured_with_alpha() -> None:
    stored = np.dstack([lesion_image(20, 40), np.full((20, 40), 255, np.uint8)])
    image = Image.fromarray(stored, "RGBA")
    exif = image.getexif()
    exif[0x0112] = 8
    buffer = io.BytesIO()
    image.save(buffer, "PNG", exif=exif)
    data = buffer.getvalue()
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(decode_image(data, read_header(data), 1), expected)


def test_grey_image_becomes_rgb() -> None:
    grey = lesion_image(40, 60)[..., 1]
    out = load_image(encode(grey), PreprocessParams(32, **PLAIN))
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_alpha_is_composited_onto_black() -> None:
    rgba = np.dstack([lesion_image(40, 40), np.full((40, 40), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # left half transparent
    rgba[:, 20:30, 3] = 128  # a half-transparent band
    decoded = decode_image(encode(rgba), read_header(encode(rgba)), 1)
    assert decoded.shape == (40, 40, 3)
    assert decoded[:, :20].max() == 0
    assert np.abs(decoded[:, 20:30].astype(int) - rgba[:, 20:30, :3].astype(int) * 128 // 255).max() <= 1
    assert np.array_equal(decoded[:, 30:], rgba[:, 30:, :3])
    grey_alpha = io.BytesIO()
    Image.fromarray(rgba[..., [0, 3]], "LA").save(grey_alpha, "PNG")
    assert load_image(grey_alpha.getvalue(), PreprocessParams(16, **PLAIN)).shape == (16, 16, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_images_become_8_bit(channels: int) -> None:
    rgb = lesion_image(40, 40)
    image16 = rgb.astype(np.uint16) * 257
    if channels == 1:
        image16, rgb = image16[..., 0], np.repeat(rgb[..., :1], 3, axis=2)
    decoded = decode_image(encode(image16), read_header(encode(image16)), 1)
    assert decoded.dtype == np.uint8 and np.abs(decoded.astype(int) - rgb).max() <= 1


# ----------------------------------------------------------------------------- bad input
def bad_inputs() -> dict[str, tuple[bytes, str]]:
    jpeg = encode(lesion_image(120, 160), ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    png = encode(lesion_image(40, 40))
    return {
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"this is not an image\n" * 10, "not an image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated JPEG"),
        "truncated.png": (png[: len(png) // 2], "cannot be decoded|corrupt"),
        "tiny.png": (encode(np.zeros((1, 1, 3), np.uint8)), "too small"),
        "bomb.png": (png_declaring(20_000, 20_000), "too large"),
        "big.png": (png_declaring(4_000, 3_000), r"too large \(4000x3000 = 12,000,000 pixels"),
    }


@pytest.mark.parametrize("name", list(bad_inputs()))
def test_bad_images_raise_image_error_naming_file_and_reason(tmp_path: Path, name: str) -> None:
    data, reason = bad_inputs()[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageError, match=reason) as error:
        load_image(path, PreprocessParams(64, max_pixels=10_000_000))
    assert str(path) in str(error.value)


def test_missing_file_directory_and_bad_arrays(tmp_path: Path) -> None:
    params = PreprocessParams(32)
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "absent.jpg", params)
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path, params)
    with pytest.raises(ImageError, match="float64 is not supported"):
        load_image(np.zeros((40, 40, 3)), params)
    with pytest.raises(ImageError, match="too small"):
        load_image(np.zeros((4, 40, 3), np.uint8), params)


@pytest.mark.realdata
def test_real_ham_image(ham_dir: Path) -> None:
    path = next((ham_dir / "HAM10000_images_part_1").glob("*.jpg"))
    for size in (64, 224):
        image = load_image(path, PreprocessParams(size))
        assert image.shape == (size, size, 3) and image.dtype == np.uint8 and image.std() > 5


# Real images whose darkest region is the lesion (in others it is a shadow, a sticker or the
# dermatoscope's border, which the lesion mode must ignore).
REAL_LESIONS = [
    "ham10000/HAM10000_images_part_1/ISIC_0029002.jpg", "ham10000/HAM10000_images_part_2/ISIC_0030818.jpg",
    "ham10000/HAM10000_images_part_1/ISIC_0025752.jpg", "ham10000/HAM10000_images_part_2/ISIC_0031276.jpg",
    "isic2019/ISIC_2019_Training_Input/ISIC_0014945.jpg", "isic2019/ISIC_2019_Training_Input/ISIC_0014919.jpg",
    "isic2019/ISIC_2019_Training_Input/ISIC_0000206.jpg", "isic2019/ISIC_2019_Training_Input/ISIC_0013702.jpg",
]


@pytest.mark.realdata
@pytest.mark.parametrize("relative", REAL_LESIONS, ids=lambda path: Path(path).stem)
def test_real_lesion_box_covers_the_darkest_region(shared_data: Path, relative: str) -> None:
    path = shared_data / relative
    if not path.is_file():
        path = next(path.parent.glob(f"{path.stem}*.jpg"))  # ISIC 2019's "_downsampled" names
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    y0, y1, x0, x1 = find_lesion_box(rgb)
    grey = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), min(rgb.shape[:2]) / 16)
    margin = min(rgb.shape[:2]) // 8  # away from the border (vignette, shadows)
    inner = grey[margin:-margin, margin:-margin]
    y, x = np.add(np.unravel_index(np.argmin(inner), inner.shape), margin)
    assert y0 <= y < y1 and x0 <= x < x1
    area = (y1 - y0) * (x1 - x0) / (rgb.shape[0] * rgb.shape[1])
    assert 0.02 < area < 0.9
    for size in (64, 224):
        image = load_image(path, PreprocessParams(size, resize_mode="lesion"))
        assert image.shape == (size, size, 3) and image.dtype == np.uint8 and image.std() > 5
