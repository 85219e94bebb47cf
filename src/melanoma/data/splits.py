"""Train/validation/test splits: stratified by class, grouped by lesion or patient.

Images of one lesion (HAM10000, ISIC 2019) or one patient (ISIC 2020) are near copies of
each other: if they fell on both sides of a split, the test score would measure memory,
not skill. So whole groups go to one split, and within that constraint each split gets
the class mix of the whole. Both functions are deterministic for a seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from melanoma.errors import DataError

SPLITS = ("train", "val", "test")


def grouped_split(labels, groups, *, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Assign each row to ``"train"``, ``"val"`` or ``"test"``.

    ``labels`` and ``groups`` are sequences of equal length; rows sharing a group always
    land in the same split, and each split gets close to the class mix of the whole.

    Groups are placed one by one, largest first (in a seeded random order among equal
    sizes), into the split whose share of the group's classes is furthest below its
    target, each class weighted by its rarity. This is what sklearn's
    StratifiedGroupKFold does for equal folds, for unequal fractions, and ~100x faster
    (10,015 HAM10000 rows: 0.1 s instead of 11 s).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"Split fractions val={val_fraction}, test={test_fraction} leave no training set.",
            hint="Each must be in [0, 1) and together below 1.",
        )
    group_index, group_of_row = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    class_index, class_of_row = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    counts = np.zeros((len(group_index), len(class_index)))
    np.add.at(counts, (group_of_row, class_of_row), 1)

    fractions = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    wanted = fractions[:, None] * counts.sum(axis=0)  # (split, class) target counts
    rarity = 1 / counts.sum(axis=0)
    placed = np.zeros_like(wanted)
    order = np.random.default_rng(seed).permutation(len(group_index))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    split_of_group = np.empty(len(group_index), dtype=int)
    for group in order:
        shortfall = ((wanted - placed) * rarity) @ counts[group]
        split_of_group[group] = int(np.argmax(np.where(fractions > 0, shortfall, -np.inf)))
        placed[split_of_group[group]] += counts[group]
    return np.array(SPLITS, dtype=object)[split_of_group[group_of_row]]


def split_by_condition(manifest: pd.DataFrame, test_where: str, *, val_fraction: float, seed: int) -> np.ndarray:
    """Rows where ``COLUMN=VALUE`` holds form the test split; the rest is split
    into train and validation, grouped and stratified.

    Used to measure generalisation to another clinic (e.g. ``dataset=rosendahl``). A group
    with any matching row goes wholly to test, so that no group crosses splits.
    """
    column, value = _parse_condition(test_where, manifest)
    matches = manifest[column].astype(str).str.strip() == value
    if not matches.any():
        present = ", ".join(sorted(manifest[column].dropna().astype(str).unique())[:20])
        raise DataError(f"No image has {column}={value}.", hint=f"Values of {column}: {present}.")
    in_test = manifest["group_id"].isin(manifest.loc[matches, "group_id"]).to_numpy()
    if in_test.all():
        raise DataError(f"Every image matches {test_where}: nothing is left to train on.",
                        hint="Choose a condition that selects only part of the data.")
    split = np.full(len(manifest), "test", dtype=object)
    rest = manifest.loc[~in_test]
    split[~in_test] = grouped_split(rest["label"], rest["group_id"], val_fraction=val_fraction,
                                    test_fraction=0.0, seed=seed)
    return split


def _parse_condition(test_where: str, manifest: pd.DataFrame) -> tuple[str, str]:
    column, sep, value = test_where.partition("=")
    column, value = column.strip(), value.strip()
    if not sep or not column or not value:
        raise DataError(f"--test-where {test_where!r} is not of the form COLUMN=VALUE.", hint="E.g. dataset=rosendahl.")
    if column not in manifest.columns:
        raise DataError(
            f"--test-where: the data set has no column {column!r}.",
            hint=f"Its columns are: {', '.join(manifest.columns)}.",
        )
    return column, value
