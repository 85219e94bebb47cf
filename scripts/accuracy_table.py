"""Print the README's accuracy table (one Markdown row per evaluated run) from run folders.

    python scripts/accuracy_table.py models/a1-multi-crop models/a3-multi-crop-vig ...

Each row reads the run's own files (run.json, metrics.json from `melanoma evaluate`), so the
table can be rebuilt from the runs it describes; ensembles show their members' recipe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _interval(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _recipe(meta: dict[str, Any]) -> str:
    members = (meta.get("ensemble") or {}).get("members")
    if members:
        return f"ensemble of {', '.join(member['run_id'] for member in members)}"
    training = meta.get("training") or {}
    preprocess = meta.get("preprocess") or {}
    parts = [preprocess.get("resize_mode", "crop"), f"{meta.get('image_size', '?')} px"]
    if meta.get("model", "efficientnet-lite0") != "efficientnet-lite0":
        parts.insert(0, meta["model"])
    parts += [name for key, name in (("extra_augment", "extra augment"), ("vignette_augment", "vignette augment"))
              if training.get(key)]
    # Class weights (the default until class-source sampling replaced it) go unnamed, as in
    # the README rows made before; the README says so under the table.
    if training.get("class_balance", "weights") != "weights":
        parts.append(f"{training['class_balance']} balance")
    if "seed" in training:
        parts.append(f"seed {training['seed']}")
    return ", ".join(parts)


def table_row(run_dir: Path) -> str:
    meta = json.loads((run_dir / "run.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    versus_nevi = metrics.get("melanoma_vs_nevi") or {}
    excised = versus_nevi.get("histopathology") or {}
    nevi_kind = ""
    if excised.get("auc") is None:  # no dx_type for the ISIC Archive images: all their nevi
        excised, nevi_kind = versus_nevi.get("all") or {}, " (all nevi)"
    minutes = meta.get("train_seconds")
    cells = [
        f"`{run_dir.name}`" + (" (TTA)" if metrics.get("tta") else ""),
        _recipe(meta),
        f"{metrics['n_images']:,}",
        _interval(metrics["melanoma"]["auc"], metrics["ci"].get("melanoma_auc")),
        _interval(excised.get("auc"), excised.get("ci")) + nevi_kind,
        _interval(metrics["bma"], metrics["ci"].get("bma")),
        f"{metrics['ece']:.3f}",
        "–" if minutes is None else f"{minutes / 60:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="evaluated run folders")
    args = parser.parse_args()
    print("| run | recipe | test images | melanoma AUC [95% CI] | melanoma vs excised nevi AUC [95% CI] "
          "| BMA [95% CI] | ECE | train min |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in args.runs:
        print(table_row(run_dir))


if __name__ == "__main__":
    main()
