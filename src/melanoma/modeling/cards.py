"""The model card of a run: ``MODEL_CARD.md``, in the Hugging Face model-card format (YAML
metadata with a ``model-index`` of the evaluation results, then Markdown sections), so
that a person can read what the model is and ``huggingface_hub.ModelCard.load`` can
parse it.

``train`` writes it when a run stops; ``evaluate`` rewrites it with the metrics. It holds:
the model and how it was trained, the data and their licences, intended use (research
only), the evaluation (in distribution or across clinics) with confidence intervals,
calibration, known failure modes, and the commands that reproduce the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from melanoma.data.card import licence, prepare_command, preprocessing_text
from melanoma.files import write_text
from melanoma.modeling.runs import (
    METRICS_FILE,
    MODEL_CARD_FILE,
    VERSIONS_FILE,
    read_run_meta,
    recorded_archive,
    recorded_training,
)
from melanoma.modeling.train_config import TrainConfig

DISCLAIMER = ("**Research use only.** This model is a research artefact for studying dermoscopic image "
              "classification. It is not a medical device, has not been clinically validated, and must not be "
              "used to diagnose, screen or triage patients.")
# What the measurements on HAM10000 in the README ("Accuracy on real data") showed for the
# models trained here; each run's own numbers are in its evaluation section.
KNOWN_FAILURES = [
    ("**Another clinic.** Trained on the three Vienna sources of HAM10000 and tested on rosendahl (Queensland), "
     "every model tried lost most of its skill (the default model: balanced accuracy 0.70 -> 0.42, melanoma AUC "
     "0.89 -> 0.70). The loss is in separating melanoma from *excised* nevi: all rosendahl nevi were cut and "
     "confirmed by histopathology (atypical enough to cut), while most Vienna nevi are follow-up images of "
     "unremarkable moles; melanoma-vs-nevus AUC fell to near chance (0.57). Expect a model trained on one "
     "collection to fail on atypical nevi from another."),
    ("**Rare classes.** Classes with few training images (dermatofibroma, vascular lesions, actinic keratosis) "
     "have wide confidence intervals, and their recall moves a lot between runs."),
    ("**Out of scope images.** Clinical (non-dermoscopic) photos, non-skin images, other lesion types and "
     "images of other skin types than the training data are not recognised as such: the model always answers "
     "with one of its classes."),
    ("**Calibration** was measured on the evaluated split only; probabilities from another clinic are "
     "over-confident (expected calibration error 0.03 in distribution, 0.20 across clinics for the default model)."),
]


def reproduce_command(meta: dict[str, Any], run_dir: Path, archive_path: Path | str) -> str:
    """The command that makes the run again: `melanoma ensemble` of its members for an
    ensemble, else `melanoma train` with its recorded options."""
    ensemble = meta.get("ensemble")
    if ensemble:
        return f"melanoma ensemble --out {run_dir} --runs " + " ".join(member["run"] for member in ensemble["members"])
    return train_command(recorded_training(meta, run_dir), archive_path)


def train_command(config: TrainConfig, archive_path: Path | str) -> str:
    """The `melanoma train` command that repeats a run: every recorded option is spelled
    out, so that a later change of a default does not change what it trains."""
    def switch(name: str, on: bool) -> str:
        return f"--{name}" if on else f"--no-{name}"

    return (
        f"melanoma train --archive {archive_path} --model {config.model} --weights {config.weights} "
        f"--epochs {config.epochs} --batch-size {config.batch_size} --lr {config.learning_rate} --seed {config.seed} "
        f"--class-balance {config.class_balance} {switch('augment', config.augment)} "
        f"{switch('extra-augment', config.extra_augment)} {switch('vignette-augment', config.vignette_augment)} "
        f"--freeze-epochs {config.freeze_epochs}"
        f"{' --time-limit ' + str(config.time_limit_minutes) if config.time_limit_minutes else ''}"
    )


def evaluation_kind(meta: dict[str, Any], split: str) -> str:
    """"in-distribution" or "cross-clinic" (a test split chosen by ``--test-where``)."""
    return "cross-clinic" if split == "test" and (meta.get("archive") or {}).get("test_where") else "in-distribution"


def render_model_card(run_dir: Path, archive_header: dict[str, Any]) -> str:
    """The card's text for the run in ``run_dir``, trained on the archive with ``archive_header``."""
    from huggingface_hub import ModelCardData

    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    metrics = _read_json(run_dir / METRICS_FILE)
    versions = _read_json(run_dir / VERSIONS_FILE) or {}
    source = archive_header.get("source", "unknown")
    licence_id, licence_words = licence(source)
    data = ModelCardData(
        model_name=f"melanoma-{meta.get('run_id')}", license=licence_id, library_name="keras",
        pipeline_tag="image-classification", tags=["dermoscopy", "skin-lesion", "melanoma", "research-only"],
        datasets=[source], metrics=["balanced_accuracy", "roc_auc", "average_precision"],
        eval_results=_eval_results(meta, metrics, source) or None,
    )
    sections = [
        f"# Model card: run `{meta.get('run_id')}`",
        "",
        DISCLAIMER,
        "",
        *_details(meta, versions),
        *_training_data(meta, archive_header, licence_words),
        *_evaluation(meta, metrics, run_dir),
        "## Known failure modes and limitations",
        "",
        *[f"- {failure}" for failure in KNOWN_FAILURES],
        *_weak_classes(metrics),
        "",
        "## How to reproduce",
        "",
        ("With the code at the commit above and the library versions below (the repository's "
         "`requirements.lock` pins them all):"),
        "",
        "```",
        prepare_command(archive_header, recorded_archive(meta, run_dir)),
        reproduce_command(meta, run_dir, recorded_archive(meta, run_dir)),
        f"melanoma evaluate --run {run_dir}" + (f" --split {metrics['split']}" if metrics else "")
        + (" --tta" if metrics and metrics.get("tta") else ""),
        "```",
        "",
        "Library versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()) + ".",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections)


def write_model_card(run_dir: Path, archive_header: dict[str, Any]) -> Path:
    """Write (or refresh) the run's ``MODEL_CARD.md``, atomically."""
    return write_text(Path(run_dir) / MODEL_CARD_FILE, render_model_card(run_dir, archive_header))


def _details(meta: dict[str, Any], versions: dict[str, Any]) -> list[str]:
    training = meta.get("training", {})
    best = meta.get("best") or {}
    git = meta.get("git")
    code = "unknown (not run from a git checkout)" if not git else (
        f"`{git['commit']}`" + (" with uncommitted changes" if git["dirty"] else ""))
    return [
        "## Model",
        "",
        (f"- Architecture: `{meta.get('model')}`, initial weights: {meta.get('weights')}; Keras "
         f"{versions.get('keras', '?')} ({versions.get('keras_backend', '?')} backend), saved as `model.keras` "
         "(`melanoma export` adds `model.onnx`, which describes its input in its metadata)."),
        (f"- Input: {meta.get('image_size')}x{meta.get('image_size')} RGB, float32 pixel values 0..255 "
         "(the model rescales and normalises them itself); output: softmax probabilities over the classes "
         f"{', '.join(meta.get('classes', []))} (in this order)."),
        (f"- Training: status {meta.get('status')}, {meta.get('epochs_done')} epoch(s) of at most {training.get('epochs')}"
         f"{', stopped by ' + str(meta.get('stopped_by')).replace('_', ' ') if meta.get('stopped_by') else ''}, "
         f"{float(meta.get('train_seconds', 0)) / 60:.1f} min; batch {training.get('batch_size')}, Adam lr "
         f"{training.get('learning_rate')} with cosine decay, class balance: {training.get('class_balance')}, "
         f"augmentation: {'on' if training.get('augment') else 'off'}, seed {training.get('seed')}. The saved model is "
         f"the epoch with the best validation balanced accuracy (epoch {best.get('epoch')}, "
         f"{fmt(best.get('val_bma'))})."),
        f"- Code: melanoma {versions.get('melanoma', '?')}, commit {code}.",
        "",
        "## Intended use",
        "",
        ("Research on dermoscopic skin-lesion classification: comparing models, preprocessing and training "
         "choices, studying failure modes, calibration and explanations. Not for clinical use of any kind, "
         "and not for images other than dermoscopic images of skin lesions."),
        "",
    ]


def _training_data(meta: dict[str, Any], header: dict[str, Any], licence_words: str) -> list[str]:
    archive = meta.get("archive") or {}
    counts = header.get("split_counts", {})
    split = (f"test = the images where {archive['test_where']} (another clinic); train/val from the rest"
             if archive.get("test_where") else "random, grouped by lesion")
    return [
        "## Training data and licences",
        "",
        (f"- Data set: `{header.get('source')}` from `{header.get('data_root')}`"
         f"{' (SYNTHETIC: no result means anything)' if header.get('synthetic') else ''}; archive `{archive.get('path')}` "
         f"(sha256 `{str(archive.get('sha256'))[:16]}…`, described in its `DATASET_CARD.md`)."),
        (f"- Images: {counts.get('train')} train, {counts.get('val')} validation, {counts.get('test')} test; "
         f"split {split}, seed {archive.get('seed')}."),
        f"- Per class: {', '.join(f'{name} {count}' for name, count in header.get('class_counts', {}).items())}.",
        f"- Preprocessing: {preprocessing_text(meta['preprocess'])}",
        (f"- Licence of the images: {licence_words} The model was trained on them: the same terms apply to "
         "its use (the code is MIT-licensed)."),
        "",
    ]


def _evaluation(meta: dict[str, Any], metrics: dict[str, Any] | None, run_dir: Path) -> list[str]:
    if not metrics:
        return ["## Evaluation", "", f"Not evaluated yet: `melanoma evaluate --run {run_dir}` adds it here.", ""]
    kind = evaluation_kind(meta, metrics["split"])
    ci = metrics.get("ci") or {}
    melanoma = metrics.get("melanoma") or {}
    where = (f"images where {meta['archive']['test_where']}, a clinic the model never saw"
             if kind == "cross-clinic" else "held-out lesions from the same sources as the training images")
    ci_words = (f"{round(ci.get('level', 0.95) * 100)}% CI from {ci['samples']} bootstrap resamples of lesions"
                if ci else "no confidence intervals (run without bootstrap)")
    lines = [
        f"## Evaluation ({kind})",
        "",
        (f"On the {metrics['split']} split: {metrics['n_images']} {where}"
         f"{'; predictions averaged over 8 flips/rotations (TTA)' if metrics.get('tta') else ''}. "
         f"Evaluated {metrics.get('evaluated')}; {ci_words}."),
        "",
        "| metric | value | 95% CI |",
        "|---|---|---|",
        f"| balanced multiclass accuracy | {fmt(metrics.get('bma'))} | {fmt_ci(ci.get('bma'))} |",
        f"| melanoma ROC AUC | {fmt(melanoma.get('auc'))} | {fmt_ci(ci.get('melanoma_auc'))} |",
        f"| macro ROC AUC | {fmt(metrics.get('macro_auc'))} | |",
        f"| macro average precision | {fmt(metrics.get('macro_ap'))} | |",
        f"| accuracy | {fmt(metrics.get('accuracy'))} | |",
    ]
    if melanoma:
        lines.append(f"| melanoma sensitivity / specificity at the validation threshold {melanoma['threshold']:.3f} | "
                     f"{fmt(melanoma.get('sensitivity'))} / {fmt(melanoma.get('specificity'))} | |")
    lines += ["", "| class | images | recall | ROC AUC | average precision |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {row['support']} | {fmt(row.get('recall'))} | {fmt(row.get('auc'))} | {fmt(row.get('ap'))} |"
              for name, row in metrics["per_class"].items()]
    lines += [
        "",
        "## Calibration",
        "",
        (f"Expected calibration error {fmt(metrics.get('ece'))} (top-label, 15 bins), Brier score "
         f"{fmt(metrics.get('brier'))} (multiclass, 0..2), log loss {fmt(metrics.get('log_loss'))}, on the same "
         f"images. Reliability diagram: `{(metrics.get('figures') or {}).get('reliability')}`; the full report: `report.md`; "
         f"ISIC-format predictions and ground truth: `{metrics.get('predictions')}`, `{metrics.get('ground_truth')}`."),
        "",
    ]
    return lines


def _weak_classes(metrics: dict[str, Any] | None) -> list[str]:
    """This run's weakest classes by recall, from its own evaluation."""
    if not metrics:
        return []
    recalls = {name: row["recall"] for name, row in metrics["per_class"].items() if row.get("recall") is not None}
    weakest = sorted(recalls, key=recalls.get)[:2]
    if not weakest:
        return []
    return [(f"- **This run** recognises {' and '.join(f'{name} ({recalls[name]:.2f})' for name in weakest)} least "
             f"often (recall on the {metrics['split']} split).")]


def _eval_results(meta: dict[str, Any], metrics: dict[str, Any] | None, source: str) -> list[Any]:
    """The evaluation as a Hugging Face ``model-index``."""
    from huggingface_hub import EvalResult

    if not metrics:
        return []
    common = {"task_type": "image-classification", "dataset_type": source,
              "dataset_name": f"{source} ({evaluation_kind(meta, metrics['split'])})", "dataset_split": metrics["split"]}
    values = [("balanced_accuracy", "balanced multiclass accuracy", metrics.get("bma")),
              ("roc_auc", "melanoma ROC AUC", (metrics.get("melanoma") or {}).get("auc")),
              ("roc_auc", "macro ROC AUC", metrics.get("macro_auc")),
              ("average_precision", "macro average precision", metrics.get("macro_ap")),
              ("ece", "expected calibration error", metrics.get("ece"))]
    return [EvalResult(metric_type=kind, metric_name=name, metric_value=round(value, 4), **common)
            for kind, name, value in values if value is not None]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(value: float | None) -> str:
    """A metric with 3 decimals, or a dash where there is none."""
    return "–" if value is None else f"{value:.3f}"


def fmt_ci(interval: list[float] | None) -> str:
    """A confidence interval, or a dash where there is none."""
    return "–" if not interval else f"{interval[0]:.3f} – {interval[1]:.3f}"
