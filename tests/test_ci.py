"""The suite itself: without the real data, CI fails instead of skipping half the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_DATA_TEST = "tests/test_sources.py::test_ham10000_as_distributed"


def run_without_data(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("MELANOMA_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", REAL_DATA_TEST],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=300,
                          env={**base, "MELANOMA_SHARED_DATA": str(tmp_path / "absent"), **env})


def test_missing_real_data_skips_locally_and_fails_in_ci(tmp_path: Path) -> None:
    local = run_without_data(tmp_path)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout
    assert f"real dermoscopy data not found at {tmp_path / 'absent'}: real-data test skipped" in local.stdout
    ci = run_without_data(tmp_path, CI="true")
    assert ci.returncode == 1 and "1 error" in ci.stdout, ci.stdout
    assert "CI must run the real-data tests" in ci.stdout
