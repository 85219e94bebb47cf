"""Compare runs on the same test images: paired differences with lesion-bootstrap intervals,
and the spread over seeds.

Two runs evaluated on the same images are compared image by image: every bootstrap
resample draws whole lesions, and the same resample scores every run, so the interval of a
difference reflects how the runs differ on the same lesions, not the much larger spread of
each run's own figure over test sets. A difference whose interval excludes 0 is one the
test set can resolve; one seed still cannot say whether it survives another seed, which is
what the seed summary (mean and sd over runs that differ only by their seed) shows.

Everything comes from what ``melanoma evaluate`` left in the run folders
(``predictions_<split>.csv``) and the labels and lesion groups of the runs' archive
manifests: no model is loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from melanoma.data.sources import image_sources
from melanoma.errors import DataError, MelanomaError, ModelError
from melanoma.files import write_json
from melanoma.modeling.isic import isic_columns
from melanoma.modeling.metrics import (
    CI_LEVEL,
    class_recalls,
    excised_nevi,
    lesion_resamples,
    melanoma_index,
    normalised,
    one_vs_rest_auc,
    percentile_interval,
    within_source_auc,
)
from melanoma.modeling.runs import RunInfo, predictions_file, read_run
from melanoma.modeling.train_config import ADDED_LATER

if TYPE_CHECKING:
    from rich.table import Table

# The compared figures, in table order, with their names for people.
METRICS = {"melanoma_auc": "melanoma ROC AUC", "melanoma_auc_within_sources": "melanoma AUC within sources",
           "melanoma_vs_excised_nevi_auc": "melanoma vs excised nevi AUC",
           "bma": "BMA", "bma_common": "BMA (classes with ≥ {n} images)"}
OUT_FORMATS = (".json", ".md")


@dataclass(frozen=True)
class EvaluatedRun:
    """A run's predictions on one split, with the truth, aligned by sorted image id."""

    run: RunInfo
    split: str
    image_ids: np.ndarray      # sorted
    probabilities: np.ndarray  # (N, C), rows in image_ids order
    labels: np.ndarray         # class index per image
    groups: np.ndarray         # lesion (or patient, or image) id per image
    excised_nevi: np.ndarray | None  # nevi confirmed by histopathology (None: the archive has no dx_type)
    sources: np.ndarray | None  # each image's source (None: the archive names none)
    tta: bool | None           # from metrics.json where it describes this split

    @property
    def seed(self) -> int | None:
        return (self.run.meta.get("training") or {}).get("seed")


def load_evaluated(run_dir: Path, split: str = "test", archive_dir: Path | None = None) -> EvaluatedRun:
    """A run's ``predictions_<split>.csv`` with the labels and groups of its archive
    (``archive_dir``, by default the one in its ``run.json``)."""
    from melanoma.data.archive import open_archive

    run = read_run(run_dir)
    path = run.path / predictions_file(split)
    if not path.is_file():
        raise ModelError(f"{run.path} has no {path.name}: it has not been evaluated on the {split} split.",
                         hint=f"Run `melanoma evaluate --run {run.path} --split {split}` first.")
    archive = open_archive(archive_dir or run.archive_path)
    table = _read_predictions(path, run.classes)
    manifest = archive.manifest.assign(label_index=archive.labels).set_index("image_id")
    unknown = table.index.difference(manifest.index)
    if len(unknown):
        raise DataError(f"{path}: {len(unknown)} image id(s) are not in the archive {archive.path} "
                        f"(e.g. {', '.join(unknown[:3])}).", hint="Pass the run's own archive with --archive.")
    rows = manifest.loc[table.index]
    labels = rows["label_index"].to_numpy(int)
    dx_type = rows["dx_type"].to_numpy() if "dx_type" in rows.columns else None
    named = image_sources(rows)
    metrics = run.metrics or {}
    return EvaluatedRun(run, split, table.index.to_numpy(), normalised(table.to_numpy()), labels,
                        rows["group_id"].astype(str).to_numpy(), excised_nevi(labels, run.classes, dx_type),
                        None if named is None else named[1].to_numpy(),
                        bool(metrics.get("tta")) if metrics.get("split") == split else None)


def _read_predictions(path: Path, classes: list[str]) -> pd.DataFrame:
    """The probability of each class (columns in ``classes`` order) by image id, sorted."""
    columns = isic_columns(classes) or list(classes)
    try:
        table = pd.read_csv(path, dtype={"image": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path} cannot be read: {exc}") from None
    missing = [column for column in ["image", *columns] if column not in table.columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {', '.join(missing)} of the run's classes {classes}.",
                        hint="Evaluate the run again to rewrite it.")
    values = table[columns].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if table["image"].duplicated().any() or not np.isfinite(values).all() or (values < 0).any() or \
            (values.sum(axis=1) <= 0).any():
        raise DataError(f"{path} is damaged: duplicate image ids, or probabilities that are missing or not >= 0.",
                        hint="Evaluate the run again to rewrite it.")
    return pd.DataFrame(values, index=pd.Index(table["image"], name="image_id")).sort_index()


def check_same_images(runs: list[EvaluatedRun]) -> None:
    """Paired comparison needs the same images, classes and labels in every run."""
    first = runs[0]
    for other in runs[1:]:
        if other.run.classes != first.run.classes:
            raise ModelError(f"{other.run.path} has classes {other.run.classes}, {first.run.path} has "
                             f"{first.run.classes}: only runs with the same classes can be compared.")
        if not np.array_equal(other.image_ids, first.image_ids):
            only_first = np.setdiff1d(first.image_ids, other.image_ids)
            only_other = np.setdiff1d(other.image_ids, first.image_ids)
            example = [*only_first[:2], *only_other[:2]]
            raise ModelError(
                f"{other.run.path} and {first.run.path} were not evaluated on the same {first.split} images: "
                f"{len(other.image_ids):,} and {len(first.image_ids):,} images, {len(only_first):,} only in the "
                f"second and {len(only_other):,} only in the first (e.g. {', '.join(example)}).",
                hint="Compare runs of the same split of the same data (archives prepared with the same "
                     "seed, fractions and --test-where).")
        if not np.array_equal(other.labels, first.labels):
            changed = first.image_ids[other.labels != first.labels]
            raise ModelError(f"The archives of {other.run.path} and {first.run.path} label {len(changed):,} of the "
                             f"same images differently (e.g. {', '.join(changed[:3])}).")


def run_scores(labels: np.ndarray, probabilities: np.ndarray, mel_index: int | None, weight: np.ndarray,
               common: np.ndarray, excised: np.ndarray | None = None, sources: np.ndarray | None = None,
               ) -> dict[str, float]:
    """Melanoma AUC, the same within ``sources`` (NaN unless two or more hold melanomas and
    other lesions), melanoma vs the ``excised`` nevi AUC (NaN without them), BMA and the BMA
    over the ``common`` classes (a boolean per class), with images counted ``weight`` times (a
    bootstrap resample; 0 leaves an image out)."""
    recalls = class_recalls(labels, probabilities.argmax(axis=1), len(common), weight)
    kept = weight > 0
    versus = kept & ((labels == mel_index) | excised) if mel_index is not None and excised is not None else None
    return {
        "melanoma_auc": math.nan if mel_index is None else one_vs_rest_auc(
            labels[kept] == mel_index, probabilities[kept, mel_index], weight[kept]),
        "melanoma_auc_within_sources": math.nan if mel_index is None or sources is None else within_source_auc(
            labels[kept] == mel_index, probabilities[kept, mel_index], sources[kept], weight[kept]),
        "melanoma_vs_excised_nevi_auc": math.nan if versus is None else one_vs_rest_auc(
            labels[versus] == mel_index, probabilities[versus, mel_index], weight[versus]),
        "bma": _mean_present(recalls),
        "bma_common": _mean_present(recalls[common]),
    }


def _mean_present(recalls: np.ndarray) -> float:
    """The mean recall of the classes present (NaN where none is)."""
    present = recalls[~np.isnan(recalls)]
    return float(present.mean()) if len(present) else math.nan


def compare_runs(runs: list[EvaluatedRun], *, samples: int, seed: int, min_class_images: int,
                 level: float = CI_LEVEL) -> dict[str, Any]:
    """Each run's figures, their paired differences from the first run with lesion-bootstrap
    intervals (``samples`` resamples, the same ones for every run), and the mean and sd over
    seeds of every set of runs that differ only by their seed."""
    if len(runs) < 2:
        raise MelanomaError("Compare needs at least two runs.")
    check_same_images(runs)
    first = runs[0]
    classes = first.run.classes
    labels = first.labels
    support = np.bincount(labels, minlength=len(classes))
    common = support >= min_class_images
    mel_index = melanoma_index(classes)
    excised, sources = first.excised_nevi, first.sources

    point = [run_scores(labels, run.probabilities, mel_index, np.ones(len(labels)), common, excised, sources)
             for run in runs]
    resampled: list[list[dict[str, float]]] = [[] for _ in runs]
    for weight in lesion_resamples(first.groups, samples, seed):
        for index, run in enumerate(runs):
            resampled[index].append(run_scores(labels, run.probabilities, mel_index, weight, common, excised, sources))

    rows = []
    for index, run in enumerate(runs):
        row: dict[str, Any] = {"run": str(run.run.path), "run_id": run.run.run_id, "model": run.run.meta.get("model"),
                               "seed": run.seed, "tta": run.tta}
        for metric in METRICS:
            row[metric] = {"value": _finite(point[index][metric]),
                           "ci": percentile_interval([r[metric] for r in resampled[index]], level)}
        if index:
            row["difference"] = {metric: {
                "value": _finite(point[index][metric] - point[0][metric]),
                "ci": percentile_interval([r[metric] - r0[metric] for r, r0 in zip(resampled[index], resampled[0])],
                                          level),
            } for metric in METRICS}
        rows.append(row)
    return {
        "split": first.split,
        "n_images": len(labels),
        "n_lesions": len(np.unique(first.groups)),
        "class_counts": dict(zip(classes, support.tolist())),
        "min_class_images": min_class_images,
        "common_classes": [name for name, kept in zip(classes, common) if kept],
        "bootstrap": {"samples": samples, "seed": seed, "level": level,
                      "resampled": "lesion groups; the same resamples for every run (paired)"},
        "baseline": rows[0]["run_id"],
        "runs": rows,
        "seed_groups": seed_groups(runs, point),
    }


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def recipe(run: EvaluatedRun) -> str | None:
    """What a run was trained and evaluated with, apart from its seed (None: not a trained run)."""
    meta = run.run.meta
    training = meta.get("training")
    if not isinstance(training, dict) or "seed" not in training:
        return None
    # Runs recorded before an option existed did without it: the same recipe as saying so.
    options = {**ADDED_LATER, **training}
    return json.dumps({"training": {k: v for k, v in options.items() if k != "seed"},
                       "archive": (meta.get("archive") or {}).get("sha256"), "image_size": meta.get("image_size"),
                       "preprocess": meta.get("preprocess"), "classes": meta.get("classes"), "tta": run.tta},
                      sort_keys=True, default=str)


def seed_groups(runs: list[EvaluatedRun], point: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Mean and sd (n - 1) of each figure over every set of two or more runs with the same
    recipe and different seeds."""
    by_recipe: dict[str, list[int]] = {}
    for index, run in enumerate(runs):
        key = recipe(run)
        if key is not None:
            by_recipe.setdefault(key, []).append(index)
    groups = []
    for members in by_recipe.values():
        seeds = [runs[i].seed for i in members]
        if len(members) < 2 or len(set(seeds)) < len(seeds):
            continue
        group: dict[str, Any] = {"runs": [runs[i].run.run_id for i in members], "seeds": seeds, "n": len(members)}
        for metric in METRICS:
            values = np.array([point[i][metric] for i in members])
            group[metric] = {"mean": _finite(float(values.mean())), "sd": _finite(float(values.std(ddof=1)))}
        groups.append(group)
    return groups


# --------------------------------------------------------------------------- output
def metric_names(result: dict[str, Any]) -> dict[str, str]:
    return {metric: name.format(n=result["min_class_images"]) for metric, name in METRICS.items()}


def _fmt(value: float | None, signed: bool = False) -> str:
    return "–" if value is None else f"{value:+.3f}" if signed else f"{value:.3f}"


def _fmt_estimate(estimate: dict[str, Any], signed: bool = False) -> str:
    ci = estimate["ci"]
    interval = "" if not ci else f" [{_fmt(ci[0], signed)}, {_fmt(ci[1], signed)}]"
    return _fmt(estimate["value"], signed) + interval


def _run_cells(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison table: each run's figures and its difference from the first."""
    header = ["run", "seed"]
    for name in metric_names(result).values():
        header += [name, f"Δ {name} [95% CI]"]
    cells = []
    for row in result["runs"]:
        line = [row["run_id"] + (" (TTA)" if row["tta"] else ""), "–" if row["seed"] is None else str(row["seed"])]
        for metric in METRICS:
            line.append(_fmt(row[metric]["value"]))
            line.append(_fmt_estimate(row["difference"][metric], signed=True) if "difference" in row else "baseline")
        cells.append(line)
    return header, cells


def _seed_cells(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["runs", "seeds", *metric_names(result).values()]
    cells = [[", ".join(group["runs"]), ", ".join(map(str, group["seeds"])),
              *(f"{_fmt(group[m]['mean'])} ± {_fmt(group[m]['sd'])}" for m in METRICS)]
             for group in result["seed_groups"]]
    return header, cells


def _caption(result: dict[str, Any]) -> str:
    counted = ", ".join(result["common_classes"]) or "none"
    return (f"{result['n_images']:,} {result['split']} images of {result['n_lesions']:,} lesions; differences from "
            f"{result['baseline']}, paired, 95% intervals from {result['bootstrap']['samples']:,} bootstrap resamples "
            f"of lesions (seed {result['bootstrap']['seed']}). Classes with ≥ {result['min_class_images']} images: "
            f"{counted}.")


def comparison_tables(result: dict[str, Any]) -> list[Table]:
    """The comparison (and the seed summary, where there is one) as Rich tables."""
    from rich.table import Table

    tables = []
    for title, (header, cells) in (("Paired comparison", _run_cells(result)),
                                   ("Over seeds (mean ± sd)", _seed_cells(result))):
        if not cells:
            continue
        table = Table(title=title, caption=_caption(result) if not tables else None)
        for index, column in enumerate(header):
            table.add_column(column, justify="left" if index == 0 else "right")
        for line in cells:
            table.add_row(*line)
        tables.append(table)
    return tables


def comparison_markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown section."""
    lines = ["# Paired comparison of runs", "", _caption(result), ""]
    for title, (header, cells) in (("Runs", _run_cells(result)), ("Over seeds (mean ± sd)", _seed_cells(result))):
        if not cells:
            continue
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(line) + " |" for line in cells]
        lines.append("")
    lines += ["Runs:", ""] + [f"- `{row['run_id']}`: {row['run']}" for row in result["runs"]] + [""]
    return "\n".join(lines)


def check_out_file(path: Path) -> None:
    """A clear error, before any work, where the comparison cannot be written to ``path``."""
    if path.suffix not in OUT_FORMATS:
        raise MelanomaError(f"Cannot write the comparison to {path}: use a {' or '.join(OUT_FORMATS)} file.")
    if not path.parent.is_dir():
        raise MelanomaError(f"Cannot write {path}: the folder {path.parent} does not exist.")


def write_comparison(result: dict[str, Any], path: Path) -> Path:
    """Write the comparison as JSON or Markdown, by the suffix of ``path``, atomically."""
    from melanoma.files import write_text

    path = Path(path)
    check_out_file(path)
    if path.suffix == ".json":
        write_json(path, result)
        return path
    return write_text(path, comparison_markdown(result))
