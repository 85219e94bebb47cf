"""Settings precedence: defaults < TOML file < MELANOMA_* environment < flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from melanoma.config import Settings, load_settings
from melanoma.errors import MelanomaError


def test_defaults_are_relative_to_the_working_directory():
    settings = Settings()
    assert not settings.data_dir.is_absolute()
    assert settings.image_size == 128
    assert settings.val_fraction == settings.test_fraction == 0.15


def test_precedence_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = tmp_path / "melanoma.toml"
    config.write_text('image_size = 96\nseed = 7\nmodel = "mobilenetv3small"\n')
    monkeypatch.setenv("MELANOMA_SEED", "11")
    settings = load_settings(config, model="cnn", epochs=None)
    assert settings.image_size == 96  # from the file
    assert settings.seed == 11  # the environment beats the file
    assert settings.model == "cnn"  # a flag beats both
    assert settings.epochs == Settings().epochs  # a flag not given hides nothing


def test_unknown_or_invalid_keys_name_the_file(tmp_path: Path):
    config = tmp_path / "bad.toml"
    config.write_text("image_sise = 96\n")
    with pytest.raises(MelanomaError, match="bad.toml.*image_sise"):
        load_settings(config)
    config.write_text("val_fraction = 0.5\ntest_fraction = 0.6\n")
    with pytest.raises(MelanomaError, match="below 1"):
        load_settings(config)


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(MelanomaError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("image_size = = 3")
    with pytest.raises(MelanomaError, match="broken.toml"):
        load_settings(broken)


def test_cli_config_show_and_clear_error(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text("image_size = 200\n")
    shown = subprocess.run(
        [sys.executable, "-m", "melanoma", "--config", str(config), "config", "show"],
        capture_output=True, text=True, check=False, env={"COLUMNS": "200", "PATH": ""},
    )
    assert shown.returncode == 0, shown.stderr
    assert "200" in shown.stdout and "MELANOMA_IMAGE_SIZE" in shown.stdout
    config.write_text("image_size = 'big'\n")
    failed = subprocess.run(
        [sys.executable, "-m", "melanoma", "--config", str(config), "config", "show"],
        capture_output=True, text=True, check=False,
    )
    assert failed.returncode == 2
    assert "image_size" in failed.stderr and "Traceback" not in failed.stderr


def test_a_config_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path):
    config = tmp_path / "latin1.toml"
    config.write_bytes('data_dir = "donn\u00e9es"\n'.encode("latin-1"))
    with pytest.raises(MelanomaError, match=r"latin1.toml is not UTF-8 text \(the byte at offset 16\)"):
        load_settings(config)


def test_a_misspelt_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setenv("MELANOMA_IMAGE_SIZ", "96")
    monkeypatch.setenv("MELANOMA_XYZZY", "1")
    monkeypatch.setenv("MELANOMA_SEED", "3")  # a setting: no warning
    with caplog.at_level("WARNING", logger="melanoma.config"):
        settings = load_settings()
    assert settings.image_size == 128 and settings.seed == 3
    assert [r.getMessage() for r in caplog.records] == [
        ("Warning: the environment variable MELANOMA_IMAGE_SIZ is not a setting and is ignored "
         "(did you mean MELANOMA_IMAGE_SIZE?)."),
        "Warning: the environment variable MELANOMA_XYZZY is not a setting and is ignored.",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOMA_")}
    shown = subprocess.run([sys.executable, "-m", "melanoma", "config", "show"], capture_output=True, text=True, check=False,
                           env={**env, "MELANOMA_IMAGE_SIZ": "96", "COLUMNS": "200"})
    assert shown.returncode == 0 and "MELANOMA_IMAGE_SIZ is not a setting" in shown.stderr


@pytest.mark.parametrize(("name", "value"), [
    ("explain_timeout_seconds", float("inf")), ("explain_timeout_seconds", float("nan")),
    ("explain_timeout_seconds", 1e6), ("lime_max_samples", 10**8), ("max_upload_bytes", 10**11),
    ("max_pixels", 10**12), ("batch_size", 10**6), ("time_limit_minutes", float("inf")),
])
def test_absurd_values_are_refused(name: str, value: float):
    with pytest.raises(MelanomaError, match=f"Invalid settings: {name}: Input should be"):
        load_settings(**{name: value})
