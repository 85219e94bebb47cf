"""Run directories: what `train` leaves behind and everything downstream reads.

This module owns the run folder's contract (docs/architecture.md, "Run directories"): the
name of every file in it, the values of a run's status, and :class:`RunInfo`, the typed
view of a finished run that the other modules read instead of ``run.json``'s keys.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melanoma.data.preprocess import PreprocessParams
from melanoma.errors import ModelError
from melanoma.modeling.train_config import TrainConfig

# The files of a run folder
RUN_FILE = "run.json"  # the run's record (train, then calibrate and ensemble, update it)
MODEL_FILE = "model.keras"  # the best model by validation balanced accuracy
LAST_FILE = "last.keras"  # the last epoch's checkpoint, with the optimizer (--resume)
CONFIG_FILE = "config.json"  # the full effective settings
SPLIT_FILE = "split.csv"
HISTORY_FILE = "history.csv"
VERSIONS_FILE = "versions.json"
TENSORBOARD_DIR = "tensorboard"
OOD_FILE = "ood.npz"  # the out-of-distribution gate's reference features
METRICS_FILE = "metrics.json"  # written by evaluate
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
MODEL_CARD_FILE = "MODEL_CARD.md"
ONNX_FILE = "model.onnx"  # written by export

# What run.json says of the run (run_status adds FAILED; run_rows adds UNREADABLE)
RUNNING, INTERRUPTED, COMPLETE = "running", "interrupted", "complete"


def predictions_file(split: str) -> str:
    """The evaluated split's predictions, in the ISIC submission format."""
    return f"predictions_{split}.csv"


def ground_truth_file(split: str) -> str:
    """The evaluated split's labels, in the ISIC 2019 ground-truth format."""
    return f"ground_truth_{split}.csv"


@dataclass(frozen=True)
class RunInfo:
    """A finished run (one with a model), as :func:`read_run` reads it."""

    path: Path
    meta: dict[str, Any]  # run.json as written; prefer the typed attributes below
    classes: list[str]
    image_size: int
    preprocess: PreprocessParams
    model_path: Path
    metrics: dict[str, Any] | None

    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id", self.path.name))

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "unknown"))

    @property
    def model(self) -> str:
        """The architecture's name (``"ensemble"`` for an ensemble)."""
        return str(self.meta.get("model", "unknown"))

    @property
    def archive_path(self) -> Path:
        """The archive the run was trained on (:func:`recorded_archive`)."""
        return recorded_archive(self.meta, self.path)

    @property
    def archive_sha256(self) -> str | None:
        return (self.meta.get("archive") or {}).get("sha256")

    @property
    def best(self) -> dict[str, Any]:
        """``{"epoch", "val_bma", "val_mel_auc"}`` of the saved model; empty for an ensemble."""
        return self.meta.get("best") or {}

    @property
    def training(self) -> TrainConfig | None:
        """The options the run was trained with; None for an ensemble (its members have them)."""
        return recorded_training(self.meta, self.path) if "training" in self.meta else None

    @property
    def temperature(self) -> float:
        """The temperature fitted on validation (``melanoma calibrate``); 1 where there is none."""
        return float((self.meta.get("calibration") or {}).get("temperature", 1.0))

    @property
    def calibration(self) -> dict[str, Any] | None:
        """How the temperature was fitted (run.json "calibration"), where it was."""
        return self.meta.get("calibration")

    @property
    def ood(self) -> dict[str, Any] | None:
        """The out-of-distribution gate's parameters (run.json "ood"), where it was fitted."""
        return self.meta.get("ood")


def read_run_meta(run_dir: Path) -> dict[str, Any]:
    """The run's ``run.json`` (also of an unfinished run), with a clear error if absent or corrupt."""
    run_dir = Path(run_dir)
    meta_path = run_dir / RUN_FILE
    if not run_dir.is_dir():
        raise ModelError(f"Run folder {run_dir} does not exist.", hint="`melanoma runs` lists the runs.")
    if not meta_path.is_file():
        raise ModelError(f"{run_dir} is not a training run: {RUN_FILE} is missing.")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ModelError(f"{meta_path} is corrupt: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_path} is corrupt: not a JSON object.")
    return meta


def recorded_archive(meta: dict[str, Any], run_dir: Path) -> Path:
    """The archive a run was trained on, as its ``run.json`` records it."""
    try:
        return Path(meta["archive"]["path"])
    except (KeyError, TypeError):
        raise ModelError(f"{Path(run_dir) / RUN_FILE} does not record the archive the run was trained on "
                         "(no archive.path): it is damaged or from another version.",
                         hint="Name the archive with --archive.") from None


def recorded_training(meta: dict[str, Any], run_dir: Path) -> TrainConfig:
    """The options a run was trained with, as its ``run.json`` records them."""
    try:
        return TrainConfig.from_dict(meta["training"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{Path(run_dir) / RUN_FILE} lacks {exc} (damaged, or written by another version).") from None


def read_run(run_dir: Path) -> RunInfo:
    """Read a run folder, with a clear error if it is not a (finished) run."""
    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    meta_path = run_dir / RUN_FILE
    try:
        params = PreprocessParams.from_dict(meta["preprocess"])
        classes = list(meta["classes"])
        image_size = int(meta["image_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{meta_path} is corrupt or from another version: {exc}") from None
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise ModelError(
            f"{run_dir} has no {MODEL_FILE} (status: {meta.get('status', 'unknown')}).",
            hint="Train it to the end, or resume it with `melanoma train --resume --run-dir ...`.",
        )
    return RunInfo(run_dir, meta, classes, image_size, params, model_path, read_metrics(run_dir))


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``metrics.json`` (None before ``evaluate``), with a clear error if corrupt."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path} is corrupt: {exc}") from None


def list_runs(runs_dir: Path) -> list[RunInfo]:
    """All readable runs under ``runs_dir``, oldest first; unreadable folders are skipped."""
    runs = []
    for child in sorted(Path(runs_dir).glob("*/")):
        if (child / RUN_FILE).is_file():
            try:
                runs.append(read_run(child))
            except ModelError:
                continue
    return runs


# --------------------------------------------------------------------------- listing
FAILED = "failed"  # run.json says "running", but the process that trained it is gone
UNREADABLE = "unreadable"
RUN_LIST_COLUMNS = ("run", "status", "model", "image_size", "epochs", "best_val_bma", "evaluated", "bma",
                    "melanoma_auc", "ece", "path", "problem")


def training_process() -> dict[str, Any]:
    """Who is training a run (recorded in run.json), so that a listing can tell a run in
    progress from one whose process died."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def run_status(meta: dict[str, Any]) -> str:
    """The run's status, with "running" checked against its training process: ``failed``
    when that process is gone on this host (a crash, a kill, a reboot)."""
    status = str(meta.get("status", "unknown"))
    process = meta.get("process") or {}
    if status != RUNNING or process.get("host") != socket.gethostname() or "pid" not in process:
        return status
    try:
        os.kill(int(process["pid"]), 0)
    except ProcessLookupError:
        return FAILED
    except PermissionError:  # alive, owned by someone else
        return status
    return status


def run_rows(runs_dir: Path) -> list[dict[str, Any]]:
    """One row per run folder under ``runs_dir`` (every folder with a run.json, finished or
    not, readable or not), oldest first, with the columns of :data:`RUN_LIST_COLUMNS`."""
    rows = []
    for child in sorted(Path(runs_dir).glob("*/")):
        if not (child / RUN_FILE).is_file():
            continue
        row: dict[str, Any] = dict.fromkeys(RUN_LIST_COLUMNS)
        row.update(run=child.name, path=str(child))
        try:
            meta = read_run_meta(child)
        except ModelError as exc:
            rows.append({**row, "status": UNREADABLE, "problem": str(exc)})
            continue
        try:
            metrics = read_metrics(child)
        except ModelError as exc:
            metrics, row["problem"] = None, str(exc)
        best = meta.get("best") or {}
        metrics = metrics or {}
        row.update(run=str(meta.get("run_id", child.name)), status=run_status(meta), model=meta.get("model"),
                   image_size=meta.get("image_size"), epochs=meta.get("epochs_done"), best_val_bma=best.get("val_bma"),
                   evaluated=metrics.get("split"), bma=metrics.get("bma"),
                   melanoma_auc=(metrics.get("melanoma") or {}).get("auc"), ece=metrics.get("ece"))
        if not (child / MODEL_FILE).is_file() and not row["problem"]:
            row["problem"] = f"no {MODEL_FILE} yet"
        rows.append(row)
    return rows


def run_rows_text(rows: list[dict[str, Any]], fmt: str) -> str:
    """``rows`` of :func:`run_rows` as ``"csv"`` or ``"json"`` text."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    import pandas as pd

    return pd.DataFrame(rows, columns=list(RUN_LIST_COLUMNS)).to_csv(index=False)


# --------------------------------------------------------------------------- examples
# The demo copies a few held-out images here, which the playground offers.
EXAMPLES_DIR = "examples"
EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_examples(run_dir: Path | None) -> list[Path]:
    """Example images for the UI: the run folder's ``examples/`` images, if any."""
    folder = None if run_dir is None else Path(run_dir) / EXAMPLES_DIR
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES)


def add_examples(run_dir: Path, manifest: Any, *, split: str = "test", max_images: int = 4) -> list[Path]:
    """Copy one held-out source image per class (up to ``max_images``) into the run's
    ``examples/`` folder, so that the playground offers real images the model never saw."""
    folder = Path(run_dir) / EXAMPLES_DIR
    folder.mkdir(exist_ok=True)
    held_out = manifest[manifest["split"] == split]
    copied = []
    for _, row in held_out.groupby("label", sort=True).head(1).head(max_images).iterrows():
        source = Path(row["path"])
        target = folder / f"{row['label']}-{source.name}"
        shutil.copyfile(source, target)
        copied.append(target)
    return copied
