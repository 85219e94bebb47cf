"""TensorFlow's start-up lines stay out of the CLI's output (MELANOMA_TF_LOGS=1 lets them through)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from melanoma.quiet import _QuietImport, quiet_tensorflow, without_absl_info

# What `import tensorflow` printed before (TensorFlow 2.21 on Linux, TF_CPP_MIN_LOG_LEVEL=2)
STARTUP = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
           b"I0000 00:00:1795926139.066650   30288 port.cc:153] oneDNN custom operations are on. You may see slightly "
           b"different numerical results due to floating-point round-off errors from different computation orders. "
           b"To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.\n")


def test_absl_info_lines_are_dropped_and_everything_else_kept() -> None:
    warning = b"W0000 00:00:1795926139.1 30288 dso_loader.cc:64] Could not load dynamic library 'libcuda.so.1'\n"
    python = b"/lib/site.py:3: DeprecationWarning: old\n"
    assert without_absl_info(STARTUP * 2) == b""
    assert without_absl_info(STARTUP + warning + python) == warning + python
    assert without_absl_info(b"I think so\n") == b"I think so\n"


def test_tf_logs_variable_leaves_tensorflow_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    environ: dict[str, str] = {"MELANOMA_TF_LOGS": "1"}
    quiet_tensorflow(environ)
    assert environ == {"MELANOMA_TF_LOGS": "1"} and not any(isinstance(f, _QuietImport) for f in sys.meta_path)
    environ = {}
    quiet_tensorflow(environ)
    assert environ == {"TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.mark.realdata
def test_a_command_that_loads_tensorflow_prints_none_of_its_lines(trained_run: Path, ham_images_by_class: dict[str, Path]) -> None:
    env = {name: value for name, value in os.environ.items() if name not in ("TF_CPP_MIN_LOG_LEVEL", "MELANOMA_TF_LOGS")}
    result = subprocess.run([sys.executable, "-m", "melanoma", "predict", "--run", str(trained_run), "--format", "csv",
                             str(ham_images_by_class["mel"])], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert ham_images_by_class["mel"].name in result.stdout
    for noise in ("absl", "oneDNN", "I0000", "cpu_feature_guard", "port.cc"):
        assert noise not in result.stderr, result.stderr
