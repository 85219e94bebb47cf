"""Shared fixtures. Real-data tests read ../shared/data and are skipped, with a message
saying so, where it is absent (CI always has it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MELANOMA_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ham10000" / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real dermoscopy data not found at {SHARED_DATA}: real-data test skipped")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ham_dir(shared_data: Path) -> Path:
    return shared_data / "ham10000"


@pytest.fixture(scope="session")
def isic2019_csv_dir(shared_data: Path) -> Path:
    return shared_data / "isic2019"
