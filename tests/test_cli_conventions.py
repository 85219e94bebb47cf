"""CLI conventions: --version, fixed choices listed by --help and checked before anything
runs, shell completion, and `melanoma runs --format table|csv|json` with every run's status."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pandas as pd
import pytest
from typer.testing import CliRunner

from melanoma import cli as cli_module
from melanoma import config
from melanoma.data.download import DATASETS
from melanoma.data.preprocess import RESIZE_MODES
from melanoma.data.splits import SPLITS
from melanoma.modeling.explain import METHODS
from melanoma.modeling.export import EXPORT_FORMATS
from melanoma.modeling.models import MODEL_NAMES
from melanoma.modeling.predict import ENGINES
from melanoma.modeling.runs import RUN_LIST_COLUMNS, training_process


def test_cli_choices_are_the_librarys() -> None:
    assert set(get_args(config.ModelChoice)) == set(MODEL_NAMES)
    assert set(get_args(config.EngineChoice)) == set(ENGINES)
    assert set(get_args(config.ExplainMethod)) == {*METHODS, "both"}
    assert set(get_args(config.SplitChoice)) == set(SPLITS)
    assert set(get_args(config.ExportFormat)) == set(EXPORT_FORMATS)
    assert set(get_args(config.DownloadChoice)) == set(DATASETS)
    assert set(get_args(config.Settings.model_fields["resize_mode"].annotation)) == set(RESIZE_MODES)


def test_version(cli) -> None:
    from importlib.metadata import version

    result = cli("--version")
    assert result.code == 0 and result.stdout.startswith(f"melanoma {version('melanoma')}")


def _unboxed(text: str) -> str:
    """Click's error panel without its frame and line breaks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_help_lists_the_choices_and_a_wrong_choice_is_refused(cli) -> None:
    help_text = cli("runs", "--help").stdout
    assert "table|csv|json" in help_text
    result = cli("train", "--model", "resnet50", "--archive", "nowhere")
    message = _unboxed(result.stderr)
    assert result.code == 2 and "'resnet50' is not one of" in message
    for name in MODEL_NAMES:
        assert f"'{name}'" in message
    result = cli("evaluate", "--run", "nowhere", "--split", "holdout")
    assert result.code == 2 and "'holdout' is not one of 'train', 'val', 'test'" in _unboxed(result.stderr)


def test_shell_completion_completes_commands_and_choices() -> None:
    assert "--install-completion" in CliRunner().invoke(cli_module.app, ["--help"]).output

    def complete(words: str) -> list[str]:
        env = {"_MELANOMA_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        result = CliRunner().invoke(cli_module.app, [], env=env, prog_name="melanoma")
        return result.output.split()

    assert complete("melanoma tr") == ["train"]
    assert complete("melanoma train --model efficientnet") == ["efficientnetb0", "efficientnet-lite0", "efficientnet-lite1",
                                                               "efficientnet-lite2"]


def _write_run(runs: Path, name: str, **meta) -> Path:
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run_id": name, "model": "cnn", "image_size": 64, **meta}))
    return folder


def test_runs_lists_finished_unfinished_failed_and_unreadable_runs(cli, tmp_path: Path) -> None:
    runs = tmp_path / "models"
    done = _write_run(runs, "a-complete", status="complete", epochs_done=3, best={"val_bma": 0.5})
    (done / "model.keras").write_bytes(b"")
    (done / "metrics.json").write_text(json.dumps({"split": "test", "bma": 0.42, "ece": 0.1,
                                                   "melanoma": {"auc": 0.8}}))
    _write_run(runs, "b-interrupted", status="interrupted", epochs_done=1)
    _write_run(runs, "c-running", status="running", epochs_done=0, process=training_process())
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # a process that is gone: the training crashed or was killed
    _write_run(runs, "d-crashed", status="running", epochs_done=2,
               process={**training_process(), "pid": finished.pid})
    (runs / "e-corrupt").mkdir()
    (runs / "e-corrupt" / "run.json").write_text("{not json")
    (runs / "not-a-run").mkdir()

    result = cli("runs", "--dir", runs, "--format", "json")
    assert result.code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(row["run"], row["status"]) for row in rows] == [
        ("a-complete", "complete"), ("b-interrupted", "interrupted"), ("c-running", "running"),
        ("d-crashed", "failed"), ("e-corrupt", "unreadable")]
    assert rows[0]["bma"] == 0.42 and rows[0]["melanoma_auc"] == 0.8 and rows[0]["problem"] is None
    assert rows[1]["problem"] == "no model.keras yet" and "corrupt" in rows[4]["problem"]

    table = pd.read_csv(io.StringIO(cli("runs", "--dir", runs, "--format", "csv").stdout))
    assert list(table.columns) == list(RUN_LIST_COLUMNS) and table["status"].tolist() == [row["status"] for row in rows]

    text = cli("runs", "--dir", runs).stdout
    for row in rows:
        assert row["run"] in text and row["status"] in text


@pytest.mark.parametrize("fmt, expected", [("json", "[]"), ("csv", ",".join(RUN_LIST_COLUMNS))])
def test_runs_of_an_empty_folder(cli, tmp_path: Path, fmt: str, expected: str) -> None:
    assert cli("runs", "--dir", tmp_path, "--format", fmt).stdout.strip() == expected
