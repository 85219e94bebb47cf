"""Run directories: what `train` leaves behind and everything downstream reads."""

from __future__ import annotations

import json
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
