"""TrainConfig: the options of a training run, from the settings to run.json and back."""

from __future__ import annotations

from pathlib import Path

import pytest

from melanoma.config import Settings
from melanoma.errors import ModelError
from melanoma.modeling.runs import RunInfo, recorded_training
from melanoma.modeling.train_config import TrainConfig, ignored_options

# run.json "training" as runs recorded it before --extra-augment and --vignette-augment existed
FIRST_RUNS = {"model": "efficientnet-lite0", "weights": "imagenet", "epochs": 7, "batch_size": 32, "learning_rate": 0.001,
              "seed": 0, "class_balance": "weights", "augment": True, "early_stopping_patience": 8,
              "time_limit_minutes": None, "freeze_epochs": 2, "tensorboard": False}
RUN_JSON_KEYS = ["model", "weights", "epochs", "batch_size", "learning_rate", "seed", "class_balance", "augment",
                 "extra_augment", "vignette_augment", "early_stopping_patience", "time_limit_minutes",
                 "freeze_epochs", "tensorboard"]


def test_from_settings_takes_the_settings_and_overrides() -> None:
    settings = Settings(epochs=12, batch_size=16, learning_rate=3e-4, seed=5, class_balance="sampling", time_limit_minutes=30)
    config = TrainConfig.from_settings(settings, tensorboard=True)
    assert (config.model, config.weights, config.epochs, config.batch_size) == ("efficientnet-lite0", "imagenet", 12, 16)
    assert (config.learning_rate, config.seed, config.class_balance, config.time_limit_minutes) == (3e-4, 5, "sampling", 30)
    assert config.freeze_epochs == settings.freeze_epochs and config.vignette_augment == settings.vignette_augment
    assert config.tensorboard is True
    with pytest.raises(TypeError, match="no option lr"):
        TrainConfig.from_settings(settings, lr=0.1)


def test_from_settings_records_what_the_run_will_really_do() -> None:
    cnn = TrainConfig.from_settings(Settings(model="cnn", freeze_epochs=3, vignette_augment=True))
    assert cnn.weights == "none" and cnn.freeze_epochs == 0  # no backbone to freeze
    scratch = TrainConfig.from_settings(Settings(weights="none", freeze_epochs=3))
    assert scratch.model == "efficientnet-lite0" and scratch.freeze_epochs == 0 and not scratch.fine_tunes_backbone
    plain = TrainConfig.from_settings(Settings(augment=False, extra_augment=True, vignette_augment=True))
    assert not plain.extra_augment and not plain.vignette_augment  # both are augmentations
    weights_file = TrainConfig.from_settings(Settings(), weights=Path("lite0.weights.h5"))
    assert weights_file.weights == "lite0.weights.h5" and weights_file.fine_tunes_backbone


def test_run_json_keys_and_round_trip() -> None:
    config = TrainConfig.from_settings(Settings(extra_augment=True))
    recorded = config.to_dict()
    assert list(recorded) == RUN_JSON_KEYS  # existing run folders keep loading, new ones read the same
    assert TrainConfig.from_dict(recorded) == config
    assert TrainConfig.from_dict({**recorded, "added_by_a_later_version": 1}) == config


def test_older_runs_load_with_the_augmentations_they_did_not_have() -> None:
    config = TrainConfig.from_dict(FIRST_RUNS)
    assert config.extra_augment is False and config.vignette_augment is False
    assert config.to_dict() == {**FIRST_RUNS, "extra_augment": False, "vignette_augment": False}
    damaged = {key: value for key, value in FIRST_RUNS.items() if key != "epochs"}
    with pytest.raises(KeyError, match="training.epochs"):
        TrainConfig.from_dict(damaged)
    with pytest.raises(ModelError, match=r"run\.json lacks 'training.epochs'"):
        recorded_training({"training": damaged}, Path("runs/old"))


def test_run_info_gives_the_training_config(tmp_path: Path) -> None:
    def info(meta: dict) -> RunInfo:
        return RunInfo(tmp_path, meta, ["mel", "nv"], 64, None, tmp_path / "model.keras", None)  # type: ignore[arg-type]

    assert info({"training": FIRST_RUNS}).training == TrainConfig.from_dict(FIRST_RUNS)
    assert info({"model": "ensemble"}).training is None  # an ensemble's members have theirs
    assert info({"archive": {"path": "/data/archive"}}).archive_path == Path("/data/archive")
    with pytest.raises(ModelError, match="does not record the archive"):
        _ = info({}).archive_path


def test_ignored_options_names_each_difference() -> None:
    recorded = TrainConfig.from_dict(FIRST_RUNS)
    passed = {"epochs": 20, "batch_size": 32, "weights": Path("imagenet"), "augment": False, "learning_rate": 0.001}
    assert ignored_options(recorded, passed) == [("epochs", 20, 7), ("augment", False, True)]
    assert ignored_options(recorded, {}) == []
