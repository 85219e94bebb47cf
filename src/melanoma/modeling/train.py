"""Training: feed batches from the memory-mapped archive, fit, checkpoint, resume.

One call of :func:`train` makes (or, with ``resume``, continues) one run directory (layout
in docs/architecture.md). The pieces, in the order of an epoch:

- :class:`.feed.ArchiveFeed` gathers each batch's uint8 rows from the memory-mapped archive and
  casts only that batch to float32, so memory stays flat whatever the archive's size.
  Class imbalance is handled by sampling (by default each class equally often and, within a
  class, each source equally often), or by class weights (inverse frequency) in the loss.
- Augmentation (flips, rotation, zoom, brightness, contrast) runs inside the compiled
  training step, in a ``trainer`` model that wraps the real model; ``model.keras`` holds the
  real model only, so serving and ONNX export see no augmentation layers.
- Each epoch ends with: validation metrics (balanced accuracy and melanoma AUC, with
  scikit-learn), the CSV history row, the best model by validation balanced accuracy
  (``model.keras``), the last checkpoint with its optimizer state (``last.keras``) and
  ``run.json``; then early stopping and the time limit decide whether to go on.
- Pretrained backbones are fine-tuned in two phases: ``freeze_epochs`` epochs train the
  new head with the backbone frozen, then the backbone is unfrozen (its BatchNormalization
  layers stay frozen and in inference mode) at a tenth of the learning rate.
- The learning rate follows a cosine decay over the run; with a time limit, over whichever
  of the epochs or the time runs out first.
- At the end of a completed run, :func:`melanoma.modeling.reliability.fit_reliability`
  fits the temperature (calibration) and the out-of-distribution gate of ``model.keras``.
- ``--resume`` loads ``last.keras`` (weights and optimizer state) and continues the epoch
  count, the CSV history and the time budget; early stopping's patience restarts from the
  resumed epoch.

Determinism: :func:`train` seeds Python, NumPy and the backend
(``keras.utils.set_random_seed``) and asks TensorFlow for deterministic ops. The batch
order depends only on (seed, epoch), and augmentation draws come from seeded layers, so
on the same machine, library versions and thread count, a run repeats exactly. Not
deterministic: results across machines or CPU types (oneDNN picks kernels by CPU), across
thread counts, and a resumed run compared with an uninterrupted one (the augmentation
generators restart from the saved state, and a Ctrl-C mid-epoch repeats that epoch from
the weights it had reached).
"""

from __future__ import annotations

import csv
import platform
import time
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import keras
import numpy as np
from rich.console import Console

from melanoma.config import DEFAULT_OOD_FLAG_FRACTION
from melanoma.data.archive import Archive
from melanoma.errors import ModelError
from melanoma.files import utc_now, write_json, write_text
from melanoma.modeling.augment import augmentation
from melanoma.modeling.callbacks import (
    ConstantRate,
    CosineSchedule,
    EpochReport,
    RunCheckpoint,
    RunClock,
    TimeLimit,
    ValidationMetrics,
    save_model,
)
from melanoma.modeling.cards import write_model_card
from melanoma.modeling.distribute import (
    Parallel,
    ReplicatedPredict,
    engine_info,
    use_xla,
)
from melanoma.modeling.feed import ArchiveFeed
from melanoma.modeling.metrics import melanoma_index
from melanoma.modeling.models import BACKBONE_LAYER, build_model, freeze_batchnorm
from melanoma.modeling.runs import (
    COMPLETE,
    CONFIG_FILE,
    HISTORY_FILE,
    INTERRUPTED,
    LAST_FILE,
    RUN_FILE,
    RUNNING,
    SPLIT_FILE,
    TENSORBOARD_DIR,
    VERSIONS_FILE,
    read_run_meta,
    recorded_training,
    training_process,
)
from melanoma.modeling.train_config import TrainConfig
from melanoma.provenance import git_state

FINE_TUNE_LR_FACTOR = 0.1
VERSIONED_PACKAGES = ("numpy", "keras", "tensorflow-cpu", "tensorflow", "scikit-learn", "pandas", "opencv-python-headless")


@dataclass(frozen=True)
class TrainResult:
    """What a call of :func:`train` did."""

    run_dir: Path
    status: str  # "complete" or "interrupted"
    epochs_done: int
    best_epoch: int | None
    best_val_bma: float | None
    stopped_by: str  # "epochs", "early_stopping", "time_limit" or "interrupt"
    seconds: float  # training time of this call


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse class frequency, scaled so that the average weight of a sample is 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return {index: float(weight) for index, weight in enumerate(weights)}


# --------------------------------------------------------------------------- train


def train(
    archive: Archive,
    run_dir: Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    weights_dir: Path | None = None,
    settings_dump: dict[str, Any] | None = None,
    progress: bool = True,
    console: Console | None = None,
    ood_flag_fraction: float = DEFAULT_OOD_FLAG_FRACTION,
    parallel: Parallel | None = None,
) -> TrainResult:
    """Train a new run with ``config`` on ``archive``'s train split, validating on its val
    split; or, with ``resume`` (and no ``config``), continue the unfinished run in ``run_dir``
    from its last checkpoint with the options it recorded.

    ``run_dir`` must be new (or empty), unless ``resume``: then it must hold an unfinished
    run of the same archive. Pretrained backbones train in phases (:func:`_phases`). Ctrl-C
    (KeyboardInterrupt) saves ``last.keras``, marks the run "interrupted" and returns
    (status "interrupted"). A completed run then gets its temperature and
    out-of-distribution gate (``ood_flag_fraction`` of the validation images flagged).
    ``parallel`` (from :func:`~melanoma.modeling.distribute.start_data_parallel`) trains
    data-parallel: the batch size is then the global batch, and this process feeds its shard.
    """
    if resume == (config is not None):
        raise ValueError("train() takes the config of a new run, or resume=True (the run's recorded config)")
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    train_rows, val_rows = archive.indices("train"), archive.indices("val")
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ModelError(f"The archive {archive.path} needs images in both its train and val splits "
                         f"(it has {len(train_rows)} and {len(val_rows)}).")
    _deterministic_ops()
    run = (resume_run(run_dir, archive, parallel) if resume else
           start_run(run_dir, archive, config, weights_dir=weights_dir, settings_dump=settings_dump or {},
                     parallel=parallel))
    clock = RunClock(float(run.meta.get("train_seconds", 0.0)),
                     run.config.time_limit_minutes * 60 if run.config.time_limit_minutes else None)
    clock.start()
    feed = training_feed(run, archive, parallel)
    callbacks = assemble_callbacks(run, archive, clock, console=console, progress=progress, parallel=parallel)
    started = time.monotonic()
    try:
        stopped_by = run_phases(run, archive, feed, callbacks, clock)
    except KeyboardInterrupt:
        save_model(run.trainer, run_dir / LAST_FILE)
        run.meta.update(status=INTERRUPTED, train_seconds=round(clock.seconds(), 1))
        write_json(run_dir / RUN_FILE, run.meta)
        write_model_card(run_dir, archive.header)
        return _result(run_dir, run.meta, "interrupt", time.monotonic() - started)
    run.meta.update(status=COMPLETE, stopped_by=stopped_by, finished=utc_now())
    write_json(run_dir / RUN_FILE, run.meta)
    from melanoma.modeling.reliability import (
        fit_reliability,  # it reads the finished model.keras
    )

    if progress:
        console.print("Fitting the temperature and the out-of-distribution gate ...")
    fit_reliability(run_dir, archive, flag_fraction=ood_flag_fraction)
    write_model_card(run_dir, archive.header)
    return _result(run_dir, run.meta, stopped_by, time.monotonic() - started)


@dataclass
class PreparedRun:
    """A run folder ready to train: its record, its options, the model and where it stands."""

    run_dir: Path
    meta: dict[str, Any]  # run.json, updated as training goes on
    config: TrainConfig
    trainer: keras.Model  # augmentation (if any), then the classifier
    first_epoch: int  # epochs already done
    resumed: bool

    @property
    def classifier(self) -> keras.Model:
        return self.trainer.layers[-1]


def start_run(run_dir: Path, archive: Archive, config: TrainConfig, *, weights_dir: Path | None,
              settings_dump: dict[str, Any], parallel: Parallel | None) -> PreparedRun:
    """Build the model and make the run folder of a new run."""
    if parallel is not None:
        parallel.check_batch(config.batch_size)
    _check_new_run_dir(run_dir)
    keras.utils.set_random_seed(config.seed)  # before building: the initial weights depend on it
    # Built before the run folder exists, so that a bad model name or weights file leaves nothing behind.
    classifier = build_model(config.model, num_classes=len(archive.classes), image_size=archive.images.shape[1],
                             weights=config.weights, weights_dir=weights_dir)
    trainer = training_model(classifier, config.augment, config.seed, extra=config.extra_augment,
                             vignette=config.vignette_augment)
    meta = _write_new_run(run_dir, archive, config, settings_dump, engine_info(parallel))
    return PreparedRun(run_dir, meta, config, trainer, 0, resumed=False)


def resume_run(run_dir: Path, archive: Archive, parallel: Parallel | None) -> PreparedRun:
    """Load the unfinished run in ``run_dir`` from its last checkpoint, with its recorded options."""
    meta = _meta_to_resume(run_dir, archive)
    config = recorded_training(meta, run_dir)
    if parallel is not None:
        parallel.check_batch(config.batch_size)
    keras.utils.set_random_seed(config.seed)
    trainer = _load_trainer(run_dir / LAST_FILE)
    trim_history(run_dir / HISTORY_FILE, int(meta["epochs_done"]))
    meta.update(status=RUNNING, process=training_process(), engine=engine_info(parallel))
    write_json(run_dir / RUN_FILE, meta)
    return PreparedRun(run_dir, meta, config, trainer, int(meta["epochs_done"]), resumed=True)


def training_feed(run: PreparedRun, archive: Archive, parallel: Parallel | None) -> ArchiveFeed:
    """The training batches (this process's shard of them), from the run's next epoch on."""
    config, rows = run.config, archive.indices("train")
    return ArchiveFeed(archive.images, archive.labels, rows, batch_size=config.batch_size, shuffle=True,
                       seed=config.seed, first_epoch=run.first_epoch, shard=parallel.shard if parallel else None,
                       row_probabilities=sampling_probabilities(config.class_balance, archive.labels[rows],
                                                                archive.manifest.iloc[rows].get("source")))


@dataclass
class Callbacks:
    """The callbacks of a run's phases."""

    every_phase: list[keras.callbacks.Callback]  # validation, report, history, checkpoints, time limit
    early_stopping: keras.callbacks.EarlyStopping  # phases that fine-tune the whole network
    time_limit: TimeLimit


def assemble_callbacks(run: PreparedRun, archive: Archive, clock: RunClock, *, console: Console, progress: bool,
                       parallel: Parallel | None) -> Callbacks:
    """Validation metrics, progress, CSV history, checkpoints and the time limit (in the
    order they must see each epoch's logs), TensorBoard if asked, and early stopping."""
    config, val_rows = run.config, archive.indices("val")
    val_batch = max(64, config.batch_size)
    val_feed = ArchiveFeed(archive.images, archive.labels, val_rows, shard=parallel.shard if parallel else None,
                           batch_size=val_batch if parallel is None else parallel.round_up(val_batch))
    predict_val = (partial(run.classifier.predict, val_feed, verbose=0) if parallel is None
                   else partial(ReplicatedPredict(run.classifier), val_feed, len(val_rows)))
    time_limit = TimeLimit(clock)
    every_phase = [
        ValidationMetrics(predict_val, archive.labels[val_rows], melanoma_index(archive.classes)),
        EpochReport(console, config.epochs, config.batch_size, progress),
        keras.callbacks.CSVLogger(str(run.run_dir / HISTORY_FILE), append=True),
        RunCheckpoint(run.run_dir, run.classifier, run.meta, clock),
        time_limit,
    ]
    if config.tensorboard:
        every_phase.append(keras.callbacks.TensorBoard(log_dir=str(run.run_dir / TENSORBOARD_DIR)))
    early_stopping = keras.callbacks.EarlyStopping(monitor="val_bma", mode="max", patience=config.early_stopping_patience)
    return Callbacks(every_phase, early_stopping, time_limit)


def run_phases(run: PreparedRun, archive: Archive, feed: ArchiveFeed, callbacks: Callbacks, clock: RunClock) -> str:
    """Fit the phases that have epochs left on ``feed``; return what stopped training:
    "epochs", "early_stopping" or "time_limit" (KeyboardInterrupt passes through)."""
    config = run.config
    class_weight = (class_weights(archive.labels[archive.indices("train")], len(archive.classes))
                    if config.class_balance == "weights" else None)
    for phase in _phases(config, run.first_epoch):
        # A run resumed in the middle of a phase continues with the optimizer it saved.
        if not (run.resumed and phase.start < run.first_epoch):
            if phase.backbone_trainable is not None:
                set_backbone_trainable(run.classifier, phase.backbone_trainable)
            compile_for_training(run.trainer, phase.learning_rate)
        head_only = phase.backbone_trainable is False
        schedule = ConstantRate(phase.learning_rate) if head_only else CosineSchedule(
            phase.learning_rate, phase.start, phase.end, clock)
        fitted = [schedule, *callbacks.every_phase] + ([] if head_only else [callbacks.early_stopping])
        run.trainer.fit(feed, initial_epoch=max(phase.start, run.first_epoch), epochs=phase.end, callbacks=fitted,
                        class_weight=class_weight, verbose=0)
        if callbacks.time_limit.stopped:
            return "time_limit"
        if callbacks.early_stopping.stopped_epoch > 0:
            return "early_stopping"
    return "epochs"


@dataclass(frozen=True)
class _Phase:
    start: int  # first epoch of the phase (0-based), whether or not a resumed run is past it
    end: int
    learning_rate: float
    backbone_trainable: bool | None  # None: a model without a pretrained backbone


def _phases(config: TrainConfig, first_epoch: int) -> list[_Phase]:
    """The training phases that still have epochs to run after ``first_epoch``: from scratch,
    one phase; a pretrained backbone, ``freeze_epochs`` epochs that train the new head alone at
    the learning rate, then the whole network at a tenth of it (from the start if 0)."""
    epochs, lr, freeze = config.epochs, config.learning_rate, config.freeze_epochs
    if not config.fine_tunes_backbone:
        phases = [_Phase(0, epochs, lr, None)]  # from scratch: every layer trains at full rate
    elif freeze <= 0:
        phases = [_Phase(0, epochs, lr * FINE_TUNE_LR_FACTOR, True)]
    else:
        phases = [_Phase(0, min(freeze, epochs), lr, False), _Phase(freeze, epochs, lr * FINE_TUNE_LR_FACTOR, True)]
    return [phase for phase in phases if phase.end > max(phase.start, first_epoch)]


def training_model(classifier: keras.Model, augment: bool, seed: int, *, extra: bool = False,
                   vignette: bool = False) -> keras.Sequential:
    """The model that is fitted: augmentation (if any) then the classifier, sharing its weights."""
    stages = [augmentation(seed, extra, vignette)] if augment else []
    return keras.Sequential([keras.Input(shape=classifier.input_shape[1:], name="image"), *stages, classifier],
                            name="trainer")


def compile_for_training(trainer: keras.Model, lr: float) -> None:
    trainer.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                    metrics=["accuracy"], jit_compile=use_xla(trainer))


def set_backbone_trainable(classifier: keras.Model, trainable: bool) -> None:
    backbone = classifier.get_layer(BACKBONE_LAYER)
    backbone.trainable = trainable
    freeze_batchnorm(backbone)  # setting trainable above reached every layer, BatchNorm too


def sampling_probabilities(class_balance: str, labels: np.ndarray, sources: Any = None) -> np.ndarray | None:
    """Per-row probabilities of drawing each training row (with replacement), or None (every
    row once per epoch) unless ``class_balance`` samples. "sampling": every class equally
    likely. "class-source": every class equally likely and, within a class, every source
    (``sources``, one per row, e.g. the manifest's clinic) equally likely, so that one
    device's nevi do not stand for all nevi: p ∝ 1 / (n_sources_in_class × count(class,
    source)). Without sources (an archive made before they were recorded), as "sampling"."""
    if class_balance not in ("sampling", "class-source"):
        return None
    if class_balance == "sampling" or sources is None:
        sources = np.zeros(len(labels))
    _, source_codes = np.unique(np.asarray(sources).astype(str), return_inverse=True)
    cells, cell_of_row, cell_counts = np.unique(np.stack([labels, source_codes.ravel()], axis=1), axis=0,
                                                return_inverse=True, return_counts=True)
    sources_in_class = np.bincount(cells[:, 0])
    probabilities = 1.0 / (sources_in_class[labels] * cell_counts[cell_of_row.ravel()])
    return probabilities / probabilities.sum()


def _deterministic_ops() -> None:
    if keras.backend.backend() != "tensorflow":
        return  # JAX's CPU kernels are deterministic; GPUs need XLA_FLAGS (docs/scale-out.md)
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


def _load_trainer(path: Path) -> keras.Model:
    if not path.is_file():
        raise ModelError(f"Cannot resume: {path} is missing (the run never finished an epoch).",
                         hint=f"Delete {path.parent} and train again.")
    try:
        return keras.models.load_model(path)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for damaged files.
        raise ModelError(f"Cannot resume: {path} cannot be loaded: {exc}") from None


def trim_history(path: Path, epochs_done: int) -> None:
    """Drop the history rows of epochs after the checkpoint: a run stopped between the CSV
    logger and the checkpoint has logged an epoch that the resumed run will train again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    rows = list(csv.reader(lines))
    if not rows or "epoch" not in rows[0]:
        return
    column = rows[0].index("epoch")
    kept = [line for line, row in zip(lines[1:], rows[1:]) if row and int(row[column]) < epochs_done]
    if len(kept) < len(lines) - 1:
        write_text(path, "".join([lines[0], *kept]))


def _meta_to_resume(run_dir: Path, archive: Archive) -> dict[str, Any]:
    meta = read_run_meta(run_dir)
    if meta.get("status") == COMPLETE:
        raise ModelError(f"The run in {run_dir} is already complete: there is nothing to resume.",
                         hint="Train into a new --run-dir.")
    try:
        trained_on, _, _ = meta["archive"]["sha256"], meta["training"], int(meta["epochs_done"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"Cannot resume {run_dir}: its {RUN_FILE} lacks {exc} (damaged, or written by another "
                         "version).", hint="Train into a new --run-dir.") from None
    if trained_on != archive.header["sha256"]:
        raise ModelError(f"Cannot resume {run_dir}: it was trained on another archive ({meta['archive'].get('path')}).",
                         hint=f"Pass --archive {meta['archive'].get('path')}.")
    return meta


def _check_new_run_dir(run_dir: Path) -> None:
    if (run_dir / RUN_FILE).is_file():
        meta = read_run_meta(run_dir)
        if meta.get("status") == COMPLETE:
            raise ModelError(f"{run_dir} already holds a finished run.", hint="Choose a new --run-dir.")
        raise ModelError(f"{run_dir} holds an unfinished run (status: {meta.get('status')}).",
                         hint=f"Continue it with `melanoma train --resume --run-dir {run_dir}`, or choose a new --run-dir.")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ModelError(f"{run_dir} exists and is not an empty folder.", hint="Choose a new --run-dir.")


def _write_new_run(run_dir: Path, archive: Archive, config: TrainConfig, settings_dump: dict[str, Any],
                   engine: dict[str, Any]) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    header = archive.header
    meta = {
        "run_id": run_dir.name, "model": config.model, "weights": config.weights,
        "classes": list(archive.classes), "image_size": int(archive.images.shape[1]),
        "preprocess": header["preprocess"],
        "archive": {"path": str(Path(archive.path).resolve()), "sha256": header["sha256"], "source": header.get("source"),
                    "seed": header.get("seed"), "test_where": header.get("test_where")},
        "git": git_state(), "process": training_process(),
        "created": utc_now(), "status": RUNNING, "epochs_done": 0, "best": None, "train_seconds": 0.0,
        "training": config.to_dict(), "engine": engine,
    }
    write_json(run_dir / CONFIG_FILE, settings_dump)
    write_json(run_dir / VERSIONS_FILE, _library_versions())
    write_text(run_dir / SPLIT_FILE, archive.manifest[["image_id", "split"]].to_csv(index=False))
    write_json(run_dir / RUN_FILE, meta)
    return meta


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform(), "melanoma": metadata.version("melanoma")}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    versions["keras_backend"] = keras.backend.backend()
    return versions


def _result(run_dir: Path, meta: dict[str, Any], stopped_by: str, seconds: float) -> TrainResult:
    best = meta.get("best") or {}
    return TrainResult(run_dir, meta["status"], int(meta["epochs_done"]), best.get("epoch"), best.get("val_bma"),
                       stopped_by, seconds)

