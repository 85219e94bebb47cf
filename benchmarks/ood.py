"""Does the out-of-distribution gate refuse what it should, and pass what it should?

    .venv/bin/python benchmarks/ood.py --run RUN [--isic-dir DIR] [--n 200] [--seed 0]

For a run with a fitted gate (`melanoma train` fits it; `melanoma calibrate` for older
runs), on the run's own archive:

- in distribution: the test split of the run's archive (the pixels the model sees);
- other clinics: the dermoscopic images in ``--isic-dir`` (default: the 2,280 ISIC 2019
  images beside the repository, MSK and other clinics outside Vienna and Queensland);
- the rejection set of :mod:`melanoma.data.outliers`: photographs shipped in installed
  packages and random crops of them, LFW faces, synthetic blank / noise / gradient / text
  images, and ``--n`` of the archive's test images (read from their source files) heavily
  blurred or saved at JPEG quality 2.

Per kind: the AUROC of the gate's score against the HAM test images (1 = perfectly
separated; 0.5 = chance), the same for the max-softmax-probability baseline, the share
flagged by the gate, by an input-quality warning, and by either. For the two dermoscopic
rows the flagged share is the false rejection rate. Targets (issue 13): AUROC >= 0.95 for
natural images and synthetic junk, false rejection <= 5% on the HAM test and <= 15% on
the ISIC images. Prints a table, then the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ISIC = REPO.parent / "shared" / "data" / "isic2019" / "ISIC_2019_Training_Input"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--isic-dir", type=Path, default=DEFAULT_ISIC)
    parser.add_argument("--n", type=int, default=200, help="synthetic images per kind, and test images corrupted")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from melanoma.config import Settings
    from melanoma.data.archive import open_archive, read_rows
    from melanoma.data.outliers import KINDS, rejection_set
    from melanoma.data.quality import QualityLimits, quality_warnings, source_size
    from melanoma.modeling.predict import Predictor

    console = Console(width=160)
    predictor = Predictor.from_run(args.run)
    if predictor.ood_gate is None:
        raise SystemExit(f"{args.run} has no out-of-distribution gate: run `melanoma calibrate --run {args.run}`.")
    archive = open_archive(Path(predictor.run.meta["archive"]["path"]))
    limits = QualityLimits.from_settings(Settings(), predictor.image_size)
    test_rows = archive.indices("test")

    def evaluate(name: str, pixels: np.ndarray, sizes: list) -> dict:
        prediction = predictor.analyse_arrays(pixels)
        warned = np.array([bool(quality_warnings(size, image, limits)) for size, image in zip(sizes, pixels)])
        return {"name": name, "n": len(pixels), "ood": prediction.ood_score, "flagged": ~prediction.in_distribution,
                "msp": 1 - prediction.probabilities.max(axis=1), "warned": warned}

    with console.status("HAM test split ..."):
        ham = evaluate("HAM10000 test split (in distribution)", read_rows(archive.images, test_rows),
                       [None] * len(test_rows))
    rows = [ham]
    if args.isic_dir.is_dir():
        files = sorted(args.isic_dir.glob("*.jpg"))
        with console.status(f"{len(files):,} ISIC images ..."):
            pixels = np.stack([predictor.preprocess(path) for path in files])
            rows.append(evaluate("ISIC 2019 images (other clinics)", pixels,
                                 [source_size(path) for path in files]))
    else:
        console.print(f"[yellow]{args.isic_dir} not found: the ISIC row is left out.[/]")
    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(test_rows, size=min(args.n, len(test_rows)), replace=False)
    lesions = [cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB) for path in archive.manifest["path"].to_numpy()[chosen]]
    for kind in KINDS:
        with console.status(f"{kind} ..."):
            images = rejection_set(kind, n=args.n, seed=args.seed, lesions=lesions)
            rows.append(evaluate(kind, np.stack([predictor.preprocess(image) for image in images]),
                                 [(image.shape[1], image.shape[0]) for image in images]))

    def auroc(row: dict, key: str) -> float | None:
        if row is ham:
            return None
        labels = np.r_[np.zeros(ham["n"]), np.ones(row["n"])]
        return float(roc_auc_score(labels, np.r_[ham[key], row[key]]))

    meta = predictor.run.meta["ood"]
    table = Table(title=f"Out-of-distribution gate of {predictor.run.run_id} ({meta['method']}, k={meta.get('k')}, "
                        f"threshold {meta['threshold']:.4f} = {meta['flag_fraction']:.0%} of validation flagged)")
    for column in ("images", "n", "AUROC gate", "AUROC max-softmax", "flagged by gate", "quality warning", "either"):
        table.add_column(column, justify="left" if column == "images" else "right")
    results = []
    for row in rows:
        either = row["flagged"] | row["warned"]
        result = {"images": row["name"], "n": row["n"], "auroc_gate": auroc(row, "ood"), "auroc_msp": auroc(row, "msp"),
                  "flagged": float(row["flagged"].mean()), "warned": float(row["warned"].mean()),
                  "either": float(either.mean())}
        results.append(result)
        table.add_row(row["name"], f"{row['n']:,}", *("–" if result[k] is None else f"{result[k]:.3f}"
                                                        for k in ("auroc_gate", "auroc_msp")),
                      *(f"{result[k]:.1%}" for k in ("flagged", "warned", "either")))
    console.print(table)
    console.print("For the first two rows (dermoscopic images) 'flagged' is the false rejection rate. The HAM test "
                  "images are archive pixels, so their size checks do not apply.")
    print(json.dumps({"run": str(args.run), "threshold": meta["threshold"], "rows": results}))


if __name__ == "__main__":
    main()
