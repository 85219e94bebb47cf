"""Training on real HAM10000 images: the run folder, checkpoints, resume, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from melanoma.config import Settings
from melanoma.data.archive import open_archive
from melanoma.errors import ModelError
from melanoma.modeling.augment import RandomVignette
from melanoma.modeling.calibration import temperature_scale
from melanoma.modeling.feed import ArchiveFeed, predict_rows
from melanoma.modeling.models import small_cnn
from melanoma.modeling.train import class_weights, train, training_model
from melanoma.modeling.train_config import TrainConfig

RUN_FILES = {"run.json", "model.keras", "last.keras", "config.json", "split.csv", "history.csv", "versions.json"}


def test_feed_gathers_float_batches_of_the_requested_rows() -> None:
    images = np.repeat(np.arange(10, dtype=np.uint8), 12).reshape(10, 2, 2, 3)  # every pixel = its row number
    labels = np.arange(10) % 3
    rows = np.array([7, 2, 5, 9, 0])
    feed = ArchiveFeed(images, labels, rows, batch_size=2)
    batches = [feed[i] for i in range(len(feed))]
    assert [len(x) for x, _ in batches] == [2, 2, 1]
    assert all(x.dtype == np.float32 for x, _ in batches)
    gathered = np.concatenate([x[:, 0, 0, 0] for x, _ in batches]).astype(int)
    assert sorted(gathered.tolist()) == sorted(rows.tolist())
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels[gathered])


def test_shuffled_order_depends_only_on_seed_and_epoch() -> None:
    images = np.zeros((100, 1, 1, 3), np.uint8)
    labels = np.zeros(100, np.int64)
    first = ArchiveFeed(images, labels, np.arange(100), batch_size=10, shuffle=True, seed=3)
    first.on_epoch_end()
    resumed = ArchiveFeed(images, labels, np.arange(100), batch_size=10, shuffle=True, seed=3, first_epoch=1)
    np.testing.assert_array_equal(first.order, resumed.order)
    assert not np.array_equal(first.order, ArchiveFeed(images, labels, np.arange(100), batch_size=10, shuffle=True, seed=3).order)


def test_balanced_sampling_and_class_weights_even_out_classes() -> None:
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    weights = class_weights(labels, 3)
    assert weights[2] == pytest.approx(90 * weights[0]) and np.mean([weights[k] for k in labels]) == pytest.approx(1)
    from melanoma.modeling.train import sampling_probabilities

    feed = ArchiveFeed(np.zeros((1000, 1, 1, 3), np.uint8), labels, np.arange(1000), batch_size=100, shuffle=True,
                       seed=0, row_probabilities=sampling_probabilities("sampling", labels))
    drawn = np.bincount(labels[feed.order], minlength=3) / 1000
    np.testing.assert_allclose(drawn, 1 / 3, atol=0.06)
    assert sampling_probabilities("weights", labels) is None and sampling_probabilities("none", labels) is None


def test_class_source_sampling_evens_out_classes_and_sources_within_each() -> None:
    from typing import get_args

    from melanoma.config import ClassBalanceChoice
    from melanoma.modeling.train import sampling_probabilities
    from melanoma.modeling.train_config import ClassBalance

    assert set(get_args(ClassBalanceChoice)) == set(get_args(ClassBalance))  # the CLI's choices are train's

    # class 0: 600 vienna, 300 rosendahl, 100 isic; class 1: 80 vienna, 20 isic (a missing source); class 2: 5 rosendahl
    labels = np.array([0] * 1000 + [1] * 100 + [2] * 5)
    sources = np.array(["vienna"] * 600 + ["rosendahl"] * 300 + ["isic"] * 100 + ["vienna"] * 80 + ["isic"] * 20
                       + ["rosendahl"] * 5, dtype=object)
    p = sampling_probabilities("class-source", labels, sources)
    assert p.shape == (1105,) and (p > 0).all() and p.sum() == pytest.approx(1)
    by_class = np.bincount(labels, weights=p)
    np.testing.assert_allclose(by_class, 1 / 3)
    for label, expected in ((0, {"vienna", "rosendahl", "isic"}), (1, {"vienna", "isic"}), (2, {"rosendahl"})):
        in_class = labels == label
        shares = {source: p[in_class & (sources == source)].sum() for source in set(sources[in_class])}
        assert set(shares) == expected
        np.testing.assert_allclose(list(shares.values()), 1 / 3 / len(expected))
    # Within one (class, source) cell every image is equally likely.
    assert np.ptp(p[:600]) == 0 and p[0] == pytest.approx(1 / 3 / 3 / 600)
    # Without sources, or with one source, it is class-balanced sampling.
    np.testing.assert_allclose(sampling_probabilities("class-source", labels, None), sampling_probabilities("sampling", labels))
    np.testing.assert_allclose(sampling_probabilities("class-source", labels, ["ham10000"] * 1105),
                               sampling_probabilities("sampling", labels))
    # Missing values (an empty manifest cell) are one more source, not an error.
    with_gap = sources.copy()
    with_gap[:10] = np.nan
    assert sampling_probabilities("class-source", labels, with_gap).sum() == pytest.approx(1)


@pytest.mark.realdata
def test_training_samples_by_class_and_source(small_ham_archive: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import melanoma.modeling.train as train_module

    probabilities = []

    class SpyFeed(ArchiveFeed):
        def __init__(self, *args, **kwargs):
            probabilities.append(kwargs.get("row_probabilities"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train_module, "ArchiveFeed", SpyFeed)
    archive = open_archive(small_ham_archive)
    config = TrainConfig.from_settings(Settings(), model="cnn", weights="none", epochs=1, batch_size=32,
                                       learning_rate=1e-3, seed=0, class_balance="class-source", vignette_augment=False)
    result = train(archive, tmp_path / "run", config, progress=False)
    assert result.status == "complete"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["training"]["class_balance"] == "class-source"
    p = probabilities[0]  # the training feed's (the validation feed's is None)
    train_rows = archive.indices("train")
    cells = pd.DataFrame({"label": archive.labels[train_rows], "source": archive.manifest["source"].to_numpy()[train_rows], "p": p})
    assert cells["source"].nunique() > 1  # HAM10000's four sites
    np.testing.assert_allclose(cells.groupby("label")["p"].sum(), 1 / len(archive.classes))
    per_source = cells.groupby(["label", "source"])["p"].sum()
    np.testing.assert_allclose(per_source, per_source.groupby(level="label").transform("mean"))


@pytest.mark.realdata
def test_run_folder_is_complete(trained_run: Path, small_ham_archive: Path) -> None:
    assert RUN_FILES <= {path.name for path in trained_run.iterdir()}
    meta = json.loads((trained_run / "run.json").read_text())
    archive = open_archive(small_ham_archive)
    assert meta["status"] == "complete" and meta["epochs_done"] == 1 and meta["model"] == "cnn"
    assert meta["archive"]["sha256"] == archive.header["sha256"] and meta["classes"] == archive.classes
    assert meta["image_size"] == 64 and meta["preprocess"] == archive.header["preprocess"]
    assert meta["training"]["seed"] == 0 and meta["best"]["epoch"] == 1
    split = pd.read_csv(trained_run / "split.csv")
    assert split["image_id"].tolist() == archive.manifest["image_id"].tolist()
    history = pd.read_csv(trained_run / "history.csv")
    assert {"epoch", "loss", "val_loss", "val_bma", "val_mel_auc", "img_per_s", "lr"} <= set(history.columns)
    assert len(history) == 1
    versions = json.loads((trained_run / "versions.json").read_text())
    assert {"python", "numpy", "keras"} <= set(versions)
    assert "augmentation" not in {layer.name for layer in keras.models.load_model(trained_run / "model.keras").layers}


@pytest.mark.realdata
def test_best_checkpoint_reloads_to_the_recorded_predictions(trained_run: Path, small_ham_archive: Path) -> None:
    archive = open_archive(small_ham_archive)
    model = keras.models.load_model(trained_run / "model.keras")
    val_rows = archive.indices("val")
    val_bma = balanced_accuracy_score(archive.labels[val_rows], predict_rows(model, archive, val_rows).argmax(axis=1))
    meta = json.loads((trained_run / "run.json").read_text())
    assert val_bma == pytest.approx(meta["best"]["val_bma"], abs=1e-9)
    recorded = pd.read_csv(trained_run / "predictions_test.csv")
    # evaluate applies the temperature that training fitted on the validation split.
    probabilities = temperature_scale(predict_rows(model, archive, archive.indices("test")), meta["calibration"]["temperature"])
    np.testing.assert_allclose(recorded[["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC"]].to_numpy(),
                               probabilities[:, [archive.classes.index(c) for c in ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")]],
                               atol=2e-6)


def stop_mid_run(signal_number: int, archive: Path, run: Path, log: Path, epochs: int) -> int:
    """Start `melanoma train` in a process of its own, send it ``signal_number`` once the
    first epoch is checkpointed, and return its exit code."""
    args = ["train", "--archive", archive, "--model", "cnn", "--epochs", epochs, "--batch-size", 64, "--seed", 1,
            "--run-dir", run]
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "melanoma", *map(str, args)], stdout=output,
                                   stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "300"})
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if json.loads((run / "run.json").read_text())["epochs_done"] >= 1:
                    break
            except (OSError, ValueError, KeyError):
                pass  # not written yet
            time.sleep(0.1)
        assert process.poll() is None, f"the run ended before it could be stopped:\n{log.read_text()[-3000:]}"
        process.send_signal(signal_number)
        return process.wait(120)
    finally:
        process.kill()


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_run_saves_a_checkpoint_and_resume_continues(signal_number: int, small_ham_archive: Path,
                                                              tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "train.log"
    code = stop_mid_run(signal_number, small_ham_archive, run, log, epochs=3)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text and f"Continue with: melanoma train --resume --run-dir {run}" in text
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "interrupted" and 1 <= meta["epochs_done"] < 3
    assert meta["training"]["weights"] == "none"  # weights unset: the CNN starts from random ones
    assert (run / "last.keras").is_file()

    # As if the run had been killed between the CSV logger and the checkpoint: one epoch
    # more in the history than in the checkpoint. The resumed run trains it again.
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == list(range(meta["epochs_done"]))
    extra = history.tail(1).assign(epoch=meta["epochs_done"])
    pd.concat([history, extra]).to_csv(run / "history.csv", index=False)
    archive = open_archive(small_ham_archive)
    config = TrainConfig.from_settings(Settings(), model="cnn", epochs=3, batch_size=64, seed=1)
    assert TrainConfig.from_dict(meta["training"]) == config  # what the CLI recorded
    with pytest.raises(ModelError, match="unfinished run"):
        train(archive, run, config, progress=False)
    resumed = train(archive, run, resume=True, progress=False)
    assert resumed.status == "complete" and resumed.epochs_done == 3
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [0, 1, 2]
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "complete" and meta["epochs_done"] == 3
    with pytest.raises(ModelError, match="already complete"):
        train(archive, run, resume=True, progress=False)


@pytest.mark.realdata
def test_cli_errors_are_clear(cli, small_ham_archive: Path, trained_run: Path, tmp_path: Path) -> None:
    def fails(*args: str | Path, says: str) -> None:
        result = cli("train", *args)
        assert result.code == 2, result
        assert says in result.stderr and "Traceback" not in result.stderr

    fails("--archive", tmp_path / "nowhere", says="not a prepared archive")
    fails("--archive", small_ham_archive, "--model", "resnet9000", "--run-dir", tmp_path / "a", says="'resnet9000' is not one of")
    assert not (tmp_path / "a").exists()
    weights = tmp_path / "cnn.weights.h5"
    small_cnn(num_classes=7, image_size=64).save_weights(weights)
    fails("--archive", small_ham_archive, "--model", "mobilenetv3small", "--weights", weights, "--run-dir", tmp_path / "b",
          says=f"{weights}")
    fails("--archive", small_ham_archive, "--run-dir", trained_run, says="already holds a finished run")
    fails("--resume", says="--resume needs the --run-dir")


@pytest.mark.realdata
def test_cli_evaluate_and_runs_print_tables(cli, trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / trained_run.name
    shutil.copytree(trained_run, run)
    result = cli("evaluate", "--run", run, "--bootstrap", "20")
    assert result.code == 0, result
    assert "balanced multiclass accuracy" in result.stdout and f"{run / 'report.md'}" in result.stdout
    assert "By source" in result.stdout and "Melanoma vs histopathology-confirmed nevi" in result.stdout
    assert "Melanoma ROC AUC within sources" in result.stdout
    listing = cli("runs", "--dir", tmp_path / "runs")
    assert listing.code == 0 and trained_run.name in listing.stdout and "complete" in listing.stdout

    plain = pd.read_csv(run / "predictions_test.csv")
    result = cli("evaluate", "--run", run, "--bootstrap", "20", "--tta")
    assert result.code == 0, result
    assert json.loads((run / "metrics.json").read_text())["tta"] is True
    assert "8 flips/rotations (TTA)" in (run / "report.md").read_text()
    averaged = pd.read_csv(run / "predictions_test.csv")
    assert averaged["image"].tolist() == plain["image"].tolist()
    assert not np.allclose(averaged.iloc[:, 1:], plain.iloc[:, 1:])  # the views did change the predictions


@pytest.mark.realdata
def test_damaged_run_files_are_clear_errors(cli, trained_run: Path, small_ham_archive: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "model.keras").write_bytes(b"garbage")
    result = cli("evaluate", "--run", run, "--bootstrap", "0")
    assert result.code == 2, result
    assert f"Model file {run / 'model.keras'} cannot be loaded" in result.stderr

    meta = json.loads((run / "run.json").read_text())
    del meta["archive"]
    (run / "run.json").write_text(json.dumps({**meta, "status": "interrupted"}))
    result = cli("train", "--resume", "--run-dir", run)
    assert result.code == 2 and "does not record the archive the run was trained on" in result.stderr
    assert "--archive" in result.stderr
    result = cli("train", "--resume", "--run-dir", run, "--archive", small_ham_archive)
    assert result.code == 2 and "Cannot resume" in result.stderr and "lacks 'archive'" in result.stderr
def test_extra_augmentation_shifts_colour_and_survives_a_checkpoint(tmp_path: Path) -> None:
    """--extra-augment adds hue, saturation, illuminant and aspect jitter to training only;
    the trainer (saved as last.keras for --resume) loads back with it."""
    classifier = small_cnn(num_classes=2, image_size=32)
    trainer = training_model(classifier, True, seed=0, extra=True)
    grey = np.full((16, 32, 32, 3), 128, np.float32)
    augmented = keras.ops.convert_to_numpy(trainer.layers[0](grey, training=True))
    assert augmented.min() >= 0 and augmented.max() <= 255
    channel_means = augmented.mean(axis=(1, 2))
    assert np.abs(channel_means[:, 0] - channel_means[:, 2]).max() > 2  # a colour cast, not only brightness
    assert np.array_equal(keras.ops.convert_to_numpy(trainer.layers[0](grey, training=False)), grey)
    names = {layer.__class__.__name__ for layer in trainer.layers[0].layers}
    assert {"RandomHue", "RandomSaturation", "RandomIlluminant"} <= names
    trainer.save(tmp_path / "last.keras")
    reloaded = keras.models.load_model(tmp_path / "last.keras")
    assert [layer.__class__.__name__ for layer in reloaded.layers[0].layers] == [
        layer.__class__.__name__ for layer in trainer.layers[0].layers]


def test_vignette_augmentation_blackens_corners_only() -> None:
    bright = np.full((32, 48, 48, 3), 200, np.float32)
    layer = RandomVignette(0.5, seed=0)
    out = keras.ops.convert_to_numpy(layer(bright, training=True))
    corners = out[:, [0, 0, -1, -1], [0, -1, 0, -1]].mean(axis=(1, 2))
    assert np.allclose(out[:, 24, 24], 200, atol=1)  # the centre is never touched
    vignetted = corners < 199
    assert 8 <= vignetted.sum() <= 24 and np.allclose(corners[~vignetted], 200)  # about half the images
    assert (corners < 5).sum() >= 4  # most circles are smaller than the square: black corners
    assert np.array_equal(keras.ops.convert_to_numpy(layer(bright, training=False)), bright)


@pytest.mark.realdata
def test_resume_warns_about_each_option_it_ignores(cli, trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "status": "interrupted"}))
    result = cli("train", "--resume", "--run-dir", run, "--epochs", "3", "--lr", "0.5", "--no-augment",
                 "--batch-size", "32", "--model", "cnn")
    assert result.code == 0, result
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == [
        f"Warning: --epochs 3 is ignored: the resumed run keeps its epochs = 1 (from {run / 'run.json'}).",
        f"Warning: --lr 0.5 is ignored: the resumed run keeps its learning_rate = 0.001 (from {run / 'run.json'}).",
        f"Warning: --no-augment is ignored: the resumed run keeps its augment = True (from {run / 'run.json'}).",
    ]  # --batch-size 32 and --model cnn are the run's own: nothing to say
    resumed = json.loads((run / "run.json").read_text())
    assert resumed["training"] == meta["training"] and resumed["epochs_done"] == 1 and resumed["status"] == "complete"
