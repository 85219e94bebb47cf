"""One typed settings object: defaults here, then a TOML file, then ``MELANOMA_*``
environment variables, then command-line flags (each overrides the one before).

Only this module knows default values; only the CLI and the server's start-up call
:func:`load_settings`.
"""

from __future__ import annotations

import difflib
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from melanoma.errors import MelanomaError

# The ISIC 2019 task's class order; HAM10000's 7 classes map onto its first 7 + SCC.
ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
MELANOMA_LABELS = ("MEL", "mel", "melanoma", "1")
NEVUS_LABELS = ("NV", "nv", "nevus")

# Fixed choices, for the settings and the CLI's options alike (so `--help` lists them and a
# wrong value is refused before anything runs). Written out here rather than imported from
# the modules that use them, so that the CLI starts without loading those (tests check they agree).
SourceChoice = Literal["auto", "isic2019", "ham10000", "isic2020", "folder"]
Isic2020Target = Literal["target", "diagnosis"]
DownloadChoice = Literal["isic2019"]
ModelChoice = Literal["cnn", "mobilenetv3small", "efficientnetb0", "efficientnet-lite0", "efficientnet-lite1",
                      "efficientnet-lite2"]
ClassBalanceChoice = Literal["weights", "sampling", "class-source", "none"]
SplitChoice = Literal["train", "val", "test"]
SegmentationChoice = Literal["slic", "quickshift"]
PredictFormat = Literal["table", "csv", "isic", "json"]
EngineChoice = Literal["keras", "onnx"]
ExplainMethod = Literal["lime", "gradcam", "both"]
ExportFormat = Literal["onnx"]
ListFormat = Literal["table", "csv", "json"]
LogFormat = Literal["json", "text"]
# What each class code means, for people (HAM10000's codes and ISIC 2019's).
CLASS_NAMES = {
    "mel": "Melanoma", "nv": "Melanocytic nevus", "bcc": "Basal cell carcinoma",
    "akiec": "Actinic keratosis / intraepithelial carcinoma", "ak": "Actinic keratosis",
    "bkl": "Benign keratosis-like lesion", "df": "Dermatofibroma", "vasc": "Vascular lesion",
    "scc": "Squamous cell carcinoma", "unk": "Unknown", "melanoma": "Melanoma",
}
# Share of in-distribution (validation) images that the out-of-distribution gate flags.
DEFAULT_OOD_FLAG_FRACTION = 0.05
ENV_PREFIX = "MELANOMA_"
# MELANOMA_* variables that are not settings: the --config file, the spec `serve` hands
# its worker processes, the notebook's inputs, the tests' data folder and TensorFlow's logs
# (melanoma.quiet).
OTHER_ENV_VARIABLES = ("MELANOMA_CONFIG", "MELANOMA_SERVE_SPEC", "MELANOMA_NOTEBOOK_ARCHIVE", "MELANOMA_NOTEBOOK_RUN",
                       "MELANOMA_SHARED_DATA", "MELANOMA_TF_LOGS")
logger = logging.getLogger(__name__)


MINUTES_PER_MONTH = 30 * 24 * 60


class Settings(BaseSettings):
    """Every tunable of the sandbox. Paths are relative to the working directory.

    Numbers have upper bounds too: an absurd value (an upload limit of 100 GB, a timeout
    of infinity) is a typo, and would only fail later, less clearly.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_assignment=True,
                                      allow_inf_nan=False)

    # Folders
    data_dir: Path = Field(Path("data/raw"), description="Where raw data sets live (or are downloaded to).")
    archive_dir: Path = Field(Path("data/archive"), description="Where `prepare` writes the NumPy archive.")
    runs_dir: Path = Field(Path("models"), description="Where each training run gets its own folder.")
    reports_dir: Path = Field(Path("reports"), description="Where reports and figures are written.")
    weights_dir: Path = Field(Path("models/weights"), description="Cache of converted pretrained weights.")
    synthetic_dir: Path = Field(Path("data/synthetic"), description="Where the demo writes its synthetic images.")

    # Data and preprocessing
    source: SourceChoice = "auto"
    image_size: int = Field(128, ge=16, le=1024, description="Side of the square images in the archive.")
    classes: list[str] | None = Field(None, description="Restrict to / order these classes (default: all found).")
    crop_vignette: bool = Field(True, description="Crop the dark circular vignette of BCN-style images.")
    color_constancy: bool = Field(True, description="Shades of Gray colour constancy (p=6).")
    hair_removal: bool = Field(False, description="DullRazor-style hair removal (can erase diagnostic dots).")
    resize_mode: Literal["crop", "pad", "squash", "lesion"] = "crop"
    max_pixels: int = Field(50_000_000, ge=1, le=1_000_000_000, description="Refuse images with more pixels (decompression bombs).")
    min_side: int = Field(8, ge=1, le=4096, description="Refuse images with a smaller side.")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=1024)

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
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    class_balance: ClassBalanceChoice = Field("class-source", description="How training evens out classes: class-source "
                                              "(batches balanced by class, and by source within each class; it raised "
                                              "melanoma vs excised nevi AUC on an unseen clinic with 3 of 3 seeds, README "
                                              "'Accuracy across clinics'), sampling, weights or none.")
    augment: bool = True
    extra_augment: bool = Field(False, description="Also jitter aspect ratio, hue, saturation and illuminant.")
    vignette_augment: bool = Field(True, description="Also blacken the corners of half the training images "
                                   "(the dark circular border of many dermatoscopes; it gained melanoma AUC on both "
                                   "held-out sources, README 'Accuracy across clinics').")
    early_stopping_patience: int = Field(8, ge=1, le=10_000)
    time_limit_minutes: float | None = Field(None, gt=0, le=MINUTES_PER_MONTH, description="Stop training after this many minutes.")
    freeze_epochs: int = Field(2, ge=0, le=10_000, description="Pretrained backbones: epochs that train the new head only.")
    tensorboard: bool = False

    # Evaluation
    target_sensitivity: float = Field(0.741, gt=0, lt=1, description="Melanoma operating point (Brinker 2019).")
    bootstrap_samples: int = Field(1000, ge=0, le=100_000)
    compare_min_class_images: int = Field(30, ge=1, le=100_000, description="`compare`: classes with fewer test images are "
                                          "left out of its second BMA (one image of a tiny class moves BMA a lot).")

    # Predictions that know their limits (calibration, out-of-distribution gate, input quality)
    calibration: bool = Field(True, description="Apply the run's temperature (fitted on validation) to probabilities.")
    ood_flag_fraction: float = Field(DEFAULT_OOD_FLAG_FRACTION, gt=0, lt=1,
                                     description="Share of validation images the out-of-distribution gate flags.")
    quality_min_side: int | None = Field(None, ge=1, le=100_000, description="Warn when an image's shorter side is below "
                                         "this (unset: the model's input size, i.e. the image is enlarged).")
    quality_max_aspect_ratio: float = Field(3.0, gt=1, le=1000, description="Warn when long side / short side is above this.")
    quality_min_contrast: float = Field(4.0, ge=0, le=255, description="Warn (near-blank) when the grey-level standard "
                                        "deviation is below this (HAM10000 and ISIC: 6.4 at least).")
    quality_min_sharpness: float = Field(12.0, ge=0, le=1e6, description="Warn (blurred) when the variance of the Laplacian "
                                         "at 64 px is below this (HAM10000: 0.5th percentile 23).")
    cross_site_run: Path | None = Field(None, description="A run of the same model trained for the cross-clinic "
                                        "split: its test figures appear in the served model card.")

    # Demo: a run short enough to watch, on real data when there is some.
    demo_epochs: int = Field(8, ge=1, le=1000)
    demo_time_limit_minutes: float = Field(4.0, gt=0, le=MINUTES_PER_MONTH)
    demo_synthetic_per_class: int = Field(80, ge=10, le=10_000)

    # Explanations
    explain_top_k: int = Field(3, ge=1, le=100, description="Explain the k most probable classes.")
    lime_segmentation: SegmentationChoice = Field("slic", description="LIME superpixels (slic is faster).")
    lime_superpixels: int = Field(50, ge=2, le=2000, description="About how many superpixels SLIC makes.")
    explain_eval_images: int = Field(50, ge=1, le=100_000, description="Images that `explain-eval` averages over.")

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_upload_bytes: int = Field(10_000_000, ge=1, le=1_000_000_000)
    lime_max_samples: int = Field(1000, ge=10, le=100_000)
    explain_timeout_seconds: float = Field(60.0, gt=0, le=3600)
    predict_timeout_seconds: float = Field(10.0, gt=0, le=3600, description="Deadline of one /v1/predict (decoding and model).")
    serve_max_pixels: int = Field(25_000_000, ge=1, le=1_000_000_000, description="Largest image the server decodes (pixels).")
    max_request_pixels: int = Field(100_000_000, ge=1, le=10_000_000_000, description="Pixels that the files of one request may hold in all.")
    max_concurrent_decodes: int = Field(8, ge=1, le=1024, description="Requests decoding images at once; more get a 503 at once.")
    max_concurrent_explanations: int = Field(4, ge=1, le=1024, description="Explanations running or queued; more get a 503 at once.")
    limit_concurrency: int = Field(200, ge=1, le=100_000, description="uvicorn: connections and requests at once, then 503.")
    keep_alive_seconds: int = Field(5, ge=1, le=3600, description="Close an idle keep-alive connection after this.")
    header_timeout_seconds: float = Field(10.0, gt=0, le=3600, description="Close a connection whose request headers take longer.")
    body_timeout_seconds: float = Field(30.0, gt=0, le=3600, description="408 for a request body that takes longer to arrive.")
    trusted_hosts: list[str] = Field(["127.0.0.1", "localhost", "::1"],
                                     description="Host header values served (behind a proxy: its public name; * for any).")
    allowed_origins: list[str] = Field([], description="Other web origins whose pages may call the server (CORS).")
    serve_docs: bool = Field(True, description="Serve the OpenAPI page (/docs, /redoc, /openapi.json).")
    serve_metrics: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    ui_cache_seconds: int = Field(3600, ge=1, le=30 * 24 * 3600, description="The playground deletes uploads and results older than this.")
    worker_healthcheck_seconds: int = Field(60, ge=1, le=3600, description="serve --workers N: replace a worker that "
                                            "does not answer uvicorn's health check within this (a worker loading "
                                            "TensorFlow and the model is silent for seconds; uvicorn's 5 s kill it).")
    log_format: LogFormat = Field("json", description="Server log lines (app, uvicorn, Gradio) on stderr: json (one "
                                  "object per line, for log collectors) or text (for a terminal).")

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
            from_file = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MelanomaError(f"Config file {config_file} does not exist.") from None
        except UnicodeDecodeError as exc:
            raise MelanomaError(f"Config file {config_file} is not UTF-8 text (the byte at offset {exc.start}).",
                                hint="TOML files are UTF-8: save it as UTF-8.") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise MelanomaError(f"Config file {config_file} cannot be read: {exc}") from None
    for warning in unknown_env_variables(os.environ):
        logger.warning(warning)
    try:
        from_env = Settings()  # reads MELANOMA_* only
        env_values = from_env.model_dump(include=from_env.model_fields_set)
        given = {k: v for k, v in overrides.items() if v is not None}
        return Settings(**{**from_file, **env_values, **given})
    except ValidationError as exc:
        where = f" (from {config_file}, MELANOMA_* variables or flags)" if config_file else ""
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise MelanomaError(f"Invalid settings{where}: {problems}") from None


def unknown_env_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``MELANOMA_*`` name in ``environ`` that is no setting: a typo
    there would otherwise be ignored without a word, while the same typo in TOML is refused."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | set(OTHER_ENV_VARIABLES)
    warnings = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known:
            # Compared without the prefix, which every name shares.
            suffixes = [k.removeprefix(ENV_PREFIX) for k in known]
            close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), suffixes, n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            warnings.append(f"Warning: the environment variable {name} is not a setting and is ignored{hint}.")
    return warnings
