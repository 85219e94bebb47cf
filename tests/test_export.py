"""`melanoma export --format onnx`: ONNX Runtime gives the Keras model's probabilities."""

from __future__ import annotations

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


def test_unknown_export_format(cli, trained_run: Path) -> None:
    with pytest.raises(MelanomaError, match="Unknown export format 'tflite'"):
        export_model(trained_run, "tflite")
    result = cli("export", "--run", trained_run, "--format", "tflite")
    assert result.code == 2 and "Unknown export format" in result.stderr
