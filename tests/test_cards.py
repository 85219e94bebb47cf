"""Artefacts that describe themselves: the model card of a run, the dataset card of an
archive (both parsed back with huggingface_hub), and the code's git commit in both."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from huggingface_hub import DatasetCard, ModelCard

from melanoma.data.archive import build_archive, open_archive
from melanoma.data.card import DATASET_CARD_FILE, _per_source, preprocessing_text
from melanoma.data.preprocess import PreprocessParams
from melanoma.data.sources import read_dataset
from melanoma.modeling.cards import write_model_card
from melanoma.modeling.runs import MODEL_CARD_FILE
from melanoma.provenance import git_state

REPO = Path(__file__).resolve().parents[1]


def test_git_state_is_none_outside_a_checkout(tmp_path: Path) -> None:
    (tmp_path / "module.py").write_text("")
    assert git_state(tmp_path / "module.py") is None
    assert git_state(tmp_path) is None


def test_git_state_of_this_checkout() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not run from a git checkout")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    state = git_state()
    assert state is not None and state["commit"] == head and isinstance(state["dirty"], bool)


@pytest.mark.realdata
@pytest.mark.slow
def test_model_card_of_an_evaluated_run(trained_run: Path) -> None:
    meta = json.loads((trained_run / "run.json").read_text())
    metrics = json.loads((trained_run / "metrics.json").read_text())
    if git_state() is not None:  # the fixture ran the code of this checkout (a commit since then may have moved HEAD)
        assert re.fullmatch("[0-9a-f]{40}", meta["git"]["commit"]) and isinstance(meta["git"]["dirty"], bool)

    card = ModelCard.load(trained_run / MODEL_CARD_FILE)
    assert card.data.license == "cc-by-nc-4.0" and card.data.library_name == "keras"
    assert card.data.datasets == ["ham10000"] and "research-only" in card.data.tags
    results = {result.metric_name: result for result in card.data.eval_results}
    assert results["balanced multiclass accuracy"].metric_value == round(metrics["bma"], 4)
    assert results["melanoma ROC AUC"].metric_value == round(metrics["melanoma"]["auc"], 4)
    assert {result.dataset_split for result in results.values()} == {"test"}

    text = card.text
    for heading in ("## Model", "## Intended use", "## Training data and licences", "## Evaluation (in-distribution)",
                    "## Calibration", "## Known failure modes and limitations", "## How to reproduce"):
        assert heading in text
    assert "Research use only" in text and "CC BY-NC 4.0" in text
    low, high = metrics["ci"]["bma"]
    assert f"| balanced multiclass accuracy | {metrics['bma']:.3f} | {low:.3f} – {high:.3f} |" in text
    assert f"expected calibration error {metrics['ece']:.3f}" in text.lower()
    assert "melanoma train --archive" in text and f"--seed {meta['training']['seed']}" in text
    assert meta["git"] is None or meta["git"]["commit"] in text


@pytest.mark.realdata
@pytest.mark.slow
def test_model_card_before_evaluation_and_across_clinics(trained_run: Path, small_ham_archive: Path,
                                                         tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    header = open_archive(small_ham_archive).header
    metrics = (run / "metrics.json").read_text()
    (run / "metrics.json").unlink()
    assert "Not evaluated yet" in ModelCard.load(write_model_card(run, header)).text
    assert ModelCard.load(run / MODEL_CARD_FILE).data.eval_results is None

    (run / "metrics.json").write_text(metrics)
    meta = json.loads((run / "run.json").read_text())
    meta["archive"]["test_where"] = "dataset=rosendahl"
    (run / "run.json").write_text(json.dumps(meta))
    card = ModelCard.load(write_model_card(run, header))
    assert "## Evaluation (cross-clinic)" in card.text and "dataset=rosendahl, a clinic the model never saw" in card.text
    assert card.data.eval_results[0].dataset_name == "ham10000 (cross-clinic)"


@pytest.mark.realdata
def test_dataset_card_counts_sources_classes_and_skipped_files(ham_dir: Path, tmp_path: Path) -> None:
    dataset = read_dataset(ham_dir)
    dataset.manifest = dataset.manifest.groupby("label").head(4).reset_index(drop=True)  # 28 real images
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(dataset.manifest.loc[0, "path"]).read_bytes()[:300])
    dataset.manifest.loc[0, "path"] = str(broken)
    out = tmp_path / "archive"
    build_archive(dataset, out, PreprocessParams(image_size=32, color_constancy=False), seed=0, val_fraction=0.2,
                  test_fraction=0.2, test_where=None, workers=1, progress=False)
    archive = open_archive(out)
    assert archive.header["git"] == git_state()

    card = DatasetCard.load(out / DATASET_CARD_FILE)
    assert card.data.license == "cc-by-nc-4.0" and card.data.task_categories == ["image-classification"]
    assert card.data.size_categories == ["n<1K"]
    text = card.text
    # Per source (the clinic of each HAM10000 image) and class, as in the manifest.
    counts = pd.crosstab(archive.manifest["dataset"], archive.manifest["label"])
    for source, row in counts.iterrows():
        cells = " | ".join(str(row.get(name, 0)) for name in archive.classes)
        assert f"| {source} | {cells} | {row.sum()} |" in text
    assert "1 image file(s) could not be used" in text and "skipped.csv" in text
    reason = pd.read_csv(out / "skipped.csv")["reason"].iloc[0]
    assert f"| {reason} | 1 |" in text
    assert "centre-crop to 32x32" in text and "Shades of Gray" not in text
    assert f"--out {out} --image-size 32 --seed 0" in text and "--no-color-constancy --crop-vignette" in text
    assert archive.header["sha256"] in text


def test_dataset_card_names_each_images_source_not_only_ham10000_sites() -> None:
    """A multi-source archive: the ISIC Archive images have a `source` but no HAM `dataset` site."""
    manifest = pd.DataFrame({"label": ["mel", "nv", "nv", "mel"], "dataset": ["rosendahl", "rosendahl", None, None],
                             "source": ["rosendahl", "rosendahl", "isic-archive", "isic-archive"]})
    table = _per_source(manifest, "ham10000+isic2019", ["mel", "nv"])
    assert table.to_dict("index") == {"isic-archive": {"mel": 1, "nv": 1, "total": 2},
                                      "rosendahl": {"mel": 1, "nv": 1, "total": 2}}


@pytest.mark.parametrize("mode, words", [
    ("crop", "then centre-crop to 32x32"), ("pad", "then pad with black to 32x32"),
    ("squash", "resize the whole image to 32x32"), ("lesion", "grow its box by 0.25 of its size per side"),
])
def test_preprocessing_text_names_the_framing(mode: str, words: str) -> None:
    assert words in preprocessing_text(PreprocessParams(32, resize_mode=mode).to_dict())
