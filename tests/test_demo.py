"""`melanoma demo` never replaces an archive it did not make (training is stubbed out:
only the data step is under test here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from melanoma.data.archive import build_archive
from melanoma.data.preprocess import PreprocessParams
from melanoma.data.sources import read_dataset
from melanoma.data.synthetic import make_synthetic_dataset


def test_demo_replaces_only_an_archive_it_made(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from melanoma.cli import (
        serving as demo_module,  # the module whose demo calls the later steps
    )

    later_steps = []
    monkeypatch.setattr(demo_module, "train_command", lambda ctx, **kwargs: later_steps.append("train"))
    monkeypatch.setattr(demo_module, "evaluate_command", lambda ctx, **kwargs: later_steps.append("evaluate"))
    monkeypatch.setattr("melanoma.modeling.runs.add_examples", lambda run_dir, manifest: None)
    archive, synthetic = tmp_path / "archive", tmp_path / "synthetic"
    for name, value in {"DATA_DIR": tmp_path / "no-data", "ARCHIVE_DIR": archive, "SYNTHETIC_DIR": synthetic,
                        "IMAGE_SIZE": 32, "DEMO_SYNTHETIC_PER_CLASS": 10, "WORKERS": 1}.items():
        monkeypatch.setenv(f"MELANOMA_{name}", str(value))
    (tmp_path / "no-data").mkdir()

    # The user's own archive of their own data, where the demo would write.
    theirs = make_synthetic_dataset(tmp_path / "their-data", n_per_class=3, seed=1, size=48)
    build_archive(read_dataset(theirs), archive, PreprocessParams(image_size=32), seed=0, val_fraction=0.2,
                  test_fraction=0.2, test_where=None, workers=1, progress=False)
    header = (archive / "header.json").read_text()

    refused = cli("demo", "--no-serve")
    assert refused.code == 2, refused
    assert f"{archive} holds an archive of {theirs} that the demo did not make" in refused.stderr
    assert "MELANOMA_ARCHIVE_DIR" in refused.stderr and "--force" in refused.stderr
    assert (archive / "header.json").read_text() == header and not synthetic.exists() and not later_steps

    replaced = cli("demo", "--no-serve", "--force")
    assert replaced.code == 0, replaced
    assert json.loads((archive / "header.json").read_text())["data_root"] == str(synthetic)
    assert later_steps == ["train", "evaluate"]

    # Its own archive the demo replaces without being asked: here with the user's data again.
    monkeypatch.setenv("MELANOMA_DATA_DIR", str(theirs))
    again = cli("demo", "--no-serve")
    assert again.code == 0, again
    assert json.loads((archive / "header.json").read_text())["data_root"] == str(theirs)
