"""`melanoma export --format onnx`: ONNX Runtime gives the Keras model's probabilities."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melanoma.errors import MelanomaError
from melanoma.modeling.export import export_model
from melanoma.modeling.predict import Predictor

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_export_then_onnx_and_keras_agree_on_real_images(cli, trained_run: Path, small_ham_archive: Path,
                                                         ham_dir: Path, tmp_path: Path) -> None:
    from melanoma.data.archive import open_archive

    run = tmp_path / "run"  # a copy: the shared run fixture stays as it is
    shutil.copytree(trained_run, run)
    result = cli("export", "--run", run, "--format", "onnx")
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in run.iterdir()) == sorted([*(p.name for p in trained_run.iterdir()), "model.onnx"])

    keras_predictor = Predictor.from_run(run)
    onnx_predictor = Predictor.from_run(run, engine="onnx")
    archive = open_archive(small_ham_archive)
    images = np.asarray(archive.images[archive.indices("test")])
    difference = np.abs(keras_predictor.predict_arrays(images) - onnx_predictor.predict_arrays(images))
    assert difference.max() < 1e-4

    files = sorted((ham_dir / "HAM10000_images_part_2").glob("*.jpg"))[:4]
    outputs = {}
    for engine in ("keras", "onnx"):
        out = tmp_path / f"{engine}.csv"
        assert cli("predict", "--run", run, *files, "--engine", engine, "--tta", "--out", out).code == 0
        outputs[engine] = pd.read_csv(out)
    assert list(outputs["onnx"]["prediction"]) == list(outputs["keras"]["prediction"])
    classes = keras_predictor.classes
    np.testing.assert_allclose(outputs["onnx"][classes], outputs["keras"][classes], atol=1e-4)


def test_onnx_file_describes_itself_to_onnx_runtime_alone(trained_run: Path, small_ham_archive: Path,
                                                         tmp_path: Path) -> None:
    """Everything needed to use model.onnx comes from its own metadata, read with ONNX Runtime."""
    import onnxruntime as ort

    from melanoma.data.archive import open_archive

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = export_model(run)
    shutil.copy(path, tmp_path / "alone.onnx")  # outside the run folder
    session = ort.InferenceSession(str(tmp_path / "alone.onnx"), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    classes, size = json.loads(metadata["classes"]), int(metadata["image_size"])
    run_meta = json.loads((run / "run.json").read_text())
    assert classes == run_meta["classes"] and size == run_meta["image_size"] == 64
    assert json.loads(metadata["preprocess"]) == run_meta["preprocess"]
    assert metadata["input_value_range"] == "0..255" and "NHWC, RGB" in metadata["input"]
    assert "centre-crop to 64x64" in metadata["preprocess_summary"] and "Shades of Gray" in metadata["preprocess_summary"]
    assert metadata["git_commit"].split()[0] == run_meta["git"]["commit"]
    assert "not for diagnosis" in metadata["intended_use"]

    (model_input,) = session.get_inputs()
    assert model_input.shape[1:] == [size, size, 3]
    archive = open_archive(small_ham_archive)  # its pixels went through the preprocessing described
    images = np.asarray(archive.images[archive.indices("test")][:8], dtype=np.float32)
    probabilities = session.run(None, {model_input.name: images})[0]
    assert probabilities.shape == (8, len(classes))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    raw = Predictor.from_run(run, calibration=False).predict_arrays(images.astype(np.uint8))
    np.testing.assert_allclose(probabilities, raw, atol=1e-4)
    # The temperature in the metadata turns the output into the calibrated probabilities.
    temperature = float(metadata["temperature"])
    assert temperature == json.loads((run / "run.json").read_text())["calibration"]["temperature"]
    scaled = np.exp(np.log(probabilities.astype(np.float64)) / temperature)
    np.testing.assert_allclose(scaled / scaled.sum(axis=1, keepdims=True),
                               Predictor.from_run(run).predict_arrays(images.astype(np.uint8)), atol=1e-4)


def test_unknown_export_format(cli, trained_run: Path) -> None:
    with pytest.raises(MelanomaError, match="Unknown export format 'tflite'"):
        export_model(trained_run, "tflite")
    result = cli("export", "--run", trained_run, "--format", "tflite")
    assert result.code == 2 and "'tflite' is not one of 'onnx'" in result.stderr  # refused by the CLI's choices
