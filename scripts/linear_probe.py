"""How far do frozen ImageNet features carry across clinics? A linear probe per archive.

    python scripts/linear_probe.py data/multi128-xsite data/hamisic128 --size 224

For each archive, from the pooled features of the frozen ImageNet backbone (the archive's
images resized in the graph to --size):

- "train -> test": a class-balanced logistic regression fitted on the train split, scored
  on the test split (for a --test-where archive: a clinic the probe never saw);
- "within test (5-fold CV)": the same probe fitted and scored inside the test split, in
  5 lesion-grouped folds: what the features can do once that clinic is seen in training.

The gap between the two is the shift between clinics, measured without any fine-tuning.
Features are cached in --cache, one file per archive content (its images' sha256), backbone and size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.progress import track
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from melanoma.data.archive import Archive, open_archive
from melanoma.modeling.metrics import melanoma_index
from melanoma.modeling.pretrained import build_efficientnet_lite

BATCH = 128
FOLDS = 5


def features(archive: Archive, variant: str, size: int, weights_dir: Path, cache: Path) -> np.ndarray:
    """The backbone's pooled features of every image of ``archive`` (cached by the sha256 of
    its images, so that an archive prepared again another way is not served stale features)."""
    path = cache / f"{archive.header['sha256'][:16]}-{variant}-{size}.npy"
    if path.is_file():
        return np.load(path)
    import keras

    side = archive.images.shape[1]
    backbone = build_efficientnet_lite(variant, input_shape=(size, size, 3), include_top=False, weights="imagenet",
                                       weights_dir=weights_dir)
    inputs = keras.Input((side, side, 3))
    resized = keras.layers.Resizing(size, size)(inputs) if size != side else inputs
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(backbone(resized, training=False)))
    batches = range(0, len(archive.images), BATCH)
    pooled = np.concatenate([model.predict_on_batch(np.asarray(archive.images[start:start + BATCH], np.float32))
                             for start in track(batches, description=f"{archive.path.name} @ {size} px")])
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, pooled)
    return pooled


def probe(c: float) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight="balanced"))


def melanoma_auc(labels: np.ndarray, probabilities: np.ndarray, classes: np.ndarray, mel: int) -> float:
    return float(roc_auc_score(labels == mel, probabilities[:, list(classes).index(mel)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archives", nargs="+", type=Path)
    parser.add_argument("--variant", default="efficientnet-lite0")
    parser.add_argument("--size", type=int, default=224, help="Side the images are resized to for the backbone.")
    parser.add_argument("--c", type=float, default=0.01, help="Inverse L2 strength of the logistic regression.")
    parser.add_argument("--weights-dir", type=Path, default=Path("models/weights"))
    parser.add_argument("--cache", type=Path, default=Path("reports/probe-features"))
    args = parser.parse_args()

    print("| archive | backbone | train -> test melanoma AUC | within test (5-fold CV) melanoma AUC |\n|---|---|---|---|")
    for folder in args.archives:
        archive = open_archive(folder)
        mel = melanoma_index(archive.classes)
        pooled = features(archive, args.variant, args.size, args.weights_dir, args.cache)
        train, test = archive.indices("train"), archive.indices("test")
        fitted = probe(args.c).fit(pooled[train], archive.labels[train])
        across = melanoma_auc(archive.labels[test], fitted.predict_proba(pooled[test]), fitted.classes_, mel)
        groups = archive.manifest["group_id"].to_numpy()[test]
        within_probabilities = cross_val_predict(probe(args.c), pooled[test], archive.labels[test], groups=groups,
                                                 cv=GroupKFold(FOLDS), method="predict_proba")
        within = melanoma_auc(archive.labels[test], within_probabilities, np.unique(archive.labels[test]), mel)
        print(f"| `{folder}` | {args.variant} @ {args.size} px | {across:.3f} | {within:.3f} |")


if __name__ == "__main__":
    main()
