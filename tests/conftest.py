"""Shared fixtures. Real-data tests read ../shared/data and are skipped, with a message
saying so, where it is absent; in CI (the environment variable CI set) they fail instead,
so that half the suite cannot vanish unnoticed."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MELANOMA_SHARED_DATA", REPO.parent / "shared" / "data"))


def missing_shared_data(reason: str) -> None:
    """Skip a real-data test where the data is absent, but fail it in CI, which must have it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run the real-data tests (set MELANOMA_SHARED_DATA or provide ../shared/data)")
    pytest.skip(f"{reason}: real-data test skipped")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ham10000" / "HAM10000_metadata.csv").is_file():
        missing_shared_data(f"real dermoscopy data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ham_dir(shared_data: Path) -> Path:
    return shared_data / "ham10000"


@pytest.fixture(scope="session")
def isic2019_csv_dir(shared_data: Path) -> Path:
    return shared_data / "isic2019"


# ---- data: a small real archive for the tests of training, prediction and serving
SMALL_HAM_PER_CLASS = 57  # x 7 classes = 399 images; the rarest class (df) has 115


@pytest.fixture(scope="session")
def small_ham_archive(ham_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of an archive of 399 real HAM10000 images at 64 px: 57 of each of the 7
    classes (chosen at random, seed 0), split 70/15/15 grouped by lesion. Open it with
    ``melanoma.data.archive.open_archive``."""
    from melanoma.data.archive import build_archive
    from melanoma.data.preprocess import PreprocessParams
    from melanoma.data.sources import read_dataset

    dataset = read_dataset(ham_dir)
    dataset.manifest = (
        dataset.manifest.groupby("label").sample(n=SMALL_HAM_PER_CLASS, random_state=0)
        .sort_values("image_id").reset_index(drop=True)
    )
    out = tmp_path_factory.mktemp("small_ham") / "archive"
    build_archive(dataset, out, PreprocessParams(image_size=64), seed=0, val_fraction=0.15, test_fraction=0.15,
                  test_where=None, workers=2, progress=False)
    return out


# ---- explain: run the `melanoma` command in this process (no TensorFlow start-up per call)
@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``cli("predict", "--run", run, image)`` runs ``melanoma.cli.main()`` as the console
    script does: user mistakes give exit code 2 and a message; any other exception (a
    traceback for the user) propagates and fails the test."""
    from melanoma import cli as cli_module

    for console in (cli_module.console, cli_module.out):  # no line wrapping inside messages
        monkeypatch.setattr(console, "width", 250)

    def run(*args: str | Path) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["melanoma", *map(str, args)])
        capsys.readouterr()
        try:
            cli_module.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


# ---- serving: real images of different classes, for the API, server and browser tests
@pytest.fixture(scope="session")
def ham_images_by_class(ham_dir: Path) -> dict[str, Path]:
    """One real HAM10000 image per class (the first of each dx in the metadata), by dx."""
    import csv

    chosen: dict[str, Path] = {}
    with open(ham_dir / "HAM10000_metadata.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["dx"] not in chosen:
                chosen[row["dx"]] = next(ham_dir.glob(f"HAM10000_images_part_*/{row['image_id']}.jpg"))
    return chosen


# ---- train: a trained and evaluated run for the tests of prediction, explanation and serving
@pytest.fixture(scope="session")
def trained_run(small_ham_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a finished, evaluated run (metrics.json, report, figures, ISIC predictions):
    the small CNN trained for 1 epoch on ``small_ham_archive`` (64 px, seed 0). Its
    accuracy is near chance: it is for testing the plumbing, not the model."""
    return _train_and_evaluate(small_ham_archive, tmp_path_factory.mktemp("runs") / "cnn-1-epoch", seed=0)


@pytest.fixture(scope="session")
def trained_run_seed1(small_ham_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``trained_run`` again with seed 1: the same recipe, another seed (for compare and ensemble)."""
    return _train_and_evaluate(small_ham_archive, tmp_path_factory.mktemp("runs") / "cnn-1-epoch-seed1", seed=1)


def _train_and_evaluate(archive_path: Path, run_dir: Path, *, seed: int) -> Path:
    from melanoma.config import Settings
    from melanoma.data.archive import open_archive
    from melanoma.modeling.evaluate import evaluate_run
    from melanoma.modeling.train import train
    from melanoma.modeling.train_config import TrainConfig

    archive = open_archive(archive_path)
    config = TrainConfig.from_settings(Settings(), model="cnn", weights="none", epochs=1, batch_size=32,
                                       learning_rate=1e-3, seed=seed, vignette_augment=False)
    train(archive, run_dir, config, progress=False)
    evaluate_run(run_dir, archive, "test", target_sensitivity=0.741, bootstrap_samples=50, seed=0)
    return run_dir


@pytest.fixture(scope="session")
def lite0_run(small_ham_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One head-only epoch of the default model (ImageNet-pretrained EfficientNet-Lite0) on
    ``small_ham_archive``, trained through the CLI as a user would."""
    from typer.testing import CliRunner

    from melanoma.cli import app

    work = tmp_path_factory.mktemp("lite0")
    run_dir = work / "run"
    result = CliRunner().invoke(app, ["train", "--archive", str(small_ham_archive), "--epochs", "1",
                                      "--freeze-epochs", "1", "--run-dir", str(run_dir)],
                                env={"MELANOMA_WEIGHTS_DIR": str(work / "weights")})
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(scope="session")
def predictor(trained_run: Path):
    """The ``trained_run`` model, loaded once for every test that predicts or explains."""
    from melanoma.modeling.predict import Predictor

    return Predictor.from_run(trained_run)
