"""The Predictor and `melanoma predict`, on a trained run and real HAM10000 images."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from crafted_images import png_declaring

from melanoma.errors import ImageError, ModelError
from melanoma.modeling.calibration import temperature_scale
from melanoma.modeling.isic import ISIC_COLUMNS
from melanoma.modeling.predict import Predictor, tta_views

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def test_images(small_ham_archive: Path) -> np.ndarray:
    from melanoma.data.archive import open_archive

    archive = open_archive(small_ham_archive)
    return np.asarray(archive.images[archive.indices("test")[:20]])


@pytest.fixture(scope="module")
def ham_files(ham_dir: Path) -> list[Path]:
    return sorted((ham_dir / "HAM10000_images_part_1").glob("*.jpg"))[:4]


@pytest.fixture
def image_folder(tmp_path: Path, ham_files: list[Path]) -> Path:
    """Real images plus an undecodable file, a 1x1 image and a decompression bomb."""
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for path in ham_files[:3]:
        shutil.copy(path, folder / path.name)
    shutil.copy(ham_files[3], folder / "nested" / ham_files[3].name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all" * 10)
    cv2.imwrite(str(folder / "dot.png"), np.zeros((1, 1, 3), np.uint8))
    (folder / "bomb.png").write_bytes(png_declaring(20_000, 20_000))
    (folder / "notes.txt").write_text("not an image suffix: ignored")
    return folder


def test_predictions_are_the_models_probabilities(predictor: Predictor, test_images: np.ndarray) -> None:
    probabilities = predictor.predict_arrays(test_images)
    # The run's temperature (fitted at the end of training) scales the model's own probabilities.
    expected = temperature_scale(np.asarray(predictor.model(test_images.astype(np.float32), training=False)),
                                 predictor.temperature)
    assert probabilities.shape == (len(test_images), len(predictor.classes))
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    # Batches larger than one model call are split and put back in order.
    many = np.concatenate([test_images] * 8)
    np.testing.assert_allclose(predictor.predict_arrays(many), np.concatenate([expected] * 8), atol=1e-5)


def test_paths_bytes_and_arrays_give_the_same_prediction(predictor: Predictor, ham_files: list[Path]) -> None:
    from_paths = predictor.predict(ham_files)
    from_bytes = predictor.predict([p.read_bytes() for p in ham_files])
    from_arrays = predictor.predict_arrays(np.stack([predictor.preprocess(p) for p in ham_files]))
    np.testing.assert_array_equal(from_paths, from_bytes)
    np.testing.assert_array_equal(from_paths, from_arrays)
    assert predictor.preprocess(ham_files[0]).shape == (64, 64, 3)


def test_tta_averages_the_eight_flips_and_rotations(predictor: Predictor, test_images: np.ndarray) -> None:
    images = test_images[:3]
    views = tta_views(images)
    assert views.shape == (8, *images.shape)
    assert len({v[0].tobytes() for v in views}) == 8  # all distinct on a real image
    np.testing.assert_array_equal(views[0], images)
    expected = np.mean([predictor.predict_arrays(v) for v in views], axis=0)
    np.testing.assert_allclose(predictor.predict_arrays(images, tta=True), expected, atol=1e-6)


def test_threads_share_one_predictor(predictor: Predictor, test_images: np.ndarray) -> None:
    expected = predictor.predict_arrays(test_images)
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(predictor.predict_arrays(test_images))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-6)


def test_predict_files_skips_unreadable_files_with_the_reason(predictor: Predictor, image_folder: Path) -> None:
    files = sorted(image_folder.rglob("*.*"))
    result = predictor.predict_files([f for f in files if f.suffix != ".txt"])
    assert sorted(p.name for p in result.paths) == sorted(p.name for p in files if p.name.startswith("ISIC"))
    reasons = {path.name: reason for path, reason in result.skipped}
    assert "not an image" in reasons["broken.jpg"]
    assert "too small" in reasons["dot.png"]
    assert "too large" in reasons["bomb.png"]
    np.testing.assert_allclose(result.probabilities, predictor.predict(result.paths), atol=1e-6)


def test_bad_arrays_are_refused(predictor: Predictor) -> None:
    with pytest.raises(ImageError, match=r"\(N, 64, 64, 3\)"):
        predictor.predict_arrays(np.zeros((2, 32, 32, 3), np.uint8))


# ----------------------------------------------------------------------------- model errors
def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "run.json", run / "run.json")
    return run


def test_missing_corrupt_and_mismatched_models_are_clear_errors(trained_run: Path, tmp_path: Path) -> None:
    from melanoma.modeling.models import build_model

    run = copy_run(trained_run, tmp_path)
    with pytest.raises(ModelError, match="no model.keras"):
        Predictor.from_run(run)
    (run / "model.keras").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ModelError, match="cannot be loaded"):
        Predictor.from_run(run)
    build_model("cnn", num_classes=7, image_size=32, depth=1, width=4).save(run / "model.keras")
    with pytest.raises(ModelError, match=r"takes input of shape \(32, 32, 3\).*\(64, 64, 3\)"):
        Predictor.from_run(run)
    with pytest.raises(ModelError, match="Unknown engine"):
        Predictor.from_run(trained_run, engine="torch")


def test_onnx_engine_without_export_says_how_to_export(trained_run: Path, tmp_path: Path) -> None:
    run = copy_run(trained_run, tmp_path)
    shutil.copy(trained_run / "model.keras", run / "model.keras")
    with pytest.raises(ModelError, match="no model.onnx") as error:
        Predictor.from_run(run, engine="onnx")
    assert "melanoma export" in (error.value.hint or "")


# ----------------------------------------------------------------------------- CLI
def test_cli_predicts_a_folder_and_reports_skipped_files(cli, trained_run: Path, predictor: Predictor,
                                                         image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    result = cli("predict", "--run", trained_run, "--input-dir", image_folder, "--out", out)
    assert result.code == 0, result.stderr
    frame = pd.read_csv(out)
    assert len(frame) == 4
    # Each row is its own file's prediction: the model's probabilities, the argmax class.
    expected = predictor.predict([Path(f) for f in frame["file"]])
    np.testing.assert_allclose(frame[predictor.classes].to_numpy(), expected, atol=1e-5)
    assert frame["prediction"].tolist() == [predictor.classes[i] for i in expected.argmax(axis=1)]
    assert "broken.jpg" in result.stderr and "not an image" in result.stderr
    assert "too large" in result.stderr and "too small" in result.stderr
    assert "3 of 7 files skipped" in result.stderr


def test_cli_writes_the_isic_submission_format(cli, trained_run: Path, ham_files: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "submission.csv"
    result = cli("predict", "--run", trained_run, *ham_files, "--format", "isic", "--out", out, "--tta")
    assert result.code == 0, result.stderr
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["image", *ISIC_COLUMNS]
    assert list(frame["image"]) == [p.stem for p in ham_files]
    assert (frame["SCC"] == 0).all() and (frame["UNK"] == 0).all()  # classes HAM10000 does not have
    np.testing.assert_allclose(frame[list(ISIC_COLUMNS)].sum(axis=1), 1, atol=1e-5)


def test_cli_prints_a_table_and_json(cli, trained_run: Path, ham_files: list[Path]) -> None:
    table = cli("predict", "--run", trained_run, ham_files[0])
    assert table.code == 0 and ham_files[0].stem in table.stdout
    as_json = cli("predict", "--run", trained_run, *ham_files[:2], "--format", "json")
    records = json.loads(as_json.stdout)
    assert [r["file"] for r in records] == [str(p) for p in ham_files[:2]]


@pytest.mark.parametrize(("make_input", "message"), [
    (lambda d: d / "broken.jpg", "not an image"),
    (lambda d: d / "dot.png", "too small"),
    (lambda d: d / "bomb.png", "too large"),
])
def test_cli_fails_clearly_when_nothing_can_be_read(cli, trained_run: Path, image_folder: Path,
                                                    make_input, message: str) -> None:
    result = cli("predict", "--run", trained_run, make_input(image_folder))
    assert result.code == 2
    assert message in result.stderr and "None of the 1 images could be read" in result.stderr


def test_cli_pixel_limit_is_configurable(cli, trained_run: Path, ham_files: list[Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("predict", "--run", trained_run, ham_files[0], "--max-pixels", "1000").code == 2
    monkeypatch.setenv("MELANOMA_MAX_PIXELS", "1000")
    result = cli("predict", "--run", trained_run, ham_files[0])
    assert result.code == 2 and "too large" in result.stderr


def test_cli_model_errors_exit_2_without_traceback(cli, trained_run: Path, ham_files: list[Path],
                                                   tmp_path: Path) -> None:
    run = copy_run(trained_run, tmp_path)
    (run / "model.keras").write_bytes(b"garbage")
    result = cli("predict", "--run", run, ham_files[0])
    assert result.code == 2 and "cannot be loaded" in result.stderr and "Traceback" not in result.stderr
    result = cli("predict", "--run", trained_run, ham_files[0], "--engine", "onnx")
    assert result.code == 2 and "melanoma export" in result.stderr


def test_cli_out_is_checked_before_any_work(cli, trained_run: Path, ham_files: list[Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("predicted before checking --out")

    with monkeypatch.context() as patch:
        patch.setattr(Predictor, "from_run", no_work)
        missing = cli("predict", "--run", trained_run, ham_files[0], "--out", tmp_path / "absent" / "p.csv")
        assert missing.code == 2 and f"does not exist: {tmp_path / 'absent'}" in missing.stderr
        existing = tmp_path / "earlier.csv"
        existing.write_text("yesterday's predictions\n")
        refused = cli("predict", "--run", trained_run, ham_files[0], "--out", existing)
        assert refused.code == 2 and f"{existing} already exists" in refused.stderr and "--force" in refused.stderr
        assert existing.read_text() == "yesterday's predictions\n"
        folder = cli("predict", "--run", trained_run, ham_files[0], "--out", tmp_path)
        assert folder.code == 2 and "is a folder" in folder.stderr
    replaced = cli("predict", "--run", trained_run, ham_files[0], "--out", existing, "--force")
    assert replaced.code == 0, replaced.stderr
    assert pd.read_csv(existing)["file"].tolist() == [str(ham_files[0])]
