"""The walkthrough notebook runs, top to bottom, on the small real archive and trained run."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


@pytest.mark.slow
@pytest.mark.realdata
def test_walkthrough_notebook_runs(small_ham_archive: Path, trained_run: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    # The notebook's defaults, as after `make demo`: the settings' archive and newest run.
    monkeypatch.setenv("MELANOMA_ARCHIVE_DIR", str(small_ham_archive))
    monkeypatch.setenv("MELANOMA_RUNS_DIR", str(trained_run.parent))
    monkeypatch.setenv("MELANOMA_LIME_MAX_SAMPLES", "100")
    for variable in ("MELANOMA_NOTEBOOK_ARCHIVE", "MELANOMA_NOTEBOOK_RUN"):
        monkeypatch.delenv(variable, raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel runs this interpreter (the venv's ipykernel), in a scratch folder.
    NotebookClient(notebook, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 3  # the class examples, LIME, Grad-CAM
    text = "".join(str(o.get("data", {}).get("text/plain", "")) + o.get("text", "") for o in outputs)
    assert str(trained_run) in text and "local R²" in text
