"""Run directories: what `train` leaves behind and everything downstream reads."""

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

RUN_FILE = "run.json"
MODEL_FILE = "model.keras"
LAST_FILE = "last.keras"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class RunInfo:
    path: Path
    meta: dict[str, Any]
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
    def temperature(self) -> float:
        """The temperature fitted on validation (``melanoma calibrate``); 1 where there is none."""
        return float((self.meta.get("calibration") or {}).get("temperature", 1.0))


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
    metrics = None
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except ValueError as exc:
            raise ModelError(f"{metrics_path} is corrupt: {exc}") from None
    return RunInfo(run_dir, meta, classes, image_size, params, model_path, metrics)


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
    if status != "running" or process.get("host") != socket.gethostname() or "pid" not in process:
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
        metrics = None
        if (child / METRICS_FILE).is_file():
            try:
                metrics = json.loads((child / METRICS_FILE).read_text())
            except ValueError as exc:
                row["problem"] = f"{child / METRICS_FILE} is corrupt: {exc}"
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
