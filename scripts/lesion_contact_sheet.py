"""Development check: does ``--resize-mode lesion`` frame real lesions sensibly?

Draws a contact sheet of real images (half HAM10000, half ISIC Archive images from
``../shared/data``, chosen at random with a seed, every class represented). Each image gets
three panels: the whole image (vignette-cropped, squashed to a square) with the lesion box
in red and the region that ``lesion`` mode keeps in green, then what ``crop`` mode makes,
then what ``lesion`` mode makes (both with colour constancy, as ``prepare`` does by
default). An image where no lesion is found has no boxes (``lesion`` squashes the whole image).

    python scripts/lesion_contact_sheet.py [--n 12] [--size 128] [--seed 0] [--out reports/lesion-crop.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from melanoma.data.preprocess import (
    PreprocessParams,
    decode_image,
    find_lesion_box,
    find_vignette_box,
    lesion_region,
    load_image,
    read_header,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
COLUMNS = 4  # triplets per row
LABEL_HEIGHT = 14


def pick(n: int, seed: int, shared: Path) -> list[tuple[str, Path]]:
    """n HAM10000 and n ISIC Archive images: (caption, path), classes taken in turn."""
    ham = pd.read_csv(shared / "ham10000" / "HAM10000_metadata.csv")
    ham_paths = {p.stem: p for p in (shared / "ham10000").glob("HAM10000_images_part_*/*.jpg")}
    ham["path"], ham["label"], ham["name"] = ham["image_id"].map(ham_paths), ham["dx"], ham["image_id"]
    isic = pd.read_csv(shared / "isic2019" / "ISIC_2019_Training_Input_sources.csv")
    isic["path"] = [shared / "isic2019" / "ISIC_2019_Training_Input" / f"{name}.jpg" for name in isic["image"]]
    isic["name"] = isic["image"].str.replace("_downsampled", "")
    chosen = []
    for table, tag in ((ham, "HAM"), (isic, "ISIC")):
        shuffled = table.dropna(subset=["path"]).sample(frac=1, random_state=seed)
        by_class = [group for _, group in shuffled.groupby("label")]
        rows = [group.iloc[i] for i in range(n) for group in by_class if i < len(group)][:n]
        chosen += [(f"{tag} {row['label']} {row['name']}", Path(row["path"])) for row in rows]
    return chosen


def overview(path: Path, size: int) -> np.ndarray:
    """The vignette-cropped image squashed to size, with the lesion box (red) and the region
    lesion mode keeps (green)."""
    data = path.read_bytes()
    rgb = decode_image(data, read_header(data, str(path)), 1, str(path))
    fy0, fy1, fx0, fx1 = find_vignette_box(rgb) or (0, rgb.shape[0], 0, rgb.shape[1])
    field = rgb[fy0:fy1, fx0:fx1]
    sy, sx = size / field.shape[0], size / field.shape[1]
    panel = np.ascontiguousarray(cv2.resize(field, (size, size), interpolation=cv2.INTER_AREA))
    box = find_lesion_box(field)
    if box is not None:
        y0, y1, x0, x1 = np.subtract(lesion_region(rgb, True), (fy0, fy0, fx0, fx0))
        cv2.rectangle(panel, (int(x0 * sx), int(y0 * sy)), (int(x1 * sx) - 1, int(y1 * sy) - 1), (0, 255, 0), 1)
        y0, y1, x0, x1 = box
        cv2.rectangle(panel, (int(x0 * sx), int(y0 * sy)), (int(x1 * sx) - 1, int(y1 * sy) - 1), (255, 0, 0), 1)
    return panel


def sheet(images: list[tuple[str, Path]], size: int) -> np.ndarray:
    crop, lesion = PreprocessParams(size, resize_mode="crop"), PreprocessParams(size, resize_mode="lesion")
    tiles = []
    for caption, path in images:
        triplet = np.concatenate([overview(path, size), load_image(path, crop), load_image(path, lesion)], axis=1)
        label = np.full((LABEL_HEIGHT, triplet.shape[1], 3), 255, np.uint8)
        cv2.putText(label, caption, (2, LABEL_HEIGHT - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        tile = np.concatenate([label, triplet], axis=0)
        tiles.append(cv2.copyMakeBorder(tile, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(255, 255, 255)))
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % COLUMNS)
    rows = [np.concatenate(tiles[i : i + COLUMNS], axis=1) for i in range(0, len(tiles), COLUMNS)]
    return np.concatenate(rows, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12, help="images from each source")
    parser.add_argument("--size", type=int, default=128, help="side of the squares, in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "lesion-crop.png")
    args = parser.parse_args()
    image = sheet(pick(args.n, args.seed, args.shared), args.size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    print(f"{args.out}: {image.shape[1]}x{image.shape[0]}")


if __name__ == "__main__":
    main()
