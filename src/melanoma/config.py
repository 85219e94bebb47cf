"""One typed settings object: defaults here, then a TOML file, then ``MELANOMA_*``
environment variables, then command-line flags (each overrides the one before).

Only this module knows default values; only the CLI and the server's start-up call
:func:`load_settings`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from melanoma.errors import MelanomaError

# The ISIC 2019 task's class order; HAM10000's 7 classes map onto its first 7 + SCC.
ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
MELANOMA_LABELS = ("MEL", "mel", "melanoma", "1")


class Settings(BaseSettings):
    """Every tunable of the sandbox. Paths are relative to the working directory."""

    model_config = SettingsConfigDict(env_prefix="MELANOMA_", extra="forbid", validate_assignment=True)

    # Folders
    data_dir: Path = Field(Path("data/raw"), description="Where raw data sets live (or are downloaded to).")
    archive_dir: Path = Field(Path("data/archive"), description="Where `prepare` writes the NumPy archive.")
    runs_dir: Path = Field(Path("models"), description="Where each training run gets its own folder.")
    reports_dir: Path = Field(Path("reports"), description="Where reports and figures are written.")
    weights_dir: Path = Field(Path("models/weights"), description="Cache of converted pretrained weights.")
    synthetic_dir: Path = Field(Path("data/synthetic"), description="Where the demo writes its synthetic images.")

    # Data and preprocessing
    source: Literal["auto", "isic2019", "ham10000", "isic2020", "folder"] = "auto"
    image_size: int = Field(128, ge=16, le=1024, description="Side of the square images in the archive.")
    classes: list[str] | None = Field(None, description="Restrict to / order these classes (default: all found).")
    crop_vignette: bool = Field(True, description="Crop the dark circular vignette of BCN-style images.")
    color_constancy: bool = Field(True, description="Shades of Gray colour constancy (p=6).")
    hair_removal: bool = Field(False, description="DullRazor-style hair removal (can erase diagnostic dots).")
    resize_mode: Literal["crop", "pad"] = "crop"
    max_pixels: int = Field(50_000_000, ge=1, description="Refuse images with more pixels (decompression bombs).")
    min_side: int = Field(8, ge=1, description="Refuse images with a smaller side.")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    # Splits
    seed: int = 0
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    test_where: str | None = Field(None, description="Put rows matching COLUMN=VALUE in the test split.")

    # Training
    backend: Literal["tensorflow", "jax"] = Field("tensorflow", description="Keras backend: tensorflow (fastest on "
                                                  "a CPU) or jax (data-parallel training, docs/scale-out.md).")
    model: str = Field("efficientnet-lite0", description="The model to train (the pretrained backbone won on HAM10000; see README).")
    weights: str | None = Field(None, description="imagenet, none, or a path to a weights file "
                                "(unset: imagenet for the pretrained backbones, none for the CNN).")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    class_balance: Literal["weights", "sampling", "none"] = "weights"
    augment: bool = True
    early_stopping_patience: int = Field(8, ge=1)
    time_limit_minutes: float | None = Field(None, gt=0, description="Stop training after this many minutes.")
    freeze_epochs: int = Field(2, ge=0, description="Pretrained backbones: epochs that train the new head only.")
    tensorboard: bool = False

    # Evaluation
    target_sensitivity: float = Field(0.741, gt=0, lt=1, description="Melanoma operating point (Brinker 2019).")
    bootstrap_samples: int = Field(1000, ge=0)

    # Demo: a run short enough to watch, on real data when there is some.
    demo_epochs: int = Field(8, ge=1)
    demo_time_limit_minutes: float = Field(4.0, gt=0)
    demo_synthetic_per_class: int = Field(80, ge=10)

    # Explanations
    explain_top_k: int = Field(3, ge=1, description="Explain the k most probable classes.")
    lime_segmentation: Literal["slic", "quickshift"] = Field("slic", description="LIME superpixels (slic is faster).")
    lime_superpixels: int = Field(50, ge=2, description="About how many superpixels SLIC makes.")
    explain_eval_images: int = Field(50, ge=1, description="Images that `explain-eval` averages over.")

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_upload_bytes: int = Field(10_000_000, ge=1)
    lime_max_samples: int = Field(1000, ge=10)
    explain_timeout_seconds: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _fractions_leave_a_training_set(self) -> Settings:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the effective settings: defaults < TOML file < environment < ``overrides``.

    ``overrides`` whose value is ``None`` are ignored, so CLI flags that were not given
    do not hide the TOML file or the environment.
    """
    from_file: dict[str, Any] = {}
    if config_file is not None:
        try:
            from_file = tomllib.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise MelanomaError(f"Config file {config_file} does not exist.") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise MelanomaError(f"Config file {config_file} cannot be read: {exc}") from None
    try:
        from_env = Settings()  # reads MELANOMA_* only
        env_values = from_env.model_dump(include=from_env.model_fields_set)
        given = {k: v for k, v in overrides.items() if v is not None}
        return Settings(**{**from_file, **env_values, **given})
    except ValidationError as exc:
        where = f" (from {config_file}, MELANOMA_* variables or flags)" if config_file else ""
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise MelanomaError(f"Invalid settings{where}: {problems}") from None
