"""The Keras callbacks of a training run, in the order they act at an epoch's end:
validation metrics, the learning rate, the time limit, the progress report and the
checkpoints (see :mod:`.train` for how they are put together)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from melanoma.files import commit, write_json
from melanoma.modeling.metrics import normalised, validation_scores
from melanoma.modeling.runs import LAST_FILE, MODEL_FILE, RUN_FILE

MIN_LR_FRACTION = 0.02  # the cosine schedule ends at 2% of the starting rate, not zero


class ValidationMetrics(keras.callbacks.Callback):
    """Adds ``val_loss``, ``val_accuracy``, ``val_bma`` and ``val_mel_auc`` to the epoch logs.

    ``predict()`` gives the real model's (no augmentation) probabilities of the validation
    rows, once per epoch; later callbacks (checkpoints, early stopping, CSV history) read
    these values from the logs.
    """

    def __init__(self, predict: Callable[[], np.ndarray], labels: np.ndarray, mel_index: int | None):
        super().__init__()
        self.predict, self.labels, self.mel_index = predict, labels, mel_index

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        probabilities = normalised(self.predict())
        scores = validation_scores(self.labels, probabilities, self.mel_index)
        logs.update({f"val_{name}": value for name, value in scores.items()})


class CosineSchedule(keras.callbacks.Callback):
    """Cosine decay of the learning rate over the run's epochs or its time limit,
    whichever ends first (so that a time-limited run still ends at a small rate)."""

    def __init__(self, base_lr: float, first_epoch: int, epochs: int, clock: RunClock):
        super().__init__()
        self.base_lr, self.first_epoch, self.epochs, self.clock = base_lr, first_epoch, epochs, clock

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        progress = (epoch - self.first_epoch) / max(1, self.epochs - self.first_epoch)
        progress = min(1.0, max(progress, self.clock.fraction_used()))
        factor = MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
        self.model.optimizer.learning_rate = self.base_lr * factor

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


@dataclass
class RunClock:
    """Training time of the run across resumes, against an optional limit."""

    seconds_before: float
    limit_seconds: float | None
    started: float = 0.0

    def start(self) -> None:
        self.started = time.monotonic()

    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def fraction_used(self) -> float:
        return self.seconds() / self.limit_seconds if self.limit_seconds else 0.0

    def expired(self) -> bool:
        return self.limit_seconds is not None and self.seconds() >= self.limit_seconds


class TimeLimit(keras.callbacks.Callback):
    """Stops training once the run's time limit is spent (checked after every batch;
    the epoch in progress is then validated and checkpointed as usual)."""

    def __init__(self, clock: RunClock):
        super().__init__()
        self.clock = clock
        self.stopped = False

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.clock.expired():
            self.model.stop_training = True
            self.stopped = True


class EpochReport(keras.callbacks.Callback):
    """A rich progress bar per epoch, then one summary line; adds ``img_per_s`` to the logs."""

    def __init__(self, console: Console, total_epochs: int, batch_size: int, show: bool):
        super().__init__()
        self.console, self.total_epochs, self.batch_size, self.show = console, total_epochs, batch_size, show
        self.progress: Progress | None = None
        self.task = None
        self.images = 0
        self.started = self.first_batch_done = 0.0
        self.train_seconds = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.images, self.train_seconds, self.started = 0, 0.0, time.perf_counter()
        if self.show:
            self.progress = Progress(TextColumn(f"epoch {epoch + 1}/{self.total_epochs}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.params.get("steps"), loss="…")

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # Throughput from the end of the first batch: the first one includes graph tracing.
        if batch == 0:
            self.first_batch_done = time.perf_counter()
        else:
            self.images += self.batch_size
            self.train_seconds = time.perf_counter() - self.first_batch_done
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=f"{logs.get('loss', float('nan')):.3f}")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        logs["img_per_s"] = self.images / self.train_seconds if self.train_seconds else 0.0
        if self.show:
            self.console.print(
                f"epoch {epoch + 1}/{self.total_epochs}  loss {logs['loss']:.4f}  val loss {logs['val_loss']:.4f}  "
                f"val BMA {logs['val_bma']:.4f}  val melanoma AUC {logs['val_mel_auc']:.4f}  "
                f"lr {logs.get('lr', float('nan')):.2g}  {logs['img_per_s']:.0f} img/s  "
                f"({time.perf_counter() - self.started:.0f} s)", highlight=False)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.progress is not None:  # stopped mid-epoch (Ctrl-C)
            self.progress.stop()


class RunCheckpoint(keras.callbacks.Callback):
    """Saves ``model.keras`` when validation BMA improves, ``last.keras`` (with the
    optimizer, for ``--resume``) every epoch, and the run's state in ``run.json``.

    Keras' ModelCheckpoint writes in place; a crash during its save would leave a corrupt
    checkpoint, so this one writes a temporary file and renames it.
    """

    def __init__(self, run_dir: Path, classifier: keras.Model, meta: dict[str, Any], clock: RunClock):
        super().__init__()
        self.run_dir, self.classifier, self.meta, self.clock = run_dir, classifier, meta, clock

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        best = self.meta.get("best") or {}
        value = logs["val_bma"]
        if not best or (not math.isnan(value) and value > best["val_bma"]):
            save_model(self.classifier, self.run_dir / MODEL_FILE)
            self.meta["best"] = {"epoch": epoch + 1, "val_bma": value, "val_mel_auc": logs["val_mel_auc"]}
        save_model(self.model, self.run_dir / LAST_FILE)
        self.meta.update(epochs_done=epoch + 1, train_seconds=round(self.clock.seconds(), 1))
        write_json(self.run_dir / RUN_FILE, self.meta)


def save_model(model: keras.Model, path: Path) -> None:
    """``model.save`` to a temporary ``.keras`` file, then rename (atomic and durable)."""
    tmp = path.with_name(path.stem + ".partial.keras")
    model.save(tmp)
    commit(tmp, path)


class ConstantRate(keras.callbacks.Callback):
    """The head-only phase of fine-tuning: a constant learning rate (logged like the schedule's)."""

    def __init__(self, lr: float):
        super().__init__()
        self.lr = lr

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.model.optimizer.learning_rate = self.lr

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs["lr"] = self.lr
